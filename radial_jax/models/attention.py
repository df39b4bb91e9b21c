"""Scaled dot-product attention over a slot-indexed key/value memory: the one attention function.

Keys live in *slots* (positions of the sequence, the third axis of the KV
cache's ``[.., B, G, T, D]`` arrays). Which slots a query may see (padding,
causality, a sliding window, the Radial Network's ``written_at`` rule) is
decided by the caller through a boolean mask (``radial_jax.models.kv_cache.visible_mask``);
this module only does the arithmetic, with the softmax always in float32.

``attend`` picks one of several implementations of the same function
(``choose_implementation``; all are tested against the reference; the CPU's two,
``"tiled"`` and ``"compact"``, live in ``radial_jax.models.attention_blocks``):

* ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")``, the default on CPU
  and wherever nothing better applies;
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's
  flash attention, on GPUs for fp16/bf16 prompts: no ``[q, k]`` score tensor is
  built (the boolean mask becomes a bias in the compute dtype);
* ``"chunked"``: queries in blocks of ``CHUNK`` (``lax.map``), scores ``[b, h,
  CHUNK, k]`` at a time: long prompts on accelerators where cuDNN does not apply
  (TPU, fp32, Gemma 2's soft-cap, a Radial Network's ``self_kv``);
* ``"tiled"``: blocks of ``BLOCK`` queries, one (row, kv head) at a time
  (``lax.map``), so that a block's scores stay in a core's cache; for prompts whose
  query ``i`` sits at slot ``i`` (the caller says so: ``causal_blocks=True``) a
  block reads only the slots up to its last query. The CPU's path for many queries:
  scoring every slot of a whole layer at once is bound by memory traffic (2.2 to
  3.2x faster than ``"xla"`` on causal prompts of 128 to 1024 tokens at OPT's
  shapes, 1.6 to 2.2x at Gemma 3's);
* ``"compact"``: only the keys some query of a row sees, gathered ``COMPACT_CHUNK`` at
  a time into an online softmax, each block of ``BLOCK`` queries stopping at the chunk
  of its last seen key. The CPU's path for a memory the caller calls sparse
  (``sparse_keys=True``): a Radial Network layer's cache under policy *mask*, written by
  the few tokens that visited the layer (at OPT-125M shapes with random routes at 50 %
  depth, a visit's busiest row had 14 % of its slots written at the median; the
  attention of the routed forward's visits took 0.70 s where ``"tiled"`` took 1.26 s);
* ``"reference"``: plain einsums, every feature (soft-cap, ``self_kv``); the
  small-shape path of the features ``jax.nn.dot_product_attention`` lacks, and the
  CPU's path for one query (a decode step).

Shapes: ``b`` batch (or dispatch groups), ``q`` queries, ``k`` key slots,
``h`` query heads, ``g`` kv heads (``h % g == 0``), ``d`` head dim.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from radial_jax.models import attention_blocks as blocks
from radial_jax.models.attention_blocks import NEG_INF, capped

IMPLEMENTATIONS = ("xla", "cudnn", "chunked", "tiled", "compact", "reference")
CHUNK = 512  # query block of the "chunked" implementation
CHUNK_ABOVE = 1 << 22  # q * k above which accelerators avoid whole score tensors (2048 x 2048)


def choose_implementation(q_len: int, k_len: int, dtype, *, head_dim: int = 64, softcap=None,
                          self_kv: bool = False, sparse_keys: bool = False, backend: Optional[str] = None) -> str:
    """The implementation ``attend`` uses by default (static: shapes, dtype, features, backend).

    CPU (``attention_blocks``): ``"compact"`` for a sparse memory (``sparse_keys``) of more than
    ``COMPACT_CHUNK`` slots; ``"tiled"`` for more than one ``BLOCK`` of queries (faster wherever
    measured: prompts, routed visits, ViT); ``"reference"`` for one query (a decode step: 1.3 to 2.9x
    faster than ``"xla"``, which transposes the cache, at Gemma 3's 4 query heads on one kv head;
    as fast at OPT's); else ``"xla"`` (``"reference"`` for soft-cap / ``self_kv`` and for half
    precision, which CPUs compute in float32 anyway, and which ``jax.nn.dot_product_attention``
    lowers to dot algorithms XLA's CPU backend refuses for fp16). GPU:
    cuDNN flash attention for fp16/bf16 multi-token queries without soft-cap or
    ``self_kv``, head dim <= 128 (what every cuDNN 9 flash kernel takes). Any
    accelerator: ``"chunked"`` when ``q * k`` exceeds ``CHUNK_ABOVE``.
    """
    backend = backend or jax.default_backend()
    special = softcap is not None or self_kv
    if backend == "cpu" and sparse_keys and k_len > blocks.COMPACT_CHUNK:
        return "compact"
    if backend == "cpu" and q_len > blocks.BLOCK:
        return "tiled"
    if backend == "cpu" and q_len == 1:
        return "reference"  # a decode step: the "xla" path transposes the whole cache to score one query
    if backend == "cpu" and jnp.dtype(dtype) != jnp.float32:
        return "reference"  # CPUs have no half-precision matmul: the reference computes in float32
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if backend == "gpu" and not special and q_len > 1 and half and head_dim <= 128:
        return "cudnn"
    if backend != "cpu" and q_len > CHUNK and q_len * k_len > CHUNK_ABOVE:
        return "chunked"
    return "reference" if special else "xla"


def attend(q_bqhd, k_bgkd, v_bgkd, mask_bqk, *, scale: Optional[float] = None, softcap: Optional[float] = None,
           self_kv=None, causal_blocks: bool = False, sparse_keys: bool = False,
           implementation: Optional[str] = None):
    """Softmax attention of ``q`` over ``k/v`` where ``mask`` is true.

    Args:
      q_bqhd: queries, unscaled.
      k_bgkd, v_bgkd: key/value memory with ``g`` kv heads (grouped-query attention when ``g < h``),
        heads before slots (the KV cache's layout).
      mask_bqk: which memory slots each query sees.
      scale: multiplies the scores (default ``d ** -0.5``; Gemma: ``query_pre_attn_scalar ** -0.5``).
      softcap: Gemma 2's ``tanh(score / cap) * cap`` on the scaled scores, before masking.
      self_kv: optional ``(k_bqgd, v_bqgd)``: each query's own fresh key/value, attended
        in addition to the memory (a Radial Network token revisiting a layer must not
        read its own cached entry; see ``radial_jax.models.kv_cache``).
      causal_blocks: the caller's promise that query ``i`` sits at memory slot ``i`` and that its
        mask is causal (it sees no slot after ``i``): a prompt filling slots ``0 .. q - 1``. Queries
        may then run in blocks that skip the slots after their last query (``"tiled"``).
      sparse_keys: the caller's hint that each row's queries see few of the slots (``"compact"``
        on CPU when the memory spans more than one chunk); any mask stays correct.
      implementation: one of ``IMPLEMENTATIONS``; default ``choose_implementation(...)``.

    Returns:
      context ``[b, q, h, d]`` in the dtype of ``q``; zeros for a query that sees nothing.
    """
    b, q, h, d = q_bqhd.shape
    g, k = k_bgkd.shape[1], k_bgkd.shape[2]
    if h % g:
        raise ValueError(f"{h} query heads cannot share {g} kv heads evenly")
    scale = d ** -0.5 if scale is None else scale
    impl = implementation or choose_implementation(q, k, q_bqhd.dtype, head_dim=d, softcap=softcap,
                                                   self_kv=self_kv is not None, sparse_keys=sparse_keys)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {impl!r} is unknown; allowed: {IMPLEMENTATIONS}")
    if impl in ("xla", "cudnn") and (softcap is not None or self_kv is not None):
        raise ValueError(f"the {impl!r} attention has no soft-cap or self_kv; use 'reference' or 'chunked'")
    if causal_blocks and k < q:
        raise ValueError(f"causal_blocks=True puts query i at slot i: {q} queries need at least as many slots, "
                         f"got {k}")
    if impl == "compact":
        ctx = blocks.compact(q_bqhd, k_bgkd, v_bgkd, mask_bqk, scale, softcap, self_kv)
    elif impl == "tiled":
        ctx = blocks.tiled(q_bqhd, k_bgkd, v_bgkd, mask_bqk, scale, softcap, self_kv, causal_blocks)
    elif impl == "chunked":
        ctx = _chunked(q_bqhd, k_bgkd, v_bgkd, mask_bqk, scale, softcap, self_kv)
    elif impl == "reference":
        ctx = _reference(q_bqhd, k_bgkd, v_bgkd, mask_bqk, scale, softcap, self_kv)
    else:  # jax.nn.dot_product_attention takes [b, k, g, d]; the swap is a layout change XLA folds into the dot
        ctx = jax.nn.dot_product_attention(
            q_bqhd, jnp.swapaxes(k_bgkd, 1, 2), jnp.swapaxes(v_bgkd, 1, 2).astype(k_bgkd.dtype),
            mask=mask_bqk[:, None], scale=scale, implementation=impl)
    if self_kv is None:  # a query that sees nothing (padding) gets zeros rather than a uniform mix
        ctx = jnp.where(mask_bqk.any(-1)[:, :, None, None], ctx, jnp.zeros((), ctx.dtype))
    return ctx.astype(q_bqhd.dtype)


def _reference(q_bqhd, k_bgkd, v_bgkd, mask_bqk, scale, softcap, self_kv):
    """Every feature in plain einsums, float32 throughout; scores ``[b, g, r, q, k]``."""
    b, q, h, d = q_bqhd.shape
    g = k_bgkd.shape[1]
    qf = q_bqhd.astype(jnp.float32).reshape(b, q, g, h // g, d) * scale

    scores = capped(softcap, jnp.einsum("bqgrd,bgkd->bgrqk", qf, k_bgkd.astype(jnp.float32)))
    scores = jnp.where(mask_bqk[:, None, None, :, :], scores, NEG_INF)
    if self_kv is None:
        weights = jax.nn.softmax(scores, axis=-1)
        ctx = _weighted_values(weights, v_bgkd)
        return jnp.where(mask_bqk.any(-1)[:, :, None, None, None], ctx, 0.0).reshape(b, q, h, d)
    # The own key joins the softmax as one more score, combined by hand: concatenating it to the
    # scores would copy the whole [.., q, k] tensor twice (in, and the weights back out).
    k_self, v_self = self_kv
    s_self = capped(softcap, jnp.einsum("bqgrd,bqgd->bgrq", qf, k_self.astype(jnp.float32)))
    top = jax.lax.stop_gradient(jnp.maximum(jnp.max(scores, axis=-1), s_self))  # [b, g, r, q]
    e = jnp.exp(scores - top[..., None])
    e_self = jnp.exp(s_self - top)
    total = jnp.sum(e, axis=-1) + e_self  # >= 1: the largest score contributes exp(0)
    ctx = _weighted_values(e, v_bgkd) + jnp.einsum("bgrq,bqgd->bqgrd", e_self, v_self.astype(jnp.float32))
    return (ctx / jnp.moveaxis(total, 3, 1)[..., None]).reshape(b, q, h, d)


def _weighted_values(weights_bgrqk, v_bgkd):
    """``sum_k weights * v`` as ``[b, q, g, r, d]``."""
    # "bgrqd" then a transpose: asked for "bqgrd" directly, XLA on CPU runs this matmul 3x slower
    return jnp.einsum("bgrqk,bgkd->bgrqd", weights_bgrqk, v_bgkd.astype(jnp.float32)).transpose(0, 3, 1, 2, 4)


def _chunked(q_bqhd, k_bgkd, v_bgkd, mask_bqk, scale, softcap, self_kv):
    """``_reference`` on blocks of ``CHUNK`` queries in turn: scores ``[b, g, r, CHUNK, k]`` at a time."""
    b, q, h, d = q_bqhd.shape
    n = -(-q // CHUNK)
    pad = n * CHUNK - q

    def blocks(a):  # [b, q, ...] -> [n, b, CHUNK, ...]
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape((b, n, CHUNK) + a.shape[2:]), 1, 0)

    xs = (blocks(q_bqhd), blocks(mask_bqk)) + (tuple(blocks(a) for a in self_kv) if self_kv is not None else ())

    def one(x):
        q_blk, m_blk = x[:2]
        skv = x[2:] if self_kv is not None else None
        return _reference(q_blk, k_bgkd, v_bgkd, m_blk, scale, softcap, skv)

    ctx = jax.lax.map(one, xs)  # [n, b, CHUNK, h, d]
    return jnp.moveaxis(ctx, 0, 1).reshape(b, n * CHUNK, h, d)[:, :q]

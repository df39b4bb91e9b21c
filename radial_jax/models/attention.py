"""Scaled dot-product attention over a slot-indexed key/value memory: the one attention function.

Keys live in *slots* (positions of the sequence, the third axis of the KV
cache's ``[.., B, G, T, D]`` arrays). Which slots a query may see (padding,
causality, a sliding window, the Radial Network's ``written_at`` rule) is
decided by the caller through a boolean mask (``radial_jax.models.kv_cache.visible_mask``);
this module only does the arithmetic, with the softmax always in float32.

``attend`` picks one of several implementations of the same function
(``choose_implementation``; all are tested against the reference):

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
  small-shape path of the features ``jax.nn.dot_product_attention`` lacks.

Shapes: ``b`` batch (or dispatch groups), ``q`` queries, ``k`` key slots,
``h`` query heads, ``g`` kv heads (``h % g == 0``), ``d`` head dim.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so that a fully masked row gives zeros, not NaNs
IMPLEMENTATIONS = ("xla", "cudnn", "chunked", "tiled", "compact", "reference")
CHUNK = 512  # query block of the "chunked" implementation
BLOCK = 64  # query block of "tiled"
COMPACT_CHUNK = 64  # keys per step of "compact"
BLOCK_SCORE_BYTES = 1 << 19  # float32 scores per iteration of "tiled": what a core's L2 holds
CHUNK_ABOVE = 1 << 22  # q * k above which accelerators avoid whole score tensors (2048 x 2048)


def choose_implementation(q_len: int, k_len: int, dtype, *, head_dim: int = 64, softcap=None,
                          self_kv: bool = False, sparse_keys: bool = False, backend: Optional[str] = None) -> str:
    """The implementation ``attend`` uses by default (static: shapes, dtype, features, backend).

    CPU: ``"compact"`` for a sparse memory (``sparse_keys``) of more than ``COMPACT_CHUNK`` slots;
    ``"tiled"`` for more than one ``BLOCK`` of queries (faster wherever measured: prompts,
    routed visits, ViT); else ``"xla"`` (``"reference"`` for soft-cap / ``self_kv`` and for half
    precision, which CPUs compute in float32 anyway, and which ``jax.nn.dot_product_attention``
    lowers to dot algorithms XLA's CPU backend refuses for fp16). GPU:
    cuDNN flash attention for fp16/bf16 multi-token queries without soft-cap or
    ``self_kv``, head dim <= 128 (what every cuDNN 9 flash kernel takes). Any
    accelerator: ``"chunked"`` when ``q * k`` exceeds ``CHUNK_ABOVE``.
    """
    backend = backend or jax.default_backend()
    special = softcap is not None or self_kv
    if backend == "cpu" and sparse_keys and k_len > COMPACT_CHUNK:
        return "compact"
    if backend == "cpu" and q_len > BLOCK:
        return "tiled"
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
        ctx = _compact(q_bqhd, k_bgkd, v_bgkd, mask_bqk, scale, softcap, self_kv)
    elif impl == "tiled":
        ctx = _tiled(q_bqhd, k_bgkd, v_bgkd, mask_bqk, scale, softcap, self_kv, causal_blocks)
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


def _capped(softcap, s):
    """Gemma 2's soft-cap of the scaled scores (``None``: none)."""
    return s if softcap is None else jnp.tanh(s / softcap) * softcap


def _reference(q_bqhd, k_bgkd, v_bgkd, mask_bqk, scale, softcap, self_kv):
    """Every feature in plain einsums, float32 throughout; scores ``[b, g, r, q, k]``."""
    b, q, h, d = q_bqhd.shape
    g = k_bgkd.shape[1]
    qf = q_bqhd.astype(jnp.float32).reshape(b, q, g, h // g, d) * scale

    scores = _capped(softcap, jnp.einsum("bqgrd,bgkd->bgrqk", qf, k_bgkd.astype(jnp.float32)))
    scores = jnp.where(mask_bqk[:, None, None, :, :], scores, NEG_INF)
    if self_kv is None:
        weights = jax.nn.softmax(scores, axis=-1)
        ctx = _weighted_values(weights, v_bgkd)
        return jnp.where(mask_bqk.any(-1)[:, :, None, None, None], ctx, 0.0).reshape(b, q, h, d)
    # The own key joins the softmax as one more score, combined by hand: concatenating it to the
    # scores would copy the whole [.., q, k] tensor twice (in, and the weights back out).
    k_self, v_self = self_kv
    s_self = _capped(softcap, jnp.einsum("bqgrd,bqgd->bgrq", qf, k_self.astype(jnp.float32)))
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


def _tiled(q_bqhd, k_bgkd, v_bgkd, mask_bqk, scale, softcap, self_kv, causal_blocks: bool):
    """Blocks of ``BLOCK`` queries, one (row, kv head) item at a time: scores that stay in a core's cache.

    An item is a row's kv head with its ``r = h // g`` query heads: a block's scores are ``[block, r,
    slots]``. ``lax.map`` runs as many items per iteration as ``BLOCK_SCORE_BYTES`` of scores hold, so
    the exponentials and the value matmul read scores the score matmul just wrote to cache. With
    ``causal_blocks`` a block reads the slots up to its last query only. The softmax is normalised
    after the value matmul (one division per output, not per score); ``self_kv`` joins it as one
    more score, as in ``_reference``.
    """
    b, q, h, d = q_bqhd.shape
    g, k = k_bgkd.shape[1], k_bgkd.shape[2]
    r = h // g

    def items(a_bxgy):  # [b, x, g, ...] -> [b * g, x, ...]
        return jnp.swapaxes(a_bxgy, 1, 2).reshape((b * g, a_bxgy.shape[1]) + a_bxgy.shape[3:])

    q_nqrd = items((q_bqhd.astype(jnp.float32) * scale).reshape(b, q, g, r, d))
    xs = (q_nqrd, k_bgkd.reshape(b * g, k, d), v_bgkd.reshape(b * g, k, d), jnp.arange(b * g, dtype=jnp.int32) // g)
    if self_kv is not None:
        xs += tuple(items(a) for a in self_kv)  # [b * g, q, d]

    def one_item(item):
        q_qrd, k_kd, v_kd, row = item[:4]
        mask_qk = jax.lax.dynamic_index_in_dim(mask_bqk, row, keepdims=False)
        outs = []
        for start in range(0, q, BLOCK):
            end = min(start + BLOCK, q)
            reach = end if causal_blocks else k  # causal: the block's queries see slots [0, end) at most
            q_blk = q_qrd[start:end]
            s_qrk = _capped(softcap, jnp.einsum("qrd,kd->qrk", q_blk, k_kd[:reach].astype(jnp.float32)))
            s_qrk = jnp.where(mask_qk[start:end, None, :reach], s_qrk, NEG_INF)
            top_qr = jnp.max(s_qrk, axis=-1)
            if self_kv is not None:
                k_self, v_self = (a[start:end].astype(jnp.float32) for a in item[4:])
                s_self_qr = _capped(softcap, jnp.einsum("qrd,qd->qr", q_blk, k_self))
                top_qr = jnp.maximum(top_qr, s_self_qr)
            top_qr = jax.lax.stop_gradient(top_qr)
            e_qrk = jnp.exp(s_qrk - top_qr[..., None])
            num_qrd = jnp.einsum("qrk,kd->qrd", e_qrk, v_kd[:reach].astype(jnp.float32))
            den_qr = jnp.sum(e_qrk, axis=-1)
            if self_kv is not None:
                e_self_qr = jnp.exp(s_self_qr - top_qr)
                num_qrd = num_qrd + e_self_qr[..., None] * v_self[:, None, :]
                den_qr = den_qr + e_self_qr
            outs.append(num_qrd / den_qr[..., None])
        return jnp.concatenate(outs)

    per_iteration = max(1, BLOCK_SCORE_BYTES // (4 * BLOCK * r * (q if causal_blocks else k)))
    ctx_nqrd = jax.lax.map(one_item, xs, batch_size=min(per_iteration, b * g))
    return jnp.swapaxes(ctx_nqrd.reshape(b, g, q, r, d), 1, 2).reshape(b, q, h, d)


def _compact(q_bqhd, k_bgkd, v_bgkd, mask_bqk, scale, softcap, self_kv):
    """Only the keys some query sees, ``COMPACT_CHUNK`` at a time: cost follows what is visible.

    Each row's seen slots (``mask.any`` over its queries) are gathered in slot order, a chunk
    at a time for every row at once, and folded into an online softmax (running maximum, sum
    and weighted values, rescaled per chunk). Queries go in blocks of ``BLOCK``; a block stops
    at the chunk holding the last key any of its queries sees (``lax.cond`` per chunk: the
    loop's trip count is static, so it differentiates): with causal masks and queries in slot
    order, later blocks read more. ``self_kv`` starts the softmax, as one more score.
    """
    b, q, h, d = q_bqhd.shape
    g, k = k_bgkd.shape[1], k_bgkd.shape[2]
    r = h // g
    chunks = -(-k // COMPACT_CHUNK)
    width = chunks * COMPACT_CHUNK
    seen_bk = mask_bqk.any(axis=1)
    rank_bk = jnp.where(seen_bk, jnp.cumsum(seen_bk, axis=-1) - 1, width)  # where each seen slot goes
    rows = jnp.arange(b)[:, None]
    order_bk = jnp.zeros((b, width), jnp.int32).at[rows, rank_bk].set(jnp.arange(k, dtype=jnp.int32), mode="drop")
    # the mask with keys in that order (unseen ones past every row's count: false)
    mask_bqk = jnp.zeros((b, q, width), bool).at[rows[:, None], jnp.arange(q)[:, None], rank_bk[:, None]].set(
        mask_bqk, mode="drop")
    reach_bq = jnp.max(jnp.where(mask_bqk, jnp.arange(1, width + 1), 0), axis=-1)  # 1 + last key each query sees
    q_bgrqd = jnp.transpose((q_bqhd.astype(jnp.float32) * scale).reshape(b, q, g, r, d), (0, 2, 3, 1, 4))
    if self_kv is not None:
        k_self, v_self = (jnp.transpose(a.astype(jnp.float32), (0, 2, 1, 3)) for a in self_kv)  # [b, g, q, d]

    def block(start, end):
        q_blk = q_bgrqd[:, :, :, start:end]
        n = end - start
        if self_kv is None:
            top = jnp.full((b, g, r, n), NEG_INF, jnp.float32)
            total, acc = jnp.zeros((b, g, r, n), jnp.float32), jnp.zeros((b, g, r, n, d), jnp.float32)
        else:
            s_self = _capped(softcap, jnp.einsum("bgrqd,bgqd->bgrq", q_blk, k_self[:, :, start:end]))
            top = jax.lax.stop_gradient(s_self)
            total = jnp.exp(s_self - top)  # 1, with the score's gradient
            acc = total[..., None] * v_self[:, :, None, start:end]
        reach = jnp.max(reach_bq[:, start:end])
        mask_blk = mask_bqk[:, start:end]

        def fold(c, carry):
            def run(carry):
                top, total, acc = carry
                at = c * COMPACT_CHUNK
                slots_bc = jax.lax.dynamic_slice_in_dim(order_bk, at, COMPACT_CHUNK, axis=1)
                m = jax.lax.dynamic_slice_in_dim(mask_blk, at, COMPACT_CHUNK, axis=2)[:, None, None]
                k_c, v_c = (jax.vmap(lambda a_gkd, s_c: a_gkd.at[:, s_c].get(mode="promise_in_bounds"))(
                    a, slots_bc).astype(jnp.float32) for a in (k_bgkd, v_bgkd))  # [b, g, chunk, d]
                s = _capped(softcap, jnp.einsum("bgrqd,bgcd->bgrqc", q_blk, k_c))
                new_top = jax.lax.stop_gradient(jnp.maximum(top, jnp.max(jnp.where(m, s, NEG_INF), axis=-1)))
                # masked scores never reach exp: exp(s + 1e30) would be inf there, and its gradient times 0 NaN
                e = jnp.where(m, jnp.exp(jnp.where(m, s - new_top[..., None], 0.0)), 0.0)
                fade = jnp.exp(top - new_top)
                return (new_top, total * fade + jnp.sum(e, axis=-1),
                        acc * fade[..., None] + jnp.einsum("bgrqc,bgcd->bgrqd", e, v_c))
            return jax.lax.cond(c * COMPACT_CHUNK < reach, run, lambda carry: carry, carry)

        top, total, acc = jax.lax.fori_loop(0, chunks, fold, (top, total, acc))
        return acc / jnp.where(total > 0, total, 1.0)[..., None]  # nothing seen: zeros

    ctx_bgrqd = jnp.concatenate([block(start, min(start + BLOCK, q)) for start in range(0, q, BLOCK)], axis=3)
    return jnp.transpose(ctx_bgrqd, (0, 3, 1, 2, 4)).reshape(b, q, h, d)

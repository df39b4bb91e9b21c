"""Scaled dot-product attention over a slot-indexed key/value memory.

Keys live in *slots* (positions of the sequence, the second axis of the KV
cache). Which slots a query may see is decided by the caller through a boolean
mask; this module only does the arithmetic, always in float32 for the softmax.

Shapes: ``b`` batch (or dispatch groups), ``q`` queries, ``k`` key slots,
``h`` query heads, ``g`` kv heads (``h % g == 0``), ``d`` head dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so that a fully masked row gives zeros, not NaNs


def dot_product_attention(q_bqhd, k_bkgd, v_bkgd, mask_bqk, *, self_kv=None):
    """Softmax attention of ``q`` over ``k/v`` where ``mask`` is true.

    Args:
      q_bqhd: queries, unscaled; the ``1/sqrt(d)`` scale is applied here.
      k_bkgd, v_bkgd: key/value memory with ``g`` kv heads.
      mask_bqk: which memory slots each query sees.
      self_kv: optional ``(k_bqgd, v_bqgd)``: each query's own fresh key/value,
        attended in addition to the memory (used when a token revisits a layer
        and must not read its own cached entry; see ``radial_jax.kv_cache``).

    Returns:
      context ``[b, q, h, d]`` in the dtype of ``q``.
    """
    b, q, h, d = q_bqhd.shape
    g = k_bkgd.shape[2]
    if h % g:
        raise ValueError(f"{h} query heads cannot share {g} kv heads evenly")
    rep = h // g
    qf = q_bqhd.astype(jnp.float32).reshape(b, q, g, rep, d) * (d ** -0.5)
    scores = jnp.einsum("bqgrd,bkgd->bgrqk", qf, k_bkgd.astype(jnp.float32))
    scores = jnp.where(mask_bqk[:, None, None, :, :], scores, NEG_INF)
    if self_kv is not None:
        k_self, v_self = self_kv
        s_self = jnp.einsum("bqgrd,bqgd->bgrq", qf, k_self.astype(jnp.float32))
        scores = jnp.concatenate([scores, s_self[..., None]], axis=-1)
    weights = jax.nn.softmax(scores, axis=-1)
    if self_kv is not None:
        weights, w_self = weights[..., :-1], weights[..., -1]
    ctx = jnp.einsum("bgrqk,bkgd->bqgrd", weights, v_bkgd.astype(jnp.float32))
    if self_kv is not None:
        ctx = ctx + jnp.einsum("bgrq,bqgd->bqgrd", w_self, v_self.astype(jnp.float32))
    # A query that sees nothing (padding) gets zeros rather than a uniform mix.
    any_visible = mask_bqk.any(-1) if self_kv is None else jnp.ones((b, q), bool)
    ctx = jnp.where(any_visible[:, :, None, None, None], ctx, 0.0)
    return ctx.reshape(b, q, h, d).astype(q_bqhd.dtype)

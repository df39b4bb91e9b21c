"""Scaled dot-product attention over a slot-indexed key/value memory: the one attention function.

Keys live in *slots* (positions of the sequence, the second axis of the KV
cache). Which slots a query may see (padding, causality, a sliding window, the
Radial Network's ``written_at`` rule) is decided by the caller through a boolean
mask (``radial_jax.kv_cache.visible_mask``); this module only does the
arithmetic, with the softmax always in float32.

Shapes: ``b`` batch (or dispatch groups), ``q`` queries, ``k`` key slots,
``h`` query heads, ``g`` kv heads (``h % g == 0``), ``d`` head dim.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so that a fully masked row gives zeros, not NaNs


def attend(q_bqhd, k_bkgd, v_bkgd, mask_bqk, *, scale: Optional[float] = None, softcap: Optional[float] = None,
           self_kv=None):
    """Softmax attention of ``q`` over ``k/v`` where ``mask`` is true.

    Args:
      q_bqhd: queries, unscaled.
      k_bkgd, v_bkgd: key/value memory with ``g`` kv heads (grouped-query attention when ``g < h``).
      mask_bqk: which memory slots each query sees.
      scale: multiplies the scores (default ``d ** -0.5``; Gemma: ``query_pre_attn_scalar ** -0.5``).
      softcap: Gemma 2's ``tanh(score / cap) * cap`` on the scaled scores, before masking.
      self_kv: optional ``(k_bqgd, v_bqgd)``: each query's own fresh key/value, attended
        in addition to the memory (a Radial Network token revisiting a layer must not
        read its own cached entry; see ``radial_jax.kv_cache``).

    Returns:
      context ``[b, q, h, d]`` in the dtype of ``q``.
    """
    b, q, h, d = q_bqhd.shape
    g = k_bkgd.shape[2]
    if h % g:
        raise ValueError(f"{h} query heads cannot share {g} kv heads evenly")
    rep = h // g
    scale = d ** -0.5 if scale is None else scale
    qf = q_bqhd.astype(jnp.float32).reshape(b, q, g, rep, d) * scale

    def capped(s):
        return s if softcap is None else jnp.tanh(s / softcap) * softcap

    scores = capped(jnp.einsum("bqgrd,bkgd->bgrqk", qf, k_bkgd.astype(jnp.float32)))
    scores = jnp.where(mask_bqk[:, None, None, :, :], scores, NEG_INF)
    if self_kv is not None:
        k_self, v_self = self_kv
        s_self = capped(jnp.einsum("bqgrd,bqgd->bgrq", qf, k_self.astype(jnp.float32)))
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

"""Attention in blocks of queries whose scores stay in a core's cache: the CPU's implementations of
``radial_jax.models.attention.attend`` (``"tiled"``, ``"compact"``; the module docstring there says when each
runs), and the score primitives every implementation shares (``NEG_INF``, ``capped``).

Shapes as in ``attention``: ``b`` batch, ``q`` queries, ``k`` key slots, ``h`` query heads, ``g`` kv heads,
``r = h // g`` query heads per kv head, ``d`` head dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so that a fully masked row gives zeros, not NaNs
BLOCK = 64  # query block of "tiled" and "compact"
COMPACT_CHUNK = 64  # keys per step of "compact"
BLOCK_SCORE_BYTES = 1 << 19  # float32 scores per iteration of "tiled": what a core's L2 holds


def capped(softcap, s):
    """Gemma 2's soft-cap of the scaled scores (``None``: none)."""
    return s if softcap is None else jnp.tanh(s / softcap) * softcap


def tiled(q_bqhd, k_bgkd, v_bgkd, mask_bqk, scale, softcap, self_kv, causal_blocks: bool):
    """Blocks of ``BLOCK`` queries, one (row, kv head) item at a time: scores that stay in a core's cache.

    An item is a row's kv head with its ``r = h // g`` query heads: a block's scores are ``[block, r,
    slots]``. ``lax.map`` runs as many items per iteration as ``BLOCK_SCORE_BYTES`` of scores hold, so
    the exponentials and the value matmul read scores the score matmul just wrote to cache. With
    ``causal_blocks`` a block reads the slots up to its last query only. The softmax is normalised
    after the value matmul (one division per output, not per score); ``self_kv`` joins it as one
    more score, as in ``attention._reference``.
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
            s_qrk = capped(softcap, jnp.einsum("qrd,kd->qrk", q_blk, k_kd[:reach].astype(jnp.float32)))
            s_qrk = jnp.where(mask_qk[start:end, None, :reach], s_qrk, NEG_INF)
            top_qr = jnp.max(s_qrk, axis=-1)
            if self_kv is not None:
                k_self, v_self = (a[start:end].astype(jnp.float32) for a in item[4:])
                s_self_qr = capped(softcap, jnp.einsum("qrd,qd->qr", q_blk, k_self))
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


def compact(q_bqhd, k_bgkd, v_bgkd, mask_bqk, scale, softcap, self_kv):
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
            s_self = capped(softcap, jnp.einsum("bgrqd,bgqd->bgrq", q_blk, k_self[:, :, start:end]))
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
                s = capped(softcap, jnp.einsum("bgrqd,bgcd->bgrqc", q_blk, k_c))
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

"""The global KV cache of DESIGN.md §4, shared by the sequential models and the Radial Network.

One preallocated array per K and V, ``[L, B, T_max, G, D]`` (layers, batch,
slot = token position, kv heads, head dim), plus ``written_at[L, B, T_max]``:
the step at which an entry was written, or ``EMPTY``.

Rules (the Radial Network relies on all three; a sequential model is the case
where token ``p`` visits layer ``l`` exactly once, at step ``l``):

1. A token processed by layer ``l`` at step ``s`` writes its K/V at ``(l, slot)``
   only if that entry is empty (first visit). Reuse never overwrites.
2. A query at slot ``i``, step ``s``, sees entries ``(l, j)`` with ``j <= i``
   (causal models) and ``written_at <= s``. ``EMPTY`` is the largest int32, so an
   empty entry is never visible.
3. Skipped entries stay empty (policy *mask*) or are filled from the skipping
   token's current state (policy *propagate*); that policy lives with the router.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

EMPTY = jnp.iinfo(jnp.int32).max


@flax.struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, T, G, D]
    v: jax.Array  # [L, B, T, G, D]
    written_at: jax.Array  # [L, B, T] int32, EMPTY where unwritten

    @classmethod
    def create(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> "KVCache":
        for name, value in dict(num_layers=num_layers, batch=batch, max_len=max_len).items():
            if value < 1:
                raise ValueError(f"KVCache {name} must be >= 1, got {value}")
        shape = (num_layers, batch, max_len, kv_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   written_at=jnp.full(shape[:3], EMPTY, jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]


def write_first_visit(k_btgd, v_btgd, written_bt, slots_bq, k_new_bqgd, v_new_bqgd, valid_bq, step):
    """Write new K/V of one layer at ``slots`` where ``valid`` and the entry is empty.

    ``slots`` index the cache row of their batch row; invalid entries (padding,
    unused capacity) are dropped. Returns the updated ``(k, v, written_at)``.
    """
    k, v, written = write_first_visit_layer(k_btgd[None], v_btgd[None], written_bt[None], 0, slots_bq,
                                            k_new_bqgd, v_new_bqgd, valid_bq, step)
    return k[0], v[0], written[0]


def write_first_visit_layer(k_lbtgd, v_lbtgd, written_lbt, layer, slots_bq, k_new_bqgd, v_new_bqgd, valid_bq,
                            step):
    """``write_first_visit`` into layer ``layer`` (may be traced) of the whole cache, scattered in place.

    Same rule as ``write_first_visit``; only the ``b x q`` new entries are touched,
    so inside a scan or while loop XLA updates the cache buffers without copying them.
    """
    b_idx = jnp.arange(slots_bq.shape[0])[:, None]
    t_max = k_lbtgd.shape[2]
    written_bt = jax.lax.dynamic_index_in_dim(written_lbt, layer, 0, keepdims=False)
    empty = jnp.take_along_axis(written_bt, jnp.clip(slots_bq, 0, t_max - 1), axis=1) == EMPTY
    target = jnp.where(valid_bq & empty & (slots_bq < t_max) & (slots_bq >= 0), slots_bq, t_max)
    k = k_lbtgd.at[layer, b_idx, target].set(k_new_bqgd.astype(k_lbtgd.dtype), mode="drop")
    v = v_lbtgd.at[layer, b_idx, target].set(v_new_bqgd.astype(v_lbtgd.dtype), mode="drop")
    step_bq = jnp.broadcast_to(jnp.asarray(step, jnp.int32), slots_bq.shape)
    written = written_lbt.at[layer, b_idx, target].set(step_bq, mode="drop")
    return k, v, written


def visible_mask(written_bt, slots_bq, step, *, causal: bool = True, exclude_self: bool = False):
    """``mask[b, q, j]``: may the query at ``slots[b, q]`` (at ``step``) see entry ``j``."""
    t_max = written_bt.shape[1]
    j = jnp.arange(t_max)
    mask = (written_bt <= step)[:, None, :]
    if causal:
        mask = mask & (j[None, None, :] <= slots_bq[:, :, None])
    if exclude_self:
        mask = mask & (j[None, None, :] != slots_bq[:, :, None])
    return mask

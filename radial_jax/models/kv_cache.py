"""The global KV cache (docs/design.md §4), shared by the sequential models and the Radial Network.

One preallocated array per K and V, ``[L, B, G, T_max, D]`` (layers, batch,
kv heads, slot = token position, head dim), plus ``written_at[L, B, T_max]``:
the step at which an entry was written, or ``EMPTY``. Heads come before slots
(as in transformers' caches) so that a layer's keys are, per batch row and
head, one contiguous ``[T, D]`` matrix: the attention matmuls read them in
place, where a slot-major layout makes XLA transpose the layer's whole cache
on every decoded token.

Rules (the Radial Network relies on all three; a sequential model is the case
where token ``p`` visits layer ``l`` exactly once, at step ``l``):

1. A token processed by layer ``l`` at step ``s`` writes its K/V at ``(l, slot)``
   only if that entry is empty (first visit). Reuse never overwrites.
2. A query at slot ``i``, step ``s``, sees entries ``(l, j)`` with ``j <= i``
   (causal models), ``i - j < window`` (a sliding-window layer) and
   ``written_at <= s``. ``EMPTY`` is the largest int32, so an empty entry is
   never visible.
3. Skipped entries stay empty (policy *mask*) or are filled from the skipping
   token's current state (policy *propagate*); that policy lives with the router.

A sliding window only narrows what a query sees: every slot stays in the cache,
so decoding past the window reads exactly the keys the parallel forward reads.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

EMPTY = jnp.iinfo(jnp.int32).max


@flax.struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, G, T, D]
    v: jax.Array  # [L, B, G, T, D]
    written_at: jax.Array  # [L, B, T] int32, EMPTY where unwritten

    @classmethod
    def create(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> "KVCache":
        for name, value in dict(num_layers=num_layers, batch=batch, max_len=max_len).items():
            if value < 1:
                raise ValueError(f"KVCache {name} must be >= 1, got {value}")
        shape = (num_layers, batch, kv_heads, max_len, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   written_at=jnp.full((num_layers, batch, max_len), EMPTY, jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def layer(self, index):
        """``(k [B, G, T, D], v, written_at [B, T])`` of layer ``index`` (may be traced)."""
        return tuple(jax.lax.dynamic_index_in_dim(a, index, 0, keepdims=False)
                     for a in (self.k, self.v, self.written_at))


def split_layers(cache: KVCache) -> tuple:
    """The cache as ``L`` single-layer caches (``[1, B, T, ...]`` each), the layout of per-layer pools.

    A layer then reads and writes its own buffers (index 0) in place, where a layer picked out of the
    stacked ``[L, ...]`` buffers is a slice (why that matters: ``models.stack``'s docstring). Rules and
    contents are unchanged.
    """
    return tuple(KVCache(cache.k[l:l + 1], cache.v[l:l + 1], cache.written_at[l:l + 1])
                 for l in range(cache.k.shape[0]))


def stack_layers(caches) -> KVCache:
    """The inverse of ``split_layers``."""
    return KVCache(*(jnp.concatenate([getattr(c, f) for c in caches]) for f in ("k", "v", "written_at")))


def first_rows(cache, n: int):
    """The first ``n`` rows of a ``KVCache`` or of per-layer caches (every buffer is ``[L, B, ...]``)."""
    if is_split(cache):
        return tuple(first_rows(c, n) for c in cache)
    return KVCache(cache.k[:, :n], cache.v[:, :n], cache.written_at[:, :n])


def is_split(cache) -> bool:
    """Whether ``cache`` is in the per-layer layout (a tuple of single-layer caches, ``split_layers``)."""
    return isinstance(cache, (tuple, list))


def cache_max_len(cache) -> int:
    """Slots of a ``KVCache`` or of per-layer caches."""
    return (cache[0] if is_split(cache) else cache).max_len


def cache_batch(cache) -> int:
    """Rows of a ``KVCache`` or of per-layer caches."""
    return (cache[0] if is_split(cache) else cache).batch


def layer_view(cache, layer):
    """``(k [B, G, T, D], v, written_at [B, T])`` of ``layer``, in either layout.

    Stacked: ``layer`` may be traced (a slice of the ``[L, ...]`` buffers). Per-layer: a Python
    int, and the layer's own buffers are read in place.
    """
    if is_split(cache):
        return cache[int(layer)].layer(0)
    return cache.layer(layer)


def write_layer(cache, layer, row_q, slot_q, k_qgd, v_qgd, valid_q, step):
    """``write_first_visit`` into one ``layer`` of a cache in either layout (see ``layer_view``)."""
    if is_split(cache):
        l = int(layer)
        new = write_first_visit(cache[l], 0, row_q, slot_q, k_qgd, v_qgd, valid_q, step)
        return tuple(cache[:l]) + (new,) + tuple(cache[l + 1:])
    return write_first_visit(cache, layer, row_q, slot_q, k_qgd, v_qgd, valid_q, step)


def write_first_visit(cache: KVCache, layer_q, row_q, slot_q, k_qgd, v_qgd, valid_q, step) -> KVCache:
    """Rule 1: write new K/V at ``(layer, row, slot)`` per entry, where ``valid`` and the entry is empty.

    ``layer_q``, ``row_q``, ``slot_q``, ``valid_q`` share a leading shape ``q`` (any
    number of axes; they broadcast), ``k_qgd``/``v_qgd`` add ``[G, D]``. Entries of
    one call may go to different layers (radial mode) and cache rows (decoding
    across the batch). Invalid entries and slots outside ``[0, T_max)`` are
    dropped; only the touched entries are scattered, so inside a scan or while
    loop XLA updates the cache buffers in place.
    """
    t_max = cache.max_len
    shape = jnp.broadcast_shapes(jnp.shape(slot_q), jnp.shape(valid_q), jnp.shape(layer_q), jnp.shape(row_q))
    layer_q, row_q, slot_q = (jnp.broadcast_to(jnp.asarray(a, jnp.int32), shape) for a in (layer_q, row_q, slot_q))
    valid_q = jnp.broadcast_to(valid_q, shape)
    empty = cache.written_at[layer_q, row_q, jnp.clip(slot_q, 0, t_max - 1)] == EMPTY
    target = jnp.where(valid_q & empty & (slot_q >= 0) & (slot_q < t_max), slot_q, t_max)
    # advanced indices around the head slice: the indexed entries are [q..., G, D], as k_qgd
    k = cache.k.at[layer_q, row_q, :, target].set(k_qgd.astype(cache.k.dtype), mode="drop")
    v = cache.v.at[layer_q, row_q, :, target].set(v_qgd.astype(cache.v.dtype), mode="drop")
    written = cache.written_at.at[layer_q, row_q, target].set(
        jnp.broadcast_to(jnp.asarray(step, jnp.int32), shape), mode="drop")
    return KVCache(k, v, written)


def fill_prompt(cache: KVCache, layer, k_btgd, v_btgd, valid_bt, step) -> KVCache:
    """Rule 1 for a prompt at slots ``0 .. t - 1`` of an *empty* cache: what ``write_first_visit`` writes there.

    Every entry being empty, the first visit writes every valid token; one slice update per
    buffer (``layer`` may be traced) replaces the scatter and its emptiness checks. Padding
    (``valid`` false) writes zeros and ``EMPTY``: what an empty cache holds.
    """
    t = k_btgd.shape[1]
    if t > cache.max_len:
        raise ValueError(f"a prompt of {t} tokens does not fit a cache of {cache.max_len} slots")
    keep = valid_bt[:, None, :, None]
    k, v = (jnp.where(keep, jnp.swapaxes(a, 1, 2), 0).astype(cache.k.dtype)[None] for a in (k_btgd, v_btgd))
    written = jnp.where(valid_bt, jnp.asarray(step, jnp.int32), EMPTY)[None]
    at = (layer, 0, 0, 0, 0)
    return KVCache(jax.lax.dynamic_update_slice(cache.k, k, at), jax.lax.dynamic_update_slice(cache.v, v, at),
                   jax.lax.dynamic_update_slice(cache.written_at, written, at[:3]))


def window_mask(slots_q, slots_k, window):
    """``[..., q, k]``: key within the query's sliding window (``window <= 0``: no window; may be traced)."""
    window = jnp.asarray(window, jnp.int32)
    return (window <= 0) | (slots_q[..., :, None] - slots_k[..., None, :] < window)


def visible_mask(written_bt, slots_bq, step, *, causal: bool = True, exclude_self: bool = False, window=0):
    """Rule 2, ``mask[b, q, j]``: may the query at ``slots[b, q]`` (at ``step``) see cache entry ``j``.

    A query slot outside the cache (``>= T``: a dispatch's empty slot) sees nothing, so that padding
    queries widen no attention's reach (``attention``'s ``"compact"`` reads up to the last key seen).
    """
    t_max = written_bt.shape[1]
    j = jnp.arange(t_max)
    mask = (written_bt <= step)[:, None, :] & (slots_bq < t_max)[:, :, None]
    if causal:
        mask = mask & (j[None, None, :] <= slots_bq[:, :, None])
    if exclude_self:
        mask = mask & (j[None, None, :] != slots_bq[:, :, None])
    return mask & window_mask(slots_bq, j[None], window)


def sequence_mask(slots_bt, valid_bt, *, causal: bool = True, window=0):
    """``mask[b, i, j]`` of plain self-attention over a sequence (no cache): valid keys, causal, in window."""
    mask = valid_bt[:, None, :]
    if causal:
        mask = mask & (slots_bt[:, None, :] <= slots_bt[:, :, None])
    return mask & window_mask(slots_bt, slots_bt, window)

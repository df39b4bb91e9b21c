"""Dispatch primitives (docs/design.md §4): the causal budget, bucket sizes, select, gather, scatter-add.

Tokens live in *groups* ``[G, N]``: in the parallel forward a group is one
sequence (``G = B``, ``N = T``: its tokens are in position order and read cache
row ``g``); in decoding one group holds the new token of every batch row
(``G = 1``, ``N = B``: token ``n`` is row ``n``'s, reads cache row ``n``). ``K`` is the
number of layers a step considers (1 ordered, ``L`` radial). No Python loop over
tokens; every shape is static.

The causal budget: token ``p`` (position) may be admitted to a layer at a step if
fewer than ``budget(p) = floor(phi * (p + 1)) + slack`` earlier tokens of its own
sequence were admitted there. Along a sequence this is the recurrence
``c[n+1] = c[n] + admitted[n]``, ``admitted[n] = want[n] & (c[n] < B[n])``, which
(with ``B`` nondecreasing) is ``c[n+1] = min(c[n] + want[n], B[n])`` and so has the
closed form ``c[n] = S[n] + min(c[0], min_{m<n} (B[m] - S[m+1]))`` with ``S`` the
prefix sums of ``want``: a cumulative sum and a cumulative minimum, parallel over
the sequence. Decoding replays it one token at a time from per-row counters.
"""
from __future__ import annotations

import math
from typing import Tuple

import jax
import jax.numpy as jnp

NO_LIMIT = 2 ** 30  # the budget of padding: it never constrains anyone


def budget(positions_gn, valid_gn, phi: float, slack: int):
    """``floor(phi * (p + 1)) + slack`` per token (float32, as ``RadialConfig.max_capacity``); padding: ``NO_LIMIT``."""
    b = jnp.floor(jnp.float32(phi) * (positions_gn + 1).astype(jnp.float32)).astype(jnp.int32) + slack
    return jnp.where(valid_gn, b, NO_LIMIT)


def admit_in_order(want_kgn, budget_gn, count0_kg):
    """The causal budget along each group's ``N`` tokens (one sequence, in position order).

    Args:
      want_kgn: bool, the router sends token ``n`` of group ``g`` to layer ``k``.
      budget_gn: ``budget(...)`` of each token.
      count0_kg: tokens of the sequence admitted before this call (a cache's counters).

    Returns:
      ``(admitted_kgn, count_kg)``: who is admitted, and the counters after the call.
    """
    w = want_kgn.astype(jnp.int32)
    inclusive = jnp.cumsum(w, axis=-1)  # S[n + 1]
    exclusive = inclusive - w  # S[n]
    slack_left = jax.lax.cummin(budget_gn[None] - inclusive, axis=w.ndim - 1)  # min_{m<=n} (B[m] - S[m+1])
    before = jnp.concatenate([jnp.full(w.shape[:-1] + (1,), NO_LIMIT, jnp.int32), slack_left[..., :-1]], axis=-1)
    count_before = exclusive + jnp.minimum(count0_kg[..., None], before)
    admitted = want_kgn & (count_before < budget_gn[None])
    count = inclusive[..., -1] + jnp.minimum(count0_kg, slack_left[..., -1])
    return admitted, count


def admit_each(want_kgn, budget_gn, count_kgn):
    """Decoding: every token is a different sequence, with its own counter ``count_kgn``."""
    return want_kgn & (count_kgn < budget_gn[None])


def prefill_sizes(c_max: int, buckets: int, halvings: int = 3) -> Tuple[int, ...]:
    """Static sizes of the parallel forward: ``0``, the first bucket halved ``halvings`` times, then
    multiples of ``c_max / buckets`` up to ``c_max``.

    ``c_max`` is set by the busiest (step, layer) of the routes (``capacity.fit_capacity``); most
    loads are far below it, and one bucket would pad them to ``c_max / buckets`` each: the halvings
    keep light layers near their load. One bucket is ``(c_max,)`` alone: every layer runs at its
    full budget (no branch at all), what training wants (the same values, and one layer body to
    compile per step).
    """
    if buckets == 1:
        return (c_max,)
    multiples = {math.ceil(c_max * k / buckets) for k in range(1, buckets + 1)}
    light = {math.ceil(c_max / (buckets * 2 ** j)) for j in range(1, halvings + 1)}
    return (0,) + tuple(sorted(multiples | light))


def decode_sizes(batch: int, exact_up_to: int = 8, parts: int = 8) -> Tuple[int, ...]:
    """Static sizes of decoding: ``0``, every size up to ``exact_up_to``, then multiples of ``batch / parts``.

    A decode step's matmuls run on a handful of rows, and a padded row is not free: powers of two
    executed far more than the depth (``experiments/bench_radial.py``, decode rows: ``compute_fraction``),
    exact sizes the depth. Larger batches waste at most ``batch / parts`` rows, with at most
    ``exact_up_to + parts`` branches per layer.
    """
    if batch < 1:
        raise ValueError(f"decoding needs a batch of at least 1 row, got {batch}")
    exact = set(range(1, min(batch, exact_up_to) + 1))
    return (0,) + tuple(sorted(exact | {math.ceil(batch * k / parts) for k in range(1, parts + 1)}))


def size_index(sizes: Tuple[int, ...], load):
    """Index of the smallest of ``sizes`` (ascending) that holds ``load``, a traced count."""
    return jnp.sum(jnp.asarray(sizes, jnp.int32) < load).astype(jnp.int32)


def select(admitted_gn, capacity: int, start=0):
    """``idx[G, C]``: the admitted tokens of each group in position order; unused slots hold ``N``.

    The group's admitted tokens of rank ``start`` to ``start + capacity - 1`` (``start`` may be
    traced: a chunk of a larger load); without ``start``, at most ``capacity`` may be admitted.
    """
    n = admitted_gn.shape[-1]
    rank = jnp.cumsum(admitted_gn.astype(jnp.int32), axis=-1) - 1 - start
    target = jnp.where(admitted_gn & (rank >= 0), rank, capacity)
    g = jnp.arange(admitted_gn.shape[0])[:, None]
    return jnp.full(admitted_gn.shape[:-1] + (capacity,), n, jnp.int32).at[g, target].set(
        jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), admitted_gn.shape), mode="drop")


def select_top(score_gn, capacity: int):
    """Expert choice: each group's ``capacity`` highest-scoring tokens (``-inf``: ineligible), in position order.

    Looks at the whole group (future tokens included): *not causal*, a training option only.
    Returns ``(idx[G, C], taken_gn)``.
    """
    n = score_gn.shape[-1]
    vals, idx = jax.lax.top_k(score_gn, capacity)
    idx = jnp.sort(jnp.where(jnp.isfinite(vals), idx, n).astype(jnp.int32), axis=-1)
    taken = jax.vmap(lambda i: jnp.zeros((n,), bool).at[i].set(True, mode="drop"))(idx)
    return idx, taken


def gather(a_gn, idx_gc):
    """``a[g, idx[g, c]]`` -> ``[G, C, ...]`` (unused slots read token ``N - 1``; mask them)."""
    g = jnp.arange(a_gn.shape[0])[:, None]
    return a_gn[g, jnp.clip(idx_gc, 0, a_gn.shape[1] - 1)]


def scatter_add(x_gn, idx_gc, upd_gc):
    """``x[g, idx[g, c]] += upd[g, c]``; unused slots (``idx = N``) are dropped."""
    g = jnp.broadcast_to(jnp.arange(x_gn.shape[0])[:, None], idx_gc.shape)
    return x_gn.at[g, idx_gc].add(upd_gc.astype(x_gn.dtype), mode="drop")

"""Fixed-capacity token dispatch (DESIGN.md §4): select, gather, run on ``[C, e]``, scatter-add back.

Tokens live in *groups* ``[G, N]``: in the parallel forward a group is one
sequence (``G = B``, ``N = T``; every token of group ``g`` reads cache row ``g``);
in decoding one group holds the new token of every batch row (``G = 1``,
``N = B``; token ``n`` reads cache row ``n``), so that a layer's capacity is shared
across the batch and a routed decode step really computes fewer tokens.

For each of ``K`` layers run at a step (``K = 1`` in ordered mode, ``K = L`` in radial
mode) and each group, at most ``C`` tokens are chosen; their indices ``idx[K, G, C]``
are in position order, and an unused capacity slot holds ``N`` (out of range, so
gathers are clipped and scatters with ``mode="drop"`` ignore it). No Python loop
over tokens; every shape is static.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from radial_jax.kv_cache import EMPTY


def capacity_for(num_tokens: int, capacity_factor: float, num_layers: int, max_steps: int,
                 layers_per_step: int) -> int:
    """Static per-layer, per-step capacity ``C`` (tokens of one group).

    The budget is ``capacity_factor`` times the dense compute (``num_layers`` layer
    visits per token), spread evenly over ``max_steps * layers_per_step`` layer
    slots: ``C = ceil(cf * N * L / (S * K))``, clipped to ``[1, N]``. Ordered mode
    (``S = L``, ``K = 1``): ``C = ceil(cf * N)``, so ``cf = 1`` lets every token through
    every layer. Radial mode (``K = L`` layers run at every step): with ``S = L``,
    ``C = ceil(cf * N / L)``, so all layers together take ``cf * N`` tokens a step.
    """
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    c = math.ceil(capacity_factor * num_tokens * num_layers / (max_steps * layers_per_step) - 1e-9)
    return int(max(1, min(num_tokens, c)))


def _select_row(want_n, capacity: int):
    n = want_n.shape[0]
    rank = jnp.cumsum(want_n.astype(jnp.int32)) - 1
    keep = want_n & (rank < capacity)
    idx = jnp.full((capacity,), n, jnp.int32).at[jnp.where(keep, rank, capacity)].set(
        jnp.arange(n, dtype=jnp.int32), mode="drop")
    return idx, keep


def select_token_choice(want_kgn, capacity: int):
    """Token choice: the first ``capacity`` tokens (in position order) that want each layer.

    Priority by position makes the choice causal: whether a token is dropped
    depends only on earlier tokens. Returns ``(idx[K, G, C], keep[K, G, N])``.
    """
    return jax.vmap(jax.vmap(lambda w: _select_row(w, capacity)))(want_kgn)


def select_expert_choice(score_kgn, capacity: int):
    """Expert choice: each layer takes its ``capacity`` highest-scoring tokens.

    Ineligible tokens carry score ``-inf``. Looks at the whole group (future tokens
    included), so it is *not causal*: a training option only. Returns
    ``(idx[K, G, C], keep[K, G, N])`` with ``idx`` sorted by position.
    """
    n = score_kgn.shape[-1]
    vals, idx = jax.lax.top_k(score_kgn, capacity)
    idx = jnp.sort(jnp.where(jnp.isfinite(vals), idx, n).astype(jnp.int32), axis=-1)
    keep = jax.vmap(jax.vmap(lambda i: jnp.zeros((n,), bool).at[i].set(True, mode="drop")))(idx)
    return idx, keep


def gather(a_gn, idx_kgc):
    """``a[g, idx[k, g, c]]`` -> ``[K, G, C, ...]`` (unused slots read token ``N - 1``; mask them)."""
    g = jnp.arange(a_gn.shape[0])[None, :, None]
    return a_gn[g, jnp.clip(idx_kgc, 0, a_gn.shape[1] - 1)]


def scatter_add(x_gne, idx_kgc, upd_kgce):
    """``x[g, idx[k, g, c]] += upd[k, g, c]``; unused slots (``idx = N``) are dropped."""
    g = jnp.broadcast_to(jnp.arange(x_gne.shape[0])[None, :, None], idx_kgc.shape)
    return x_gne.at[g, idx_kgc].add(upd_kgce.astype(x_gne.dtype), mode="drop")


def write_first_visit_at(k_lbtgd, v_lbtgd, written_lbt, layer_q, row_q, slot_q, k_qgd, v_qgd, valid_q, step):
    """First-visit write (``radial_jax.kv_cache`` rule 1) at explicit ``(layer, row, slot)`` per entry.

    The same rule as ``kv_cache.write_first_visit_layer``, generalised so that the
    entries of one call may go to different layers (radial mode) and different
    cache rows (decoding across the batch). Invalid entries and slots out of
    ``[0, T_max)`` are dropped. ``layer_q ... valid_q`` share any leading shape ``q``.
    """
    t_max = k_lbtgd.shape[2]
    shape = slot_q.shape
    layer_q, row_q = jnp.broadcast_to(layer_q, shape), jnp.broadcast_to(row_q, shape)
    empty = written_lbt[layer_q, row_q, jnp.clip(slot_q, 0, t_max - 1)] == EMPTY
    target = jnp.where(valid_q & empty & (slot_q >= 0) & (slot_q < t_max), slot_q, t_max)
    k = k_lbtgd.at[layer_q, row_q, target].set(k_qgd.astype(k_lbtgd.dtype), mode="drop")
    v = v_lbtgd.at[layer_q, row_q, target].set(v_qgd.astype(v_lbtgd.dtype), mode="drop")
    written = written_lbt.at[layer_q, row_q, target].set(
        jnp.broadcast_to(jnp.asarray(step, jnp.int32), shape), mode="drop")
    return k, v, written

"""The serving capacity that fits a network's routes (docs/design.md §4.2, *Capacity*).

Training runs at a generous capacity (ordered mode: ``capacity_factor = 1``, which never
binds). Serving pays for capacity even where the budget does not bind: ``C_max`` sets
the static sizes a layer's load is rounded up to and caps the attention's per-sequence
size. ``fit_capacity`` serves a network at the smallest ``C_max`` whose causal budget
refuses none of the visits its router wants on calibration text (text it is not
evaluated on). Where nothing is refused the routes do not depend on the capacity, so
one forward at the network's own capacity gives them, and the budget rule
(``dispatch.budget``: a visit is admitted while ``count_before < floor(phi (p + 1)) +
slack``) gives, for each slack, the smallest fraction that admits them all:
``phi = max over wanted visits of (count_before - slack + 1) / (p + 1)``. The slack is
fitted with it: with a slack of 1, two early tokens of a sequence that want the same
layer at the same step already need ``phi >= 1/2``, which a larger slack absorbs at a
lower ``C_max = floor(phi T) + slack``. A refused visit changes the output (the token
keeps its state), so none is allowed.

The static sizes are fitted last (``fit_buckets``): a layer's load is rounded up to
multiples of ``B C_max / prefill_buckets`` (``dispatch.prefill_sizes``), and on loads
that move from text to text by a tenth or more, eight buckets pad them by about a
quarter. The served network takes the fewest buckets (a power of two) whose padding
of the calibration loads is at most ``max_padding``; each doubling keeps every size
and adds the ones between, so padding only falls, and compile time grows with it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from radial_jax import defaults as D
from radial_jax.data.corpus import window_batches
from radial_jax.radial.dispatch import prefill_sizes


def _slack_candidates(own: int, length: int):
    """The slacks ``fit_capacity`` tries: the network's own, 0, and powers of two up to ``length``."""
    return tuple(sorted({own, 0} | {2 ** i for i in range(max(length, 1).bit_length())}))


@dataclasses.dataclass
class RouteFacts:
    """What a network's routes did over calibration windows (``route_facts``).

    wanted / refused: the layer visits the router wanted and those the budget refused.
    need_k: for each slack tried, the smallest budget fraction that admits every visit that ran (whole windows,
      no padding; the bound of the module docstring).
    per_batch: ``[(batch, loads[S, L])]``: per batch of windows, the tokens each step admitted to each layer
      over the batch (what a flat visit runs).
    """

    wanted: int
    refused: int
    need_k: np.ndarray
    per_batch: list


def route_facts(model, windows, batch_size: int, slacks=None) -> RouteFacts:
    """The one pass over ``windows`` that counts a network's routes: one forward per batch (``RouteFacts``);
    ``slacks``: those to fit the budget fraction for (default: the network's own).

    The forward runs at one static size (``prefill_buckets=1``): the budget, not the sizes, decides who is
    admitted (the sizes only pad), and one size compiles several times faster than a switch over many."""
    model = model.replace(prefill_buckets=1)
    slack_k = jnp.asarray((model.radial.capacity_slack,) if slacks is None else slacks, jnp.float32)
    L = model.config.num_layers

    @jax.jit
    def facts(params, ids_bt):
        out = model.module.apply({"params": params}, ids_bt, compute_logits=False)
        r = out.router
        taken = r.assign.astype(jnp.int32)  # [S, b, t, L]
        before = (jnp.cumsum(taken, axis=2) - taken)[..., None]  # earlier tokens of the row admitted to (s, l)
        position = jnp.arange(ids_bt.shape[1], dtype=jnp.float32)[None, None, :, None, None]
        need_k = jnp.max(jnp.where(r.assign[..., None], (before - slack_k + 1) / (position + 1), 0.0),
                         axis=(0, 1, 2, 3))
        wanted = jnp.sum((r.choice >= 0) & (r.choice < L))
        return wanted, out.metrics.total_dropped, need_k, out.metrics.step_layer_load

    wanted = refused = 0
    need_k = np.zeros(slack_k.shape, np.float64)
    per_batch = []
    for ids in window_batches(windows, batch_size):
        w, d, n, load_sl = facts(model.params, ids)
        wanted, refused, need_k = wanted + int(w), refused + int(d), np.maximum(need_k, np.asarray(n, np.float64))
        per_batch.append((ids.shape[0], np.asarray(load_sl)))
    return RouteFacts(wanted=wanted, refused=refused, need_k=need_k, per_batch=per_batch)


def drop_rate(model, windows, batch_size: int = 16) -> float:
    """Visits the budget refused / visits the router wanted, over ``windows`` (``[n, t]`` token ids)."""
    facts = route_facts(model, windows, batch_size)
    return facts.refused / max(facts.wanted, 1)


def padding(per_batch, c_max: int, buckets: int) -> float:
    """Tokens the matmuls run beyond the admitted ones, as a fraction of them, when each (step, layer) load of
    ``per_batch`` (``RouteFacts.per_batch``) is rounded up to the smallest of ``prefill_sizes(batch * c_max, buckets)``."""
    ran = admitted = 0
    for batch, load_sl in per_batch:
        sizes = np.asarray(prefill_sizes(batch * c_max, buckets))
        ran += int(sizes[np.searchsorted(sizes, load_sl)].sum())
        admitted += int(load_sl.sum())
    return ran / max(admitted, 1) - 1.0


def fit_buckets(per_batch, c_max: int, max_padding: float, max_buckets: int) -> int:
    """The fewest buckets (a power of two up to ``max_buckets``) that pad ``per_batch``'s loads by at most
    ``max_padding``; ``max_buckets`` when none does (the least padding)."""
    candidates = _bucket_candidates(max_buckets)
    return next((n for n in candidates if padding(per_batch, c_max, n) <= max_padding), candidates[-1])


def _bucket_candidates(max_buckets: int) -> list:
    return [2 ** i for i in range(max_buckets.bit_length()) if 2 ** i <= max_buckets]


def fit_capacity(model, windows, *, batch_size: int = 16, max_padding: float = D.SERVE_MAX_PADDING,
                 max_buckets: int = D.SERVE_MAX_BUCKETS, return_padding: bool = False):
    """``model`` served as its routes on ``windows`` need (module docstring).

    The capacity: the smallest ``C_max`` (at most its own) at which its budget refuses none of the visits its
    router wants, the capacity factor and the slack fitted together, ``C_max`` counted at the windows'
    length. Then the static sizes: the fewest ``prefill_buckets`` (a power of two up to ``max_buckets``)
    that pad the loads of ``windows`` by at most ``max_padding``. ``model`` itself when its own capacity
    already refuses some visits (its routes then depend on the capacity). Calibrate at the batch size the
    network will serve: the loads are rounded over a batch. ``return_padding``: ``(model, {buckets: padding})``,
    the padding of the calibration loads at each bucket count tried up to ``max_buckets`` (what more buckets,
    hence more compile time, would save); ``{}`` when the capacity was not fitted.
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or len(windows) == 0:
        raise ValueError(f"calibration windows must be [n >= 1, t] token ids, got shape {windows.shape}")
    model.check_inputs(windows)  # the forward's own checks: ids in the vocabulary, windows within the positions
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not 0 <= max_padding or isinstance(max_buckets, bool) or not isinstance(max_buckets, int) or max_buckets < 1:
        raise ValueError(f"max_padding must be >= 0 and max_buckets an integer >= 1; got {max_padding!r}, "
                         f"{max_buckets!r}")
    rc, L, t = model.radial, model.config.num_layers, windows.shape[1]
    slacks = _slack_candidates(rc.capacity_slack, t)
    own = route_facts(model, windows, batch_size, slacks)  # one pass at the network's own capacity
    if own.refused > 0:
        return (model, {}) if return_padding else model
    scale = rc.steps(L) * rc.layers_per_step(L) / L  # capacity_factor = scale * phi (RadialConfig)
    trials = []
    for slack, need in zip(slacks, own.need_k):
        # float32 floors: a hair above the bound; > 0 (every visit within the slack: any fraction admits them)
        phi = max(float(need) * (1 + 1e-6), 1e-6)
        if phi < 1.0:  # at 1 no budget binds below the whole sequence
            trial = dataclasses.replace(rc, capacity_factor=phi * scale, capacity_slack=slack)
            trials.append((trial.max_capacity(L, t), slack != rc.capacity_slack, slack, trial))
    fitted = model
    if trials and min(trial[0] for trial in trials) < rc.max_capacity(L, t):
        best = min(trials, key=lambda trial: trial[:3])[3]  # ties: the own slack, then the smallest
        fitted = model.replace(capacity_factor=best.capacity_factor, capacity_slack=best.capacity_slack)
    # the fitted capacity admits every visit the own one did, so the loads are the same: no second pass
    # (tests/test_radial_capacity.py checks both: nothing refused, the same loads)
    c_max = fitted.radial.max_capacity(L, t)
    fitted = fitted.replace(prefill_buckets=fit_buckets(own.per_batch, c_max, max_padding, max_buckets))
    if not return_padding:
        return fitted
    return fitted, {n: padding(own.per_batch, c_max, n) for n in _bucket_candidates(max_buckets)}

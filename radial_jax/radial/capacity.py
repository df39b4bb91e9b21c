"""The serving capacity that fits a network's routes (docs/design.md §4.2, *Capacity*).

Training runs at a generous capacity (ordered mode: ``capacity_factor = 1``, which never
binds). Serving pays for capacity even where the budget does not bind: ``C_max`` sets
the static sizes a layer's load is rounded up to and caps the attention's per-sequence
size. ``fit_capacity`` serves a network at the smallest capacity factor whose causal
budget refuses none of the visits its router wants on calibration text (text it is not
evaluated on). Where nothing is refused the routes do not depend on the capacity, so
one forward at the network's own capacity gives them, and the budget rule
(``dispatch.budget``: a visit is admitted while ``count_before < floor(phi (p + 1)) +
slack``) gives the smallest fraction that admits them all:
``phi = max over wanted visits of (count_before - slack + 1) / (p + 1)``. A refused
visit changes the output (the token keeps its state), so none is allowed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _batches(windows, batch_size):
    for i in range(0, len(windows), batch_size):
        yield jnp.asarray(windows[i:i + batch_size], jnp.int32)


def _route_facts(model, windows, batch_size: int):
    """``(wanted, refused, phi)`` over ``windows``, one forward per batch: the visits the router wanted,
    those the budget refused, and the smallest budget fraction that admits every visit that ran (whole
    windows, no padding; the bound of the module docstring)."""
    L, slack = model.config.num_layers, model.radial.capacity_slack

    @jax.jit
    def facts(params, ids_bt):
        r = model.module.apply({"params": params}, ids_bt, compute_logits=False).router
        taken = r.assign.astype(jnp.int32)  # [S, b, t, L]
        before = jnp.cumsum(taken, axis=2) - taken  # earlier tokens of the row admitted to (s, l)
        position = jnp.arange(ids_bt.shape[1], dtype=jnp.float32)[None, None, :, None]
        need = jnp.max(jnp.where(r.assign, (before - slack + 1) / (position + 1), 0.0))
        return jnp.sum((r.choice >= 0) & (r.choice < L)), jnp.sum(r.dropped), need

    wanted = refused = 0
    need = 0.0
    for ids in _batches(windows, batch_size):
        w, d, n = facts(model.params, ids)
        wanted, refused, need = wanted + int(w), refused + int(d), max(need, float(n))
    return wanted, refused, need


def drop_rate(model, windows, batch_size: int = 16) -> float:
    """Visits the budget refused / visits the router wanted, over ``windows`` (``[n, t]`` token ids)."""
    wanted, refused, _ = _route_facts(model, windows, batch_size)
    return refused / max(wanted, 1)


def fit_capacity(model, windows, *, batch_size: int = 16):
    """``model`` at the smallest capacity factor (at most its own) at which its budget refuses none of
    the visits its router wants on ``windows``; ``model`` itself when its own capacity already refuses
    some (its routes then depend on the capacity)."""
    windows = np.asarray(windows)
    if windows.ndim != 2 or len(windows) == 0:
        raise ValueError(f"calibration windows must be [n >= 1, t] token ids, got shape {windows.shape}")
    _, refused, need = _route_facts(model, windows, batch_size)  # one pass at the network's own capacity
    if refused > 0:
        return model
    rc, L = model.radial, model.config.num_layers
    scale = rc.steps(L) * rc.layers_per_step(L) / L  # capacity_factor = scale * phi (RadialConfig)
    # float32 floors: a hair above the bound; > 0 (every visit within the slack: any fraction admits them)
    phi = max(need * (1 + 1e-6), 1e-6)
    if phi * scale >= rc.capacity_factor:
        return model
    fitted = model.replace(capacity_factor=phi * scale)
    if drop_rate(fitted, windows, batch_size) > 0:
        raise RuntimeError(f"capacity factor {phi * scale} fitted to the routes still refuses visits; "
                           "this is a bug in radial_jax.radial.capacity")
    return fitted

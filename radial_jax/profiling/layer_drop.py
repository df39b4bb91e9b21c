"""Static layer drop, the simplest rival of routing: remove the layers that matter least, for every token.

ShortGPT (Men et al., 2024) ranks layers by *block influence*, ``BI_l = 1 - E[cos(x_l, x_{l+1})]``
over tokens, the residual stream's direction change across layer ``l``, and removes the ``k`` layers of
lowest influence. Here the cosine comes from the per-token norms the forward pass already returns
(``LayerStats.layer``: ``|x|``, ``|F|``, ``|x + F|``): ``x . (x + F) = (|x|^2 + |x + F|^2 - |F|^2) / 2``,
so ranking costs one forward pass per batch and no hidden state is kept.

``drop_layers(model, layers)`` is the sequential model without them: a real, smaller ``Model`` (its
config has fewer layers; per-layer fields such as Gemma's ``layer_types`` keep the kept layers' own
values), which serves at the smaller cost, not a mask over the full one. ``route_layers(model, route)``
is the general static route (any order, repeats allowed), the probe of whether reusing a layer can pay.

Example::

    bi = block_influence(model, [(ids, mask)])
    shallower = drop_layers(model, least_influential(bi, 3))
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Sequence, Tuple

import jax
import numpy as np

from radial_jax.models.bundle import Model

#: config fields that count the layers, and config fields that hold one value per layer (by family)
_LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer")
_PER_LAYER_FIELDS = ("layer_types",)


def block_influence(model, batches: Iterable[Tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """``[L]`` ShortGPT's block influence of each layer, ``1 - mean cos(x_in, x_out)`` over valid tokens."""
    total, count = np.zeros(model.config.num_layers), 0
    for ids, mask in batches:
        stats = model.forward(ids, mask, compute_logits=False).stats.layer
        x, f, y = (np.asarray(a, np.float64) for a in (stats.x, stats.f, stats.y))  # [L, b, t]
        cos = (x ** 2 + y ** 2 - f ** 2) / (2 * np.maximum(x * y, 1e-30))
        valid = np.asarray(mask, bool)
        total += (1.0 - cos)[:, valid].sum(1)
        count += int(valid.sum())
    if count == 0:
        raise ValueError("block_influence needs at least one valid (unpadded) token")
    return total / count


def least_influential(influence: Sequence[float], k: int) -> Tuple[int, ...]:
    """The ``k`` layers of lowest influence, in layer order (ties: the earlier layer first)."""
    influence = np.asarray(influence)
    if not 0 <= k < len(influence):
        raise ValueError(f"can drop 0 to {len(influence) - 1} of {len(influence)} layers, not {k}")
    return tuple(sorted(int(i) for i in np.argsort(influence, kind="stable")[:k]))


def drop_layers(model: Model, layers: Sequence[int]) -> Model:
    """``model`` without ``layers`` (indices into its pool): a ``Model`` of ``L - len(layers)`` layers."""
    L = model.config.num_layers
    drop = sorted(set(int(i) for i in layers))
    if any(not 0 <= i < L for i in drop) or len(drop) >= L:
        raise ValueError(f"layers to drop must be distinct indices in [0, {L}) leaving at least one; got {list(layers)}")
    keep = [i for i in range(L) if i not in drop]
    name = f"{model.name} without layers {drop}" if drop else model.name
    return route_layers(model, keep, name=name)


def route_layers(model: Model, route: Sequence[int], name: Optional[str] = None) -> Model:
    """A static route through ``model``'s pool: every token runs the layers ``route`` names, in that order.

    Any sequence of pool indices: a subsequence drops layers (``drop_layers``), a repeated index reuses a layer
    (its weights and its own per-layer fields, e.g. Gemma's local or global attention, at each visit). Returns a
    ``Model`` of ``len(route)`` layers."""
    L = model.config.num_layers
    route = [int(i) for i in route]
    if not route or any(not 0 <= i < L for i in route):
        raise ValueError(f"a route is a non-empty sequence of layer indices in [0, {L}); got {route}")
    changes = {}
    for field in dataclasses.fields(model.config):
        value = getattr(model.config, field.name)
        if field.name in _LAYER_COUNT_FIELDS:
            changes[field.name] = len(route)
        elif field.name in _PER_LAYER_FIELDS and value is not None:
            changes[field.name] = tuple(value[i] for i in route)
    config = dataclasses.replace(model.config, **changes)
    pool = model.params["layers"]
    if isinstance(pool, (tuple, list)):  # per-layer layout
        layers_params = tuple(pool[i] for i in route)
    else:  # stacked: a leading layer axis on every leaf
        index = np.asarray(route)
        layers_params = jax.tree_util.tree_map(lambda a: a[index], pool)
    return Model(config, {**model.params, "layers": layers_params}, dtype=model.dtype,
                 name=name or f"{model.name} through layers {route}", tokenizer_path=model.tokenizer_path)

"""Routing metrics reported by every Radial Network forward (per-token depth, load, drops, exits)."""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class RadialMetrics:
    """Counts over the valid tokens of one forward (or one decode step).

    depth: ``[b, t]`` int32 layer visits per token (reuse counts again).
    layer_load: ``[L]`` tokens processed by each layer, summed over steps.
    step_layer_load: ``[S, L]`` tokens processed by each layer at each step.
    dropped: ``[S]`` tokens that wanted a layer but were over capacity, per step.
    exits: ``[S]`` tokens that exited at each step.
    mean_depth: mean of ``depth`` over valid tokens.
    compute_fraction: layer visits / (L x valid tokens): the dense model's is 1.
    capacity: the static per-layer, per-step capacity ``C``.
    """

    depth: jax.Array
    layer_load: jax.Array
    step_layer_load: jax.Array
    dropped: jax.Array
    exits: jax.Array
    mean_depth: jax.Array
    compute_fraction: jax.Array
    capacity: jax.Array

    @property
    def total_dropped(self):
        return self.dropped.sum()


def compute_metrics(assign_sbtl, dropped_sbt, exited_sbt, valid_bt, capacity: int) -> RadialMetrics:
    num_layers = assign_sbtl.shape[-1]
    valid = valid_bt[None, :, :]
    assign = assign_sbtl & valid[..., None]
    depth = assign.sum(axis=(0, 3)).astype(jnp.int32)
    n_valid = jnp.maximum(valid_bt.sum(), 1)
    step_load = assign.sum(axis=(1, 2)).astype(jnp.int32)
    return RadialMetrics(
        depth=depth,
        layer_load=step_load.sum(0),
        step_layer_load=step_load,
        dropped=(dropped_sbt & valid).sum(axis=(1, 2)).astype(jnp.int32),
        exits=(exited_sbt & valid).sum(axis=(1, 2)).astype(jnp.int32),
        mean_depth=depth.sum() / n_valid,
        compute_fraction=depth.sum() / (n_valid * num_layers),
        capacity=jnp.asarray(capacity, jnp.int32),
    )


def summary(metrics: RadialMetrics) -> dict:
    """Plain-Python summary (for logs and JSON)."""
    m = jax.device_get(metrics)
    return {"mean_depth": float(m.mean_depth), "compute_fraction": float(m.compute_fraction),
            "layer_load": [int(v) for v in m.layer_load], "dropped": int(m.dropped.sum()),
            "exits_per_step": [int(v) for v in m.exits], "capacity": int(m.capacity)}

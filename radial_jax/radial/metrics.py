"""What a Radial Network forward (or decode step) reports: depth, load, drops, exits, executed FLOPs.

Executed FLOPs are counted by construction from the shapes that ran
(``radial_jax.models.flops``): for every step that ran, the router on every token, each
layer's matmuls on the tokens that ran (its load rounded up to a static size) and its
attention on the query slots that ran (whole sequences: per sequence, the busiest
one's load rounded up to a static size) against the whole cache (radial mode: plus
each query's own K/V), the *propagate* writes (K/V of every token at every step
``s < L``; radial mode also K/V of every layer for the exiting tokens' size). Ordered
*propagate* visits project their queries alone: the step's write already holds their
K/V. The oracle's probe is a simulation device and is not counted. ``dense_flops`` is
the sequential model on the same tokens and cache; ``compute_fraction`` is their ratio
(FLOPs, not visits).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from radial_jax.models.flops import kv_flops, layer_flops, router_flops


@flax.struct.dataclass
class RadialMetrics:
    """Counts over the valid tokens of one forward (or one decode step).

    depth: ``[b, t]`` int32 layer visits per token (reuse counts again).
    layer_load: ``[L]`` tokens processed by each layer, summed over steps.
    step_layer_load: ``[S, L]`` tokens processed by each layer at each step.
    dropped: ``[S]`` tokens that wanted a layer but were over budget, per step.
    exits: ``[S]`` tokens that exited at each step.
    mean_depth: mean of ``depth`` over valid tokens; depth_fraction: ``mean_depth / L``.
    executed_flops, dense_flops, compute_fraction: see the module docstring.
    layer_sizes: ``[S, L]`` the tokens each layer's matmuls ran on, over the batch: its load rounded up to a
      static size (0: did not run).
    attn_queries: ``[S, L]`` the query slots each layer's attention ran on (whole sequences, flat dispatch:
      per sequence, the busiest sequence's load rounded up to a static size).
    steps_run: steps the loop ran (decoding stops when every row has exited).
    capacity: ``C_max``, the most tokens of a sequence a layer may admit at a step.
    """

    depth: jax.Array
    layer_load: jax.Array
    step_layer_load: jax.Array
    dropped: jax.Array
    exits: jax.Array
    mean_depth: jax.Array
    depth_fraction: jax.Array
    executed_flops: jax.Array
    dense_flops: jax.Array
    compute_fraction: jax.Array
    layer_sizes: jax.Array
    attn_queries: jax.Array
    steps_run: jax.Array
    capacity: jax.Array

    @property
    def total_dropped(self):
        return self.dropped.sum()


def executed_flops(plan, records, num_groups: int, num_tokens: int, cache_len: int):
    """FLOPs of what ran (see the module docstring), from the step records of ``steps.run_steps``."""
    lc, L, rc = plan.lc, plan.num_layers, plan.rc
    ran = records["ran"].astype(jnp.float32)
    # a visit's matmuls on the tokens that ran; its attention on the query slots that ran, against every cache
    # slot (ordered mode: its own K/V among them; radial: plus its own)
    matmuls = layer_flops(lc, 1, 0)
    per_key = layer_flops(lc, 1, 1) - matmuls
    if rc.ordered and rc.cache_policy == "propagate":  # a visit projects its queries only: its K/V are the
        matmuls -= kv_flops(lc, 1)                     # step's propagate write, counted below (the projection in radial.visit)
    keys = cache_len + (0 if rc.ordered else 1)
    total = (jnp.sum(records["layer_sizes"].astype(jnp.float32)) * matmuls
             + jnp.sum(records["attn_queries"].astype(jnp.float32)) * keys * per_key)
    total += jnp.sum(ran) * router_flops(plan.hidden_size, rc.router_hidden, L + 2, num_groups * num_tokens)
    if rc.cache_policy == "propagate":  # step-aligned writes (steps s < L), and radial exits' fills
        total += jnp.sum(records["aligned_kv"] & records["ran"]) * kv_flops(lc, num_groups * num_tokens)
        total += num_groups * jnp.sum(records["exit_size"].astype(jnp.float32)) * L * kv_flops(lc, 1)
    return total


def compute_metrics(plan, records, valid_bt, num_groups: int, num_tokens: int, cache_len: int,
                    capacity: int) -> RadialMetrics:
    """``records``: the step loop's, with router fields laid out ``[S, b, t, ...]``."""
    L = plan.num_layers
    assign = records["assign"] & valid_bt[None, :, :, None]
    depth = assign.sum(axis=(0, 3)).astype(jnp.int32)
    n_valid = jnp.maximum(valid_bt.sum(), 1)
    step_load = assign.sum(axis=(1, 2)).astype(jnp.int32)
    executed = executed_flops(plan, records, num_groups, num_tokens, cache_len)
    dense = L * layer_flops(plan.lc, num_groups * num_tokens, cache_len)
    return RadialMetrics(
        depth=depth, layer_load=step_load.sum(0), step_layer_load=step_load,
        dropped=(records["dropped"] & valid_bt[None]).sum(axis=(1, 2)).astype(jnp.int32),
        exits=(records["exited"] & valid_bt[None]).sum(axis=(1, 2)).astype(jnp.int32),
        mean_depth=depth.sum() / n_valid, depth_fraction=depth.sum() / (n_valid * L),
        executed_flops=executed, dense_flops=jnp.float32(dense), compute_fraction=executed / dense,
        layer_sizes=records["layer_sizes"], attn_queries=records["attn_queries"],
        steps_run=records["ran"].sum().astype(jnp.int32),
        capacity=jnp.asarray(capacity, jnp.int32))


def summary(metrics: RadialMetrics) -> dict:
    """Plain-Python summary (for logs and JSON)."""
    m = jax.device_get(metrics)
    return {"mean_depth": float(m.mean_depth), "depth_fraction": float(m.depth_fraction),
            "compute_fraction": float(m.compute_fraction), "executed_flops": float(m.executed_flops),
            "dense_flops": float(m.dense_flops), "layer_load": [int(v) for v in m.layer_load],
            "dropped": int(m.dropped.sum()), "exits_per_step": [int(v) for v in m.exits],
            "steps_run": int(m.steps_run), "capacity": int(m.capacity)}

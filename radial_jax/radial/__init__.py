"""Radial Networks: router, fixed-capacity dispatch, global KV cache, ordered/radial modes, decoding."""
from radial_jax.radial.decode import decode_tokens, generate_greedy
from radial_jax.radial.dispatch import capacity_for
from radial_jax.radial.metrics import RadialMetrics, compute_metrics, summary
from radial_jax.radial.network import (CACHE_POLICIES, DISPATCHES, GATES, MODES, ROUTINGS, RadialConfig, RadialModel,
                                       RadialNetwork, RadialOutput)
from radial_jax.radial.router import Router, RouterOutput

__all__ = ["RadialNetwork", "RadialModel", "RadialConfig", "RadialOutput", "RouterOutput", "RadialMetrics", "Router",
           "capacity_for", "compute_metrics", "summary", "decode_tokens", "generate_greedy", "MODES",
           "CACHE_POLICIES", "ROUTINGS", "DISPATCHES", "GATES"]

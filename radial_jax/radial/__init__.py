"""Radial Networks: router, causal-budget dispatch, global KV cache, ordered/radial modes, decoding."""
from radial_jax.radial.config import CACHE_POLICIES, DISPATCHES, GATES, MODES, ROUTINGS, RadialConfig
from radial_jax.radial.decode import decode_tokens
from radial_jax.radial.metrics import RadialMetrics, compute_metrics, summary
from radial_jax.radial.model import RadialModel
from radial_jax.radial.network import RadialNetwork, RadialOutput
from radial_jax.radial.router import Router, RouterOutput
from radial_jax.radial.step_state import RadialCache

__all__ = ["RadialNetwork", "RadialModel", "RadialConfig", "RadialOutput", "RadialCache", "RouterOutput",
           "RadialMetrics", "Router", "compute_metrics", "summary", "decode_tokens", "MODES", "CACHE_POLICIES",
           "ROUTINGS", "DISPATCHES", "GATES"]

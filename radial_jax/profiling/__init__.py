"""Residual-ratio profiling and oracle layer-skipping simulation (docs/design.md §2, §3)."""
from radial_jax.profiling.residual import DEFAULT_RATIO, ProfileResult, profile
from radial_jax.profiling.skipping import SimulationResult, ThresholdResult, simulate_skipping
from radial_jax.profiling.streaming import profile_streaming
from radial_jax.profiling.stats import SKETCH_RELATIVE_ERROR, RatioAccumulator

__all__ = ["profile", "profile_streaming", "ProfileResult", "simulate_skipping", "SimulationResult", "ThresholdResult",
           "RatioAccumulator", "SKETCH_RELATIVE_ERROR", "DEFAULT_RATIO"]

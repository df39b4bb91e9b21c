"""radial_jax: transformers that spend compute token by token (Radial Networks in JAX/Flax)."""
from radial_jax.api import Model, build, init_params
from radial_jax.kv_cache import KVCache
from radial_jax.models.opt import OPTConfig, OPTForCausalLM
from radial_jax.models.vit import ViT, ViTConfig

__version__ = "0.1.0"

__all__ = ["Model", "build", "init_params", "KVCache", "OPTConfig", "OPTForCausalLM", "ViT", "ViTConfig"]

from radial_jax.loading import CheckpointError, CheckpointReader, load  # noqa: E402

__all__ += ["CheckpointError", "CheckpointReader", "load"]

from radial_jax.profiling import profile, simulate_skipping  # noqa: E402

__all__ += ["profile", "simulate_skipping"]

"""radial_jax: transformers that spend compute token by token (Radial Networks in JAX/Flax).

Every model family's config is exported here under its own name (``rj.OPTConfig``,
``rj.LlamaConfig``, ...), found in ``radial_jax/models/families/``.
"""
from radial_jax.models.bundle import Bundle, Model, build, init_params
from radial_jax.models.kv_cache import KVCache
from radial_jax.models.decoder import CausalLM
from radial_jax.models.family import families

from radial_jax.version import __version__

__all__ = ["__version__", "Bundle", "Model", "build", "init_params", "KVCache", "CausalLM", "families"]

for _family in families().values():  # rj.OPTConfig, rj.ViTConfig, rj.LlamaConfig, ...
    globals()[_family.config_cls.__name__] = _family.config_cls
    __all__.append(_family.config_cls.__name__)
del _family

from radial_jax.checkpoints.errors import CheckpointError  # noqa: E402

from radial_jax.checkpoints.reader import CheckpointReader

from radial_jax.checkpoints.load import load

__all__ += ["CheckpointError", "CheckpointReader", "load"]

from radial_jax.profiling import profile, simulate_skipping  # noqa: E402

__all__ += ["profile", "simulate_skipping"]

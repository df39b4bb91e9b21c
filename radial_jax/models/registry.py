"""Model families: the one place that maps a Hugging Face ``model_type`` to our config and module."""
from __future__ import annotations

import jax.numpy as jnp

from radial_jax.models.opt import OPTConfig, OPTForCausalLM
from radial_jax.models.vit import ViT, ViTConfig

FAMILIES = {
    "opt": (OPTConfig, OPTForCausalLM),
    "vit": (ViTConfig, ViT),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype) -> jnp.dtype:
    """``"bfloat16"``, ``jnp.bfloat16`` or ``np.dtype`` -> jnp dtype; anything else is a ValueError."""
    if dtype is None:
        return jnp.float32
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; allowed: {sorted(DTYPES)}")
    return DTYPES[name]


def config_from_hf(hf: dict):
    """Our config from a Hugging Face config dict; unknown ``model_type`` is a ValueError."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type][0].from_hf(hf)


def module_for(config, dtype=jnp.float32):
    for config_cls, module_cls in FAMILIES.values():
        if isinstance(config, config_cls):
            return module_cls(config, dtype=dtype)
    raise ValueError(f"no model family for config of type {type(config).__name__}; "
                     f"supported: {[c.__name__ for c, _ in FAMILIES.values()]}")

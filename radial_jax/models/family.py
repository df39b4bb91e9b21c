"""The family protocol: what a model family provides, and the registry that finds the families.

A family is one file in ``radial_jax/models/families/`` that defines ``FAMILY``:

* its **config**: a frozen dataclass with ``from_hf(config_dict)`` that validates
  itself, and the properties every part of the library reads (no one else knows
  the family by name):

  - all families: ``num_layers``, ``hidden_size``, ``layer_config()`` (one
    ``LayerConfig`` for the whole pool), ``layer_meta()`` (per-layer sliding
    window and RoPE table index, ``radial_jax.models.stack.layer_meta``);
  - language models, in addition: ``vocab_size``, ``max_length``, ``pad_token_id``,
    ``bos_token_id``, ``eos_token_id`` and ``decoder_spec()`` (embedding and head,
    ``radial_jax.models.decoder.DecoderSpec``);

* its **module**: a ``flax.linen`` module ``(config, dtype)`` that owns, as the
  Flax gemma example does, ``embed(inputs, positions_bt)``, the stacked layer
  pool (the ``layers`` parameter, ``radial_jax.models.stack``), ``head(x)``
  (logits, final hidden states, pooled output), ``init_cache(batch, max_len)``
  and ``example_inputs(config)``; ``__call__`` runs embed -> pool -> head and
  returns a ``ModelOutput``. Decoder families use ``radial_jax.models.decoder.CausalLM``;

* its **one Hugging Face name table** (``radial_jax.models.names.FamilyNames``) and, when llama.cpp
  writes it, its GGUF names (``radial_jax.models.names.GGUFNames``, one per GGUF architecture).

``Model``, generation, profiling, the oracle, ``RadialModel.from_sequential``,
distillation and the CLI call this protocol only.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from typing import Dict, Tuple

import jax.numpy as jnp

from radial_jax.models.names import FamilyNames, GGUFNames

KINDS = ("causal_lm", "image_encoder")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # our name, e.g. "llama"
    model_types: Tuple[str, ...]  # the Hugging Face ``model_type`` values it loads
    config_cls: type
    module_cls: type
    names: FamilyNames
    kind: str = "causal_lm"
    gguf: Tuple[GGUFNames, ...] = ()  # the GGUF architectures llama.cpp writes this family as

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"family kind {self.kind!r} is unknown; allowed: {KINDS}")

    @property
    def is_decoder(self) -> bool:
        return self.kind == "causal_lm"


@functools.lru_cache(maxsize=None)
def families() -> Dict[str, Family]:
    """Every ``FAMILY`` defined in ``radial_jax/models/families/``, by name."""
    from radial_jax.models import families as package
    found = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if isinstance(family, Family):
            found[family.name] = family
    return found


def supported_model_types() -> list:
    return sorted(t for f in families().values() for t in f.model_types)


def family_for_model_type(model_type) -> Family:
    for family in families().values():
        if model_type in family.model_types:
            return family
    raise ValueError(f"model_type {model_type!r} is not supported; supported: {supported_model_types()}")


def family_of(config) -> Family:
    """The family of a config object; anything else is a ValueError."""
    for family in families().values():
        if isinstance(config, family.config_cls):
            return family
    raise ValueError(f"no model family for a config of type {type(config).__name__}; supported: "
                     f"{[f.config_cls.__name__ for f in families().values()]}")


def config_from_hf(hf: dict, **kwargs):
    """Our config from a Hugging Face config dict; an unknown ``model_type`` is a ValueError."""
    return family_for_model_type(hf.get("model_type")).config_cls.from_hf(hf, **kwargs)


def module_for(config, dtype=jnp.float32):
    return family_of(config).module_cls(config, dtype=resolve_dtype(dtype))


def resolve_dtype(dtype) -> jnp.dtype:
    """``"bfloat16"``, ``jnp.bfloat16`` or ``np.dtype`` -> jnp dtype; anything else is a ValueError."""
    if dtype is None:
        return jnp.float32
    try:
        name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    except TypeError:
        name = repr(dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; allowed: {sorted(DTYPES)}")
    return DTYPES[name]

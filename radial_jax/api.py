"""The user-facing model bundle: ``rj.build(config)`` and ``rj.load(name_or_path)``.

A ``Model`` holds ``config``, ``module`` (the flax.linen module), ``params`` and a
jit-compiled pure apply. ``model(input_ids)`` / ``model(pixel_values)`` returns
logits; ``model.forward(...)`` the whole ``ModelOutput`` (hidden states, per-layer
residual statistics); ``model.generate(...)`` decodes (OPT).
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from radial_jax.models.opt import OPTConfig
from radial_jax.models.registry import module_for, resolve_dtype
from radial_jax.models.vit import ViTConfig, check_pixel_values


def check_token_ids(config: OPTConfig, input_ids, extra_len: int = 0) -> None:
    """ValueError unless ``input_ids`` is ``[batch>=1, 1<=len<=max]`` with ids in the vocabulary."""
    shape = np.shape(input_ids)
    if len(shape) != 2:
        raise ValueError(f"input_ids must be 2-D [batch, length]; got shape {shape}")
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"input_ids is empty (shape {shape}); need at least one sequence of one token")
    if shape[1] + extra_len > config.max_length:
        raise ValueError(
            f"sequence length {shape[1]}{f' + {extra_len} new tokens' if extra_len else ''} exceeds the "
            f"model's {config.max_length} positions")
    ids = np.asarray(input_ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got {ids.dtype}")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise ValueError(f"token ids must be in [0, {config.vocab_size}) for this model; got ids in "
                         f"[{ids.min()}, {ids.max()}] (a tokenizer of another model?)")


class Model:
    """A model bundle, convenient in Colab: ``model.config``, ``model.module``, ``model.params``."""

    def __init__(self, config, params, *, dtype=jnp.float32, name: Optional[str] = None,
                 tokenizer_path: Optional[str] = None):
        self.config = config
        self.dtype = resolve_dtype(dtype)
        self.module = module_for(config, self.dtype)
        self.params = params
        self.name = name or f"{config.model_type}-random"
        self.tokenizer_path = tokenizer_path

    @functools.cached_property
    def _apply(self):
        def forward(params, *args, **kwargs):
            return self.module.apply({"params": params}, *args, **kwargs)
        return jax.jit(forward, static_argnames=("ratio_kind", "compute_logits", "embeddings_only"))

    @property
    def is_decoder(self) -> bool:
        return isinstance(self.config, OPTConfig)

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(self.params)))

    def check_inputs(self, inputs) -> None:
        if isinstance(self.config, ViTConfig):
            check_pixel_values(self.config, np.shape(inputs))
        else:
            check_token_ids(self.config, inputs)

    def forward(self, inputs, attention_mask=None, **kwargs):
        """The full ``ModelOutput`` (logits, final hidden states, residual statistics)."""
        self.check_inputs(inputs)
        if attention_mask is not None:
            kwargs["attention_mask_bt"] = jnp.asarray(attention_mask)
        return self._apply(self.params, jnp.asarray(inputs), **kwargs)

    def __call__(self, inputs, attention_mask=None):
        """Logits: ``[b, t, vocab]`` for OPT (token ids), ``[b, classes]`` for a ViT classifier."""
        out = self.forward(inputs, attention_mask)
        if out.logits is None:
            raise ValueError(f"{self.name} has no classification head; use model.forward(...).hidden")
        return out.logits

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Decode new tokens; see ``radial_jax.generation.generate`` for the options."""
        if not self.is_decoder:
            raise ValueError(f"generate needs a decoder model; {self.name} is {self.config.model_type}")
        from radial_jax.generation import generate
        return generate(self, input_ids, attention_mask, **kwargs)

    def tokenizer(self):
        """The checkpoint's tokenizer through ``transformers.AutoTokenizer`` (local files only)."""
        if self.tokenizer_path is None:
            raise ValueError(f"{self.name} was not loaded from a checkpoint with a tokenizer")
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(self.tokenizer_path)

    def __repr__(self):
        return f"Model({self.name!r}, {type(self.config).__name__}, {self.num_params:,} params, {self.dtype.__name__})"


def example_inputs(config, batch: int = 1, length: int = 8):
    if isinstance(config, ViTConfig):
        return (jnp.zeros((batch, config.num_channels, config.image_size, config.image_size), jnp.float32),)
    return (jnp.zeros((batch, length), jnp.int32),)


def init_params(config, seed: int = 0, dtype=jnp.float32):
    """Random parameters (plain arrays, logical axis boxes removed)."""
    module = module_for(config, resolve_dtype(dtype))
    variables = jax.jit(module.init)(jax.random.key(seed), *example_inputs(config))
    params = nn.unbox(variables)["params"]
    return jax.tree_util.tree_map(lambda p: p.astype(resolve_dtype(dtype)), params)


def build(config, *, seed: int = 0, dtype=jnp.float32, name: Optional[str] = None) -> Model:
    """A model with random weights from a config (``OPTConfig`` / ``ViTConfig``)."""
    return Model(config, init_params(config, seed, dtype), dtype=dtype, name=name)

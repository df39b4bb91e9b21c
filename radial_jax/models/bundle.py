"""The user-facing model bundles: ``rj.build(config)``, ``rj.load(name_or_path)``, ``Model``.

A bundle holds ``config`` (a family config), ``params`` and a jit-compiled pure
apply. ``model(input_ids)`` / ``model(pixel_values)`` returns logits;
``model.forward(...)`` the whole ``ModelOutput`` (hidden states, per-layer
residual statistics); ``model.generate(...)`` decodes (language models).
``Bundle`` is what ``Model`` and the Radial Network's ``RadialModel`` share:
input checks, generation, the tokenizer, naming.
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from radial_jax.checkpoints.tokenizer import load_tokenizer
from radial_jax.models.family import family_of, module_for, resolve_dtype
from radial_jax.models.stack import is_per_layer, stack_pool, unstack_pool
from radial_jax.serving.decoding import sequential_decoding
from radial_jax.serving.generation import generate


class Bundle:
    """What every model bundle has: ``config``, ``params``, ``dtype``, ``name``, the family, input checks,
    ``generate`` and ``tokenizer``. Subclasses provide ``forward`` and the decoding functions."""

    def __init__(self, config, params, *, dtype=jnp.float32, name: Optional[str] = None,
                 tokenizer_path: Optional[str] = None):
        self.config = config
        self.family = family_of(config)
        self.dtype = resolve_dtype(dtype)
        self.params = params
        self.name = name or f"{config.model_type}-random"
        self.tokenizer_path = tokenizer_path

    @property
    def is_decoder(self) -> bool:
        return self.family.is_decoder

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(self.params)))

    def check_inputs(self, inputs, attention_mask=None) -> None:
        """ValueError naming what is wrong with ``inputs`` (token ids or pixels) for this model."""
        self.family.module_cls.check_inputs(self.config, inputs, attention_mask)

    def __call__(self, inputs, attention_mask=None):
        """Logits: ``[b, t, vocab]`` for a language model, ``[b, classes]`` for a ViT classifier."""
        out = self.forward(inputs, attention_mask)
        if out.logits is None:
            raise ValueError(f"{self.name} has no classification head; use model.forward(...).hidden")
        return out.logits

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Decode new tokens; see ``radial_jax.serving.generation.generate`` for the options.

        To serve, hold the bundle in the per-layer layout (``with_layout("per_layer")``, once): on a stacked
        bundle every call copies the layers into that layout inside its compiled program (measured in
        ``experiments/bench_models.py``: ``prefill_stacked``)."""
        if not self.is_decoder:
            raise ValueError(f"generate needs a language model; {self.name} is {self.config.model_type}")
        return generate(self, input_ids, attention_mask, **kwargs)

    @property
    def layout(self) -> str:
        """``"stacked"`` (``params["layers"]`` leaves ``[L, ...]``) or ``"per_layer"`` (a tuple of ``L`` layers)."""
        return "per_layer" if is_per_layer(self.params.get("layers")) else "stacked"

    def with_layout(self, layout: str):
        """This bundle with its layer pool in ``layout``: ``"stacked"`` (training, sharding) or
        ``"per_layer"`` (inference: every layer's weights read in place, and a Radial Network's steps
        unrolled; see ``radial_jax.models.stack``). Other parameters are shared; the pool is copied once."""
        if layout not in ("stacked", "per_layer"):
            raise ValueError(f"layout {layout!r} is unknown; allowed: 'stacked', 'per_layer'")
        if layout == self.layout:
            return self
        convert = unstack_pool if layout == "per_layer" else stack_pool
        return self._with_params({**self.params, "layers": jax.block_until_ready(convert(self.params["layers"]))})

    def _with_params(self, params):
        """The same bundle over other parameters (same shapes)."""
        raise NotImplementedError

    def tokenizer(self):
        """The model's own tokenizer (``radial_jax.checkpoints.tokenizer.load_tokenizer``, local files only), never a substitute.

        ``tokenizer_path`` names it: the checkpoint directory, the ``.gguf`` file, or ``offline-pydoc-bpe-N``
        for a model trained here with the offline BPE (recorded in its artifact)."""
        if self.tokenizer_path is None:
            raise ValueError(f"{self.name} has no tokenizer: it was built or trained without one recorded; load a "
                             "checkpoint with its tokenizer files, a .gguf file, or a model trained by radial-jax")
        return load_tokenizer(self.tokenizer_path)


class Model(Bundle):
    """A sequential model, convenient in Colab: ``model.config``, ``model.module``, ``model.params``."""

    def __init__(self, config, params, **kwargs):
        super().__init__(config, params, **kwargs)
        self.module = module_for(config, self.dtype)

    def _apply(self, params, *args, **kwargs):
        return _apply_module(self.module, params, *args, **kwargs)

    def forward(self, inputs, attention_mask=None, **kwargs):
        """The full ``ModelOutput`` (logits, final hidden states, residual statistics)."""
        self.check_inputs(inputs, attention_mask)
        if attention_mask is not None:
            kwargs["attention_mask_bt"] = jnp.asarray(attention_mask)
        return self._apply(self.params, jnp.asarray(inputs), **kwargs)

    def _with_params(self, params) -> "Model":
        return Model(self.config, params, dtype=self.dtype, name=self.name, tokenizer_path=self.tokenizer_path)

    # -- decoding (radial_jax.serving.decoding) ---------------------------------------------------------
    def init_cache(self, batch: int, max_len: int):
        return self.module.init_cache(batch, max_len)

    def decoding(self):
        """``radial_jax.serving.decoding.Decoding`` of the sequential model (every token through every layer)."""
        return self._decoding

    @functools.cached_property
    def _decoding(self):  # one object per bundle: generation's compiled loop is keyed on it
        return sequential_decoding(self.module)

    def __repr__(self):
        return f"Model({self.name!r}, {type(self.config).__name__}, {self.num_params:,} params, {self.dtype.__name__})"


@functools.partial(jax.jit, static_argnames=("module", "ratio_kind", "compute_logits", "embeddings_only"))
def _apply_module(module, params, *args, **kwargs):
    """``module.apply`` under jit, the module static: bundles with equal modules share compilations."""
    return module.apply({"params": params}, *args, **kwargs)


def example_inputs(config, batch: int = 1, length: int = 8) -> tuple:
    return family_of(config).module_cls.example_inputs(config, batch, length)


def init_params(config, seed: int = 0, dtype=jnp.float32):
    """Random parameters (plain arrays, logical axis boxes removed)."""
    dtype = resolve_dtype(dtype)
    module = module_for(config, dtype)
    variables = jax.jit(module.init)(jax.random.key(seed), *example_inputs(config))
    params = nn.unbox(variables)["params"]
    return jax.tree_util.tree_map(lambda p: p.astype(dtype), params)


def build(config, *, seed: int = 0, dtype=jnp.float32, name: Optional[str] = None) -> Model:
    """A model with random weights from a family config (``rj.OPTConfig(...)``, ``rj.LlamaConfig(...)``...)."""
    return Model(config, init_params(config, seed, dtype), dtype=dtype, name=name)

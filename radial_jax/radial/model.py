"""``RadialModel``: the bundle of a Radial Network (what ``Model`` is to a sequential model).

``RadialModel.from_sequential(model, **radial_settings)`` takes any family's
``rj.Model``: the pool, embedder and head are the model's, the router is fresh.
It shares ``radial_jax.models.bundle.Bundle`` with ``Model`` (input checks, ``generate``,
the tokenizer), so ``rm.generate(...)`` is ``radial_jax.serving.generation.generate``,
the same code path as the sequential model's, with per-token depth and executed
FLOPs in its ``GenerationOutput``.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from radial_jax.models.bundle import Bundle
from radial_jax.models.flops import head_flops
from radial_jax.models.kv_cache import split_layers
from radial_jax.models.stack import num_pool_layers, unstack_pool
from radial_jax.radial.capacity import fit_capacity
from radial_jax.radial.config import RadialConfig
from radial_jax.radial.network import RadialNetwork, RadialOutput, init_router
from radial_jax.radial.router import aligned_step_bias
from radial_jax.radial.step_state import RadialCache
from radial_jax.serving.decoding import Decoding


@functools.partial(jax.jit, static_argnames=("module", "max_len", "compute_logits"))
def _forward(module, params, inputs, attention_mask_bt=None, *, positions_bt=None, cache=None, max_len=None,
             threshold=None, compute_logits=True):
    return module.apply({"params": params}, inputs, attention_mask_bt, positions_bt=positions_bt, cache=cache,
                        max_len=max_len, threshold=threshold, compute_logits=compute_logits)


@functools.partial(jax.jit, static_argnames=("module",))
def _decode_step(module, params, ids_b, slots_b, cache, live_b):
    return module.apply({"params": params}, ids_b, slots_b, cache, live_b, method="decode_step")


def warn_identity_drops(rc: RadialConfig, num_layers: int) -> None:
    """Warn when radial identity routing is built at a capacity that refuses most of its visits: it sends every
    token to one layer per step, while each (step, layer) admits ``phi`` of a sequence (the MoE convention)."""
    if not rc.is_identity or rc.ordered:
        return
    phi = rc.budget_fraction(num_layers)
    if phi < 1:
        full = rc.steps(num_layers)
        warnings.warn(f"radial identity routing at capacity_factor={rc.capacity_factor:g}: each layer admits "
                      f"{phi:.0%} of a sequence per step while every token wants one layer per step, so about "
                      f"{1 - phi:.0%} of the visits are dropped; capacity_factor={full} (S) runs them all (the "
                      "sequential model when S = L)", stacklevel=3)


class RadialModel(Bundle):
    """Bundle: ``.module`` (RadialNetwork), ``.params``, ``.config`` (the base family's), ``.radial``.

    ``forward(...)`` -> RadialOutput (jit); ``model(inputs, mask)`` -> logits; ``generate(...)``;
    ``decode_step(ids_b, slots_b, cache)``; ``init_cache(batch, max_len)``;
    ``replace(**radial_changes)`` -> a bundle sharing the params (e.g. ``routing="identity"``); the
    router is re-initialised (``seed``) only when its shapes change (max_steps, router width).
    """

    def __init__(self, config, radial: RadialConfig, params, dtype=jnp.float32, *, name: Optional[str] = None,
                 tokenizer_path: Optional[str] = None):
        super().__init__(config, params, dtype=dtype, name=name or f"radial-{config.model_type}",
                         tokenizer_path=tokenizer_path)
        self.radial = radial
        self.module = RadialNetwork(config, radial, self.dtype)

    @staticmethod
    def from_sequential(model, *, seed: int = 0, **radial_kwargs) -> "RadialModel":
        """A ``RadialModel`` whose pool, embedder and head are ``model``'s, plus a fresh router.

        ``model``: an ``rj.Model`` (``rj.build`` / ``rj.load``) of any family.
        ``radial_kwargs``: fields of ``RadialConfig`` (mode, capacity_factor, max_steps,
        cache_policy, routing, dispatch, gate, router_hidden, ...).
        """
        config, params = getattr(model, "config", None), getattr(model, "params", None)
        if not isinstance(params, dict) or not hasattr(config, "layer_config"):
            raise ValueError(f"from_sequential needs an rj.Model (with .config and .params); got "
                             f"{type(model).__name__}")
        if "layers" not in params:
            raise ValueError(f"the model's params have no stacked 'layers' to build the pool from "
                             f"(top-level keys: {sorted(params)})")
        L = num_pool_layers(params["layers"])
        if L < 1:
            raise ValueError("the model's layer pool is empty (0 layers)")
        if L != config.num_layers:
            raise ValueError(f"the stacked 'layers' hold {L} layers but the config says {config.num_layers}")
        rc = RadialConfig(**radial_kwargs)
        warn_identity_drops(rc, L)
        router = init_router(L, rc.steps(L), rc, config.hidden_size)(jax.random.key(seed))
        return RadialModel(config, rc, {**params, "router": router}, dtype=model.dtype,
                           name=f"radial-{getattr(model, 'name', config.model_type)}",
                           tokenizer_path=getattr(model, "tokenizer_path", None))

    def replace(self, params=None, seed: int = 0, **radial_changes) -> "RadialModel":
        rc = dataclasses.replace(self.radial, **radial_changes)
        L = self.config.num_layers
        params = dict(self.params if params is None else params)
        fresh = init_router(L, rc.steps(L), rc, self.config.hidden_size)
        want = jax.eval_shape(fresh, jax.random.key(0))
        have = params.get("router")
        if jax.tree_util.tree_structure(want) != jax.tree_util.tree_structure(have) or any(
                a.shape != b.shape for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(have))):
            params["router"] = fresh(jax.random.key(seed))  # the router's shapes changed (steps, width)
        return RadialModel(self.config, rc, params, self.dtype, name=self.name, tokenizer_path=self.tokenizer_path)

    def _with_params(self, params) -> "RadialModel":
        return RadialModel(self.config, self.radial, params, self.dtype, name=self.name,
                           tokenizer_path=self.tokenizer_path)

    def to_radial(self, push: float = 8.0, **radial_changes) -> "RadialModel":
        """The radial-mode network that starts where this ordered one is (docs/design.md §5).

        Same parameters; the router's step bias gets ``aligned_step_bias(push)`` (every layer but
        ``s`` and the exit pushed down by ``push`` at step ``s``), ``S = L``, and the capacity factor
        scaled so each step's layer admits what it admitted in ordered mode. With a large ``push``
        it computes exactly what the ordered network computes; training can then lower the push and
        learn reuse, other orders and exits, every router column keeping its meaning.
        """
        if not self.radial.ordered:
            raise ValueError(f"to_radial starts from an ordered-mode network; this one is {self.radial.mode}")
        L = self.config.num_layers
        router = dict(self.params["router"])
        router["step_bias"] = jnp.asarray(router["step_bias"]) + aligned_step_bias(L, L, push)
        changes = {"mode": "radial", "max_steps": L,
                   "capacity_factor": self.radial.budget_fraction(L) * L, **radial_changes}
        return self.replace(params={**self.params, "router": router}, **changes)

    def fit_capacity(self, windows, **kwargs) -> "RadialModel":
        """This network at the smallest capacity its routes need on ``windows`` (``radial.capacity.fit_capacity``,
        whose keywords it takes)."""
        return fit_capacity(self, windows, **kwargs)

    def forward(self, inputs, attention_mask=None, **kwargs) -> RadialOutput:
        """The parallel forward (``RadialNetwork.__call__``): ``positions_bt``, ``cache``, ``max_len``,
        ``threshold``, ``compute_logits`` as keywords."""
        self.check_inputs(inputs, attention_mask)
        mask = None if attention_mask is None else jnp.asarray(attention_mask)
        return _forward(self.module, self.params, jnp.asarray(inputs), mask, **kwargs)

    # -- decoding -----------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int) -> RadialCache:
        return self.module.init_cache(batch, max_len)

    def decode_step(self, ids_b, slots_b, cache: RadialCache, live_b=None) -> RadialOutput:
        """One new token per row (``RadialNetwork.decode_step``), jit-compiled."""
        live_b = jnp.ones(np.shape(ids_b), bool) if live_b is None else jnp.asarray(live_b, bool)
        return _decode_step(self.module, self.params, jnp.asarray(ids_b), jnp.asarray(slots_b), cache, live_b)

    def decoding(self):
        """``radial_jax.serving.decoding.Decoding`` of this network (prefill = the parallel forward)."""
        return self._decoding

    @functools.cached_property
    def _decoding(self):  # one object per bundle: generation's compiled loop is keyed on it
        module, config = self.module, self.config

        def forward(params, ids_bt, valid_bt, cache):
            b, t = ids_bt.shape
            slots_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            out = module.apply({"params": params}, ids_bt, valid_bt, positions_bt=slots_bt, cache=cache,
                               compute_logits=False)
            stats = {"depth": out.metrics.depth, "flops": jnp.float32(out.metrics.executed_flops),
                     "router": out.router, "metrics": out.metrics}
            return out.hidden, out.cache, stats

        def step(params, tok_b, pos_b, live_b, cache, compute_logits=True):
            out = module.apply({"params": params}, tok_b, pos_b, cache, live_b, compute_logits, method="decode_step")
            flops = out.metrics.executed_flops + (head_flops(config, tok_b.shape[0]) if compute_logits else 0.0)
            out_bv = (out.logits if compute_logits else out.hidden)[:, 0]
            router = jax.tree_util.tree_map(lambda a: a[:, :, 0], out.router)  # [S, b, 1, ...] -> [S, b, ...]
            return out_bv, out.cache, {"depth": out.metrics.depth[:, 0], "flops": jnp.float32(flops),
                                       "router": router, "metrics": out.metrics}

        def prepare(params):  # the inference layout: steps unrolled, each layer's weights read in place
            return {**params, "layers": unstack_pool(params["layers"])}

        def init_cache(batch, max_len):
            cache = module.init_cache(batch, max_len)
            return cache.replace(kv=split_layers(cache.kv))

        return Decoding(init_cache=init_cache, forward=forward,
                        head=lambda params, h: module.apply({"params": params}, h, method="logits"),
                        head_flops=lambda n: head_flops(config, n), step=step, prepare=prepare,
                        first_rows=lambda cache, n: cache.first_rows(n))

    def __repr__(self):
        return f"RadialModel({self.name!r}, {type(self.config).__name__}, {self.radial})"

"""Low-rank adapters (LoRA) on a layer pool's kernels, as a transform of the parameter tree.

A pool kernel is stacked over layers, ``kernel[l, i, o]``; its adapter holds ``a[l, i, r]`` and
``b[l, r, o]`` and the adapted kernel is ``kernel + (alpha / r) * a @ b`` per layer (Hu et al., 2021).
``b`` starts at zero, so a fresh adapter computes exactly the base model. Nothing in the modules
changes: ``merge(params, adapters, cfg)`` returns the tree a module applies, and gradients reach
the adapters through it. A few MB for a 270M model at rank 8, so a trained adapter is committed
and loaded next to the untouched base checkpoint (``radial_jax.training.adapt``).
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp

# the projections of attention and MLP blocks in every family's pool (``radial_jax.models.layer``)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "gate", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank, scale (``alpha / rank``) and which pool kernels get an adapter."""

    rank: int = 8
    alpha: float = 16.0
    targets: Tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target kernel")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def adaptable(layers) -> Tuple[str, ...]:
    """Names of the pool's stacked 2-D kernels (``[l, in, out]``) that an adapter can target."""
    return tuple(sorted(k for k, v in layers.items()
                        if isinstance(v, dict) and "kernel" in v and len(jnp.shape(v["kernel"])) == 3))


def _targets(layers, cfg: LoraConfig) -> Tuple[str, ...]:
    """The config's targets this pool has; an unknown target is an error, a family without one is not
    (GPT-2 and OPT have no ``gate``)."""
    have = adaptable(layers)
    unknown = [t for t in cfg.targets if t not in DEFAULT_TARGETS and t not in have]
    if unknown:
        raise ValueError(f"LoRA targets {unknown} are not kernels of this pool; it has {list(have)}")
    chosen = tuple(t for t in cfg.targets if t in have)
    if not chosen:
        raise ValueError(f"none of the LoRA targets {list(cfg.targets)} is in this pool ({list(have)})")
    return chosen


def init_adapters(params, cfg: LoraConfig, key) -> dict:
    """``{name: {"a": [l, in, r], "b": [l, r, out]}}`` for the pool ``params["layers"]``: ``a`` drawn
    with variance ``1 / in``, ``b`` zero (the adapted model starts as the base model), float32."""
    if "layers" not in params:
        raise ValueError(f"LoRA adapts a stacked layer pool; these params have no 'layers' ({sorted(params)})")
    layers = params["layers"]
    out = {}
    for name, k in zip(_targets(layers, cfg), jax.random.split(key, len(cfg.targets))):
        n_layers, d_in, d_out = jnp.shape(layers[name]["kernel"])
        out[name] = {"a": jax.random.normal(k, (n_layers, d_in, cfg.rank), jnp.float32) / jnp.sqrt(d_in),
                     "b": jnp.zeros((n_layers, cfg.rank, d_out), jnp.float32)}
    return out


def merge(params, adapters, cfg: LoraConfig) -> dict:
    """``params`` with every adapted pool kernel replaced by ``kernel + scale * a @ b`` (per layer), in the
    kernel's dtype; other leaves are the same objects."""
    layers = dict(params["layers"])
    for name, ab in adapters.items():
        if name not in layers:
            raise ValueError(f"adapter for {name!r}, which the pool does not have ({list(adaptable(layers))})")
        kernel = layers[name]["kernel"]
        if jnp.shape(ab["a"])[:2] != jnp.shape(kernel)[:2] or jnp.shape(ab["b"])[::2] != jnp.shape(kernel)[::2]:
            raise ValueError(f"adapter {name!r} has shapes a{jnp.shape(ab['a'])} b{jnp.shape(ab['b'])}, which do "
                             f"not fit the kernel {jnp.shape(kernel)} (a pool of another size?)")
        delta_lio = jnp.einsum("lir,lro->lio", ab["a"], ab["b"]) * cfg.scale
        layers[name] = {**layers[name], "kernel": (kernel + delta_lio).astype(jnp.asarray(kernel).dtype)}
    return {**params, "layers": layers}


def num_adapter_params(adapters) -> int:
    return sum(int(jnp.size(x)) for x in jax.tree_util.tree_leaves(adapters))

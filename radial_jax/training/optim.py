"""optax optimiser and schedule: AdamW, linear warm-up + cosine decay, global-norm clipping.

``make_optimizer(cfg, trainable=...)`` freezes the parameters for which
``trainable(path)`` is false (their update is exactly zero and they hold no
Adam moments), e.g. router-only distillation.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import optax

from radial_jax import defaults as D


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warm-up + cosine; ``decay_steps`` is the whole run's length."""

    learning_rate: float = D.LEARNING_RATE
    warmup_steps: int = D.WARMUP_STEPS
    decay_steps: int = D.DECAY_STEPS
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: Optional[float] = 1.0

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.decay_steps < 1:
            raise ValueError(f"need warmup_steps >= 0 and decay_steps >= 1, got {self.warmup_steps}, "
                             f"{self.decay_steps}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {self.clip_norm}")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """0 -> peak linearly over ``warmup_steps``, then cosine to ``final_lr_fraction * peak``."""
    warmup = min(cfg.warmup_steps, cfg.decay_steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(cfg.decay_steps, warmup + 1), end_value=cfg.learning_rate * cfg.final_lr_fraction)


def param_path_keys(path) -> tuple:
    """A pytree key path as a tuple of names, ``("a", "b", "c")``."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_path_str(path) -> str:
    """A pytree key path as "a/b/c" (the names optax masks and checkpoints are keyed by)."""
    return "/".join(param_path_keys(path))


def label_tree(params, trainable: Callable[[str], bool]):
    """``"train"`` / ``"frozen"`` per leaf from ``trainable("a/b/kernel")``."""
    return jax.tree_util.tree_map_with_path(lambda p, _: "train" if trainable(param_path_str(p)) else "frozen", params)


def make_optimizer(cfg: OptimConfig, trainable: Optional[Callable[[str], bool]] = None,
                   params=None) -> optax.GradientTransformation:
    """Clip -> AdamW(schedule); weight decay only on matrices (ndim >= 2).

    With ``trainable`` (a predicate on ``"a/b/kernel"`` paths) give ``params`` too:
    frozen leaves get zero updates.
    """
    decay_mask = lambda p: jax.tree_util.tree_map(lambda x: x.ndim >= 2, p)  # noqa: E731
    chain = []
    if cfg.clip_norm is not None:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    tx = optax.chain(*chain)
    if trainable is None:
        return tx
    if params is None:
        raise ValueError("make_optimizer(trainable=...) needs params to label the leaves")
    labels = label_tree(params, trainable)
    if "train" not in jax.tree_util.tree_leaves(labels):
        raise ValueError("the trainable predicate selects no parameter; nothing would be trained")
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)

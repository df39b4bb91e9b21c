"""Adapting a pretrained pool to being skipped: low-rank adapters (and the router) against cached targets.

The student is either

* an ordered ``RadialModel`` over the teacher's own layers: its router and LoRA adapters train
  together, so the layers learn to work when the router skips some of them (the skips act as a
  learned layer dropout, in the LayerSkip manner); or
* a plain ``rj.Model`` with layers removed (``radial_jax.profiling.layer_drop``): the static
  baseline, given exactly the same adapters, targets, steps and optimiser.

Nothing else trains: embeddings, head, norms and the base kernels stay frozen (passed to the
compiled step as an input, never copied into it). The loss, per batch of cached targets
(``radial_jax.training.targets``)::

    sparse_kl(student head at the cached positions, teacher top-k)        (temperature ``T``)
  + router_weight  * BCE(keep logits, layer-oracle keep labels)         (RadialModel only)
  + compute_weight * E[depth] / L                                       (RadialModel only)

Runs are resumable (``run_dir``, ``radial_jax.training.loop.fit``). ``save_adapted`` writes only
what was trained (adapters, router: a few MB) with the settings to rebuild the student;
``load_adapted(directory, base)`` puts it back on the untouched base model.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import jax
import jax.numpy as jnp
import optax

from radial_jax import defaults as D
from radial_jax.checkpoints.artifacts import read_artifact, write_artifact
from radial_jax.checkpoints.load import load
from radial_jax.models.bundle import Model
from radial_jax.profiling.layer_drop import drop_layers
from radial_jax.radial import RadialModel
from radial_jax.training import losses
from radial_jax.training.distill_loss import expected_layer_visits, keep_logits_ordered, without_router
from radial_jax.training.loop import TrainConfig, fit
from radial_jax.training.lora import LoraConfig, init_adapters, merge, num_adapter_params
from radial_jax.training.optim import make_optimizer
from radial_jax.training.state import TrainState
from radial_jax.training.steps import make_train_step, to_host
from radial_jax.training.targets import TargetBatches, TeacherTargets, sparse_kl

ARTIFACT_KIND = "adapted_student"


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
    """What trains and the loss weights (see the module docstring)."""

    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    temperature: float = 1.0
    router_weight: float = D.ROUTER_WEIGHT
    compute_weight: float = 0.05
    router_lr_scale: float = 10.0  # the router's learning rate / the adapters' (a fresh MLP vs a small delta)

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("router_weight", "compute_weight", "router_lr_scale"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora"]["targets"] = list(self.lora.targets)
        return d

    @staticmethod
    def from_dict(d: dict) -> "AdaptConfig":
        return AdaptConfig(**{**d, "lora": LoraConfig(**d["lora"])})


def _is_radial(student) -> bool:
    return hasattr(student, "radial")


def adapt_loss_fn(student, cfg: AdaptConfig):
    """``loss(params, batch, key, frozen) -> (loss, metrics)``: ``params = {"lora": ..., ["router": ...]}``,
    ``frozen`` the student's other parameters, ``batch`` a dict of cached targets."""
    radial = _is_radial(student)
    module = student.replace(prefill_buckets=1).module if radial else student.module
    L = student.config.num_layers

    def loss(params, batch, key, frozen):
        del key
        base = {**frozen, "router": params["router"]} if radial else frozen
        weights = merge(base, params["lora"], cfg.lora)
        out = module.apply({"params": weights}, batch["ids"], compute_logits=False)
        picked_bpe = jnp.take_along_axis(out.hidden, batch["positions"][..., None], 1)
        logits = module.apply({"params": weights}, picked_bpe, method="logits")
        kl = sparse_kl(logits, batch["top_ids"], batch["top_logp"], cfg.temperature)
        total, metrics = kl, {"kl": kl}
        if radial:
            r = out.router
            bce = losses.router_keep_bce(keep_logits_ordered(r.logits), jnp.swapaxes(batch["keep"], 0, 1))
            depth = losses.compute_penalty(expected_layer_visits(r, True, L), L)
            total = total + cfg.router_weight * bce + cfg.compute_weight * depth
            metrics.update(router_loss=bce, soft_depth=depth, hard_depth=out.metrics.depth_fraction,
                           compute=out.metrics.compute_fraction)
        return total, metrics

    return loss


def adapt(student, targets: TeacherTargets, cfg: AdaptConfig = AdaptConfig(), train: TrainConfig = TrainConfig(),
          *, run_dir: Optional[Union[str, Path]] = None, progress: bool = True):
    """Train ``student``'s adapters (and router, for a ``RadialModel``) on ``targets``.

    Returns ``(adapted, trained, history)``: ``adapted`` the student with merged weights (ready to
    score, serve or generate), ``trained`` the trained tree ``{"lora", ["router"]}`` for ``save_adapted``.
    """
    radial = _is_radial(student)
    if radial and not student.radial.ordered:
        raise ValueError("adapt trains an ordered-mode RadialModel (or a plain Model); got a "
                         f"{student.radial.mode}-mode one")
    if targets.ids.shape[1] != train.seq_len:
        raise ValueError(f"train.seq_len is {train.seq_len} but the cached windows have {targets.ids.shape[1]} "
                         "tokens")
    if radial and targets.keep.shape[1] != student.config.num_layers:
        raise ValueError(f"the cached keep labels are for {targets.keep.shape[1]} layers; the student has "
                         f"{student.config.num_layers}")
    train = train.with_schedule()
    params = {"lora": init_adapters(student.params, cfg.lora, jax.random.key(train.seed))}
    if radial:
        params["router"] = jax.tree_util.tree_map(jnp.asarray, student.params["router"])
    frozen = jax.tree_util.tree_map(jnp.asarray, without_router(student.params))
    tx = make_optimizer(train.optim)
    if radial:
        router_optim = dataclasses.replace(train.optim, learning_rate=train.optim.learning_rate * cfg.router_lr_scale)
        tx = optax.multi_transform({"lora": tx, "router": make_optimizer(router_optim)},
                                   {"lora": "lora", "router": "router"})
    step = make_train_step(adapt_loss_fn(student, cfg), tx)
    run_config = {"train": train.to_dict(), "adapt": cfg.to_dict(), "student": student.name,
                  "radial": dataclasses.asdict(student.radial) if radial else None,
                  "targets": {"windows": targets.num_windows, "threshold": targets.threshold}}
    state, history = fit(TrainState.create(params, tx, train.seed), lambda s, b: step(s, b, frozen),
                         TargetBatches(targets, train.batch_size, train.seed), train, run_dir=run_dir,
                         run_config=run_config, progress=progress, desc=f"adapt {Path(str(student.name)).name}")
    trained = to_host(state.params)
    return with_adapters(student, trained, cfg.lora), trained, history


def with_adapters(student, trained: dict, lora: LoraConfig):
    """``student`` with ``trained["lora"]`` merged into its pool (and ``trained["router"]``, if any)."""
    params = dict(student.params)
    if "router" in trained:
        params["router"] = trained["router"]
    return student._with_params(jax.device_get(merge(params, trained["lora"], lora)))


def save_adapted(directory, trained: dict, cfg: AdaptConfig, student, base: str, **extra) -> Path:
    """``params.msgpack`` (only ``trained``) and ``config.json`` (what rebuilds the student from ``base``:
    its radial settings or dropped layers, the LoRA settings), as ``artifacts.write_artifact`` writes them."""
    meta = {"kind": ARTIFACT_KIND, "base": str(base), "adapt": cfg.to_dict(),
            "radial": dataclasses.asdict(student.radial) if _is_radial(student) else None,
            "num_layers": student.config.num_layers, "adapter_params": num_adapter_params(trained), **extra}
    return write_artifact(directory, trained, meta)


def read_adapted(directory):
    """``(trained, meta)`` as ``save_adapted`` wrote them (nothing rebuilt)."""
    return read_artifact(directory, ARTIFACT_KIND)


def load_adapted(directory, base: Optional[Model] = None):
    """``(student, meta)``: the student saved by ``save_adapted``, rebuilt on ``base`` (default: the
    base model recorded in the artifact, loaded with ``rj.load``)."""
    trained, meta = read_adapted(directory)
    if base is None:
        base = load(meta["base"])
    if meta.get("dropped_layers"):
        student = drop_layers(base, meta["dropped_layers"])
    elif meta.get("radial") is not None:
        student = RadialModel.from_sequential(base, **meta["radial"])
    else:
        student = base
    if student.config.num_layers != meta["num_layers"]:
        raise ValueError(f"{directory} was trained on a {meta['num_layers']}-layer student; this base gives "
                         f"{student.config.num_layers} layers")
    return with_adapters(student, trained, AdaptConfig.from_dict(meta["adapt"]).lora), meta

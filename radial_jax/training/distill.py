"""Distillation of a sequential model into a Radial Network (docs/design.md §5): ``distill`` trains a student of
``make_student`` on a text dataset with the loss of ``training.distill_loss``, on one device or a mesh."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import jax
import numpy as np

from radial_jax.data.corpus import window_batches
from radial_jax.data.packed import TextData
from radial_jax.models.bundle import Model
from radial_jax.models.perplexity import TokenWeighted, lm_cross_entropy
from radial_jax.training import losses
from radial_jax.training.distill_loss import DistillConfig, make_student
from radial_jax.training.loop import TrainConfig, fit
from radial_jax.training.optim import make_optimizer
from radial_jax.training.pod_steps import distill_step
from radial_jax.training.steps import to_host


def make_distill_eval(student, windows, teacher: Model, batch_size: int = 16):
    """``params -> {"eval_loss" (KL to the teacher at T=1), "eval_nll", "eval_depth" (fraction of L)}``."""
    module = student.replace(prefill_buckets=1).module

    @jax.jit
    def stats(params, ids_bt):
        t = teacher.module.apply({"params": teacher.params}, ids_bt)
        s = module.apply({"params": params}, ids_bt)
        nll, n = lm_cross_entropy(s.logits, ids_bt)
        return losses.distill_kl(s.logits, t.logits), nll, s.metrics.depth_fraction, n

    window_batches(windows, batch_size, whole_only=True)  # too few windows: refused now, not at the first eval

    def evaluate(params):
        acc = TokenWeighted()
        for ids in window_batches(windows, batch_size, whole_only=True):  # one shape: one compile
            kl, nll, depth, n = stats(params, ids)
            acc.add(n, kl=kl, nll=nll, depth=depth)
        return {"eval_loss": acc.mean("kl"), "eval_nll": acc.mean("nll"), "eval_depth": acc.mean("depth")}

    return evaluate


def distill(teacher: Model, data: TextData, steps: Optional[int] = None, *, cfg: DistillConfig = DistillConfig(),
            mode: str = "ordered", start=None, train: Optional[TrainConfig] = None,
            run_dir: Optional[Union[str, Path]] = None, progress: bool = True, callbacks=(),
            radial_kwargs: Optional[dict] = None, mesh=None, memory=None, rules=None):
    """Distil ``teacher`` into a Radial Network; returns ``(student, history)`` (``student.params`` trained).

    ``start``: a student to continue from. An ordered student with ``mode="radial"`` is warm-started
    by ``RadialModel.to_radial(cfg.radial_push)``: the radial network begins exactly where the ordered
    one is (every router column keeps its meaning), then learns other layers, reuse and exits.
    ``radial_kwargs``: further ``RadialConfig`` fields (capacity_factor, cache_policy, ...).
    ``mesh`` / ``memory`` / ``rules``: sharded step, remat, mixed precision, gradient accumulation
    (``radial_jax.training.pod_steps.distill_step``).
    """
    train = train or TrainConfig()
    if steps is not None:
        train = dataclasses.replace(train, steps=int(steps))
    train = train.with_schedule()
    if data.vocab_size > teacher.config.vocab_size:
        raise ValueError(f"the data's vocabulary ({data.vocab_size}) exceeds the teacher's "
                         f"({teacher.config.vocab_size}); use the data the teacher was trained on")
    student = make_student(teacher, cfg, mode=mode, seed=train.seed, **(radial_kwargs or {}))
    if start is not None:
        if start.radial.ordered and mode == "radial":
            start = start.to_radial(cfg.radial_push, **(radial_kwargs or {}))
        want = jax.tree_util.tree_map(np.shape, student.params)
        if start.radial.mode != mode or jax.tree_util.tree_map(np.shape, start.params) != want:
            raise ValueError(f"cannot continue a {start.radial.mode}-mode student as a {mode}-mode one of this "
                             "teacher (modes, structure or shapes differ); continue from a student of the same "
                             "teacher and router settings")
        student = start
    params = student.params
    trainable = None if cfg.train == "all" else (lambda path: path.startswith("router"))
    tx = make_optimizer(train.optim, trainable=trainable, params=params)
    step_fn, state = distill_step(student, teacher, cfg, tx, params, mesh=mesh, memory=memory, rules=rules,
                                  seed=train.seed)
    dataset = data.dataset(train.seq_len, train.batch_size, seed=train.seed, process_index=jax.process_index(),
                           process_count=jax.process_count())
    windows = data.dataset(train.seq_len, 1, split="eval").all_windows(train.eval_batches * 16)
    eval_fn = make_distill_eval(student, windows, teacher) if len(windows) >= 16 else None
    run_config = {"train": train.to_dict(), "distill": dataclasses.asdict(cfg), "mode": mode,
                  "radial": dataclasses.asdict(student.radial), "model": dataclasses.asdict(teacher.config),
                  "data": data.source}
    state, history = fit(state, step_fn, dataset, train, run_dir=run_dir, run_config=run_config, eval_fn=eval_fn,
                         progress=progress, callbacks=callbacks, desc=f"distill-{mode}", mesh=mesh)
    return student.replace(params=to_host(state.params)), history

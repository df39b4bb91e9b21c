"""The training loop shared by LM training, distillation and joint training.

``fit`` resumes from the newest complete checkpoint in ``run_dir`` (checking
shapes and config), then steps until ``steps`` updates are done: the batch of
each step is ``dataset.batch(state.data_pos)``, so a resumed run continues
exactly. A non-finite loss raises ``NonFiniteLossError`` before anything is
saved for that step (pending saves of good states finish first).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
from tqdm.auto import tqdm

from radial_jax import defaults as D
from radial_jax.training.checkpoint import Checkpointer
from radial_jax.training.metrics import MetricsLogger, to_python
from radial_jax.training.optim import OptimConfig
from radial_jax.training.steps import NonFiniteLossError, debug_checks, global_batch


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of one run; stored in every checkpoint and compared on resume."""

    steps: int = D.TEACHER_STEPS
    batch_size: int = D.BATCH_SIZE  # global batch
    seq_len: int = D.WINDOW
    seed: int = D.SEED
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    checkpoint_every: int = D.CHECKPOINT_EVERY
    keep: int = 2
    keep_best: int = 1
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    log_every: int = 10
    debug: bool = False  # chex shape / finiteness checks after every step

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_schedule(self) -> "TrainConfig":
        """The optimiser's cosine spans the run (``decay_steps = steps``) unless set otherwise."""
        return dataclasses.replace(self, optim=dataclasses.replace(self.optim, decay_steps=self.steps))


def fit(state, step_fn: Callable, dataset, cfg: TrainConfig, *, run_dir: Optional[Path] = None,
        run_config: Optional[dict] = None, eval_fn: Optional[Callable] = None, mesh=None,
        callbacks: Sequence[Callable] = (), progress: bool = True, desc: str = "train",
        async_checkpoints: bool = True):
    """Run ``step_fn`` until ``cfg.steps`` updates; returns ``(state, history)``.

    Args:
      state: a fresh ``TrainState`` (template for restoring; placed/sharded as the step expects).
      step_fn: ``(state, batch) -> (state, metrics)`` from ``make_train_step``.
      dataset: a ``PackedDataset`` (``.batch(position)`` gives this process's rows).
      run_dir: checkpoints (``run_dir/checkpoints``) and metrics (``run_dir/metrics.jsonl``, TensorBoard).
      run_config: JSON-able dict stored with checkpoints and compared on resume (default: ``cfg``).
      eval_fn: ``params -> metrics dict`` (with ``eval_loss``), run every ``cfg.eval_every`` steps and at the end;
        its result offers the state to the best-by-eval checkpoints.
      mesh: when given, batches become global arrays sharded over ``data`` x ``fsdp``.
      callbacks: ``fn(step, state, metrics)`` after every step (e.g. a test's crash injection).
    """
    run_config = cfg.to_dict() if run_config is None else run_config
    ckpt = logger = None
    history = []
    if run_dir is not None:
        ckpt = Checkpointer(Path(run_dir) / "checkpoints", every=cfg.checkpoint_every, keep=cfg.keep,
                            keep_best=cfg.keep_best, config=run_config, async_save=async_checkpoints)
        state, meta = ckpt.restore(state)
        if meta is not None and progress:
            tqdm.write(f"resumed from step {int(state.step)} (data position {int(state.data_pos)})")
        logger = MetricsLogger(run_dir)
    expected = (dataset.local_batch_size, dataset.seq_len)
    try:
        start = int(state.step)
        bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=not progress or jax.process_index() != 0)
        while int(state.step) < cfg.steps:
            pos = int(state.data_pos)
            rows = dataset.batch(pos)
            batch = global_batch(rows, mesh) if mesh is not None else rows
            old = state
            state, metrics = step_fn(state, batch)
            # a non-finite step returns the old state unchanged (and a donating step has freed ``old``)
            step = int(state.step) + (0 if bool(metrics["finite"]) else 1)
            if not bool(metrics["finite"]):
                raise NonFiniteLossError(step, pos, rows, float(metrics["loss"]))
            if cfg.debug:
                debug_checks(old, state, rows, expected)
            for cb in callbacks:
                cb(step, state, metrics)
            if step % cfg.log_every == 0 or step == cfg.steps:
                row = to_python(metrics)
                history.append({"step": step, **row})
                if logger is not None:
                    logger.log(step, metrics)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            if eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                _evaluate(eval_fn, state, step, logger, ckpt, history)
            if ckpt is not None:
                ckpt.maybe_save(step, state)
            bar.update(1)
        bar.close()
        if eval_fn is not None:
            _evaluate(eval_fn, state, int(state.step), logger, ckpt, history)
        if ckpt is not None and ckpt.latest_step() != int(state.step):
            ckpt.save(int(state.step), state)
    finally:
        if ckpt is not None:
            ckpt.wait()
            ckpt.close()
        if logger is not None:
            logger.close()
    return state, history


def _evaluate(eval_fn, state, step, logger, ckpt, history):
    metrics = {k: float(v) for k, v in eval_fn(state.params).items()}
    history.append({"step": step, "split": "eval", **metrics})
    if logger is not None:
        logger.log(step, metrics, prefix="eval")
    if ckpt is not None and ckpt.best is not None and ckpt.best_metric in metrics:
        ckpt.save_best(step, state, metrics)

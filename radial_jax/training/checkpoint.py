"""A thin wrapper around Orbax ``CheckpointManager`` for training runs.

Layout under ``directory``::

    latest/<step>/   periodic checkpoints, the newest ``keep`` kept (resume from here)
    best/<step>/     the ``keep_best`` best by an eval metric (``best_mode`` min/max)

Each checkpoint holds the ``TrainState`` tree (params, optimiser state, step,
PRNG key data, data position) and a JSON ``meta`` item (the run's config,
metrics). Saving is asynchronous (Orbax writes in a background thread, into a
temporary directory that is renamed only once complete), so a crash during a
save leaves at most a temporary directory, which is never listed as a step
and never restored: the previous checkpoint is used.

Restoring checks, before any array is read, that the stored tree has the
target's structure and shapes (a checkpoint of another model is a clear
``CheckpointMismatchError`` naming the leaves), and that the stored run config
equals the new one (differing fields are named). A checkpoint damaged after it
was written (truncated metadata, zeroed or missing data files, non-finite
parameters) is skipped with a warning naming it, and the newest step that reads
back whole is restored.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import BestN, LatestN

from radial_jax.checkpoints.load import non_finite_leaves
from radial_jax.training.optim import param_path_str


class CheckpointMismatchError(ValueError):
    """The checkpoint does not belong to this model/run (shapes, structure or config differ)."""


class CheckpointUnreadableError(RuntimeError):
    """Every checkpoint of a run is damaged (unreadable files or non-finite parameters)."""


def _flat(tree) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {param_path_str(p): v for p, v in leaves}


def _shape(x):
    return tuple(getattr(x, "shape", np.shape(x)))


def config_diff(saved: dict, current: dict, ignore=()) -> dict:
    """``{field: (saved, current)}`` for fields whose values differ (nested dicts flattened with dots)."""
    def flat(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out
    a, b = flat(saved), flat(current)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in ignore and _norm(a.get(k)) != _norm(b.get(k))}


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def _handlers():
    return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


class Checkpointer:
    """Periodic keep-N checkpoints plus best-by-eval, asynchronous, atomic.

    Args:
      directory: run directory (created).
      every: save a periodic checkpoint every ``every`` steps (``maybe_save``).
      keep: how many periodic checkpoints to keep.
      keep_best: how many best-by-eval checkpoints to keep (0: none).
      best_metric / best_mode: the metric in ``save_best(..., metrics)`` and ``"min"``/``"max"``.
      config: the run's config (a JSON-able dict) stored with every checkpoint and
        compared on restore; fields in ``ignore_fields`` may differ.
      async_save: write in the background (``wait()`` blocks until written).
    """

    def __init__(self, directory, *, every: int = 100, keep: int = 2, keep_best: int = 1,
                 best_metric: str = "eval_loss", best_mode: str = "min", config: Optional[dict] = None,
                 ignore_fields=("log_every", "eval_every", "checkpoint_every", "steps_total_hint"),
                 async_save: bool = True):
        if every < 1 or keep < 1 or keep_best < 0:
            raise ValueError(f"need every >= 1, keep >= 1, keep_best >= 0; got {every}, {keep}, {keep_best}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = Path(os.path.abspath(directory))
        self.every, self.config, self.ignore_fields = every, config or {}, tuple(ignore_fields)
        self.best_metric = best_metric
        self.latest = ocp.CheckpointManager(
            self.directory / "latest",
            options=ocp.CheckpointManagerOptions(preservation_policy=LatestN(n=keep),
                                                 enable_async_checkpointing=async_save, create=True,
                                                 cleanup_tmp_directories=True),
            item_handlers=_handlers())
        self.best = None

        def metric(metrics) -> float:
            return float(metrics[best_metric])
        if keep_best:
            self.best = ocp.CheckpointManager(
                self.directory / "best",
                options=ocp.CheckpointManagerOptions(
                    # the keep_best best (BestN keeps the last n in sorted order: descending when lower is better);
                    # best_fn and best_mode still name the best step (best_step)
                    preservation_policy=BestN(get_metric_fn=metric, reverse=best_mode == "min", n=keep_best,
                                              keep_checkpoints_without_metrics=False),
                    best_fn=metric, best_mode=best_mode, keep_checkpoints_without_metrics=False,
                    enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True),
                item_handlers=_handlers())

    # -- saving ---------------------------------------------------------------------------------------
    def _args(self, state, extra):
        tree = state.as_dict() if hasattr(state, "as_dict") else state
        meta = {"config": self.config, **(extra or {})}
        return ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))

    def save(self, step: int, state, meta: Optional[dict] = None, force: bool = True) -> bool:
        """Save a periodic checkpoint at ``step`` now (asynchronously); a step already saved is kept as is."""
        if int(step) in self.latest.all_steps():
            return False
        return self.latest.save(int(step), args=self._args(state, meta), force=force)

    def maybe_save(self, step: int, state, meta: Optional[dict] = None) -> bool:
        """Save when ``step`` is a multiple of ``every``."""
        if int(step) % self.every:
            return False
        return self.save(step, state, meta)

    def save_best(self, step: int, state, metrics: dict) -> bool:
        """Offer ``state`` to the best-by-eval set with ``metrics[best_metric]``."""
        if self.best is None:
            return False
        if self.best_metric not in metrics:
            raise ValueError(f"save_best needs metric {self.best_metric!r}; got {sorted(metrics)}")
        metrics = {k: float(v) for k, v in metrics.items()}
        if int(step) in self.best.all_steps():
            return False
        return self.best.save(int(step), args=self._args(state, {"metrics": metrics}), metrics=metrics, force=True)

    def wait(self):
        self.latest.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self):
        self.latest.close()
        if self.best is not None:
            self.best.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- restoring ------------------------------------------------------------------------------------
    def latest_step(self) -> Optional[int]:
        """Newest *complete* periodic checkpoint (interrupted saves are never listed)."""
        self.latest.reload()
        return self.latest.latest_step()

    def best_step(self) -> Optional[int]:
        if self.best is None:
            return None
        self.best.reload()
        return self.best.best_step()

    def _check(self, manager, step, target_tree):
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        stored = manager.item_metadata(step)["state"]
        stored_flat = {k: _shape(v) for k, v in _flat(stored.tree if hasattr(stored, "tree") else stored).items()}
        target_flat = {k: _shape(v) for k, v in _flat(target_tree).items()}
        missing = sorted(set(target_flat) - set(stored_flat))
        extra = sorted(set(stored_flat) - set(target_flat))
        wrong = sorted(k for k in set(target_flat) & set(stored_flat) if stored_flat[k] != target_flat[k])
        if missing or extra or wrong:
            lines = [f"checkpoint {manager.directory}/{step} does not match this model/state:"]
            for k in wrong[:8]:
                lines.append(f"  {k}: stored shape {stored_flat[k]}, expected {target_flat[k]}")
            if missing:
                lines.append(f"  missing in checkpoint: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
            if extra:
                lines.append(f"  not in this model: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
            raise CheckpointMismatchError("\n".join(lines))
        diff = config_diff(meta.get("config", {}), self.config, self.ignore_fields)
        if diff:
            fields = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise CheckpointMismatchError(
                f"cannot resume from {manager.directory}/{step}: the run config differs in {sorted(diff)} "
                f"({fields}). Use the original settings or a new directory.")
        return meta

    def restore(self, state, step: Optional[int] = None, which: str = "latest"):
        """``(state, meta)`` from checkpoint ``step`` (default: the newest / the best), or ``(state, None)``
        when there is none. ``state`` is the template (a freshly created ``TrainState``); its shardings
        are used for the restored arrays."""
        if which not in ("latest", "best"):
            raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
        manager = self.latest if which == "latest" else self.best
        if manager is None:
            raise ValueError("this Checkpointer keeps no best checkpoints (keep_best=0)")
        manager.reload()
        if step is not None:
            if step not in manager.all_steps():
                raise ValueError(f"no checkpoint at step {step} in {manager.directory}; have {manager.all_steps()}")
            return self._restore_step(manager, state, step)
        first = manager.latest_step() if which == "latest" else manager.best_step()
        if first is None:
            return state, None
        # the newest (or best) first, then every older step: a checkpoint damaged after it was written (a
        # truncated file, zeroed data) is skipped with a warning naming it, and the run resumes from the newest
        # one that reads back whole; a checkpoint of another run or model is an error, never skipped
        candidates = [first] + sorted((s for s in manager.all_steps() if s != first), reverse=True)
        failures = []
        for step in candidates:
            try:
                restored = self._restore_step(manager, state, step)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 -- any read error of a damaged checkpoint: try the previous one
                failures.append(f"{manager.directory}/{step}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            if failures:
                warnings.warn("skipped unreadable checkpoint(s): " + "; ".join(failures)
                              + f"; restored step {step} instead", stacklevel=2)
            return restored
        raise CheckpointUnreadableError(f"no checkpoint in {manager.directory} reads back whole (tried "
                                        f"{len(candidates)}): " + "; ".join(failures)
                                        + ". Remove the damaged step folders or start in a new directory.")

    def _restore_step(self, manager, state, step: int):
        tree = state.as_dict() if hasattr(state, "as_dict") else state
        meta = self._check(manager, step, tree)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        bad = non_finite_leaves(restored)
        if bad:
            raise FloatingPointError(f"non-finite values in {bad[:4]}{' ...' if len(bad) > 4 else ''}")
        new = state.replace_from_dict(restored) if hasattr(state, "replace_from_dict") else restored
        return new, meta

"""Teacher targets computed once and cached: what distillation needs from a frozen teacher.

On a real model the teacher's forward is a third of a distillation step and its LM head (262k words
for Gemma) most of that. Every student distilled from the same windows needs the same targets, so
they are computed once per window and saved (a few MB):

* ``positions[n, p]``: the ``p`` positions of each window whose next-token distribution is matched
  (a fixed random subset: the student's head then runs on ``p`` positions, not all ``t``);
* ``top_ids[n, p, k]`` / ``top_logp[n, p, k]``: the teacher's ``k`` most likely next tokens there
  and their log-probabilities under the full softmax (so ``exp(top_logp).sum(-1)`` is the mass the
  cached targets cover);
* ``keep[n, L, t]``: the layer oracle's keep labels (docs/design.md §3 per layer, *propagate* cache,
  every token admitted) that supervise an ordered router; with ``keep_first=True`` the window's
  first token (a BOS attention sink: its ratios are tiny, and skipping it moves every token's
  context) keeps every layer.

``sparse_kl`` is the distillation loss against them: KL from the teacher's distribution restricted
to its top ``k`` (renormalised) to the student's full softmax.
"""
from __future__ import annotations

import dataclasses
import io
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from radial_jax.radial import RadialModel
from radial_jax.reporting.files import atomic_write_bytes

FIELDS = ("ids", "positions", "top_ids", "top_logp", "keep")


@dataclasses.dataclass(frozen=True)
class TeacherTargets:
    ids: np.ndarray  # int32 [n, t]: the windows
    positions: np.ndarray  # int32 [n, p]: positions whose next token is matched (each < t - 1)
    top_ids: np.ndarray  # int32 [n, p, k]
    top_logp: np.ndarray  # float32 [n, p, k]: teacher log-probabilities (full softmax, temperature 1)
    keep: np.ndarray  # bool [n, L, t]: layer-oracle keep labels
    threshold: float  # the oracle's threshold

    def __post_init__(self):
        n, t = self.ids.shape
        p, k = self.top_ids.shape[1:]
        want = {"positions": (n, p), "top_ids": (n, p, k), "top_logp": (n, p, k)}
        for name, shape in want.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"teacher targets: {name} has shape {getattr(self, name).shape}, expected {shape}")
        if self.keep.ndim != 3 or self.keep.shape[0] != n or self.keep.shape[2] != t:
            raise ValueError(f"teacher targets: keep has shape {self.keep.shape}, expected ({n}, layers, {t})")
        if self.positions.size and not (0 <= self.positions.min() and self.positions.max() < t - 1):
            raise ValueError(f"teacher targets: positions must lie in [0, {t - 1}) (each predicts the next token)")

    @property
    def num_windows(self) -> int:
        return self.ids.shape[0]

    @property
    def coverage(self) -> float:
        """Mean teacher probability mass of the cached top-k tokens."""
        return float(np.exp(self.top_logp.astype(np.float64)).sum(-1).mean())

    def save(self, path) -> Path:
        buf = io.BytesIO()
        np.savez(buf, threshold=np.float64(self.threshold), **{f: getattr(self, f) for f in FIELDS})
        return atomic_write_bytes(path, buf.getvalue())

    @staticmethod
    def load(path) -> "TeacherTargets":
        try:
            with np.load(path) as z:
                arrays = {f: z[f] for f in z.files}
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"cannot read teacher targets from {path}: {e}") from e
        missing = [f for f in FIELDS + ("threshold",) if f not in arrays]
        if missing:
            raise ValueError(f"{path} is not a teacher-targets file: it lacks {missing}")
        return TeacherTargets(threshold=float(arrays["threshold"]), **{f: arrays[f] for f in FIELDS})

    def batch(self, rows) -> dict:
        return {f: getattr(self, f)[rows] for f in FIELDS}


def sample_positions(n: int, t: int, p: int, seed: int = 0) -> np.ndarray:
    """``[n, min(p, t - 1)]`` sorted distinct positions per window in ``[0, t - 1)``, seeded."""
    if t < 2 or p < 1:
        raise ValueError(f"need windows of >= 2 tokens and >= 1 position each, got t={t}, p={p}")
    p = min(p, t - 1)
    rng = np.random.default_rng(seed)
    return np.sort(np.stack([rng.choice(t - 1, p, replace=False) for _ in range(n)]), -1).astype(np.int32)


def compute_targets(teacher, windows_nt, *, top_k: int = 64, positions: int = 64, oracle_threshold: float = 0.15,
                    keep_first: bool = True, batch_size: int = 4, seed: int = 0, progress: bool = True
                    ) -> TeacherTargets:
    """The targets of ``teacher`` (an ``rj.Model``) on ``windows_nt`` (see the module docstring)."""
    windows_nt = np.asarray(windows_nt, np.int32)
    if windows_nt.ndim != 2:
        raise ValueError(f"windows must be [n, t] token ids, got shape {windows_nt.shape}")
    n, t = windows_nt.shape
    if not 1 <= top_k <= teacher.config.vocab_size:
        raise ValueError(f"top_k must be in [1, {teacher.config.vocab_size}], got {top_k}")
    if not 0 < oracle_threshold < 1:
        raise ValueError(f"oracle_threshold must be in (0, 1), got {oracle_threshold}")
    pos_np = sample_positions(n, t, positions, seed)
    oracle = RadialModel.from_sequential(teacher, mode="ordered", routing="oracle", cache_policy="propagate",
                                         capacity_factor=1.0, dispatch="token", prefill_buckets=1)
    module, omodule = teacher.module, oracle.module

    @jax.jit
    def targets(params, oparams, ids_bt, pos_bp):
        hidden = module.apply({"params": params}, ids_bt, compute_logits=False).hidden
        picked = jnp.take_along_axis(hidden, pos_bp[..., None], 1)
        logp = jax.nn.log_softmax(module.apply({"params": params}, picked, method="logits"), -1)
        top_logp, top_ids = jax.lax.top_k(logp, top_k)
        keep = omodule.apply({"params": oparams}, ids_bt, threshold=jnp.float32(oracle_threshold),
                             compute_logits=False).router.processed  # [L, b, t]
        return top_ids.astype(jnp.int32), top_logp, jnp.swapaxes(keep, 0, 1)

    parts = []
    for i in tqdm(range(0, n, batch_size), desc="teacher targets", unit="batch", disable=not progress):
        parts.append(jax.device_get(targets(teacher.params, oracle.params, windows_nt[i:i + batch_size],
                                            pos_np[i:i + batch_size])))
    top_ids, top_logp, keep = (np.concatenate([p[j] for p in parts]) for j in range(3))
    keep = keep.astype(bool)
    if keep_first:
        keep[:, :, 0] = True
    return TeacherTargets(windows_nt, pos_np, top_ids, top_logp.astype(np.float32), keep, float(oracle_threshold))


def sparse_kl(student_logits_bpv, top_ids_bpk, top_logp_bpk, temperature: float = 1.0):
    """``T^2 KL(p_k || q)`` per position, mean over positions: ``p_k`` the teacher's top ``k`` renormalised
    (at temperature ``T``), ``q`` the student's full softmax at ``T``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t_logp = jax.nn.log_softmax(top_logp_bpk.astype(jnp.float32) / temperature, -1)
    s_logp = jax.nn.log_softmax(student_logits_bpv.astype(jnp.float32) / temperature, -1)
    s_top = jnp.take_along_axis(s_logp, top_ids_bpk, -1)
    return temperature ** 2 * jnp.mean(jnp.sum(jnp.exp(t_logp) * (t_logp - s_top), -1))


class TargetBatches:
    """Batches of cached targets for ``radial_jax.training.loop.fit``: ``batch(position)`` is a dict of the
    rows of one batch; each epoch visits every window once in a seeded order."""

    def __init__(self, targets: TeacherTargets, batch_size: int, seed: int = 0):
        if not 1 <= batch_size <= targets.num_windows:
            raise ValueError(f"batch_size must be in [1, {targets.num_windows}] (the cached windows), "
                             f"got {batch_size}")
        self.targets, self.local_batch_size, self.seed = targets, batch_size, seed
        self.seq_len = targets.ids.shape[1]
        self.batches_per_epoch = targets.num_windows // batch_size

    def batch(self, position: int) -> dict:
        epoch, i = divmod(int(position), self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.targets.num_windows)
        return self.targets.batch(order[i * self.local_batch_size:(i + 1) * self.local_batch_size])

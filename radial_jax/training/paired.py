"""Telling two models apart on the same held-out windows: per-window losses and paired bootstrap intervals.

Two models scored on the same windows differ less from window to window than either's perplexity
does: a *paired* bootstrap resamples windows (with replacement) and recomputes both models' perplexity
on the same resample, so the interval of their ratio reflects only how much the difference depends on
the text. The ratio's 95 % interval excluding 1 is what "A beats B on this text" means here.

``window_nll(model, windows)`` scores every token of a whole window but its first (as
``radial_jax.data.eval_windows`` and the pipeline do) and returns per-window sums, so windows of any
model (sequential, layers dropped, oracle thresholds, routed students) line up for the pairing.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from radial_jax.models.perplexity import token_nll


def window_nll(model, windows_nt: np.ndarray, batch_size: int = 4, *, forward_kwargs=None,
               on_output: Optional[Callable] = None, progress: bool = False,
               desc: str = "score") -> Tuple[np.ndarray, np.ndarray]:
    """``(nll_sum[n], scored[n])``: each window's summed next-token NLL and its number of scored tokens.

    ``model`` is a ``Model`` (``forward_kwargs`` go to its forward, e.g. ``threshold=`` for the block
    oracle; ``on_output(output)`` sees each batch's whole ``ModelOutput``, e.g. to count kept blocks) or
    a callable ``ids[b, t] -> logits[b, t, vocab]``."""
    windows_nt = np.asarray(windows_nt)
    if windows_nt.ndim != 2 or windows_nt.shape[0] < 1 or windows_nt.shape[1] < 2:
        raise ValueError(f"windows must be [n >= 1, t >= 2] token ids, got shape {windows_nt.shape}")
    summed = jax.jit(lambda logits, ids: token_nll(logits, ids).sum(-1))
    sums = []
    for i in tqdm(range(0, len(windows_nt), batch_size), desc=desc, unit="batch", disable=not progress,
                  leave=False):
        ids = jnp.asarray(windows_nt[i:i + batch_size])
        if hasattr(model, "forward"):
            out = model.forward(ids, **(forward_kwargs or {}))
            if on_output is not None:
                on_output(out)
            logits = out.logits
        else:
            logits = model(ids)
        sums.append(np.asarray(summed(logits, ids), np.float64))
    nll = np.concatenate(sums)
    return nll, np.full(len(nll), windows_nt.shape[1] - 1, np.float64)


def paired_bootstrap(base: Tuple[np.ndarray, np.ndarray], other: Tuple[np.ndarray, np.ndarray],
                     reps: int = 2000, seed: int = 0, level: float = 0.95) -> Dict[str, float]:
    """Perplexity ratio ``other / base`` on the same windows, with its paired bootstrap interval.

    Returns ``ratio`` (on all windows), ``low`` and ``high`` (the ``level`` percentile interval over
    ``reps`` resamples of the windows) and ``p_other_better`` (the share of resamples where ``other``
    has the lower perplexity)."""
    (nb, cb), (no, co) = (tuple(np.asarray(a, np.float64) for a in pair) for pair in (base, other))
    if nb.shape != no.shape or not np.array_equal(cb, co):
        raise ValueError(f"paired windows differ: {nb.shape} vs {no.shape} windows, or other scored tokens")
    if reps < 100 or not 0 < level < 1:
        raise ValueError(f"need reps >= 100 and level in (0, 1), got reps={reps}, level={level}")
    idx = np.random.default_rng(seed).integers(0, len(nb), size=(reps, len(nb)))
    log_ratio = (no[idx].sum(1) - nb[idx].sum(1)) / cb[idx].sum(1)
    tail = (1 - level) / 2 * 100
    return {"ratio": float(np.exp((no.sum() - nb.sum()) / cb.sum())),
            "low": float(np.exp(np.percentile(log_ratio, tail))),
            "high": float(np.exp(np.percentile(log_ratio, 100 - tail))),
            "p_other_better": float(np.mean(log_ratio < 0)), "windows": int(len(nb)), "reps": int(reps)}

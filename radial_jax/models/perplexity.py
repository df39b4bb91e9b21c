"""How well a language model predicts text: per-token NLL, next-token cross-entropy, perplexity, and the one
accumulator of token-weighted means over batches that evaluation, training-time evaluation, distillation and
the oracle simulation share.

Shapes: ``b`` batch, ``t`` tokens, ``v`` vocabulary. A ``mask_bt`` is true for tokens that count.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def token_nll(logits_btv, ids_bt):
    """``nll[b, j]`` of token ``j`` predicted from position ``j - 1``, in float32 (``nll[:, 0] = 0``:
    nothing in the window predicts its first token)."""
    logp = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32), axis=-1)
    nll_bt = -jnp.take_along_axis(logp, ids_bt[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(nll_bt, ((0, 0), (1, 0)))


def lm_cross_entropy(logits_btv, ids_bt, mask_bt=None):
    """Next-token cross-entropy: ``logits[:, i]`` predicts ``ids[:, i+1]``.

    A target counts when both it and its input are valid. Returns ``(mean loss, n_targets)``; no target
    gives a loss of 0, never NaN.
    """
    m = jnp.ones(ids_bt.shape, jnp.float32) if mask_bt is None else mask_bt.astype(jnp.float32)
    m = m[:, 1:] * m[:, :-1]
    n = jnp.sum(m)
    return jnp.sum(token_nll(logits_btv, ids_bt)[:, 1:] * m) / jnp.maximum(n, 1.0), n


def perplexity(nll_sum, n_tokens) -> float:
    """``exp(nll_sum / n_tokens)`` in float64, the one perplexity of simulation, evaluation and the
    pipeline; ``inf`` (not an overflow warning) when a model with no layers left overflows it."""
    if not n_tokens > 0:
        raise ValueError(f"perplexity needs at least one scored token, got {n_tokens}")
    with np.errstate(over="ignore"):
        return float(np.exp(np.float64(nll_sum) / np.float64(n_tokens)))


class TokenWeighted:
    """Token-weighted means over batches: ``add(n, name=batch_mean, ...)`` for each batch of ``n`` counted
    tokens (or ``add(n, sums={name: batch_total})``), then ``mean(name)`` and ``perplexity("nll")``.

    Every figure a batch contributes is weighted by its token count, so a last, smaller batch counts for
    what it holds."""

    def __init__(self):
        self.count = 0.0
        self.sums = {}

    def add(self, n, *, sums=None, **means) -> None:
        n = float(n)
        self.count += n
        for name, value in (sums or {}).items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        for name, value in means.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value) * n

    def mean(self, name: str) -> float:
        if not self.count > 0:
            raise ValueError(f"no token was counted, so {name} has no mean")
        return self.sums[name] / self.count

    def perplexity(self, name: str = "nll") -> float:
        return perplexity(self.sums.get(name, 0.0), self.count)

"""Teacher-forced decoding of a Radial Network: prefill, then one ``decode_step`` per later token.

``decode_tokens`` exists to check that the parallel forward and incremental
decoding agree (docs/design.md §4: training == serving) and to benchmark
decoding; new text comes from ``RadialModel.generate``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from radial_jax.radial.model import RadialModel


def decode_tokens(rm: RadialModel, ids_bt, prompt_len: int, attention_mask=None):
    """Prefill ``ids[:, :prompt_len]`` then decode the rest token by token (teacher forcing).

    ``attention_mask`` (right padding only: a row's tokens are slots ``0 .. len - 1``) marks
    real tokens; a row's later slots are fed with ``live = False``.
    Returns ``(logits[b, t, vocab], choice[S, b, t], gate[S, b, t], cache)``.
    """
    b, t = ids_bt.shape
    if not 1 <= prompt_len <= t:
        raise ValueError(f"prompt_len must be in [1, {t}], got {prompt_len}")
    mask = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    return _teacher_forced(rm.module, rm.params, jnp.asarray(ids_bt), mask, prompt_len=int(prompt_len))


@functools.partial(jax.jit, static_argnames=("module", "prompt_len"))
def _teacher_forced(module, params, ids, mask, *, prompt_len: int):
    b, t = ids.shape
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    pre = module.apply({"params": params}, ids[:, :prompt_len], mask[:, :prompt_len],
                       positions_bt=slots[:, :prompt_len], cache=module.init_cache(b, t))

    def body(cache, i):
        out = module.apply({"params": params}, ids[:, i], slots[:, i], cache, mask[:, i], method="decode_step")
        return out.cache, (out.logits[:, 0], out.router.choice[:, :, 0], out.router.gate[:, :, 0])

    cache, (lg, ch, gt) = jax.lax.scan(body, pre.cache, jnp.arange(prompt_len, t))
    logits = jnp.concatenate([pre.logits, jnp.moveaxis(lg, 0, 1)], axis=1)
    choice = jnp.concatenate([pre.router.choice, jnp.moveaxis(ch, 0, 2)], axis=2)
    gate = jnp.concatenate([pre.router.gate, jnp.moveaxis(gt, 0, 2)], axis=2)
    return logits, choice, gate, cache

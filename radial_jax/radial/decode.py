"""Teacher-forced decoding of a Radial Network: prefill, then one decode step per later token.

``decode_tokens`` checks that the parallel forward and incremental decoding agree
(docs/design.md §4: training == serving). It runs what ``generate`` runs: the
network's ``decoding()`` (the inference layout) through ``serving.decoding``'s one
prefill and one decode loop, fed the given tokens instead of its own. New text
comes from ``RadialModel.generate``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from radial_jax.radial.model import RadialModel
from radial_jax.serving.decoding import Decoding, decode_loop, greedy, prefill


def decode_tokens(rm: RadialModel, ids_bt, prompt_len: int):
    """Prefill ``ids[:, :prompt_len]`` then decode the rest token by token (teacher forcing).

    Returns ``(logits[b, t, vocab], choice[S, b, t], gate[S, b, t], cache)``: the prompt's from the prefill,
    the later tokens' from their decode steps.
    """
    b, t = ids_bt.shape
    if not 1 <= prompt_len <= t:
        raise ValueError(f"prompt_len must be in [1, {t}], got {prompt_len}")
    rm.check_inputs(ids_bt)
    return _teacher_forced(rm.decoding(), rm.params, jnp.asarray(ids_bt, jnp.int32), prompt_len=int(prompt_len))


@functools.partial(jax.jit, static_argnames=("decoding", "prompt_len"))
def _teacher_forced(decoding: Decoding, params, ids_bt, *, prompt_len: int):
    b, t = ids_bt.shape
    params = decoding.prepare(params)
    logits, cache, pre = prefill(decoding, params, ids_bt[:, :prompt_len], jnp.ones((b, prompt_len), bool),
                                 decoding.init_cache(b, t), all_logits=True)
    router = pre["router"]
    if prompt_len == t:
        return logits, router.choice, router.gate, cache
    cache, rec = decode_loop(decoding, params, cache, None, jnp.full((b,), prompt_len, jnp.int32),
                             jnp.zeros((b,), bool), steps=t - prompt_len, choose=greedy, feed_bn=ids_bt[:, prompt_len:],
                             record=("router",), output_logits=True)
    steps = rec["router"]  # leaves [n, S, b, ...]
    logits = jnp.concatenate([logits, jnp.swapaxes(rec["logits"], 0, 1)], axis=1)
    choice = jnp.concatenate([router.choice, jnp.moveaxis(steps.choice, 0, 2)], axis=2)
    gate = jnp.concatenate([router.gate, jnp.moveaxis(steps.gate, 0, 2)], axis=2)
    return logits, choice, gate, cache

"""Causal batched decoding with a Radial Network over the global KV cache.

``decode_tokens`` teacher-forces a given sequence: prefill of the first
``prompt_len`` tokens (parallel forward) then one ``decode_step`` per later token,
inside one compiled ``lax.scan``. It exists to check that the parallel forward and
incremental decoding agree, and to benchmark decoding. ``generate_greedy`` decodes
new tokens greedily (no padding: every row has the same prompt length).
Every row advances one token per step; no row waits for another beyond the static
step bound ``S`` of each token.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from radial_jax.radial.network import RadialModel


def _apply(rm: RadialModel, *args, **kwargs):
    return rm.module.apply({"params": rm.params}, *args, **kwargs)


def decode_tokens(rm: RadialModel, ids_bt, prompt_len: int):
    """Prefill ``ids[:, :prompt_len]`` then decode the rest token by token (teacher forcing).

    Returns ``(logits[b, t, vocab], choice[S, b, t], gate[S, b, t], cache)``.
    """
    b, t = ids_bt.shape
    if not 1 <= prompt_len <= t:
        raise ValueError(f"prompt_len must be in [1, {t}], got {prompt_len}")

    @jax.jit
    def run(params, ids):
        rm_ = RadialModel(rm.config, rm.radial, params, rm.dtype)
        slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        pre = _apply(rm_, ids[:, :prompt_len], positions_bt=slots[:, :prompt_len], cache=rm_.init_cache(b, t))

        def body(cache, i):
            out = _apply(rm_, ids[:, i], slots[:, i], cache, method="decode_step")
            return out.cache, (out.logits[:, 0], out.router.choice[:, :, 0], out.router.gate[:, :, 0])

        cache, (lg, ch, gt) = jax.lax.scan(body, pre.cache, jnp.arange(prompt_len, t))
        logits = jnp.concatenate([pre.logits, jnp.moveaxis(lg, 0, 1)], axis=1)
        choice = jnp.concatenate([pre.router.choice, jnp.moveaxis(ch, 0, 2)], axis=2)
        gate = jnp.concatenate([pre.router.gate, jnp.moveaxis(gt, 0, 2)], axis=2)
        return logits, choice, gate, cache

    return run(rm.params, jnp.asarray(ids_bt))


def generate_greedy(rm: RadialModel, ids_bt, max_new_tokens: int):
    """Greedy decoding of ``max_new_tokens`` tokens after equal-length prompts.

    Returns ``(tokens[b, max_new_tokens], depth[b, max_new_tokens - 1])``: layer visits of each
    decoded (fed-back) token; the prompt's depths are in the prefill metrics.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    b, t = ids_bt.shape
    total = t + max_new_tokens
    if total > rm.config.max_length:
        raise ValueError(f"prompt {t} + {max_new_tokens} new tokens exceeds {rm.config.max_length} positions")

    @jax.jit
    def run(params, ids):
        rm_ = RadialModel(rm.config, rm.radial, params, rm.dtype)
        slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        pre = _apply(rm_, ids, positions_bt=slots, cache=rm_.init_cache(b, total))
        tok = jnp.argmax(pre.logits[:, -1], -1).astype(jnp.int32)

        def body(state, i):
            cache, tok = state
            out = _apply(rm_, tok, jnp.full((b,), i, jnp.int32), cache, method="decode_step")
            nxt = jnp.argmax(out.logits[:, 0], -1).astype(jnp.int32)
            return (out.cache, nxt), (tok, out.metrics.depth[:, 0])

        (_, last), (fed, depth) = jax.lax.scan(body, (pre.cache, tok), jnp.arange(t, total - 1))
        toks = jnp.concatenate([jnp.moveaxis(fed, 0, 1), last[:, None]], axis=1)
        return toks, jnp.moveaxis(depth, 0, 1)

    return run(rm.params, jnp.asarray(ids_bt))

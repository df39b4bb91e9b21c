"""Autoregressive generation for decoder models (OPT) with the global KV cache.

``generate(model, input_ids, attention_mask, max_new_tokens=...)`` decodes new
tokens for a batch of prompts of different lengths:

1. Prompts may be left- or right-padded (each row's ``attention_mask`` must be
   one contiguous run of ones). They are repacked to *right* padding so that a
   token's cache slot equals its position (``radial_jax.kv_cache``): row ``b``'s
   prompt occupies slots ``0 .. len_b - 1`` and its ``i``-th new token is fed
   back at slot ``len_b + i``. Padding is passed with ``attention_mask`` false,
   so it is never written to the cache nor attended to.
2. Prefill: one jit-compiled forward of the prompts that fills the cache; the
   LM head is applied to each row's last prompt token only.
3. Decode: the whole loop is one ``lax.while_loop`` inside the same compiled
   function (no Python loop per token). Each step feeds every row's last token
   at its own slot; a row that emits an end-of-sequence token stops (later
   columns get ``pad_token_id``) and the loop ends as soon as every row has
   stopped or ``max_new_tokens`` are out.

Token choice: greedy (``do_sample=False``, argmax) or sampling from
``softmax(logits / temperature)`` restricted by ``top_k`` then ``top_p``
(nucleus, the same order and tie rules as transformers' warpers), with an
explicit PRNG key; step ``i`` uses ``jax.random.fold_in(rng, i)``, so the same
key gives the same tokens.

The result follows transformers' layout: ``[b, prompt_width + max_new_tokens]``,
the prompt exactly as given (with its padding) followed by the new tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from radial_jax.kv_cache import KVCache


@dataclasses.dataclass
class GenerationOutput:
    """What ``generate(..., return_output=True)`` returns (numpy arrays).

    sequences: ``[b, prompt_width + max_new_tokens]``, prompt as given then new tokens.
    new_tokens: ``[b, max_new_tokens]``, ``pad_token_id`` after a row stopped.
    num_new: ``[b]`` tokens generated per row (an end-of-sequence token included).
    finished: ``[b]`` whether the row stopped at an end-of-sequence token.
    prompt_lengths: ``[b]`` unpadded prompt lengths.
    logits: ``[b, max_new_tokens, vocab]`` float32 raw logits that chose each new token
      (before temperature/top-k/top-p; zeros after a row stopped), only with ``output_logits=True``.
    """

    sequences: np.ndarray
    new_tokens: np.ndarray
    num_new: np.ndarray
    finished: np.ndarray
    prompt_lengths: np.ndarray
    logits: Optional[np.ndarray] = None


# --------------------------------------------------------------------------- validation

def _prompt_lengths(attention_mask_bt: np.ndarray) -> tuple:
    """``(start_b, length_b)`` of each row's one contiguous run of ones; ValueError otherwise."""
    m = attention_mask_bt.astype(bool)
    lengths = m.sum(axis=1)
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        raise ValueError(f"attention_mask rows {empty.tolist()} have no tokens; every prompt needs at least one")
    starts = m.argmax(axis=1)
    ends = m.shape[1] - m[:, ::-1].argmax(axis=1)  # one past the last one
    bad = np.flatnonzero(ends - starts != lengths)
    if bad.size:
        raise ValueError(
            f"attention_mask rows {bad.tolist()} are not contiguous (e.g. row {bad[0]}: "
            f"{m[bad[0]].astype(int).tolist()}); allowed: one run of ones, left or right padded")
    return starts, lengths


def _check_sampling(do_sample, temperature, top_k, top_p, rng, vocab_size):
    if not do_sample:
        return None
    if rng is None:
        raise ValueError("do_sample=True needs an explicit PRNG key: rng=jax.random.key(seed)")
    if not isinstance(temperature, numbers.Real) or not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
            raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
        top_k = int(min(top_k, vocab_size))
    if top_p is not None:
        if not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    return top_k


def _as_key(rng):
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    if rng.shape == (2,) and rng.dtype == jnp.uint32:
        return jax.random.wrap_key_data(rng)
    raise ValueError(f"rng must be a jax PRNG key (jax.random.key(seed)), got {rng.dtype}{tuple(rng.shape)}")


# --------------------------------------------------------------------------- token choice

def warp_logits(logits_bv, *, temperature=1.0, top_k: Optional[int] = None, top_p=None):
    """Sampling logits ``[b, vocab]``: divided by ``temperature``, then top-k, then top-p filtered.

    Filtered tokens get ``-inf``. ``top_k`` is static; ``temperature`` and
    ``top_p`` may be traced scalars. Top-k keeps every token tied with the k-th
    largest; top-p keeps the smallest set of most likely tokens whose mass
    reaches ``top_p`` (at least one), as transformers' ``TemperatureLogitsWarper``,
    ``TopKLogitsWarper`` and ``TopPLogitsWarper`` do, in that order.
    """
    logits_bv = logits_bv.astype(jnp.float32) / temperature
    if top_k is not None:
        kth_b1 = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)
    if top_p is not None:
        sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]  # descending
        probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
        mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
        keep_bv = (mass_before_bv < top_p).at[:, 0].set(True)
        cutoff_b1 = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
        logits_bv = jnp.where(logits_bv < cutoff_b1, -jnp.inf, logits_bv)
    return logits_bv


def sample_logits(logits_bv, key, *, do_sample: bool, temperature=1.0, top_k: Optional[int] = None,
                  top_p=None):
    """Next token ``[b]`` from logits ``[b, vocab]``: argmax, or a draw from ``warp_logits``."""
    if not do_sample:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    warped_bv = warp_logits(logits_bv, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, warped_bv, axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------- compiled core

def lm_head(module, params, hidden_be):
    """The LM head of ``OPTForCausalLM`` on selected hidden states (same arithmetic as the module).

    Kept next to the module's own head so that prefill computes logits for the
    last prompt token only (``[b, vocab]``, not ``[b, t, vocab]``); the decode-
    equals-forward test checks that both agree.
    """
    c = module.config
    x = hidden_be.astype(module.dtype)
    if c.tie_word_embeddings:
        w_ve = params["embed_tokens"]["embedding"].astype(module.dtype)
        return jnp.dot(x, w_ve.T).astype(jnp.float32)
    w_ev = params["lm_head"]["kernel"].astype(module.dtype)
    return jnp.dot(x, w_ev).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "cache_len", "do_sample", "top_k",
                                                   "output_logits"))
def _generate_core(module, params, ids_bt, lengths_b, rng, temperature, top_p, eos_ids_n, pad_id, *,
                   max_new_tokens: int, cache_len: int, do_sample: bool, top_k: Optional[int],
                   output_logits: bool = False):
    """Prefill + compiled decode loop on right-padded prompts.

    Returns ``(new_tokens [b, n], num_new [b], finished [b], logits [b, n, vocab] or None)``.
    """
    c = module.config
    b, t = ids_bt.shape
    lc = c.layer_config()
    cache = KVCache.create(c.num_layers, b, cache_len, lc.kv_heads, lc.head_dim, module.dtype)
    slots_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid_bt = slots_bt < lengths_b[:, None]
    variables = {"params": params}

    def choose(logits_bv, i):
        key = jax.random.fold_in(rng, i) if do_sample else None
        return sample_logits(logits_bv, key, do_sample=do_sample, temperature=temperature, top_k=top_k,
                             top_p=top_p)

    def is_eos(tok_b):
        return jnp.any(tok_b[:, None] == eos_ids_n[None, :], axis=-1)

    # Prefill: fill the cache, logits of the last prompt token of each row.
    out = module.apply(variables, ids_bt, valid_bt, positions_bt=slots_bt, cache=cache, compute_logits=False)
    last_be = jnp.take_along_axis(out.hidden, (lengths_b - 1)[:, None, None], axis=1)[:, 0]
    logits_bv = lm_head(module, params, last_be)
    tok_b = choose(logits_bv, 0)
    tokens_bn = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok_b)
    logits_bnv = None
    if output_logits:
        logits_bnv = jnp.zeros((b, max_new_tokens, logits_bv.shape[-1]), jnp.float32).at[:, 0].set(logits_bv)
    done_b = is_eos(tok_b)
    num_new_b = jnp.ones((b,), jnp.int32)

    def cond(state):
        i, done_b = state[0], state[4]
        return (i < max_new_tokens) & ~jnp.all(done_b)

    def body(state):
        # Step i feeds token i-1 of each live row at slot len_b + i - 1 and picks token i.
        i, cache, tok_b, tokens_bn, done_b, num_new_b, logits_bnv = state
        live_b = ~done_b
        pos_b1 = (lengths_b + i - 1)[:, None]
        step = module.apply(variables, tok_b[:, None], live_b[:, None], positions_bt=pos_b1, cache=cache)
        new_b = choose(step.logits[:, 0], i)
        new_b = jnp.where(live_b, new_b, pad_id)
        tokens_bn = jax.lax.dynamic_update_slice(tokens_bn, new_b[:, None], (0, i))
        num_new_b = num_new_b + live_b.astype(jnp.int32)
        done_b = done_b | (live_b & is_eos(new_b))
        if output_logits:
            step_logits = jnp.where(live_b[:, None], step.logits[:, 0], 0.0)
            logits_bnv = jax.lax.dynamic_update_slice(logits_bnv, step_logits[:, None], (0, i, 0))
        return i + 1, step.cache, new_b, tokens_bn, done_b, num_new_b, logits_bnv

    state = (jnp.int32(1), out.cache, tok_b, tokens_bn, done_b, num_new_b, logits_bnv)
    _, _, _, tokens_bn, done_b, num_new_b, logits_bnv = jax.lax.while_loop(cond, body, state)
    return tokens_bn, num_new_b, done_b, logits_bnv


# --------------------------------------------------------------------------- public API

def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None, rng=None,
             eos_token_id: Union[None, int, Sequence[int]] = None, pad_token_id: Optional[int] = None,
             max_len: Optional[int] = None, return_output: bool = False, output_logits: bool = False):
    """Generate up to ``max_new_tokens`` tokens after each prompt (see the module docstring).

    Args:
      model: a decoder ``radial_jax.Model`` (``rj.load`` / ``rj.build`` of an OPT config).
      input_ids: ``[b, t]`` integer token ids, left- or right-padded.
      attention_mask: ``[b, t]``, one contiguous run of ones per row (default: all ones).
      max_new_tokens: how many tokens to generate at most (>= 1).
      do_sample: sample instead of greedy argmax; needs ``rng``.
      temperature, top_k, top_p: sampling settings (``temperature > 0``, ``top_k >= 1``,
        ``0 < top_p <= 1``); ignored for greedy decoding.
      rng: a jax PRNG key (``jax.random.key(seed)``), required when sampling.
      eos_token_id: stop token(s); default ``config.eos_token_id``; ``()`` never stops early.
      pad_token_id: fills the columns after a row stopped; default ``config.pad_token_id``.
      max_len: KV cache length (default: longest prompt + ``max_new_tokens``); fixing it
        lets calls with different prompt lengths share one compilation per prompt width.
      return_output: return a ``GenerationOutput`` instead of the sequences alone.
      output_logits: also keep the raw logits of every step (implies ``return_output``).

    Returns:
      ``np.ndarray [b, t + max_new_tokens]`` (int32): the prompts as given, then the new tokens.
    """
    config = model.config
    if not getattr(model, "is_decoder", False):
        raise ValueError(f"generate needs a decoder model (OPT); got {type(config).__name__}")
    from radial_jax.api import check_token_ids
    check_token_ids(config, input_ids)
    ids_bt = np.asarray(input_ids)
    b, t = ids_bt.shape
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    if attention_mask is None:
        mask_bt = np.ones((b, t), bool)
    else:
        mask_bt = np.asarray(attention_mask)
        if mask_bt.shape != (b, t):
            raise ValueError(f"attention_mask shape {mask_bt.shape} differs from input_ids shape {(b, t)}")
    starts_b, lengths_b = _prompt_lengths(mask_bt)
    longest = int(lengths_b.max())
    needed = longest + max_new_tokens
    if needed > config.max_length:
        raise ValueError(
            f"longest prompt {longest} + max_new_tokens {max_new_tokens} = {needed} exceeds the model's "
            f"{config.max_length} positions")
    if max_len is None:
        max_len = needed
    elif max_len < needed:
        raise ValueError(f"max_len {max_len} is too short for the longest prompt {longest} + max_new_tokens "
                         f"{max_new_tokens} = {needed}")
    elif max_len > config.max_length:
        raise ValueError(f"max_len {max_len} exceeds the model's {config.max_length} positions")
    top_k = _check_sampling(do_sample, temperature, top_k, top_p, rng, config.vocab_size)
    key = _as_key(rng) if do_sample else jax.random.key(0)
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    eos_n = np.atleast_1d(np.asarray(eos if eos is not None else (), np.int32)).reshape(-1)
    if eos_n.size == 0:
        eos_n = np.full((1,), -1, np.int32)  # matches no token
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    if pad is None:
        raise ValueError("pad_token_id is needed (the config has none)")

    # Repack to right padding of width `longest`: row b's prompt at slots 0 .. len_b - 1.
    j_t = np.arange(longest)
    src_bt = np.minimum(starts_b[:, None] + j_t[None, :], t - 1)
    ids_r = np.where(j_t[None, :] < lengths_b[:, None], np.take_along_axis(ids_bt, src_bt, axis=1), pad)

    new_bn, num_new_b, finished_b, logits_bnv = _generate_core(
        model.module, model.params, jnp.asarray(ids_r, jnp.int32), jnp.asarray(lengths_b, jnp.int32), key,
        jnp.float32(temperature), None if top_p is None or not do_sample else jnp.float32(top_p),
        jnp.asarray(eos_n), jnp.int32(pad), max_new_tokens=max_new_tokens, cache_len=int(max_len),
        do_sample=bool(do_sample), top_k=top_k if do_sample else None, output_logits=bool(output_logits))
    new_bn = np.asarray(new_bn)
    sequences = np.concatenate([ids_bt.astype(np.int32), new_bn], axis=1)
    if not (return_output or output_logits):
        return sequences
    return GenerationOutput(sequences=sequences, new_tokens=new_bn, num_new=np.asarray(num_new_b),
                            finished=np.asarray(finished_b), prompt_lengths=lengths_b,
                            logits=None if logits_bnv is None else np.asarray(logits_bnv))

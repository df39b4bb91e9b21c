"""Autoregressive generation for language models with the global KV cache: one implementation.

``generate(model, input_ids, attention_mask, max_new_tokens=...)`` decodes new
tokens for a batch of prompts of different lengths:

1. Prompts may be left- or right-padded (each row's ``attention_mask`` must be
   one contiguous run of ones). They are repacked to *right* padding so that a
   token's cache slot equals its position (``radial_jax.models.kv_cache``): row ``b``'s
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

from radial_jax.serving.decoding import Decoding, decode_loop, first_argmax, prefill


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
    depth: ``[b, max_new_tokens]`` layer visits of the forward pass whose logits chose each new
      token (new token 0: the last prompt token in the prefill; 0 after a row stopped).
    step_flops: ``[max_new_tokens]`` FLOPs executed by each decode step (whole batch; entry 0 is 0,
      that token came from the prefill); ``prefill_flops``: FLOPs of the prefill.
    """

    sequences: np.ndarray
    new_tokens: np.ndarray
    num_new: np.ndarray
    finished: np.ndarray
    prompt_lengths: np.ndarray
    logits: Optional[np.ndarray] = None
    depth: Optional[np.ndarray] = None
    step_flops: Optional[np.ndarray] = None
    prefill_flops: Optional[float] = None


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
        return first_argmax(logits_bv)
    warped_bv = warp_logits(logits_bv, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, warped_bv, axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------- compiled core

@functools.partial(jax.jit, static_argnames=("decoding", "max_new_tokens", "cache_len", "do_sample", "top_k",
                                             "output_logits"))
def _generate_core(decoding: Decoding, params, ids_bt, lengths_b, rng, temperature, top_p, eos_ids_n, pad_id, *,
                   max_new_tokens: int, cache_len: int, do_sample: bool, top_k: Optional[int],
                   output_logits: bool = False):
    """Prefill + the decode loop on right-padded prompts.

    Returns ``(new_tokens [b, n], num_new [b], finished [b], logits [b, n, vocab] or None, depth [b, n],
    step_flops [n], prefill_flops)``.
    """
    b, t = ids_bt.shape
    valid_bt = jnp.arange(t, dtype=jnp.int32)[None, :] < lengths_b[:, None]

    def choose(logits_bv, i):
        key = jax.random.fold_in(rng, i) if do_sample else None
        return sample_logits(logits_bv, key, do_sample=do_sample, temperature=temperature, top_k=top_k,
                             top_p=top_p)

    def is_eos(tok_b):
        return jnp.any(tok_b[:, None] == eos_ids_n[None, :], axis=-1)

    params = decoding.prepare(params)
    logits_bv, cache, pre = prefill(decoding, params, ids_bt, valid_bt, decoding.init_cache(b, cache_len))
    tok_b = choose(logits_bv, 0)
    # Step i feeds new token i of each live row at slot len_b + i and picks new token i + 1.
    _, rec = decode_loop(decoding, params, cache, tok_b, lengths_b, is_eos(tok_b), steps=max_new_tokens - 1,
                         choose=lambda out_bv, i: choose(out_bv, i + 1), is_stop=is_eos, pad_id=pad_id,
                         record=("depth", "flops"), output_logits=output_logits)
    ran_bn = jnp.concatenate([jnp.ones((b, 1), bool), rec["live"].T], axis=1)  # new token j was made
    tokens_bn = jnp.where(ran_bn, jnp.concatenate([tok_b[:, None], rec["token"].T], axis=1), pad_id)
    depth_bn = jnp.where(ran_bn, jnp.concatenate([pre["depth"][:, None], rec["depth"].T], axis=1), 0)
    flops_n = jnp.concatenate([jnp.zeros((1,), jnp.float32), rec["flops"]])
    finished_b = jnp.any(ran_bn & is_eos(tokens_bn.reshape(-1)).reshape(b, -1), axis=1)
    logits_bnv = None
    if output_logits:
        logits_bnv = jnp.concatenate([logits_bv[:, None].astype(jnp.float32),
                                      jnp.swapaxes(rec["logits"], 0, 1).astype(jnp.float32)], axis=1)
    return tokens_bn, ran_bn.sum(1, dtype=jnp.int32), finished_b, logits_bnv, depth_bn, flops_n, pre["flops"]


# --------------------------------------------------------------------------- public API

def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None, rng=None,
             eos_token_id: Union[None, int, Sequence[int]] = None, pad_token_id: Optional[int] = None,
             max_len: Optional[int] = None, return_output: bool = False, output_logits: bool = False):
    """Generate up to ``max_new_tokens`` tokens after each prompt (see the module docstring).

    Args:
      model: a language-model bundle: ``radial_jax.Model`` (``rj.load`` / ``rj.build``) or a Radial
        Network's ``RadialModel``; both decode through their ``decoding()`` functions here.
      input_ids: ``[b, t]`` integer token ids, left- or right-padded.
      attention_mask: ``[b, t]``, one contiguous run of ones per row (default: all ones).
      max_new_tokens: how many tokens to generate at most (>= 1).
      do_sample: sample instead of greedy argmax; needs ``rng``.
      temperature, top_k, top_p: sampling settings (``temperature > 0``, ``top_k >= 1``,
        ``0 < top_p <= 1``); ignored for greedy decoding.
      rng: a jax PRNG key (``jax.random.key(seed)``), required when sampling.
      eos_token_id: stop token(s); default ``config.eos_token_id``; ``()`` never stops early.
      pad_token_id: fills the columns after a row stopped; default ``config.pad_token_id``, else the first
        end-of-sequence id.
      max_len: KV cache length (default: longest prompt + ``max_new_tokens``); fixing it
        lets calls with different prompt lengths share one compilation per prompt width.
      return_output: return a ``GenerationOutput`` instead of the sequences alone.
      output_logits: also keep the raw logits of every step (implies ``return_output``).

    Returns:
      ``np.ndarray [b, t + max_new_tokens]`` (int32): the prompts as given, then the new tokens.
    """
    config = model.config
    if not getattr(model, "is_decoder", False):
        raise ValueError(f"generate needs a language model; got {type(config).__name__}")
    model.check_inputs(input_ids, attention_mask)
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
    if pad is None and eos_n[0] >= 0:
        pad = int(eos_n[0])  # as transformers does for configs without one (Llama, Qwen): fills finished rows
    if pad is None:
        raise ValueError("pad_token_id is needed: the config has neither a pad nor an end-of-sequence token; "
                         "pass pad_token_id=")

    # Repack to right padding of width `longest`: row b's prompt at slots 0 .. len_b - 1.
    j_t = np.arange(longest)
    src_bt = np.minimum(starts_b[:, None] + j_t[None, :], t - 1)
    ids_r = np.where(j_t[None, :] < lengths_b[:, None], np.take_along_axis(ids_bt, src_bt, axis=1), pad)

    new_bn, num_new_b, finished_b, logits_bnv, depth_bn, flops_n, prefill_flops = _generate_core(
        model.decoding(), model.params, jnp.asarray(ids_r, jnp.int32), jnp.asarray(lengths_b, jnp.int32), key,
        jnp.float32(temperature), None if top_p is None or not do_sample else jnp.float32(top_p),
        jnp.asarray(eos_n), jnp.int32(pad), max_new_tokens=max_new_tokens, cache_len=int(max_len),
        do_sample=bool(do_sample), top_k=top_k if do_sample else None, output_logits=bool(output_logits))
    new_bn = np.asarray(new_bn)
    sequences = np.concatenate([ids_bt.astype(np.int32), new_bn], axis=1)
    if not (return_output or output_logits):
        return sequences
    return GenerationOutput(sequences=sequences, new_tokens=new_bn, num_new=np.asarray(num_new_b),
                            finished=np.asarray(finished_b), prompt_lengths=lengths_b,
                            logits=None if logits_bnv is None else np.asarray(logits_bnv),
                            depth=np.asarray(depth_bn), step_flops=np.asarray(flops_n),
                            prefill_flops=float(prefill_flops))

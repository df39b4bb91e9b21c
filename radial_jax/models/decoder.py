"""``CausalLM``: the one decoder-only language model module every decoder family uses.

A family config describes its model to this module through ``layer_config()``
(the layers), ``layer_meta()`` (per-layer window and RoPE table) and
``decoder_spec()`` (embedding and head, ``DecoderSpec``); the module owns, as
Flax's gemma example does, ``embed``, the stacked layer pool, ``head`` (final
norm, LM head) and ``init_cache``.

Call modes of ``__call__``:

* parallel (``cache=None``): the whole sequence, any padding. Positions are
  counted over the real tokens (``cumsum(mask) - 1``, as transformers does for
  OPT and for generation), so a left-padded row computes what it computes alone;
  slots (causal order) are the indices.
* cached (``cache`` given): ``positions_bt`` are the cache slots (right padding);
  K/V are written into the global cache and keys read from it. Used by generation.
  ``prefill=True`` says the tokens are a right-padded prompt filling slots ``0 .. t - 1``
  of an empty cache (``init_cache``; positions are then the slots, and not passed): each
  layer attends over its fresh K/V, skipping per block of queries the slots after the
  block, and fills the cache with one slice update.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from radial_jax.models.kv_cache import KVCache
from radial_jax.models.layer import make_norm, normal_init
from radial_jax.models.outputs import ModelOutput
from radial_jax.models.stack import pool_param, run_pool


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """Embedding and head of a decoder family (``config.decoder_spec()``)."""

    embed_dim: int  # width of the token table (OPT-350M: 512, projected to the hidden size)
    embed_scale: Optional[float] = None  # Gemma: token embeddings times sqrt(hidden), in the compute dtype
    position_table: int = 0  # rows of a learned position table (OPT, GPT-2); 0: none (RoPE families)
    position_offset: int = 0  # OPT's learned positions are shifted by 2
    final_norm: bool = True  # a norm (the layers' kind) before the head
    tie_embeddings: bool = True  # the LM head is the token table
    final_logit_softcap: Optional[float] = None  # Gemma 2: tanh(logits / cap) * cap


@flax.struct.dataclass
class HeadOutput:
    logits: Optional[jax.Array]  # [b, t, vocab] float32 (decoders), [b, classes] (ViT classifier) or None
    hidden: jax.Array  # final hidden states, the head's input, [b, t, e]
    pooled: Optional[jax.Array] = None  # ViT pooler output


def check_token_ids(config, input_ids, attention_mask=None, extra_len: int = 0) -> None:
    """ValueError unless ``input_ids`` is ``[batch>=1, 1<=len<=max]`` integers in the vocabulary
    (and ``attention_mask``, if given, has the same shape and holds 0/1 values)."""
    try:
        shape = np.shape(input_ids)
    except ValueError:  # numpy refuses ragged nested lists
        raise ValueError("input_ids must be a rectangular [batch, length] array; its rows have different lengths "
                         "(pad them to one length and pass an attention_mask with 0 on the padding)") from None
    if len(shape) != 2:
        raise ValueError(f"input_ids must be 2-D [batch, length]; got shape {shape}")
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"input_ids is empty (shape {shape}); need at least one sequence of one token")
    if shape[1] + extra_len > config.max_length:
        raise ValueError(
            f"sequence length {shape[1]}{f' + {extra_len} new tokens' if extra_len else ''} exceeds the "
            f"model's {config.max_length} positions")
    ids = np.asarray(input_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got {ids.dtype}")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise ValueError(f"token ids must be in [0, {config.vocab_size}) for this model; got ids in "
                         f"[{ids.min()}, {ids.max()}] (a tokenizer of another model?)")
    if attention_mask is not None:
        mask = np.asarray(attention_mask)
        if mask.shape != shape:
            raise ValueError(f"attention_mask has shape {mask.shape}; it must match input_ids {shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0/1 (or False/True) values")


def hf_positions(attention_mask_bt):
    """Positions over the real tokens: ``cumsum(mask) * mask - 1`` (padding -> -1)."""
    m = attention_mask_bt.astype(jnp.int32)
    return jnp.cumsum(m, axis=1) * m - 1


FEW_TOKENS = (2, 16)  # token counts (inclusive) whose tied LM head runs as one multiply-and-reduce pass on CPU


def few_token_head(hidden_be) -> bool:
    """Whether ``tied_head_few_tokens`` computes the tied head of ``hidden_be`` (static: shape, backend)."""
    n = int(np.prod(hidden_be.shape[:-1]))
    return jax.default_backend() == "cpu" and FEW_TOKENS[0] <= n <= FEW_TOKENS[1]


def tied_head_few_tokens(hidden_be, table_ve, dtype):
    """``hidden @ table.T`` for a few tokens (a decode step's rows), as a product summed over the embedding
    axis: one pass that reads each table row once, for all the tokens.

    XLA's CPU matmul runs a few rows against a large table far below the memory's speed: over Gemma 3's
    262k x 640 table, 52 ms for 4 rows where one row takes 20 ms, and this pass takes 34 ms (8 rows: 59
    against 37 ms; 16: 74 against 58 ms). For one row the matmul is at the memory's speed already.
    """
    h_ne = hidden_be.reshape(-1, hidden_be.shape[-1]).astype(dtype)
    logits_vn = jnp.sum(table_ve.astype(dtype)[:, None, :] * h_ne[None, :, :], axis=-1)
    return logits_vn.T.reshape(hidden_be.shape[:-1] + (table_ve.shape[0],))


class CausalLM(nn.Module):
    """A decoder-only LM over any decoder family's config (see the module docstring)."""

    config: Any
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        c, s, lc = self.config, self.config.decoder_spec(), self.config.layer_config()
        self.embed_tokens = nn.Embed(c.vocab_size, s.embed_dim, dtype=self.dtype,
                                     embedding_init=normal_init(("vocab", "embed")))
        if s.position_table:
            self.embed_positions = nn.Embed(s.position_table, c.hidden_size, dtype=self.dtype,
                                            embedding_init=normal_init((None, "embed")))
        if s.embed_dim != c.hidden_size:
            self.project_in = nn.Dense(c.hidden_size, use_bias=False, dtype=self.dtype,
                                       kernel_init=normal_init((None, "embed")))
            self.project_out = nn.Dense(s.embed_dim, use_bias=False, dtype=self.dtype,
                                        kernel_init=normal_init(("embed", None)))
        self.layers = pool_param(self, lc, c.num_layers, self.dtype)
        if s.final_norm:
            self.final_norm = make_norm(lc, "final_norm")
        if not s.tie_embeddings:
            self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype,
                                    kernel_init=normal_init(("embed", "vocab")))

    # -- the family protocol ----------------------------------------------------------------------
    @staticmethod
    def example_inputs(config, batch: int = 1, length: int = 8) -> tuple:
        return (jnp.zeros((batch, length), jnp.int32),)

    @staticmethod
    def check_inputs(config, input_ids, attention_mask=None) -> None:
        check_token_ids(config, input_ids, attention_mask)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        lc = self.config.layer_config()
        return KVCache.create(self.config.num_layers, batch, max_len, lc.kv_heads, lc.head_size, self.dtype)

    def embed(self, ids_bt, positions_bt=None):
        """The residual stream entering layer 0, ``[b, t, e]``."""
        s = self.config.decoder_spec()
        x = self.embed_tokens(ids_bt)
        if s.embed_scale is not None:
            x = x * jnp.asarray(s.embed_scale, self.dtype)
        if s.embed_dim != self.config.hidden_size:
            x = self.project_in(x)
        if s.position_table:
            if positions_bt is None:
                raise ValueError("this family has learned positions: embed needs positions_bt")
            x = x + self.embed_positions(jnp.maximum(positions_bt, -s.position_offset) + s.position_offset)
        return x

    def final(self, x_bte):
        """Final norm (and OPT-350M's projection): the hidden states the LM head reads."""
        s = self.config.decoder_spec()
        if s.final_norm:
            x_bte = self.final_norm(x_bte).astype(self.dtype)
        if s.embed_dim != self.config.hidden_size:
            x_bte = self.project_out(x_bte)
        return x_bte

    def logits(self, hidden_be):
        """The LM head on final hidden states ``[..., e]`` -> float32 ``[..., vocab]``."""
        s = self.config.decoder_spec()
        if s.tie_embeddings and few_token_head(hidden_be):
            logits = tied_head_few_tokens(hidden_be, self.embed_tokens.embedding, self.dtype)
        elif s.tie_embeddings:
            logits = self.embed_tokens.attend(hidden_be)
        else:
            logits = self.lm_head(hidden_be)
        logits = logits.astype(jnp.float32)
        if s.final_logit_softcap is not None:
            logits = jnp.tanh(logits / s.final_logit_softcap) * s.final_logit_softcap
        return logits

    def head(self, x_bte, compute_logits: bool = True) -> HeadOutput:
        hidden = self.final(x_bte)
        return HeadOutput(logits=self.logits(hidden) if compute_logits else None, hidden=hidden)

    def __call__(self, input_ids_bt, attention_mask_bt=None, *, positions_bt=None, cache: Optional[KVCache] = None,
                 threshold=None, ratio_kind: str = "out", compute_logits: bool = True,
                 embeddings_only: bool = False, prefill: bool = False) -> ModelOutput:
        c = self.config
        b, t = input_ids_bt.shape
        valid = jnp.ones((b, t), bool) if attention_mask_bt is None else attention_mask_bt.astype(bool)
        if prefill and (cache is None or positions_bt is not None):
            raise ValueError("prefill=True fills a cache from slot 0: pass cache=, and no positions_bt "
                             "(they are the slots 0 .. t - 1)")
        slots_from_zero = positions_bt is None  # slots are 0 .. t - 1 in every row
        if prefill:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            slots = positions_bt
        elif positions_bt is None:
            if cache is not None:
                raise ValueError("cached calls need explicit positions_bt (the cache slots), or prefill=True")
            positions_bt = hf_positions(valid)
            slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        else:
            slots = positions_bt.astype(jnp.int32)
        x = self.embed(input_ids_bt, positions_bt)
        if embeddings_only:  # the residual stream entering layer 0 (layer-by-layer streaming)
            return x
        x, stats, cache = run_pool(c.layer_config(), self.dtype, self.layers, c.layer_meta(), x, positions_bt, slots,
                                   valid, causal=True, cache=cache, threshold=threshold, ratio_kind=ratio_kind,
                                   slots_from_zero=slots_from_zero, empty_cache=prefill)
        out = self.head(x, compute_logits)
        return ModelOutput(logits=out.logits, hidden=out.hidden, stats=stats, cache=cache)

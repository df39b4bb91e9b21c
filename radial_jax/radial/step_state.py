"""What the step loop of a Radial Network carries (``radial.steps``): the decoding cache with the causal budget's
counters, the static ``Plan`` of a call, the ``Tokens`` of a call, and the gathered-slot helpers."""
from __future__ import annotations

import dataclasses
from typing import Tuple

import flax.struct
import jax
import jax.numpy as jnp

from radial_jax.models.kv_cache import KVCache, cache_max_len, first_rows
from radial_jax.models.layer import LayerConfig, TransformerLayer
from radial_jax.radial import dispatch as dsp
from radial_jax.radial.config import RadialConfig




@flax.struct.dataclass
class RadialCache:
    """The decoding state of a Radial Network: the global KV cache and the causal budget's counters."""

    kv: KVCache  # or a tuple of L single-layer caches (the inference layout, ``kv_cache.split_layers``)
    admitted: jax.Array  # [B, S, L] int32: tokens of row b admitted to layer l at step s so far

    @classmethod
    def create(cls, num_layers: int, steps: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> "RadialCache":
        return cls(kv=KVCache.create(num_layers, batch, max_len, kv_heads, head_dim, dtype),
                   admitted=jnp.zeros((batch, steps, num_layers), jnp.int32))

    @property
    def max_len(self) -> int:
        return cache_max_len(self.kv)

    def first_rows(self, n: int) -> "RadialCache":
        """The state of the first ``n`` rows (the causal budget counts per row, so theirs is unchanged)."""
        return RadialCache(kv=first_rows(self.kv, n), admitted=self.admitted[:n])


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static facts of one call of the step loop."""

    rc: RadialConfig
    lc: LayerConfig
    dtype: object
    num_layers: int
    causal: bool
    decoding: bool  # one group of one token per batch row (else: one group per sequence)
    sizes: Tuple[int, ...]  # the static sizes a layer's load is rounded up to (sizes[0] = 0)
    exit_chunk: int  # a step's exiting tokens are processed this many per group at a time
    phi: float  # the budget fraction
    hidden_size: int
    # whole sequences: the static sizes a visit's tokens over all sequences are rounded up to (flat dispatch)
    flat_sizes: Tuple[int, ...] = ()

    @property
    def steps(self) -> int:
        return self.rc.steps(self.num_layers)


@flax.struct.dataclass
class Tokens:
    """The tokens of one call, ``[G, N]`` each (see ``dispatch``)."""

    rows: jax.Array  # cache row
    slots: jax.Array  # cache slot = causal order
    positions: jax.Array  # position (RoPE, the budget)
    valid: jax.Array  # false: padding
    budget: jax.Array  # the causal budget of each token


NOBODY = jnp.iinfo(jnp.int32).max  # a gathered slot with no token (beyond every group: scatters drop it)


def layer_module(plan: Plan) -> TransformerLayer:
    """The pool's layer module, applied functionally on a layer's slice of the pool parameters."""
    return TransformerLayer(plan.lc, plan.dtype, parent=None)


def holds_token(tok: Tokens, idx_gc):
    """Which gathered slots hold a token (an empty slot's index is ``N`` or ``NOBODY``)."""
    return idx_gc < tok.valid.shape[1]


def dispatched(tok: Tokens, idx_gc, t_max: int):
    """``(ok, positions, slots, rows)`` of the gathered tokens ``idx_gc`` (slot ``t_max`` where empty)."""
    ok = holds_token(tok, idx_gc)
    return (ok, dsp.gather(tok.positions, idx_gc), jnp.where(ok, dsp.gather(tok.slots, idx_gc), t_max),
            dsp.gather(tok.rows, idx_gc))

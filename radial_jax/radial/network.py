"""The Radial Network module (docs/design.md §4): a routed pool of layers with a global KV cache.

Parts:
  * embedder / head: the base model's own (``family.module_cls``: ``embed``,
    ``head``, ``logits``), sharing its scope, so the sequential model's parameters
    load as they are;
  * pool: ``params["layers"]``, the base model's stacked layers (leading axis ``L``),
    and the per-layer window / RoPE data of ``config.layer_meta()``;
  * router: ``params["router"]`` (``radial_jax.radial.router.Router``).

``__call__`` is the parallel forward of whole sequences (one group per
sequence); ``decode_step`` processes one new token per batch row (one group
across the batch). Both run ``steps.run_steps`` with the same rules, so they make
the same decisions and give the same logits, also when the budget drops visits
(the counters travel in the ``RadialCache``). The rules, and the choices where
the design leaves room, are in docs/design.md §4 and ``radial_jax.radial.config``.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from radial_jax.models.decoder import HeadOutput, hf_positions
from radial_jax.models.family import family_of
from radial_jax.radial import dispatch as dsp
from radial_jax.radial.config import RadialConfig
from radial_jax.radial.metrics import RadialMetrics, compute_metrics
from radial_jax.radial.router import ROUTER_FIELDS, Router, RouterOutput
from radial_jax.radial.step_state import Plan, RadialCache, Tokens
from radial_jax.radial.steps import run_steps


@flax.struct.dataclass
class RadialOutput:
    """What a Radial Network forward (or decode step) returns.

    logits: ``[b, t, vocab]`` (language models) / ``[b, classes]`` (ViT classifier) / None.
    hidden: final hidden states (the head's input), ``[b, t, e]``.
    router: ``RouterOutput`` (leaves ``[S, b, t, ...]``): logits, probs, choices, gates,
      assignments, drops, exits, ratios (for auxiliary losses and statistics).
    metrics: ``RadialMetrics``: depth per token, per-layer load, drops, exits, executed FLOPs.
    cache: the ``RadialCache`` after this call (feed it to ``decode_step``).
    pooled: ViT pooler output (bare encoder) or None.
    """

    logits: Optional[jax.Array]
    hidden: jax.Array
    router: RouterOutput
    metrics: RadialMetrics
    cache: Optional[RadialCache] = None
    pooled: Optional[jax.Array] = None


def init_router(num_layers: int, max_steps: int, rc: RadialConfig, hidden_size: int):
    """``init(key)``: fresh router parameters."""
    def init(key):
        r = Router(num_layers, max_steps, rc.router_hidden, rc.router_last_layer, rc.router_init_scale, parent=None)
        return r.init(key, jnp.zeros((1, 1, hidden_size)), jnp.int32(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return init


class RadialNetwork(nn.Module):
    """A Radial Network over any family's model (``base_config``); see the module docstring.

    Parameters: the base model's (same names) plus ``"router"``. Use
    ``RadialModel.from_sequential(model, ...)`` for a ready bundle.
    """

    base_config: Any
    radial: RadialConfig = RadialConfig()
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.base_config
        self.family = family_of(c)
        self.base = self.family.module_cls(c, dtype=self.dtype)
        nn.share_scope(self, self.base)  # the base's parameters stay at the top level
        L = c.num_layers
        self.router = self.param("router", init_router(L, self.radial.steps(L), self.radial, c.hidden_size))

    # -- pieces -------------------------------------------------------------------------------------
    def _plan(self, decoding: bool, sizes, exit_chunk: int, flat_sizes=()) -> Plan:
        c = self.base_config
        return Plan(rc=self.radial, lc=c.layer_config(), dtype=self.dtype, num_layers=c.num_layers,
                    causal=self.family.is_decoder, decoding=decoding, sizes=tuple(sizes), exit_chunk=exit_chunk,
                    phi=self.radial.budget_fraction(c.num_layers), hidden_size=c.hidden_size,
                    flat_sizes=tuple(flat_sizes))

    def _tokens(self, plan: Plan, rows, slots, positions, valid) -> Tokens:
        return Tokens(rows=rows, slots=slots, positions=positions, valid=valid,
                      budget=dsp.budget(positions, valid, plan.phi, self.radial.capacity_slack))

    def init_cache(self, batch: int, max_len: int) -> RadialCache:
        c = self.base_config
        lc = c.layer_config()
        return RadialCache.create(c.num_layers, self.radial.steps(c.num_layers), batch, max_len, lc.kv_heads,
                                  lc.head_size, self.dtype)

    def logits(self, hidden_be):
        """The base model's LM head on final hidden states (generation's prefill)."""
        return self.base.logits(hidden_be)

    # -- the parallel forward -----------------------------------------------------------------------
    def __call__(self, inputs, attention_mask_bt=None, *, positions_bt=None, cache: Optional[RadialCache] = None,
                 max_len: Optional[int] = None, threshold=None, compute_logits: bool = True,
                 explore=None) -> RadialOutput:
        """Whole sequences: token ids ``[b, t]`` (language models) or pixels ``[b, c, h, w]`` (ViT).

        Without ``positions_bt`` positions count the real tokens (left padding allowed)
        and slots are the indices; with it (right padding, a prefill for decoding) slots
        = positions. A fresh cache of ``max_len`` (default ``t``) slots is made when
        ``cache`` is None. ``threshold``: for oracle routing. ``compute_logits=False``
        skips the head's logits. ``explore``: a ``routing.Explore`` (training): learned routes are
        chosen on noisy logits.
        """
        rc, L = self.radial, self.base_config.num_layers
        if self.family.is_decoder:
            b, t = inputs.shape
            valid = jnp.ones((b, t), bool) if attention_mask_bt is None else attention_mask_bt.astype(bool)
            if positions_bt is None:
                positions = hf_positions(valid)
                slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            else:
                positions = slots = positions_bt.astype(jnp.int32)
            x = self.base.embed(inputs, positions)
        else:
            x = self.base.embed(inputs)
            b, t = x.shape[:2]
            valid = jnp.ones((b, t), bool)
            positions = slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if cache is None:
            cache = self.init_cache(b, max_len or t)
        elif rc.is_oracle:
            raise ValueError("routing='oracle' runs on a fresh cache only (its probe sees the current tokens)")
        # The most a sequence can admit to a layer at a step in this call: its budget at the last slot.
        c_max = rc.max_capacity(L, t if positions_bt is None else cache.max_len)
        c_max = min(c_max, t)
        # exits are not budgeted: any of a sequence's t tokens may leave at a step, a bucket's worth at a time
        # a visit dispatches the tokens of all b sequences at once (flat), up to b * c_max of them
        plan = self._plan(False, dsp.prefill_sizes(c_max, rc.prefill_buckets), -(-t // rc.prefill_buckets),
                          dsp.prefill_sizes(b * c_max, rc.prefill_buckets))
        rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
        tok = self._tokens(plan, rows, slots, positions, valid)
        x, cache, records = run_steps(plan, self.base.layers, self.base_config.layer_meta(), self.router, x, tok,
                                      cache, threshold, explore)
        head: HeadOutput = self.base.head(x, compute_logits)
        metrics = compute_metrics(plan, records, valid, b, t, cache.max_len, c_max)
        return RadialOutput(logits=head.logits, hidden=head.hidden, pooled=head.pooled, cache=cache,
                            router=RouterOutput(**{k: records[k] for k in ROUTER_FIELDS}), metrics=metrics)

    # -- decoding -----------------------------------------------------------------------------------
    def decode_step(self, ids_b, slots_b, cache: RadialCache, live_b=None, compute_logits: bool = True):
        """One new token per batch row at ``slots_b`` (= its position), dispatched across the batch.

        Rows with ``live_b`` false are not processed. Returns logits ``[b, 1, vocab]`` and
        router fields ``[S, b, 1]``.
        """
        rc = self.radial
        if not self.family.is_decoder:
            raise ValueError(f"decode_step needs a language model; this network's base is "
                             f"{self.base_config.model_type}")
        if rc.dispatch != "token":
            raise ValueError("decoding needs causal routing: dispatch='token' (expert choice sees future tokens; "
                             "it is a training-only option)")
        if rc.is_oracle:
            raise ValueError("routing='oracle' is a parallel-forward simulation; it cannot decode")
        b = ids_b.shape[0]
        live = jnp.ones((b,), bool) if live_b is None else live_b.astype(bool)
        slots = slots_b.astype(jnp.int32)
        x = self.base.embed(ids_b[:, None], slots[:, None]).reshape(1, b, -1)
        plan = self._plan(True, dsp.decode_sizes(b), b)  # exits: the batch's at once (one read of the weights)
        tok = self._tokens(plan, jnp.arange(b, dtype=jnp.int32)[None], slots[None], slots[None], live[None])
        x, cache, records = run_steps(plan, self.base.layers, self.base_config.layer_meta(), self.router, x, tok,
                                      cache)
        head = self.base.head(x.reshape(b, 1, -1), compute_logits)
        per_token = {k: jnp.swapaxes(v, 1, 2) if v.ndim >= 3 else v for k, v in records.items()}  # [S,1,b]->[S,b,1]
        metrics = compute_metrics(plan, per_token, live[:, None], 1, b, cache.max_len, b)
        return RadialOutput(logits=head.logits, hidden=head.hidden, cache=cache, metrics=metrics,
                            router=RouterOutput(**{k: per_token[k] for k in ROUTER_FIELDS}))

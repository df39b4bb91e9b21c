"""The router of a Radial Network (docs/design.md §4).

A small MLP on the normalised hidden state of each token plus a learned
embedding of the step index (and, optionally, of the last layer visited). It
outputs ``L + 1`` logits: one per layer of the pool, then *exit*. In ordered
mode step ``s`` compares only column ``s`` (use layer ``s``) with the last column,
which then means *skip this step* (the token stays active).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp


class Router(nn.Module):
    """``logits[..., L + 1] = fc2(gelu(fc1(LN(x) + step_emb[s] (+ last_emb[last]))))``.

    ``last_bt`` is the last layer visited, ``L`` when none (only used when
    ``use_last_layer``). The output layer starts small (``init_scale``) so that a
    fresh router is close to uniform.
    """

    num_layers: int
    max_steps: int
    hidden: int = 64
    use_last_layer: bool = False
    init_scale: float = 0.02

    @nn.compact
    def __call__(self, x_bte, step, last_bt=None):
        e = x_bte.shape[-1]
        h = nn.LayerNorm(name="norm")(x_bte.astype(jnp.float32))
        h = h + nn.Embed(self.max_steps, e, name="step_embed", embedding_init=nn.initializers.normal(0.02))(step)
        if self.use_last_layer:
            last = jnp.full(x_bte.shape[:-1], self.num_layers, jnp.int32) if last_bt is None else last_bt
            h = h + nn.Embed(self.num_layers + 1, e, name="last_embed",
                             embedding_init=nn.initializers.normal(0.02))(last)
        h = jax.nn.gelu(nn.Dense(self.hidden, name="fc1")(h))
        return nn.Dense(self.num_layers + 1, name="fc2",
                        kernel_init=nn.initializers.normal(self.init_scale))(h)


@flax.struct.dataclass
class RouterOutput:
    """Everything the router decided, stacked over steps: leaves ``[S, b, t, ...]``.

    For decoding ``t = 1``. Columns ``0 .. L-1`` are layers, column ``L`` is exit
    (radial) or skip (ordered).

    logits: ``[S, b, t, L+1]`` float32, the learned router's logits (also computed
      under identity / oracle routing, e.g. for router supervision).
    probs: ``[S, b, t, L+1]`` softmax of ``logits`` (ordered mode: only columns
      ``s`` and ``L`` matter; the keep probability is ``sigmoid(logit_s - logit_L)``).
    choice: ``[S, b, t]`` int32: the token's choice (layer, or ``L`` for exit/skip);
      ``-1`` for tokens not active at that step (exited earlier, or padding).
    gate: ``[S, b, t]`` the gate multiplying the applied update (0 where not processed).
    assign: ``[S, b, t, L]`` bool: layer ``l`` processed the token at step ``s``.
    dropped: ``[S, b, t]`` bool: wanted a layer but was over its budget (or, expert choice, not taken).
    exited: ``[S, b, t]`` bool: exited at this step (radial mode).
    ratio: ``[S, b, t]`` whole-layer residual ratio ``|F| / |x + F|`` of the visit
      (0 where not processed); with ``routing="oracle"`` it is the probe's ratio of
      every active token, the quantity the threshold rule compares.
    """

    logits: jax.Array
    probs: jax.Array
    choice: jax.Array
    gate: jax.Array
    assign: jax.Array
    dropped: jax.Array
    exited: jax.Array
    ratio: jax.Array

    @property
    def processed(self) -> jax.Array:
        return self.assign.any(-1)


ROUTER_FIELDS = tuple(f.name for f in dataclasses.fields(RouterOutput))


def with_keep_offset(router_params, offset: float):
    """Router parameters whose every keep logit (layer column minus the last column) is ``offset``
    higher: the last (skip / exit) column's output bias lowered by ``offset``. ``offset > 0`` keeps
    more tokens in ordered mode and exits fewer in radial mode."""
    fc2 = dict(router_params["fc2"])
    fc2["bias"] = jnp.asarray(fc2["bias"]).at[-1].add(-offset)
    return {**router_params, "fc2": fc2}

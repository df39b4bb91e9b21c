"""The router of a Radial Network (docs/design.md §4).

A small MLP on the normalised hidden state of each token plus a learned
embedding of the step index (and, optionally, of the last layer visited), plus
a learned bias per step and choice. It outputs ``L + 2`` logits with one meaning
in both modes: columns ``0 .. L-1`` are the layers, column ``L`` (``SKIP``) is
*skip this step* (the token stays active), column ``L + 1`` (``EXIT``) is *exit*.
Ordered mode compares column ``s`` with ``SKIP`` at step ``s`` (it has no exit);
radial mode takes the largest of all ``L + 2``.

The per-step bias is what lets a radial router start as an ordered one
(``aligned_step_bias``): with every layer but ``s`` and the exit pushed down at
step ``s``, the radial choice at step ``s`` is the ordered one (layer ``s`` or
skip), and training can lower the push (docs/design.md §5).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp


def skip_index(num_layers: int) -> int:
    return num_layers


def exit_index(num_layers: int) -> int:
    return num_layers + 1


class Router(nn.Module):
    """``logits[..., L + 2] = fc2(gelu(fc1(LN(x) + step_emb[s] (+ last_emb[last])))) + step_bias[s]``.

    ``last_bt`` is the last layer visited, ``L`` when none (only used when
    ``use_last_layer``). The output layer starts small (``init_scale``) and the
    step bias at 0, so that a fresh router is close to uniform.
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
        step_1 = jnp.reshape(jnp.asarray(step, jnp.int32), (1,))  # one row looked up (nn.Embed of one row: no scalar)
        h = h + nn.Embed(self.max_steps, e, name="step_embed", embedding_init=nn.initializers.normal(0.02))(step_1)[0]
        if self.use_last_layer:
            last = jnp.full(x_bte.shape[:-1], self.num_layers, jnp.int32) if last_bt is None else last_bt
            h = h + nn.Embed(self.num_layers + 1, e, name="last_embed",
                             embedding_init=nn.initializers.normal(0.02))(last)
        h = jax.nn.gelu(nn.Dense(self.hidden, name="fc1")(h))
        choices = self.num_layers + 2
        step_bias = self.param("step_bias", nn.initializers.zeros_init(), (self.max_steps, choices))
        logits = nn.Dense(choices, name="fc2", kernel_init=nn.initializers.normal(self.init_scale))(h)
        return logits + jnp.take(step_bias, step, axis=0)


@flax.struct.dataclass
class RouterOutput:
    """Everything the router decided, stacked over steps: leaves ``[S, b, t, ...]``.

    For decoding ``t = 1``. Columns ``0 .. L-1`` are layers, ``L`` skip, ``L + 1`` exit.

    logits: ``[S, b, t, L+2]`` float32, the learned router's logits (also computed
      under identity / oracle routing, e.g. for router supervision).
    probs: ``[S, b, t, L+2]`` softmax of ``logits`` (ordered mode: only columns
      ``s`` and ``L`` matter; the keep probability is ``sigmoid(logit_s - logit_L)``).
    choice: ``[S, b, t]`` int32: the token's choice (a layer, ``L`` skip, ``L + 1`` exit);
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
    """Router parameters whose every layer column is ``offset`` above skip and exit (their output
    biases lowered by ``offset``): ``offset > 0`` keeps more tokens in ordered mode and skips and exits
    fewer in radial mode."""
    fc2 = dict(router_params["fc2"])
    fc2["bias"] = jnp.asarray(fc2["bias"]).at[-2:].add(-offset)
    return {**router_params, "fc2": fc2}


def aligned_step_bias(num_layers: int, max_steps: int, push: float):
    """``[S, L + 2]``: 0 for layer ``s mod L`` and skip at step ``s``, ``-push`` for every other layer and exit.

    Added to an ordered router's own step bias, it makes the radial choice at step ``s`` the ordered
    one (layer ``s`` or skip) whenever the router's other logits are within ``push`` of them; with
    ``S > L`` steps the preferred layer cycles through the pool (radial identity routing, §4).
    """
    bias = jnp.full((max_steps, num_layers + 2), -push, jnp.float32)
    steps = jnp.arange(max_steps)
    bias = bias.at[steps, steps % num_layers].set(0.0)
    return bias.at[:, skip_index(num_layers)].set(0.0)


def once_step_bias(num_layers: int, max_steps: int, push: float):
    """``[S, L + 2]``: 0 for layer ``s`` at steps ``s < L`` and for skip at steps ``s >= L``, ``-push`` elsewhere.

    The routes it favours visit each layer once, in order, then skip: the sequential model, with
    ``S - L`` steps to spare that a router can learn to fill (reuse) where a visit pays.
    """
    bias = jnp.full((max_steps, num_layers + 2), -push, jnp.float32)
    first = jnp.arange(min(num_layers, max_steps))
    bias = bias.at[first, first].set(0.0)
    return bias.at[num_layers:, skip_index(num_layers)].set(0.0)

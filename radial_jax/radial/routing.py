"""The routing policy: what the router (or identity / oracle routing) wants for each token at a step.

``decide`` returns, for the ``K`` layers a step considers (ordered mode: layer
``s``; radial mode: all ``L``), which tokens want each of them, the token's
choice (a layer, ``L`` skip, ``L + 1`` exit), whether it exits, and the router's
probability of each candidate (the gate and the expert-choice score). Whether a
wanted visit happens is the capacity's business (``dispatch``), not the router's.

Router logits have ``L + 2`` columns (``router.py``): the layers, *skip this
step* (the token stays active) and *exit*. Ordered mode compares column ``s``
with skip at step ``s``; radial mode takes the largest of all.

Exploration (training only, ``Explore``): the choice is taken on noisy logits,
Gumbel noise in radial mode (a sample of the router's softmax at ``scale = 1``,
its argmax at 0) and logistic noise on the keep logit in ordered mode; the
probabilities (the gate, the losses) stay those of the clean logits. Without it a
hard argmax router never tries the alternatives a straight-through gate would
need to compare.

Mixture (``routing="mixture"``, radial, training): every eligible token goes
through every layer of the step and each update is scaled by the router's
probability of its layer (and, in ``steps.run_step``, by the token's survival,
``prod(1 - p_exit)`` of the earlier steps): the gradient of a layer's logit then
compares that layer's update with the others' and with skipping (a softmax
gradient is ``p_l (g . F_l - sum_k p_k g . F_k)``), which a hard choice cannot.
The choice recorded is the argmax, what hard routing would take.
"""
from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from radial_jax.radial.config import RadialConfig
from radial_jax.radial.router import exit_index, skip_index


@flax.struct.dataclass
class Explore:
    """Exploration of one forward: ``key`` (a typed PRNG key, folded with the step) and ``scale`` (a
    float32 scalar, the noise's scale; traced, so annealing it does not recompile)."""

    key: jax.Array
    scale: jax.Array


@flax.struct.dataclass
class Decision:
    want_kgn: jax.Array  # bool [K, G, N]: sent to the step's k-th candidate layer
    choice_gn: jax.Array  # int32 [G, N]: a layer, L (skip), L + 1 (exit), or -1 (not eligible)
    exiting_gn: jax.Array  # bool [G, N]: exits at this step (radial mode)
    prob_kgn: jax.Array  # float32 [K, G, N]: router probability of each candidate


def keep_logit(logits_gnc, step):
    """Ordered mode: ``logit[step] - logit[SKIP]`` (use layer ``step`` vs skip it); ``step`` may be traced."""
    skip = skip_index(logits_gnc.shape[-1] - 2)
    return jax.lax.dynamic_index_in_dim(logits_gnc, step, axis=-1, keepdims=False) - logits_gnc[..., skip]


def decide(rc: RadialConfig, logits_gnc, step, num_layers: int, eligible_gn, probe_ratio_gn=None,
           threshold=None, explore: Optional[Explore] = None) -> Decision:
    """The routes of one step for the ``eligible`` tokens (active and not padding).

    ``probe_ratio_gn`` / ``threshold``: oracle routing (ordered mode): keep the tokens whose
    whole-layer ratio is at least ``threshold``. ``explore``: learned routing chooses on noisy logits
    (see the module docstring).
    """
    L = num_layers
    logits_gnc = logits_gnc.astype(jnp.float32)
    explore = explore if rc.routing == "learned" else None
    key = None if explore is None else jax.random.fold_in(explore.key, step)
    if rc.ordered:
        keep_gn = keep_logit(logits_gnc, step)
        if rc.is_identity:
            want_gn = jnp.ones_like(eligible_gn)
        elif rc.is_oracle:
            if probe_ratio_gn is None or threshold is None:
                raise ValueError("routing='oracle' needs a threshold")
            want_gn = probe_ratio_gn >= threshold
        elif explore is not None:
            want_gn = keep_gn + explore.scale * jax.random.logistic(key, keep_gn.shape) > 0
        else:
            want_gn = keep_gn > 0
        want_gn = want_gn & eligible_gn
        choice = jnp.where(eligible_gn, jnp.where(want_gn, step, skip_index(L)), -1).astype(jnp.int32)
        return Decision(want_kgn=want_gn[None], choice_gn=choice, exiting_gn=jnp.zeros_like(eligible_gn),
                        prob_kgn=jax.nn.sigmoid(keep_gn)[None])
    if rc.is_identity:  # layer s mod L at step s: the pool in order, S / L times
        pref_gn = jnp.full(eligible_gn.shape, step % L, jnp.int32)
    elif explore is not None:
        noisy_gnc = logits_gnc + explore.scale * jax.random.gumbel(key, logits_gnc.shape)
        pref_gn = jnp.argmax(noisy_gnc, axis=-1).astype(jnp.int32)
    else:
        pref_gn = jnp.argmax(logits_gnc, axis=-1).astype(jnp.int32)
    want_kgn = eligible_gn[None] & (pref_gn[None] == jnp.arange(L, dtype=jnp.int32)[:, None, None])
    exiting_gn = eligible_gn & (pref_gn == exit_index(L))
    if rc.is_mixture:  # every layer, no hard exit (the survival weights the updates instead)
        want_kgn = jnp.broadcast_to(eligible_gn[None], want_kgn.shape)
        exiting_gn = jnp.zeros_like(eligible_gn)
    probs_gnc = jax.nn.softmax(logits_gnc, axis=-1)
    return Decision(want_kgn=want_kgn, choice_gn=jnp.where(eligible_gn, pref_gn, -1), exiting_gn=exiting_gn,
                    prob_kgn=jnp.moveaxis(probs_gnc[..., :L], -1, 0))


def gate(rc: RadialConfig, prob_kgn):
    """What multiplies a processed token's update: 1 (identity / oracle routing), ``1 + p - stop_grad(p)``
    (straight-through: value 1, gradient of ``p``) or ``p``; mixture routing: ``p``."""
    if rc.is_mixture:
        return prob_kgn
    if rc.routing != "learned":
        return jnp.ones_like(prob_kgn)
    if rc.gate == "straight_through":
        return 1.0 + (prob_kgn - jax.lax.stop_gradient(prob_kgn))
    return prob_kgn

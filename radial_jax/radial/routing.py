"""The routing policy: what the router (or identity / oracle routing) wants for each token at a step.

``decide`` returns, for the ``K`` layers a step considers (ordered mode: layer
``s``; radial mode: all ``L``), which tokens want each of them, the token's
choice (a layer, ``L`` skip, ``L + 1`` exit), whether it exits, and the router's
probability of each candidate (the gate and the expert-choice score). Whether a
wanted visit happens is the capacity's business (``dispatch``), not the router's.

Router logits have ``L + 2`` columns (``router.py``): the layers, *skip this
step* (the token stays active) and *exit*. Ordered mode compares column ``s``
with skip at step ``s``; radial mode takes the largest of all.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from radial_jax.radial.config import RadialConfig
from radial_jax.radial.router import exit_index, skip_index


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
           threshold=None) -> Decision:
    """The routes of one step for the ``eligible`` tokens (active and not padding).

    ``probe_ratio_gn`` / ``threshold``: oracle routing (ordered mode): keep the tokens whose
    whole-layer ratio is at least ``threshold``.
    """
    L = num_layers
    logits_gnc = logits_gnc.astype(jnp.float32)
    if rc.ordered:
        keep_gn = keep_logit(logits_gnc, step)
        if rc.routing == "identity":
            want_gn = jnp.ones_like(eligible_gn)
        elif rc.routing == "oracle":
            if probe_ratio_gn is None or threshold is None:
                raise ValueError("routing='oracle' needs a threshold")
            want_gn = probe_ratio_gn >= threshold
        else:
            want_gn = keep_gn > 0
        want_gn = want_gn & eligible_gn
        choice = jnp.where(eligible_gn, jnp.where(want_gn, step, skip_index(L)), -1).astype(jnp.int32)
        return Decision(want_kgn=want_gn[None], choice_gn=choice, exiting_gn=jnp.zeros_like(eligible_gn),
                        prob_kgn=jax.nn.sigmoid(keep_gn)[None])
    if rc.routing == "identity":  # layer s mod L at step s: the pool in order, S / L times
        pref_gn = jnp.full(eligible_gn.shape, step % L, jnp.int32)
    else:
        pref_gn = jnp.argmax(logits_gnc, axis=-1).astype(jnp.int32)
    want_kgn = eligible_gn[None] & (pref_gn[None] == jnp.arange(L, dtype=jnp.int32)[:, None, None])
    probs_gnc = jax.nn.softmax(logits_gnc, axis=-1)
    return Decision(want_kgn=want_kgn, choice_gn=jnp.where(eligible_gn, pref_gn, -1),
                    exiting_gn=eligible_gn & (pref_gn == exit_index(L)),
                    prob_kgn=jnp.moveaxis(probs_gnc[..., :L], -1, 0))


def gate(rc: RadialConfig, prob_kgn):
    """What multiplies a processed token's update: 1 (identity / oracle routing), ``1 + p - stop_grad(p)``
    (straight-through: value 1, gradient of ``p``) or ``p``."""
    if rc.routing != "learned":
        return jnp.ones_like(prob_kgn)
    if rc.gate == "straight_through":
        return 1.0 + (prob_kgn - jax.lax.stop_gradient(prob_kgn))
    return prob_kgn

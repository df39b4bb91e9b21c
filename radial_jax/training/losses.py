"""Losses of distillation and joint training (docs/design.md §5), as pure functions of arrays.

Shapes: ``b`` batch, ``t`` tokens, ``v`` vocabulary, ``e`` hidden, ``s`` router
steps, ``k`` router choices (``L`` layers + exit), ``l`` layers. A ``mask_bt`` is
true for tokens that count (padding never counts). Every loss is a mean over
the counted tokens (a scalar); an empty mask gives 0, never NaN.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp



def _mask(mask_bt, shape_bt):
    return jnp.ones(shape_bt, jnp.float32) if mask_bt is None else mask_bt.astype(jnp.float32)


def _masked_mean(v_bt, m_bt):
    return jnp.sum(v_bt * m_bt) / jnp.maximum(jnp.sum(m_bt), 1.0)


def distill_kl(student_logits_btv, teacher_logits_btv, mask_bt=None, temperature: float = 1.0):
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` per token, mean over counted tokens.

    The ``T^2`` factor keeps gradient sizes comparable across temperatures (Hinton et al.).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits_btv).astype(jnp.float32) / temperature, -1)
    s_logp = jax.nn.log_softmax(student_logits_btv.astype(jnp.float32) / temperature, -1)
    kl_bt = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
    return temperature ** 2 * _masked_mean(kl_bt, _mask(mask_bt, kl_bt.shape))


def hidden_match(student_bte, teacher_bte, mask_bt=None):
    """Relative squared error ``||s - t||^2 / ||t||^2`` per token, mean over counted tokens."""
    t = jax.lax.stop_gradient(teacher_bte).astype(jnp.float32)
    err_bt = jnp.sum(jnp.square(student_bte.astype(jnp.float32) - t), -1) / jnp.maximum(jnp.sum(t * t, -1), 1e-12)
    return _masked_mean(err_bt, _mask(mask_bt, err_bt.shape))


def router_keep_bce(keep_logits_lbt, keep_labels_lbt, mask_bt=None, pos_weight: float = 1.0):
    """Binary cross-entropy of ordered-mode keep/skip decisions against oracle labels.

    ``keep_logits[l, b, t]``: the router's logit for "token goes through layer l";
    ``keep_labels``: the oracle's keep flags (docs/design.md §3). Mean over layers and counted tokens.
    """
    x = keep_logits_lbt.astype(jnp.float32)
    y = keep_labels_lbt.astype(jnp.float32)
    bce = pos_weight * y * jax.nn.softplus(-x) + (1.0 - y) * jax.nn.softplus(x)
    return _masked_mean(jnp.mean(bce, 0), _mask(mask_bt, bce.shape[1:]))


def ordered_route_targets(keep_labels_lbt):
    """The radial router's column that follows the ordered path ``[L, b, t]`` int32: layer ``l`` at
    step ``l`` where the label keeps it, *exit* (``L + 1``) where it skips every layer from ``l`` on,
    else *skip* (``L``)."""
    keep = keep_labels_lbt.astype(bool)
    L = keep.shape[0]
    kept_later = jnp.flip(jnp.cumsum(jnp.flip(keep, 0), 0), 0) > 0  # [l]: some layer >= l is kept
    step = jnp.arange(L, dtype=jnp.int32).reshape((L,) + (1,) * (keep.ndim - 1))
    return jnp.where(keep, step, jnp.where(kept_later, L, L + 1)).astype(jnp.int32)


def router_route_ce(router_logits_lbtk, targets_lbt, weight_lbt):
    """Cross-entropy of the router's softmax over all columns against ``targets``, mean over the
    ``(l, b, t)`` where ``weight`` is set (radial mode: tokens still active at step ``l``)."""
    logp = jax.nn.log_softmax(router_logits_lbtk.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets_lbt[..., None], axis=-1)[..., 0]
    return _masked_mean(nll, weight_lbt.astype(jnp.float32))


def compute_penalty(expected_depth_bt, num_layers: int, mask_bt=None):
    """Expected number of layer visits per token as a fraction of ``num_layers`` (mean over tokens)."""
    return _masked_mean(expected_depth_bt.astype(jnp.float32) / num_layers, _mask(mask_bt, expected_depth_bt.shape))


def load_balance(router_probs_sbtk, dispatched_sbtl, mask_bt=None):
    """Switch-style load balance over the layers: ``L * sum_l f_l * P_l``.

    ``f_l``: fraction of (step, token) decisions dispatched to layer ``l``;
    ``P_l``: mean router probability of ``l`` *among the layers* (each token's first
    ``L`` of the ``k`` choices renormalised to sum to 1). Equals 1 when uniform.
    The renormalisation keeps it a balance: over the raw probabilities the loss
    falls by moving mass from every layer to *skip* or *exit*, a compute penalty
    in disguise (a joint recipe fell to zero visits under it).
    """
    n_layers = dispatched_sbtl.shape[-1]
    m = _mask(mask_bt, router_probs_sbtk.shape[1:3])[None, :, :, None]
    denom = jnp.maximum(jnp.sum(m) * router_probs_sbtk.shape[0], 1.0)
    f_l = jnp.sum(dispatched_sbtl.astype(jnp.float32) * m, (0, 1, 2)) / denom
    layers = router_probs_sbtk[..., :n_layers].astype(jnp.float32)
    among = layers / jnp.maximum(jnp.sum(layers, -1, keepdims=True), 1e-9)
    p_l = jnp.sum(among * m, (0, 1, 2)) / denom
    total = jnp.maximum(jnp.sum(f_l), 1e-9)
    return n_layers * jnp.sum((f_l / total) * p_l)


def router_z_loss(router_logits_sbtk, mask_bt=None):
    """``mean(logsumexp(logits)^2)`` (ST-MoE): keeps router logits small."""
    z = jax.nn.logsumexp(router_logits_sbtk.astype(jnp.float32), -1) ** 2
    return _masked_mean(jnp.mean(z, 0), _mask(mask_bt, z.shape[1:]))


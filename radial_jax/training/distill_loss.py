"""What distillation optimises: ``DistillConfig`` and the loss of a Radial student against its teacher
(docs/design.md §5); ``training.distill`` drives it, ``training.pod_steps`` places it on a mesh.

Teacher: a sequential OPT (``rj.Model``). Student:
``RadialModel.from_sequential(teacher)``: the teacher's layers as the pool, a
fresh router, real fixed-capacity dispatch and the global KV cache, with the cache
policy ``defaults.DISTILL_CACHE_POLICY`` (*mask*: a skipped layer costs nothing and
leaves its K/V slot empty; *propagate*, through ``radial_kwargs``, writes it from the
token's current state at the cost of a K/V projection).

``mode="ordered"`` (start here): step ``s`` may use layer ``s`` or skip it; the keep
logit is ``router_logits[s, ..., s] - router_logits[s, ..., L]``. Loss per batch::

    kl_weight      * T^2 KL(teacher/T || student/T)
  + hidden_weight  * |h_s - h_t|^2 / |h_t|^2               (final hidden states; optional)
  + router_weight  * BCE(keep logits, oracle keep labels)   (the network's own routing="oracle"
                                                             at ``oracle_threshold``: §3 per layer)
  + compute_weight * E[depth] / L,  E[depth] = sum_s sigmoid(keep logit)

``mode="radial"`` (optionally continuing from the ordered phase: ``start_params=``):
KL (+ hidden) + compute penalty on the expected layer visits (layer probabilities
summed over active steps) + ``balance_weight`` * load balance over layers +
``z_weight`` * router z-loss + ``router_weight`` * cross-entropy of the router,
over all its columns, against the oracle's ordered path at the first ``L`` steps
(layer ``s`` where the oracle keeps it, exit once it keeps nothing later, else
skip; tokens still active): it anchors the meaning the warm start gave the
columns; departures from it (other layers, reuse) must pay for themselves in KL.

Gradients reach the router through the network's straight-through gate (value 1,
gradient of the router probability). ``train="router"`` freezes everything but
``params["router"]`` (the teacher's logits then come from the student's own,
unchanged, layers); ``train="all"`` fine-tunes the layers too, against the frozen
teacher.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from radial_jax import defaults as D
from radial_jax.models.bundle import Model
from radial_jax.models.flops import step_cost_in_visits
from radial_jax.radial.model import RadialModel
from radial_jax.radial.routing import keep_logit
from radial_jax.radial.stats import route_rates
from radial_jax.training import losses

TRAIN_MODES = ("router", "all")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Loss weights and what is trained (see the module docstring)."""

    temperature: float = D.TEMPERATURE
    kl_weight: float = 1.0
    hidden_weight: float = D.HIDDEN_WEIGHT
    router_weight: float = D.ROUTER_WEIGHT
    oracle_threshold: float = D.ORACLE_THRESHOLD
    compute_weight: float = D.COMPUTE_WEIGHT
    balance_weight: float = 0.01  # radial mode
    z_weight: float = 1e-3  # radial mode
    train: str = D.DISTILL_TRAIN  # "router": layers frozen; "all": everything
    router_hidden: int = D.ROUTER_HIDDEN
    radial_push: float = 4.0  # radial warm start: how far other layers and exit start below the ordered route

    def __post_init__(self):
        if self.train not in TRAIN_MODES:
            raise ValueError(f"train must be one of {TRAIN_MODES}, got {self.train!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("kl_weight", "hidden_weight", "router_weight", "compute_weight", "oracle_threshold",
                     "balance_weight", "z_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.router_hidden < 1:
            raise ValueError(f"router_hidden must be >= 1, got {self.router_hidden}")
        if not self.oracle_threshold <= 1:  # as simulate's: a ratio_out is in [0, 1]
            raise ValueError(f"oracle_threshold must be in [0, 1] (a residual ratio), got {self.oracle_threshold}")

    def radial_phase(self, compute_weight: float = D.RADIAL_COMPUTE_WEIGHT, train: str = D.RADIAL_DISTILL_TRAIN,
                     oracle_threshold: float = D.RADIAL_ORACLE_THRESHOLD) -> "DistillConfig":
        """This config for the radial phase that continues an ordered student: the phase's own compute
        weight, what it trains and its oracle threshold (``defaults.RADIAL_*``); the rest unchanged."""
        return dataclasses.replace(self, compute_weight=compute_weight, train=train,
                                   oracle_threshold=oracle_threshold)


def make_student(teacher: Model, cfg: DistillConfig = DistillConfig(), mode: str = "ordered", seed: int = 0,
                 **radial_kwargs):
    """``RadialModel.from_sequential(teacher)`` with the distillation defaults (cache policy
    ``defaults.DISTILL_CACHE_POLICY``)."""
    kwargs = dict(mode=mode, cache_policy=D.DISTILL_CACHE_POLICY, router_hidden=cfg.router_hidden)
    kwargs.update(radial_kwargs)
    return RadialModel.from_sequential(teacher, seed=seed, **kwargs)


def keep_logits_ordered(router_logits_sbtk):
    """Ordered mode: ``logit[s, ..., s] - logit[s, ..., SKIP]`` (use layer s vs skip it), ``[S, b, t]``:
    ``routing.keep_logit`` (the rule the network decides by) at every step."""
    steps = jnp.arange(router_logits_sbtk.shape[0], dtype=jnp.int32)
    return jax.vmap(keep_logit)(router_logits_sbtk, steps)


def expected_layer_visits(router_out, ordered: bool, num_layers: int, step_cost: float = 0.0):
    """Soft compute per token ``[b, t]``, in layer visits (differentiable in the router).

    Ordered mode: the keep probabilities summed over steps. Radial mode: at each step, the
    probability of still being active (``prod`` of ``1 - p_exit`` over earlier steps, times the
    token really being active) times the layer probabilities, plus ``step_cost`` (the router and
    *propagate* writes of a step, in layer visits) for every step still active: so leaving costs
    less than skipping, and exits are learnt.
    """
    if ordered:
        return jnp.sum(jax.nn.sigmoid(keep_logits_ordered(router_out.logits)), 0)
    probs = router_out.probs
    p_exit = probs[..., num_layers + 1]
    survive = jnp.cumprod(jnp.concatenate([jnp.ones_like(p_exit[:1]), 1.0 - p_exit[:-1]], 0), axis=0)
    active = survive * (router_out.choice >= 0).astype(jnp.float32)
    return jnp.sum(active * (jnp.sum(probs[..., :num_layers], -1) + step_cost), 0)


def step_cost(network, seq_len: int) -> float:
    """``flops.step_cost_in_visits`` of a ``RadialModel`` on windows of ``seq_len`` tokens."""
    c, rc = network.config, network.radial
    return step_cost_in_visits(c.layer_config(), c.hidden_size, rc.router_hidden, c.num_layers, seq_len,
                               rc.cache_policy == "propagate")


def without_router(params) -> dict:
    """The sequential model's parameters inside a Radial Network's."""
    return {k: v for k, v in params.items() if k != "router"}


def distill_loss_fn(student, teacher: Model, cfg: DistillConfig):
    """``loss(params, ids_bt, key) -> (loss, metrics)`` for a ``RadialModel`` student."""
    # Training runs every layer at its full budget (one static size): the values are those of serving,
    # which rounds loads to several sizes, and one size compiles fast.
    student = student.replace(prefill_buckets=1)
    module = student.module
    ordered = student.radial.mode == "ordered"
    teacher_params = jax.tree_util.tree_map(jnp.asarray, teacher.params)
    L = teacher.config.num_layers
    # The oracle's keep labels (§3 per layer) supervise the router in both modes. Radial mode: the
    # ordered path they give (layer s at step s if kept, exit once nothing later is kept, else skip)
    # is the target of the first L steps, the meaning the warm start gave those columns
    # (``to_radial``). Without it the compute penalty drives every token to skip or exit: the
    # straight-through gate gives the KL no gradient towards a visit that did not happen.
    if ordered:
        oracle_module, oracle_router = student.replace(routing="oracle").module, None
    else:
        oracle_net = make_student(teacher, cfg, mode="ordered", routing="oracle", prefill_buckets=1,
                                  capacity_factor=student.radial.capacity_factor,
                                  cache_policy=student.radial.cache_policy)
        oracle_module, oracle_router = oracle_net.module, jax.tree_util.tree_map(jnp.asarray,
                                                                                 oracle_net.params["router"])

    def loss(params, ids_bt, key):
        del key
        tparams = teacher_params if cfg.train == "all" else jax.lax.stop_gradient(without_router(params))
        t_out = teacher.module.apply({"params": tparams}, ids_bt)
        # router-only: the frozen layers are constants of the student's forward too, so no gradient of the
        # 100M+ frozen parameters (the embedding, the head) is computed only for the optimiser to drop it
        s_params = params if cfg.train == "all" else {**tparams, "router": params["router"]}
        s_out = module.apply({"params": s_params}, ids_bt)
        kl = losses.distill_kl(s_out.logits, t_out.logits, temperature=cfg.temperature)
        total, metrics = cfg.kl_weight * kl, {"kl": kl, "hard_depth": s_out.metrics.depth_fraction,
                                             "compute": s_out.metrics.compute_fraction}
        if cfg.hidden_weight:
            hm = losses.hidden_match(s_out.hidden, t_out.hidden)
            total += cfg.hidden_weight * hm
            metrics["hidden"] = hm
        r = s_out.router
        if cfg.router_weight:
            router_s = jax.lax.stop_gradient(params["router"]) if ordered else oracle_router
            oracle = oracle_module.apply({"params": {**tparams, "router": router_s}}, ids_bt,
                                         threshold=cfg.oracle_threshold)
            labels = jax.lax.stop_gradient(oracle.router.processed)  # [L, b, t]
            if ordered:
                rl = losses.router_keep_bce(keep_logits_ordered(r.logits), labels)
            else:  # the first L steps, tokens still active (an exited token has no choice to supervise)
                rl = losses.router_route_ce(r.logits[:L], losses.ordered_route_targets(labels), r.choice[:L] >= 0)
            total += cfg.router_weight * rl
            metrics.update(router_loss=rl, oracle_depth=jnp.mean(labels))
        if not ordered:
            lb = losses.load_balance(r.probs, r.assign)
            z = losses.router_z_loss(r.logits)
            total += cfg.balance_weight * lb + cfg.z_weight * z
            metrics.update(balance=lb, z=z, **route_rates(r, L))
        depth = losses.compute_penalty(expected_layer_visits(r, ordered, L, step_cost(student, ids_bt.shape[1])), L)
        total += cfg.compute_weight * depth
        metrics["soft_depth"] = depth
        return total, metrics

    return loss

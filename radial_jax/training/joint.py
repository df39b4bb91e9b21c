"""Joint training from scratch of a Radial Network's layers and router (docs/design.md §5).

The network (``RadialNetwork`` with its real dispatch, ``gate="prob"`` by default:
a processed token's update is scaled by its router probability, MoE style, so
the LM loss reaches the router; ``gate="straight_through"`` also works) starts
from random layers, in ordered or radial mode, with ``S >= L`` steps (radial:
``S > L`` lets a token visit layers more than once). Loss per batch::

    LM cross-entropy
  + compute_weight * E[layer visits] / L      (soft depth from the router's probabilities)
  + balance_weight * load balance over layers (radial mode: routes that fit the budget)
  + z_weight       * router z-loss

Schedule (stage-wise, because capacity is static under ``jit``: one compiled
step per stage, chosen on the host by the update count):

* warm-up, ``route_start`` updates: every token gets the full depth:
  ``routing="identity"`` (layer ``s mod L`` at step ``s``) with a budget that drops
  nothing: the pool learns first, as a sequential (or, ``S > L``, looped) model;
* then learned routing, the router starting close to the warm-up's routes
  (skip and exit lowered by ``router_bias_init``; radial mode: every layer but
  ``s mod L`` and the exit pushed down by ``router_align`` at step ``s``, a learned
  bias the router can undo), the capacity factor falling from ``capacity_start`` to
  ``capacity_end`` in ``capacity_stages`` equal steps over ``capacity_steps``
  updates, and staying there.

Options for routes that can reuse and exit (docs/design.md §5, *joint training*):

* ``visit_target``: the compute is a constraint, not a price: the weight of the soft
  depth term is a Lagrange multiplier, raised while the *hard* mean layer visits per
  token (what the routes execute) are above the target and lowered (not below 0)
  while they are under it, ``dual_lr`` per update per pool-size of excess. Fixed
  penalty weights can be met by the soft probabilities while the decisions stay
  put. The multiplier lives on the host: a resumed run restarts it at
  ``compute_weight``;
* ``explore_start`` -> ``explore_end``: the learned routes are chosen on noisy
  logits (``routing.Explore``), the noise scale annealed linearly over the learned
  updates, so that a straight-through gate sees the alternatives and not only the
  argmax (1: a sample of the router's softmax; 0: its argmax).

* ``mixture_steps``: after the warm-up, this many updates of mixture routing
  (``routing="mixture"``: every token through every layer of a step, updates
  weighted by the router's probabilities and survival; needs a capacity factor
  ``S``), so that the gradient compares layers, skipping and exiting, before the
  hard routes take over; the multiplier then follows the expected visits.

* ``start_routes="once"`` (radial, ``S > L``): learned routing starts near the
  sequential model's routes (layer ``s`` at step ``s < L``, then skip) rather
  than near the looped pool's; with ``route_start=0`` there is no looped
  warm-up at all, and reuse has to earn each extra visit from the model that
  does not loop.

With ``gate="straight_through"`` a visit's value is 1 before and after routing
starts (``"prob"`` scales every update by ``p`` and the network jumps when learned
routing begins); with a capacity factor ``S`` nothing is dropped while training.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from radial_jax.data.packed import TextData
from radial_jax.defaults import ROUTER_HIDDEN
from radial_jax.models.bundle import init_params
from radial_jax.models.perplexity import lm_cross_entropy
from radial_jax.radial import RadialConfig, RadialModel
from radial_jax.radial.router import aligned_step_bias, once_step_bias, with_keep_offset
from radial_jax.radial.routing import Explore
from radial_jax.radial.stats import route_rates
from radial_jax.training import losses
from radial_jax.training.distill_loss import expected_layer_visits, step_cost
from radial_jax.training.loop import TrainConfig, fit
from radial_jax.training.optim import make_optimizer
from radial_jax.training.pod_steps import joint_placement
from radial_jax.training.state import TrainState
from radial_jax.training.steps import make_train_step, to_host


CONTROLS = ("compute_weight", "explore")  # an update's scalars, the train step's ``frozen`` input


@dataclasses.dataclass(frozen=True)
class JointConfig:
    """Loss weights and the routing / capacity schedule (see the module docstring)."""

    mode: str = "ordered"
    gate: str = "prob"
    compute_weight: float = 0.05
    balance_weight: float = 0.01
    z_weight: float = 1e-3
    capacity_start: float = 1.0
    capacity_end: float = 0.75
    capacity_steps: int = 200
    capacity_stages: int = 3
    route_start: int = 100
    router_hidden: int = ROUTER_HIDDEN
    router_bias_init: float = 2.0
    router_align: float = 4.0
    visit_target: Optional[float] = None  # mean layer visits per token (None: fixed compute_weight)
    dual_lr: float = 0.05
    explore_start: float = 0.0
    explore_end: float = 0.0
    mixture_steps: int = 0
    start_routes: str = "loop"  # radial: the routes learned routing starts near ("loop" or "once")

    def __post_init__(self):
        if not (self.capacity_end > 0 and self.capacity_start > 0):
            raise ValueError(f"capacities must be > 0, got {self.capacity_start}, {self.capacity_end}")
        for name in ("capacity_steps", "capacity_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("route_start", "mixture_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("compute_weight", "balance_weight", "z_weight", "dual_lr", "explore_start", "explore_end"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.start_routes not in ("loop", "once"):
            raise ValueError(f"start_routes must be 'loop' (the pool in order, S / L times: the warm-up's routes) "
                             f"or 'once' (each layer once, then skip: the sequential model), got {self.start_routes!r}")
        if self.visit_target is not None and not self.visit_target > 0:
            raise ValueError(f"visit_target (mean layer visits per token) must be > 0, got {self.visit_target}")

    @property
    def explores(self) -> bool:
        return self.explore_start > 0 or self.explore_end > 0

    def explore_scale(self, step: int, steps: int) -> float:
        """The exploration noise at update ``step`` of ``steps``: 0 during the warm-up and the mixture, then
        linear from ``explore_start`` to ``explore_end`` over the hard learned updates."""
        start = self.route_start + self.mixture_steps
        if step < start:
            return 0.0
        frac = (step - start) / max(steps - 1 - start, 1)
        return float(self.explore_start + (self.explore_end - self.explore_start) * min(frac, 1.0))

    def dual_update(self, weight: float, visits: float, num_layers: int) -> float:
        """The compute multiplier after an update whose routes executed ``visits`` mean layer visits."""
        if self.visit_target is None:
            return weight
        return max(0.0, weight + self.dual_lr * (visits - self.visit_target) / num_layers)

    def stage(self, step: int, full_capacity: float = 1.0) -> tuple:
        """``(routing, capacity_factor)`` at update ``step``; ``full_capacity``: the capacity factor at
        which the warm-up's identity routes drop nothing (``S * K / L``)."""
        if step < self.route_start:
            return "identity", float(full_capacity)
        if step < self.route_start + self.mixture_steps:
            return "mixture", float(full_capacity)
        k = min(self.capacity_stages - 1, (step - self.route_start) * self.capacity_stages // self.capacity_steps)
        if self.capacity_stages == 1:
            return "learned", float(self.capacity_end)
        frac = k / (self.capacity_stages - 1)
        return "learned", float(self.capacity_start + (self.capacity_end - self.capacity_start) * frac)


def joint_loss_fn(network: RadialModel, cfg: JointConfig):
    """``loss(params, ids_bt, key, frozen) -> (loss, metrics)`` for one stage's network; ``frozen`` holds
    this update's controls: ``compute_weight`` (the multiplier) and ``explore`` (the noise scale)."""
    module, ordered = network.replace(prefill_buckets=1).module, network.radial.mode == "ordered"  # see distill
    L = network.config.num_layers

    def loss(params, ids_bt, key, frozen=None):
        controls = frozen or {"compute_weight": cfg.compute_weight, "explore": 0.0}
        explore = Explore(key, jnp.float32(controls["explore"])) if cfg.explores else None
        out = module.apply({"params": params}, ids_bt, explore=explore)
        lm, _ = lm_cross_entropy(out.logits, ids_bt)
        r = out.router
        depth = losses.compute_penalty(expected_layer_visits(r, ordered, L, step_cost(network, ids_bt.shape[1])), L)
        z = losses.router_z_loss(r.logits)
        total = lm + cfg.z_weight * z
        # the visits the routes make: the executed ones, or (mixture: every layer runs) the expected ones
        visits = depth * L if network.radial.is_mixture else out.metrics.mean_depth
        metrics = {"lm": lm, "soft_depth": depth, "z": z, "hard_depth": out.metrics.depth_fraction,
                   "visits": visits, "compute": out.metrics.compute_fraction, **route_rates(r, L)}
        if network.radial.learns_routes:
            total += controls["compute_weight"] * depth
            if not ordered:
                lb = losses.load_balance(r.probs, r.assign)
                total += cfg.balance_weight * lb
                metrics["balance"] = lb
        return total, metrics

    return loss


def train_joint(config, data: TextData, steps: Optional[int] = None, *, cfg: JointConfig = JointConfig(),
                train: Optional[TrainConfig] = None, run_dir: Optional[Union[str, Path]] = None,
                progress: bool = True, radial_kwargs: Optional[dict] = None, mesh=None, memory=None, rules=None):
    """Train a Radial Network over ``config`` (any decoder family's config) from scratch; returns
    ``(network, history)`` with ``network.params`` trained and ``network.radial`` the final stage's settings.
    ``radial_kwargs``: further ``RadialConfig`` fields (``max_steps`` for ``S > L``, ``cache_policy``, ...);
    ``mesh``, ``memory``, ``rules``: pod placement and memory settings (``radial_jax.training.pod_steps``)."""
    train = train or TrainConfig()
    if steps is not None:
        train = dataclasses.replace(train, steps=int(steps))
    train = train.with_schedule()
    if data.vocab_size > config.vocab_size:
        raise ValueError(f"the data's vocabulary ({data.vocab_size}) exceeds the model's ({config.vocab_size})")
    rc = RadialConfig(**{"mode": cfg.mode, "gate": cfg.gate, "router_hidden": cfg.router_hidden,
                         **(radial_kwargs or {})})
    L = config.num_layers
    S = rc.steps(L)
    full_capacity = S * rc.layers_per_step(L) / L  # phi = 1: nothing dropped
    if cfg.mixture_steps and (rc.ordered or min(cfg.capacity_start, cfg.capacity_end) < full_capacity):
        raise ValueError(f"mixture_steps={cfg.mixture_steps} runs every layer for every token: it needs mode="
                         f"'radial' and capacity_start, capacity_end >= {full_capacity:g} (S, nothing dropped); got "
                         f"mode={rc.mode!r}, {cfg.capacity_start:g}, {cfg.capacity_end:g}")
    base = init_params(config, seed=train.seed)
    network = RadialModel(config, rc, {}).replace(params=base, seed=train.seed)
    router = with_keep_offset(network.params["router"], cfg.router_bias_init)
    if not rc.ordered:
        start_bias = aligned_step_bias if cfg.start_routes == "loop" else once_step_bias
        router = {**router, "step_bias": router["step_bias"] + start_bias(L, S, cfg.router_align)}
    params = {**network.params, "router": router}
    tx = make_optimizer(train.optim)
    state = TrainState.create(params, tx, seed=train.seed)
    state, step_kwargs = joint_placement(network, state, tx, mesh, memory, rules, controls=CONTROLS)

    compiled = {}
    multiplier = [float(cfg.compute_weight)]  # the Lagrange multiplier (fixed without a visit_target)

    def stage_network(step):
        routing, capacity = cfg.stage(step, full_capacity)
        return network.replace(routing=routing, capacity_factor=capacity)

    def step_fn(state, batch):
        step = int(state.step)
        net = stage_network(step)
        key = (net.radial.routing, net.radial.capacity_factor)
        if key not in compiled:
            compiled[key] = make_train_step(joint_loss_fn(net, cfg), tx, **step_kwargs)
        controls = {"compute_weight": np.float32(multiplier[0]),  # the names of CONTROLS
                    "explore": np.float32(cfg.explore_scale(step, train.steps))}
        new, metrics = compiled[key](state, batch, controls)
        if net.radial.learns_routes and bool(metrics["finite"]):
            multiplier[0] = cfg.dual_update(multiplier[0], float(metrics["visits"]), L)
        return new, {**metrics, "capacity": np.float32(net.radial.capacity_factor), **controls}

    dataset = data.dataset(train.seq_len, train.batch_size, seed=train.seed, process_index=jax.process_index(),
                           process_count=jax.process_count())
    run_config = {"train": train.to_dict(), "joint": dataclasses.asdict(cfg), "radial": dataclasses.asdict(rc),
                  "model": dataclasses.asdict(config), "data": data.source}
    state, history = fit(state, step_fn, dataset, train, run_dir=run_dir, run_config=run_config,
                         progress=progress, desc="joint", mesh=mesh)
    final = stage_network(max(train.steps - 1, 0))
    return final.replace(params=to_host(state.params)), history

"""``RadialConfig``: the settings of a Radial Network's routed part (the base model keeps its family config).

Capacity (docs/design.md §4, *Capacity*): ``capacity_factor`` is the fraction of
the dense model's compute the network may spend. It becomes a *causal budget*
per sequence, step and layer: token ``p`` is admitted to layer ``l`` at step
``s`` if the router sends it there and fewer than
``floor(phi * (p + 1)) + capacity_slack`` earlier tokens of its own sequence were
admitted to ``l`` at ``s``, with ``phi = min(1, capacity_factor * L / (S * K))``
(``K`` layers considered per step: 1 in ordered mode, ``L`` in radial mode), so
that a saturated network spends ``capacity_factor`` of the dense compute in
either mode. ``capacity_factor = 1`` never binds in ordered mode; in radial mode
the ``L`` layers of a step together admit up to ``capacity_factor`` of the tokens
(balanced routes fit; ``capacity_factor = S`` lets any route through).

What runs is what was admitted, rounded up to a few static sizes: the parallel
forward picks, per step and layer, the smallest of a few sizes (multiples of
``C_max / prefill_buckets``, ``C_max = floor(phi * T) + slack``, and halvings of
the first: ``dispatch.prefill_sizes``) that holds the admitted tokens of every
row; decoding picks the smallest of ``0 .. 8`` and the eighths of the batch
(``dispatch.decode_sizes``); a layer nobody was admitted to runs nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from radial_jax.defaults import RATIO, ROUTER_HIDDEN
from radial_jax.models.config_base import check_field_types
from radial_jax.models.layer import RATIO_KINDS

MODES = ("ordered", "radial")
CACHE_POLICIES = ("mask", "propagate")
ROUTINGS = ("learned", "identity", "oracle", "mixture")
DISPATCHES = ("token", "expert")
GATES = ("straight_through", "prob")


@dataclasses.dataclass(frozen=True)
class RadialConfig:
    """Settings of the routed part.

    mode: ``"ordered"`` (step ``s`` uses or skips layer ``s``; ``S = L``) or ``"radial"``
      (any layer at any step, reuse, exit).
    max_steps: ``S`` (``None``: the pool size ``L``; ordered mode requires ``S = L``).
    capacity_factor: fraction of the dense compute (> 0); see the module docstring.
    capacity_slack: tokens every budget allows beyond ``floor(phi * (p + 1))`` (>= 0).
    prefill_buckets: static sizes the parallel forward rounds a layer's load up to (>= 1). Training
      runs 1 (one size; radial *propagate*'s exit fills are then differentiable); serving fits it to the
      loads (``RadialModel.fit_capacity``).
    cache_policy: ``"mask"`` (skipped entries stay empty) / ``"propagate"`` (skipping tokens
      write K/V from their current state; radial mode: exiting tokens fill every empty layer).
    routing: ``"learned"`` (the router), ``"identity"`` (every token to layer ``s mod L`` at
      step ``s``: the sequential model when ``S = L``, its pool looped ``S / L`` times
      otherwise), ``"oracle"`` (ordered only: the layer-level threshold rule of §3, needs
      ``threshold``), ``"mixture"`` (radial, training: every token through every layer of a step,
      each update times the router's probability of that layer and the token's survival, the
      product of ``1 - p_exit`` over earlier steps; needs ``capacity_factor >= S``, nothing dropped).
    dispatch: ``"token"`` (token choice, causal: the only one decoding serves) /
      ``"expert"`` (each layer takes its top-``C_max`` tokens: sees future tokens,
      a training-only option).
    gate: ``"straight_through"`` (update times ``1 + p - stop_grad(p)``: value 1, gradient
      of the router probability ``p``) / ``"prob"`` (times ``p``, MoE style).
    min_exit_step: radial mode: no token exits before this step (the exit column is masked at
      steps ``s < min_exit_step``; 1: the head never reads a raw embedding). 0: exits anywhere.
    """

    mode: str = "ordered"
    max_steps: Optional[int] = None
    capacity_factor: float = 1.0
    capacity_slack: int = 1
    prefill_buckets: int = 8
    cache_policy: str = "mask"
    routing: str = "learned"
    dispatch: str = "token"
    gate: str = "straight_through"
    router_hidden: int = ROUTER_HIDDEN
    router_last_layer: bool = False
    router_init_scale: float = 0.02
    min_exit_step: int = 0
    ratio_kind: str = RATIO
    scan_unroll: bool = False  # unroll the step loop (XLA's cost analysis counts a rolled loop body once)

    def __post_init__(self):
        check_field_types(self)  # numpy scalars are numbers: np.float32(0.5) becomes 0.5
        for name, value, allowed in (("mode", self.mode, MODES), ("cache_policy", self.cache_policy, CACHE_POLICIES),
                                     ("routing", self.routing, ROUTINGS), ("dispatch", self.dispatch, DISPATCHES),
                                     ("gate", self.gate, GATES), ("ratio_kind", self.ratio_kind, RATIO_KINDS)):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not supported; allowed: {allowed}")
        if isinstance(self.capacity_factor, bool) or not isinstance(self.capacity_factor, (int, float)) \
                or not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be a number > 0, got {self.capacity_factor!r}")
        for name in ("capacity_slack", "prefill_buckets", "router_hidden", "min_exit_step"):
            value = getattr(self, name)
            low = 0 if name in ("capacity_slack", "min_exit_step") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be an integer >= 1 (or None for the pool size), got {self.max_steps!r}")
        if self.min_exit_step and self.ordered:
            raise ValueError(f"min_exit_step={self.min_exit_step} limits exits, which only radial mode has; "
                             "leave it 0 in ordered mode")
        if self.routing == "mixture" and self.mode != "radial":
            raise ValueError("routing='mixture' mixes the layers of a step: it needs mode='radial'")
        if self.routing == "oracle" and self.mode != "ordered":
            raise ValueError("routing='oracle' imitates the sequential threshold rule: it needs mode='ordered'")

    @property
    def ordered(self) -> bool:
        return self.mode == "ordered"

    # What each routing mode implies, asked by name rather than by comparing strings elsewhere
    # (``radial.routing`` is where the modes decide):
    @property
    def learns_routes(self) -> bool:
        """The router's own probabilities choose (``learned``, ``mixture``): training moves the routes."""
        return self.routing in ("learned", "mixture")

    @property
    def is_oracle(self) -> bool:
        """Routes from the §3 threshold rule, probed per token at each step (``oracle``)."""
        return self.routing == "oracle"

    @property
    def is_mixture(self) -> bool:
        """Every token through every layer of a step, updates weighted by probability and survival."""
        return self.routing == "mixture"

    @property
    def is_identity(self) -> bool:
        """Layer ``s mod L`` at step ``s`` for every token: the sequential model, or its pool looped."""
        return self.routing == "identity"

    def steps(self, num_layers: int) -> int:
        """``S`` for a pool of ``num_layers`` layers (validated)."""
        if num_layers < 1:
            raise ValueError(f"the layer pool is empty (num_layers={num_layers}); need at least one layer")
        s = num_layers if self.max_steps is None else self.max_steps
        if self.ordered and s != num_layers:
            raise ValueError(f"ordered mode runs step s on layer s, so max_steps must equal the pool size "
                             f"{num_layers}; got {s}")
        return s

    def layers_per_step(self, num_layers: int) -> int:
        """``K``: the layers a step considers (ordered: 1; radial: all ``L``)."""
        return 1 if self.ordered else num_layers

    def budget_fraction(self, num_layers: int) -> float:
        """``phi``: the fraction of a sequence's tokens one layer may admit at one step."""
        S, K = self.steps(num_layers), self.layers_per_step(num_layers)
        return float(min(1.0, self.capacity_factor * num_layers / (S * K)))

    def max_capacity(self, num_layers: int, num_tokens: int) -> int:
        """``C_max``: the most tokens of one sequence of ``num_tokens`` one layer can admit at one step
        (the budget of its last position, computed as ``dispatch.budget`` does, in float32)."""
        phi = np.float32(self.budget_fraction(num_layers))
        return int(max(1, min(num_tokens, int(np.floor(phi * np.float32(num_tokens))) + self.capacity_slack)))

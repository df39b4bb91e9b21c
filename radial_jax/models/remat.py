"""Rematerialisation (gradient checkpointing) of each layer, with a choice of policy.

The loops over layers (``radial_jax.models.stack.run_pool``: the sequential
model's scan; ``radial_jax.radial.steps.run_steps``: the Radial Network's scan
over steps, one layer per step in ordered mode) wrap their body with
``remat_layer(body)``. What it does is set by the ``remat(policy)`` context
around the *tracing* of a train step (``make_train_step(..., remat=...)`` enters
it inside the jitted function, so each compiled step has one fixed policy):

* ``"none"``: nothing (every intermediate of the forward is kept for the backward);
* ``"full"``: keep only each layer's input; the backward recomputes the layer
  (``jax.checkpoint_policies.nothing_saveable``): least memory, one more forward;
* ``"dots"``: also keep matmul outputs (``dots_saveable``): no matmul is redone;
* ``"dots_no_batch"``: keep matmul outputs without batch dimensions
  (``dots_with_no_batch_dims_saveable``: the projections, not attention scores).

Remat changes only what is stored, never the values: loss and gradients are
equal with and without it (tested).
"""
from __future__ import annotations

import contextlib
import contextvars

import jax

POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_POLICY = contextvars.ContextVar("radial_jax_remat_policy", default="none")


def check_policy(name: str) -> str:
    if name not in POLICIES:
        raise ValueError(f"remat policy {name!r} is unknown; allowed: {sorted(POLICIES)}")
    return name


@contextlib.contextmanager
def remat(policy: str = "none"):
    """Within this context, ``remat_layer`` applies ``policy`` (see the module docstring)."""
    token = _POLICY.set(check_policy(policy))
    try:
        yield
    finally:
        _POLICY.reset(token)


def current_policy() -> str:
    return _POLICY.get()


def remat_layer(body):
    """``body`` (a scan body over layers or steps) under the current remat policy."""
    name = _POLICY.get()
    if name == "none":
        return body
    # prevent_cse=False: inside a scan the loop already keeps XLA from merging the recomputation away
    return jax.checkpoint(body, policy=POLICIES[name], prevent_cse=False)

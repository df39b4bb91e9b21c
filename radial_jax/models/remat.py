"""Per-layer hooks of the loops over layers: rematerialisation (gradient checkpointing) with a choice of
policy, and batch-sharding constraints on the activations.

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

``shard_batch(tree, axis)`` pins the activations carried from layer to layer (and a
Radial Network's KV cache) to the batch sharding (the ``batch`` rule of
``radial_jax.scale.sharding.AXIS_RULES``) inside a ``batch_sharded(mesh)`` context (the
sharded train step enters it). Without it XLA may split activations along
``embed`` like the fsdp-sharded weights and keep the whole batch on every
device; with it each device keeps its own rows and gathers each layer's weights
(fully sharded data parallelism). Outside the context it does nothing.
"""
from __future__ import annotations

import contextlib
import contextvars

import jax

from radial_jax.scale.sharding import AXIS_RULES

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


_BATCH_MESH = contextvars.ContextVar("radial_jax_batch_mesh", default=None)


@contextlib.contextmanager
def batch_sharded(mesh):
    """Within this context (while tracing), ``shard_batch`` constrains activations to ``mesh``'s batch axes."""
    token = _BATCH_MESH.set(mesh)
    try:
        yield
    finally:
        _BATCH_MESH.reset(token)


def shard_batch(tree, axis: int = 0):
    """Every array of ``tree`` constrained to be split over the batch mesh axes along ``axis`` (when that
    dimension divides evenly); unchanged outside ``batch_sharded``."""
    mesh = _BATCH_MESH.get()
    if mesh is None:
        return tree
    from jax.sharding import NamedSharding, PartitionSpec
    names = dict(AXIS_RULES)["batch"]
    names = names if isinstance(names, tuple) else (names,)
    size = 1
    for n in names:
        size *= mesh.shape[n]

    def one(x):
        if not hasattr(x, "ndim") or x.ndim <= axis or x.shape[axis] % size:
            return x
        spec = PartitionSpec(*([None] * axis), names)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return jax.tree_util.tree_map(one, tree)

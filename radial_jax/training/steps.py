"""Train steps: a pure, jitted ``(state, batch) -> (state, metrics)``, optionally sharded on a mesh.

``make_train_step(loss_fn, tx)`` works for any ``loss_fn(params, batch, key) ->
(loss, metrics)`` (LM, distillation, joint). A non-finite loss or gradient
leaves the state unchanged inside the step (so the in-memory state stays the
last good one) and sets ``metrics["finite"] = False``; the training loop then
stops with ``NonFiniteLossError`` naming the step and batch.

Sharding (DESIGN.md §6): ``shard_train_state`` places parameters by their
logical axis names through the one rules table (``radial_jax.sharding``), the
optimiser moments inherit the parameters' shardings, the batch is split over
``data`` x ``fsdp``; ``jit`` keeps the state's shardings on output. On a
multi-host pod every process passes its own rows (``global_batch``) and the
same parameters.
"""
from __future__ import annotations

from typing import Callable, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from radial_jax.sharding import _fit, batch_sharding
from radial_jax.training.state import TrainState


class NonFiniteLossError(FloatingPointError):
    """The loss (or a gradient) became NaN/inf: training stopped, the last good checkpoint is intact."""

    def __init__(self, step: int, data_pos: int, batch, loss):
        self.step, self.data_pos, self.batch, self.loss = step, data_pos, batch, loss
        super().__init__(
            f"non-finite loss {loss} at step {step} (data position {data_pos}, batch shape "
            f"{np.shape(batch)}); the state was not updated and no checkpoint was written for this step")


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, *, jit: bool = True,
                    state_shardings=None, batch_shardings=None, donate: bool = False):
    """``step(state, batch) -> (state, metrics)``.

    ``loss_fn(params, batch, key) -> (loss, metrics_dict)``; ``key`` is a fresh PRNG key per step. A
    ``loss_fn`` with attribute ``needs_step = True`` also gets ``step=`` (the update count, for schedules).
    """

    def step(state: TrainState, batch):
        extra = {"step": state.step} if getattr(loss_fn, "needs_step", False) else {}
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, state.rng(), **extra)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, data_pos=state.data_pos + 1)
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, state)
        return new, {**aux, "loss": loss, "grad_norm": grad_norm, "finite": finite}

    if not jit:
        return step
    if state_shardings is None:
        return jax.jit(step, donate_argnums=(0,) if donate else ())
    return jax.jit(step, in_shardings=(state_shardings, batch_shardings), out_shardings=(state_shardings, None),
                   donate_argnums=(0,) if donate else ())


def debug_checks(old: TrainState, new: TrainState, batch, expected_batch_shape=None) -> None:
    """chex checks (debug mode, on the host after a step): shapes kept, all values finite."""
    if expected_batch_shape is not None:
        chex.assert_shape(np.asarray(batch) if not hasattr(batch, "shape") else batch, expected_batch_shape)
    chex.assert_trees_all_equal_shapes_and_dtypes(old.params, new.params)
    chex.assert_tree_all_finite(new.params)
    chex.assert_tree_all_finite(new.opt_state)


# -- placement ------------------------------------------------------------------------------------------
def place(x, sharding: NamedSharding):
    """A global array with ``sharding`` from a host value every process holds in full."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def param_shardings(params, specs, mesh: Mesh):
    """NamedShardings for ``params`` from logical ``specs`` (None specs: replicated)."""
    if specs is None:
        return jax.tree_util.tree_map(lambda p: NamedSharding(mesh, PartitionSpec()), params)
    return jax.tree_util.tree_map(lambda p, s: NamedSharding(mesh, _fit(s, np.shape(p), mesh)), params, specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_train_state(state: TrainState, tx: optax.GradientTransformation, mesh: Mesh, specs=None):
    """``(sharded_state, state_shardings)``: params placed by ``specs``, moments following them."""
    p_sh = param_shardings(state.params, specs, mesh)
    params = jax.tree_util.tree_map(lambda p, s: place(p, s), state.params, p_sh)
    rep = NamedSharding(mesh, PartitionSpec())
    opt_state = jax.jit(tx.init)(params)  # zeros_like inherits the params' shardings
    host_opt = jax.device_get(state.opt_state)
    opt_state = jax.tree_util.tree_map(
        lambda ref, v: place(v, ref.sharding if isinstance(ref.sharding, NamedSharding) else rep), opt_state, host_opt)
    new = state.replace(params=params, opt_state=opt_state, step=place(state.step, rep),
                        key=place(state.key, rep), data_pos=place(state.data_pos, rep))
    return new, jax.tree_util.tree_map(lambda a: a.sharding, new)


def to_host(tree):
    """Numpy copies of (possibly sharded, multi-process) arrays: gathered across processes when needed."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def global_batch(local_rows, mesh: Mesh):
    """The global batch array from this process's rows (batch axis over data x fsdp)."""
    local_rows = np.asarray(local_rows)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, local_rows.ndim), local_rows)


def make_sharded_train_step(loss_fn, tx, state, mesh: Mesh, specs=None, batch_ndim: int = 2):
    """``(step_fn, sharded_state)``: the jitted step with fixed in/out shardings on ``mesh``."""
    sharded, shardings = shard_train_state(state, tx, mesh, specs)
    step = make_train_step(loss_fn, tx, state_shardings=shardings, batch_shardings=batch_sharding(mesh, batch_ndim))
    return step, sharded

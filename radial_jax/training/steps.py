"""Train steps: a pure, jitted ``(state, batch) -> (state, metrics)``, optionally sharded on a mesh.

``make_train_step(loss_fn, tx)`` works for any ``loss_fn(params, batch, key) ->
(loss, metrics)`` (LM, distillation, joint). A non-finite loss or gradient
leaves the state unchanged inside the step (so the in-memory state stays the
last good one) and sets ``metrics["finite"] = False``; the training loop then
stops with ``NonFiniteLossError`` naming the step and batch.

Sharding (docs/design.md §6): ``shard_train_state`` places parameters by their
logical axis names through the one rules table (``radial_jax.scale.sharding``), the
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

from radial_jax.models.remat import batch_sharded, remat
from radial_jax.scale.sharding import batch_sharding, param_shardings, place
from radial_jax.training.memory import MemoryConfig, cast_floating, split_micro
from radial_jax.training.optim import param_path_keys
from radial_jax.training.state import TrainState


class NonFiniteLossError(FloatingPointError):
    """The loss (or a gradient) became NaN/inf: training stopped, the last good checkpoint is intact."""

    def __init__(self, step: int, data_pos: int, batch, loss):
        self.step, self.data_pos, self.batch, self.loss = step, data_pos, batch, loss
        super().__init__(
            f"non-finite loss {loss} at step {step} (data position {data_pos}, batch shape "
            f"{np.shape(batch)}); the state was not updated and no checkpoint was written for this step: the "
            "last good checkpoint is intact (rerun to resume from it, e.g. with a lower learning rate)")


def _loss_and_grads(loss_fn, params, batch, key, extra, memory: MemoryConfig):
    """``((loss, aux), grads)`` of ``loss_fn`` at ``params`` under ``memory`` (cast, micro-batches)."""
    def f(p, b, k):
        return loss_fn(cast_floating(p, memory.dtype) if memory.mixed else p, b, k, **extra)

    value_and_grad = jax.value_and_grad(f, has_aux=True)
    if memory.grad_accum == 1:
        return value_and_grad(params, batch, key)
    k = memory.grad_accum
    micro = split_micro(batch, k)
    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    (_, aux_shape), _ = jax.eval_shape(value_and_grad, params, first, key)
    zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, jnp.float32), aux_shape),
             jax.tree_util.tree_map(jnp.zeros_like, params))

    def body(acc, xs):
        b, i = xs
        (loss, aux), grads = value_and_grad(params, b, jax.random.fold_in(key, i))
        new = (loss.astype(jnp.float32), jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), aux), grads)
        return jax.tree_util.tree_map(jnp.add, acc, new), None

    (loss, aux, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(k)))
    return jax.tree_util.tree_map(lambda a: a / k, ((loss, aux), grads))


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, *, jit: bool = True,
                    state_shardings=None, batch_shardings=None, frozen_shardings=None, donate: bool = False,
                    memory: Optional[MemoryConfig] = None, mesh: Optional[Mesh] = None):
    """``step(state, batch, frozen=None) -> (state, metrics)``.

    ``loss_fn(params, batch, key) -> (loss, metrics_dict)``; ``key`` is a fresh PRNG key per step.
    ``frozen``: a pytree of arrays the loss reads but does not train (a distillation teacher's
    parameters), passed as ``loss_fn(..., frozen=frozen)``: an input of the compiled step, sharded by
    ``frozen_shardings``, never a constant baked into it. ``memory``: remat, mixed precision, gradient
    accumulation, donation (``radial_jax.training.memory``; ``donate=True`` here also donates).
    ``mesh`` (default: that of ``batch_shardings``): activations are kept split over its batch axes
    (``radial_jax.models.remat.shard_batch``).
    """
    memory = memory or MemoryConfig()
    if mesh is None and isinstance(batch_shardings, NamedSharding):
        mesh = batch_shardings.mesh

    def step(state: TrainState, batch, frozen=None):
        extra = {}
        if jax.tree_util.tree_leaves(frozen):
            extra["frozen"] = frozen
        with remat(memory.remat), batch_sharded(mesh):  # entered while tracing: fixed for this compiled step
            (loss, aux), grads = _loss_and_grads(loss_fn, state.params, batch, state.rng(), extra, memory)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, data_pos=state.data_pos + 1)
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, state)
        return new, {**aux, "loss": loss, "grad_norm": grad_norm, "finite": finite}

    if not jit:
        return step
    jitted = jit_train_step(step, state_shardings, batch_shardings, frozen_shardings,
                            donate=donate or memory.donate)

    def run(state, batch, frozen=None):
        return jitted(state, batch, {} if frozen is None else frozen)

    run.jitted = jitted  # for .lower(...) (radial-jax plan)
    return run


def jit_train_step(step, state_shardings=None, batch_shardings=None, frozen_shardings=None, donate: bool = False):
    """``jax.jit`` of ``step(state, batch, frozen)`` with the state's shardings kept on output."""
    donate_argnums = (0,) if donate else ()
    if state_shardings is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    frozen_shardings = {} if frozen_shardings is None else frozen_shardings
    return jax.jit(step, in_shardings=(state_shardings, batch_shardings, frozen_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=donate_argnums)


def debug_checks(old: TrainState, new: TrainState, batch, expected_batch_shape=None) -> None:
    """chex checks (debug mode, on the host after a step): shapes kept, all values finite."""
    if expected_batch_shape is not None:
        chex.assert_shape(np.asarray(batch) if not hasattr(batch, "shape") else batch, expected_batch_shape)
    chex.assert_trees_all_equal_shapes_and_dtypes(old.params, new.params)
    chex.assert_tree_all_finite(new.params)
    chex.assert_tree_all_finite(new.opt_state)


# -- placement ------------------------------------------------------------------------------------------
def opt_state_shardings(opt_state, params, p_shardings, mesh: Mesh):
    """Shardings of an optimiser state: a leaf takes the sharding of the parameter whose path ends its own
    path and whose shape it has (Adam's moments, ``mu/layers/fc1/kernel``); any other leaf (counts,
    schedules' state) is replicated. ``opt_state`` / ``params`` may be abstract (``jax.eval_shape``)."""
    flat = {param_path_keys(path): (np.shape(p), s) for (path, p), s in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(p_shardings))}
    rep = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        key = param_path_keys(path)
        for i in range(len(key)):
            hit = flat.get(key[i:])
            if hit is not None and hit[0] == np.shape(leaf):
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def state_shardings(state: TrainState, p_shardings, mesh: Mesh) -> TrainState:
    """The ``TrainState``-shaped tree of shardings: parameters by ``p_shardings``, optimiser state following
    them, counters and key replicated."""
    rep = NamedSharding(mesh, PartitionSpec())
    return state.replace(step=rep, params=p_shardings,
                         opt_state=opt_state_shardings(state.opt_state, state.params, p_shardings, mesh),
                         key=rep, data_pos=rep)


def shard_train_state(state: TrainState, tx: optax.GradientTransformation, mesh: Mesh, specs=None):
    """``(sharded_state, state_shardings)`` from a host (or one-device) state every process holds in full:
    params placed by ``specs``, optimiser moments sharded like their parameters."""
    del tx  # the state already holds the optimiser state
    shardings = state_shardings(state, param_shardings(state.params, specs, mesh), mesh)
    return jax.tree_util.tree_map(place, state, shardings), shardings


def init_sharded_state(params, tx: optax.GradientTransformation, mesh: Mesh, p_shardings, seed: int = 0):
    """``(state, state_shardings)`` for parameters already placed on ``mesh`` (``rj.load(mesh=...)``): the
    optimiser state is created on the devices, sharded like the parameters; nothing passes through a host."""
    abstract = jax.eval_shape(lambda p: TrainState.create(p, tx, seed), params)
    shardings = state_shardings(abstract, p_shardings, mesh)
    fresh = TrainState.create(params, tx, seed)  # only for its small leaves and structure
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    rep = shardings.step
    state = fresh.replace(opt_state=opt_state, step=place(np.asarray(fresh.step), rep),
                          key=place(np.asarray(fresh.key), rep), data_pos=place(np.asarray(fresh.data_pos), rep))
    return state, shardings


def abstract_state(params_abstract, tx: optax.GradientTransformation, mesh: Mesh, p_shardings, seed: int = 0):
    """``(state, shardings)`` of ``jax.ShapeDtypeStruct`` leaves carrying their shardings: a train state
    for compiling a step without allocating it (``radial-jax plan``)."""
    abstract = jax.eval_shape(lambda p: TrainState.create(p, tx, seed), params_abstract)
    shardings = state_shardings(abstract, p_shardings, mesh)
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract, shardings), shardings


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


def make_sharded_train_step(loss_fn, tx, state, mesh: Mesh, specs=None, batch_ndim: int = 2, *,
                            memory: Optional[MemoryConfig] = None, frozen=None, frozen_shardings=None):
    """``(step_fn, sharded_state)``: the jitted step with fixed in/out shardings on ``mesh``.

    ``state``: a host state (placed here by ``specs``) or ``(state, state_shardings)`` already on the mesh
    (``init_sharded_state``). ``frozen``: arrays already placed (``frozen_shardings``: theirs), given to every
    step (a distillation teacher).
    """
    if isinstance(state, tuple):
        sharded, shardings = state
    else:
        sharded, shardings = shard_train_state(state, tx, mesh, specs)
    if frozen is not None and frozen_shardings is None:
        frozen_shardings = jax.tree_util.tree_map(lambda a: a.sharding, frozen)
    step = make_train_step(loss_fn, tx, state_shardings=shardings, batch_shardings=batch_sharding(mesh, batch_ndim),
                           frozen_shardings=frozen_shardings, memory=memory)
    if frozen is None:
        return step, sharded

    def with_frozen(state, batch):
        return step(state, batch, frozen)

    with_frozen.jitted = step.jitted
    return with_frozen, sharded

"""The distillation step at pod scale: teacher frozen and sharded, student pool sharded, router replicated.

``distill_step(student, teacher, cfg, tx, params, mesh=..., memory=...)`` returns
``(step_fn, state)`` for ``radial_jax.training.loop.fit``; ``radial-jax plan``
compiles the very same step on abstract inputs (``distill_parts``).

Placement (one rules table, ``radial_jax.scale.sharding``): the student's parameters
are the teacher's names plus ``router``; the pool, embeddings and head take the
teacher's logical axes (``logical_specs`` of the teacher's module, so the pool
is split by ``rules``: the fsdp layout by default, ``override_rules(layers="fsdp")``
for whole layers over ``fsdp`` like experts); the router is small and replicated.
Optimiser moments follow their parameters. The batch is split over ``data`` x ``fsdp``.

The teacher (``cfg.train == "all"``) is an *input* of the compiled step (never a
constant baked into it), frozen, sharded like the student's pool and kept in the
compute dtype (bf16 under mixed precision: half the bytes, no master copy, no
moments). With ``cfg.train == "router"`` the teacher's layers are the student's own
frozen layers (no second copy).

The state's parameters are always a fresh copy of ``params`` (float32 masters), so
a donating step never frees the caller's arrays.
"""
from __future__ import annotations

from typing import Optional

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from radial_jax.models.bundle import Model, example_inputs
from radial_jax.models.family import module_for
from radial_jax.radial import RadialModel
from radial_jax.scale.sharding import AXIS_RULES, batch_sharding, logical_specs, param_shardings, place, to_mesh
from radial_jax.training.distill_loss import distill_loss_fn, without_router
from radial_jax.training.memory import MemoryConfig, cast_floating
from radial_jax.training.state import TrainState
from radial_jax.training.steps import init_sharded_state, make_sharded_train_step, make_train_step, state_shardings


def radial_param_shardings(teacher_module, config, params, mesh: Mesh, rules=None):
    """Shardings of a Radial Network's parameters: the teacher's logical axes for its names, the router
    replicated."""
    specs = logical_specs(teacher_module, *example_inputs(config), rules=AXIS_RULES if rules is None else rules)
    base = param_shardings({k: v for k, v in params.items() if k != "router"}, specs, mesh)
    rep = NamedSharding(mesh, PartitionSpec())
    return {**base, "router": jax.tree_util.tree_map(lambda _: rep, params["router"])}


def distill_loss(student, teacher_config, cfg, dtype):
    """``loss(params, ids, key, frozen=None)``: ``distill_loss_fn`` with the teacher's parameters given per call
    (``frozen``) instead of captured; modules built with ``dtype`` (the compute dtype)."""
    compute = RadialModel(student.config, student.radial, student.params, dtype=dtype, name=student.name)

    def loss(params, ids_bt, key, frozen=None):
        teacher = Model(teacher_config, without_router(params) if frozen is None else frozen, dtype=dtype)
        return distill_loss_fn(compute, teacher, cfg)(params, ids_bt, key)

    return loss


def distill_parts(student, teacher, cfg, memory: MemoryConfig, mesh: Optional[Mesh], rules=None):
    """``(loss_fn, param_shardings or None, frozen_dtype or None)``: what both the real step and the plan use.
    ``frozen_dtype`` is None when the step takes no teacher input (``train == "router"``)."""
    loss_fn = distill_loss(student, teacher.config, cfg, memory.dtype)
    p_sh = None if mesh is None else radial_param_shardings(teacher.module, teacher.config, student.params, mesh,
                                                             rules)
    return loss_fn, p_sh, (memory.dtype if cfg.train == "all" else None)


def distill_step(student, teacher, cfg, tx, params, *, mesh: Optional[Mesh] = None,
                 memory: Optional[MemoryConfig] = None, rules=None, seed: int = 0):
    """``(step_fn, state)`` of distillation, on one device or sharded on ``mesh`` (see the module docstring)."""
    memory = memory or MemoryConfig()
    loss_fn, p_sh, frozen_dtype = distill_parts(student, teacher, cfg, memory, mesh, rules)
    if mesh is None:
        frozen = None
        if frozen_dtype is not None:
            frozen = cast_floating(jax.tree_util.tree_map(jax.numpy.asarray, teacher.params), frozen_dtype)
        state = TrainState.create(jax.tree_util.tree_map(jax.numpy.array, params), tx, seed=seed)  # a copy
        step = make_train_step(loss_fn, tx, memory=memory)
        return (step if frozen is None else (lambda s, b: step(s, b, frozen))), state
    placed = to_mesh(params, p_sh, dtype=jax.numpy.float32, copy=True)
    state_and_shardings = init_sharded_state(placed, tx, mesh, p_sh, seed=seed)
    frozen = None
    if frozen_dtype is not None:
        frozen = to_mesh(teacher.params, without_router(p_sh), dtype=frozen_dtype)
    return make_sharded_train_step(loss_fn, tx, state_and_shardings, mesh, memory=memory, frozen=frozen)


def joint_placement(network, state, tx, mesh: Optional[Mesh] = None, memory: Optional[MemoryConfig] = None,
                    rules=None, controls=()):
    """``(state, make_train_step kwargs)`` of joint training (``train_joint``): on ``mesh`` the network's
    parameters are placed like distillation's student (its base module's logical axes, the router
    replicated), optimiser moments like their parameters, the batch over data x fsdp, and the scalars named
    in ``controls`` (the step's ``frozen`` input) replicated."""
    memory = memory or MemoryConfig()
    if mesh is None:
        return state, {"memory": memory}
    p_sh = radial_param_shardings(module_for(network.config), network.config, state.params, mesh, rules)
    shardings = state_shardings(state, p_sh, mesh)
    state = jax.tree_util.tree_map(place, state, shardings)
    replicated = NamedSharding(mesh, PartitionSpec())
    return state, {"memory": memory, "state_shardings": shardings, "batch_shardings": batch_sharding(mesh, 2),
                   "frozen_shardings": {name: replicated for name in controls}}

"""Device mesh and the one table of logical-axis rules (docs/design.md §6).

Parameters carry logical axis names (``layers``, ``embed``, ``mlp``, ``heads``,
``kv``, ``vocab``); activations use ``batch``. ``AXIS_RULES`` maps them to the mesh
axes ``data``, ``fsdp``, ``tensor``. Change the mapping here and only here (or pass
``rules=`` for an experiment, e.g. ``override_rules(layers="fsdp")`` to shard the
layer pool like an expert axis).
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

AXIS_RULES: tuple = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
)


def override_rules(**changes) -> tuple:
    """``AXIS_RULES`` with some logical axes remapped, e.g. ``override_rules(layers="fsdp")``."""
    unknown = set(changes) - {name for name, _ in AXIS_RULES}
    if unknown:
        raise ValueError(f"unknown logical axes {sorted(unknown)}; known: {[n for n, _ in AXIS_RULES]}")
    return tuple((name, changes.get(name, mesh)) for name, mesh in AXIS_RULES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Optional[Sequence] = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all); ``-1`` takes what is left."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into fsdp*tensor={known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_specs(module: nn.Module, *example_args, rules=AXIS_RULES, **example_kwargs):
    """PartitionSpecs of the module's params (a tree like ``params``), resolved through ``rules``."""
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_args, **example_kwargs))
    logical = nn.get_partition_spec(abstract)["params"]
    return nn.logical_to_mesh(logical, rules)


def fit_spec(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide their dimension (small vocabularies, odd sizes)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(axes if size and dim % size == 0 else None)
    return PartitionSpec(*out)


# -- placement: the one way a value reaches a mesh ------------------------------------------------------
def place(x, sharding: NamedSharding, dtype=None, copy: bool = False):
    """``x`` as a global array with ``sharding``, optionally cast to ``dtype``.

    A host value (every process holds it whole) is cut by each process to its own devices' slices; a jax
    array already placed alike (or spread over several hosts) is moved as it is, and ``copy=True`` never
    returns the caller's buffer."""
    if isinstance(x, jax.Array) and (not x.is_fully_addressable or x.sharding.is_equivalent_to(sharding, x.ndim)):
        y = x if dtype is None or x.dtype == dtype else x.astype(dtype)
        if y is x and copy:
            return jax.device_put(x, sharding, may_alias=False)
        return jax.device_put(y, sharding)
    value = np.asarray(x) if dtype is None else np.asarray(x).astype(dtype)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def to_mesh(tree, shardings, dtype=None, copy: bool = False):
    """Every leaf of ``tree`` placed by the matching leaf of ``shardings`` (``place``)."""
    return jax.tree_util.tree_map(lambda x, s: place(x, s, dtype, copy), tree, shardings)


def replicate(x, mesh: Mesh):
    """``x`` replicated on every device of ``mesh`` (``place``)."""
    return place(x, NamedSharding(mesh, PartitionSpec()))


def param_shardings(params, specs, mesh: Mesh):
    """NamedShardings for ``params`` from logical ``specs`` (None specs: replicated); a mesh axis that does not
    divide its dimension is dropped (``fit_spec``)."""
    if specs is None:
        return jax.tree_util.tree_map(lambda p: NamedSharding(mesh, PartitionSpec()), params)
    return jax.tree_util.tree_map(lambda p, s: NamedSharding(mesh, fit_spec(s, np.shape(p), mesh)), params, specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_params(params, specs, mesh: Mesh):
    """Place ``params`` on ``mesh`` by ``specs`` (from ``logical_specs``)."""
    return to_mesh(params, param_shardings(params, specs, mesh))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Shard the leading (batch) axis over ``data`` and ``fsdp``, the rest replicated."""
    axis = dict(AXIS_RULES)["batch"]
    return NamedSharding(mesh, PartitionSpec(axis, *([None] * (ndim - 1))))

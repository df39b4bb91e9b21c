"""``ShardedModel``: a ``Model`` whose parameters are global arrays on a mesh (``rj.load(..., mesh=mesh)``).

The forward runs where the parameters are (GSPMD: the axis rules placed them);
its inputs are placed replicated and its outputs come back replicated, so that
every process of a multi-host run can read them (profiling, simulation and
evaluation read logits and statistics on the host). Everything else is
``Model``'s.
"""
from __future__ import annotations

import functools

import jax
from jax.sharding import NamedSharding, PartitionSpec

from radial_jax.models.bundle import Model
from radial_jax.scale.sharding import replicate

STATIC = ("ratio_kind", "compute_logits", "embeddings_only")


@functools.lru_cache(maxsize=None)
def _replicated_apply(module, mesh):
    rep = NamedSharding(mesh, PartitionSpec())
    return jax.jit(lambda params, *args, **kwargs: module.apply({"params": params}, *args, **kwargs),
                   static_argnames=STATIC, out_shardings=rep)


class ShardedModel(Model):
    """A ``Model`` on ``mesh``; see the module docstring."""

    def __init__(self, config, params, *, mesh, **kwargs):
        super().__init__(config, params, **kwargs)
        self.mesh = mesh

    def _apply(self, params, *args, **kwargs):
        args = tuple(replicate(a, self.mesh) for a in args)
        kwargs = {k: v if k in STATIC or v is None else replicate(v, self.mesh) for k, v in kwargs.items()}
        return _replicated_apply(self.module, self.mesh)(params, *args, **kwargs)

    def __repr__(self):
        return super().__repr__()[:-1] + f", mesh {dict(self.mesh.shape)})"

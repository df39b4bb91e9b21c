"""Memory settings of a train step: remat, bf16 compute on fp32 master weights, gradient accumulation, donation.

``MemoryConfig`` is given to ``make_train_step`` (and through it to every trainer
and to ``radial-jax plan``); its defaults change nothing (fp32, no remat, one
micro-batch). What each setting does inside the step:

* ``remat``: a policy of ``radial_jax.models.remat`` applied to every layer of the
  scans (the sequential stack, the Radial Network's steps);
* ``compute_dtype="bfloat16"``: *mixed precision*. The state keeps float32 master
  parameters and float32 optimiser moments; the loss is evaluated on a bfloat16
  copy of the parameters (``cast_floating``) with modules built with
  ``dtype=bfloat16`` (activations in bf16; norms, softmax and losses in fp32 as
  the modules already do), so the gradient w.r.t. the float32 masters is float32
  and the update is applied in float32;
* ``grad_accum=k``: the global batch is split into ``k`` micro-batches (row ``b``
  goes to micro-batch ``b % k``, so every device keeps its own rows); their
  gradients are summed in a ``lax.scan`` and divided by ``k``: the mean of the
  micro-batch losses, equal to the whole batch's mean loss when every micro-batch
  counts the same number of tokens (packed fixed windows, what the data pipeline
  gives); reported metrics are micro-batch means;
* ``donate``: the step donates its input state (XLA reuses its buffers for the new
  state, so parameters and optimiser state are not held twice). Off in debug mode,
  which compares the old state with the new.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from radial_jax.models.family import resolve_dtype
from radial_jax.models.remat import check_policy


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    remat: str = "none"  # radial_jax.models.remat.POLICIES
    compute_dtype: str = "float32"  # "bfloat16": mixed precision (fp32 masters and moments)
    grad_accum: int = 1  # micro-batches per step
    donate: bool = False  # donate the input state to the step

    def __post_init__(self):
        check_policy(self.remat)
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16' (float32 master weights either way); "
                             f"got {self.compute_dtype!r}")
        if isinstance(self.grad_accum, bool) or not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise ValueError(f"grad_accum must be an integer >= 1, got {self.grad_accum!r}")

    @property
    def dtype(self):
        """The compute dtype as a jnp dtype (what the modules are built with)."""
        return resolve_dtype(self.compute_dtype)

    @property
    def mixed(self) -> bool:
        return self.compute_dtype != "float32"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cast_floating(tree, dtype):
    """Every floating leaf of ``tree`` in ``dtype`` (integer leaves untouched)."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def split_micro(batch, k: int):
    """``[B, ...]`` leaves -> ``[k, B // k, ...]``; row ``b`` goes to micro-batch ``b % k``."""
    def one(x):
        if x.shape[0] % k:
            raise ValueError(f"the batch of {x.shape[0]} rows cannot be split into grad_accum={k} micro-batches")
        return jnp.moveaxis(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 1, 0)
    return jax.tree_util.tree_map(one, batch)

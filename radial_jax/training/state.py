"""The training state: everything a run needs to continue exactly.

``TrainState`` is a pytree (params, optimiser state, step, PRNG key data and the
data position), so it can be jitted, sharded and checkpointed as one tree.
The PRNG key is kept as raw ``uint32`` key data (``jax.random.key_data``) so
that checkpoints are plain arrays.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser updates done
    params: dict
    opt_state: optax.OptState
    key: jax.Array  # uint32 raw key data
    data_pos: jax.Array  # int32 scalar: global batches consumed from the pipeline

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, seed: int = 0) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   key=jax.random.key_data(jax.random.key(seed)), data_pos=jnp.zeros((), jnp.int32))

    def rng(self) -> jax.Array:
        """A typed key for this step (the stored key folded with the step)."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.key), self.step)

    def as_dict(self) -> dict:
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state, "key": self.key,
                "data_pos": self.data_pos}

    def replace_from_dict(self, d: dict) -> "TrainState":
        return self.replace(**d)

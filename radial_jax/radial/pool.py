"""The layer pool a Radial Network's steps read, in either layout, behind one interface.

``models.stack`` defines the two layouts of a pool and ``models.kv_cache`` those of a
cache; both compute the same values:

* **stacked**: leaves ``[L, ...]`` and one cache of ``L`` layers. A layer is picked by
  an index that may be traced, so a loop over layers or steps compiles one body
  (training, sharding).
* **per-layer**: a tuple of ``L`` layers and a tuple of ``L`` single-layer caches. Every
  index is a Python int, loops are unrolled, and every layer's weights and cache are
  read in place (serving: XLA on CPU copies a slice taken out of a stack).

A ``Pool`` runs the layer-level control flow of a step in its own layout: the cache
layout it works on (``own`` / ``restore``), a loop over the layers (``fold``, ``scan``), and one
layer picked by a traced step (``pick``, ``write_picked``). ``radial.steps`` asks the
pool and has no layout branch of its own.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from radial_jax.models.kv_cache import is_split, split_layers, stack_layers, write_layer
from radial_jax.models.stack import is_per_layer, meta_at, pool_layer, stack_pool


@dataclasses.dataclass(frozen=True, eq=False)
class Pool:
    """``params``: the pool in either layout; ``meta``: per-layer data, leaves ``[L, ...]`` (``meta_at``)."""

    params: Any
    meta: dict
    num_layers: int

    @property
    def per_layer(self) -> bool:
        return is_per_layer(self.params)

    def stacked(self) -> "Pool":
        """The same pool in the stacked layout (for steps that pick layers by a traced index)."""
        return dataclasses.replace(self, params=stack_pool(self.params))

    def layer(self, l):
        """``(params_l, meta_l)`` of layer ``l``: a Python int (per-layer) or an int that may be traced (stacked)."""
        return pool_layer(self.params, l), meta_at(self.meta, l)

    def own(self, kv):
        """``kv`` in this pool's layout: split per layer for a per-layer pool, one stacked cache otherwise."""
        if self.per_layer:
            return kv if is_split(kv) else split_layers(kv)
        return stack_layers(kv) if is_split(kv) else kv

    @staticmethod
    def restore(kv, like):
        """``kv`` back in the layout of ``like`` (the cache the caller passed in)."""
        if is_split(like):
            return kv if is_split(kv) else split_layers(kv)
        return stack_layers(kv) if is_split(kv) else kv

    def fold(self, fn: Callable, carry):
        """``carry = fn(l, carry)`` for every layer ``l``, where ``fn`` may leave a layer unread (it picks the
        layer with ``layer(l)`` where it runs): unrolled over static indices (per-layer), or a ``fori_loop``
        over a traced index (stacked)."""
        if self.per_layer:
            for l in range(self.num_layers):
                carry = fn(l, carry)
            return carry
        return jax.lax.fori_loop(0, self.num_layers, fn, carry)

    def scan(self, fn: Callable, carry):
        """``carry = fn(carry, params_l, meta_l, l)`` for every layer, each of which runs: unrolled
        (per-layer), or a ``scan`` over the stack (stacked: the layers are the scan's inputs, so their
        gradients come out stacked, not summed into the whole pool at every layer)."""
        if self.per_layer:
            for l in range(self.num_layers):
                carry = fn(carry, *self.layer(l), l)
            return carry
        xs = (self.params, self.meta, jnp.arange(self.num_layers, dtype=jnp.int32))
        return jax.lax.scan(lambda c, xs: (fn(c, *xs), None), carry, xs)[0]

    def pick(self, s, branch: Callable, otherwise: Callable):
        """``branch(l)()`` for the layer ``l = s`` (traced), ``otherwise()`` where ``s >= L``: a ``lax.switch``
        over per-layer weights, each read in place, or a ``lax.cond`` on a slice of the stack. ``branch(l)``
        picks its layer inside the branch, so only the chosen one is read."""
        L = self.num_layers
        if self.per_layer:
            return jax.lax.switch(jnp.minimum(s, L), [branch(l) for l in range(L)] + [otherwise])
        return jax.lax.cond(s < L, branch(jnp.minimum(s, L - 1)), otherwise)

    def write_picked(self, kv, s, rows, slots, k, v, valid, written_at):
        """``write_layer`` into layer ``s`` (traced; nothing where ``s >= L``) of a cache in this pool's layout:
        per layer, every layer's write masked to ``s == l``."""
        L = self.num_layers
        valid = valid & (s < L)
        if not is_split(kv):
            return write_layer(kv, jnp.minimum(s, L - 1), rows, slots, k, v, valid, written_at)
        for l in range(L):
            kv = write_layer(kv, l, rows, slots, k, v, valid & (s == l), written_at)
        return kv

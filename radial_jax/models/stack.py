"""The layer pool: ``L`` layers' parameters stacked along a leading ``layers`` axis, and the sequential stack.

``params["layers"]`` has a leading axis of length ``L`` (logical axis ``layers``,
so the pool can be sharded like an expert axis), and ``layer_meta`` holds the
per-layer data that is not a parameter (sliding window, RoPE table index), as
``[L]`` int32 arrays. A layer is picked by index (``pool_layer``: the Radial
Network) or all of them run in order by ``lax.scan`` (the sequential model): one
compiled layer body, no Python loop over layers.

The same pool has a second, *per-layer* layout (``unstack_pool``: a tuple of ``L``
layer trees), the inference layout. XLA on CPU copies a layer's slice out of the
stacked arrays before its matmuls, every time the layer runs; a decoded token
runs every layer, so the copies cost as much as reading the weights. Per-layer
arrays are read in place. ``run_pool`` runs either layout with the same layer
code; ``generate`` converts once per call inside its compiled program, and
``Model.with_layout("per_layer")`` once for good.

Shapes: ``b`` batch, ``t`` tokens, ``e`` hidden.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from radial_jax.models.kv_cache import fill_prompt, sequence_mask, visible_mask, write_first_visit
from radial_jax.models.layer import LayerConfig, TransformerLayer, attention
from radial_jax.models.remat import remat_layer, shard_batch


def layer_meta(windows, ropes) -> dict:
    """``{"window": int32[L], "rope": int32[L]}`` (window 0: full attention) as numpy arrays."""
    windows, ropes = np.asarray(windows, np.int32), np.asarray(ropes, np.int32)
    if windows.shape != ropes.shape or windows.ndim != 1:
        raise ValueError(f"per-layer windows {windows.shape} and RoPE indices {ropes.shape} must both be [L]")
    return {"window": windows, "rope": ropes}


def meta_at(meta: dict, index) -> dict:
    """The per-layer data of layer ``index`` (may be traced)."""
    return {k: jnp.asarray(v)[index] for k, v in meta.items()}


def init_pool(layer_cfg: LayerConfig, num_layers: int, dtype=jnp.float32):
    """``init(key)``: ``num_layers`` freshly initialised layers stacked, with the ``layers`` logical axis."""
    def init(key):
        layer = TransformerLayer(layer_cfg, dtype, parent=None)  # applied functionally, not a submodule
        e = layer_cfg.hidden_size

        def one(k):
            return layer.init(k, jnp.zeros((1, 1, e), dtype), jnp.ones((1, 1, 1), bool),
                              jnp.zeros((1, 1), jnp.int32))["params"]

        boxed = jax.vmap(one)(jax.random.split(key, num_layers))
        return jax.tree_util.tree_map(lambda box: box.add_axis(0, {nn.PARTITION_NAME: "layers"}), boxed,
                                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    return init


def pool_param(module: nn.Module, layer_cfg: LayerConfig, num_layers: int, dtype=jnp.float32):
    """The module's ``layers`` parameter in the layout it was given (``setup`` of a family module).

    Stacked pools are created and shape-checked by ``module.param``; a per-layer pool
    (a tuple, which Flax's shape check against the stacked initialiser would refuse) is
    read as it is.
    """
    if module.has_variable("params", "layers"):
        given = module.get_variable("params", "layers")
        if is_per_layer(given):
            if len(given) != num_layers:
                raise ValueError(f"a per-layer pool of {len(given)} layers for a model of {num_layers}")
            return tuple(given)
    return module.param("layers", init_pool(layer_cfg, num_layers, dtype))


def is_per_layer(pool) -> bool:
    """Whether a pool is in the per-layer (inference) layout: a tuple of ``L`` layer trees."""
    return isinstance(pool, (tuple, list))


def num_pool_layers(pool_params) -> int:
    if is_per_layer(pool_params):
        return len(pool_params)
    leaves = jax.tree_util.tree_leaves(pool_params)
    return int(leaves[0].shape[0]) if leaves else 0


def pool_layer(pool, index):
    """The parameters of layer ``index`` of a pool, in either layout: the one way to pick a layer.

    Stacked pool (``[L, ...]`` leaves): ``a[index]``, ``index`` may be traced (a slice: see the module
    docstring). Per-layer pool (a tuple): ``pool[index]``, ``index`` a Python int; the layer's own arrays.
    """
    if is_per_layer(pool):
        if not isinstance(index, (int, np.integer)):
            raise ValueError("a per-layer pool is indexed by a Python int; use the stacked layout "
                             "(stack_pool) to pick layers by a traced index")
        return pool[int(index)]
    return jax.tree_util.tree_map(lambda a: a[index], pool)


def unstack_pool(pool) -> tuple:
    """The per-layer (inference) layout of a pool: a tuple of ``L`` layer trees.

    Why: see the module docstring. Under ``jit`` this costs one copy of the pool per call (``generate``
    does it once, before the prefill); outside, it makes new arrays once (``Model.with_layout("per_layer")``).
    """
    if is_per_layer(pool):
        return tuple(pool)
    return tuple(pool_layer(pool, l) for l in range(num_pool_layers(pool)))


def stack_pool(pool):
    """The stacked layout (leaves ``[L, ...]``) of a pool in either layout."""
    if not is_per_layer(pool):
        return pool
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *pool)


def layer_forward(layer_cfg: LayerConfig, dtype, params_l, meta_l, x_bte, positions_bt, slots_bt, valid_bt, *,
                  causal: bool, threshold=None, ratio_kind: str = "out", slots_from_zero: bool = False):
    """One layer on a whole sequence with plain self-attention (no cache): ``(y, LayerStats)``.

    The body of the sequential stack without a cache; the streaming profiler and
    the oracle's probe run exactly this. ``slots_from_zero``: see ``run_pool``.
    """
    layer = TransformerLayer(layer_cfg, dtype, parent=None)  # applied functionally, not a submodule
    mask = sequence_mask(slots_bt, valid_bt, causal=causal, window=meta_l["window"])
    return layer.apply({"params": params_l}, x_bte, mask, positions_bt, meta_l["rope"], threshold, ratio_kind,
                       causal and slots_from_zero)


def run_pool(layer_cfg: LayerConfig, dtype, pool_params, meta: dict, x_bte, positions_bt, slots_bt, valid_bt, *,
             causal: bool, cache=None, threshold=None, ratio_kind: str = "out", slots_from_zero: bool = False,
             empty_cache: bool = False):
    """Apply the ``L`` layers of the pool in order (the sequential model).

    Args:
      pool_params: ``params["layers"]``: stacked (leading axis ``L``; the layers run in a
        ``lax.scan``, one compiled body) or per-layer (a tuple of ``L`` layer trees, the
        inference layout; the layers are unrolled and each reads its own arrays, no copy).
      meta: ``layer_meta(...)``, ``[L]`` arrays.
      positions_bt: token positions (RoPE); slots_bt: cache slot / causal order of each token.
      valid_bt: false for padding: never attended to, never written.
      cache: optional; when given, K/V are written into it (token ``p`` visits layer ``l``
        at step ``l``) and keys read from it. A ``KVCache`` of ``L`` layers, or (per-layer
        pool only) a tuple of ``L`` single-layer caches (``kv_cache.split_layers``), whose
        layers are then read and written in place.
      threshold: optional oracle threshold (see ``TransformerLayer.finish``).
      slots_from_zero: the caller's promise that ``slots_bt`` is ``0 .. t - 1`` in every row (a
        prompt, or a sequence without a cache): causal attention then skips, per block of
        queries, the slots after the block (``attention.attend``'s ``causal_blocks``).
      empty_cache: with ``slots_from_zero``, the promise that ``cache`` holds nothing yet (a prompt's
        prefill): each layer then attends over its fresh K/V, as without a cache, and fills the
        cache with one slice update (``kv_cache.fill_prompt``: what rule 1 writes into an empty cache).

    Returns:
      ``(y_bte, stats, cache)``: stats is a ``LayerStats`` with leaves ``[L, b, t]``.
    """
    layer = TransformerLayer(layer_cfg, dtype, parent=None)  # applied functionally, not a submodule
    L = num_pool_layers(pool_params)
    per_layer_cache = isinstance(cache, (tuple, list))
    if empty_cache and (cache is None or not slots_from_zero):
        raise ValueError("empty_cache=True is a prefill: it needs a cache and slots_from_zero=True")
    if per_layer_cache and (not is_per_layer(pool_params) or len(cache) != L):
        raise ValueError(f"a per-layer cache ({len(cache)} caches) needs a per-layer pool of as many layers")

    def one_layer(x, cache, params_l, meta_l, l):
        """Layer ``l`` (traced or int); ``cache``: the stacked cache, or layer ``l``'s own (index 0)."""
        if cache is None:
            return (*layer_forward(layer_cfg, dtype, params_l, meta_l, x, positions_bt, slots_bt, valid_bt,
                                   causal=causal, threshold=threshold, ratio_kind=ratio_kind,
                                   slots_from_zero=slots_from_zero), None)
        q, k, v = layer.apply({"params": params_l}, x, positions_bt, meta_l["rope"], method="qkv")
        at = 0 if per_layer_cache else l
        if empty_cache:  # the keys are the fresh K/V themselves, as without a cache
            cache = fill_prompt(cache, at, k, v, valid_bt, l)
            kc, vc = (jnp.swapaxes(a, 1, 2) for a in (k, v))  # heads first, as in the KV cache
            mask = sequence_mask(slots_bt, valid_bt, causal=causal, window=meta_l["window"])
        else:
            rows = jnp.arange(x.shape[0], dtype=jnp.int32)[:, None]
            cache = write_first_visit(cache, at, rows, slots_bt, k, v, valid_bt, l)
            kc, vc, wc = cache.layer(at)
            mask = visible_mask(wc, slots_bt, l, causal=causal, window=meta_l["window"])
        ctx = attention(layer_cfg, q, kc, vc, mask, causal_blocks=causal and slots_from_zero)
        y, stats = layer.apply({"params": params_l}, x, ctx, threshold, ratio_kind, method="finish")
        return y, stats, cache

    if is_per_layer(pool_params):
        x, stats_l, caches = x_bte, [], []
        for l in range(L):
            meta_l = {k: np.asarray(v)[l] for k, v in meta.items()}
            layer_cache = cache[l] if per_layer_cache else cache
            x, stats, layer_cache = one_layer(x, layer_cache, pool_params[l], meta_l, l)
            stats_l.append(stats)
            if per_layer_cache:
                caches.append(layer_cache)
            else:
                cache = layer_cache
        stats = jax.tree_util.tree_map(lambda *s: jnp.stack(s), *stats_l)
        return x, stats, (tuple(caches) if per_layer_cache else cache)

    def body(carry, xs):
        x, cache = carry
        x = shard_batch(x)  # no-op unless a sharded train step asks (radial_jax.models.remat)
        params_l, meta_l, l = xs
        y, stats, cache = one_layer(x, cache, params_l, meta_l, l)
        return (y, cache), stats

    xs = (pool_params, {k: jnp.asarray(v) for k, v in meta.items()}, jnp.arange(L, dtype=jnp.int32))
    (y, cache), stats = jax.lax.scan(remat_layer(body), (x_bte, cache), xs)  # remat: radial_jax.models.remat
    return y, stats, cache

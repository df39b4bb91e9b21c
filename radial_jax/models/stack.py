"""The layer pool: ``L`` layers' parameters stacked along a leading ``layers`` axis, and the sequential stack.

``params["layers"]`` has a leading axis of length ``L`` (logical axis ``layers``,
so the pool can be sharded like an expert axis), and ``layer_meta`` holds the
per-layer data that is not a parameter (sliding window, RoPE table index), as
``[L]`` int32 arrays. A layer is picked by index (the Radial Network) or all of
them run in order by ``lax.scan`` (the sequential model): one compiled layer
body, no Python loop over layers.

Shapes: ``b`` batch, ``t`` tokens, ``e`` hidden.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from radial_jax.kv_cache import KVCache, sequence_mask, visible_mask, write_first_visit
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


def num_pool_layers(pool_params) -> int:
    leaves = jax.tree_util.tree_leaves(pool_params)
    return int(leaves[0].shape[0]) if leaves else 0


def layer_forward(layer_cfg: LayerConfig, dtype, params_l, meta_l, x_bte, positions_bt, slots_bt, valid_bt, *,
                  causal: bool, threshold=None, ratio_kind: str = "out"):
    """One layer on a whole sequence with plain self-attention (no cache): ``(y, LayerStats)``.

    The body of the sequential stack without a cache; the streaming profiler and
    the oracle's probe run exactly this.
    """
    layer = TransformerLayer(layer_cfg, dtype, parent=None)  # applied functionally, not a submodule
    mask = sequence_mask(slots_bt, valid_bt, causal=causal, window=meta_l["window"])
    return layer.apply({"params": params_l}, x_bte, mask, positions_bt, meta_l["rope"], threshold, ratio_kind)


def run_pool(layer_cfg: LayerConfig, dtype, pool_params, meta: dict, x_bte, positions_bt, slots_bt, valid_bt, *,
             causal: bool, cache: Optional[KVCache] = None, threshold=None, ratio_kind: str = "out"):
    """Apply the ``L`` stacked layers in order (the sequential model).

    Args:
      pool_params: ``params["layers"]``, leading axis ``L``.
      meta: ``layer_meta(...)``, ``[L]`` arrays.
      positions_bt: token positions (RoPE); slots_bt: cache slot / causal order of each token.
      valid_bt: false for padding: never attended to, never written.
      cache: optional ``KVCache``; when given, K/V are written into it (token ``p``
        visits layer ``l`` at step ``l``) and keys read from it.
      threshold: optional oracle threshold (see ``TransformerLayer.finish``).

    Returns:
      ``(y_bte, stats, cache)``: stats is a ``LayerStats`` with leaves ``[L, b, t]``.
    """
    layer = TransformerLayer(layer_cfg, dtype, parent=None)  # applied functionally, not a submodule
    L = num_pool_layers(pool_params)

    def body(carry, xs):
        x, cache = carry
        x = shard_batch(x)  # no-op unless a sharded train step asks (radial_jax.models.remat)
        params_l, meta_l, l = xs
        if cache is None:
            y, stats = layer_forward(layer_cfg, dtype, params_l, meta_l, x, positions_bt, slots_bt, valid_bt,
                                     causal=causal, threshold=threshold, ratio_kind=ratio_kind)
            return (y, None), stats
        q, k, v = layer.apply({"params": params_l}, x, positions_bt, meta_l["rope"], method="qkv")
        rows = jnp.arange(x.shape[0], dtype=jnp.int32)[:, None]
        cache = write_first_visit(cache, l, rows, slots_bt, k, v, valid_bt, l)
        kc, vc, wc = cache.layer(l)
        mask = visible_mask(wc, slots_bt, l, causal=causal, window=meta_l["window"])
        ctx = attention(layer_cfg, q, kc, vc, mask)
        y, stats = layer.apply({"params": params_l}, x, ctx, threshold, ratio_kind, method="finish")
        return (y, cache), stats

    xs = (pool_params, {k: jnp.asarray(v) for k, v in meta.items()}, jnp.arange(L, dtype=jnp.int32))
    (y, cache), stats = jax.lax.scan(remat_layer(body), (x_bte, cache), xs)  # remat: radial_jax.models.remat
    return y, stats, cache

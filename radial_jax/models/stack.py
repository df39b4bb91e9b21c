"""The sequential stack of layers, scanned over a leading ``layers`` parameter axis.

Parameters of all layers are stacked (``params['layers'][...]`` has a leading
axis of length L) so that a layer is picked by index, sharded like an expert
axis, and run with ``lax.scan``: one compiled layer body, no Python loop.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from radial_jax.kv_cache import KVCache, visible_mask, write_first_visit_layer
from radial_jax.models.attention import dot_product_attention
from radial_jax.models.layer import TransformerLayer


class _ScannedLayer(TransformerLayer):
    """One step of the scan: layer ``step`` on the whole sequence.

    The whole cache ``(k, v, written_at)`` with its leading layer axis rides in the
    scan carry, so a layer's new entries are scattered in place (no per-layer
    copy of the cache through scan outputs).
    """

    causal: bool = True
    ratio_kind: str = "out"

    def __call__(self, carry, slots_bt, valid_bt, threshold):
        x, step, cache = carry
        q, k, v = self.qkv(x)
        if cache is None:
            mask = valid_bt[:, None, :]
            if self.causal:
                mask = mask & (slots_bt[:, None, :] <= slots_bt[:, :, None])
            ctx = dot_product_attention(q, k, v, mask)
        else:
            cache = write_first_visit_layer(*cache, step, slots_bt, k, v, valid_bt, step)
            kc, vc, wc = (jax.lax.dynamic_index_in_dim(a, step, 0, keepdims=False) for a in cache)
            mask = visible_mask(wc, slots_bt, step, causal=self.causal)
            ctx = dot_product_attention(q, kc, vc, mask)
        y, stats = self.finish(x, ctx, threshold, self.ratio_kind)
        return (y, step + 1, cache), stats


def run_layers(layer_config, num_layers: int, x_bte, slots_bt, valid_bt, *, cache: Optional[KVCache] = None,
               threshold=None, causal: bool = True, ratio_kind: str = "out", dtype=jnp.float32):
    """Apply ``num_layers`` stacked layers in order; call inside a parent's ``nn.compact`` method.

    The parameters land in the parent under ``"layers"`` with a leading layer axis.

    Args:
      x_bte: input hidden states.
      slots_bt: the slot of each token (its index in the cache, and its causal order).
      valid_bt: false for padding: never attended to, never written.
      cache: optional KVCache; when given, K/V are written into it and keys read from it.
      threshold: optional oracle threshold (see ``TransformerLayer.finish``).

    Returns:
      ``(y_bte, stats, cache)``: stats is a ``LayerStats`` with leaves ``[L, b, t]``.
    """
    scan = nn.scan(
        _ScannedLayer,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    cache_in = None if cache is None else (cache.k, cache.v, cache.written_at)
    layers = scan(layer_config, dtype, causal, ratio_kind, name="layers")
    (y, _, cache_out), stats = layers((x_bte, jnp.int32(0), cache_in), slots_bt, valid_bt, threshold)
    new_cache = None if cache is None else KVCache(*cache_out)
    return y, stats, new_cache

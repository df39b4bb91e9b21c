"""Profile a model larger than memory: one layer at a time, straight from its checkpoint.

The data's residual stream (``[n, t, e]`` for all batches, on the host) is
pushed through the layers in order; only one layer's parameters are loaded at
a time (``CheckpointReader.layer_params``, memory-mapped safetensors, sharded
checkpoints included), so peak memory is about the largest layer (or the
embedding tables, freed once the stream is embedded) plus the activations,
not the model. The layer is the same ``TransformerLayer`` the
in-memory model scans, so the results are the same (tested).
"""
from __future__ import annotations

import time
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from radial_jax.api import Model
from radial_jax.loading import CheckpointReader
from radial_jax.models.layer import TransformerLayer
from radial_jax.profiling.residual import (BLOCKS, RATIO_KINDS, ProfileResult, accumulate, as_batches,
                                           check_has_blocks, finish_raw, new_accumulators, token_mask)


def _attention_mask(model, valid_bt):
    mask = valid_bt[:, None, :]
    if model.is_decoder:
        t = valid_bt.shape[1]
        mask = mask & jnp.tril(jnp.ones((t, t), bool))[None]
    return mask


def profile_streaming(name_or_path, data: Iterable, *, dtype="float32", data_name: str = "data",
                      exact_limit: int = 5_000_000, keep_raw: bool = False, progress: bool = True) -> ProfileResult:
    """``profile`` with parameters streamed layer by layer from ``name_or_path``."""
    reader = CheckpointReader(name_or_path)
    reader.check_unexpected()
    # A bundle of the non-layer parameters only: it validates inputs and computes the embeddings.
    shell = Model(reader.config, reader.non_layer_params(dtype), dtype=dtype, name=str(name_or_path))
    check_has_blocks(shell)
    batches = as_batches(shell, data)
    L = reader.num_layers
    layer = TransformerLayer(reader.config.layer_config(), dtype=shell.dtype)

    @jax.jit
    def run_layer(params, x, valid):
        y, stats = layer.apply({"params": params}, x, _attention_mask(shell, valid))
        ratios = jnp.stack([jnp.stack([getattr(stats, b).ratio(k) for k in RATIO_KINDS]) for b in BLOCKS])
        return y, ratios

    acc, raw = new_accumulators(L, exact_limit, keep_raw)
    valids = [token_mask(shell, x, m) for x, m in batches]
    streams = [np.asarray(shell._apply(shell.params, jnp.asarray(x), **({} if m is None else {
        "attention_mask_bt": jnp.asarray(m)}), embeddings_only=True)) for x, m in batches]
    shell.params = None  # embeddings are done; the tables need not stay in memory with the layers
    start = time.perf_counter()
    for i in tqdm(range(L), desc=f"stream {shell.name}", unit="layer", disable=not progress):
        params = jax.tree_util.tree_map(jnp.asarray, reader.layer_params(i, dtype))
        for bi, valid in enumerate(valids):
            y, ratios = run_layer(params, jnp.asarray(streams[bi]), jnp.asarray(valid))
            streams[bi] = np.asarray(y)
            accumulate(acc, raw, np.asarray(ratios)[:, :, None], valid, [i])
        del params
    tokens = int(sum(v.sum() for v in valids))
    num_params = reader.num_params
    return ProfileResult(shell.name, data_name, L, num_params, tokens, time.perf_counter() - start, acc,
                         finish_raw(raw))

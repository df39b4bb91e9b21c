"""Profile a model larger than memory: one layer at a time, straight from its checkpoint.

The data's residual stream (``[n, t, e]`` for all batches, on the host) is
pushed through the layers in order; only one layer's parameters are loaded at
a time (``CheckpointReader.layer_params``, sharded checkpoints included), so
peak memory is about the largest layer (or the embedding tables, freed once
the stream is embedded) plus the activations, not the model. Every tensor is
held once: the reader's aligned host arrays become the device arrays as they are
(``host_to_device``), with no second copy (on CPU). Each layer runs
``radial_jax.models.stack.layer_forward``, the body the in-memory model scans,
so the results are the same (tested).
"""
from __future__ import annotations

import time
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from radial_jax.checkpoints.reader import CheckpointReader
from radial_jax.models.decoder import hf_positions
from radial_jax.models.stack import layer_forward, meta_at
from radial_jax.profiling.residual import (BLOCKS, RATIO_KINDS, ProfileResult, accumulate, as_batches,
                                           check_has_blocks, finish_raw, new_accumulators, token_mask)


def host_to_device(tree):
    """numpy leaves -> jax arrays that alias them where possible (aligned, contiguous: on CPU, no copy)."""
    return jax.tree_util.tree_map(lambda a: jax.device_put(a, may_alias=True), tree)


def profile_streaming(name_or_path, data: Iterable, *, dtype="float32", data_name: str = "data",
                      exact_limit: int = 5_000_000, keep_raw: bool = False, progress: bool = True,
                      mesh=None) -> ProfileResult:
    """``profile`` with parameters streamed layer by layer from ``name_or_path``.

    ``mesh``: each layer is read sharded onto the mesh (``CheckpointReader.layer_params_sharded``: only
    this process's devices' slices), so no device holds a whole layer; one process.
    """
    reader = CheckpointReader(name_or_path)
    reader.check_unexpected()
    shell = reader.shell(dtype, name=str(name_or_path))  # validates inputs and computes the embeddings
    shell.params = host_to_device(shell.params)
    check_has_blocks(shell)
    batches = as_batches(shell, data)
    L = reader.num_layers
    config, causal = reader.config, shell.is_decoder
    meta = config.layer_meta()

    @jax.jit
    def run_layer(params, meta_l, x, valid):
        b, t = valid.shape
        slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        positions = hf_positions(valid) if causal else slots
        y, stats = layer_forward(config.layer_config(), shell.dtype, params, meta_l, x, positions, slots, valid,
                                 causal=causal)
        ratios = jnp.stack([jnp.stack([getattr(stats, b).ratio(k) for k in RATIO_KINDS]) for b in BLOCKS])
        return y, ratios

    streams = [np.asarray(shell._apply(shell.params, jnp.asarray(x), **({} if m is None else {
        "attention_mask_bt": jnp.asarray(m)}), embeddings_only=True)) for x, m in batches]
    valids = [token_mask(m, s.shape[:2]) for (_, m), s in zip(batches, streams)]
    shell.params = None  # embeddings are done; the tables need not stay in memory with the layers
    acc, raw = new_accumulators(L, exact_limit, keep_raw)
    start = time.perf_counter()
    for i in tqdm(range(L), desc=f"stream {shell.name}", unit="layer", disable=not progress):
        params = (host_to_device(reader.layer_params(i, dtype)) if mesh is None
                  else reader.layer_params_sharded(i, mesh, dtype))
        for bi, valid in enumerate(valids):
            y, ratios = run_layer(params, meta_at(meta, i), jnp.asarray(streams[bi]), jnp.asarray(valid))
            streams[bi] = np.asarray(y)
            accumulate(acc, raw, np.asarray(ratios)[:, :, None], valid, [i])
        del params
    tokens = int(sum(v.sum() for v in valids))
    return ProfileResult(shell.name, data_name, L, reader.num_params, tokens, time.perf_counter() - start, acc,
                         finish_raw(raw))

"""Load Hugging Face checkpoints (hub id or local directory in hub layout) into radial_jax.

Weights are read from ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``) tensor by tensor: no torch, and
bf16/fp16 tensors load as they are (``ml_dtypes``). A checkpoint that only has
``pytorch_model.bin`` loads through ``torch.load(weights_only=True)`` when torch
is installed. Names are mapped by the one table per family in
the family's table (``radial_jax.models.families``); a missing, unexpected or mis-shaped tensor is an
error that names it.

``CheckpointReader`` reads one layer at a time (for streaming models larger than
memory); ``load`` reads everything into a ``Model``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp

from radial_jax.checkpoints.artifacts import load_model
from radial_jax.checkpoints.reader import CheckpointReader
from radial_jax.models.bundle import Model, example_inputs
from radial_jax.models.family import resolve_dtype
from radial_jax.models.sharded import ShardedModel
from radial_jax.scale.sharding import logical_specs, param_shardings, to_mesh


def load(name_or_path: str, *, dtype=jnp.float32, gguf_file: Optional[str] = None,
         with_classifier: Optional[bool] = None, mesh=None, rules=None) -> Model:
    """Load a Hugging Face checkpoint (hub id or local directory) or a GGUF file as a ``Model``.

    Args:
      name_or_path: e.g. ``"Qwen/Qwen2.5-0.5B"``, ``"facebook/opt-125m"``, a directory with
        ``config.json`` and ``model.safetensors`` (or shards with ``model.safetensors.index.json``),
        or a ``.gguf`` file.
      dtype: parameter and compute dtype: ``float32`` (default), ``bfloat16`` or ``float16``.
      gguf_file: a GGUF file in that directory or hub repo (as transformers' ``gguf_file=``).
      with_classifier: ViT only: load the classification head (default: if the
        checkpoint's architecture is ``ViTForImageClassification``).
      mesh: a ``(data, fsdp, tensor)`` mesh (``radial_jax.scale.sharding.make_mesh``): parameters are read
        straight into global arrays placed by the axis rules (``rules``, default ``AXIS_RULES``), each
        process reading only the slices its devices hold (``CheckpointReader.sharded_params``); the
        bundle's forward keeps its outputs replicated (``radial_jax.models.sharded.ShardedModel``). A model
        trained here (``params.msgpack``, one file) is read whole, then placed.
    """
    dtype = resolve_dtype(dtype)  # bad dtype fails before any file is read
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError("mesh must be a jax.sharding.Mesh (radial_jax.scale.sharding.make_mesh((data, fsdp, "
                         f"tensor))), got {mesh!r}; the CLI's --mesh takes the 'data,fsdp,tensor' text")
    if (Path(os.fspath(name_or_path)) / "params.msgpack").is_file():  # `radial-jax train`'s or the pipeline's
        model = _load_trained_here(Path(os.fspath(name_or_path)), dtype, gguf_file, mesh, rules)
    else:
        reader = CheckpointReader(name_or_path, gguf_file=gguf_file, with_classifier=with_classifier)
        if mesh is not None:
            return ShardedModel(reader.config, reader.sharded_params(mesh, dtype, rules), mesh=mesh, dtype=dtype,
                                name=str(name_or_path), tokenizer_path=reader.tokenizer_path)
        model = Model(reader.config, reader.params(dtype), dtype=dtype, name=str(name_or_path),
                      tokenizer_path=reader.tokenizer_path)
    warn_non_finite(model.params, str(name_or_path))  # checkpoints of both kinds
    return model


def non_finite_leaves(tree) -> list:
    """The paths (``jax.tree_util.keystr``) of the floating leaves of ``tree`` that hold NaN or inf (jnp: arrays
    sharded over several hosts too)."""
    return [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if jnp.issubdtype(leaf.dtype, jnp.floating) and not bool(jnp.isfinite(leaf).all())]


def warn_non_finite(params, source: str) -> None:
    """A warning naming the tensors of ``params`` that hold NaN or inf: such weights load, and every output is
    NaN without a word (a checkpoint saved after a divergence)."""
    bad = non_finite_leaves(params)
    if bad:
        warnings.warn(f"{source}: {len(bad)} tensors hold NaN or inf ({', '.join(bad[:5])}"
                      f"{', ...' if len(bad) > 5 else ''}); the model's outputs will not be finite", stacklevel=3)


def _load_trained_here(directory: Path, dtype, gguf_file, mesh, rules):
    """A model saved by this library (``training.artifacts.save_model``): its own config and tokenizer. On a
    mesh its parameters (one file, read whole) are placed by the axis rules."""
    if gguf_file is not None:
        raise ValueError(f"{directory} is a model trained with radial_jax (params.msgpack); gguf_file= applies to "
                         "Hugging Face checkpoints and GGUF files only")
    model = load_model(directory)
    if mesh is not None:
        specs = logical_specs(model.module, *example_inputs(model.config), rules=rules)
        params = to_mesh(model.params, param_shardings(model.params, specs, mesh), dtype=dtype)
        return ShardedModel(model.config, params, mesh=mesh, dtype=dtype, name=str(directory),
                            tokenizer_path=model.tokenizer_path)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), model.params)
    return Model(model.config, params, dtype=dtype, name=str(directory), tokenizer_path=model.tokenizer_path)

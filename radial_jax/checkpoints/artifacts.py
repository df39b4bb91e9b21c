"""Models this library writes: final artifacts of a run (not the resumable checkpoints): a model directory with
``config.json`` (the family's name and config, plus extras) and ``params.msgpack`` (flax serialisation)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import flax.serialization
import jax
import numpy as np

from radial_jax.models.bundle import Model
from radial_jax.data.corpus import OFFLINE_TOKENIZER_PREFIX
from radial_jax.reporting.files import atomic_write_bytes, atomic_write_text
from radial_jax.models.family import families, family_of


def write_artifact(directory, tree, meta: dict) -> Path:
    """``config.json`` (``meta``) and ``params.msgpack`` (``tree``, flax serialisation) in ``directory``, each
    written atomically, the config last: a reader never sees half a file, and a directory with a config has
    its parameters."""
    d = Path(directory)
    text = json.dumps(meta, indent=2)  # before any write: a non-JSON extra fails with nothing written
    atomic_write_bytes(d / "params.msgpack", flax.serialization.msgpack_serialize(jax.device_get(tree)))
    atomic_write_text(d / "config.json", text)
    return d


def read_artifact(directory, kind: str):
    """``(tree, meta)`` written by ``write_artifact``, refused unless ``meta["kind"]`` is ``kind``."""
    d = Path(directory)
    if not (d / "config.json").is_file() or not (d / "params.msgpack").is_file():
        raise ValueError(f"{d} is not a radial_jax training artifact (needs config.json and params.msgpack)")
    meta = json.loads((d / "config.json").read_text())
    if meta.get("kind") != kind:
        raise ValueError(f"{d} holds a {meta.get('kind')!r} artifact, expected {kind!r}")
    tree = flax.serialization.msgpack_restore((d / "params.msgpack").read_bytes())
    return jax.tree_util.tree_map(np.asarray, tree), meta


def save_params(directory, params, config, kind: str, **extra) -> Path:
    """``params`` and ``config`` (the family's name and fields, plus ``extra``) as a ``kind`` artifact."""
    meta = {"kind": kind, "family": family_of(config).name, "model": dataclasses.asdict(config), **extra}
    return write_artifact(directory, params, meta)


def load_params(directory, kind: str):
    """``(params, config, meta)``; ``kind`` is ``"lm"`` or ``"radial_student"``."""
    d = Path(directory)
    params, meta = read_artifact(d, kind)
    family = families().get(meta.get("family", "opt"))  # artifacts written before families were named: OPT
    if family is None:
        raise ValueError(f"{d}/config.json names family {meta.get('family')!r}; known: {sorted(families())}")
    try:
        config = family.config_cls(**meta["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{d}/config.json does not hold a valid {family.config_cls.__name__}: {e}") from e
    return params, config, meta


def save_model(model: Model, directory, **extra) -> Path:
    """``model`` as an ``lm`` artifact; its tokenizer (``model.tokenizer_path``) is recorded with it."""
    return save_params(directory, model.params, model.config, "lm", name=model.name, tokenizer=model.tokenizer_path,
                       **extra)


def load_model(directory) -> Model:
    """A model saved by ``save_model`` (``radial-jax train``); ``rj.load`` takes these and hub checkpoints."""
    params, config, meta = load_params(directory, "lm")
    # artifacts from before the tokenizer was recorded were all trained with the offline BPE
    tokenizer = meta["tokenizer"] if "tokenizer" in meta else f"{OFFLINE_TOKENIZER_PREFIX}{config.vocab_size}"
    return Model(config, params, name=meta.get("name"), tokenizer_path=tokenizer)

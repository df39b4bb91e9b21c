"""Where a checkpoint's files are: a local directory in hub layout, a GGUF file, or a hub id downloaded through
huggingface_hub (its cache and ``HF_HUB_OFFLINE=1`` honoured)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from radial_jax.checkpoints.errors import CheckpointError

HUB_METADATA = ["*.json", "*.txt", "*.model", "merges.txt", "vocab.json"]  # config, tokenizer, shard index


def resolve_gguf(name_or_path: str, gguf_file: Optional[str]) -> Optional[Path]:
    """The GGUF file meant by ``rj.load(path.gguf)`` or ``rj.load(dir_or_hub_id, gguf_file=name)``, or None."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if gguf_file is None:
        return path if path.is_file() and path.suffix == ".gguf" else None
    if path.is_dir():
        if not (path / gguf_file).is_file():
            found = sorted(p.name for p in path.glob("*.gguf"))
            raise CheckpointError(f"{path} has no {gguf_file}; GGUF files there: {found or 'none'}")
        return path / gguf_file
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(str(name_or_path), gguf_file))
    except Exception as e:
        raise CheckpointError(f"could not get {gguf_file} of {name_or_path!r} from the Hugging Face hub "
                              f"({type(e).__name__}: {e})") from e


def resolve_checkpoint(name_or_path: str) -> Path:
    """A local directory in hub layout, downloading a hub id through huggingface_hub if needed.

    huggingface_hub's cache and ``HF_HUB_OFFLINE=1`` are honoured.
    """
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{name_or_path} is a file; give the checkpoint directory (with config.json), "
                              "or a .gguf file")
    if str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:
        raise CheckpointError(f"no checkpoint directory at {name_or_path}")
    from huggingface_hub import snapshot_download
    try:
        # the metadata first; then only the weights it names: the shards of the index (a repository may also
        # hold a consolidated copy of the same weights, or other formats' files), else model.safetensors
        local = Path(snapshot_download(str(name_or_path), allow_patterns=HUB_METADATA))
        index = local / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index, "shard index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no 'weight_map' object")
            weights = sorted(set(weight_map.values()))
        else:
            weights = ["model.safetensors"]
        local = Path(snapshot_download(str(name_or_path), allow_patterns=HUB_METADATA + weights))
        if not any(local.glob("*.safetensors")):  # older repos: PyTorch weights only
            local = Path(snapshot_download(str(name_or_path), allow_patterns=HUB_METADATA + ["pytorch_model*.bin*"]))
    except CheckpointError:
        raise
    except Exception as e:  # network, auth, offline cache miss: say which and how
        raise CheckpointError(
            f"could not get {name_or_path!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Check the id, your network, or that it is in the cache when HF_HUB_OFFLINE=1; "
            "or pass a local directory with config.json and model.safetensors") from e
    return local


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; a CheckpointError naming the file and the problem otherwise."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no {path.name} ({what})")
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); expected the {what}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}; expected an object (the {what})")
    return value

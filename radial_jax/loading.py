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

import json
import os
import struct
from pathlib import Path
from typing import Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from radial_jax.api import Model, example_inputs
from radial_jax.models.family import config_from_hf, family_of, module_for, resolve_dtype
from radial_jax.models.names import convert

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
HUB_METADATA = ["*.json", "*.txt", "*.model", "merges.txt", "vocab.json"]  # config, tokenizer, shard index


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names what is wrong."""


def _safetensors_header(path: Path) -> tuple:
    """``(header dict, header length)`` of a safetensors file; a CheckpointError naming the file otherwise."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file: {size} bytes, shorter than its 8-byte header "
                                  "length (truncated or empty)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100_000_000):
            raise CheckpointError(f"{path} is not a safetensors file (or is truncated): its first 8 bytes give a "
                                  f"header of {header_len:,} bytes in a file of {size:,} bytes")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is not a safetensors file: its header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file: its header is not a JSON object")
    return header, header_len


def _safetensors_tensors(path: Path) -> Dict[str, callable]:
    """name -> zero-argument reader of one tensor of a safetensors file.

    Each reader reads just its tensor's bytes (``SafetensorsTensor``, into ``ALIGN``-aligned
    memory that XLA's CPU client aliases), so
    streaming a checkpoint layer by layer never holds more than what was asked
    for (a memory map would keep every touched page resident). The header is
    checked up front: every tensor's dtype, shape and byte range must be
    consistent and inside the file.
    """
    header, header_len = _safetensors_header(path)
    data_size = path.stat().st_size - 8 - header_len
    readers = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: the header entry of tensor {name} is malformed ({info!r})") from e
        if dtype_name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype_name}; supported: "
                                  f"{sorted(SAFETENSORS_DTYPES)}")
        dtype = SAFETENSORS_DTYPES[dtype_name]
        if not 0 <= start <= end <= data_size or end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise CheckpointError(f"{path}: tensor {name} ({dtype_name}{list(shape)}) claims bytes [{start}, {end}) "
                                  f"of a {data_size:,}-byte data section: the file is truncated or corrupt")
        readers[name] = SafetensorsTensor(path, 8 + header_len + start, dtype, shape)
    return readers


# Bytes read from safetensors files by this process (whole tensors and slices); tests count them.
READ_STATS = {"bytes": 0, "reads": 0}


class SafetensorsTensor:
    """One tensor of a safetensors file: ``t()`` reads it whole, ``t.read(index)`` only a slice of it.

    ``index`` is a tuple of ``slice`` (step 1) per dimension, as ``jax.make_array_from_callback`` gives.
    Only the bytes of the slice are read: the slice is a set of contiguous runs (the trailing
    dimensions it takes whole, times a range of the first dimension it cuts), one ``readinto`` each,
    straight into the result array. (``safetensors.safe_open(...).get_slice`` does the same, but its
    numpy backend has no bfloat16 and it cannot count bytes.)
    """

    def __init__(self, path: Path, offset: int, dtype, shape: tuple):
        self.path, self.offset, self.dtype, self.shape = path, offset, np.dtype(dtype), tuple(shape)

    def __call__(self) -> np.ndarray:
        return self.read(None)

    def read(self, index=None) -> np.ndarray:
        ranges = [(0, n) for n in self.shape] if index is None else [
            s.indices(n)[:2] if isinstance(s, slice) else (int(s), int(s) + 1)
            for s, n in zip(tuple(index) + (slice(None),) * (len(self.shape) - len(tuple(index))), self.shape)]
        out_shape = tuple(b - a for a, b in ranges)
        out = aligned_empty(out_shape, self.dtype)
        if out.size == 0:
            return out
        # the first dimension (from the end) that is not taken whole: each run covers it and all after it
        cut = next((d for d in range(len(ranges) - 1, -1, -1) if ranges[d] != (0, self.shape[d])), 0)
        inner = int(np.prod(self.shape[cut + 1:], dtype=np.int64))
        run = (ranges[cut][1] - ranges[cut][0]) * inner * self.dtype.itemsize if self.shape else self.dtype.itemsize
        strides = np.cumprod((1,) + self.shape[::-1][:-1])[::-1] if self.shape else ()
        buf = out.reshape(-1).view(np.uint8)
        with open(self.path, "rb") as f:
            for k, outer in enumerate(np.ndindex(*out_shape[:cut])):
                first = sum((ranges[d][0] + outer[d]) * int(strides[d]) for d in range(cut))
                first += ranges[cut][0] * inner if self.shape else 0
                f.seek(self.offset + first * self.dtype.itemsize)
                view = memoryview(buf[k * run:(k + 1) * run])
                if f.readinto(view) != run:
                    raise CheckpointError(f"{self.path}: short read (the file changed or is truncated)")
        READ_STATS["bytes"] += out.nbytes
        READ_STATS["reads"] += max(1, int(np.prod(out_shape[:cut], dtype=np.int64)))
        return out


ALIGN = 64  # bytes: XLA's CPU client aliases (does not copy) host arrays aligned this way


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``ALIGN``-byte boundary."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    buf = np.empty(nbytes + ALIGN, np.uint8)
    start = -buf.ctypes.data % ALIGN
    return buf[start:start + nbytes].view(dtype).reshape(shape)


def read_aligned(path, offset: int, nbytes: int) -> np.ndarray:
    """``nbytes`` of ``path`` from ``offset`` into a fresh ``ALIGN``-byte aligned uint8 array.

    ``jax.device_put(a, may_alias=True)`` of such an array (contiguous, in its dtype) on
    CPU uses its memory as it is: a table read for streaming is held once, not twice.
    """
    out = aligned_empty((nbytes,), np.uint8)
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(memoryview(out)) != nbytes:
            raise CheckpointError(f"{path}: could not read {nbytes:,} bytes at offset {offset:,} (truncated?)")
    return out


def _torch_tensors(paths) -> Dict[str, callable]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            "this checkpoint only has pytorch_model.bin weights, which need torch to read; install it with "
            "`pip install 'radial_jax[torch]'`, or convert the checkpoint to safetensors") from e
    readers = {}
    for p in paths:
        state = torch.load(p, map_location="cpu", weights_only=True)
        for name, t in state.items():
            readers[name] = (lambda t=t: t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy())
    return readers


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


#: files a directory holds when it has a tokenizer (any one of them is enough for ``AutoTokenizer``)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(source):
    """The tokenizer that ``source`` names, with no network and no substitute.

    ``source`` is what a bundle's ``tokenizer_path`` holds: a checkpoint directory with tokenizer files
    (``TOKENIZER_FILES``), a ``.gguf`` file (transformers builds the tokenizer from its metadata, which
    takes about 20 s for Gemma's 262k-token vocabulary, so it is converted once and cached under
    ``radial_jax.data.corpus.CACHE_DIR``), or ``offline-pydoc-bpe-N`` (the offline BPE a model trained
    here used, ``radial_jax.data.offline_tokenizer``). Anything else raises a ``ValueError`` that says what
    was found and what is allowed. transformers' warning that PyTorch was not found is silenced: a
    tokenizer needs no torch.
    """
    import logging
    from transformers.utils import logging as hf_logging
    from radial_jax.data.corpus import OFFLINE_TOKENIZER_PREFIX, offline_tokenizer
    text = str(source)
    if text.startswith(OFFLINE_TOKENIZER_PREFIX):
        size = text[len(OFFLINE_TOKENIZER_PREFIX):]
        if not size.isdigit():
            raise ValueError(f"tokenizer {text!r}: expected {OFFLINE_TOKENIZER_PREFIX}N with N the vocabulary size")
        return offline_tokenizer(int(size))
    path = Path(os.path.expanduser(text))
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        if path.suffix == ".gguf":
            return _gguf_tokenizer(path)
        if not path.is_dir() or not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ValueError(f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); give a checkpoint "
                             f"directory with its tokenizer files, a .gguf file, or {OFFLINE_TOKENIZER_PREFIX}N")
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(path))
    finally:
        hf_logging.set_verbosity(previous)


def _same_tokenizer(a, b) -> bool:
    """Whether two tokenizers give the same ids and special tokens on a probe text (a cache's round trip)."""
    probe = "The for statement, def f(x):\n    return x ** 2  # 3.14 café\t<b>"
    specials = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    return (len(a) == len(b) and a.encode(probe) == b.encode(probe)
            and all(getattr(a, k, None) == getattr(b, k, None) for k in specials))


def _gguf_tokenizer(path: Path):
    """transformers' tokenizer of a GGUF file, converted once and cached by the file's name, size and mtime."""
    from transformers import AutoTokenizer
    from radial_jax.data.corpus import CACHE_DIR
    if not path.is_file():
        raise ValueError(f"{path}: no such GGUF file, so no tokenizer")
    stat = path.stat()
    cached = CACHE_DIR / "tokenizers" / f"gguf-{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as e:  # transformers' GGUF reader imports torch (and gguf) lazily
        raise ImportError(f"reading the tokenizer of {path.name} needs torch (transformers' GGUF reader imports it; "
                          f"{e}): pip install 'radial_jax[torch]'") from e
    import shutil
    import tempfile
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".staging-"))
    try:
        tok.save_pretrained(str(staging))
        saved = AutoTokenizer.from_pretrained(str(staging))
        if not _same_tokenizer(tok, saved):
            raise ValueError("the saved copy tokenises differently")
    except Exception:  # noqa: BLE001 - some conversions do not survive save_pretrained: use them uncached
        shutil.rmtree(staging, ignore_errors=True)
        tok.name_or_path = str(path)  # what load_tokenizer reloads it from
        return tok
    try:
        os.replace(staging, cached)  # atomic: a half-written tokenizer is never read
    except OSError:  # another process cached it first
        shutil.rmtree(staging, ignore_errors=True)
    saved.name_or_path = str(cached)  # the checked copy, named by its cache folder: reloadable without torch
    return saved


class CheckpointReader:
    """Lazy, name-mapped access to a checkpoint: a directory in hub layout, or a GGUF file.

    ``gguf_file``: read that GGUF file of the directory (or hub repo) instead of its
    safetensors, as transformers' ``gguf_file=`` does; a path ending in ``.gguf`` is
    read as GGUF too (``radial_jax.gguf``: metadata to config, tensors dequantized).
    ``config_kwargs`` go to the family config's ``from_hf`` (ViT: ``with_classifier``).
    """

    def __init__(self, name_or_path: str, *, gguf_file: Optional[str] = None, **config_kwargs):
        gguf_path = resolve_gguf(name_or_path, gguf_file)
        if gguf_path is not None:
            from radial_jax.gguf import GGUFCheckpoint
            self.gguf = GGUFCheckpoint(gguf_path)
            self.path, self.source = gguf_path.parent, gguf_path
            self.hf_config = self.gguf.hf_config
        else:
            self.gguf = None
            self.path = resolve_checkpoint(name_or_path)
            self.source = self.path / "config.json"
            self.hf_config = read_json(self.source, "model configuration")
        kwargs = {k: v for k, v in config_kwargs.items() if v is not None}
        try:
            self.config = config_from_hf(self.hf_config, **kwargs)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{self.source}: {e}") from e
        self.family = family_of(self.config)
        self.names = self.family.names
        raw = self.gguf.tensor_readers() if self.gguf is not None else self._tensor_readers()
        self._readers = {self.names.normalise(k): v for k, v in raw.items()}
        self._expected = self._expected_shapes()

    def _tensor_readers(self):
        p = self.path
        if (p / "model.safetensors.index.json").exists():
            index = read_json(p / "model.safetensors.index.json", "shard index")
            if not isinstance(index.get("weight_map"), dict):
                raise CheckpointError(f"{p / 'model.safetensors.index.json'} has no 'weight_map' object")
            shards = sorted(set(index["weight_map"].values()))
            readers = {}
            for shard in shards:
                if not (p / shard).exists():
                    raise CheckpointError(f"{p} lists shard {shard} in model.safetensors.index.json but it is missing")
                readers.update(_safetensors_tensors(p / shard))
            return readers
        if (p / "model.safetensors").exists():
            return _safetensors_tensors(p / "model.safetensors")
        if (p / "pytorch_model.bin.index.json").exists():
            index = read_json(p / "pytorch_model.bin.index.json", "shard index")
            return _torch_tensors(sorted(p / s for s in set(index["weight_map"].values())))
        if (p / "pytorch_model.bin").exists():
            return _torch_tensors([p / "pytorch_model.bin"])
        raise CheckpointError(
            f"{p} has no weights: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin")

    def _expected_shapes(self):
        module = module_for(self.config)
        abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_inputs(self.config)))
        flat = traverse_util.flatten_dict(nn.unbox(abstract)["params"])
        return {path: tuple(leaf.shape) for path, leaf in flat.items()}

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(s) for s in self._expected.values()))

    def param_bytes(self, dtype=jnp.float32) -> dict:
        """Bytes of ``{"layer": one layer, "non_layer": embeddings, norms and heads}`` in ``dtype``."""
        size = jnp.dtype(resolve_dtype(dtype)).itemsize
        layer = sum(int(np.prod(s[1:])) for p, s in self._expected.items() if p[0] == "layers")
        other = sum(int(np.prod(s)) for p, s in self._expected.items() if p[0] != "layers")
        return {"layer": layer * size, "non_layer": other * size}

    def _rule_for(self, ours: tuple, layer: bool):
        rule = self.names.rule_for(ours, layer)
        if rule is None:
            raise CheckpointError(f"no Hugging Face name is known for our parameter {'/'.join(ours)}")
        return rule

    def _read(self, rule, index: Optional[int], expected_shape: tuple, ours: str) -> np.ndarray:
        hf_name = rule.hf if index is None else rule.hf.format(i=index)
        if hf_name not in self._readers:
            raise CheckpointError(f"{self.path}: missing tensor {hf_name!r} (needed for parameter {ours})")
        array = convert(self._readers[hf_name](), rule)
        if tuple(array.shape) != tuple(expected_shape):
            raise CheckpointError(
                f"{self.path}: tensor {hf_name!r} has shape {tuple(array.shape)} after conversion, "
                f"expected {tuple(expected_shape)} for parameter {ours}")
        return array

    # -- sharded reading: each process reads only the slices its devices hold ---------------------------
    def _read_slice(self, rule, index: Optional[int], ours_index: tuple, expected_shape: tuple, ours: str,
                    cache: dict) -> np.ndarray:
        """``ours_index`` (slices of our layout, no layer axis) of the converted tensor of ``rule``.

        Safetensors: only the bytes of the slice are read (our index mapped back through the rule's
        transpose and ``part``); other formats (GGUF, ``.bin``): the whole tensor once, then sliced.
        """
        hf_name = rule.hf if index is None else rule.hf.format(i=index)
        if hf_name not in self._readers:
            raise CheckpointError(f"{self.path}: missing tensor {hf_name!r} (needed for parameter {ours})")
        reader = self._readers[hf_name]
        ranges = [s.indices(n)[:2] for s, n in zip(ours_index, expected_shape)]
        if not isinstance(reader, SafetensorsTensor):
            if hf_name not in cache:
                cache.clear()  # one whole tensor at a time
                cache[hf_name] = self._read(rule, index, expected_shape, ours)
            return cache[hf_name][tuple(slice(a, b) for a, b in ranges)]
        perm = {"copy": tuple(range(len(reader.shape))), "linear": (1, 0), "conv": (2, 3, 1, 0)}[rule.transform]
        converted = tuple(reader.shape[p] for p in perm)  # convert(): converted = hf.transpose(perm)
        if rule.part is not None:
            part, count = rule.part
            width = converted[-1] // count
            converted = converted[:-1] + (width,)
            ranges[-1] = (ranges[-1][0] + part * width, ranges[-1][1] + part * width)
        if converted != tuple(expected_shape):
            raise CheckpointError(
                f"{self.path}: tensor {hf_name!r} has shape {converted} after conversion, "
                f"expected {tuple(expected_shape)} for parameter {ours}")
        hf_index = [None] * len(perm)
        for j, p in enumerate(perm):
            hf_index[p] = slice(*ranges[j])
        return reader.read(tuple(hf_index)).transpose(perm)

    def _global_array(self, path: tuple, shape: tuple, sharding, dtype, layer: Optional[int] = None):
        """One parameter as a global array: each addressable device's slice read by this process only."""
        is_layer = path[0] == "layers"
        rule = self._rule_for(path[1:] if is_layer else path, layer=is_layer)
        name = "/".join(path)
        cache, pieces = {}, {}

        def callback(index):
            key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))  # replicas ask for the same slice
            if key not in pieces:
                if is_layer and layer is None:  # the stacked pool: leading axis = layer index
                    (lo, hi), rest = key[0], index[1:]
                    piece = np.stack([self._read_slice(rule, i, rest, shape[1:], name, cache)
                                      for i in range(lo, hi)])
                else:
                    piece = self._read_slice(rule, layer, index, shape, name, cache)
                pieces[key] = piece.astype(dtype, copy=False)
            return pieces[key]

        return jax.make_array_from_callback(shape, sharding, callback)

    def sharded_params(self, mesh, dtype=jnp.float32, rules=None) -> dict:
        """All parameters as global arrays on ``mesh``, placed by the axis rules (``radial_jax.sharding``):
        every process reads only the slices its own devices hold; no host holds the whole model."""
        from jax.sharding import NamedSharding
        from radial_jax.sharding import AXIS_RULES, _fit, logical_specs
        dtype = resolve_dtype(dtype)
        self.check_unexpected()
        specs = traverse_util.flatten_dict(logical_specs(module_for(self.config), *example_inputs(self.config),
                                                         rules=AXIS_RULES if rules is None else rules))
        flat = {path: self._global_array(path, shape, NamedSharding(mesh, _fit(specs[path], shape, mesh)), dtype)
                for path, shape in self._expected.items()}
        return traverse_util.unflatten_dict(flat)

    def layer_params_sharded(self, index: int, mesh, dtype=jnp.float32, rules=None) -> dict:
        """Layer ``index``'s parameters (no layer axis) as global arrays on ``mesh``, each process reading
        only its devices' slices (the streaming profiler on a mesh)."""
        from jax.sharding import NamedSharding, PartitionSpec
        from radial_jax.sharding import AXIS_RULES, _fit, logical_specs
        if not 0 <= index < self.num_layers:
            raise ValueError(f"layer index {index} out of range [0, {self.num_layers})")
        dtype = resolve_dtype(dtype)
        specs = traverse_util.flatten_dict(logical_specs(module_for(self.config), *example_inputs(self.config),
                                                         rules=AXIS_RULES if rules is None else rules))
        flat = {}
        for path, shape in self._expected.items():
            if path[0] == "layers":
                spec = PartitionSpec(*tuple(specs[path])[1:])
                flat[path[1:]] = self._global_array(path, shape[1:], NamedSharding(mesh, _fit(spec, shape[1:], mesh)),
                                                    dtype, layer=index)
        return traverse_util.unflatten_dict(flat)

    def non_layer_params(self, dtype=jnp.float32) -> dict:
        """Every parameter outside the layer stack (embeddings, norms, heads), as numpy."""
        dtype = resolve_dtype(dtype)
        flat = {}
        for path, shape in self._expected.items():
            if path[0] == "layers":
                continue
            rule = self._rule_for(path, layer=False)
            flat[path] = self._read(rule, None, shape, "/".join(path)).astype(dtype, copy=False)
        return traverse_util.unflatten_dict(flat)

    def layer_params(self, index: int, dtype=jnp.float32) -> dict:
        """The parameters of layer ``index`` (no layer axis), as numpy."""
        if not 0 <= index < self.num_layers:
            raise ValueError(f"layer index {index} out of range [0, {self.num_layers})")
        dtype = resolve_dtype(dtype)
        flat = {}
        for path, shape in self._expected.items():
            if path[0] != "layers":
                continue
            rule = self._rule_for(path[1:], layer=True)
            flat[path[1:]] = self._read(rule, index, shape[1:],
                                        f"layers/{index}/" + "/".join(path[1:])).astype(dtype, copy=False)
        return traverse_util.unflatten_dict(flat)

    def check_unexpected(self) -> None:
        """Raise if the checkpoint holds tensors that no rule of this config uses."""
        used = set()
        for path in self._expected:
            if path[0] == "layers":
                rule = self._rule_for(path[1:], layer=True)
                used.update(rule.hf.format(i=i) for i in range(self.num_layers))
            else:
                used.add(self._rule_for(path, layer=False).hf)
        unexpected = sorted(n for n in set(self._readers) - used if not self.names.is_ignorable(n))
        if unexpected:
            raise CheckpointError(
                f"{self.path}: unexpected tensors {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} "
                f"({len(unexpected)} in all) for a {type(self.config).__name__} with {self.num_layers} layers")

    @property
    def tokenizer_path(self) -> str:
        """Where ``load_tokenizer`` finds this checkpoint's tokenizer (the directory, or the GGUF file)."""
        return str(self.source if self.gguf is not None else self.path)

    def shell(self, dtype=jnp.float32, name: Optional[str] = None) -> Model:
        """A bundle of the non-layer parameters only (embeddings, norms, heads; ``params["layers"]`` is
        empty): it checks inputs, tokenizes and embeds, for work that streams the layers one at a time."""
        params = {**self.non_layer_params(dtype), "layers": {}}
        return Model(self.config, params, dtype=dtype, name=name or str(self.path), tokenizer_path=self.tokenizer_path)

    def params(self, dtype=jnp.float32) -> dict:
        """All parameters, layers stacked along a leading axis, as jax arrays."""
        self.check_unexpected()
        params = self.non_layer_params(dtype)
        per_layer = [self.layer_params(i, dtype) for i in range(self.num_layers)]
        params["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *per_layer)
        return jax.tree_util.tree_map(jnp.asarray, params)


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
      mesh: a ``(data, fsdp, tensor)`` mesh (``radial_jax.sharding.make_mesh``): parameters are read
        straight into global arrays placed by the axis rules (``rules``, default ``AXIS_RULES``), each
        process reading only the slices its devices hold (``CheckpointReader.sharded_params``); the
        bundle's forward keeps its outputs replicated (``radial_jax.sharded.ShardedModel``).
    """
    dtype = resolve_dtype(dtype)  # bad dtype fails before any file is read
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh (radial_jax.sharding.make_mesh((data, fsdp, tensor))), "
                         f"got {mesh!r}; the CLI's --mesh takes the 'data,fsdp,tensor' text")
    if (Path(os.fspath(name_or_path)) / "params.msgpack").is_file():  # `radial-jax train`'s or the pipeline's
        model = _load_trained_here(Path(os.fspath(name_or_path)), dtype, gguf_file, mesh)
    else:
        reader = CheckpointReader(name_or_path, gguf_file=gguf_file, with_classifier=with_classifier)
        if mesh is not None:
            from radial_jax.sharded import ShardedModel
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
    import warnings
    bad = non_finite_leaves(params)
    if bad:
        warnings.warn(f"{source}: {len(bad)} tensors hold NaN or inf ({', '.join(bad[:5])}"
                      f"{', ...' if len(bad) > 5 else ''}); the model's outputs will not be finite", stacklevel=3)


def _load_trained_here(directory: Path, dtype, gguf_file, mesh) -> Model:
    """A model saved by this library (``training.artifacts.save_model``): its own config and tokenizer."""
    if gguf_file is not None or mesh is not None:
        raise ValueError(f"{directory} is a model trained with radial_jax (params.msgpack); gguf_file= and mesh= "
                         "apply to Hugging Face checkpoints and GGUF files only")
    from radial_jax.training.artifacts import load_model
    model = load_model(directory)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), model.params)
    return Model(model.config, params, dtype=dtype, name=str(directory), tokenizer_path=model.tokenizer_path)

"""Tensor files of a checkpoint: safetensors through the safetensors library, PyTorch ``.bin`` through torch.

A safetensors reader opens the file with ``safetensors.safe_open`` each time it is called and reads only its
tensor, or the slice asked for (``get_slice``; bfloat16 included), into memory that XLA's CPU client aliases.
No file stays open between reads, so streaming a checkpoint layer by layer never holds more than what was
asked for (a memory map held open would keep every touched page resident). When the library refuses a
file, the header is checked here to say what is wrong with it (truncated, not JSON, a tensor outside the
file, an unsupported dtype), naming the file.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from radial_jax.checkpoints.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def check_header(path: Path) -> None:
    """Raise a ``CheckpointError`` saying what is wrong with the header of ``path``, if this check finds it: the
    diagnosis of a file ``safe_open`` refuses (its own message names less)."""
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
    data_size = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: the header entry of tensor {name} is malformed ({info!r})") from e
        _check_dtype(path, name, dtype_name)
        nbytes = int(np.prod(shape)) * np.dtype(SAFETENSORS_DTYPES[dtype_name]).itemsize
        if not 0 <= start <= end <= data_size or end - start != nbytes:
            raise CheckpointError(f"{path}: tensor {name} ({dtype_name}{list(shape)}) claims bytes [{start}, {end}) "
                                  f"of a {data_size:,}-byte data section: the file is truncated or corrupt")


def _check_dtype(path: Path, name: str, dtype_name: str) -> None:
    if dtype_name not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype_name}; supported: "
                              f"{sorted(SAFETENSORS_DTYPES)}")


def safetensors_tensors(path: Path) -> Dict[str, "SafetensorsTensor"]:
    """name -> reader of one tensor of a safetensors file (``SafetensorsTensor``); the file is opened once here
    to list its tensors, which the library checks: dtypes, shapes and byte ranges inside the file."""
    try:
        with safe_open(str(path), framework="np") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            infos = {name: (s.get_dtype(), tuple(s.get_shape())) for name, s in slices.items()}
    except SafetensorError as e:
        check_header(path)  # names the fault when it finds it
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e
    readers = {}
    for name, (dtype_name, shape) in infos.items():
        _check_dtype(path, name, dtype_name)
        readers[name] = SafetensorsTensor(path, name, SAFETENSORS_DTYPES[dtype_name], shape)
    return readers


# Bytes read from safetensors files by this process (whole tensors and slices); tests count them.
READ_STATS = {"bytes": 0, "reads": 0}


# A read goes through the library in chunks of at most this many bytes, the file opened and closed for each: the
# library hands back a new array per call and maps the file while it is open, so a whole embedding table read
# at once would be held two or three times over; chunked, the transient cost is a few chunks.
CHUNK_BYTES = 16 << 20


class SafetensorsTensor:
    """One tensor of a safetensors file: ``t()`` reads it whole, ``t.read(index)`` only a slice of it.

    ``index`` is a tuple of ``slice`` (step 1) per leading dimension, as ``jax.make_array_from_callback`` gives;
    only the slice is read (``safe_open(...).get_slice``), in chunks of rows (``CHUNK_BYTES``), into a fresh
    ``ALIGN``-aligned array.
    """

    def __init__(self, path: Path, name: str, dtype, shape: tuple):
        self.path, self.name, self.dtype, self.shape = Path(path), name, np.dtype(dtype), tuple(shape)

    def __call__(self) -> np.ndarray:
        return self.read(None)

    def read(self, index=None) -> np.ndarray:
        index = tuple(index or ())
        index += (slice(None),) * (len(self.shape) - len(index))
        ranges = [s.indices(n)[:2] if isinstance(s, slice) else (int(s), int(s) + 1) for s, n in zip(index, self.shape)]
        out = aligned_empty(tuple(b - a for a, b in ranges), self.dtype)
        if not self.shape:
            out[...] = self._get(None)
        elif out.size:
            (lo, hi), rest = ranges[0], tuple(slice(a, b) for a, b in ranges[1:])
            rows = max(1, CHUNK_BYTES // max(out[:1].nbytes, 1))
            for r in range(lo, hi, rows):
                out[r - lo:min(r + rows, hi) - lo] = self._get((slice(r, min(r + rows, hi)),) + rest)
        READ_STATS["bytes"] += out.nbytes
        READ_STATS["reads"] += 1
        return out

    def _get(self, index):
        try:
            with safe_open(str(self.path), framework="np") as f:
                return f.get_tensor(self.name) if index is None else f.get_slice(self.name)[index]
        except SafetensorError as e:
            raise CheckpointError(f"{self.path}: could not read tensor {self.name} ({e}; the file changed or is "
                                  "truncated)") from e


ALIGN = 64  # bytes: XLA's CPU client aliases (does not copy) host arrays aligned this way


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``ALIGN``-byte boundary."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    buf = np.empty(nbytes + ALIGN, np.uint8)
    start = -buf.ctypes.data % ALIGN
    return buf[start:start + nbytes].view(dtype).reshape(shape)


def torch_tensors(paths) -> Dict[str, callable]:
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

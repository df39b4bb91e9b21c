"""Tensor files of a checkpoint: safetensors read tensor by tensor (or slice by slice), PyTorch ``.bin`` through torch.

Each safetensors reader reads just its tensor's bytes, into memory that XLA's CPU client aliases, so
streaming a checkpoint layer by layer never holds more than what was asked for (a memory map would keep
every touched page resident).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict

import ml_dtypes
import numpy as np

from radial_jax.checkpoints.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def safetensors_header(path: Path) -> tuple:
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


def safetensors_tensors(path: Path) -> Dict[str, callable]:
    """name -> zero-argument reader of one tensor of a safetensors file.

    Each reader reads just its tensor's bytes (``SafetensorsTensor``, into ``ALIGN``-aligned
    memory that XLA's CPU client aliases), so
    streaming a checkpoint layer by layer never holds more than what was asked
    for (a memory map would keep every touched page resident). The header is
    checked up front: every tensor's dtype, shape and byte range must be
    consistent and inside the file.
    """
    header, header_len = safetensors_header(path)
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

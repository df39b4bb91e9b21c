"""Read GGUF files (llama.cpp's format) as a Hugging Face config and Hugging Face tensors.

A GGUF file carries its config as metadata under llama.cpp's key names and its
tensors under llama.cpp's names, some of them transformed on the way in. This
module undoes both, so a GGUF file looks like what our loader already consumes
for a safetensors checkpoint: a ``config.json``-style dict and a mapping from
Hugging Face tensor names to zero-argument readers returning numpy arrays.

It follows transformers' own GGUF loader (``transformers.modeling_gguf_pytorch_utils``
and ``transformers.integrations.ggml``) field by field and tensor by tensor:

- the same config keys (``rope_theta``, ``head_dim`` ... as transformers' GGUF
  loader writes them, which transformers' config classes accept), the same
  ``model_type`` (``gemma3`` -> ``gemma3_text``; ``llama`` -> ``mistral`` when
  ``general.name`` is exactly ``"mistral"``), ``tie_word_embeddings`` true when the
  file has no ``output.weight``, and the special token ids of the tokenizer metadata;
- the same tensor names (those of ``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
  ``Qwen3ForCausalLM``, ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``,
  ``GPT2LMHeadModel``), and the same value transforms: llama.cpp's permutation of
  the q/k projection rows (weights and biases) is reversed for ``llama`` files,
  Gemma RMSNorm weights, which llama.cpp stores as ``1 + w``, get 1 subtracted
  (every ``*norm.weight``, q/k norms included), and GPT-2's Conv1D weights, which
  llama.cpp stores transposed, are transposed back.

Where the file states more than transformers reads, the extra fields are kept
(transformers falls back to its config defaults there): ``head_dim`` from
``attention.key_length`` for Qwen3, Gemma 2's attention and final logit
softcapping, Gemma 3's local RoPE base, ``rope_scaling`` from the
``rope.scaling.*`` metadata (linear, yarn), and Llama 3 RoPE scaling, which
llama.cpp does not write as metadata but as a ``rope_freqs.weight`` tensor of
per-frequency factors: its ``llama3`` parameters are recovered from that tensor
(any parameters that reproduce the factors give the same rotary frequencies) and
checked against it.

Tensors are read lazily: each reader reads its tensor's bytes from the file when
called (``np.fromfile`` at its offset, no memory map held), dequantizes them with
``gguf.quants.dequantize`` to float32, applies the transform above in float32 and
casts to the requested dtype.

Example::

    ckpt = GGUFCheckpoint("qwen2.5-0.5b-instruct-q8_0.gguf")
    ckpt.hf_config["model_type"]          # "qwen2"
    readers = ckpt.tensor_readers(np.float32)
    w = readers["model.layers.0.self_attn.q_proj.weight"]()   # [896, 896] float32
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Dict, Tuple

import ml_dtypes
import numpy as np

try:
    import gguf
    from gguf import GGMLQuantizationType, GGUFValueType
except ImportError as e:  # pragma: no cover - gguf is a dependency of this module only
    raise ImportError("radial_jax.checkpoints.gguf needs the `gguf` package (llama.cpp's gguf-py): "
                      "pip install gguf") from e

from radial_jax.checkpoints.errors import CheckpointError
from radial_jax.checkpoints.gguf_config import GGUFMetadata
from radial_jax.checkpoints.llama_cpp import llama3_parameters, unpermute_rows
from radial_jax.models.family import families
from radial_jax.models.names import GGUFNames

__all__ = ["GGUFCheckpoint", "SUPPORTED_ARCHITECTURES", "SUPPORTED_QUANT_TYPES"]

#: llama.cpp's names of each GGUF ``general.architecture``, from the family files (Mistral files say ``llama``).
GGUF_NAMES: Dict[str, GGUFNames] = {g.architecture: g for f in families().values() for g in f.gguf}
#: GGUF ``general.architecture`` values this module reads.
SUPPORTED_ARCHITECTURES: Tuple[str, ...] = tuple(sorted(GGUF_NAMES))


def _dequantizable_types() -> Tuple[GGMLQuantizationType, ...]:
    """Every storage type ``gguf.quants.dequantize`` reads, asked of it on one zero block of each type.

    Asking rather than listing keeps this module honest about the installed ``gguf`` package: llama.cpp's
    mixes (Q4_K_M holds Q5_0 and Q6_K tensors too) load whatever they hold, and a newer package's types
    come in by themselves (about 3 ms, once, at import)."""
    readable = []
    for qtype in GGMLQuantizationType:
        if qtype not in gguf.GGML_QUANT_SIZES:
            continue
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
        except NotImplementedError:  # integer and float64 tensors, Q8_1/Q8_K (llama.cpp's scratch types)
            continue
        readable.append(qtype)
    return tuple(readable)


#: Tensor storage types this module reads (``gguf.GGMLQuantizationType`` members; ``.name`` gives "Q8_0" ...):
#: all that ``gguf.quants.dequantize`` reads (F32, F16, BF16, Q4_0 ... Q8_0, the K-quants, the I-quants ...).
SUPPORTED_QUANT_TYPES: Tuple[GGMLQuantizationType, ...] = _dequantizable_types()

_OUT_DTYPES = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)}

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_ROPE_FREQS = "rope_freqs.weight"


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("gguf")
    except PackageNotFoundError:  # pragma: no cover - a source checkout of gguf-py
        return "unknown version"


def _type_name(qtype) -> str:
    return getattr(qtype, "name", str(qtype))


class _TensorInfo:
    """Where one tensor's bytes are and how they are stored (no data)."""

    __slots__ = ("gguf_name", "qtype", "shape", "offset", "n_bytes")

    def __init__(self, gguf_name: str, qtype: GGMLQuantizationType, shape: tuple, offset: int, n_bytes: int):
        self.gguf_name, self.qtype, self.shape, self.offset, self.n_bytes = gguf_name, qtype, shape, offset, n_bytes


class GGUFCheckpoint:
    """A GGUF file as a Hugging Face ``config.json``-style dict and lazily read, HF-named tensors.

    The constructor reads only the header (metadata and the tensor table) and
    validates everything that is cheap to validate before any tensor is read: a
    file that is not GGUF, truncated or garbled; an architecture not in
    ``SUPPORTED_ARCHITECTURES``; a tensor stored in a type not in
    ``SUPPORTED_QUANT_TYPES``; missing metadata; tensors this module has no
    Hugging Face name for. Each is a ``radial_jax.checkpoints.errors.CheckpointError`` (a
    ``ValueError``) whose message names the file and what was expected.

    Attributes:
      path: the file (``pathlib.Path``).
      architecture: the file's ``general.architecture`` (``"llama"``, ``"qwen2"`` ...).
      hf_config: the ``config.json``-style dict (``model_type``, ``architectures``,
        ``vocab_size``, ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
        ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
        ``max_position_embeddings``, ``rms_norm_eps``, ``rope_theta``,
        ``rope_scaling``, ``sliding_window``, Gemma's softcapping and
        ``rope_local_base_freq`` (10000 unless the file says, as llama.cpp runs it),
        ``attention_bias`` for a Llama with q/k/v biases, ``tie_word_embeddings``,
        ``bos/eos/unk/pad_token_id``; GPT-2 uses its own ``n_embd``/``n_layer``/
        ``n_head``/``n_ctx``/``n_positions``/``n_inner``/``layer_norm_epsilon``).
        Other keys the file does not state are left out, so the config class's
        defaults apply, as in transformers (e.g. Gemma's ``query_pre_attn_scalar``,
        256, which llama.cpp takes as ``head_dim``, or hidden / heads for the 27B
        models: the same value for every published Gemma 2/3 size but 27B).
    """

    def __init__(self, path):
        self.path = Path(os.path.expanduser(str(path)))
        self._check_file()
        meta, array_lengths, infos = self._read_header()
        self._meta, self._array_lengths = meta, array_lengths
        self.architecture = self._check_architecture()
        self._check_quant_types(infos)
        self._infos: Dict[str, _TensorInfo] = {info.gguf_name: info for info in infos}
        self.hf_config = GGUFMetadata(meta, array_lengths, self._infos, GGUF_NAMES[self.architecture],
                                      self._error).hf_config()
        self._names = self._map_names()
        self._check_shapes()
        if _ROPE_FREQS in self._infos:  # the only tensor read up front: tiny, and part of the config
            self._set_llama3_rope_scaling()

    # ------------------------------------------------------------------ public API

    def tensor_readers(self, dtype=np.float32) -> Dict[str, Callable[[], np.ndarray]]:
        """Hugging Face tensor name -> zero-argument reader of that tensor.

        Each reader reads the tensor's bytes from the file only when called,
        dequantizes them to float32, undoes llama.cpp's transform (q/k
        permutation, Gemma's ``1 + w`` norms, GPT-2's transposes) and returns a
        C-contiguous ``np.ndarray`` of ``dtype`` in Hugging Face (PyTorch) layout:
        ``nn.Linear`` weights ``[out_features, in_features]``, GPT-2 Conv1D weights
        ``[in_features, out_features]``, embeddings ``[vocab_size, hidden]``, norms
        and biases ``[n]``. ``lm_head.weight`` is present only when the file has
        ``output.weight`` (otherwise ``hf_config["tie_word_embeddings"]`` is true).

        Args:
          dtype: ``np.float32`` (default), ``np.float16`` or ``ml_dtypes.bfloat16``
            (or their names); values are cast from float32 after dequantization.
        """
        try:
            out_dtype = np.dtype(dtype)
        except TypeError as e:
            raise ValueError(f"dtype {dtype!r} is not a numpy dtype; use float32, float16 or bfloat16") from e
        if out_dtype not in _OUT_DTYPES:
            raise ValueError(f"dtype {out_dtype} is not supported; use float32, float16 or bfloat16")
        return {hf_name: (lambda g=gguf_name: self._read(g, out_dtype)) for gguf_name, hf_name in self._names.items()}

    def tokenizer(self):
        """The file's tokenizer, built by transformers from the GGUF metadata.

        ``transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)``.
        """
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)

    def __repr__(self) -> str:
        return (f"GGUFCheckpoint({str(self.path)!r}, architecture={self.architecture!r}, "
                f"model_type={self.hf_config.get('model_type')!r}, tensors={len(self._names)})")

    # ------------------------------------------------------------------ header and validation

    def _error(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")

    def _check_file(self):
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file (expected a GGUF file)")
        self._size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
        if head[:4] != b"GGUF":
            raise self._error(f"not a GGUF file: it starts with {head[:4]!r}, expected the magic bytes b'GGUF'")
        if self._size < 24:
            raise self._error(f"truncated GGUF file: {self._size} bytes, shorter than the 24-byte GGUF header")

    def _read_header(self):
        try:
            reader = gguf.GGUFReader(self.path)
        except ValueError as e:
            match = re.search(r"(\d+) is not a valid GGMLQuantizationType", str(e))
            if match:
                raise self._error(
                    f"a tensor is stored in ggml type id {match.group(1)}, which is not a known quantization type; "
                    f"supported types: {', '.join(t.name for t in SUPPORTED_QUANT_TYPES)}") from e
            raise self._error(f"not a valid GGUF file: the file is truncated or corrupt "
                              f"({type(e).__name__}: {e})") from e
        except Exception as e:  # IndexError, KeyError, OverflowError, UnicodeDecodeError ... on garbage
            raise self._error(f"not a valid GGUF file: the file is truncated or corrupt "
                              f"({type(e).__name__}: {e})") from e
        try:
            meta, array_lengths = {}, {}
            for key, field in reader.fields.items():
                if key.startswith("GGUF."):
                    continue
                if field.types and field.types[0] == GGUFValueType.ARRAY:
                    array_lengths[key] = len(field.data)
                    if field.types[-1] != GGUFValueType.STRING and len(field.data) <= 1024:
                        meta[key] = field.contents()
                elif field.types and field.types[0] == GGUFValueType.FLOAT32:
                    meta[key] = float(str(np.float32(field.contents())))  # 1e-05, not 9.999999747378752e-06
                else:
                    meta[key] = field.contents()
            infos = []
            for t in reader.tensors:
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml order -> numpy order
                infos.append(_TensorInfo(t.name, t.tensor_type, shape, int(t.data_offset), int(t.n_bytes)))
        except Exception as e:
            raise self._error(f"not a valid GGUF file: its metadata is corrupt ({type(e).__name__}: {e})") from e
        finally:
            del reader  # drops the memory map; readers open the file themselves
        for info in infos:
            end = info.offset + info.n_bytes
            if end > self._size:
                raise self._error(f"truncated GGUF file: tensor {info.gguf_name!r} needs bytes up to {end}, "
                                  f"but the file has {self._size} bytes")
        return meta, array_lengths, infos

    def _check_architecture(self) -> str:
        arch = self._meta.get("general.architecture")
        if arch is None:
            raise self._error("no general.architecture in the GGUF metadata; expected one of "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise self._error(f"GGUF architecture {arch!r} is not supported; supported architectures: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        return arch

    def _check_quant_types(self, infos):
        bad = [info for info in infos if info.qtype not in SUPPORTED_QUANT_TYPES]
        if bad:
            first = bad[0]
            more = f" (and {len(bad) - 1} more tensors of unreadable types)" if len(bad) > 1 else ""
            raise self._error(
                f"tensor {first.gguf_name!r} is stored as {_type_name(first.qtype)}, which gguf.quants.dequantize "
                f"(gguf {_gguf_version()}) cannot read{more}; readable storage types: "
                f"{', '.join(t.name for t in SUPPORTED_QUANT_TYPES)}")

    # ------------------------------------------------------------------ names and shapes

    def _map_names(self) -> Dict[str, str]:
        table = GGUF_NAMES[self.architecture]
        global_names, block_names, prefix = table.global_names, table.block_names, table.block_prefix
        n_layers = self.hf_config.get("num_hidden_layers", self.hf_config.get("n_layer"))
        names, unknown = {}, []
        for gguf_name in self._infos:
            if gguf_name in global_names:
                names[gguf_name] = global_names[gguf_name]
                continue
            if gguf_name == _ROPE_FREQS and self.architecture == "llama":
                continue  # folded into hf_config["rope_scaling"]
            match = _BLOCK_RE.match(gguf_name)
            if match and match.group(2) in block_names and int(match.group(1)) < n_layers:
                i, part, kind = int(match.group(1)), match.group(2), match.group(3)
                names[gguf_name] = prefix.format(i=i) + f"{block_names[part]}.{kind}"
            else:
                unknown.append(gguf_name)
        if unknown:
            raise self._error(
                f"tensors with no Hugging Face name for a {self.architecture} model with {n_layers} layers: "
                f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''} ({len(unknown)} in all)")
        return names

    def _check_shapes(self):
        embd = self._infos.get("token_embd.weight")
        vocab = self.hf_config["vocab_size"]
        if embd is not None and embd.shape[0] != vocab:
            raise self._error(f"token_embd.weight has {embd.shape[0]} rows, but the metadata says the vocabulary "
                              f"has {vocab} tokens")
        if GGUF_NAMES[self.architecture].unpermute_qk:
            heads = {"attn_q": self.hf_config["num_attention_heads"], "attn_k": self.hf_config["num_key_value_heads"]}
            for name, info in self._infos.items():
                match = _BLOCK_RE.match(name)
                if match and match.group(2) in heads and info.shape[0] % (2 * heads[match.group(2)]):
                    raise self._error(f"tensor {name!r} has {info.shape[0]} rows, not a multiple of 2 x "
                                      f"{heads[match.group(2)]} heads, so its q/k permutation cannot be undone")

    # ------------------------------------------------------------------ reading

    def _read_float32(self, gguf_name: str) -> np.ndarray:
        """One tensor as stored (llama.cpp layout and values), dequantized to float32, numpy-order shape."""
        info = self._infos[gguf_name]
        raw = np.fromfile(self.path, dtype=np.uint8, count=info.n_bytes, offset=info.offset)
        if raw.size != info.n_bytes:
            raise self._error(f"truncated GGUF file: tensor {gguf_name!r} has {raw.size} of its {info.n_bytes} bytes")
        row_bytes = gguf.quants.quant_shape_to_byte_shape(info.shape, info.qtype)[-1] if info.shape else info.n_bytes
        data = gguf.quants.dequantize(raw.reshape(-1, row_bytes), info.qtype)
        return np.asarray(data, dtype=np.float32).reshape(info.shape)

    def _read(self, gguf_name: str, dtype: np.dtype) -> np.ndarray:
        x = self._read_float32(gguf_name)
        table, part = GGUF_NAMES[self.architecture], gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else None
        if table.unpermute_qk and part in ("attn_q", "attn_k"):
            heads = self.hf_config["num_attention_heads"] if part == "attn_q" else self.hf_config["num_key_value_heads"]
            x = unpermute_rows(x, heads)
        elif table.norm_offset and gguf_name.endswith("norm.weight"):
            x = x - np.float32(table.norm_offset)
        elif table.transposed and gguf_name.endswith(table.transposed):
            x = x.T
        return np.ascontiguousarray(x.astype(dtype, copy=False))

    # ------------------------------------------------------------------ Llama 3 rope scaling

    def _set_llama3_rope_scaling(self):
        if self.architecture != "llama":
            return
        if "rope_scaling" in self.hf_config:
            raise self._error(f"both rope scaling metadata ({self.hf_config['rope_scaling']['rope_type']}) and a "
                              f"{_ROPE_FREQS} tensor; only one is supported")
        info = self._infos[_ROPE_FREQS]
        if info.qtype == GGMLQuantizationType.F32:  # as llama.cpp writes it: read without dequantizing
            factors = np.fromfile(self.path, dtype=np.float32, count=info.n_bytes // 4, offset=info.offset)
        else:
            factors = self._read_float32(_ROPE_FREQS)
        factors = factors.reshape(-1).astype(np.float64)
        config = self.hf_config
        dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        if factors.size != dim // 2:
            raise self._error(f"{_ROPE_FREQS} has {factors.size} factors, expected head_dim / 2 = {dim // 2}")
        scaling = llama3_parameters(factors, config.get("rope_theta", 10000.0), dim)
        if scaling is None:
            raise self._error(f"{_ROPE_FREQS} holds per-frequency factors that no Llama 3 rope scaling "
                              f"(factor, low/high_freq_factor, original_max_position_embeddings) reproduces")
        if scaling:
            config["rope_scaling"] = scaling



"""Hugging Face tensor names -> our parameter paths: the vocabulary of a family's one name table.

Each family file (``radial_jax/models/families/*.py``) holds one ``FamilyNames``
table. A ``Rule`` maps one HF tensor (``{i}`` = layer index) to one of our
parameter paths and says how to convert it:

* ``linear``: torch ``nn.Linear`` ``[out, in]`` -> flax ``[in, out]``;
* ``conv``: torch ``[out, in, kh, kw]`` -> flax ``[kh, kw, in, out]``;
* ``copy``: as stored (GPT-2's ``Conv1D`` already is ``[in, out]``);

and, with ``part=(i, n)``, keeps the ``i``-th of ``n`` equal slices of the last
axis after converting (GPT-2's fused ``c_attn`` holds q, k and v). Rules for
parameters a given config does not have are simply not used: which of our
parameters exist is decided by the module itself.

A family that llama.cpp writes also holds its ``GGUFNames``: llama.cpp's tensor names mapped to the
same Hugging Face names, and what llama.cpp did to the values on the way in
(``radial_jax.checkpoints.gguf`` reads any file through them).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Mapping, Optional, Tuple

import numpy as np

TRANSFORMS = ("copy", "linear", "conv")


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str
    ours: tuple
    transform: str = "copy"
    part: Optional[Tuple[int, int]] = None  # (index, count): a slice of the last axis

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform {self.transform!r} is unknown; allowed: {TRANSFORMS}")


@dataclasses.dataclass(frozen=True)
class FamilyNames:
    strip_prefixes: tuple  # HF base-model prefixes that may or may not be present
    rules: tuple  # non-layer tensors
    layer_rules: tuple  # per-layer tensors, stacked along our leading layer axis
    ignorable: tuple = ()  # HF tensors we knowingly do not use (prefix-stripped names; ``{i}``: any layer)
    ignorable_prefixes: tuple = ()  # whole groups of HF tensors we do not use (e.g. a vision tower)

    def normalise(self, name: str) -> str:
        for prefix in self.strip_prefixes:
            if name.startswith(prefix):
                return name[len(prefix):]
        return name

    def is_ignorable(self, name: str) -> bool:
        if name in self.ignorable or name.startswith(self.ignorable_prefixes):
            return True
        return any(_layer_pattern(p).fullmatch(name) for p in self.ignorable if "{i}" in p)

    def rule_for(self, ours: tuple, layer: bool) -> Optional[Rule]:
        for rule in (self.layer_rules if layer else self.rules):
            if rule.ours == ours:
                return rule
        return None


# llama.cpp's names shared by its Llama-like decoders: GGUF name -> Hugging Face name ("{i}": the block)
GGUF_DECODER_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_DECODER_BLOCK = {  # a block's tensor, without "blk.{i}." and ".weight" / ".bias"
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
}


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFNames:
    """The tensors of one GGUF ``general.architecture``, as llama.cpp names and stores them."""

    architecture: str
    hf_classes: Mapping[str, str]  # model_type -> the transformers class whose names these are
    block_names: Mapping[str, str]  # a block's GGUF tensor ("attn_q") -> its HF name after ``block_prefix``
    global_names: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(GGUF_DECODER_GLOBAL))
    block_prefix: str = "model.layers.{i}."
    unpermute_qk: bool = False  # llama.cpp permuted the rows of q and k (Llama files): undone on reading
    norm_offset: float = 0.0  # stored norm weights are ``w + norm_offset`` (Gemma's 1 + w): subtracted
    transposed: Tuple[str, ...] = ()  # GGUF tensors stored transposed (GPT-2's Conv1D weights)


@functools.lru_cache(maxsize=None)
def _layer_pattern(name: str) -> "re.Pattern":
    """``"h.{i}.attn.bias"`` -> a regex matching it for any layer index."""
    return re.compile(re.escape(name).replace(re.escape("{i}"), r"\d+"))


def linear(hf: str, *ours, bias: bool = True) -> tuple:
    """``hf.weight`` (transposed) and, if ``bias``, ``hf.bias`` -> ``ours/kernel``, ``ours/bias``."""
    rules = (Rule(f"{hf}.weight", (*ours, "kernel"), "linear"),)
    return rules + ((Rule(f"{hf}.bias", (*ours, "bias")),) if bias else ())


def norm(hf: str, *ours) -> tuple:
    """A norm's ``weight`` -> ``scale`` and ``bias`` -> ``bias`` (a norm without bias simply has no ``bias``)."""
    return Rule(f"{hf}.weight", (*ours, "scale")), Rule(f"{hf}.bias", (*ours, "bias"))


def convert(array: np.ndarray, rule: Rule) -> np.ndarray:
    """The HF tensor in our layout (``rule.transform``, then ``rule.part``)."""
    if rule.transform == "linear":
        array = array.T
    elif rule.transform == "conv":
        array = array.transpose(2, 3, 1, 0)
    if rule.part is not None:
        index, count = rule.part
        size = array.shape[-1] // count
        array = array[..., index * size:(index + 1) * size]
    return array

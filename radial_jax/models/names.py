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
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Optional, Tuple

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

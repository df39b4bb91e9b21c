"""What the family configs share: ``FamilyConfig`` / ``DecoderConfig`` (validation, derived sizes, the HF
fields) and the check of field types, run before anything compares or multiplies them.

A family config is a frozen dataclass whose annotations say what each field holds. ``check_field_types``
refuses a value of the wrong kind with the field's name, what it holds and what is allowed (``"32"`` for a
width would otherwise fail later as "'<' not supported between instances of 'str' and 'int'"), and turns
numpy scalars into the Python numbers they are (``np.int64(4)`` is an integer), so configs hash and
serialise alike. A numeric field named like a norm's epsilon (``*_eps``, ``*_epsilon``) must be > 0: a
negative one turns every normalisation into NaN. Fields of other annotations (tuples, unions of several types, nested configs) are left to
the family's own checks.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Optional, Tuple

import numpy as np

from radial_jax.models import stack
from radial_jax.models.decoder import DecoderSpec
from radial_jax.models.layer import ACTIVATIONS

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


@functools.lru_cache(maxsize=None)
def _simple_fields(cls) -> Tuple[Tuple[str, type, bool], ...]:
    """``(name, int | float | bool | str, None allowed)`` for each field annotated with one of those."""
    hints = typing.get_type_hints(cls)
    out = []
    for field in dataclasses.fields(cls):
        hint = hints.get(field.name)
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = typing.get_origin(hint) is typing.Union and len(args) == 1
        base = args[0] if optional else hint
        if base in _NAMES:
            out.append((field.name, base, optional))
    return tuple(out)


def _coerced(value, kind: type) -> Optional[object]:
    """``value`` as a Python ``kind``, or None when it is not one (bools are not numbers here)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value) if kind is bool else None
    if kind is int and isinstance(value, (int, np.integer)):
        return int(value)
    if kind is float and isinstance(value, (int, float, np.integer, np.floating)):
        return value if isinstance(value, (int, float)) else float(value)
    if kind is str and isinstance(value, str):
        return value
    return None


def check_field_types(config) -> None:
    """Refuse a field of ``config`` that is not of its annotated type; numpy scalars become Python numbers."""
    cls = type(config)
    for name, kind, optional in _simple_fields(cls):
        value = getattr(config, name)
        if value is None and optional:
            continue
        coerced = _coerced(value, kind)
        if coerced is None:
            allowed = _NAMES[kind] + (" or null" if optional else "")
            raise ValueError(f"{cls.__name__}.{name} must be {allowed}, got {value!r} ({type(value).__name__})")
        if name.endswith(("_eps", "_epsilon")) and not coerced > 0:
            raise ValueError(f"{cls.__name__}.{name} must be > 0 (a norm's epsilon), got {value!r}")
        if coerced is not value:
            object.__setattr__(config, name, coerced)  # frozen dataclass: as its own __post_init__ does


class FamilyConfig:
    """What every family's config shares (a base of the frozen dataclasses; it has no fields of its own).

    A family sets the class attributes below and calls ``self.check()`` first in its ``__post_init__``.
    """

    LAYERS_FIELD = "num_hidden_layers"  # the field that counts the layers of the pool
    POSITIVE_INTS: Tuple[str, ...] = ()  # integer fields that must be >= 1
    MODEL_TYPES: Tuple[str, ...] = ()  # the values of a ``model_type`` field, when the config has one
    ACTIVATION_FIELD: Optional[str] = None  # the field naming the MLP's activation

    @property
    def num_layers(self) -> int:
        return getattr(self, self.LAYERS_FIELD)

    def check(self) -> None:
        """Field types, ``MODEL_TYPES``, ``POSITIVE_INTS`` and the activation; a list of eos ids becomes a tuple."""
        check_field_types(self)
        name = type(self).__name__
        if self.MODEL_TYPES and self.model_type not in self.MODEL_TYPES:
            raise ValueError(f"{name}.model_type {self.model_type!r} is not supported; supported: {self.MODEL_TYPES}")
        for field in self.POSITIVE_INTS:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}.{field} must be an integer >= 1, got {value!r}")
        activation = getattr(self, self.ACTIVATION_FIELD) if self.ACTIVATION_FIELD else None
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"{name}.{self.ACTIVATION_FIELD} {activation!r} is not supported; supported: "
                             f"{sorted(ACTIVATIONS)}")
        if isinstance(getattr(self, "eos_token_id", None), list):
            self.set_field("eos_token_id", tuple(self.eos_token_id))

    def set_field(self, name: str, value) -> None:
        """Set a field of the frozen dataclass (for values derived in ``__post_init__``)."""
        object.__setattr__(self, name, value)

    def derive_heads(self, default_head_dim: Optional[int] = None) -> None:
        """``num_key_value_heads`` None: one per query head (no GQA); ``head_dim`` None: ``default_head_dim``, else
        ``hidden_size // num_attention_heads``, which must divide."""
        if self.num_key_value_heads is None:
            self.set_field("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if default_head_dim is None and self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                                 f"{self.num_attention_heads}; give head_dim explicitly")
            self.set_field("head_dim", default_head_dim or self.hidden_size // self.num_attention_heads)

    @classmethod
    def hf_kwargs(cls, hf: dict, skip=(), null_means_default="all") -> dict:
        """The entries of a Hugging Face ``config.json`` dict that are fields of ``cls`` (less ``skip``), with the
        fields of ``null_means_default`` (a tuple of names, or ``"all"``) dropped where the file says null."""
        names = {f.name for f in dataclasses.fields(cls)} - set(skip)
        kwargs = {k: hf[k] for k in names if k in hf}
        defaulted = names if null_means_default == "all" else set(null_means_default)
        return {k: v for k, v in kwargs.items() if not (k in defaulted and v is None)}

    def layer_meta(self) -> dict:
        """Every layer attends to all keys with the one RoPE table (families with windows override this)."""
        return stack.layer_meta([0] * self.num_layers, [0] * self.num_layers)


class DecoderConfig(FamilyConfig):
    """A language model's config: the position limit and, by default, a plain embedding and head."""

    POSITIONS_FIELD = "max_position_embeddings"  # the longest sequence the positions allow
    # Hugging Face's usual names (Llama, Qwen, ...); a family with others says so
    POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings")
    ACTIVATION_FIELD = "hidden_act"

    @property
    def max_length(self) -> int:
        return getattr(self, self.POSITIONS_FIELD)

    def decoder_spec(self) -> DecoderSpec:
        """Embeddings of ``hidden_size``, a final norm, the head tied as the config says."""
        return DecoderSpec(embed_dim=self.hidden_size, final_norm=True, tie_embeddings=self.tie_word_embeddings)

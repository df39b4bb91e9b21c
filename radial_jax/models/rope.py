"""Rotary position embeddings (RoPE) as Hugging Face computes them, with their scaling rules.

A ``RoPE`` is one frequency table: ``inv_freq[d/2]`` from ``theta`` and an
optional scaling rule (``linear``: every frequency divided by ``factor``, as
Gemma 3's global layers; ``llama3``: low frequencies divided by ``factor``, high
ones kept, a smooth ramp between, as Llama 3.1+). A model whose layers use
different tables (Gemma 3: local layers theta 1e4, global layers 1e6 scaled)
stacks them (``inv_freq_table``) and gives each layer an index, so that a layer
chosen by a traced index (a Radial Network's pool) finds its own table.

``RoPE.from_hf_config`` reads a family's one table from a Hugging Face config
(``rope_parameters``, or the older ``rope_theta`` + ``rope_scaling``).

Rotation follows transformers' ``rotate_half`` convention (the two halves of
the head dimension, not interleaved pairs); angles are computed in float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

SCALINGS = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RoPE:
    """One rotary table. ``factor``, ``low_freq_factor``, ``high_freq_factor`` and
    ``original_max_position_embeddings`` are those of HF's ``rope_parameters``."""

    theta: float = 10000.0
    scaling: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise ValueError(f"RoPE scaling {self.scaling!r} is not supported; supported: {SCALINGS}")
        if not self.theta > 0 or not self.factor > 0:
            raise ValueError(f"RoPE needs theta > 0 and factor > 0, got theta={self.theta}, factor={self.factor}")
        if self.scaling == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"llama3 RoPE scaling needs high_freq_factor > low_freq_factor, got "
                             f"{self.high_freq_factor} <= {self.low_freq_factor}")

    @classmethod
    def from_hf(cls, params: Optional[dict], default_theta: float = 10000.0) -> "RoPE":
        """From an HF ``rope_parameters`` (transformers >= 5) or ``rope_scaling`` dict (older configs).

        ``default_theta``: the config's ``rope_theta`` when the dict does not carry it.
        """
        p = dict(params or {})
        kind = p.get("rope_type", p.get("type", "default")) or "default"
        theta = float(p.get("rope_theta", default_theta))
        if kind not in SCALINGS:
            raise ValueError(f"RoPE scaling type {kind!r} is not supported; supported: {SCALINGS}")
        fields = {f.name for f in dataclasses.fields(cls)} - {"theta", "scaling"}
        return cls(theta=theta, scaling=kind, **{k: v for k, v in p.items() if k in fields and v is not None})

    @classmethod
    def from_hf_config(cls, hf: dict, default_theta: float = 10000.0) -> "RoPE":
        """The one RoPE table of a whole Hugging Face config dict, in either format, as transformers reads it.

        * transformers >= 5: ``rope_parameters`` ``{"rope_type", "rope_theta", ...}``;
        * older hub checkpoints: top-level ``rope_theta`` and ``rope_scaling``
          (``{"type" | "rope_type": ..., "factor": ...}`` or null).

        As in transformers: a non-null ``rope_scaling`` takes the place of ``rope_parameters``;
        a ``rope_theta`` inside the dict wins over the top-level one (``default_theta`` when
        neither is given); ``llama3`` without ``original_max_position_embeddings`` uses the
        config's top-level one, else ``max_position_embeddings``. Partial rotation
        (``partial_rotary_factor`` < 1) and per-layer-type tables are a ValueError.
        """
        key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
        params = hf.get(key) or {}
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise ValueError(f"{key} must be one flat dict of RoPE settings (per-layer-type tables are not "
                             f"supported here), got {params!r}")
        p = dict(params)
        p.setdefault("rope_theta", hf.get("rope_theta") or default_theta)
        partial = p.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
        if partial is not None and float(partial) != 1.0:
            raise ValueError(f"partial_rotary_factor {partial} is not supported; supported: 1.0 (the whole head "
                             "dimension rotated)")
        kind = p.get("rope_type", p.get("type", "default")) or "default"
        if kind not in SCALINGS:
            raise ValueError(f"{key} rope_type {kind!r} is not supported; supported: {SCALINGS}")
        if kind == "llama3":
            if hf.get("original_max_position_embeddings") is not None:
                p["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
            elif p.get("original_max_position_embeddings") is None and hf.get("max_position_embeddings"):
                p["original_max_position_embeddings"] = hf["max_position_embeddings"]
        return cls.from_hf(p, default_theta)

    @classmethod
    def coerce(cls, value, max_position_embeddings: Optional[int] = None) -> "RoPE":
        """A config field that holds one table: a ``RoPE``, its ``dataclasses.asdict`` form (a config
        saved as JSON) or an HF ``rope_parameters`` dict (``from_hf_config``); anything else is a ValueError."""
        if isinstance(value, RoPE):
            return value
        if isinstance(value, dict) and "scaling" in value:
            return cls(**value)
        if isinstance(value, dict):
            return cls.from_hf_config({"rope_parameters": value, "max_position_embeddings": max_position_embeddings})
        raise ValueError(f"a RoPE setting must be a RoPE or a dict, got {type(value).__name__}")

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """``[head_dim // 2]`` float32 inverse frequencies after scaling."""
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        inv = 1.0 / (self.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
        if self.scaling == "linear":
            return (inv / self.factor).astype(np.float32)
        if self.scaling == "llama3":
            old = self.original_max_position_embeddings
            low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        return inv.astype(np.float32)


def inv_freq_table(ropes: Sequence[RoPE], head_dim: int) -> np.ndarray:
    """``[R, head_dim // 2]``: the tables of ``ropes`` stacked (a layer picks one by index)."""
    return np.stack([r.inv_freq(head_dim) for r in ropes])


def apply_rope(x_bthd, positions_bt, inv_freq_f):
    """Rotate ``x`` (queries or keys, ``[b, t, heads, d]``) by the angles ``positions * inv_freq``.

    ``inv_freq_f``: ``[d / 2]`` (may be traced, e.g. one row of ``inv_freq_table``).
    """
    angles_btf = positions_bt.astype(jnp.float32)[..., None] * inv_freq_f.astype(jnp.float32)
    angles_btd = jnp.concatenate([angles_btf, angles_btf], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles_btd), jnp.sin(angles_btd)
    xf = x_bthd.astype(jnp.float32)
    half = x_bthd.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x_bthd.dtype)

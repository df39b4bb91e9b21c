"""Qwen2 / Qwen2.5 and Qwen3: config, Hugging Face names, family entry.

Llama's architecture (pre-RMSNorm, SwiGLU MLP, RoPE, grouped-query attention)
with:

* Qwen2: biases on q, k and v only (none on o or the MLP);
* Qwen3: RMSNorm of q and k over the head dimension (before RoPE), an explicit
  ``head_dim`` (transformers' default 128), biases on q, k, v and o only with
  ``attention_bias``.

Sliding windows, as transformers >= 5 reads them: ``layer_types``
(``full_attention`` / ``sliding_attention`` per layer) when given, else derived
from the older settings: layer ``i`` slides iff ``use_sliding_window`` and
``i >= max_window_layers``; ``sliding_window`` counts only with
``use_sliding_window`` (real Qwen2.5 checkpoints carry ``sliding_window: 32768``
with ``use_sliding_window: false``: full attention). RoPE in either config format
(``RoPE.from_hf_config``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

from radial_jax.models.config_base import DecoderConfig
from radial_jax.models.decoder import CausalLM
from radial_jax.models.family import Family
from radial_jax.models.layer import LayerConfig
from radial_jax.models.families.llama import GGUF_BLOCK as LLAMA_GGUF_BLOCK
from radial_jax.models.families.llama import NAMES as LLAMA_NAMES
from radial_jax.models.names import GGUFNames, norm
from radial_jax.models.rope import RoPE
from radial_jax.models.stack import layer_meta

MODEL_TYPES = ("qwen2", "qwen3")
LAYER_TYPES = ("full_attention", "sliding_attention")
HF_DEFAULT_WINDOW = 4096  # transformers' default when config.json has no sliding_window
QWEN3_DEFAULT_HEAD_DIM = 128  # transformers' Qwen3Config default


@dataclasses.dataclass(frozen=True)
class QwenConfig(DecoderConfig):
    """A Qwen2 or Qwen3 decoder (Hugging Face field names); the defaults are transformers' ``Qwen2Config``'s."""

    vocab_size: int = 151936  # Qwen's byte-level BPE, padded
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None  # None: num_attention_heads (no GQA)
    head_dim: Optional[int] = None  # None: Qwen3 128, Qwen2 hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768  # checkpoints state theirs
    rms_norm_eps: float = 1e-6
    rope_parameters: RoPE = RoPE()  # a dict (HF's rope_parameters, or asdict's) is converted
    attention_bias: bool = False  # Qwen3 only: biases on q, k, v and o (Qwen2 always has q, k, v biases)
    use_sliding_window: bool = False
    sliding_window: Optional[int] = None  # kept only with use_sliding_window (else None, as transformers does)
    max_window_layers: int = 28  # without layer_types: layers >= this slide (with use_sliding_window)
    layer_types: Optional[tuple] = None  # None: derived from the three settings above
    tie_word_embeddings: bool = False  # the small checkpoints (Qwen2 0.5B, 1.5B) set it
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None  # Qwen2's config.json says 151643
    eos_token_id: Union[int, tuple, None] = None
    model_type: str = "qwen2"  # the checkpoint's own: "qwen2" or "qwen3"

    MODEL_TYPES = MODEL_TYPES

    def __post_init__(self):
        self.check()
        self.derive_heads(QWEN3_DEFAULT_HEAD_DIM if self.model_type == "qwen3" else None)
        set_ = self.set_field
        set_("rope_parameters", RoPE.coerce(self.rope_parameters, self.max_position_embeddings))
        if self.model_type == "qwen2" and self.attention_bias:
            raise ValueError("attention_bias is a Qwen3 setting; Qwen2 always has q, k, v biases and no o bias")
        self._check_windows(set_)
        self.layer_config()  # validates heads / head_dim early

    def _check_windows(self, set_):
        if not self.use_sliding_window:
            set_("sliding_window", None)
        elif self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be null or an integer >= 1, got {self.sliding_window!r}")
        if self.layer_types is None:
            set_("layer_types", tuple(
                "sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers
                else "full_attention" for i in range(self.num_hidden_layers)))
        set_("layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"layer_types {unknown} are not supported; allowed: {LAYER_TYPES}")
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError("layer_types has sliding_attention layers but no sliding_window is set "
                             "(use_sliding_window is false or sliding_window is null)")

    @classmethod
    def from_hf(cls, hf: dict) -> "QwenConfig":
        """From a Hugging Face ``config.json`` dict (either format; see the module docstring)."""
        model_type = hf.get("model_type", "qwen2")
        kwargs = cls.hf_kwargs(hf, skip={"rope_parameters", "model_type", "sliding_window", "attention_bias"},
                               null_means_default=("head_dim", "num_key_value_heads", "layer_types", "use_sliding_window",
                                                   "max_window_layers", "tie_word_embeddings"))
        kwargs["sliding_window"] = hf.get("sliding_window", HF_DEFAULT_WINDOW)
        if model_type == "qwen3" and hf.get("attention_bias") is not None:
            kwargs["attention_bias"] = hf["attention_bias"]
        return cls(model_type=model_type, rope_parameters=RoPE.from_hf_config(hf), **kwargs)

    def layer_config(self) -> LayerConfig:
        qwen3 = self.model_type == "qwen3"
        return LayerConfig(
            hidden_size=self.hidden_size, num_heads=self.num_attention_heads, ffn_dim=self.intermediate_size,
            num_kv_heads=self.num_key_value_heads, head_dim=self.head_dim, activation=self.hidden_act,
            gated_mlp=True, norm="rmsnorm", norm_eps=self.rms_norm_eps, qk_norm=qwen3,
            qkv_bias=self.attention_bias if qwen3 else True, out_bias=self.attention_bias if qwen3 else False,
            mlp_bias=False, ropes=(self.rope_parameters,))

    def layer_meta(self) -> dict:
        windows = [self.sliding_window if kind == "sliding_attention" else 0 for kind in self.layer_types]
        return layer_meta(windows, [0] * self.num_layers)


# Llama's names, plus Qwen3's q/k norms (Qwen2 checkpoints simply have none)
NAMES = dataclasses.replace(LLAMA_NAMES, layer_rules=LLAMA_NAMES.layer_rules + (
    *norm("layers.{i}.self_attn.q_norm", "q_norm"),
    *norm("layers.{i}.self_attn.k_norm", "k_norm"),
))

GGUF = (GGUFNames("qwen2", {"qwen2": "Qwen2ForCausalLM"}, LLAMA_GGUF_BLOCK),
        GGUFNames("qwen3", {"qwen3": "Qwen3ForCausalLM"},
                  {**LLAMA_GGUF_BLOCK, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}))

FAMILY = Family(name="qwen", model_types=MODEL_TYPES, config_cls=QwenConfig, module_cls=CausalLM, names=NAMES,
                gguf=GGUF)

"""Llama (2, 3, 3.1+) and Mistral: config, Hugging Face names, family entry.

One architecture, two ``model_type`` values: pre-RMSNorm layers, a SwiGLU MLP
(``down(act(gate(x)) * up(x))``), rotary positions and grouped-query attention.
Honoured settings: ``num_key_value_heads`` (GQA), an explicit ``head_dim``, the
tied or untied LM head, ``attention_bias`` (q, k, v and o) and ``mlp_bias``
(Llama), RoPE ``default`` / ``linear`` / ``llama3`` scaling in either config
format (``rope_parameters``, or ``rope_theta`` + ``rope_scaling``; see
``RoPE.from_hf_config``), and Mistral's ``sliding_window`` (every layer; null:
full attention). As in transformers, Llama ignores a ``sliding_window`` entry,
Mistral ignores bias and ``layer_types`` entries, and ``pretraining_tp`` (which
only sliced the matmuls of old implementations) changes nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

from radial_jax.models.config_base import DecoderConfig
from radial_jax.models.decoder import CausalLM
from radial_jax.models.family import Family
from radial_jax.models.layer import LayerConfig
from radial_jax.models.names import GGUF_DECODER_BLOCK, FamilyNames, GGUFNames, Rule, linear, norm
from radial_jax.models.rope import RoPE
from radial_jax.models.stack import layer_meta

MODEL_TYPES = ("llama", "mistral")
MISTRAL_DEFAULT_WINDOW = 4096  # transformers' MistralConfig default when config.json has no sliding_window


@dataclasses.dataclass(frozen=True)
class LlamaConfig(DecoderConfig):
    """A Llama or Mistral decoder (Hugging Face field names); the defaults are transformers' ``LlamaConfig``'s
    (Llama 2 7B's sizes)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008  # the gated MLP's inner width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None  # None: num_attention_heads (no GQA)
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048  # checkpoints state theirs (Llama 2: 4096, Llama 3.1: 131072)
    rms_norm_eps: float = 1e-6
    rope_parameters: RoPE = RoPE()  # a dict (HF's rope_parameters, or asdict's) is converted
    attention_bias: bool = False  # Llama: biases on q, k, v and o
    mlp_bias: bool = False  # Llama: biases on gate, up and down
    sliding_window: Optional[int] = None  # Mistral: every layer sees this many keys (itself included)
    tie_word_embeddings: bool = False
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = 1  # Llama 2's SentencePiece <s> (Llama 3's config.json says 128000)
    eos_token_id: Union[int, tuple, None] = 2
    model_type: str = "llama"  # the checkpoint's own: "llama" or "mistral"

    MODEL_TYPES = MODEL_TYPES

    def __post_init__(self):
        self.check()
        self.derive_heads()
        self.set_field("rope_parameters", RoPE.coerce(self.rope_parameters, self.max_position_embeddings))
        if self.sliding_window is not None:
            if self.model_type != "mistral":
                raise ValueError(f"sliding_window is a Mistral setting; model_type {self.model_type!r} has "
                                 "full attention only")
            if not isinstance(self.sliding_window, int) or self.sliding_window < 1:
                raise ValueError(f"sliding_window must be null or an integer >= 1, got {self.sliding_window!r}")
        if self.model_type == "mistral" and (self.attention_bias or self.mlp_bias):
            raise ValueError("Mistral has no attention_bias / mlp_bias (transformers' Mistral has no biases)")
        self.layer_config()  # validates heads / head_dim early

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """From a Hugging Face ``config.json`` dict (either RoPE format; see the module docstring)."""
        model_type = hf.get("model_type", "llama")
        kwargs = cls.hf_kwargs(hf, skip={"rope_parameters", "model_type", "sliding_window", "attention_bias", "mlp_bias"},
                               null_means_default=("head_dim", "num_key_value_heads"))  # null: derived
        if model_type == "mistral":
            kwargs["sliding_window"] = hf.get("sliding_window", MISTRAL_DEFAULT_WINDOW)
        else:
            kwargs.update({k: hf[k] for k in ("attention_bias", "mlp_bias") if hf.get(k) is not None})
        return cls(model_type=model_type, rope_parameters=RoPE.from_hf_config(hf), **kwargs)

    def layer_config(self) -> LayerConfig:
        return LayerConfig(
            hidden_size=self.hidden_size, num_heads=self.num_attention_heads, ffn_dim=self.intermediate_size,
            num_kv_heads=self.num_key_value_heads, head_dim=self.head_dim, activation=self.hidden_act,
            gated_mlp=True, norm="rmsnorm", norm_eps=self.rms_norm_eps, qkv_bias=self.attention_bias,
            out_bias=self.attention_bias, mlp_bias=self.mlp_bias, ropes=(self.rope_parameters,))

    def layer_meta(self) -> dict:
        return layer_meta([self.sliding_window or 0] * self.num_layers, [0] * self.num_layers)


NAMES = FamilyNames(
    strip_prefixes=("model.",),
    rules=(
        Rule("embed_tokens.weight", ("embed_tokens", "embedding")),
        *norm("norm", "final_norm"),
        Rule("lm_head.weight", ("lm_head", "kernel"), "linear"),
    ),
    layer_rules=(
        *linear("layers.{i}.self_attn.q_proj", "q_proj"),
        *linear("layers.{i}.self_attn.k_proj", "k_proj"),
        *linear("layers.{i}.self_attn.v_proj", "v_proj"),
        *linear("layers.{i}.self_attn.o_proj", "out_proj"),
        *norm("layers.{i}.input_layernorm", "attn_norm"),
        *linear("layers.{i}.mlp.up_proj", "fc1"),
        *linear("layers.{i}.mlp.gate_proj", "gate"),
        *linear("layers.{i}.mlp.down_proj", "fc2"),
        *norm("layers.{i}.post_attention_layernorm", "mlp_norm"),
    ),
    ignorable=("lm_head.weight",),  # a copy of embed_tokens when the head is tied
)

GGUF_BLOCK = {**GGUF_DECODER_BLOCK, "ffn_norm": "post_attention_layernorm"}
# llama.cpp writes Mistral as "llama" too (transformers tells them apart by general.name)
GGUF = GGUFNames("llama", {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}, GGUF_BLOCK,
                 unpermute_qk=True)

FAMILY = Family(name="llama", model_types=MODEL_TYPES, config_cls=LlamaConfig, module_cls=CausalLM, names=NAMES,
                gguf=(GGUF,))

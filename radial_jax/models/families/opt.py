"""OPT (facebook/opt-125m ... opt-66b): config, Hugging Face names, family entry.

Every configuration flag used by the published checkpoints is honoured:
pre- or post-LayerNorm (``do_layer_norm_before``; OPT-350M is post-LN), the
embedding projections when ``word_embed_proj_dim != hidden_size`` (OPT-350M),
biases (``enable_bias``), learned positions with their offset of 2, the tied
or untied LM head, the final LayerNorm (absent for post-LN and when
``_remove_final_layer_norm``), its affine flag and the activation.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from radial_jax.models.config_base import DecoderConfig
from radial_jax.models.decoder import CausalLM, DecoderSpec
from radial_jax.models.family import Family
from radial_jax.models.layer import LayerConfig
from radial_jax.models.names import FamilyNames, Rule, linear, norm


@dataclasses.dataclass(frozen=True)
class OPTConfig(DecoderConfig):
    """An OPT decoder (Hugging Face field names); the defaults are facebook/opt-125m's."""

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072  # the MLP's inner width (other families call it intermediate_size)
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True  # False: post-LN blocks (OPT-350M)
    word_embed_proj_dim: Optional[int] = None  # None: hidden_size
    activation_function: str = "relu"  # the MLP's
    layer_norm_elementwise_affine: bool = True
    enable_bias: bool = True  # biases on the attention's and the MLP's linear layers
    remove_final_layer_norm: bool = False  # config.json's _remove_final_layer_norm
    tie_word_embeddings: bool = True
    pad_token_id: int = 1  # OPT's tokenizer: <pad> 1, </s> 2 (also its bos)
    bos_token_id: int = 2
    eos_token_id: int = 2

    model_type = "opt"
    POSITION_OFFSET = 2  # OPT's learned positions are shifted by 2 (fairseq legacy)

    POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "num_attention_heads",
                     "max_position_embeddings", "word_embed_proj_dim")
    ACTIVATION_FIELD = "activation_function"

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.set_field("word_embed_proj_dim", self.hidden_size)
        self.check()
        self.layer_config()  # validates heads / activation early

    @classmethod
    def from_hf(cls, hf: dict) -> "OPTConfig":
        """From a Hugging Face ``config.json`` dict (or ``PretrainedConfig.to_dict()``)."""
        kwargs = cls.hf_kwargs(hf)
        if "_remove_final_layer_norm" in hf:
            kwargs["remove_final_layer_norm"] = bool(hf["_remove_final_layer_norm"])
        return cls(**kwargs)

    def layer_config(self) -> LayerConfig:
        return LayerConfig(
            hidden_size=self.hidden_size, num_heads=self.num_attention_heads, ffn_dim=self.ffn_dim,
            activation=self.activation_function, pre_norm=self.do_layer_norm_before,
            qkv_bias=self.enable_bias, out_bias=self.enable_bias, mlp_bias=self.enable_bias, norm_eps=1e-5,
            norm_scale=self.layer_norm_elementwise_affine, norm_bias=self.layer_norm_elementwise_affine)

    def decoder_spec(self) -> DecoderSpec:
        return DecoderSpec(
            embed_dim=self.word_embed_proj_dim, position_table=self.max_position_embeddings + self.POSITION_OFFSET,
            position_offset=self.POSITION_OFFSET,
            final_norm=self.do_layer_norm_before and not self.remove_final_layer_norm,
            tie_embeddings=self.tie_word_embeddings)


NAMES = FamilyNames(
    strip_prefixes=("model.",),
    rules=(
        Rule("decoder.embed_tokens.weight", ("embed_tokens", "embedding")),
        Rule("decoder.embed_positions.weight", ("embed_positions", "embedding")),
        Rule("decoder.project_in.weight", ("project_in", "kernel"), "linear"),
        Rule("decoder.project_out.weight", ("project_out", "kernel"), "linear"),
        *norm("decoder.final_layer_norm", "final_norm"),
        Rule("lm_head.weight", ("lm_head", "kernel"), "linear"),
    ),
    layer_rules=(
        *linear("decoder.layers.{i}.self_attn.q_proj", "q_proj"),
        *linear("decoder.layers.{i}.self_attn.k_proj", "k_proj"),
        *linear("decoder.layers.{i}.self_attn.v_proj", "v_proj"),
        *linear("decoder.layers.{i}.self_attn.out_proj", "out_proj"),
        *norm("decoder.layers.{i}.self_attn_layer_norm", "attn_norm"),
        *linear("decoder.layers.{i}.fc1", "fc1"),
        *linear("decoder.layers.{i}.fc2", "fc2"),
        *norm("decoder.layers.{i}.final_layer_norm", "mlp_norm"),
    ),
    ignorable=("lm_head.weight",),  # a copy of embed_tokens when the head is tied
)

FAMILY = Family(name="opt", model_types=("opt",), config_cls=OPTConfig, module_cls=CausalLM, names=NAMES)

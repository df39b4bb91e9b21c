"""GPT-2 (openai-community/gpt2 ... gpt2-xl, distilgpt2): config, Hugging Face names, family entry.

Pre-LayerNorm layers with biases everywhere, a plain MLP (``activation_function``,
``gelu_new``; width ``n_inner``, default ``4 * n_embd``), learned absolute
positions (no offset), a final LayerNorm and the LM head tied to the token table.
GPT-2's ``Conv1D`` weights are already ``[in, out]``; the fused ``c_attn`` holds
q, k and v side by side and is split here.

Positions count the real tokens of a row (``cumsum(mask) - 1``), as transformers'
``generate`` does, so a left-padded row computes what it computes alone (a plain
transformers forward without ``position_ids`` numbers padding as positions too).

Not implemented, and a ValueError when set: ``scale_attn_by_inverse_layer_idx``
(a per-layer attention scale) and ``add_cross_attention`` (encoder-decoder use).
``reorder_and_upcast_attn`` changes only mixed-precision rounding in transformers;
our attention always computes scores and softmax in float32.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

from radial_jax.models.config_base import DecoderConfig
from radial_jax.models.decoder import CausalLM, DecoderSpec
from radial_jax.models.family import Family
from radial_jax.models.layer import LayerConfig
from radial_jax.models.names import FamilyNames, GGUFNames, Rule, linear, norm

# transformers' GPT2Config.attribute_map: generic names a config.json may use instead of GPT-2's own.
ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions", "num_attention_heads": "n_head",
           "num_hidden_layers": "n_layer"}
UNSUPPORTED = {  # HF setting -> the only value we implement
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
}


@dataclasses.dataclass(frozen=True)
class GPT2Config(DecoderConfig):
    """A GPT-2 decoder (GPT-2's own field names; ``ALIASES`` maps the generic ones); defaults: gpt2 (124M)."""

    vocab_size: int = 50257
    n_positions: int = 1024  # learned positions
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None  # None: 4 * n_embd
    activation_function: str = "gelu_new"  # the MLP's (tanh-approximated GELU)
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True  # scores times head_dim ** -0.5 (False: unscaled)
    scale_attn_by_inverse_layer_idx: bool = False  # not implemented
    add_cross_attention: bool = False  # not implemented
    tie_word_embeddings: bool = True
    pad_token_id: Optional[int] = None  # GPT-2 has no pad token; <|endoftext|> is 50256
    bos_token_id: Optional[int] = 50256
    eos_token_id: Union[None, int, tuple] = 50256

    model_type = "gpt2"

    LAYERS_FIELD = "n_layer"
    POSITIONS_FIELD = "n_positions"
    POSITIVE_INTS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
    ACTIVATION_FIELD = "activation_function"

    def __post_init__(self):
        if self.n_inner is None:
            self.set_field("n_inner", 4 * self.n_embd)
        self.check()  # layer_norm_epsilon > 0 too (a norm's epsilon)
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config.n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        for name, supported in UNSUPPORTED.items():
            if bool(getattr(self, name)) != supported:
                raise ValueError(f"GPT2Config.{name}={getattr(self, name)!r} is not supported; supported: {supported}")
        self.layer_config()

    @classmethod
    def from_hf(cls, hf: dict) -> "GPT2Config":
        """From a Hugging Face ``config.json`` dict (or ``PretrainedConfig.to_dict()``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {ALIASES.get(k, k): v for k, v in hf.items() if k in ALIASES and ALIASES[k] not in hf}
        kwargs.update({k: v for k, v in hf.items() if k in names})
        return cls(**kwargs)

    # -- the family protocol ----------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    def layer_config(self) -> LayerConfig:
        return LayerConfig(
            hidden_size=self.n_embd, num_heads=self.n_head, ffn_dim=self.n_inner, activation=self.activation_function,
            norm="layernorm", norm_eps=self.layer_norm_epsilon, pre_norm=True, qkv_bias=True, out_bias=True,
            mlp_bias=True, attn_scale=None if self.scale_attn_weights else 1.0)

    def decoder_spec(self) -> DecoderSpec:
        return DecoderSpec(embed_dim=self.n_embd, position_table=self.n_positions, final_norm=True,
                           tie_embeddings=self.tie_word_embeddings)


def _fused_qkv(hf: str) -> tuple:
    """``c_attn`` (``Conv1D``: weight ``[e, 3e]``, bias ``[3e]``) -> q, k, v projections."""
    return tuple(Rule(f"{hf}.{tensor}", (ours, param), part=(index, 3))
                 for index, ours in enumerate(("q_proj", "k_proj", "v_proj"))
                 for tensor, param in (("weight", "kernel"), ("bias", "bias")))


def _conv1d(hf: str, ours: str) -> tuple:
    """A ``Conv1D`` (weight already ``[in, out]``) -> ``ours/kernel``, ``ours/bias``."""
    return Rule(f"{hf}.weight", (ours, "kernel")), Rule(f"{hf}.bias", (ours, "bias"))


NAMES = FamilyNames(
    strip_prefixes=("transformer.",),  # GPT2LMHeadModel; the original checkpoints have none
    rules=(
        Rule("wte.weight", ("embed_tokens", "embedding")),
        Rule("wpe.weight", ("embed_positions", "embedding")),
        *norm("ln_f", "final_norm"),
        *linear("lm_head", "lm_head", bias=False),
    ),
    layer_rules=(
        *_fused_qkv("h.{i}.attn.c_attn"),
        *_conv1d("h.{i}.attn.c_proj", "out_proj"),
        *norm("h.{i}.ln_1", "attn_norm"),
        *_conv1d("h.{i}.mlp.c_fc", "fc1"),
        *_conv1d("h.{i}.mlp.c_proj", "fc2"),
        *norm("h.{i}.ln_2", "mlp_norm"),
    ),
    # lm_head: a copy of wte when tied; attn.bias / attn.masked_bias: the causal-mask buffers older
    # checkpoints (openai-community/gpt2) carry, not parameters.
    ignorable=("lm_head.weight", "h.{i}.attn.bias", "h.{i}.attn.masked_bias"),
)

GGUF = GGUFNames(
    "gpt2", {"gpt2": "GPT2LMHeadModel"},
    global_names={"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
                  "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
                  "output.weight": "lm_head.weight"},
    block_names={"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
                 "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
    block_prefix="transformer.h.{i}.",
    transposed=("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight"),  # Conv1D, as llama.cpp
)

FAMILY = Family(name="gpt2", model_types=("gpt2",), config_cls=GPT2Config, module_cls=CausalLM, names=NAMES,
                gguf=(GGUF,))

"""OPT decoder-only language model (facebook/opt-125m ... opt-66b) in flax.linen.

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

import flax.linen as nn
import jax.numpy as jnp

from radial_jax.kv_cache import KVCache
from radial_jax.models.layer import LayerConfig
from radial_jax.models.outputs import ModelOutput
from radial_jax.models.stack import run_layers


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    word_embed_proj_dim: Optional[int] = None  # None: hidden_size
    activation_function: str = "relu"
    layer_norm_elementwise_affine: bool = True
    enable_bias: bool = True
    remove_final_layer_norm: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2

    model_type = "opt"
    POSITION_OFFSET = 2  # OPT's learned positions are shifted by 2 (fairseq legacy)

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        self.layer_config()  # validates heads / activation early

    @classmethod
    def from_hf(cls, hf: dict) -> "OPTConfig":
        """From a Hugging Face ``config.json`` dict (or ``PretrainedConfig.to_dict()``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in names and v is not None}
        if "_remove_final_layer_norm" in hf:
            kwargs["remove_final_layer_norm"] = bool(hf["_remove_final_layer_norm"])
        return cls(**kwargs)

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @property
    def has_projection(self) -> bool:
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def max_length(self) -> int:
        """The longest sequence the position table allows."""
        return self.max_position_embeddings

    def layer_config(self) -> LayerConfig:
        return LayerConfig(
            hidden_size=self.hidden_size, num_heads=self.num_attention_heads, ffn_dim=self.ffn_dim,
            activation=self.activation_function, pre_norm=self.do_layer_norm_before,
            qkv_bias=self.enable_bias, proj_bias=self.enable_bias, norm_eps=1e-5,
            norm_affine=self.layer_norm_elementwise_affine)


def hf_positions(attention_mask_bt):
    """Positions as transformers computes them: ``cumsum(mask) * mask - 1`` (padding -> -1)."""
    m = attention_mask_bt.astype(jnp.int32)
    return jnp.cumsum(m, axis=1) * m - 1


def _embed(num, features, axes, name, dtype):
    return nn.Embed(num, features, dtype=dtype, name=name,
                    embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes))


class OPTForCausalLM(nn.Module):
    """OPT with its LM head.

    Call modes:
      * parallel (``cache=None``): the whole sequence, any padding; positions as
        transformers computes them from ``attention_mask``, slots = indices.
      * cached (``cache`` given): ``positions`` are the slots (right padding);
        K/V are written into the cache and keys read from it. Used by generation.
    """

    config: OPTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids_bt, attention_mask_bt=None, *, positions_bt=None,
                 cache: Optional[KVCache] = None, threshold=None, ratio_kind: str = "out",
                 compute_logits: bool = True, embeddings_only: bool = False):
        c = self.config
        b, t = input_ids_bt.shape
        valid = jnp.ones((b, t), bool) if attention_mask_bt is None else attention_mask_bt.astype(bool)
        if positions_bt is None:
            if cache is not None:
                raise ValueError("cached calls need explicit positions_bt (the cache slots)")
            positions_bt = hf_positions(valid)
            slots = jnp.broadcast_to(jnp.arange(t), (b, t))
        else:
            slots = positions_bt
        embed_tokens = _embed(c.vocab_size, c.word_embed_proj_dim, ("vocab", "embed"), "embed_tokens", self.dtype)
        x = embed_tokens(input_ids_bt)
        if c.has_projection:
            x = nn.Dense(c.hidden_size, use_bias=False, dtype=self.dtype, name="project_in",
                         kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")))(x)
        pos_table = _embed(c.max_position_embeddings + c.POSITION_OFFSET, c.hidden_size, (None, "embed"),
                           "embed_positions", self.dtype)
        x = x + pos_table(positions_bt + c.POSITION_OFFSET)
        if embeddings_only:  # the residual stream entering layer 0 (layer-by-layer streaming)
            return x
        x, stats, cache = run_layers(c.layer_config(), c.num_layers, x, slots, valid, cache=cache,
                                     threshold=threshold, causal=True, ratio_kind=ratio_kind, dtype=self.dtype)
        if c.has_final_layer_norm:
            x = nn.LayerNorm(epsilon=1e-5, use_bias=c.layer_norm_elementwise_affine,
                             use_scale=c.layer_norm_elementwise_affine, dtype=jnp.float32, name="final_layer_norm",
                             scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                             bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))(x)
            x = x.astype(self.dtype)
        if c.has_projection:
            x = nn.Dense(c.word_embed_proj_dim, use_bias=False, dtype=self.dtype, name="project_out",
                         kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", None)))(x)
        logits = None
        if compute_logits:
            if c.tie_word_embeddings:
                logits = embed_tokens.attend(x)
            else:
                logits = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype, name="lm_head",
                                  kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                           ("embed", "vocab")))(x)
            logits = logits.astype(jnp.float32)
        return ModelOutput(logits=logits, hidden=x, stats=stats, cache=cache)

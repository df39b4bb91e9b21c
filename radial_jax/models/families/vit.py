"""Vision Transformer (google/vit-base/large/huge): config, module, Hugging Face names, family entry.

Inputs are ``pixel_values [b, channels, height, width]`` as Hugging Face image
processors produce them (channels first); the patch convolution runs channels-last.
The bare encoder (``ViTModel``, with its tanh pooler) and the classifier
(``ViTForImageClassification``, on the class token) are both supported.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from radial_jax.models.decoder import HeadOutput
from radial_jax.models.config_base import FamilyConfig
from radial_jax.models.family import Family
from radial_jax.models.layer import LayerConfig, make_norm, normal_init
from radial_jax.models.names import FamilyNames, Rule, linear, norm
from radial_jax.models.outputs import ModelOutput
from radial_jax.models.stack import pool_param, run_pool


@dataclasses.dataclass(frozen=True)
class ViTConfig(FamilyConfig):
    """A ViT encoder (Hugging Face field names); the defaults are ViT-Base/16 at 224 pixels."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int = 224  # pixels per side (square inputs)
    patch_size: int = 16  # pixels per side of a patch: (224 / 16) ** 2 = 196 patches + the class token
    num_channels: int = 3
    qkv_bias: bool = True  # biases on the query, key and value projections
    num_labels: int = 0  # 0: bare encoder (ViTModel); > 0: ViTForImageClassification
    add_pooling_layer: bool = True  # bare encoder only: dense + tanh on the class token
    pooler_act: str = "tanh"

    model_type = "vit"

    def __post_init__(self):
        self.check()
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        self.layer_config()

    @classmethod
    def from_hf(cls, hf: dict, *, with_classifier: Optional[bool] = None) -> "ViTConfig":
        """From a Hugging Face ``config.json`` dict.

        ``with_classifier`` defaults to whether ``architectures`` names
        ``ViTForImageClassification``; the label count comes from ``id2label``.
        """
        kwargs = cls.hf_kwargs(hf)
        for key in ("image_size", "patch_size"):
            if isinstance(kwargs.get(key), (list, tuple)):
                kwargs[key] = int(kwargs[key][0])
        if with_classifier is None:
            with_classifier = "ViTForImageClassification" in (hf.get("architectures") or [])
        kwargs["num_labels"] = len(hf.get("id2label") or {}) or 2 if with_classifier else 0
        return cls(**kwargs)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        return self.num_patches + 1

    def layer_config(self) -> LayerConfig:
        return LayerConfig(
            hidden_size=self.hidden_size, num_heads=self.num_attention_heads, ffn_dim=self.intermediate_size,
            activation=self.hidden_act, pre_norm=True, qkv_bias=self.qkv_bias, norm_eps=self.layer_norm_eps)


def check_pixel_values(config: ViTConfig, shape) -> None:
    want = (config.num_channels, config.image_size, config.image_size)
    if len(shape) != 4 or tuple(shape[1:]) != want or shape[0] < 1:
        raise ValueError(
            f"pixel_values must have shape [batch>=1, {want[0]}, {want[1]}, {want[2]}] (channels first); "
            f"got {tuple(shape)}")


class ViT(nn.Module):
    """ViT encoder; with ``config.num_labels > 0`` also the classifier on the class token."""

    config: ViTConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.config
        patch = (c.patch_size, c.patch_size)
        self.patch_embed = nn.Conv(c.hidden_size, patch, strides=patch, padding="VALID", dtype=self.dtype,
                                   kernel_init=normal_init((None, None, None, "embed")))
        self.cls_token = self.param("cls_token", normal_init((None, None, "embed")), (1, 1, c.hidden_size))
        self.position_embeddings = self.param("position_embeddings", normal_init((None, None, "embed")),
                                              (1, c.seq_len, c.hidden_size))
        self.layers = pool_param(self, c.layer_config(), c.num_layers, self.dtype)
        self.final_norm = make_norm(c.layer_config(), "final_norm")
        if c.num_labels:
            self.classifier = nn.Dense(c.num_labels, dtype=self.dtype, kernel_init=normal_init(("embed", None)))
        elif c.add_pooling_layer:
            self.pooler = nn.Dense(c.hidden_size, dtype=self.dtype, kernel_init=normal_init(("embed", None)))

    # -- the family protocol ----------------------------------------------------------------------
    @staticmethod
    def example_inputs(config, batch: int = 1, length: int = 0) -> tuple:
        del length
        return (jnp.zeros((batch, config.num_channels, config.image_size, config.image_size), jnp.float32),)

    @staticmethod
    def check_inputs(config, pixel_values, attention_mask=None) -> None:
        if attention_mask is not None:
            raise ValueError("a ViT takes no attention_mask (every patch counts)")
        check_pixel_values(config, np.shape(pixel_values))

    def embed(self, pixel_values_bchw, positions_bt=None):
        """Class token + patches + learned positions, ``[b, 1 + patches, e]``."""
        del positions_bt
        c = self.config
        check_pixel_values(c, pixel_values_bchw.shape)
        b = pixel_values_bchw.shape[0]
        patches = self.patch_embed(jnp.transpose(pixel_values_bchw, (0, 2, 3, 1)).astype(self.dtype))
        x = patches.reshape(b, -1, c.hidden_size)
        x = jnp.concatenate([jnp.broadcast_to(self.cls_token, (b, 1, c.hidden_size)).astype(self.dtype), x], axis=1)
        return x + self.position_embeddings.astype(self.dtype)

    def head(self, x_bte, compute_logits: bool = True) -> HeadOutput:
        c = self.config
        hidden = self.final_norm(x_bte).astype(self.dtype)
        logits = pooled = None
        if c.num_labels and compute_logits:
            logits = self.classifier(hidden[:, 0]).astype(jnp.float32)
        elif not c.num_labels and c.add_pooling_layer:
            pooled = jnp.tanh(self.pooler(hidden[:, 0]))
        return HeadOutput(logits=logits, hidden=hidden, pooled=pooled)

    def __call__(self, pixel_values_bchw, *, threshold=None, ratio_kind: str = "out", compute_logits: bool = True,
                 embeddings_only: bool = False) -> ModelOutput:
        c = self.config
        x = self.embed(pixel_values_bchw)
        if embeddings_only:  # the residual stream entering layer 0 (layer-by-layer streaming)
            return x
        b, t = x.shape[:2]
        slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x, stats, _ = run_pool(c.layer_config(), self.dtype, self.layers, c.layer_meta(), x, slots, slots,
                               jnp.ones((b, t), bool), causal=False, threshold=threshold, ratio_kind=ratio_kind)
        out = self.head(x, compute_logits)
        return ModelOutput(logits=out.logits, hidden=out.hidden, stats=stats, pooled=out.pooled)


NAMES = FamilyNames(
    strip_prefixes=("vit.",),
    rules=(
        Rule("embeddings.cls_token", ("cls_token",)),
        Rule("embeddings.position_embeddings", ("position_embeddings",)),
        Rule("embeddings.patch_embeddings.projection.weight", ("patch_embed", "kernel"), "conv"),
        Rule("embeddings.patch_embeddings.projection.bias", ("patch_embed", "bias")),
        *norm("layernorm", "final_norm"),
        *linear("pooler.dense", "pooler"),
        *linear("classifier", "classifier"),
    ),
    layer_rules=(
        *linear("encoder.layer.{i}.attention.attention.query", "q_proj"),
        *linear("encoder.layer.{i}.attention.attention.key", "k_proj"),
        *linear("encoder.layer.{i}.attention.attention.value", "v_proj"),
        *linear("encoder.layer.{i}.attention.output.dense", "out_proj"),
        *norm("encoder.layer.{i}.layernorm_before", "attn_norm"),
        *linear("encoder.layer.{i}.intermediate.dense", "fc1"),
        *linear("encoder.layer.{i}.output.dense", "fc2"),
        *norm("encoder.layer.{i}.layernorm_after", "mlp_norm"),
    ),
    # mask_token is for masked-image pretraining; pooler/classifier of the other head type.
    ignorable=("embeddings.mask_token", "pooler.dense.weight", "pooler.dense.bias",
               "classifier.weight", "classifier.bias"),
)

FAMILY = Family(name="vit", model_types=("vit",), config_cls=ViTConfig, module_cls=ViT, names=NAMES,
                kind="image_encoder")

"""Vision Transformer (google/vit-base/large/huge) in flax.linen: bare encoder and classifier.

Inputs are ``pixel_values [b, channels, height, width]`` as Hugging Face image
processors produce them (channels first); the patch convolution runs channels-last.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from radial_jax.models.layer import LayerConfig
from radial_jax.models.outputs import ModelOutput
from radial_jax.models.stack import run_layers


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    num_labels: int = 0  # 0: bare encoder (ViTModel); > 0: ViTForImageClassification
    add_pooling_layer: bool = True  # bare encoder only: dense + tanh on the class token
    pooler_act: str = "tanh"

    model_type = "vit"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        self.layer_config()

    @classmethod
    def from_hf(cls, hf: dict, *, with_classifier: Optional[bool] = None) -> "ViTConfig":
        """From a Hugging Face ``config.json`` dict.

        ``with_classifier`` defaults to whether ``architectures`` names
        ``ViTForImageClassification``; the label count comes from ``id2label``.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in names and v is not None}
        for key in ("image_size", "patch_size"):
            if isinstance(kwargs.get(key), (list, tuple)):
                kwargs[key] = int(kwargs[key][0])
        if with_classifier is None:
            with_classifier = "ViTForImageClassification" in (hf.get("architectures") or [])
        kwargs["num_labels"] = len(hf.get("id2label") or {}) or 2 if with_classifier else 0
        return cls(**kwargs)

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        return self.num_patches + 1

    def layer_config(self) -> LayerConfig:
        return LayerConfig(
            hidden_size=self.hidden_size, num_heads=self.num_attention_heads, ffn_dim=self.intermediate_size,
            activation=self.hidden_act, pre_norm=True, qkv_bias=self.qkv_bias, proj_bias=True,
            norm_eps=self.layer_norm_eps, norm_affine=True)


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

    @nn.compact
    def __call__(self, pixel_values_bchw, *, threshold=None, ratio_kind: str = "out",
                 compute_logits: bool = True, embeddings_only: bool = False):
        c = self.config
        check_pixel_values(c, pixel_values_bchw.shape)
        b = pixel_values_bchw.shape[0]
        init = lambda axes: nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
        patches = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
                          padding="VALID", dtype=self.dtype, name="patch_embed",
                          kernel_init=init((None, None, None, "embed")))(
            jnp.transpose(pixel_values_bchw, (0, 2, 3, 1)).astype(self.dtype))
        x = patches.reshape(b, -1, c.hidden_size)
        cls = self.param("cls_token", init((None, None, "embed")), (1, 1, c.hidden_size))
        pos = self.param("position_embeddings", init((None, None, "embed")), (1, c.seq_len, c.hidden_size))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.hidden_size)).astype(self.dtype), x], axis=1)
        x = x + pos.astype(self.dtype)
        if embeddings_only:  # the residual stream entering layer 0 (layer-by-layer streaming)
            return x
        t = x.shape[1]
        slots = jnp.broadcast_to(jnp.arange(t), (b, t))
        x, stats, _ = run_layers(c.layer_config(), c.num_layers, x, slots, jnp.ones((b, t), bool),
                                 threshold=threshold, causal=False, ratio_kind=ratio_kind, dtype=self.dtype)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=jnp.float32, name="final_norm",
                         scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                         bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))(x)
        x = x.astype(self.dtype)
        logits = pooled = None
        if c.num_labels and compute_logits:
            logits = nn.Dense(c.num_labels, dtype=self.dtype, name="classifier",
                              kernel_init=init(("embed", None)))(x[:, 0]).astype(jnp.float32)
        elif not c.num_labels and c.add_pooling_layer:
            pooled = jnp.tanh(nn.Dense(c.hidden_size, dtype=self.dtype, name="pooler",
                                       kernel_init=init(("embed", None)))(x[:, 0]))
        return ModelOutput(logits=logits, hidden=x, stats=stats, pooled=pooled)

"""One transformer layer = two residual blocks (attention, MLP), shared by all families.

The same code computes the forward pass, the residual-branch statistics used by
the profiler (DESIGN.md §2) and the oracle's skip decisions (§3), so the three
can never disagree.

A residual block is ``y = x + f(x)`` (pre-norm: ``f`` includes the norm; post-norm,
as in OPT-350M: ``y = norm(x + f(x))``, and ``f`` is measured before the norm).
Shapes: ``b`` batch, ``t`` tokens, ``e`` hidden (embed), ``h`` heads, ``d`` head dim.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
}

RATIO_KINDS = ("out", "in")  # ratio_out = |f|/|x+f| (default), ratio_in = |f|/|x|


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """Everything one layer needs; derived from a family config (OPTConfig, ViTConfig)."""

    hidden_size: int
    num_heads: int
    ffn_dim: int
    activation: str = "relu"
    pre_norm: bool = True
    qkv_bias: bool = True
    proj_bias: bool = True  # out projection, fc1, fc2
    norm_eps: float = 1e-5
    norm_affine: bool = True
    num_kv_heads: Optional[int] = None  # None: same as num_heads

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation {self.activation!r} is not supported; allowed: {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def block_flops_per_token(self, context_len: int) -> dict:
        """Multiply-add FLOPs (x2) per token of each residual block, for 'FLOPs kept'."""
        e, f = self.hidden_size, self.ffn_dim
        kv = self.kv_heads * self.head_dim
        attn = 2 * (e * e + 2 * e * kv + e * e) + 2 * 2 * context_len * e
        mlp = 2 * 2 * e * f
        return {"attn": attn, "mlp": mlp}


@flax.struct.dataclass
class BlockStats:
    """Per-token norms of one residual block, ``[..., t]`` each.

    ``x``: input of the block, ``f``: its update, ``y``: ``x + f`` (before any
    post-norm). ``keep``: whether the update was applied (always true outside the
    oracle).
    """

    x: jax.Array
    f: jax.Array
    y: jax.Array
    keep: jax.Array

    def ratio(self, kind: str = "out") -> jax.Array:
        if kind == "out":
            return self.f / jnp.maximum(self.y, 1e-30)
        if kind == "in":
            return self.f / jnp.maximum(self.x, 1e-30)
        raise ValueError(f"ratio kind {kind!r} is unknown; allowed: {RATIO_KINDS}")


@flax.struct.dataclass
class LayerStats:
    attn: BlockStats
    mlp: BlockStats
    layer: BlockStats  # the whole layer as one block, F = y_L - x_L


def _norm(v):
    return jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32)), axis=-1))


def block_stats(x, f, keep=None) -> BlockStats:
    keep = jnp.ones(x.shape[:-1], bool) if keep is None else keep
    return BlockStats(x=_norm(x), f=_norm(f), y=_norm(x.astype(jnp.float32) + f.astype(jnp.float32)), keep=keep)


def _dense(features, use_bias, axes, dtype, name):
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]))


class TransformerLayer(nn.Module):
    """Attention block then MLP block.

    The attention core is left to the caller (``qkv`` then ``finish``), because
    where keys come from (the sequence itself, the KV cache, the global cache of
    a Radial Network) is the caller's business. ``finish`` applies the oracle rule
    when given a threshold.
    """

    config: LayerConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.config
        e, h, d, g = c.hidden_size, c.num_heads, c.head_dim, c.kv_heads
        self.q_proj = _dense(h * d, c.qkv_bias, ("embed", "heads"), self.dtype, "q_proj")
        self.k_proj = _dense(g * d, c.qkv_bias, ("embed", "kv"), self.dtype, "k_proj")
        self.v_proj = _dense(g * d, c.qkv_bias, ("embed", "kv"), self.dtype, "v_proj")
        self.out_proj = _dense(e, c.proj_bias, ("heads", "embed"), self.dtype, "out_proj")
        self.fc1 = _dense(c.ffn_dim, c.proj_bias, ("embed", "mlp"), self.dtype, "fc1")
        self.fc2 = _dense(e, c.proj_bias, ("mlp", "embed"), self.dtype, "fc2")
        self.attn_norm = self._layer_norm("attn_norm")
        self.mlp_norm = self._layer_norm("mlp_norm")

    def _layer_norm(self, name):
        c = self.config
        return nn.LayerNorm(
            epsilon=c.norm_eps, use_bias=c.norm_affine, use_scale=c.norm_affine,
            dtype=jnp.float32, name=name,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))

    def qkv(self, x_bte):
        """Queries and keys/values of the attention block: ``[b, t, h|g, d]`` each."""
        c = self.config
        hin = self.attn_norm(x_bte).astype(self.dtype) if c.pre_norm else x_bte
        b, t = x_bte.shape[:2]
        q = self.q_proj(hin).reshape(b, t, c.num_heads, c.head_dim)
        k = self.k_proj(hin).reshape(b, t, c.kv_heads, c.head_dim)
        v = self.v_proj(hin).reshape(b, t, c.kv_heads, c.head_dim)
        return q, k, v

    def kv(self, x_bte):
        """Keys/values only (the *propagate* cache policy of skipped tokens)."""
        _, k, v = self.qkv(x_bte)
        return k, v

    def finish(self, x_bte, ctx_bthd, threshold=None, ratio_kind: str = "out"):
        """Complete the layer from the attention context.

        Args:
          x_bte: the layer input.
          ctx_bthd: attention context for the queries of ``x``.
          threshold: optional scalar; if given, each block's update is dropped for
            the tokens whose ratio (of ``ratio_kind``) is below it (the oracle).

        Returns:
          ``(y_bte, LayerStats)``.
        """
        b, t = x_bte.shape[:2]
        f_attn = self.out_proj(ctx_bthd.reshape(b, t, -1))
        y1, s_attn = self._residual(x_bte, f_attn, self.attn_norm, threshold, ratio_kind)
        hin = self.mlp_norm(y1).astype(self.dtype) if self.config.pre_norm else y1
        f_mlp = self.fc2(ACTIVATIONS[self.config.activation](self.fc1(hin)))
        y2, s_mlp = self._residual(y1, f_mlp, self.mlp_norm, threshold, ratio_kind)
        s_layer = block_stats(x_bte, (y2.astype(jnp.float32) - x_bte.astype(jnp.float32)))
        return y2, LayerStats(attn=s_attn, mlp=s_mlp, layer=s_layer)

    def _residual(self, x, f, norm, threshold, ratio_kind):
        stats = block_stats(x, f)
        if threshold is not None:
            keep = stats.ratio(ratio_kind) >= threshold
            stats = stats.replace(keep=keep)
            f = jnp.where(keep[..., None], f, jnp.zeros_like(f))
        y = x + f.astype(x.dtype)
        if not self.config.pre_norm:
            y = norm(y).astype(x.dtype)
            if threshold is not None:
                y = jnp.where(stats.keep[..., None], y, x)
        return y, stats

    def __call__(self, x_bte, mask_btt):
        """Plain self-attention over ``x`` itself (no cache); ``mask[b, i, j]``: i sees j."""
        from radial_jax.models.attention import dot_product_attention
        q, k, v = self.qkv(x_bte)
        return self.finish(x_bte, dot_product_attention(q, k, v, mask_btt))

"""One transformer layer = two residual blocks (attention, MLP), shared by every family.

The same code computes the forward pass, the residual-branch statistics used by
the profiler (docs/design.md §2) and the oracle's skip decisions (§3), so the
three can never disagree.

A residual block is ``y = x + f(x)``, where ``f`` is exactly what is added to the
residual stream:

* pre-norm (Llama, Qwen, Mistral, GPT-2, ViT, OPT): ``f = block(norm(x))``;
* sandwich norms (Gemma 2/3): ``f = post_norm(block(pre_norm(x)))``, the block's
  output *after* its post-norm;
* post-norm (OPT-350M): ``y = norm(x + f(x))``; ``f`` is measured before the norm.

What differs between families is configuration (``LayerConfig``): LayerNorm or
RMSNorm (Gemma's ``1 + w`` scale), a plain or gated (SwiGLU / GeGLU) MLP, biases,
grouped-query attention, an explicit head dimension, q/k RMSNorm (Qwen 3,
Gemma 3), RoPE tables (``radial_jax.models.rope``), the attention scale and
Gemma 2's score soft-capping. A layer's sliding window and RoPE table index are
per-layer data (``layer_meta``), not configuration, so that a layer picked by a
traced index (the Radial Network's pool) still finds its own.

Shapes: ``b`` batch, ``t`` tokens, ``e`` hidden (embed), ``h`` heads, ``g`` kv
heads, ``d`` head dim, ``f`` MLP width.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from radial_jax.models.attention import attend
from radial_jax.models.rope import apply_rope, inv_freq_table

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
}
NORMS = ("layernorm", "rmsnorm")
RATIO_KINDS = ("out", "in")  # ratio_out = |f|/|x+f| (default), ratio_in = |f|/|x|


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """Everything one layer needs; a family config derives it (``config.layer_config()``)."""

    hidden_size: int
    num_heads: int
    ffn_dim: int
    num_kv_heads: Optional[int] = None  # None: num_heads (no grouped-query attention)
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    activation: str = "relu"
    gated_mlp: bool = False  # fc2(act(gate(x)) * fc1(x)) (Llama, Qwen, Mistral, Gemma)
    norm: str = "layernorm"  # or "rmsnorm"
    norm_eps: float = 1e-5
    norm_scale: bool = True  # LayerNorm: learned scale (OPT's layer_norm_elementwise_affine)
    norm_bias: bool = True  # LayerNorm: learned bias
    rms_offset: float = 0.0  # RMSNorm scale is ``rms_offset + w`` (Gemma: 1)
    pre_norm: bool = True  # False: post-LN (OPT-350M)
    post_block_norm: bool = False  # Gemma 2/3: a norm on each block's output, before the residual add
    qk_norm: bool = False  # RMSNorm of q and k over the head dim (Qwen 3, Gemma 3)
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    attn_scale: Optional[float] = None  # None: head_dim ** -0.5
    attn_softcap: Optional[float] = None  # Gemma 2: tanh(score / cap) * cap
    ropes: tuple = ()  # RoPE tables (radial_jax.models.rope.RoPE); a layer uses one by index; (): none

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation {self.activation!r} is not supported; allowed: {sorted(ACTIVATIONS)}")
        if self.norm not in NORMS:
            raise ValueError(f"norm {self.norm!r} is not supported; allowed: {NORMS}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads} "
                "(give head_dim explicitly)")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"{self.num_heads} query heads cannot share {self.kv_heads} kv heads evenly")
        if self.ropes and self.head_size % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {self.head_size}")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def block_flops_per_token(self, context_len: float) -> dict:
        """Multiply-add FLOPs (x2) per token of each residual block at ``context_len`` keys."""
        e, f, d = self.hidden_size, self.ffn_dim, self.head_size
        q, kv = self.num_heads * d, self.kv_heads * d
        attn = 2 * (e * q + 2 * e * kv + q * e) + 2 * 2 * context_len * q
        mlp = 2 * (3 if self.gated_mlp else 2) * e * f
        return {"attn": attn, "mlp": mlp}

    def kv_flops_per_token(self) -> int:
        """FLOPs of the K and V projections alone (a *propagate* cache write)."""
        return 2 * 2 * self.hidden_size * self.kv_heads * self.head_size


@flax.struct.dataclass
class BlockStats:
    """Per-token norms of one residual block, ``[..., t]`` each.

    ``x``: input of the block, ``f``: its update (what is added to the residual
    stream), ``y``: ``x + f`` (before any post-norm). ``keep``: whether the update
    was applied (always true outside the oracle).
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


def _l2(v):
    return jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32)), axis=-1))


def block_stats(x, f, keep=None) -> BlockStats:
    keep = jnp.ones(x.shape[:-1], bool) if keep is None else keep
    return BlockStats(x=_l2(x), f=_l2(f), y=_l2(x.astype(jnp.float32) + f.astype(jnp.float32)), keep=keep)


class RMSNorm(nn.Module):
    """``x / rms(x) * (offset + scale)``, in float32 (Llama: offset 0, scale 1 at init; Gemma: offset 1, 0)."""

    eps: float = 1e-6
    offset: float = 0.0
    axis_name: Optional[str] = "embed"

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros_init() if self.offset else nn.initializers.ones_init()
        scale = self.param("scale", nn.with_logical_partitioning(init, (self.axis_name,)), (x.shape[-1],))
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return y * (self.offset + scale.astype(jnp.float32))


def make_norm(c: LayerConfig, name: str, axis_name: Optional[str] = "embed") -> nn.Module:
    """The family's norm (LayerNorm or RMSNorm), computing in float32."""
    if c.norm == "rmsnorm":
        return RMSNorm(eps=c.norm_eps, offset=c.rms_offset, axis_name=axis_name, name=name)
    return nn.LayerNorm(
        epsilon=c.norm_eps, use_bias=c.norm_bias, use_scale=c.norm_scale, dtype=jnp.float32, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis_name,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis_name,)))


def normal_init(axes):
    """The initialiser of every random weight (normal, std 0.02, as GPT-2 and OPT), with its logical axes."""
    return nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)


def dense(features, use_bias, axes, dtype, name):
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, name=name, kernel_init=normal_init(axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]))


def attention(c: LayerConfig, q_bqhd, k_bgkd, v_bgkd, mask_bqk, self_kv=None, causal_blocks: bool = False,
              sparse_keys: bool = False):
    """``radial_jax.models.attention.attend`` with this layer's scale and soft-cap (keys ``[b, g, k, d]``)."""
    return attend(q_bqhd, k_bgkd, v_bgkd, mask_bqk, scale=c.attn_scale, softcap=c.attn_softcap, self_kv=self_kv,
                  causal_blocks=causal_blocks, sparse_keys=sparse_keys)


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
        e, h, d, g = c.hidden_size, c.num_heads, c.head_size, c.kv_heads
        self.q_proj = dense(h * d, c.qkv_bias, ("embed", "heads"), self.dtype, "q_proj")
        self.k_proj = dense(g * d, c.qkv_bias, ("embed", "kv"), self.dtype, "k_proj")
        self.v_proj = dense(g * d, c.qkv_bias, ("embed", "kv"), self.dtype, "v_proj")
        self.out_proj = dense(e, c.out_bias, ("heads", "embed"), self.dtype, "out_proj")
        self.fc1 = dense(c.ffn_dim, c.mlp_bias, ("embed", "mlp"), self.dtype, "fc1")
        if c.gated_mlp:
            self.gate = dense(c.ffn_dim, c.mlp_bias, ("embed", "mlp"), self.dtype, "gate")
        self.fc2 = dense(e, c.mlp_bias, ("mlp", "embed"), self.dtype, "fc2")
        self.attn_norm = make_norm(c, "attn_norm")
        self.mlp_norm = make_norm(c, "mlp_norm")
        if c.post_block_norm:
            self.attn_post_norm = make_norm(c, "attn_post_norm")
            self.mlp_post_norm = make_norm(c, "mlp_post_norm")
        if c.qk_norm:
            self.q_norm = RMSNorm(eps=c.norm_eps, offset=c.rms_offset, axis_name=None, name="q_norm")
            self.k_norm = RMSNorm(eps=c.norm_eps, offset=c.rms_offset, axis_name=None, name="k_norm")

    def qkv(self, x_bte, positions_bt=None, rope_index=0):
        """Queries and keys/values of the attention block: ``[b, t, h|g, d]`` each (q/k normed, rotated).

        ``positions_bt`` (RoPE families) are the tokens' positions; ``rope_index`` picks
        the layer's table among ``config.ropes`` (may be traced).
        """
        return (self.query(x_bte, positions_bt, rope_index), *self.kv(x_bte, positions_bt, rope_index))

    def query(self, x_bte, positions_bt=None, rope_index=0):
        """Queries alone, ``[b, t, h, d]`` (when the keys/values come from elsewhere)."""
        c = self.config
        b, t = x_bte.shape[:2]
        q = self.q_proj(self._attention_input(x_bte)).reshape(b, t, c.num_heads, c.head_size)
        if c.qk_norm:
            q = self.q_norm(q).astype(self.dtype)
        return self._rotate(q, positions_bt, rope_index)

    def kv(self, x_bte, positions_bt=None, rope_index=0):
        """Keys and values, ``[b, t, g, d]`` each (also the *propagate* cache policy's writes)."""
        c = self.config
        b, t = x_bte.shape[:2]
        hin = self._attention_input(x_bte)
        k = self.k_proj(hin).reshape(b, t, c.kv_heads, c.head_size)
        v = self.v_proj(hin).reshape(b, t, c.kv_heads, c.head_size)
        if c.qk_norm:
            k = self.k_norm(k).astype(self.dtype)
        return self._rotate(k, positions_bt, rope_index), v

    def _attention_input(self, x_bte):
        return self.attn_norm(x_bte).astype(self.dtype) if self.config.pre_norm else x_bte

    def _rotate(self, x_bthd, positions_bt, rope_index):
        c = self.config
        if not c.ropes:
            return x_bthd
        if positions_bt is None:
            raise ValueError("this layer uses RoPE: it needs positions_bt")
        inv_freq = jnp.asarray(inv_freq_table(c.ropes, c.head_size))[rope_index]
        return apply_rope(x_bthd, positions_bt, inv_freq)

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
        c = self.config
        b, t = x_bte.shape[:2]
        f_attn = self.out_proj(ctx_bthd.reshape(b, t, -1))
        if c.post_block_norm:
            f_attn = self.attn_post_norm(f_attn).astype(self.dtype)
        y1, s_attn = self._residual(x_bte, f_attn, self.attn_norm, threshold, ratio_kind)
        hin = self.mlp_norm(y1).astype(self.dtype) if c.pre_norm else y1
        act = ACTIVATIONS[c.activation]
        f_mlp = self.fc2(act(self.gate(hin)) * self.fc1(hin) if c.gated_mlp else act(self.fc1(hin)))
        if c.post_block_norm:
            f_mlp = self.mlp_post_norm(f_mlp).astype(self.dtype)
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

    def __call__(self, x_bte, mask_btt, positions_bt=None, rope_index=0, threshold=None, ratio_kind: str = "out",
                 causal_blocks: bool = False):
        """Plain self-attention over ``x`` itself (no cache); ``mask[b, i, j]``: i sees j.

        ``causal_blocks``: token ``i`` of each row is at slot ``i`` and the mask is causal
        (``attention.attend``'s promise).
        """
        q, k_btgd, v_btgd = self.qkv(x_bte, positions_bt, rope_index)
        k, v = (jnp.swapaxes(a, 1, 2) for a in (k_btgd, v_btgd))  # heads first, as in the KV cache
        ctx = attention(self.config, q, k, v, mask_btt, causal_blocks=causal_blocks)
        return self.finish(x_bte, ctx, threshold, ratio_kind)

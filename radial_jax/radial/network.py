"""The Radial Network (DESIGN.md §4): a routed pool of transformer layers with a global KV cache.

Parts:
  * embedder / head: those of the base model, under the same parameter names as
    ``OPTForCausalLM`` / ``ViT`` (so the sequential model's params load as they are);
  * pool: ``params["layers"]``, the base model's stacked layers (leading axis L);
  * router: ``params["router"]`` (``radial_jax.radial.router.Router``).

Each of ``S`` steps: the router scores every active token; tokens are dispatched
to layers with a static capacity ``C`` (``dispatch.capacity_for``), gathered in
position order with their original slots, the layer runs on ``[G, C, e]``, K/V of
a first visit are written into the global cache, the queries attend to the
cache (entries written at a step ``<= s``, causal for OPT) plus their own fresh
K/V (a reuse visit computes fresh K/V for its query and does not overwrite),
and the update ``y - x`` times the router gate is scatter-added back. Tokens over
capacity, skipping or exited keep their state.

Modes: ``ordered`` (step ``s`` runs only layer ``s``, ``S = L``, ``lax.scan`` over
the stacked params) and ``radial`` (all L layers run every step under ``jax.vmap``,
each on its own gathered tokens; any layer, reuse, exit).

Choices where DESIGN.md is silent (also in the README of this package):
  * capacity: ``C = ceil(cf * N * L / (S * K))`` (see ``capacity_for``): ``cf`` is
    the fraction of the dense compute, whatever the mode.
  * gate: ``"straight_through"`` (default) multiplies by ``1 + (p - stop_grad(p))``,
    value exactly 1 (the pool's updates are used at full size, as distillation
    from a sequential model needs) and gradient that of ``p``; ``"prob"`` multiplies
    by ``p`` (MoE style, for joint training).
  * cache policy *propagate*: ordered mode: a token active at step ``s`` that is
    not processed by layer ``s`` (skip or over capacity) writes layer ``s``'s K/V of
    its current state. Radial mode: a token that exits at step ``s`` writes, for
    every layer whose entry is still empty, that layer's K/V of its final state
    (CALM-style), with ``written_at = s``. (Radial propagate computes those K/V
    densely, ``L`` K/V projections of every token per step: a reference policy,
    not a fast path; use *mask* for speed.)
  * expert-choice dispatch (``dispatch="expert"``): each layer takes its top-C
    tokens by router probability; no exits; a token may be taken by several
    layers in one step (updates add). Not causal: training only; decoding
    refuses it.
  * capacity groups differ between the parallel forward (per sequence: ``C`` of
    the ``t`` tokens of a row) and decoding (across the batch: ``C`` of the ``b`` new
    tokens), because a decode step must shrink its matmuls to save compute. The
    router's decisions are causal and identical in both; the *drops* by capacity
    agree only when capacity does not bind (the equivalence test runs there).
    Position-priority token choice is causal in the parallel forward.
  * in ordered mode the router's last column means *skip this step* (there is
    no early exit: ``S = L``); in radial mode it means *exit*.
  * oracle routing (ordered mode, parallel forward): a dense probe of layer ``s``
    on the current stream of all tokens gives each token's whole-layer ratio;
    tokens with ``ratio >= threshold`` are dispatched (gathered and computed) for
    real. Under *propagate* this is exactly the §3 oracle at layer granularity.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from radial_jax.kv_cache import KVCache, visible_mask
from radial_jax.models.attention import dot_product_attention
from radial_jax.models.layer import TransformerLayer
from radial_jax.models.opt import OPTConfig, hf_positions
from radial_jax.models.vit import ViTConfig, check_pixel_values
from radial_jax.radial import dispatch as dsp
from radial_jax.radial.metrics import RadialMetrics, compute_metrics
from radial_jax.radial.router import Router, RouterOutput

MODES = ("ordered", "radial")
CACHE_POLICIES = ("mask", "propagate")
ROUTINGS = ("learned", "identity", "oracle")
DISPATCHES = ("token", "expert")
GATES = ("straight_through", "prob")


@dataclasses.dataclass(frozen=True)
class RadialConfig:
    """Settings of the routed part (the base model's config stays the family config).

    mode: ``"ordered"`` or ``"radial"``. max_steps: ``S`` (``None``: L; ordered mode
    requires ``S = L``). capacity_factor: fraction of dense compute (> 0).
    cache_policy: ``"mask"`` / ``"propagate"``. routing: ``"learned"``, ``"identity"``
    (ordered: every token to every layer; radial: layer s at step s, exit after L),
    ``"oracle"`` (ordered only, needs ``threshold``). dispatch: ``"token"`` (causal,
    decode-safe) / ``"expert"`` (top-C per layer, non-causal). gate: see module doc.
    """

    mode: str = "ordered"
    max_steps: Optional[int] = None
    capacity_factor: float = 1.0
    cache_policy: str = "mask"
    routing: str = "learned"
    dispatch: str = "token"
    gate: str = "straight_through"
    router_hidden: int = 64
    router_last_layer: bool = False
    router_init_scale: float = 0.02
    ratio_kind: str = "out"
    scan_unroll: bool = False  # unroll the step loop (XLA cost analysis counts a rolled loop body once)

    def __post_init__(self):
        for name, value, allowed in (("mode", self.mode, MODES), ("cache_policy", self.cache_policy, CACHE_POLICIES),
                                     ("routing", self.routing, ROUTINGS), ("dispatch", self.dispatch, DISPATCHES),
                                     ("gate", self.gate, GATES)):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not supported; allowed: {allowed}")
        if not (isinstance(self.capacity_factor, (int, float)) and self.capacity_factor > 0):
            raise ValueError(f"capacity_factor must be a number > 0, got {self.capacity_factor!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or None for the pool size), got {self.max_steps}")
        if self.routing == "oracle" and self.mode != "ordered":
            raise ValueError("routing='oracle' imitates the sequential threshold rule: it needs mode='ordered'")
        if self.router_hidden < 1:
            raise ValueError(f"router_hidden must be >= 1, got {self.router_hidden}")

    def steps(self, num_layers: int) -> int:
        if num_layers < 1:
            raise ValueError(f"the layer pool is empty (num_layers={num_layers}); need at least one layer")
        s = num_layers if self.max_steps is None else self.max_steps
        if self.mode == "ordered" and s != num_layers:
            raise ValueError(f"ordered mode runs step s on layer s, so max_steps must equal the pool size "
                             f"{num_layers}; got {s}")
        return s


@flax.struct.dataclass
class RadialOutput:
    """What a Radial Network forward (or decode step) returns.

    logits: ``[b, t, vocab]`` (OPT) / ``[b, classes]`` (ViT classifier) / None.
    hidden: final hidden states after the final norm, ``[b, t, e]``.
    router: ``RouterOutput`` (leaves ``[S, b, t, ...]``): logits, probs, choices,
      gates, assignments, drops, exits, ratios (for auxiliary losses).
    metrics: ``RadialMetrics``: depth per token, per-layer load, drops, exits.
    cache: the global ``KVCache`` after this call (feed it to ``decode_step``).
    pooled: ViT pooler output (bare encoder) or None.
    """

    logits: Optional[jax.Array]
    hidden: jax.Array
    router: RouterOutput
    metrics: RadialMetrics
    cache: Optional[KVCache] = None
    pooled: Optional[jax.Array] = None


def num_pool_layers(layers_params) -> int:
    leaves = jax.tree_util.tree_leaves(layers_params)
    return int(leaves[0].shape[0]) if leaves else 0


def _run_steps(rc: RadialConfig, layer_cfg, num_layers: int, dtype, causal: bool, layers_p, router_p,
               x_gne, rows_gn, slots_gn, valid_gn, cache: KVCache, threshold, per_token_rows: bool):
    """The step loop shared by the parallel forward (``per_token_rows=False``) and decoding.

    Returns ``(x_gne, cache, ys, capacity)`` with ``ys`` the per-step router fields ``[S, G, N, ...]``.
    """
    L = num_layers
    S = rc.steps(L)
    ordered = rc.mode == "ordered"
    K = 1 if ordered else L
    G, N, _ = x_gne.shape
    C = dsp.capacity_for(N, rc.capacity_factor, L, S, K)
    t_max = cache.max_len
    layer = TransformerLayer(layer_cfg, dtype, parent=None)  # applied functionally on pool slices
    router = Router(L, S, rc.router_hidden, rc.router_last_layer, rc.router_init_scale, parent=None)
    learned = rc.routing == "learned"
    token_choice = rc.dispatch == "token"

    def qkv(p, x):
        return layer.apply({"params": p}, x, method="qkv")

    def kv(p, x):
        return layer.apply({"params": p}, x, method="kv")

    def finish(p, x, ctx):
        return layer.apply({"params": p}, x, ctx, method="finish")

    def gate_of(p):
        if not learned:
            return jnp.ones_like(p)
        return 1.0 + (p - jax.lax.stop_gradient(p)) if rc.gate == "straight_through" else p

    def body(carry, xs):
        x, active, last, ck, cv, cw = carry
        if ordered:
            p_s, s = xs
            p_k = jax.tree_util.tree_map(lambda a: a[None], p_s)
            layer_ids = s[None]
        else:
            s = xs
            p_k = layers_p
            layer_ids = jnp.arange(L)
        eligible = active & valid_gn
        logits = router.apply({"params": router_p}, x, s, last).astype(jnp.float32)  # [G, N, L+1]
        probs = jax.nn.softmax(logits, axis=-1)
        ratio_probe = None
        if ordered:
            p_keep = jax.nn.sigmoid(logits[..., s] - logits[..., L])
            if rc.routing == "identity":
                want = jnp.ones_like(eligible)
            elif rc.routing == "oracle":
                mask = valid_gn[:, None, :]
                if causal:
                    mask = mask & (slots_gn[:, None, :] <= slots_gn[:, :, None])
                _, st = layer.apply({"params": p_s}, x, mask)
                ratio_probe = st.layer.ratio(rc.ratio_kind)
                want = ratio_probe >= threshold
            else:
                want = p_keep > 0.5
            pref = jnp.where(want, s, L).astype(jnp.int32)
            want_kgn = (eligible & want)[None]
            p_kgn = p_keep[None]
            exiting = jnp.zeros_like(eligible)
        else:
            if rc.routing == "identity":
                pref = jnp.full(eligible.shape, jnp.where(s < L, s, L), jnp.int32)
            else:
                pref = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            exiting = eligible & (pref == L) if token_choice else jnp.zeros_like(eligible)
            want_kgn = eligible[None] & (pref[None] == layer_ids[:, None, None])
            p_kgn = jnp.moveaxis(probs[..., :L], -1, 0)
        if token_choice:
            idx, keep = dsp.select_token_choice(want_kgn, C)
            dropped = (want_kgn & ~keep).any(0)
        else:
            idx, keep = dsp.select_expert_choice(jnp.where(eligible[None], p_kgn, -jnp.inf), C)
            dropped = jnp.zeros_like(eligible)
        processed = keep.any(0)
        gate_kgn = gate_of(p_kgn)

        # Propagate policy: K/V of tokens not processed this step, from their current state.
        if rc.cache_policy == "propagate":
            targets = (eligible & ~processed) if ordered else exiting
            k_p, v_p = jax.vmap(kv, in_axes=(0, None))(p_k, x)  # [K, G, N, g, d]
            ck, cv, cw = dsp.write_first_visit_at(
                ck, cv, cw, layer_ids[:, None, None], rows_gn[None], jnp.broadcast_to(slots_gn, k_p.shape[:3]),
                k_p, v_p, jnp.broadcast_to(targets[None], k_p.shape[:3]), s)

        # Dispatch: gather the chosen tokens in position order, with their slots and rows.
        valid_g = idx < N
        x_g = dsp.gather(x, idx)  # [K, G, C, e]
        slot_g = jnp.where(valid_g, dsp.gather(slots_gn, idx), t_max)
        row_g = dsp.gather(rows_gn, idx)
        gate_g = jnp.where(valid_g, jax.vmap(dsp.gather)(gate_kgn, idx[:, None])[:, 0], 0.0)
        q, k, v = jax.vmap(qkv)(p_k, x_g)
        ck, cv, cw = dsp.write_first_visit_at(ck, cv, cw, layer_ids[:, None, None], row_g, slot_g, k, v, valid_g, s)

        def attend(kc, vc, wc, q_gc, k_gc, v_gc, slot_gc, row_gc):  # one layer's cache [B, T, g, d], [B, T]
            if per_token_rows:  # each query reads its own cache row
                kc, vc, wc = kc[row_gc], vc[row_gc], wc[row_gc]  # [G, C, T, ...]
                n = q_gc.shape[0] * q_gc.shape[1]
                fl = lambda a: a.reshape((n, 1) + a.shape[2:])
                mask = visible_mask(wc.reshape(n, t_max), slot_gc.reshape(n, 1), s, causal=causal,
                                    exclude_self=True)
                ctx = dot_product_attention(fl(q_gc), kc.reshape((n,) + kc.shape[2:]),
                                            vc.reshape((n,) + vc.shape[2:]), mask, self_kv=(fl(k_gc), fl(v_gc)))
                return ctx.reshape(q_gc.shape)
            mask = visible_mask(wc, slot_gc, s, causal=causal, exclude_self=True)
            return dot_product_attention(q_gc, kc, vc, mask, self_kv=(k_gc, v_gc))

        if ordered:  # only layer s: a dynamic slice of the cache
            layer_cache = tuple(jax.lax.dynamic_index_in_dim(a, s, 0, keepdims=True) for a in (ck, cv, cw))
        else:  # all L layers, in order: the cache itself (no gathered copy)
            layer_cache = (ck, cv, cw)
        ctx = jax.vmap(attend)(*layer_cache, q, k, v, slot_g, row_g)
        y, st = jax.vmap(finish)(p_k, x_g, ctx)
        upd = (y.astype(jnp.float32) - x_g.astype(jnp.float32)) * gate_g[..., None]
        x = dsp.scatter_add(x, idx, upd)

        # Bookkeeping.
        gate_gn = jnp.where(keep, gate_kgn, 0.0).sum(0)
        ratio_g = jnp.where(valid_g, st.layer.ratio(rc.ratio_kind), 0.0)
        ratio_gn = dsp.scatter_add(jnp.zeros((G, N, 1), jnp.float32), idx, ratio_g[..., None])[..., 0]
        if ratio_probe is not None:
            ratio_gn = jnp.where(eligible, ratio_probe, 0.0)
        if ordered:
            assign = keep[0][..., None] & (jnp.arange(L) == s)
        else:
            assign = jnp.moveaxis(keep, 0, -1)
        visited = jnp.where(assign, jnp.arange(L), -1).max(-1)
        last = jnp.where(processed, visited, last)
        active = active & ~exiting
        ys = dict(logits=logits, probs=probs, choice=jnp.where(eligible, pref, -1), gate=gate_gn, assign=assign,
                  dropped=dropped, exited=exiting, ratio=ratio_gn)
        return (x, active, last, ck, cv, cw), ys

    carry = (x_gne, jnp.ones((G, N), bool), jnp.full((G, N), L, jnp.int32), cache.k, cache.v, cache.written_at)
    xs = (layers_p, jnp.arange(L, dtype=jnp.int32)) if ordered else jnp.arange(S, dtype=jnp.int32)
    (x, _, _, ck, cv, cw), ys = jax.lax.scan(body, carry, xs, unroll=bool(rc.scan_unroll))
    return x, KVCache(ck, cv, cw), ys, C


def _init_layers(layer_cfg, num_layers, dtype):
    def init(key):
        e = layer_cfg.hidden_size
        one = lambda k: nn.unbox(TransformerLayer(layer_cfg, dtype, parent=None).init(
            k, jnp.zeros((1, 1, e), dtype), jnp.ones((1, 1, 1), bool)))["params"]
        return jax.vmap(one)(jax.random.split(key, num_layers))
    return init


def _init_router(num_layers, max_steps, rc: RadialConfig, hidden_size):
    def init(key):
        r = Router(num_layers, max_steps, rc.router_hidden, rc.router_last_layer, rc.router_init_scale, parent=None)
        return r.init(key, jnp.zeros((1, 1, hidden_size)), jnp.int32(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return init


class RadialNetwork(nn.Module):
    """A Radial Network over an OPT or ViT base (``base_config``); see the module docstring.

    Parameters: the base model's (same names) plus ``"router"``. ``__call__`` is the
    parallel forward; ``decode_step`` (OPT) processes one new token per batch row
    with dispatch across the batch. Use ``RadialNetwork.from_sequential(model, ...)``
    for a ready bundle.
    """

    base_config: object
    radial: RadialConfig = RadialConfig()
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.base_config
        if not isinstance(c, (OPTConfig, ViTConfig)):
            raise ValueError(f"RadialNetwork needs an OPTConfig or ViTConfig base, got {type(c).__name__}")
        L = c.num_layers
        S = self.radial.steps(L)
        self.layers = self.param("layers", _init_layers(c.layer_config(), L, self.dtype))
        self.router = self.param("router", _init_router(L, S, self.radial, c.hidden_size))
        init = nn.initializers.normal(0.02)
        if isinstance(c, OPTConfig):
            self.embed_tokens = nn.Embed(c.vocab_size, c.word_embed_proj_dim, dtype=self.dtype, embedding_init=init)
            if c.has_projection:
                self.project_in = nn.Dense(c.hidden_size, use_bias=False, dtype=self.dtype, kernel_init=init)
                self.project_out = nn.Dense(c.word_embed_proj_dim, use_bias=False, dtype=self.dtype,
                                            kernel_init=init)
            self.embed_positions = nn.Embed(c.max_position_embeddings + c.POSITION_OFFSET, c.hidden_size,
                                            dtype=self.dtype, embedding_init=init)
            if c.has_final_layer_norm:
                self.final_layer_norm = nn.LayerNorm(epsilon=1e-5, use_bias=c.layer_norm_elementwise_affine,
                                                     use_scale=c.layer_norm_elementwise_affine, dtype=jnp.float32)
            if not c.tie_word_embeddings:
                self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype, kernel_init=init)
        else:
            self.patch_embed = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size),
                                       strides=(c.patch_size, c.patch_size), padding="VALID", dtype=self.dtype,
                                       kernel_init=init)
            self.cls_token = self.param("cls_token", init, (1, 1, c.hidden_size))
            self.position_embeddings = self.param("position_embeddings", init, (1, c.seq_len, c.hidden_size))
            self.final_norm = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=jnp.float32)
            if c.num_labels:
                self.classifier = nn.Dense(c.num_labels, dtype=self.dtype, kernel_init=init)
            elif c.add_pooling_layer:
                self.pooler = nn.Dense(c.hidden_size, dtype=self.dtype, kernel_init=init)

    # --- embedder and head of the base model ---------------------------------------------------
    def _embed_opt(self, ids_bt, positions_bt):
        c = self.base_config
        x = self.embed_tokens(ids_bt)
        if c.has_projection:
            x = self.project_in(x)
        return x + self.embed_positions(positions_bt + c.POSITION_OFFSET)

    def _head_opt(self, x, compute_logits: bool = True):
        c = self.base_config
        if c.has_final_layer_norm:
            x = self.final_layer_norm(x).astype(self.dtype)
        if c.has_projection:
            x = self.project_out(x)
        if not compute_logits:
            return None, x
        logits = self.embed_tokens.attend(x) if c.tie_word_embeddings else self.lm_head(x)
        return logits.astype(jnp.float32), x

    def _steps(self, x_gne, rows_gn, slots_gn, valid_gn, cache, threshold, per_token_rows):
        c = self.base_config
        if self.radial.routing == "oracle" and threshold is None:
            raise ValueError("routing='oracle' needs a threshold")
        return _run_steps(self.radial, c.layer_config(), c.num_layers, self.dtype, isinstance(c, OPTConfig),
                          self.layers, self.router, x_gne, rows_gn, slots_gn, valid_gn, cache, threshold,
                          per_token_rows)

    def _new_cache(self, batch, max_len):
        lc = self.base_config.layer_config()
        return KVCache.create(self.base_config.num_layers, batch, max_len, lc.kv_heads, lc.head_dim, self.dtype)

    @staticmethod
    def _router_output(ys, reshape):
        return RouterOutput(**{k: reshape(v) for k, v in ys.items()})

    def __call__(self, inputs, attention_mask_bt=None, *, positions_bt=None, cache: Optional[KVCache] = None,
                 max_len: Optional[int] = None, threshold=None, compute_logits: bool = True) -> RadialOutput:
        """Parallel forward of a whole sequence (OPT token ids ``[b, t]``; ViT pixels ``[b, c, h, w]``).

        OPT: without ``positions_bt``, positions follow transformers (left padding
        allowed) and slots are the indices; with it (right padding, prefill for
        decoding) slots = positions. A fresh cache of ``max_len`` (default ``t``)
        slots is made when ``cache`` is None. ``threshold``: for oracle routing.
        ``compute_logits=False`` skips the LM head (``logits`` is None).
        """
        c = self.base_config
        if isinstance(c, ViTConfig):
            return self._vit(inputs, threshold)
        b, t = inputs.shape
        valid = jnp.ones((b, t), bool) if attention_mask_bt is None else attention_mask_bt.astype(bool)
        if positions_bt is None:
            positions_bt = hf_positions(valid)
            slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        else:
            slots = positions_bt.astype(jnp.int32)
        if cache is None:
            cache = self._new_cache(b, max_len or t)
        elif self.radial.routing == "oracle":
            raise ValueError("routing='oracle' runs on a fresh cache only (its probe sees the current tokens)")
        x = self._embed_opt(inputs, positions_bt)
        rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
        x, cache, ys, cap = self._steps(x, rows, slots, valid, cache, threshold, per_token_rows=False)
        logits, hidden = self._head_opt(x, compute_logits)
        router = self._router_output(ys, lambda a: a)
        metrics = compute_metrics(router.assign, router.dropped, router.exited, valid, cap)
        return RadialOutput(logits=logits, hidden=hidden, router=router, metrics=metrics, cache=cache)

    def decode_step(self, ids_b, slots_b, cache: KVCache, live_b=None, compute_logits: bool = True) -> RadialOutput:
        """One new token per batch row at ``slots_b`` (= its position), dispatched across the batch.

        A layer's capacity at a step is ``capacity_for(B, ...)`` tokens of the whole
        batch; each token attends to its own cache row. Only token-choice dispatch
        (causal) is allowed. Returns logits ``[b, 1, vocab]`` and router fields ``[S, b, 1]``.
        """
        c = self.base_config
        if not isinstance(c, OPTConfig):
            raise ValueError("decode_step needs a decoder (OPT) base")
        if self.radial.dispatch != "token":
            raise ValueError("decoding needs causal routing: dispatch='token' (expert choice sees future tokens)")
        if self.radial.routing == "oracle":
            raise ValueError("routing='oracle' is a parallel-forward simulation; it cannot decode")
        b = ids_b.shape[0]
        live = jnp.ones((b,), bool) if live_b is None else live_b.astype(bool)
        x = self._embed_opt(ids_b[:, None], slots_b[:, None])  # [b, 1, e]
        x_gne = x.reshape(1, b, -1)
        rows = jnp.arange(b, dtype=jnp.int32)[None]
        x_gne, cache, ys, cap = self._steps(x_gne, rows, slots_b.astype(jnp.int32)[None], live[None], cache, None,
                                            per_token_rows=True)
        logits, hidden = self._head_opt(x_gne.reshape(b, 1, -1), compute_logits)
        router = self._router_output(ys, lambda a: jnp.swapaxes(a, 1, 2))  # [S, 1, b, ...] -> [S, b, 1, ...]
        metrics = compute_metrics(router.assign, router.dropped, router.exited, live[:, None], cap)
        return RadialOutput(logits=logits, hidden=hidden, router=router, metrics=metrics, cache=cache)

    def _vit(self, pixel_values_bchw, threshold):
        c = self.base_config
        check_pixel_values(c, pixel_values_bchw.shape)
        b = pixel_values_bchw.shape[0]
        patches = self.patch_embed(jnp.transpose(pixel_values_bchw, (0, 2, 3, 1)).astype(self.dtype))
        x = patches.reshape(b, -1, c.hidden_size)
        x = jnp.concatenate([jnp.broadcast_to(self.cls_token, (b, 1, c.hidden_size)).astype(self.dtype), x], 1)
        x = x + self.position_embeddings.astype(self.dtype)
        t = x.shape[1]
        slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
        valid = jnp.ones((b, t), bool)
        x, cache, ys, cap = self._steps(x, rows, slots, valid, self._new_cache(b, t), threshold,
                                        per_token_rows=False)
        x = self.final_norm(x).astype(self.dtype)
        logits = pooled = None
        if c.num_labels:
            logits = self.classifier(x[:, 0]).astype(jnp.float32)
        elif c.add_pooling_layer:
            pooled = jnp.tanh(self.pooler(x[:, 0]))
        router = self._router_output(ys, lambda a: a)
        metrics = compute_metrics(router.assign, router.dropped, router.exited, valid, cap)
        return RadialOutput(logits=logits, hidden=x, router=router, metrics=metrics, cache=cache, pooled=pooled)

    # --- construction -----------------------------------------------------------------------
    @staticmethod
    def from_sequential(model, *, seed: int = 0, **radial_kwargs) -> "RadialModel":
        """A ``RadialModel`` whose pool, embedder and head are ``model``'s, plus a fresh router.

        ``model``: an ``rj.Model`` (``rj.build`` / ``rj.load``) of OPT or ViT.
        ``radial_kwargs``: fields of ``RadialConfig`` (mode, capacity_factor, max_steps,
        cache_policy, routing, dispatch, gate, router_hidden, ...).
        """
        config = getattr(model, "config", None)
        params = getattr(model, "params", None)
        if not isinstance(config, (OPTConfig, ViTConfig)) or not isinstance(params, dict):
            raise ValueError(f"from_sequential needs an rj.Model of OPT or ViT (with .config and .params); "
                             f"got {type(model).__name__} with config {type(config).__name__}")
        if "layers" not in params:
            raise ValueError(f"the model's params have no stacked 'layers' to build the pool from "
                             f"(top-level keys: {sorted(params)})")
        L = num_pool_layers(params["layers"])
        if L < 1:
            raise ValueError("the model's layer pool is empty (0 layers)")
        if L != config.num_layers:
            raise ValueError(f"the stacked 'layers' hold {L} layers but the config says {config.num_layers}")
        rc = RadialConfig(**radial_kwargs)
        S = rc.steps(L)
        router_params = _init_router(L, S, rc, config.hidden_size)(jax.random.key(seed))
        return RadialModel(config, rc, {**params, "router": router_params}, dtype=model.dtype)


class RadialModel:
    """Bundle: ``.module`` (RadialNetwork), ``.params``, ``.config`` (base), ``.radial`` (RadialConfig).

    ``forward(...)`` -> RadialOutput (jit); ``model(inputs, mask)`` -> logits;
    ``decode_step(ids_b, slots_b, cache)``; ``init_cache(batch, max_len)``;
    ``replace(**radial_changes)`` -> a bundle sharing the params (e.g. routing="identity"); the
    router is re-initialised (``seed``) only when its shapes change (max_steps, router width).
    """

    def __init__(self, config, radial: RadialConfig, params, dtype=jnp.float32):
        self.config = config
        self.radial = radial
        self.dtype = dtype
        self.module = RadialNetwork(config, radial, dtype)
        self.params = params

    def replace(self, params=None, seed: int = 0, **radial_changes) -> "RadialModel":
        rc = dataclasses.replace(self.radial, **radial_changes)
        L = self.config.num_layers
        params = dict(self.params if params is None else params)
        fresh = _init_router(L, rc.steps(L), rc, self.config.hidden_size)
        want = jax.eval_shape(fresh, jax.random.key(0))
        if jax.tree_util.tree_structure(want) != jax.tree_util.tree_structure(params.get("router")) or any(
                a.shape != b.shape for a, b in zip(jax.tree_util.tree_leaves(want),
                                                   jax.tree_util.tree_leaves(params["router"]))):
            params["router"] = fresh(jax.random.key(seed))  # the router's shapes changed (steps, width)
        return RadialModel(self.config, rc, params, self.dtype)

    @functools.cached_property
    def _forward(self):
        def forward(params, inputs, attention_mask_bt=None, positions_bt=None, cache=None, max_len=None,
                    threshold=None, compute_logits=True):
            return self.module.apply({"params": params}, inputs, attention_mask_bt, positions_bt=positions_bt,
                                     cache=cache, max_len=max_len, threshold=threshold, compute_logits=compute_logits)
        return jax.jit(forward, static_argnames=("max_len", "compute_logits"))

    @functools.cached_property
    def _decode(self):
        return jax.jit(lambda p, *a: self.module.apply({"params": p}, *a, method="decode_step"))

    def forward(self, inputs, attention_mask=None, **kwargs) -> RadialOutput:
        if isinstance(self.config, ViTConfig):
            check_pixel_values(self.config, np.shape(inputs))
        else:
            from radial_jax.api import check_token_ids
            check_token_ids(self.config, inputs)
        if attention_mask is not None:
            kwargs["attention_mask_bt"] = jnp.asarray(attention_mask)
        return self._forward(self.params, jnp.asarray(inputs), **kwargs)

    def __call__(self, inputs, attention_mask=None):
        return self.forward(inputs, attention_mask).logits

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        lc = self.config.layer_config()
        return KVCache.create(self.config.num_layers, batch, max_len, lc.kv_heads, lc.head_dim, self.dtype)

    def decode_step(self, ids_b, slots_b, cache: KVCache, live_b=None) -> RadialOutput:
        args = (jnp.asarray(ids_b), jnp.asarray(slots_b), cache) + (() if live_b is None else (jnp.asarray(live_b),))
        return self._decode(self.params, *args)

    def __repr__(self):
        return f"RadialModel({type(self.config).__name__}, {self.radial})"

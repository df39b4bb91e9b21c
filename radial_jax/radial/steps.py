"""The step loop of a Radial Network, shared by the parallel forward and decoding.

One step ``s`` (``run_step``), in named parts:

1. ``route``: the router scores every token; ``routing.decide`` says which layer each
   eligible token wants (the oracle's probe runs here);
2. ``admit``: the causal budget (``dispatch``) admits wanted visits; the per-row
   counters live in the cache, so decoding replays the parallel forward's drops;
3. ``propagate_skips`` (*propagate* policy, steps ``s < L``): K/V of layer ``s`` for
   every eligible token, from its current state, written first-visit (a token
   processed by layer ``s`` now writes the same values). In ordered mode this is
   the skipping tokens' K/V; in radial mode the same step-aligned rule, so that a
   radial network with ordered routes computes exactly what the ordered one does;
4. ``run_layer`` for each layer the step considers: the smallest static size that
   holds its admitted tokens (whole sequences: of all sequences at once, *flat*) is
   chosen by ``lax.switch`` (under XLA only the chosen branch runs; size 0 runs
   nothing). A first branch gathers the tokens in position order and projects their
   queries and K/V; the K/V are written first-visit outside it; a second branch on the
   same size attends to the global cache (entries written at a step ``<= s``, causal,
   in the layer's window) and finishes the layer (whole sequences: the attention has a
   switch of its own, per sequence at the busiest sequence's size); the gated updates
   are scattered back outside. Nothing updated in place enters a branch (XLA would copy it);
5. ``propagate_exits`` (radial mode, *propagate*): tokens that exit fill every still
   empty layer of their slot with K/V of their final state, visible from step
   ``s + 1`` on (written after this step's layers ran: a token decoded later must
   not see at step ``s`` what the parallel forward only writes after step ``s``);
6. bookkeeping: who is still active, the last layer visited, what ran.

Every layer reads the state the step started from and updates add, so the
order of layers inside a step does not matter (expert choice may send a token to
several). Group layout (``G`` groups of ``N`` tokens) is that of ``dispatch``.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import flax.struct
import jax
import jax.numpy as jnp

from radial_jax.kv_cache import (KVCache, cache_batch, cache_max_len, is_split, layer_view, split_layers, stack_layers,
                                 visible_mask, write_layer)
from radial_jax.models.layer import LayerConfig, TransformerLayer, attention
from radial_jax.models.remat import remat_layer, shard_batch
from radial_jax.models.stack import is_per_layer, layer_forward, meta_at, pool_layer, stack_pool
from radial_jax.radial import dispatch as dsp
from radial_jax.radial.config import RadialConfig
from radial_jax.radial.router import Router, exit_index
from radial_jax.radial.routing import decide, gate


@flax.struct.dataclass
class RadialCache:
    """The decoding state of a Radial Network: the global KV cache and the causal budget's counters."""

    kv: KVCache  # or a tuple of L single-layer caches (the inference layout, ``kv_cache.split_layers``)
    admitted: jax.Array  # [B, S, L] int32: tokens of row b admitted to layer l at step s so far

    @classmethod
    def create(cls, num_layers: int, steps: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> "RadialCache":
        return cls(kv=KVCache.create(num_layers, batch, max_len, kv_heads, head_dim, dtype),
                   admitted=jnp.zeros((batch, steps, num_layers), jnp.int32))

    @property
    def max_len(self) -> int:
        return cache_max_len(self.kv)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static facts of one call of the step loop."""

    rc: RadialConfig
    lc: LayerConfig
    dtype: object
    num_layers: int
    causal: bool
    decoding: bool  # one group of one token per batch row (else: one group per sequence)
    sizes: Tuple[int, ...]  # the static sizes a layer's load is rounded up to (sizes[0] = 0)
    exit_chunk: int  # a step's exiting tokens are processed this many per group at a time
    phi: float  # the budget fraction
    hidden_size: int
    # whole sequences: the static sizes a visit's tokens over all sequences are rounded up to (flat dispatch)
    flat_sizes: Tuple[int, ...] = ()

    @property
    def steps(self) -> int:
        return self.rc.steps(self.num_layers)


@flax.struct.dataclass
class Tokens:
    """The tokens of one call, ``[G, N]`` each (see ``dispatch``)."""

    rows: jax.Array  # cache row
    slots: jax.Array  # cache slot = causal order
    positions: jax.Array  # position (RoPE, the budget)
    valid: jax.Array  # false: padding
    budget: jax.Array  # the causal budget of each token


NOBODY = jnp.iinfo(jnp.int32).max  # a gathered slot with no token (beyond every group: scatters drop it)


def _layer(plan: Plan) -> TransformerLayer:
    return TransformerLayer(plan.lc, plan.dtype, parent=None)  # applied functionally on pool slices


# --------------------------------------------------------------------------- 1. route

def route(plan: Plan, router_params, pool, meta, x, active, last, tok: Tokens, s, threshold, explore=None):
    """Router logits ``[G, N, L+2]``, the decision, and the oracle probe's ratios (or None).

    Before ``rc.min_exit_step`` the exit logit is -1e9 (finite: softmax and z-loss stay finite),
    so the records, the probabilities and the choice agree that no token may exit there."""
    rc, L = plan.rc, plan.num_layers
    router = Router(L, plan.steps, rc.router_hidden, rc.router_last_layer, rc.router_init_scale, parent=None)
    logits = router.apply({"params": router_params}, x, jnp.asarray(s, jnp.int32), last).astype(jnp.float32)
    if not rc.ordered and rc.min_exit_step:
        no_exit = jnp.asarray(s) < rc.min_exit_step
        logits = logits.at[..., exit_index(L)].set(jnp.where(no_exit, -1e9, logits[..., exit_index(L)]))
    eligible = active & tok.valid
    probe = None
    if rc.routing == "oracle":  # §3 at layer granularity: the layer on every token, kept if its ratio is high
        params_s = pool_layer(pool, s)
        _, stats = layer_forward(plan.lc, plan.dtype, params_s, meta_at(meta, s), x, tok.positions, tok.slots,
                                 tok.valid, causal=plan.causal)
        probe = stats.layer.ratio(rc.ratio_kind)
    return logits, decide(rc, logits, s, L, eligible, probe, threshold, explore), probe


# --------------------------------------------------------------------------- 2. admit

def admit(plan: Plan, decision, admitted_bsl, tok: Tokens, s, layer_ids):
    """``(admitted_kgn, counters)``: token choice under the causal budget; expert choice: top ``C_max``."""
    rc = plan.rc
    if rc.dispatch == "expert":
        c_max = plan.sizes[-1]
        score = jnp.where(decision.choice_gn[None] >= 0, decision.prob_kgn, -jnp.inf)
        score = jnp.where(decision.exiting_gn[None], -jnp.inf, score)
        taken = jax.vmap(lambda sc: dsp.select_top(sc, c_max)[1])(score)
        return taken, admitted_bsl
    if plan.decoding:
        count_kgn = admitted_bsl[tok.rows[None], s, layer_ids[:, None, None]]
        admitted = dsp.admit_each(decision.want_kgn, tok.budget, count_kgn)
        counters = admitted_bsl.at[tok.rows[None], s, layer_ids[:, None, None]].add(admitted.astype(jnp.int32))
        return admitted, counters
    rows_g = tok.rows[:, 0]
    count0_kg = admitted_bsl[rows_g[None, :], s, layer_ids[:, None]]
    admitted, count_kg = dsp.admit_in_order(decision.want_kgn, tok.budget, count0_kg)
    return admitted, admitted_bsl.at[rows_g[None, :], s, layer_ids[:, None]].set(count_kg)


# --------------------------------------------------------------------------- 3. propagate skips

def propagate_skips(plan: Plan, params_s, meta_s, x, eligible, tok: Tokens, kv: KVCache, s):
    """*propagate*: layer ``s``'s K/V of every eligible token from its current state, written first-visit."""
    k, v = _layer(plan).apply({"params": params_s}, x, tok.positions, meta_s["rope"], method="kv")
    return write_layer(kv, s, tok.rows, tok.slots, k, v, eligible, s), (k, v)


def propagate_skips_traced(plan: Plan, pool, meta, x, eligible, tok: Tokens, kv, s):
    """``propagate_skips`` at a traced step of radial mode (nothing at ``s >= L``), in either layout.

    The K/V are computed under a ``lax.switch`` on the layer (per-layer weights, each read
    in place) or a ``lax.cond`` (stacked); the cache is written outside it: a switch
    copies any operand it returns updated. Per-layer caches: every layer's write is
    masked to ``s == l``.
    """
    L = plan.num_layers
    layer = _layer(plan)

    def kv_of(l):  # the layer is picked inside the branch (a stacked slice is a copy on CPU)
        return lambda: layer.apply({"params": pool_layer(pool, l)}, x, tok.positions, meta_at(meta, l)["rope"],
                                   method="kv")

    shapes = jax.eval_shape(kv_of(0))
    nothing = lambda: tuple(jnp.zeros(a.shape, a.dtype) for a in shapes)  # noqa: E731
    if is_per_layer(pool):
        k, v = jax.lax.switch(jnp.minimum(s, L), [kv_of(l) for l in range(L)] + [nothing])
    else:
        k, v = jax.lax.cond(s < L, kv_of(jnp.minimum(s, L - 1)), nothing)
    write = eligible & (s < L)
    if not is_split(kv):
        return write_layer(kv, jnp.minimum(s, L - 1), tok.rows, tok.slots, k, v, write, s)
    for l in range(L):
        kv = write_layer(kv, l, tok.rows, tok.slots, k, v, write & (s == l), s)
    return kv


# --------------------------------------------------------------------------- 4. run a layer

def _attend(plan: Plan, kv, l, q, k, v, slot_gc, row_gc, s, window):
    """Attention of the gathered queries to layer ``l`` of the cache (their K/V written) and their own K/V.

    Radial mode: a token's own entry may hold K/V of an earlier visit (reuse), so it is
    masked and the fresh K/V join as ``self_kv``. Ordered mode: the entry holds this
    visit's K/V (layer ``s`` is visited at step ``s`` only; *propagate* wrote it from the
    same state), so it is read from the cache like any other (plain attention).
    """
    kc, vc, wc = layer_view(kv, l)
    own_in_cache = plan.rc.ordered
    if plan.decoding:  # each query reads its own cache row: C groups of one query
        g, c = q.shape[:2]
        one = lambda a: a.reshape((g * c, 1) + a.shape[2:])  # noqa: E731
        rows = row_gc.reshape(-1)
        mask = visible_mask(wc[rows], slot_gc.reshape(-1, 1), s, causal=plan.causal, exclude_self=not own_in_cache,
                            window=window)
        ctx = attention(plan.lc, one(q), kc[rows], vc[rows], mask,
                        self_kv=None if own_in_cache else (one(k), one(v)))
        return ctx.reshape(q.shape)
    mask = visible_mask(wc, slot_gc, s, causal=plan.causal, exclude_self=not own_in_cache, window=window)
    return attention(plan.lc, q, kc, vc, mask, self_kv=None if own_in_cache else (k, v))


def _attend_flat(plan: Plan, kv, l, q, k, v, slot_f, row_f, ok_f, s, window, per_sequence: int):
    """``_attend`` for a flat visit (``[1, F]``: the tokens of every sequence, batch-major): the queries go
    to ``[B, per_sequence]`` (sequence, rank in it; ``per_sequence`` holds the busiest sequence's tokens)
    so that each reads its own cache row, and come back."""
    batch = cache_batch(kv)
    rows = jnp.where(ok_f[0], row_f[0], batch)  # [F], batch: nobody
    counts = jnp.zeros((batch,), jnp.int32).at[rows].add(1, mode="drop")
    rank = jnp.arange(rows.shape[0]) - (jnp.cumsum(counts) - counts)[jnp.clip(rows, 0, batch - 1)]

    def grouped(a, fill=0):  # [1, F, ...] -> [B, per_sequence, ...]
        return jnp.full((batch, per_sequence) + a.shape[2:], fill, a.dtype).at[rows, rank].set(a[0], mode="drop")
    ctx = _attend(plan, kv, l, grouped(q), grouped(k), grouped(v), grouped(slot_f, cache_max_len(kv)),
                  grouped(row_f), s, window)
    return ctx[jnp.clip(rows, 0, batch - 1), jnp.clip(rank, 0, per_sequence - 1)][None]


def _holds_token(tok: Tokens, idx_gc):
    """Which gathered slots hold a token (an empty slot's index is ``N`` or ``NOBODY``)."""
    return idx_gc < tok.valid.shape[1]


def _dispatched(tok: Tokens, idx_gc, t_max: int):
    """``(ok, positions, slots, rows)`` of the gathered tokens ``idx_gc`` (slot ``t_max`` where empty)."""
    ok = _holds_token(tok, idx_gc)
    return (ok, dsp.gather(tok.positions, idx_gc), jnp.where(ok, dsp.gather(tok.slots, idx_gc), t_max),
            dsp.gather(tok.rows, idx_gc))


# A layer visit by the gathered tokens ``idx_gc [G, C]`` (``NOBODY``: an empty slot) projects, writes,
# then attends (rule 1): ``_project`` (queries and K/V), ``_write_visit``, ``_context`` (attention),
# ``_finish`` (the rest of the layer, the gated update); ``_run_visit`` puts them under switches.

def _project(plan: Plan, params_l, rope_l, x_start, idx_gc, tok: Tokens, skip_kv=None):
    """``(q, k, v)`` of the gathered tokens. ``skip_kv``: K/V already in the cache (ordered *propagate*)."""
    layer = _layer(plan)
    x_gc, pos_gc = dsp.gather(x_start, idx_gc), dsp.gather(tok.positions, idx_gc)
    if skip_kv is None:
        return layer.apply({"params": params_l}, x_gc, pos_gc, rope_l, method="qkv")
    q = layer.apply({"params": params_l}, x_gc, pos_gc, rope_l, method="query")
    return q, dsp.gather(skip_kv[0], idx_gc), dsp.gather(skip_kv[1], idx_gc)


def _write_visit(cache, at, tok: Tokens, idx, k, v, s):
    """Rule 1 for a visit's tokens ``idx [..., G, C]`` (``at``: the layer, or ``[K, 1, 1]`` layers)."""
    ok, _, slot, row = _dispatched(tok, idx, cache_max_len(cache))
    return write_layer(cache, at, row, slot, k, v, ok, s)


def _context(plan: Plan, window_l, idx_gc, tok: Tokens, cache, at, qkv, s, per_sequence=None):
    """The attention context of the gathered tokens (to layer ``at`` of ``cache``, their K/V written).
    ``per_sequence``: a flat visit (one group holding every sequence's tokens, ``_attend_flat``)."""
    ok, _, slot_gc, row_gc = _dispatched(tok, idx_gc, cache_max_len(cache))
    if per_sequence is not None:
        return _attend_flat(plan, cache, at, *qkv, slot_gc, row_gc, ok, s, window_l, per_sequence)
    return _attend(plan, cache, at, *qkv, slot_gc, row_gc, s, window_l)


def _finish(plan: Plan, params_l, x_start, idx_gc, gate_gn, tok: Tokens, ctx):
    """``(upd_gce, ratio_gc)``: the rest of the layer after attention (``ctx``), the update times the gate
    and the residual ratio (0 for empty slots)."""
    layer = _layer(plan)
    ok = _holds_token(tok, idx_gc)
    x_gc = dsp.gather(x_start, idx_gc)
    y, stats = layer.apply({"params": params_l}, x_gc, ctx, method="finish")
    g_gc = jnp.where(ok, dsp.gather(gate_gn, idx_gc), 0.0)
    upd = (y.astype(jnp.float32) - x_gc.astype(jnp.float32)) * g_gc[..., None]
    return upd, jnp.where(ok, stats.layer.ratio(plan.rc.ratio_kind), 0.0)


def _sizes(plan: Plan, flat: bool = False):
    """The static sizes a visit may run at, per group or (``flat``) over all sequences at once (expert
    choice: the largest alone, no load to follow)."""
    sizes = plan.flat_sizes if flat else plan.sizes
    return sizes[-1:] if plan.rc.dispatch == "expert" else sizes


def _run_visit(sizes, load, idx_of, project, write, attend, finish, attention=None):
    """A visit at the smallest static size that holds ``load``: ``(idx, upd, ratio, cache, size, attn_size)``.

    ``idx_of(size)`` gathers the tokens, ``project(idx) -> (q, k, v)``, ``write(idx, k, v) -> cache``,
    ``attend(idx, qkv, cache, attn_size) -> ctx``, ``finish(idx, ctx) -> (upd, ratio)``. The computing
    phases each run under a ``lax.switch`` (only the chosen branch runs; size 0 runs nothing) and
    return the largest size's shapes (padded: ``NOBODY``, zeros); the write runs between them,
    outside: XLA copies every buffer a switch branch returns updated (the layer's cache, the hidden
    states). ``attention = (attn_sizes, attn_load)`` (whole sequences): the attention has a switch of
    its own, at the smallest of ``attn_sizes`` that holds ``attn_load`` (the busiest sequence's
    tokens); otherwise it runs with the rest of the layer, at the visit's size (``attn_size=None``).
    """
    largest = sizes[-1]
    attn_sizes, attn_load = attention if attention is not None else ((None,), None)
    if len(sizes) == 1:  # one size: no switch at all
        idx = idx_of(largest)
        qkv = project(idx)
        cache = write(idx, qkv[1], qkv[2])
        upd, ratio = finish(idx, attend(idx, qkv, cache, attn_sizes[-1]))
        return idx, upd, ratio, cache, jnp.int32(largest), jnp.int32(attn_sizes[-1] or largest)
    idx_shape = jax.eval_shape(lambda: idx_of(largest))
    axis = idx_shape.ndim - 1  # the token axis of idx and of every per-token array

    def padded(a, value=0):
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, largest - a.shape[axis])
        return jnp.pad(a, widths, constant_values=value)

    def zeros(fn):  # size 0: the largest size's shapes of ``fn()``, zeros
        return tuple(jnp.zeros(a.shape, a.dtype) for a in jax.eval_shape(fn))

    def cut(size):
        return lambda a: jax.lax.slice_in_dim(a, 0, size, axis=axis)

    def projected(size):
        if size == 0:  # nobody, and zeros
            return lambda _: (jnp.full(idx_shape.shape, NOBODY, idx_shape.dtype),
                              *zeros(lambda: project(idx_of(largest))))
        def run(_):
            idx = idx_of(size)
            return (padded(idx, NOBODY),) + tuple(padded(a) for a in project(idx))
        return run

    index = dsp.size_index(sizes, load)
    idx, *qkv = jax.lax.switch(index, [projected(size) for size in sizes], None)
    qkv = tuple(qkv)
    cache = write(idx, qkv[1], qkv[2])

    if attention is None:  # attention with the rest of the layer
        def finished(size):
            if size == 0:
                return lambda _: zeros(lambda: finish(idx, attend(idx, qkv, cache, None)))
            def run(_):
                idx_c, qkv_c = cut(size)(idx), tuple(map(cut(size), qkv))
                return tuple(padded(a) for a in finish(idx_c, attend(idx_c, qkv_c, cache, None)))
            return run
        attn_size = None
    else:  # the attention at its own size (on the padded visit), then the rest at the visit's
        def attended(n):
            if n == 0:
                return lambda _: zeros(lambda: (attend(idx, qkv, cache, attn_sizes[-1]),))[0]
            return lambda _: attend(idx, qkv, cache, n)
        attn_index = dsp.size_index(attn_sizes, attn_load)
        ctx = jax.lax.switch(attn_index, [attended(n) for n in attn_sizes], None)

        def finished(size):
            if size == 0:
                return lambda _: zeros(lambda: finish(idx, ctx))
            return lambda _: tuple(padded(a) for a in finish(cut(size)(idx), cut(size)(ctx)))
        attn_size = jnp.asarray(attn_sizes, jnp.int32)[attn_index]

    upd, ratio = jax.lax.switch(index, [finished(size) for size in sizes], None)
    size = jnp.asarray(sizes, jnp.int32)[index]
    return idx, upd, ratio, cache, size, size if attn_size is None else attn_size


def run_layer(plan: Plan, l, params_l, meta_l, x_start, admitted_gn, gate_gn, tok: Tokens, s, state,
              skip_kv=None):
    """Layer ``l`` on its admitted tokens at the smallest static size that holds them.

    ``state = (x_acc, kv, ratio_gn)``; returns it updated and ``[tokens, queries]``: the
    tokens the layer's matmuls ran on and the query slots its attention ran on (0: nothing).
    Whole sequences dispatch *flat*: the admitted tokens of every sequence as one group
    (``plan.flat_sizes``), so the matmuls run at about the batch's load rather than the
    batch size times the busiest sequence's; only the attention runs per sequence, at the
    smallest of ``plan.sizes`` that holds the busiest sequence's tokens (``_attend_flat``, a
    switch of its own). Decoding: one group already (a token per row).
    ``skip_kv``: ordered *propagate*: the step's K/V of every token (already in the cache).
    ``l`` is a Python int for per-layer caches (only layer ``l``'s buffers are read and written).
    """
    x_acc, kv, ratio_gn = state
    flat = not plan.decoding
    if flat:  # attention per sequence, at the busiest sequence's load (plan.sizes); the rest as one group
        attention = (_sizes(plan), jnp.max(jnp.sum(admitted_gn, axis=-1)))
        one = lambda a: a.reshape((1, -1) + a.shape[2:])  # noqa: E731
        x_in, admitted_gn, gate_gn, tok = one(x_start), one(admitted_gn), one(gate_gn), jax.tree_util.tree_map(
            one, tok)
        x_acc_in, ratio_in = one(x_acc), one(ratio_gn)
        skip_kv = None if skip_kv is None else tuple(one(a) for a in skip_kv)
    else:
        attention, x_in, x_acc_in, ratio_in = None, x_start, x_acc, ratio_gn
    idx, upd, r, kv, size, attn_size = _run_visit(
        _sizes(plan, flat), jnp.max(jnp.sum(admitted_gn, axis=-1)),
        idx_of=lambda size: dsp.select(admitted_gn, size),
        project=lambda idx: _project(plan, params_l, meta_l["rope"], x_in, idx, tok, skip_kv),
        write=lambda idx, k, v: kv if skip_kv is not None else _write_visit(kv, l, tok, idx, k, v, s),
        attend=lambda idx, qkv, kv, n: _context(plan, meta_l["window"], idx, tok, kv, l, qkv, s, n),
        finish=lambda idx, ctx: _finish(plan, params_l, x_in, idx, gate_gn, tok, ctx),
        attention=attention)
    x_acc = dsp.scatter_add(x_acc_in, idx, upd).reshape(x_acc.shape)
    ratio_gn = dsp.scatter_add(ratio_in[..., None], idx, r[..., None])[..., 0].reshape(ratio_gn.shape)
    queries = cache_batch(kv) * attn_size if flat else size
    return (x_acc, kv, ratio_gn), jnp.stack([size, queries]).astype(jnp.int32)


def run_layers_grouped(plan: Plan, pool, meta, x_start, admitted_kgn, gate_kgn, tok: Tokens, s, state):
    """Radial mode, parallel forward, stacked layout: the ``L`` layers of step ``s`` as one batched computation.

    The same values as ``run_layer`` for each layer in turn (the layers of a step read
    the step's starting state and write their own cache layer, so they are independent),
    at one static size for all of them: the smallest that holds the largest load of any
    layer. The phases are vmapped over the stacked ``[L, ...]`` weights and the
    ``[L, B, ...]`` cache, read in place: one set of matmuls per step, where a loop over
    stacked layers pays ``L`` and, on CPU, a copy of every layer's weights. Returns the
    state and the size (that of every layer).
    """
    L = plan.num_layers
    G = x_start.shape[0]
    x_acc, kv, ratio_gn = state
    rope_k, window_k = jnp.asarray(meta["rope"]), jnp.asarray(meta["window"])

    def project(idx):
        return jax.vmap(lambda p, rope, i: _project(plan, p, rope, x_start, i, tok))(pool, rope_k, idx)

    def attend(idx, qkv, kv, _):
        def one(window_l, idx_gc, qkv, k, v, written_at):  # one layer, its own cache view
            own = KVCache(k[None], v[None], written_at[None])
            return _context(plan, window_l, idx_gc, tok, own, 0, qkv, s)
        return jax.vmap(one)(window_k, idx, qkv, kv.k, kv.v, kv.written_at)

    def finish(idx, ctx):
        return jax.vmap(lambda p, i, g, c: _finish(plan, p, x_start, i, g, tok, c))(pool, idx, gate_kgn, ctx)

    idx, upd, r, kv, size, _ = _run_visit(
        _sizes(plan), jnp.max(jnp.sum(admitted_kgn, axis=-1)),
        idx_of=lambda size: jax.vmap(lambda a: dsp.select(a, size))(admitted_kgn),  # [L, G, C]
        project=project,
        write=lambda idx, k, v: _write_visit(kv, jnp.arange(L, dtype=jnp.int32)[:, None, None], tok, idx, k, v, s),
        attend=attend, finish=finish)
    flat = lambda a: jnp.moveaxis(a, 0, 1).reshape((G, -1) + a.shape[3:])  # noqa: E731 [G, L*C, ...]
    x_acc = dsp.scatter_add(x_acc, flat(idx), flat(upd))
    ratio_gn = dsp.scatter_add(ratio_gn[..., None], flat(idx), flat(r)[..., None])[..., 0]
    return (x_acc, kv, ratio_gn), size


# --------------------------------------------------------------------------- 5. propagate exits (radial)

def propagate_exits(plan: Plan, pool, meta, x, exiting_gn, tok: Tokens, kv, s):
    """Radial *propagate*: an exiting token fills every still-empty layer of its slot from its final state
    (``written_at = s + 1``: see the module docstring).

    The exiting tokens go in chunks of ``exit_chunk`` (position order), as many as the
    load needs (a ``fori_loop`` with a traced trip count: the cache is updated in place,
    no switch copies it). In the parallel forward, a chunk that holds every token runs
    once, unconditionally: what training (``prefill_buckets=1``) differentiates. Returns the cache and
    the number of token slots that ran.
    """
    layer = _layer(plan)
    L, chunk = plan.num_layers, plan.exit_chunk

    def body(i, kv):
        idx = dsp.select(exiting_gn, chunk, start=i * chunk)
        ok, pos_gc, slot_gc, row_gc = _dispatched(tok, idx, cache_max_len(kv))
        x_gc = dsp.gather(x, idx)

        def one_layer(kv, params_l, rope_l, l):
            k, v = layer.apply({"params": params_l}, x_gc, pos_gc, rope_l, method="kv")
            return write_layer(kv, l, row_gc, slot_gc, k, v, ok, s + 1)

        if is_per_layer(pool):  # the inference layout: every layer's own arrays, unrolled
            for l in range(L):
                kv = one_layer(kv, pool[l], meta_at(meta, l)["rope"], l)
            return kv
        xs = (pool, jnp.asarray(meta["rope"]), jnp.arange(L, dtype=jnp.int32))
        return jax.lax.scan(lambda kv, xs: (one_layer(kv, *xs), None), kv, xs)[0]

    if chunk >= exiting_gn.shape[-1] and not plan.decoding:
        return body(0, kv), jnp.int32(chunk)
    n_chunks = (jnp.max(jnp.sum(exiting_gn, axis=-1)) + chunk - 1) // chunk
    return jax.lax.fori_loop(0, n_chunks, body, kv), n_chunks * chunk


# --------------------------------------------------------------------------- one step

@flax.struct.dataclass
class Carry:
    x: jax.Array  # [G, N, e]
    active: jax.Array  # [G, N] not exited
    last: jax.Array  # [G, N] last layer visited (L: none)
    kv: KVCache
    admitted: jax.Array  # [B, S, L] the budget's counters
    alive: jax.Array  # [G, N] float32: mixture routing's survival, prod(1 - p_exit) of earlier steps (else 1)


def run_step(plan: Plan, pool, meta, router_params, carry: Carry, tok: Tokens, s, threshold, explore=None):
    """One step ``s``: returns the new carry and the step's record (router fields and what ran)."""
    rc, L = plan.rc, plan.num_layers
    x = carry.x
    logits, decision, probe = route(plan, router_params, pool, meta, x, carry.active, carry.last, tok, s, threshold,
                                    explore)
    eligible = carry.active & tok.valid
    layer_ids = jnp.reshape(s, (1,)).astype(jnp.int32) if rc.ordered else jnp.arange(L, dtype=jnp.int32)
    admitted_kgn, counters = admit(plan, decision, carry.admitted, tok, s, layer_ids)
    gate_kgn = gate(rc, decision.prob_kgn)
    alive = carry.alive
    if rc.routing == "mixture":
        gate_kgn = gate_kgn * alive[None]
        alive = alive * (1.0 - jax.nn.softmax(logits, axis=-1)[..., exit_index(L)])
    kv = carry.kv
    ratio_gn = jnp.zeros(eligible.shape, jnp.float32)
    state = (x, kv, ratio_gn)
    if rc.ordered:
        params_s = pool_layer(pool, s)
        meta_s = meta_at(meta, s)
        skip_kv = None
        if rc.cache_policy == "propagate":
            kv, skip_kv = propagate_skips(plan, params_s, meta_s, x, eligible, tok, kv, s)
            state = (x, kv, ratio_gn)
        state, ran = run_layer(plan, s, params_s, meta_s, x, admitted_kgn[0], gate_kgn[0], tok, s, state, skip_kv)
        sizes_l = jnp.zeros((L, 2), jnp.int32).at[s].set(ran)
    else:
        if rc.cache_policy == "propagate":  # the step-aligned writes of steps s < L (see the module docstring)
            if isinstance(s, int):  # unrolled steps (the inference layout)
                if s < L:
                    kv = propagate_skips(plan, pool_layer(pool, s), meta_at(meta, s), x, eligible, tok, kv, s)[0]
            else:
                kv = propagate_skips_traced(plan, pool, meta, x, eligible, tok, kv, s)
            state = (x, kv, ratio_gn)

        def one_layer(l, st):
            def run(st):
                state, sizes_l = st
                params_l = pool_layer(pool, l)
                state, ran = run_layer(plan, l, params_l, meta_at(meta, l), x, admitted_kgn[l], gate_kgn[l], tok,
                                       s, state)
                return state, sizes_l.at[l].set(ran)
            # a layer no token uses at this step runs nothing: not its size-0 branch (zeros, writes and
            # scatters at the largest size), not even the slice out of a stack (a copy on CPU)
            return jax.lax.cond(jnp.any(admitted_kgn[l]), run, lambda st: st, st)
        st = (state, jnp.zeros((L, 2), jnp.int32))  # per layer: [tokens, attention queries] that ran
        if is_per_layer(pool):  # the inference layout: each layer reads its own arrays (unrolled)
            for l in range(L):
                st = one_layer(l, st)
            state, sizes_l = st
        elif not plan.decoding:  # whole sequences: one batched computation when the layers share the load
            def grouped(st):
                state, size = run_layers_grouped(plan, pool, meta, x, admitted_kgn, gate_kgn, tok, s, st[0])
                return state, jnp.full((L, 2), x.shape[0] * size, jnp.int32)  # G groups at that size

            load_l = jnp.max(jnp.sum(admitted_kgn, axis=-1), axis=-1)  # [L]
            balanced = L * jnp.max(load_l) <= 2 * jnp.sum(load_l)  # grouped runs L x the largest load
            state, sizes_l = jax.lax.cond(balanced, grouped, lambda st: jax.lax.fori_loop(0, L, one_layer, st), st)
        else:
            state, sizes_l = jax.lax.fori_loop(0, L, one_layer, st)
    x_new, kv, ratio_gn = state
    exit_size = jnp.int32(0)
    if not rc.ordered and rc.cache_policy == "propagate":
        kv, exit_size = propagate_exits(plan, pool, meta, x_new, decision.exiting_gn, tok, kv, s)
    if probe is not None:
        ratio_gn = jnp.where(eligible, probe, 0.0)

    processed = admitted_kgn.any(0)
    if rc.ordered:
        assign = admitted_kgn[0][..., None] & (jnp.arange(L) == s)
    else:
        assign = jnp.moveaxis(admitted_kgn, 0, -1)
    visited = jnp.where(assign, jnp.arange(L), -1).max(-1)
    record = dict(
        logits=logits, probs=jax.nn.softmax(logits, axis=-1), choice=decision.choice_gn,
        gate=jnp.where(admitted_kgn, gate_kgn, 0.0).sum(0), assign=assign,
        dropped=(decision.want_kgn & ~admitted_kgn).any(0), exited=decision.exiting_gn, ratio=ratio_gn,
        layer_sizes=sizes_l[:, 0], attn_queries=sizes_l[:, 1], exit_size=exit_size, ran=jnp.bool_(True),
        aligned_kv=jnp.bool_(rc.cache_policy == "propagate") & (s < L))
    new = Carry(x=x_new, active=carry.active & ~decision.exiting_gn,
                last=jnp.where(processed, visited, carry.last), kv=kv, admitted=counters, alive=alive)
    return new, record


# --------------------------------------------------------------------------- the loops

def run_steps(plan: Plan, pool, meta, router_params, x_gne, tok: Tokens, cache: RadialCache,
              threshold=None, explore=None) -> tuple:
    """All ``S`` steps: ``(x, cache, records)`` with records stacked ``[S, ...]``.

    Stacked pool (training): the parallel forward scans every step (differentiable);
    decoding runs a ``while_loop`` that ends as soon as no token of the batch is left
    (every row exited) or ``S`` steps ran, and fills the records of the steps that did
    not run with ``choice = -1`` and zeros. A per-layer pool (the inference layout,
    ``stack.unstack_pool``) runs ``_run_steps_per_layer``: each layer reads its own
    weights and cache in place. Both give the same values. ``explore`` (``routing.Explore``, training):
    whole sequences on a stacked pool and cache only.
    """
    S, L = plan.steps, plan.num_layers
    if explore is not None and (plan.decoding or is_per_layer(pool) or is_split(cache.kv)):
        raise ValueError("exploration is a training option: the parallel forward of whole sequences on a stacked "
                         "pool and cache; decoding and the inference layout choose by the clean logits")
    G, N = tok.valid.shape
    carry = Carry(x=x_gne, active=jnp.ones((G, N), bool), last=jnp.full((G, N), L, jnp.int32), kv=cache.kv,
                  admitted=cache.admitted, alive=jnp.ones((G, N), jnp.float32))
    if is_per_layer(pool) and plan.rc.routing != "oracle":  # the oracle's probe picks layers by a traced step
        return _run_steps_per_layer(plan, pool, meta, router_params, carry, tok, threshold)
    if is_split(cache.kv):
        x, out, records = run_steps(plan, stack_pool(pool), meta, router_params, x_gne, tok,
                                    cache.replace(kv=stack_layers(cache.kv)), threshold)
        return x, out.replace(kv=split_layers(out.kv)), records
    pool = stack_pool(pool)

    if not plan.decoding:
        def body(carry, s):
            carry = carry.replace(x=shard_batch(carry.x), kv=shard_batch(carry.kv, axis=1))  # see models.remat
            return run_step(plan, pool, meta, router_params, carry, tok, s, threshold, explore)
        carry, records = jax.lax.scan(remat_layer(body), carry, jnp.arange(S, dtype=jnp.int32),  # remat: models.remat
                                      unroll=bool(plan.rc.scan_unroll))
        return carry.x, RadialCache(kv=carry.kv, admitted=carry.admitted), records

    records = _empty_records(plan, pool, meta, router_params, carry, tok, threshold)

    def cond(state):
        s, carry, _ = state
        return (s < S) & jnp.any(carry.active & tok.valid)

    def body(state):
        s, carry, records = state
        carry, rec = run_step(plan, pool, meta, router_params, carry, tok, s, threshold)
        records = jax.tree_util.tree_map(lambda buf, r: jax.lax.dynamic_update_index_in_dim(buf, r, s, 0),
                                         records, rec)
        return s + 1, carry, records

    _, carry, records = jax.lax.while_loop(cond, body, (jnp.int32(0), carry, records))
    return carry.x, RadialCache(kv=carry.kv, admitted=carry.admitted), records


def _empty_records(plan: Plan, pool, meta, router_params, carry: Carry, tok: Tokens, threshold):
    """The records of ``S`` steps that did not run: zeros, ``choice = -1``."""
    s0 = 0 if is_per_layer(pool) else jnp.int32(0)  # static steps for a per-layer pool
    template = jax.eval_shape(lambda c: run_step(plan, pool, meta, router_params, c, tok, s0, threshold)[1], carry)
    records = jax.tree_util.tree_map(lambda a: jnp.zeros((plan.steps,) + a.shape, a.dtype), template)
    records["choice"] = jnp.full_like(records["choice"], -1)
    return records


def _run_steps_per_layer(plan: Plan, pool, meta, router_params, carry: Carry, tok: Tokens, threshold):
    """``run_steps`` in the inference layout: per-layer weights and caches (a stacked cache is split
    on the way in and stacked on the way out).

    Decoding and ordered mode unroll the steps, so every step and layer index is static
    (decoding skips the steps after every row has exited with a ``lax.cond``); radial
    whole sequences scan the steps, the ``L`` layers unrolled in the step body, each at
    its own size (one compiled step, where unrolling would compile ``S x L`` layers).
    """
    stacked = not is_split(carry.kv)
    carry = carry.replace(kv=split_layers(carry.kv) if stacked else carry.kv)
    if plan.decoding or plan.rc.ordered:
        carry, records = _run_steps_unrolled(plan, pool, meta, router_params, carry, tok, threshold)
    else:
        def body(carry, s):
            return run_step(plan, pool, meta, router_params, carry.replace(x=shard_batch(carry.x)), tok, s,
                            threshold)
        carry, records = jax.lax.scan(remat_layer(body), carry, jnp.arange(plan.steps, dtype=jnp.int32))
    kv = stack_layers(carry.kv) if stacked else carry.kv
    return carry.x, RadialCache(kv=kv, admitted=carry.admitted), records


def _run_steps_unrolled(plan: Plan, pool, meta, router_params, carry: Carry, tok: Tokens, threshold):
    """The steps with static indices (a per-layer pool): ``(carry, records)``; see ``_run_steps_per_layer``."""
    unused = jax.tree_util.tree_map(lambda a: a[0], _empty_records(plan, pool, meta, router_params, carry, tok,
                                                                   threshold))
    recs = []
    for s in range(plan.steps):
        if plan.decoding:  # steps after every row exited do not run
            carry, rec = jax.lax.cond(
                jnp.any(carry.active & tok.valid),
                lambda c: run_step(plan, pool, meta, router_params, c, tok, s, threshold),
                lambda c: (c, unused), carry)
        else:
            carry, rec = run_step(plan, pool, meta, router_params, carry, tok, s, threshold)
        recs.append(rec)
    return carry, jax.tree_util.tree_map(lambda *r: jnp.stack(r), *recs)

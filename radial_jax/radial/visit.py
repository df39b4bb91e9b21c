"""Phase 4 of a step (``radial.steps``): one layer visited by the tokens admitted to it, at the smallest static
size that holds them, under ``lax.switch`` (``run_layer``), or every layer of a step at once (``run_layers_grouped``).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from radial_jax.radial.step_state import NOBODY, Plan, Tokens, dispatched, holds_token, layer_module
from radial_jax.models.kv_cache import KVCache, cache_batch, cache_max_len, layer_view, visible_mask, write_layer
from radial_jax.models.layer import attention
from radial_jax.radial import dispatch as dsp




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
    return attention(plan.lc, q, kc, vc, mask, self_kv=None if own_in_cache else (k, v),
                     sparse_keys=plan.rc.cache_policy == "mask")


def _attend_flat(plan: Plan, kv, l, q, k, v, slot_f, row_f, ok_f, s, window, per_sequence: int):
    """``_attend`` for a flat visit (``[1, F]``: the tokens of every sequence, batch-major): the queries go
    to ``[B, per_sequence]`` (sequence, rank in it; ``per_sequence`` holds the busiest sequence's tokens)
    so that each reads its own cache row, and come back.

    Sequences of at most ``per_sequence`` tokens hold at most ``B * per_sequence`` between them, and a
    visit puts its selected tokens first (``dispatch.select``): only that many lead rows are grouped,
    the rest is padding, left out of the grouping."""
    batch = cache_batch(kv)
    flat_size = q.shape[1]
    held = min(flat_size, batch * per_sequence)
    q, k, v, slot_f, row_f, ok_f = (a[:, :held] for a in (q, k, v, slot_f, row_f, ok_f))
    rows = jnp.where(ok_f[0], row_f[0], batch)  # [held], batch: nobody
    counts = jnp.zeros((batch,), jnp.int32).at[rows].add(1, mode="drop")
    rank = jnp.arange(held) - (jnp.cumsum(counts) - counts)[jnp.clip(rows, 0, batch - 1)]

    def grouped(a, fill=0):  # [1, held, ...] -> [B, per_sequence, ...]
        return jnp.full((batch, per_sequence) + a.shape[2:], fill, a.dtype).at[rows, rank].set(a[0], mode="drop")
    ctx = _attend(plan, kv, l, grouped(q), grouped(k), grouped(v), grouped(slot_f, cache_max_len(kv)),
                  grouped(row_f), s, window)
    ctx_f = ctx[jnp.clip(rows, 0, batch - 1), jnp.clip(rank, 0, per_sequence - 1)][None]  # [1, held, ...]
    return jnp.pad(ctx_f, [(0, 0), (0, flat_size - held)] + [(0, 0)] * (ctx_f.ndim - 2))


# A layer visit by the gathered tokens ``idx_gc [G, C]`` (``NOBODY``: an empty slot) projects, writes,
# then attends (rule 1): ``_project`` (queries and K/V), ``_write_visit``, ``_context`` (attention),
# ``_finish`` (the rest of the layer, the gated update); ``_run_visit`` puts them under switches.

def _project(plan: Plan, params_l, rope_l, x_start, idx_gc, tok: Tokens, skip_kv=None):
    """``(q, k, v)`` of the gathered tokens. ``skip_kv``: K/V already in the cache (ordered *propagate*)."""
    layer = layer_module(plan)
    x_gc, pos_gc = dsp.gather(x_start, idx_gc), dsp.gather(tok.positions, idx_gc)
    if skip_kv is None:
        return layer.apply({"params": params_l}, x_gc, pos_gc, rope_l, method="qkv")
    q = layer.apply({"params": params_l}, x_gc, pos_gc, rope_l, method="query")
    return q, dsp.gather(skip_kv[0], idx_gc), dsp.gather(skip_kv[1], idx_gc)


def _write_visit(cache, at, tok: Tokens, idx, k, v, s):
    """Rule 1 for a visit's tokens ``idx [..., G, C]`` (``at``: the layer, or ``[K, 1, 1]`` layers)."""
    ok, _, slot, row = dispatched(tok, idx, cache_max_len(cache))
    return write_layer(cache, at, row, slot, k, v, ok, s)


def _context(plan: Plan, window_l, idx_gc, tok: Tokens, cache, at, qkv, s, per_sequence=None):
    """The attention context of the gathered tokens (to layer ``at`` of ``cache``, their K/V written).
    ``per_sequence``: a flat visit (one group holding every sequence's tokens, ``_attend_flat``)."""
    ok, _, slot_gc, row_gc = dispatched(tok, idx_gc, cache_max_len(cache))
    if per_sequence is not None:
        return _attend_flat(plan, cache, at, *qkv, slot_gc, row_gc, ok, s, window_l, per_sequence)
    return _attend(plan, cache, at, *qkv, slot_gc, row_gc, s, window_l)


def _finish(plan: Plan, params_l, x_start, idx_gc, gate_gn, tok: Tokens, ctx):
    """``(upd_gce, ratio_gc)``: the rest of the layer after attention (``ctx``), the update times the gate
    and the residual ratio (0 for empty slots)."""
    layer = layer_module(plan)
    ok = holds_token(tok, idx_gc)
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
    stacked layers pays ``L`` and a slice of every layer's weights (``models.stack``). Returns the
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

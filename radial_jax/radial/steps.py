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
4. ``run_layer`` (``radial.visit``) for each layer the step considers: the smallest static size that
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


import flax.struct
import jax
import jax.numpy as jnp

from radial_jax.radial.step_state import Plan, RadialCache, Tokens, dispatched, layer_module
from radial_jax.radial.visit import run_layer, run_layers_grouped
from radial_jax.models.kv_cache import KVCache, cache_max_len, is_split, write_layer
from radial_jax.models.remat import remat_layer, shard_batch
from radial_jax.models.stack import layer_forward
from radial_jax.radial import dispatch as dsp
from radial_jax.radial.pool import Pool
from radial_jax.radial.router import Router, exit_index
from radial_jax.radial.routing import decide, gate




# --------------------------------------------------------------------------- 1. route

def route(plan: Plan, router_params, pool: Pool, x, active, last, tok: Tokens, s, threshold, explore=None):
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
    if rc.is_oracle:  # §3 at layer granularity: the layer on every token, kept if its ratio is high
        params_s, meta_s = pool.layer(s)
        _, stats = layer_forward(plan.lc, plan.dtype, params_s, meta_s, x, tok.positions, tok.slots, tok.valid,
                                 causal=plan.causal)
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
    k, v = layer_module(plan).apply({"params": params_s}, x, tok.positions, meta_s["rope"], method="kv")
    return write_layer(kv, s, tok.rows, tok.slots, k, v, eligible, s), (k, v)


def propagate_skips_traced(plan: Plan, pool: Pool, x, eligible, tok: Tokens, kv, s):
    """``propagate_skips`` at a traced step of radial mode (nothing at ``s >= L``), in either layout.

    The K/V are computed in a branch on the layer (``Pool.pick``); the cache is written outside it
    (``Pool.write_picked``): a branch copies any operand it returns updated.
    """
    layer = layer_module(plan)

    def kv_of(l):
        def run():
            params_l, meta_l = pool.layer(l)
            return layer.apply({"params": params_l}, x, tok.positions, meta_l["rope"], method="kv")
        return run

    shapes = jax.eval_shape(kv_of(0))
    nothing = lambda: tuple(jnp.zeros(a.shape, a.dtype) for a in shapes)  # noqa: E731
    k, v = pool.pick(s, kv_of, nothing)
    return pool.write_picked(kv, s, tok.rows, tok.slots, k, v, eligible, s)


# --------------------------------------------------------------------------- 5. propagate exits (radial)

def propagate_exits(plan: Plan, pool: Pool, x, exiting_gn, tok: Tokens, kv, s):
    """Radial *propagate*: an exiting token fills every still-empty layer of its slot from its final state
    (``written_at = s + 1``: see the module docstring).

    The exiting tokens go in chunks of ``exit_chunk`` (position order), as many as the
    load needs (a ``fori_loop`` with a traced trip count: the cache is updated in place,
    no switch copies it). In the parallel forward, a chunk that holds every token runs
    once, unconditionally: what training (``prefill_buckets=1``) differentiates. Returns the cache and
    the number of token slots that ran.
    """
    layer = layer_module(plan)
    chunk = plan.exit_chunk

    def body(i, kv):
        idx = dsp.select(exiting_gn, chunk, start=i * chunk)
        ok, pos_gc, slot_gc, row_gc = dispatched(tok, idx, cache_max_len(kv))
        x_gc = dsp.gather(x, idx)

        def one_layer(kv, params_l, meta_l, l):
            k, v = layer.apply({"params": params_l}, x_gc, pos_gc, meta_l["rope"], method="kv")
            return write_layer(kv, l, row_gc, slot_gc, k, v, ok, s + 1)

        return pool.scan(one_layer, kv)

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


def run_step(plan: Plan, pool: Pool, router_params, carry: Carry, tok: Tokens, s, threshold, explore=None):
    """One step ``s``: returns the new carry and the step's record (router fields and what ran)."""
    rc, L = plan.rc, plan.num_layers
    x = carry.x
    logits, decision, probe = route(plan, router_params, pool, x, carry.active, carry.last, tok, s, threshold, explore)
    eligible = carry.active & tok.valid
    layer_ids = jnp.reshape(s, (1,)).astype(jnp.int32) if rc.ordered else jnp.arange(L, dtype=jnp.int32)
    admitted_kgn, counters = admit(plan, decision, carry.admitted, tok, s, layer_ids)
    gate_kgn = gate(rc, decision.prob_kgn)
    alive = carry.alive
    if rc.is_mixture:
        gate_kgn = gate_kgn * alive[None]
        alive = alive * (1.0 - jax.nn.softmax(logits, axis=-1)[..., exit_index(L)])
    kv = carry.kv
    ratio_gn = jnp.zeros(eligible.shape, jnp.float32)
    state = (x, kv, ratio_gn)
    if rc.ordered:
        params_s, meta_s = pool.layer(s)
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
                    kv = propagate_skips(plan, *pool.layer(s), x, eligible, tok, kv, s)[0]
            else:
                kv = propagate_skips_traced(plan, pool, x, eligible, tok, kv, s)
            state = (x, kv, ratio_gn)

        def one_layer(l, st):
            def run(st):
                state, sizes_l = st
                params_l, meta_l = pool.layer(l)
                state, ran = run_layer(plan, l, params_l, meta_l, x, admitted_kgn[l], gate_kgn[l], tok, s, state)
                return state, sizes_l.at[l].set(ran)
            # a layer no token uses at this step runs nothing: not its size-0 branch (zeros, writes and
            # scatters at the largest size), not even the slice out of a stack (models.stack)
            return jax.lax.cond(jnp.any(admitted_kgn[l]), run, lambda st: st, st)
        st = (state, jnp.zeros((L, 2), jnp.int32))  # per layer: [tokens, attention queries] that ran
        if pool.per_layer or plan.decoding:  # each layer at its own size
            state, sizes_l = pool.fold(one_layer, st)
        else:  # stacked whole sequences: one batched computation when the layers share the load
            def grouped(st):
                state, size = run_layers_grouped(plan, pool.params, pool.meta, x, admitted_kgn, gate_kgn, tok, s,
                                                 st[0])
                return state, jnp.full((L, 2), x.shape[0] * size, jnp.int32)  # G groups at that size

            load_l = jnp.max(jnp.sum(admitted_kgn, axis=-1), axis=-1)  # [L]
            balanced = L * jnp.max(load_l) <= 2 * jnp.sum(load_l)  # grouped runs L x the largest load
            state, sizes_l = jax.lax.cond(balanced, grouped, lambda st: pool.fold(one_layer, st), st)
    x_new, kv, ratio_gn = state
    exit_size = jnp.int32(0)
    if not rc.ordered and rc.cache_policy == "propagate":
        kv, exit_size = propagate_exits(plan, pool, x_new, decision.exiting_gn, tok, kv, s)
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

def run_steps(plan: Plan, pool_params, meta, router_params, x_gne, tok: Tokens, cache: RadialCache,
              threshold=None, explore=None) -> tuple:
    """All ``S`` steps: ``(x, cache, records)`` with records stacked ``[S, ...]``; the cache comes back in
    the layout it came in.

    The pool's layout (``radial.pool``) decides how layers are read and looped; the steps are one
    loop either way: unrolled where a step indexes the pool by a static step (decoding, whose steps
    after every row has exited are skipped by a ``lax.cond``, and ordered mode on a per-layer pool), a
    ``scan`` otherwise (one compiled step; differentiable, rematerialised). Both layouts give the same
    values. ``explore`` (``routing.Explore``, training): whole sequences on a stacked pool and cache only.
    """
    L = plan.num_layers
    pool = Pool(pool_params, meta, L)
    if explore is not None and (plan.decoding or pool.per_layer or is_split(cache.kv)):
        raise ValueError("exploration is a training option: the parallel forward of whole sequences on a stacked "
                         "pool and cache; decoding and the inference layout choose by the clean logits")
    if pool.per_layer and plan.rc.is_oracle:  # the oracle's probe picks layers by a traced step
        pool = pool.stacked()
    G, N = tok.valid.shape
    carry = Carry(x=x_gne, active=jnp.ones((G, N), bool), last=jnp.full((G, N), L, jnp.int32),
                  kv=pool.own(cache.kv), admitted=cache.admitted, alive=jnp.ones((G, N), jnp.float32))
    if plan.decoding or (pool.per_layer and plan.rc.ordered):
        carry, records = _steps_unrolled(plan, pool, router_params, carry, tok, threshold)
    else:
        def body(carry, s):
            carry = carry.replace(x=shard_batch(carry.x), kv=shard_batch(carry.kv, axis=1))  # see models.remat
            return run_step(plan, pool, router_params, carry, tok, s, threshold, explore)
        unroll = bool(plan.rc.scan_unroll) and not pool.per_layer  # a per-layer step is already L layers long
        carry, records = jax.lax.scan(remat_layer(body), carry, jnp.arange(plan.steps, dtype=jnp.int32),
                                      unroll=unroll)  # remat: models.remat
    kv = Pool.restore(carry.kv, like=cache.kv)
    return carry.x, RadialCache(kv=kv, admitted=carry.admitted), records


def _steps_unrolled(plan: Plan, pool: Pool, router_params, carry: Carry, tok: Tokens, threshold):
    """The steps with static indices: ``(carry, records)``; decoding skips the steps after every row exited."""
    template = jax.eval_shape(lambda c: run_step(plan, pool, router_params, c, tok, 0, threshold)[1], carry)
    unused = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), template)  # a step that did not run
    unused["choice"] = jnp.full_like(unused["choice"], -1)
    recs = []
    for s in range(plan.steps):
        if plan.decoding:
            carry, rec = jax.lax.cond(
                jnp.any(carry.active & tok.valid),
                lambda c: run_step(plan, pool, router_params, c, tok, s, threshold),
                lambda c: (c, unused), carry)
        else:
            carry, rec = run_step(plan, pool, router_params, carry, tok, s, threshold)
        recs.append(rec)
    return carry, jax.tree_util.tree_map(lambda *r: jnp.stack(r), *recs)

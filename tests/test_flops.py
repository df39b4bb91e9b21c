"""FLOPs by construction (``radial_jax.models.flops``, ``RadialMetrics.executed_flops``) against XLA's cost analysis.

XLA counts every operation (norms, softmax, masks, gathers) where ours counts the
matrix multiplies, so layers are wide enough here (256 / 1024) for the
elementwise rest to be a few percent; the tolerance says so.
"""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

import radial_jax as rj
from radial_jax.models.flops import layer_flops, router_flops
from radial_jax.models.kv_cache import KVCache, visible_mask
from radial_jax.models.layer import LayerConfig, TransformerLayer, attention
from radial_jax.radial import RadialModel
from radial_jax.radial.router import Router
from radial_jax.radial.step_state import Plan, Tokens
from radial_jax.radial.visit import run_layer

REL = 0.05  # matmuls vs everything XLA counts, at these widths
WIDE = dict(vocab_size=64, hidden_size=256, num_hidden_layers=3, ffn_dim=1024, num_attention_heads=4,
            max_position_embeddings=64)


def xla(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


@pytest.mark.parametrize("lc", [
    LayerConfig(hidden_size=256, num_heads=4, ffn_dim=1024),
    LayerConfig(hidden_size=256, num_heads=8, num_kv_heads=2, ffn_dim=768, gated_mlp=True, activation="silu",
                norm="rmsnorm", qkv_bias=False, out_bias=False, mlp_bias=False),
], ids=["opt-like", "llama-like-gqa"])
@pytest.mark.parametrize("tokens,keys", [(4, 16), (16, 16), (8, 64)])
def test_layer_flops_equal_xla_for_a_visit_against_a_cache(lc, tokens, keys):
    layer = TransformerLayer(lc)
    x = jnp.zeros((1, tokens, lc.hidden_size))
    params = layer.init(jax.random.key(0), x, jnp.ones((1, tokens, tokens), bool))["params"]
    kc = jnp.zeros((1, lc.kv_heads, keys, lc.head_size))  # heads-major, as the KV cache

    def visit(p, x, kc, vc):  # what a dispatched visit runs: its own K/V join the cache's
        q, k, v = layer.apply({"params": p}, x, method="qkv")
        ctx = attention(lc, q, kc, vc, jnp.ones((1, tokens, keys), bool), self_kv=(k, v))
        return layer.apply({"params": p}, x, ctx, method="finish")[0]

    got = xla(visit, params, x, kc, kc)
    assert got == pytest.approx(layer_flops(lc, tokens, keys + 1), rel=REL)


def _branch_flops(rm, tokens_run, queries, decoding, groups, tokens, cache_len):
    """XLA's FLOPs of one layer visit at static sizes (the code the network runs): matmuls on
    ``tokens_run`` tokens, attention on ``queries`` query slots (whole sequences: ``queries / groups``
    per sequence: the busiest sequence's load rounded up). Ordered *propagate*: the visit is handed the step's
    K/V of every token (``skip_kv``), as the network does."""
    config = rm.config
    lc = config.layer_config()
    per_group = tokens_run if decoding else queries // groups
    plan = Plan(rc=rm.radial, lc=lc, dtype=jnp.float32, num_layers=config.num_layers, causal=True,
                decoding=decoding, sizes=(per_group,), exit_chunk=tokens, phi=1.0, hidden_size=config.hidden_size,
                flat_sizes=(tokens_run,))
    params_l = jax.tree_util.tree_map(lambda a: a[0], rm.params["layers"])
    meta_l = {k: jnp.asarray(v[0]) for k, v in config.layer_meta().items()}
    # at most per_group admitted tokens in each group, tokens_run in all (a flat visit's matmuls run at
    # tokens_run, its load rounded up, so fewer may be admitted)
    admitted = (jnp.arange(tokens)[None] < per_group) & (
        jnp.arange(groups)[:, None] * per_group + jnp.arange(tokens)[None] < tokens_run)
    assert int(admitted.sum()) == min(tokens_run, groups * per_group)
    rows = (jnp.arange(tokens)[None] if decoding else jnp.broadcast_to(jnp.arange(groups)[:, None],
                                                                        (groups, tokens))).astype(jnp.int32)
    slots = jnp.broadcast_to(jnp.arange(tokens), (groups, tokens)).astype(jnp.int32)
    tok = Tokens(rows=rows, slots=slots, positions=slots, valid=jnp.ones((groups, tokens), bool),
                 budget=jnp.full((groups, tokens), 10 ** 6, jnp.int32))
    batch = tokens if decoding else groups
    kv = KVCache.create(config.num_layers, batch, cache_len, lc.kv_heads, lc.head_size)
    x = jnp.zeros((groups, tokens, config.hidden_size))

    given_kv = rm.radial.ordered and rm.radial.cache_policy == "propagate"
    skip_kv = jnp.zeros((2, groups, tokens, lc.kv_heads, lc.head_size))

    def branch(params_l, x, kv, skip_kv):
        state = (x, kv, jnp.zeros((groups, tokens)))
        return run_layer(plan, jnp.int32(0), params_l, meta_l, x, admitted, jnp.ones((groups, tokens)), tok,
                         jnp.int32(0), state, skip_kv=tuple(skip_kv) if given_kv else None)[0][0]

    return xla(branch, params_l, x, kv, skip_kv)


def _kv_write_flops(rm, groups, tokens):
    """XLA's FLOPs of one layer's K/V projections of ``groups x tokens`` tokens (a *propagate* write)."""
    lc = rm.config.layer_config()
    layer = TransformerLayer(lc)
    params_l = jax.tree_util.tree_map(lambda a: a[0], rm.params["layers"])
    x = jnp.zeros((groups, tokens, rm.config.hidden_size))
    return xla(lambda p, x: layer.apply({"params": p}, x, method="kv"), params_l, x)


def _router_flops(rm, groups, tokens):
    c, rc = rm.config, rm.radial
    router = Router(c.num_layers, rc.steps(c.num_layers), rc.router_hidden)
    x = jnp.zeros((groups, tokens, c.hidden_size))
    return xla(lambda p, x: router.apply({"params": p}, x, jnp.int32(0)), rm.params["router"], x)


def _propagate_flops(rm, metrics, groups, tokens):
    """XLA's FLOPs of ordered *propagate*'s writes that ran: every token's K/V at each step."""
    if rm.radial.cache_policy != "propagate":
        return 0.0
    assert rm.radial.ordered, "radial mode's exit fills are not counted here"
    return int(metrics.steps_run) * _kv_write_flops(rm, groups, tokens)


@pytest.mark.parametrize("mode,policy", [("ordered", "mask"), ("radial", "mask"), ("ordered", "propagate")])
def test_executed_flops_equal_xla_for_the_branches_that_ran(mode, policy):
    model = rj.build(rj.OPTConfig(**WIDE), seed=0)
    kw = dict(mode="ordered", capacity_factor=0.5) if mode == "ordered" else dict(mode="radial", capacity_factor=1.0)
    rm = RadialModel.from_sequential(model, router_init_scale=1.5, seed=3, prefill_buckets=4, cache_policy=policy,
                                       **kw)
    B, T = 2, 24
    ids = np.random.default_rng(0).integers(3, 64, (B, T))
    out = rm.forward(ids)
    sizes, queries = np.asarray(out.metrics.layer_sizes), np.asarray(out.metrics.attn_queries)  # [S, L]
    assert (sizes > 0).any() and len(set(sizes[sizes > 0].tolist())) >= 2, "several sizes must run"
    xla_total = sum(_branch_flops(rm, int(c), int(q), False, B, T, T) for c, q in zip(sizes[sizes > 0],
                                                                                     queries[sizes > 0]))
    xla_total += int(out.metrics.steps_run) * _router_flops(rm, B, T)
    xla_total += _propagate_flops(rm, out.metrics, B, T)
    assert float(out.metrics.executed_flops) == pytest.approx(xla_total, rel=REL)
    # and what ran is what the budget let through, rounded up to the static sizes
    assert float(out.metrics.executed_flops) < float(out.metrics.dense_flops)

    # decoding one token per row of a batch of 4: the power-of-two sizes that ran
    b = 4
    cache = rm.forward(np.tile(ids[:1], (b, 1))[:, :8], positions_bt=np.broadcast_to(np.arange(8), (b, 8)),
                       max_len=12).cache
    step = rm.decode_step(ids[:b, 8] if b <= B else np.tile(ids[:, 8], 2)[:b], np.full(b, 8), cache)
    sizes = np.asarray(step.metrics.layer_sizes)
    xla_step = sum(_branch_flops(rm, int(c), int(c), True, 1, b, 12) for c in sizes[sizes > 0])
    xla_step += int(step.metrics.steps_run) * _router_flops(rm, 1, b)
    xla_step += _propagate_flops(rm, step.metrics, 1, b)
    assert float(step.metrics.executed_flops) == pytest.approx(xla_step, rel=REL)


def test_dense_flops_equal_xla_for_the_sequential_forward():
    model = rj.build(rj.OPTConfig(**WIDE), seed=0)
    lc = model.config.layer_config()
    layer = TransformerLayer(lc)
    params_0 = jax.tree_util.tree_map(lambda a: a[0], model.params["layers"])
    mask = jnp.broadcast_to(visible_mask(jnp.zeros((2, 16), jnp.int32), jnp.broadcast_to(jnp.arange(16), (2, 16)), 0),
                            (2, 16, 16))
    one = xla(lambda p, x: layer.apply({"params": p}, x, mask)[0], params_0, jnp.zeros((2, 16, 256)))
    assert one == pytest.approx(layer_flops(lc, 2 * 16, 16), rel=REL)
    r = router_flops(256, 64, 4, 10)
    assert r == 10 * 2 * (256 * 64 + 64 * 4)

"""Radial Network: identity routing vs transformers, the causal budget, training == serving, causality.

Every routed test runs where the budget binds (visits are dropped), not only where everything runs.
"""
import numpy as np
import pytest
import torch
import jax
import jax.numpy as jnp
from transformers import AutoModelForCausalLM, ViTForImageClassification

import radial_jax as rj
from radial_jax.models import attention_blocks
from radial_jax.models.layer import TransformerLayer
from radial_jax.radial import RadialConfig, RadialModel, decode_tokens
from radial_jax.radial import dispatch as dsp
from radial_jax.radial.router import with_keep_offset

TOL = 1e-5
SMALL = rj.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
                     max_position_embeddings=32)


@pytest.fixture(scope="module")
def small():
    return rj.build(SMALL, seed=3)


def left_padded(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids, mask = np.ones((len(lengths), t), np.int64), np.zeros((len(lengths), t), np.int64)
    for r, n in enumerate(lengths):
        ids[r, t - n:] = rng.integers(3, vocab, n)
        mask[r, t - n:] = 1
    return ids, mask


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_projection", "untied_no_final_ln_gelu"])
def test_identity_routing_reproduces_opt(tiny_opt_variants, variant):
    path = tiny_opt_variants[variant]
    model = rj.load(path)
    rm = RadialModel.from_sequential(model, mode="ordered", routing="identity", capacity_factor=1.0)
    ids, mask = left_padded(model.config.vocab_size, [9, 5, 2])
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(path).eval()(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = rm.forward(ids, mask)
    got, valid = np.asarray(out.logits), mask.astype(bool)
    np.testing.assert_allclose(got[valid], np.asarray(model(ids, mask))[valid], atol=TOL, rtol=0)
    np.testing.assert_allclose(got[valid], hf[valid], atol=TOL, rtol=0)
    depth = np.asarray(out.metrics.depth)
    assert (depth[valid] == model.config.num_layers).all() and (depth[~valid] == 0).all()
    assert int(out.metrics.dropped.sum()) == 0


def test_identity_routing_reproduces_vit(tiny_vit_cls_dir):
    model = rj.load(tiny_vit_cls_dir)
    rm = RadialModel.from_sequential(model, mode="ordered", routing="identity")
    pixels = np.random.default_rng(2).normal(size=(2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        hf = ViTForImageClassification.from_pretrained(tiny_vit_cls_dir).eval()(
            pixel_values=torch.tensor(pixels)).logits.numpy()
    got = np.asarray(rm(pixels))
    np.testing.assert_allclose(got, np.asarray(model(pixels)), atol=TOL, rtol=0)
    np.testing.assert_allclose(got, hf, atol=TOL, rtol=0)


def _head_of_embeddings(model, ids):
    """Independent numpy computation: OPT head applied straight to the input embeddings (0 layers)."""
    p = jax.tree_util.tree_map(np.asarray, model.params)
    pos = np.arange(ids.shape[1]) + 2
    x = p["embed_tokens"]["embedding"][ids] + p["embed_positions"]["embedding"][pos][None]
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    x = (x - mu) / np.sqrt(var + 1e-5) * p["final_norm"]["scale"] + p["final_norm"]["bias"]
    return x @ p["embed_tokens"]["embedding"].T


def test_tokens_over_budget_pass_unchanged(small):
    """Ordered identity routing with capacity 0.5: token p goes through the layers iff fewer than
    floor(0.5 (p + 1)) + 1 earlier tokens did (the same at every layer). The admitted tokens equal the
    sequential model that sees only them (a cached call whose mask holds just them); the others are
    never processed nor written (mask policy) and equal the head of their embeddings."""
    ids = np.random.default_rng(1).integers(3, 64, (2, 8))
    rm = RadialModel.from_sequential(small, mode="ordered", routing="identity", capacity_factor=0.5)
    out = rm.forward(ids)
    admitted, count = [], 0
    for p in range(8):
        ok = count < int(np.floor(0.5 * (p + 1))) + 1
        admitted.append(ok)
        count += ok
    admitted = np.asarray(admitted)
    assert 0 < admitted.sum() < 8
    L = SMALL.num_layers
    np.testing.assert_array_equal(np.asarray(out.metrics.depth), np.broadcast_to(L * admitted, (2, 8)))
    assert int(out.metrics.dropped.sum()) == 2 * (~admitted).sum() * L
    slots = jnp.broadcast_to(jnp.arange(8), (2, 8))
    mask = jnp.broadcast_to(jnp.asarray(admitted), (2, 8))
    ref = small.module.apply({"params": small.params}, jnp.asarray(ids), mask, positions_bt=slots,
                             cache=small.module.init_cache(2, 8)).logits
    got = np.asarray(out.logits)
    np.testing.assert_allclose(got[:, admitted], np.asarray(ref)[:, admitted], atol=TOL, rtol=0)
    np.testing.assert_allclose(got[:, ~admitted], _head_of_embeddings(small, ids)[:, ~admitted], atol=1e-4, rtol=0)


def _reference_oracle(model, ids, threshold):
    """Layer-level §3 oracle written plainly: each layer on the full current stream (dense
    self-attention), the update kept per token iff |F| / |x + F| >= threshold."""
    p = model.params
    lc = model.config.layer_config()
    t = ids.shape[1]
    x = p["embed_tokens"]["embedding"][ids] + p["embed_positions"]["embedding"][np.arange(t) + 2][None]
    mask = jnp.asarray(np.tril(np.ones((t, t), bool)))[None]
    depth = np.zeros(ids.shape, int)
    for l in range(model.config.num_layers):
        pl = jax.tree_util.tree_map(lambda a: a[l], p["layers"])
        y, _ = TransformerLayer(lc).apply({"params": pl}, x, mask)
        f = np.asarray(y) - np.asarray(x)
        ratio = np.linalg.norm(f, axis=-1) / np.linalg.norm(np.asarray(x) + f, axis=-1)
        keep = ratio >= threshold
        depth += keep
        x = np.where(keep[..., None], np.asarray(y), np.asarray(x))
    ln = p["final_norm"]
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * ln["scale"] + ln["bias"]
    return x @ np.asarray(p["embed_tokens"]["embedding"]).T, depth


def test_oracle_router_matches_threshold_rule(small):
    ids = np.random.default_rng(4).integers(3, 64, (2, 10))
    rm = RadialModel.from_sequential(small, mode="ordered", routing="oracle", cache_policy="propagate")
    ratios = np.asarray(rm.forward(ids, threshold=0.0).router.ratio)
    threshold = float(np.median(ratios))  # about half of the visits are dropped
    out = rm.forward(ids, threshold=threshold)
    ref_logits, ref_depth = _reference_oracle(small, ids, threshold)
    np.testing.assert_array_equal(np.asarray(out.metrics.depth), ref_depth)
    assert 0 < ref_depth.sum() < ids.size * 3
    np.testing.assert_allclose(np.asarray(out.logits), ref_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(rm.forward(ids, threshold=0.0).logits), np.asarray(small(ids)),
                               atol=TOL, rtol=0)
    assert int(rm.forward(ids, threshold=2.0).metrics.depth.sum()) == 0


# Capacities that bind: ordered 0.5 of the tokens per layer; radial (S = 5, L = 3) phi = 1.0 * 3 / 15 = 0.2.
# Two static sizes keep compilation short; the bucket sizes themselves are tested in test_flops.py.
ROUTED = [
    dict(mode="ordered", cache_policy="mask", capacity_factor=0.5, prefill_buckets=2),
    dict(mode="ordered", cache_policy="propagate", capacity_factor=0.5, prefill_buckets=2),
    dict(mode="radial", cache_policy="mask", max_steps=5, capacity_factor=1.0, prefill_buckets=2),
    dict(mode="radial", cache_policy="propagate", max_steps=5, capacity_factor=1.0, router_last_layer=True,
         prefill_buckets=2),
]
ROUTED_IDS = [f"{kw['mode']}-{kw['cache_policy']}" for kw in ROUTED]


@pytest.mark.parametrize("kw", ROUTED, ids=ROUTED_IDS)
def test_parallel_forward_equals_decoding_when_the_budget_binds(small, kw):
    rm = RadialModel.from_sequential(small, router_init_scale=1.5, seed=1, **kw)
    ids = np.random.default_rng(5).integers(3, 64, (3, 12))
    par = rm.forward(ids)
    logits, choice, gate, _ = decode_tokens(rm, ids, prompt_len=3)  # the inference layout, as generate runs
    np.testing.assert_array_equal(np.asarray(choice), np.asarray(par.router.choice))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(par.logits), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(gate), np.asarray(par.router.gate), atol=TOL, rtol=0)
    # the stacked layout's decode step (rm.decode_step) on the stacked prefill's cache: the same next token
    slots = np.broadcast_to(np.arange(3, dtype=np.int32), (3, 3))
    cache = rm.forward(ids[:, :3], positions_bt=slots, max_len=12, compute_logits=False).cache
    step = rm.decode_step(ids[:, 3], np.full(3, 3), cache)
    np.testing.assert_array_equal(np.asarray(step.router.choice[:, :, 0]), np.asarray(par.router.choice[:, :, 3]))
    np.testing.assert_allclose(np.asarray(step.logits[:, 0]), np.asarray(par.logits[:, 3]), atol=TOL, rtol=0)
    ch = np.asarray(par.router.choice)
    L = SMALL.num_layers
    assert int(par.metrics.dropped.sum()) > 0, "the budget must bind"
    assert ((ch >= 0) & (ch < L)).any() and (ch >= L).any(), "routes must mix layers and skips/exits"
    if kw["mode"] == "radial":  # some token visits a layer twice (reuse)
        assign = np.asarray(par.router.assign)
        assert (assign.sum(0) >= 2).any()


@pytest.mark.parametrize("kw", ROUTED[::2], ids=ROUTED_IDS[::2])
def test_routed_attention_in_tiles_computes_what_it_computes_whole(small, kw, monkeypatch):
    """The CPU's ``"tiled"`` attention (here in blocks of 2 queries) in a routed forward where the budget binds;
    radial mode attends with each token's own K/V (``self_kv``)."""
    rm = RadialModel.from_sequential(small, router_init_scale=1.5, seed=1, **kw)
    ids = np.random.default_rng(5).integers(3, 64, (3, 12))
    whole = rm.forward(ids)
    traced = []  # per tiled call: did it attend with self_kv
    tiled = attention_blocks.tiled
    monkeypatch.setattr(attention_blocks, "BLOCK", 2)
    monkeypatch.setattr(attention_blocks, "tiled", lambda *a: traced.append(a[6] is not None) or tiled(*a))
    jax.clear_caches()  # the forward traced with the default block size must not be reused
    try:
        tiles = rm.forward(ids)
    finally:
        jax.clear_caches()
    assert traced and all(traced) == (kw["mode"] == "radial")
    assert int(tiles.metrics.dropped.sum()) > 0, "the budget must bind"
    np.testing.assert_array_equal(np.asarray(tiles.router.choice), np.asarray(whole.router.choice))
    np.testing.assert_allclose(np.asarray(tiles.logits), np.asarray(whole.logits), atol=TOL, rtol=0)


@pytest.mark.parametrize("kw", ROUTED[::2], ids=ROUTED_IDS[::2])
def test_routed_attention_to_the_written_keys_computes_what_it_computes_whole(small, kw, monkeypatch):
    """Policy *mask*: a visit attends only to its layer's written keys (``"compact"``, chunks of 2), where the
    budget binds; in the inference layout (flat visits: padded queries) and the stacked one."""
    rm = RadialModel.from_sequential(small, router_init_scale=1.5, seed=1, **kw)
    ids = np.random.default_rng(5).integers(3, 64, (3, 12))
    layouts = {"stacked": rm, "per_layer": rm.with_layout("per_layer")}
    whole = {name: m.forward(ids) for name, m in layouts.items()}  # 12 slots: one chunk, not compacted
    traced = []
    compact = attention_blocks.compact
    monkeypatch.setattr(attention_blocks, "COMPACT_CHUNK", 2)
    monkeypatch.setattr(attention_blocks, "compact", lambda *a: traced.append(a[6] is not None) or compact(*a))
    jax.clear_caches()
    try:
        for name, m in layouts.items():
            got = m.forward(ids)
            assert int(got.metrics.dropped.sum()) > 0, "the budget must bind"
            np.testing.assert_array_equal(np.asarray(got.router.choice), np.asarray(whole[name].router.choice))
            np.testing.assert_allclose(np.asarray(got.logits), np.asarray(whole[name].logits), atol=TOL, rtol=0)
    finally:
        jax.clear_caches()
    assert traced and all(traced) == (kw["mode"] == "radial")


@pytest.mark.parametrize("kw", ROUTED, ids=ROUTED_IDS)
def test_the_inference_layout_computes_what_the_stacked_layout_does_when_the_budget_binds(small, kw):
    """Per-layer weights and caches (``with_layout("per_layer")``: each layer read in place at its own
    size, exits in chunks) == the stacked layout (grouped steps or a loop over the stack)."""
    rm = RadialModel.from_sequential(small, router_init_scale=1.5, seed=1, **{**kw, "prefill_buckets": 4})
    exits_many = kw["mode"] == "radial" and kw["cache_policy"] == "propagate"
    if exits_many:  # more exits than one chunk of 3 (12 tokens / 4 buckets) at some step
        rm = rm.replace(params={**rm.params, "router": with_keep_offset(rm.params["router"], -2.0)})
    ids = np.random.default_rng(5).integers(3, 64, (3, 12))
    want, got = rm.forward(ids), rm.with_layout("per_layer").forward(ids)
    np.testing.assert_array_equal(np.asarray(got.router.choice), np.asarray(want.router.choice))
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), atol=TOL, rtol=0)
    for a, b in zip(jax.tree_util.tree_leaves(got.cache), jax.tree_util.tree_leaves(want.cache)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=0)
    assert int(want.metrics.dropped.sum()) > 0, "the budget must bind"
    if exits_many:
        assert int(np.asarray(want.router.exited).sum(-1).max()) > 3


def _early(rm, ids, n_early):
    """Logits and routes of the first ``n_early`` tokens, in the parallel forward and in decoding."""
    par = rm.forward(ids)
    dec_logits, dec_choice, _, _ = decode_tokens(rm, ids, prompt_len=2)
    return (np.asarray(par.logits[:, :n_early]), np.asarray(par.router.choice[:, :, :n_early]),
            np.asarray(dec_logits[:, :n_early]), np.asarray(dec_choice[:, :, :n_early]))


def _causal_pair():
    ids = np.random.default_rng(6).integers(3, 40, (2, 10))
    ids2 = ids.copy()
    ids2[:, 6:] = np.random.default_rng(7).integers(40, 64, (2, 4))  # later tokens changed
    return ids, ids2


@pytest.mark.parametrize("kw", [ROUTED[0], ROUTED[3]], ids=[ROUTED_IDS[0], ROUTED_IDS[3]])  # the gradient test: 1, 2
def test_causality_by_value_in_forward_and_decoding_when_the_budget_binds(small, kw):
    rm = RadialModel.from_sequential(small, router_init_scale=1.5, seed=1, **kw)
    ids, ids2 = _causal_pair()
    a, b = _early(rm, ids, 6), _early(rm, ids2, 6)
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, atol=1e-6, rtol=0)
    assert int(rm.forward(ids).metrics.dropped.sum()) > 0


@pytest.mark.parametrize("kw", [ROUTED[1], ROUTED[2]], ids=[ROUTED_IDS[1], ROUTED_IDS[2]])
def test_causality_by_gradient_when_the_budget_binds(small, kw):
    rm = RadialModel.from_sequential(small, router_init_scale=1.5, seed=1, **kw)
    ids, ids2 = _causal_pair()

    def early_loss(params, tokens):
        out = rm.module.apply({"params": params}, tokens)
        return jnp.sum(out.logits[:, :6] ** 2)

    grad = jax.jit(jax.grad(early_loss))
    ga, gb = grad(rm.params, jnp.asarray(ids)), grad(rm.params, jnp.asarray(ids2))
    # Early outputs are the same function of the parameters whatever the later tokens are.
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-6,
                                                                   rtol=1e-5), ga, gb)
    pos_grad = np.abs(np.asarray(gb["embed_positions"]["embedding"]))
    assert pos_grad[2 + 6:].max() == 0 and pos_grad[2:2 + 6].max() > 0
    assert np.abs(np.asarray(gb["router"]["fc2"]["kernel"])).max() > 0


def test_grad_reaches_router_and_pool(small):
    rm = RadialModel.from_sequential(small, mode="radial", max_steps=3, capacity_factor=1.0, prefill_buckets=1)
    ids = jnp.asarray(np.random.default_rng(8).integers(3, 64, (2, 6)))

    def loss(params):
        return jnp.mean(rm.module.apply({"params": params}, ids).logits ** 2)

    g = jax.jit(jax.grad(loss))(rm.params)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree_util.tree_leaves(g))
    assert np.abs(np.asarray(g["router"]["fc2"]["kernel"])).max() > 0
    assert np.abs(np.asarray(g["layers"]["fc1"]["kernel"])).max() > 0


def test_loads_respect_the_budget_and_metrics_recount_the_routes(small):
    ids = np.random.default_rng(9).integers(3, 64, (2, 12))
    rm = RadialModel.from_sequential(small, mode="radial", max_steps=4, capacity_factor=1.0, router_init_scale=1.5)
    out = rm.forward(ids)
    assign = np.asarray(out.router.assign)  # [S, b, t, L]
    phi = rm.radial.budget_fraction(3)
    for s in range(4):
        for b in range(2):
            for l in range(3):
                counts = np.cumsum(assign[s, b, :, l])
                budgets = np.floor(np.float32(phi) * (np.arange(12) + 1)) + 1
                assert (counts <= budgets).all()
    np.testing.assert_array_equal(np.asarray(out.metrics.depth), assign.sum((0, 3)))
    np.testing.assert_array_equal(np.asarray(out.metrics.layer_load), assign.sum((0, 1, 2)))
    np.testing.assert_array_equal(np.asarray(out.metrics.step_layer_load), assign.sum((1, 2)))
    exited = np.asarray(out.router.exited)
    np.testing.assert_array_equal(np.asarray(out.metrics.exits), exited.sum((1, 2)))
    assert int(out.metrics.dropped.sum()) > 0 and exited.any()


def test_expert_choice_is_a_training_option_that_exits_and_reports_drops(small):
    ids = np.random.default_rng(10).integers(3, 64, (2, 12))
    rm = RadialModel.from_sequential(small, mode="radial", capacity_factor=0.5, dispatch="expert",
                                       router_init_scale=1.5, seed=4)
    out = rm.forward(ids)
    cap = int(out.metrics.capacity)
    assign = np.asarray(out.router.assign)
    assert assign.sum(2).max() <= cap  # per step, row and layer: the top C_max
    assert int(out.metrics.dropped.sum()) > 0 and np.asarray(out.router.exited).any()
    with pytest.raises(ValueError, match="training-only"):
        rm.decode_step(ids[:, 0], np.zeros(2, np.int32), rm.init_cache(2, 4))


def test_bad_input(small):
    with pytest.raises(ValueError, match="capacity_factor"):
        RadialModel.from_sequential(small, capacity_factor=0)
    with pytest.raises(ValueError, match="capacity_factor"):
        RadialConfig(capacity_factor=-1.0)
    with pytest.raises(ValueError, match="capacity_slack"):
        RadialConfig(capacity_slack=-1)
    with pytest.raises(ValueError, match="max_steps"):
        RadialModel.from_sequential(small, mode="radial", max_steps=0)
    with pytest.raises(ValueError, match="max_steps"):
        RadialModel.from_sequential(small, mode="ordered", max_steps=2)
    with pytest.raises(ValueError, match="mode"):
        RadialConfig(mode="sideways")
    with pytest.raises(ValueError, match="empty"):
        RadialConfig().steps(0)

    class Bare:
        config, params, dtype = SMALL, {"embed_tokens": {}}, jnp.float32
    with pytest.raises(ValueError, match="layers"):
        RadialModel.from_sequential(Bare())
    Bare.params = {"layers": {}}
    with pytest.raises(ValueError, match="empty"):
        RadialModel.from_sequential(Bare())
    with pytest.raises(ValueError, match="rj.Model"):
        RadialModel.from_sequential(object())
    with pytest.raises(ValueError, match="oracle"):
        RadialModel.from_sequential(small, mode="radial", routing="oracle")
    rm = RadialModel.from_sequential(small)
    with pytest.raises(ValueError, match="attention_mask"):
        rm.forward(np.ones((2, 4), np.int32), np.ones((2, 3), np.int32))
    with pytest.raises(ValueError, match="token ids"):
        rm.forward(np.full((1, 4), 64))


def test_budget_helper_equals_config_capacity():
    """``C_max`` (static, Python) is the budget of the last position (traced, float32) for many phi."""
    for cf in (0.1, 0.3, 1 / 3, 0.5, 0.7, 1.0):
        rc = RadialConfig(capacity_factor=cf)
        for t in (1, 7, 64, 1000):
            last = dsp.budget(jnp.asarray([[t - 1]]), jnp.asarray([[True]]), rc.budget_fraction(4),
                              rc.capacity_slack)
            assert rc.max_capacity(4, t) == min(t, int(last[0, 0]))


@pytest.mark.parametrize("policy", ["mask", "propagate"])
def test_grouped_step_equals_the_loop_over_layers_when_the_budget_binds(small, policy):
    """``run_layers_grouped`` (balanced loads, one batched computation) == ``run_layer`` for each layer in turn."""
    from radial_jax.models.kv_cache import KVCache
    from radial_jax.radial.step_state import Plan, Tokens
    from radial_jax.radial.visit import run_layer, run_layers_grouped
    rm = RadialModel.from_sequential(small, mode="radial", cache_policy=policy, capacity_factor=0.5)
    config, L, G, N = rm.config, SMALL.num_hidden_layers, 2, 12
    lc = config.layer_config()
    plan = Plan(rc=rm.radial, lc=lc, dtype=jnp.float32, num_layers=L, causal=True, decoding=False,
                sizes=(0, 4, 8, 12), exit_chunk=12, phi=1.0, hidden_size=config.hidden_size,
                flat_sizes=(0, 8, 16, 24))
    rng = np.random.default_rng(0)
    admitted_kgn = jnp.asarray(rng.random((L, G, N)) < 0.4)  # uneven loads: sizes 4 and 8 both run
    gate_kgn = jnp.asarray(rng.uniform(0.5, 1.5, (L, G, N)), jnp.float32)
    slots = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (G, N))
    tok = Tokens(rows=jnp.broadcast_to(jnp.arange(G, dtype=jnp.int32)[:, None], (G, N)), slots=slots,
                 positions=slots, valid=jnp.ones((G, N), bool), budget=jnp.full((G, N), 10 ** 6, jnp.int32))
    x = jnp.asarray(rng.normal(size=(G, N, config.hidden_size)), jnp.float32)
    kv = KVCache.create(L, G, N, lc.kv_heads, lc.head_size)
    meta = config.layer_meta()
    pool = rm.params["layers"]
    state = (x, kv, jnp.zeros((G, N), jnp.float32))
    want = state
    for l in range(L):  # the plain loop: each layer at its own size, in turn
        params_l = jax.tree_util.tree_map(lambda a: a[l], pool)
        meta_l = {k: jnp.asarray(v[l]) for k, v in meta.items()}
        want, _ = run_layer(plan, jnp.int32(l), params_l, meta_l, x, admitted_kgn[l], gate_kgn[l], tok, jnp.int32(1),
                            want)
    got, size = run_layers_grouped(plan, pool, meta, x, admitted_kgn, gate_kgn, tok, jnp.int32(1), state)
    assert int(size) == 8  # the largest load of any layer, rounded up to a static size
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=TOL)

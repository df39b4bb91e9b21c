"""Radial Network: identity routing vs the sequential model and transformers, dispatch, cache, decoding."""
import numpy as np
import pytest
import torch
import jax
import jax.numpy as jnp
from transformers import AutoModelForCausalLM, ViTForImageClassification

import radial_jax as rj
from radial_jax.models.layer import TransformerLayer
from radial_jax.radial import RadialConfig, RadialNetwork, decode_tokens, generate_greedy

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
    rm = RadialNetwork.from_sequential(model, mode="ordered", routing="identity", capacity_factor=1.0)
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
    rm = RadialNetwork.from_sequential(model, mode="ordered", routing="identity")
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
    x = (x - mu) / np.sqrt(var + 1e-5) * p["final_layer_norm"]["scale"] + p["final_layer_norm"]["bias"]
    return x @ p["embed_tokens"]["embedding"].T


def test_tokens_over_capacity_pass_unchanged(small):
    """Ordered identity routing at capacity C < T: the first C tokens of each row run every layer,
    the rest are never processed and never written (mask policy), so the first C positions equal the
    sequential model on the truncated sequence and the others equal the head of their embeddings."""
    ids = np.random.default_rng(1).integers(3, 64, (2, 8))
    rm = RadialNetwork.from_sequential(small, mode="ordered", routing="identity", capacity_factor=0.5)
    out = rm.forward(ids)
    c = 4
    assert int(out.metrics.capacity) == c
    got = np.asarray(out.logits)
    np.testing.assert_allclose(got[:, :c], np.asarray(small(ids[:, :c])), atol=TOL, rtol=0)
    np.testing.assert_allclose(got[:, c:], _head_of_embeddings(small, ids)[:, c:], atol=1e-4, rtol=0)
    assert (np.asarray(out.metrics.depth)[:, c:] == 0).all()
    assert int(out.metrics.dropped.sum()) == 2 * (8 - c) * 3


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
    ln = p["final_layer_norm"]
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * ln["scale"] + ln["bias"]
    return x @ np.asarray(p["embed_tokens"]["embedding"]).T, depth


def test_oracle_router_matches_threshold_rule(small):
    ids = np.random.default_rng(4).integers(3, 64, (2, 10))
    rm = RadialNetwork.from_sequential(small, mode="ordered", routing="oracle", cache_policy="propagate")
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


ROUTED = [
    dict(mode="ordered", cache_policy="mask"),
    dict(mode="ordered", cache_policy="propagate"),
    dict(mode="radial", cache_policy="mask", max_steps=5),
    dict(mode="radial", cache_policy="propagate", max_steps=5, router_last_layer=True),
]


@pytest.mark.parametrize("kw", ROUTED, ids=lambda kw: f"{kw['mode']}-{kw['cache_policy']}")
def test_parallel_forward_equals_incremental_decoding(small, kw):
    # Capacity large enough that nothing is dropped in either path (capacity is per sequence in the
    # parallel forward and across the batch when decoding).
    cf = 1.0 if kw["mode"] == "ordered" else 5.0
    rm = RadialNetwork.from_sequential(small, capacity_factor=cf, router_init_scale=1.5, seed=1, **kw)
    ids = np.random.default_rng(5).integers(3, 64, (3, 10))
    par = rm.forward(ids)
    logits, choice, gate, _ = decode_tokens(rm, ids, prompt_len=3)
    np.testing.assert_array_equal(np.asarray(choice), np.asarray(par.router.choice))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(par.logits), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(gate), np.asarray(par.router.gate), atol=TOL, rtol=0)
    ch = np.asarray(par.router.choice)
    L = 3
    assert int(par.metrics.dropped.sum()) == 0
    assert ((ch >= 0) & (ch < L)).any() and (ch == L).any(), "routes must mix layers and skips/exits"
    if kw["mode"] == "radial":  # some token visits a layer twice (reuse)
        visits = np.stack([(ch == l).sum(0) for l in range(L)])
        assert (visits >= 2).any()


def test_causality_by_value_and_gradient(small):
    rm = RadialNetwork.from_sequential(small, mode="radial", max_steps=4, capacity_factor=2.0,
                                       router_init_scale=1.5, cache_policy="propagate")
    ids = np.random.default_rng(6).integers(3, 40, (2, 8))
    ids2 = ids.copy()
    ids2[:, 5:] = np.random.default_rng(7).integers(40, 64, (2, 3))  # later tokens changed
    a, b = rm.forward(ids), rm.forward(ids2)
    np.testing.assert_array_equal(np.asarray(a.logits[:, :5]), np.asarray(b.logits[:, :5]))
    np.testing.assert_array_equal(np.asarray(a.router.choice[:, :, :5]), np.asarray(b.router.choice[:, :, :5]))

    def early_loss(params, tokens):
        out = rm.module.apply({"params": params}, tokens)
        return jnp.sum(out.logits[:, :5] ** 2)

    grad = jax.jit(jax.grad(early_loss))
    ga, gb = grad(rm.params, jnp.asarray(ids)), grad(rm.params, jnp.asarray(ids2))
    # Early outputs are the same function of the parameters whatever the later tokens are.
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-6,
                                                                   rtol=1e-5), ga, gb)
    pos_grad = np.abs(np.asarray(gb["embed_positions"]["embedding"]))
    assert pos_grad[2 + 5:].max() == 0 and pos_grad[2:2 + 5].max() > 0
    assert np.abs(np.asarray(gb["router"]["fc2"]["kernel"])).max() > 0


def test_grad_reaches_router_and_pool(small):
    rm = RadialNetwork.from_sequential(small, mode="radial", max_steps=3, capacity_factor=1.0)
    ids = jnp.asarray(np.random.default_rng(8).integers(3, 64, (2, 6)))

    def loss(params):
        return jnp.mean(rm.module.apply({"params": params}, ids).logits ** 2)

    g = jax.jit(jax.grad(loss))(rm.params)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree_util.tree_leaves(g))
    assert np.abs(np.asarray(g["router"]["fc2"]["kernel"])).max() > 0
    assert np.abs(np.asarray(g["layers"]["fc1"]["kernel"])).max() > 0
    # vmap over a batch of inputs works too
    vm = jax.vmap(lambda i: rm.module.apply({"params": rm.params}, i[None]).logits[0])(ids)
    np.testing.assert_allclose(np.asarray(vm), np.asarray(rm(ids)), atol=TOL, rtol=0)


def test_radial_capacity_load_and_expert_choice(small):
    ids = np.random.default_rng(9).integers(3, 64, (2, 12))
    for dispatch in ("token", "expert"):
        rm = RadialNetwork.from_sequential(small, mode="radial", capacity_factor=0.5, dispatch=dispatch,
                                           router_init_scale=1.5)
        out = rm.forward(ids)
        cap = int(out.metrics.capacity)
        assert cap == 2  # ceil(0.5 * 12 / 3)
        assign = np.asarray(out.router.assign)  # [S, b, t, L]
        assert assign.sum(2).max() <= cap  # per step, row and layer
        np.testing.assert_array_equal(np.asarray(out.metrics.depth), assign.sum((0, 3)))
        np.testing.assert_array_equal(np.asarray(out.metrics.layer_load), assign.sum((0, 1, 2)))
        assert np.asarray(out.metrics.depth).sum() <= 0.5 * ids.size * 3
    with pytest.raises(ValueError, match="causal"):
        rm.decode_step(ids[:, 0], np.zeros(2, np.int32), rm.init_cache(2, 4))


def test_generate_greedy_identity_matches_sequential(small):
    rm = RadialNetwork.from_sequential(small, mode="ordered", routing="identity")
    ids = np.random.default_rng(10).integers(3, 64, (2, 4))
    toks, depth = generate_greedy(rm, ids, 5)
    ref = small.generate(ids, max_new_tokens=5)
    ref = np.asarray(getattr(ref, "sequences", ref))[:, -5:]
    np.testing.assert_array_equal(np.asarray(toks), ref)
    assert (np.asarray(depth) == 3).all()


def test_bad_input(small):
    with pytest.raises(ValueError, match="capacity_factor"):
        RadialNetwork.from_sequential(small, capacity_factor=0)
    with pytest.raises(ValueError, match="capacity_factor"):
        RadialConfig(capacity_factor=-1.0)
    with pytest.raises(ValueError, match="max_steps"):
        RadialNetwork.from_sequential(small, mode="radial", max_steps=0)
    with pytest.raises(ValueError, match="max_steps"):
        RadialNetwork.from_sequential(small, mode="ordered", max_steps=2)
    with pytest.raises(ValueError, match="mode"):
        RadialConfig(mode="sideways")
    with pytest.raises(ValueError, match="empty"):
        RadialConfig().steps(0)

    class Bare:
        config, params, dtype = SMALL, {"embed_tokens": {}}, jnp.float32
    with pytest.raises(ValueError, match="layers"):
        RadialNetwork.from_sequential(Bare())
    Bare.params = {"layers": {}}
    with pytest.raises(ValueError, match="empty"):
        RadialNetwork.from_sequential(Bare())
    with pytest.raises(ValueError, match="OPT or ViT"):
        RadialNetwork.from_sequential(object())
    with pytest.raises(ValueError, match="oracle"):
        RadialNetwork.from_sequential(small, mode="radial", routing="oracle")

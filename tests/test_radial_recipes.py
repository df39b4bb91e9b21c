"""Recipes for routes that reuse and exit (issue 26): a minimum exit step, Gumbel exploration, mixture
routing, and joint training with the compute as a constraint."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import radial_jax as rj
from radial_jax.models.stack import layer_forward, meta_at, pool_layer, unstack_pool
from radial_jax.radial import RadialModel, decode_tokens
from radial_jax.radial.router import Router, exit_index
from radial_jax.radial.routing import Explore
from radial_jax.training.joint import JointConfig

SMALL = rj.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
                     max_position_embeddings=32)
L = SMALL.num_layers


@pytest.fixture(scope="module")
def small():
    return rj.build(SMALL, seed=3)


def _exit_everywhere(rm):
    """Router parameters whose largest logit is *exit* at every step (a huge step bias)."""
    router = dict(rm.params["router"])
    router["step_bias"] = jnp.asarray(router["step_bias"]).at[:, exit_index(L)].set(1e4)
    return {**rm.params, "router": router}


def test_no_token_exits_before_min_exit_step_and_decoding_agrees(small):
    ids = np.random.default_rng(1).integers(3, 64, (2, 9))
    for min_exit in (0, 1, 2):
        rm = RadialModel.from_sequential(small, mode="radial", capacity_factor=L, min_exit_step=min_exit)
        rm = rm.replace(params=_exit_everywhere(rm))
        out = rm.forward(ids)
        exited = np.asarray(out.router.exited)  # [S, b, t]
        assert not exited[:min_exit].any() and exited[min_exit].all()  # the first allowed step: everyone
        choice = np.asarray(out.router.choice)[:min_exit]
        assert ((choice >= 0) & (choice != exit_index(L))).all()  # earlier steps: a layer or skip, never exit
        probs = np.asarray(out.router.probs)[:min_exit, ..., exit_index(L)]
        assert (probs == 0).all()  # the loss terms see the rule too
        if min_exit == 2:  # decoding applies the same rule (routing.decide); one compiled decode checks it
            logits, _, _, _ = decode_tokens(rm, ids, prompt_len=3)
            np.testing.assert_allclose(np.asarray(logits), np.asarray(out.logits), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="radial"):
        RadialModel.from_sequential(small, mode="ordered", min_exit_step=1)


def test_gumbel_exploration_samples_the_routers_softmax_and_scale_zero_is_the_argmax(small):
    rm = RadialModel.from_sequential(small, mode="radial", capacity_factor=L, router_init_scale=1.0, seed=4)
    ids = jnp.asarray(np.random.default_rng(2).integers(3, 64, (8, 32)))
    apply = jax.jit(lambda key, scale: rm.module.apply({"params": rm.params}, ids,
                                                       explore=Explore(key, jnp.float32(scale))))
    clean = rm.forward(ids)
    np.testing.assert_array_equal(np.asarray(apply(jax.random.key(0), 0.0).router.choice),
                                  np.asarray(clean.router.choice))
    p0 = np.asarray(clean.router.probs)[0].reshape(-1, L + 2)  # step 0: every token eligible, clean probs
    assert p0.max(-1).mean() < 0.8, "the router must be uncertain for the test to mean something"
    counts = np.zeros(L + 2)
    draws = 24
    for k in range(draws):
        out = apply(jax.random.key(k), 1.0)
        np.testing.assert_allclose(np.asarray(out.router.probs)[0].reshape(-1, L + 2), p0, atol=1e-6)
        counts += np.bincount(np.asarray(out.router.choice)[0].ravel(), minlength=L + 2)
    expected, var = draws * p0.sum(0), draws * (p0 * (1 - p0)).sum(0)
    assert (np.abs(counts - expected) <= 4 * np.sqrt(var) + 1).all(), (counts, expected)  # Gumbel-max: a sample
    per_layer = {**rm.params, "layers": unstack_pool(rm.params["layers"])}  # the inference layout
    with pytest.raises(ValueError, match="training option"):
        rm.module.apply({"params": per_layer}, ids, explore=Explore(jax.random.key(0), jnp.float32(1.0)))


def test_mixture_step_is_the_probability_weighted_sum_of_every_layers_update(small):
    """One step over a pool of three: ``x + sum_l p_l (layer_l(x) - x)``, computed here layer by layer."""
    rm = RadialModel.from_sequential(small, mode="radial", max_steps=1, capacity_factor=1.0, routing="mixture",
                                       router_init_scale=0.5, min_exit_step=1, seed=2)
    ids = jnp.asarray(np.random.default_rng(3).integers(3, 64, (2, 7)))
    out = rm.forward(ids)
    pos = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), ids.shape)
    embed = rm.module.apply({"params": rm.params}, ids, pos, method=lambda m, i, p: m.base.embed(i, p))
    rc = rm.radial
    router = Router(L, 1, rc.router_hidden, rc.router_last_layer, rc.router_init_scale)
    logits = router.apply({"params": rm.params["router"]}, embed, jnp.int32(0), jnp.full(ids.shape, L, jnp.int32))
    probs = jax.nn.softmax(logits.at[..., exit_index(L)].set(-jnp.inf), -1)  # min_exit_step=1: no exit at step 0
    assert float(probs[..., :L].max()) < 0.99 and float(probs[..., :L].min()) > 1e-4  # every layer counts
    pool, meta = rm.params["layers"], SMALL.layer_meta()
    x = embed
    for l in range(L):
        y, _ = layer_forward(SMALL.layer_config(), jnp.float32, pool_layer(pool, l), meta_at(meta, l), embed, pos,
                             pos, jnp.ones(ids.shape, bool), causal=True)
        x = x + probs[..., l:l + 1] * (y - embed)
    logits = rm.module.apply({"params": rm.params}, x, method=lambda m, h: m.base.head(h).logits)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(logits), atol=2e-5, rtol=0)
    assert (np.asarray(out.metrics.depth) == L).all()  # every layer ran for every token
    with pytest.raises(ValueError, match="radial"):
        RadialModel.from_sequential(small, mode="ordered", routing="mixture")


def test_joint_schedule_mixture_then_hard_routes_and_the_multiplier_follows_the_visits():
    cfg = JointConfig(mode="radial", route_start=10, mixture_steps=5, visit_target=2.0, dual_lr=0.5,
                      explore_start=1.0, explore_end=0.0, capacity_start=4.0, capacity_end=4.0)
    assert [cfg.stage(s, 4.0)[0] for s in (9, 10, 14, 15)] == ["identity", "mixture", "mixture", "learned"]
    assert [cfg.explore_scale(s, 25) for s in (9, 14, 15, 24)] == [0.0, 0.0, 1.0, 0.0]
    assert cfg.explore_scale(20, 25) == pytest.approx(1 - 5 / 9)  # linear from 1 at 15 to 0 at 24
    assert cfg.dual_update(0.1, visits=3.0, num_layers=2) == pytest.approx(0.1 + 0.5 * 1.0 / 2)  # too many
    assert cfg.dual_update(0.1, visits=1.0, num_layers=2) == 0.0  # too few: lowered, never below 0
    assert JointConfig().dual_update(0.05, 4.0, 2) == 0.05  # no target: a fixed weight
    with pytest.raises(ValueError, match="visit_target"):
        JointConfig(visit_target=0.0)
    with pytest.raises(ValueError, match="explore_end"):
        JointConfig(explore_end=-1.0)


def test_joint_explore_recipe_trains_with_the_multiplier_and_the_mixture_needs_full_capacity():
    from radial_jax.data.packed import text_data
    from radial_jax.training.joint import train_joint
    from radial_jax.training.loop import TrainConfig
    from radial_jax.training.optim import OptimConfig
    corpus = text_data("embedded")
    config = rj.OPTConfig(vocab_size=corpus.vocab_size, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                          num_attention_heads=2, max_position_embeddings=64)
    jc = JointConfig(mode="radial", gate="straight_through", route_start=4, mixture_steps=4, visit_target=0.5,
                     dual_lr=1.0, explore_start=1.0, capacity_start=4.0, capacity_end=4.0)
    train = TrainConfig(batch_size=4, seq_len=16, log_every=4, optim=OptimConfig(learning_rate=1e-2))
    net, history = train_joint(config, corpus, 16, cfg=jc, train=train, progress=False,
                               radial_kwargs={"max_steps": 4, "router_last_layer": True, "min_exit_step": 1})
    rows = [h for h in history if "lm" in h]  # after updates 4, 8, 12, 16
    # warm-up: identity routes, the multiplier untouched
    assert rows[0]["visits"] == 4.0 and rows[0]["compute_weight"] == pytest.approx(jc.compute_weight)
    # visits above the target of 0.5 raise the multiplier by (visits - 0.5) / 2 per learned update
    assert rows[1]["compute_weight"] > rows[0]["compute_weight"]
    assert rows[2]["explore"] > rows[3]["explore"] >= 0.0
    assert net.radial.routing == "learned" and net.radial.min_exit_step == 1 and all(np.isfinite(r["lm"])
                                                                                     for r in rows)
    with pytest.raises(ValueError, match="capacity_start, capacity_end >= 4"):
        train_joint(config, corpus, 2, cfg=JointConfig(mode="radial", mixture_steps=1), train=train, progress=False,
                    radial_kwargs={"max_steps": 4})


def test_radial_identity_routing_warns_when_its_capacity_drops_most_visits(small):
    with pytest.warns(UserWarning, match="67% of the visits are dropped; capacity_factor=3"):
        rm = RadialModel.from_sequential(small, mode="radial", routing="identity")
    out = rm.forward(np.random.default_rng(0).integers(3, 64, (1, 12)))
    assert int(out.metrics.dropped.sum()) > 12  # what the warning says happens
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RadialModel.from_sequential(small, mode="radial", routing="identity", capacity_factor=L)
        RadialModel.from_sequential(small, mode="ordered", routing="identity")


def test_once_routes_are_the_sequential_model_with_steps_to_spare(small):
    from radial_jax.radial.router import once_step_bias, skip_index
    S = 2 * L
    bias = np.asarray(once_step_bias(L, S, 3.0))
    want = np.full((S, L + 2), -3.0)
    for s in range(S):
        want[s, s if s < L else skip_index(L)] = 0.0
    np.testing.assert_array_equal(bias, want)
    rm = RadialModel.from_sequential(small, mode="radial", max_steps=S, capacity_factor=S)
    router = dict(rm.params["router"])
    router["step_bias"] = router["step_bias"] + once_step_bias(L, S, 1e4)
    rm = rm.replace(params={**rm.params, "router": router})
    ids = np.random.default_rng(4).integers(3, 64, (2, 10))
    out = rm.forward(ids)
    assert (np.asarray(out.metrics.depth) == L).all()
    assert (np.asarray(out.router.choice)[L:] == skip_index(L)).all()
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(small.forward(ids).logits), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="start_routes"):
        JointConfig(start_routes="twice")

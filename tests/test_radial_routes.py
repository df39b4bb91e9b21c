"""Radial mode that learns: the warm start from an ordered student, forced reuse and exit, route statistics,
and joint training's full-depth warm-up."""
import numpy as np
import pytest
import jax.numpy as jnp

import radial_jax as rj
from radial_jax.radial import RadialModel, decode_tokens
from radial_jax.radial.router import exit_index, skip_index
from radial_jax.radial.stats import RouteStats

SMALL = rj.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
                     max_position_embeddings=32)
L = SMALL.num_layers


@pytest.fixture(scope="module")
def small():
    return rj.build(SMALL, seed=3)


@pytest.mark.parametrize("policy", ["mask", "propagate"])
def test_warm_start_computes_exactly_what_the_ordered_student_computes(small, policy):
    ordered = RadialModel.from_sequential(small, mode="ordered", capacity_factor=0.5, router_init_scale=1.5,
                                            seed=1, cache_policy=policy, prefill_buckets=2)
    radial = ordered.to_radial(push=1e4)
    assert radial.radial.mode == "radial" and radial.radial.steps(L) == L
    ids = np.random.default_rng(6).integers(3, 64, (2, 10))
    a, b = ordered.forward(ids), radial.forward(ids)
    assert int(a.metrics.dropped.sum()) > 0, "the budget must bind"
    np.testing.assert_array_equal(np.asarray(b.router.assign), np.asarray(a.router.assign))
    np.testing.assert_allclose(np.asarray(b.logits), np.asarray(a.logits), atol=1e-6, rtol=0)
    # the ordered choice "skip" keeps its column in radial mode; nobody exits
    np.testing.assert_array_equal(np.asarray(b.router.choice), np.asarray(a.router.choice))
    assert not np.asarray(b.router.exited).any()
    logits, choice, _, _ = decode_tokens(radial, ids, prompt_len=3)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(a.logits), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="ordered"):
        radial.to_radial()


def _forced_router(rm, plan):
    """Router parameters whose choice at step ``s`` is ``plan[s]`` for every token (a huge step bias)."""
    router = dict(rm.params["router"])
    bias = np.zeros(np.shape(router["step_bias"]), np.float32)
    for s, choice in enumerate(plan):
        bias[s, choice] = 1e4
    router["step_bias"] = jnp.asarray(bias)
    return {**rm.params, "router": router}


@pytest.mark.parametrize("policy", ["mask", "propagate"])
def test_forced_reuse_skip_and_exit_decode_like_the_parallel_forward(small, policy):
    plan = [0, 2, skip_index(L), 0, 2, exit_index(L)]  # layer 0 twice, layer 2 twice, a skip, then exit
    rm = RadialModel.from_sequential(small, mode="radial", max_steps=len(plan), capacity_factor=len(plan),
                                       cache_policy=policy, prefill_buckets=2)
    rm = rm.replace(params=_forced_router(rm, plan))
    ids = np.random.default_rng(2).integers(3, 64, (2, 9))
    par = rm.forward(ids)
    assign = np.asarray(par.router.assign)
    assert (assign.sum(0)[..., 0] == 2).all() and (assign.sum(0)[..., 2] == 2).all() and not assign[..., 1].any()
    assert np.asarray(par.router.exited)[5].all() and (np.asarray(par.metrics.depth) == 4).all()
    logits, choice, _, _ = decode_tokens(rm, ids, prompt_len=4)
    np.testing.assert_array_equal(np.asarray(choice), np.asarray(par.router.choice))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(par.logits), atol=1e-5, rtol=0)
    stats = RouteStats(L, len(plan)).add(par.router, np.ones(ids.shape, bool)).summary()
    # the exit is at the last step, where nothing follows: a skip, not an early exit
    assert stats["reuse_token_share"] == 1.0 and stats["exit_share"] == 0.0
    assert stats["exits_by_step"] == [0] * 5 + [ids.size]


def test_route_statistics_equal_a_plain_recount(small):
    rm = RadialModel.from_sequential(small, mode="radial", max_steps=5, capacity_factor=0.6, router_init_scale=1.5,
                                       seed=1, prefill_buckets=2)
    ids = np.random.default_rng(3).integers(3, 64, (3, 10))
    mask = np.ones(ids.shape, bool)
    mask[0, :3] = False
    out = rm.forward(ids, mask)
    stats = RouteStats(L, 5).add(out.router, mask).add(out.router, mask).summary()
    choice, assign = np.asarray(out.router.choice), np.asarray(out.router.assign)
    exited, dropped = np.asarray(out.router.exited), np.asarray(out.router.dropped)
    n = 0
    step = np.zeros((5, L + 3))
    hist = np.zeros(6)
    reuse = exits = drops = 0
    for b in range(3):
        for t in range(10):
            if not mask[b, t]:
                continue
            n += 1
            visits = np.zeros(L, int)
            for s in range(5):
                layers = np.flatnonzero(assign[s, b, t])
                visits[layers] += 1
                if layers.size:
                    step[s, layers] += 1
                elif exited[s, b, t]:
                    step[s, L + 1] += 1
                elif choice[s, b, t] < 0:
                    step[s, L + 2] += 1
                else:  # chose skip, or was dropped
                    step[s, L] += 1
                drops += dropped[s, b, t]
            hist[visits.sum()] += 1
            reuse += (visits >= 2).any()
            exits += exited[:4, b, t].any()  # exits before the last of the 5 steps
    np.testing.assert_allclose(stats["step_share"], step / n)
    np.testing.assert_array_equal(stats["depth_histogram"], 2 * hist)
    assert stats["tokens"] == 2 * n and stats["reuse_token_share"] == reuse / n and stats["exit_share"] == exits / n
    assert stats["dropped_share"] == pytest.approx(list(2 * dropped[:, mask].sum(1) / (2 * n)))
    assert drops > 0 and 0 < reuse < n and exits > 0  # the counts exercise every branch
    np.testing.assert_allclose(np.sum(stats["step_share"], 1), 1.0)


def test_joint_warm_up_gives_every_token_the_full_depth(small):
    from radial_jax.training.joint import JointConfig
    cfg = JointConfig(mode="radial", route_start=5)
    for S in (3, 6):  # S > L: the pool looped twice
        rm = RadialModel.from_sequential(small, mode="radial", max_steps=S)
        full = S * rm.radial.layers_per_step(L) / L
        routing, capacity = cfg.stage(0, full)
        warm = rm.replace(routing=routing, capacity_factor=capacity)
        out = warm.forward(np.random.default_rng(5).integers(3, 64, (2, 12)))
        assert (np.asarray(out.metrics.depth) == S).all() and int(out.metrics.dropped.sum()) == 0
    assert cfg.stage(5, full)[0] == "learned"

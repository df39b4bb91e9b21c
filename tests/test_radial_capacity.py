"""The serving capacity fitted to a network's routes (``radial_jax.radial.capacity``)."""
import dataclasses

import numpy as np
import pytest

import radial_jax as rj
from radial_jax.radial import RadialNetwork
from radial_jax.radial.capacity import drop_rate
from radial_jax.radial.stats import RouteStats

SMALL = rj.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
                     max_position_embeddings=32)


@pytest.fixture(scope="module")
def routed():
    model = rj.build(SMALL, seed=3)
    return RadialNetwork.from_sequential(model, mode="ordered", capacity_factor=1.0, router_init_scale=1.5, seed=1,
                                         prefill_buckets=4)


@pytest.fixture(scope="module")
def windows():
    return np.random.default_rng(0).integers(3, 64, (8, 16))


def test_drop_rate_is_the_share_of_wanted_visits_the_budget_refused(routed, windows):
    tight = routed.replace(capacity_factor=0.3)
    stats = RouteStats(SMALL.num_layers, SMALL.num_layers)
    for i in range(0, len(windows), 4):
        stats.add(tight.forward(windows[i:i + 4]).router, np.ones((4, windows.shape[1]), bool))
    rate = drop_rate(tight, windows, batch_size=4)
    assert rate > 0, "the budget must bind"
    assert rate == pytest.approx(stats.summary()["drop_rate"], rel=1e-6)
    assert drop_rate(routed, windows, batch_size=4) == 0.0  # capacity 1 never binds in ordered mode


def smallest_budget_fraction(assign, slack):
    """Plain loops: the smallest ``phi`` with ``count_before < floor(phi (p + 1)) + slack`` for every visit."""
    S, B, T, L = assign.shape
    need = 0.0
    for s in range(S):
        for b in range(B):
            for l in range(L):
                count = 0
                for p in range(T):
                    if assign[s, b, p, l]:
                        need = max(need, (count - slack + 1) / (p + 1))
                        count += 1
    return need


@pytest.mark.parametrize("mode", ["ordered", "radial"])
def test_fitted_capacity_is_the_smallest_that_drops_nothing_and_changes_no_value(routed, windows, mode):
    if mode == "radial":  # the same random router over every layer, skip and exit; any route fits capacity L
        routed = routed.replace(mode="radial", capacity_factor=float(SMALL.num_layers))
    fitted = routed.fit_capacity(windows, batch_size=4)
    rc, L, t = fitted.radial, SMALL.num_layers, windows.shape[1]
    assert drop_rate(fitted, windows, batch_size=4) == 0.0
    # the smallest C_max over the slacks tried, each at the smallest fraction that admits every visit
    assign = np.concatenate([np.asarray(routed.forward(windows[i:i + 4]).router.assign) for i in (0, 4)], axis=1)
    scale = rc.steps(L) * rc.layers_per_step(L) / L
    best = min(dataclasses.replace(rc, capacity_slack=k, capacity_factor=scale * max(
        smallest_budget_fraction(assign, k) * (1 + 1e-6), 1e-6)).max_capacity(L, t) for k in (0, 1, 2, 4, 8, 16))
    assert rc.max_capacity(L, t) == best < routed.radial.max_capacity(L, t), "the capacity must shrink"
    for smaller in (0.999 * rc.capacity_factor, rc.capacity_factor - 1 / 64):  # at its slack, just below and
        assert drop_rate(fitted.replace(capacity_factor=smaller), windows, batch_size=4) > 0, "not the smallest"
    # where the budget does not bind, capacity changes what is padded (the static sizes), not a value
    a, b = routed.forward(windows), fitted.forward(windows)
    np.testing.assert_allclose(np.asarray(b.logits), np.asarray(a.logits), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(b.router.assign), np.asarray(a.router.assign))
    assert int(b.metrics.capacity) < int(a.metrics.capacity)


def test_a_capacity_that_already_drops_is_kept_and_bad_calibration_is_refused(routed, windows):
    tight = routed.replace(capacity_factor=0.3)
    assert tight.fit_capacity(windows, batch_size=4) is tight
    with pytest.raises(ValueError, match=r"\[n >= 1, t\] token ids, got shape \(16,\)"):
        routed.fit_capacity(windows[0])

"""The serving capacity fitted to a network's routes (``radial_jax.radial.capacity``)."""
import dataclasses

import numpy as np
import pytest

import radial_jax as rj
from radial_jax.radial import RadialModel
from radial_jax.radial.capacity import drop_rate, padding, route_facts
from radial_jax.radial.stats import RouteStats

SMALL = rj.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
                     max_position_embeddings=32)


@pytest.fixture(scope="module")
def routed():
    model = rj.build(SMALL, seed=3)
    return RadialModel.from_sequential(model, mode="ordered", capacity_factor=1.0, router_init_scale=1.5, seed=1,
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



def served_padding(net, windows, buckets):
    """What the compiled forward ran beyond the admitted tokens (its metrics: the branch sizes that ran), in the
    serving layout (per-layer weights: each layer at its own size; stacked radial steps share one)."""
    m = net.replace(prefill_buckets=buckets).with_layout("per_layer").forward(windows).metrics
    return int(np.sum(m.layer_sizes)) / int(np.sum(m.step_layer_load)) - 1


@pytest.mark.parametrize("mode", ["ordered", "radial"])
def test_fitted_buckets_are_the_fewest_whose_served_sizes_pad_the_loads_within_the_limit(routed, windows, mode):
    if mode == "radial":
        routed = routed.replace(mode="radial", capacity_factor=float(SMALL.num_layers))
    n_windows = len(windows)  # one batch: the loads are rounded over it
    net = routed.fit_capacity(windows, batch_size=n_windows, max_padding=1e9)  # the fitted capacity, any buckets
    assert net.radial.prefill_buckets == 1
    candidates = (2, 4, 8, 16)  # (one bucket: radial mode runs no unvisited layer, the count assumes it does)
    served = {n: served_padding(net, windows, n) for n in candidates}
    c_max = net.radial.max_capacity(SMALL.num_layers, windows.shape[1])
    per_batch = route_facts(net, windows, n_windows).per_batch
    # fit_capacity counts the loads once, at the network's own capacity: the fitted one admits the same visits
    for (b_own, own_sl), (b_fit, fit_sl) in zip(route_facts(routed, windows, n_windows).per_batch, per_batch):
        assert b_own == b_fit
        np.testing.assert_array_equal(own_sl, fit_sl)
    for n in candidates:  # the count agrees with what ran
        assert padding(per_batch, c_max, n) == pytest.approx(served[n], abs=1e-12)
    assert all(served[a] >= served[b] for a, b in zip(candidates, candidates[1:])), served
    falls = [n for n in candidates[:-1] if served[n] > served[2 * n]]
    assert falls, f"no doubling lowers the padding here: {served}"
    fall = falls[-1]
    limit = (served[fall] + served[2 * fall]) / 2
    fitted = routed.fit_capacity(windows, batch_size=n_windows, max_padding=limit)
    assert fitted.radial.prefill_buckets == 2 * fall
    # the padding it reports for each bucket count tried is what the served network pads
    again, pads = routed.fit_capacity(windows, batch_size=n_windows, max_padding=limit, return_padding=True)
    assert again.radial == fitted.radial and list(pads) == [1, 2, 4, 8, 16, 32]
    for n in candidates:
        assert pads[n] == pytest.approx(served[n], abs=1e-12)
    assert (fitted.radial.capacity_factor, fitted.radial.capacity_slack) == (net.radial.capacity_factor,
                                                                             net.radial.capacity_slack)
    capped = routed.fit_capacity(windows, batch_size=n_windows, max_padding=limit, max_buckets=fall)
    assert capped.radial.prefill_buckets == fall  # none pads little enough: the most allowed
    with pytest.raises(ValueError, match="max_padding must be >= 0 and max_buckets an integer >= 1"):
        routed.fit_capacity(windows, max_padding=-0.1)

"""Dispatch primitives of the Radial Network against plain Python loops."""
import numpy as np
import pytest
import jax.numpy as jnp

from radial_jax.radial import dispatch as dsp
from radial_jax.radial.config import RadialConfig


def admission_loop(want, budget, count0):
    """The causal budget as written in the design: one token after the other."""
    count, admitted = count0, []
    for w, b in zip(want, budget):
        ok = bool(w) and count < b
        admitted.append(ok)
        count += ok
    return np.asarray(admitted, bool), count


@pytest.mark.parametrize("phi,slack", [(1.0, 0), (0.5, 1), (0.3, 0), (0.25, 2), (0.1, 1)])
def test_causal_budget_closed_form_equals_the_token_by_token_loop(phi, slack):
    rng = np.random.default_rng(int(phi * 100) + slack)
    K, G, N = 3, 4, 40
    want = rng.random((K, G, N)) < rng.uniform(0.3, 1.0, (K, G, 1))
    valid = np.ones((G, N), bool)
    valid[1, :7] = False  # left padding
    valid[2, 30:] = False  # right padding
    positions = np.where(valid, np.cumsum(valid, 1) - 1, -1)
    positions[3] += 25  # a later chunk of a sequence already in the cache
    count0 = np.zeros((K, G), np.int32)
    count0[:, 3] = rng.integers(0, int(phi * 25) + slack + 1, K)  # what the earlier chunk admitted
    want &= valid[None]
    budget = np.asarray(dsp.budget(jnp.asarray(positions), jnp.asarray(valid), phi, slack))
    got, count = dsp.admit_in_order(jnp.asarray(want), jnp.asarray(budget), jnp.asarray(count0))
    for k in range(K):
        for g in range(G):
            expect, expect_count = admission_loop(want[k, g], budget[g], int(count0[k, g]))
            np.testing.assert_array_equal(np.asarray(got)[k, g], expect)
            assert int(count[k, g]) == expect_count
    if phi < 1:
        assert (np.asarray(got) != want).any(), "the budget must bind somewhere in this test"
    # the budget is floor(phi * (p + 1)) + slack at real positions
    np.testing.assert_array_equal(budget[valid], np.floor(np.float32(phi) * (positions[valid] + 1)) + slack)


def test_decoding_replays_the_budget_with_per_row_counters():
    rng = np.random.default_rng(3)
    B, T, phi, slack = 3, 20, 0.4, 1
    want = rng.random((1, B, T)) < 0.8
    positions = np.broadcast_to(np.arange(T), (B, T))
    budget = np.asarray(dsp.budget(jnp.asarray(positions), jnp.ones((B, T), bool), phi, slack))
    parallel, _ = dsp.admit_in_order(jnp.asarray(want), jnp.asarray(budget), jnp.zeros((1, B), jnp.int32))
    count = np.zeros((1, 1, B), np.int32)  # decoding: one group, one token per row
    for t in range(T):
        got = np.asarray(dsp.admit_each(jnp.asarray(want[:, None, :, t]), jnp.asarray(budget[None, :, t]),
                                        jnp.asarray(count)))
        np.testing.assert_array_equal(got[0, 0], np.asarray(parallel)[0, :, t])
        count += got


def test_select_gathers_admitted_tokens_in_position_order():
    admitted = np.array([[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 1]], bool)
    idx = np.asarray(dsp.select(jnp.asarray(admitted), 4))
    for g in range(3):
        expect = list(np.flatnonzero(admitted[g])) + [6] * (4 - admitted[g].sum())
        assert idx[g].tolist() == expect


def test_static_sizes_and_the_smallest_that_holds_a_load():
    assert dsp.prefill_sizes(16, 4) == (0, 1, 2, 4, 8, 12, 16)  # 4 halved 3 times, then multiples of 4
    assert dsp.prefill_sizes(5, 8) == (0, 1, 2, 3, 4, 5)
    assert dsp.prefill_sizes(64, 8, halvings=0) == (0, 8, 16, 24, 32, 40, 48, 56, 64)
    assert dsp.prefill_sizes(64, 1) == (64,)
    assert dsp.decode_sizes(8) == (0, 1, 2, 3, 4, 5, 6, 7, 8)
    assert dsp.decode_sizes(1) == (0, 1)
    assert dsp.decode_sizes(64) == (0, 1, 2, 3, 4, 5, 6, 7, 8, 16, 24, 32, 40, 48, 56, 64)
    assert dsp.decode_sizes(64, exact_up_to=2, parts=4) == (0, 1, 2, 16, 32, 48, 64)
    for batch in (9, 20, 100):  # a load is never padded by more than an eighth of the batch
        sizes = dsp.decode_sizes(batch)
        assert sizes[-1] == batch and all(b - a <= -(-batch // 8) for a, b in zip(sizes, sizes[1:]))
    with pytest.raises(ValueError, match="at least 1 row"):
        dsp.decode_sizes(0)
    sizes = (0, 1, 2, 4, 8)
    for load in range(9):
        i = int(dsp.size_index(sizes, jnp.int32(load)))
        assert sizes[i] >= load and (i == 0 or sizes[i - 1] < load)


def test_expert_choice_takes_the_top_scores_in_position_order():
    score = np.array([[0.1, 0.9, -np.inf, 0.5, 0.7], [-np.inf] * 5])
    idx, taken = dsp.select_top(jnp.asarray(score), 2)
    assert np.asarray(idx).tolist() == [[1, 4], [5, 5]]
    assert np.asarray(taken).tolist() == [[False, True, False, False, True], [False] * 5]


def test_capacity_factor_is_the_fraction_of_dense_compute():
    ordered = RadialConfig(capacity_factor=0.5)
    assert ordered.budget_fraction(12) == 0.5 and ordered.max_capacity(12, 100) == 51
    radial = RadialConfig(mode="radial", capacity_factor=0.5)
    assert radial.budget_fraction(12) == pytest.approx(0.5 / 12)  # L layers a step share cf of the tokens
    assert RadialConfig(mode="radial", capacity_factor=12).budget_fraction(12) == 1.0
    assert RadialConfig(capacity_factor=1.0).max_capacity(4, 10) == 10  # never binds

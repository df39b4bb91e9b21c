"""The global KV cache rules (docs/design.md §4) against plain NumPy loops."""
import numpy as np
import jax.numpy as jnp
import pytest

from radial_jax.models.kv_cache import EMPTY, KVCache, fill_prompt, sequence_mask, visible_mask, write_first_visit


def test_first_visit_writes_only_empty_valid_in_range_entries():
    rng = np.random.default_rng(0)
    L, B, T, G, D = 3, 2, 6, 2, 4
    k = rng.normal(size=(L, B, G, T, D)).astype(np.float32)  # heads before slots
    v = rng.normal(size=(L, B, G, T, D)).astype(np.float32)
    written = np.where(rng.random((L, B, T)) < 0.4, 0, int(EMPTY)).astype(np.int32)
    # entries of one call go to different layers and rows (radial mode, decoding across the batch)
    layer = np.array([[1, 2, 0], [1, 1, 2]], np.int32)
    row = np.array([[0, 1, 1], [1, 0, 0]], np.int32)
    slot = np.array([[0, 2, 5], [1, 3, 7]], np.int32)  # 7 is outside the cache: dropped
    valid = np.array([[True, True, False], [True, True, True]])
    k_new = rng.normal(size=(2, 3, G, D)).astype(np.float32)
    v_new = rng.normal(size=(2, 3, G, D)).astype(np.float32)
    step = 4
    got = write_first_visit(KVCache(jnp.asarray(k), jnp.asarray(v), jnp.asarray(written)), jnp.asarray(layer),
                            jnp.asarray(row), jnp.asarray(slot), jnp.asarray(k_new), jnp.asarray(v_new),
                            jnp.asarray(valid), step)
    ek, ev, ew = k.copy(), v.copy(), written.copy()
    for i in range(2):
        for j in range(3):
            l, b, s = layer[i, j], row[i, j], slot[i, j]
            if valid[i, j] and 0 <= s < T and written[l, b, s] == EMPTY:
                ek[l, b, :, s], ev[l, b, :, s], ew[l, b, s] = k_new[i, j], v_new[i, j], step
    for a, e in zip((got.k, got.v, got.written_at), (ek, ev, ew)):
        np.testing.assert_array_equal(np.asarray(a), e)
    assert (ew != written).any()  # the case exercises real writes


def test_a_prompt_fills_an_empty_cache_as_first_visits_do():
    rng = np.random.default_rng(1)
    L, B, T, G, D, t = 3, 2, 7, 2, 4, 5
    k_new, v_new = (rng.normal(size=(B, t, G, D)).astype(np.float32) for _ in range(2))
    valid = np.ones((B, t), bool)
    valid[1, 3:] = False  # row 1: a 3-token prompt, right-padded
    empty = KVCache.create(L, B, T, G, D)
    slots = np.broadcast_to(np.arange(t), (B, t))
    want = write_first_visit(empty, 1, np.arange(B)[:, None], slots, k_new, v_new, valid, 1)
    got = fill_prompt(empty, 1, jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(valid), 1)
    for a, e in zip((got.k, got.v, got.written_at), (want.k, want.v, want.written_at)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
    assert (np.asarray(got.written_at)[1] == 1).sum() == valid.sum()  # the valid tokens, in layer 1 only
    with pytest.raises(ValueError, match="does not fit a cache of 7 slots"):
        fill_prompt(empty, 0, jnp.zeros((B, 8, G, D)), jnp.zeros((B, 8, G, D)), jnp.ones((B, 8), bool), 0)


def test_visible_mask_follows_written_at_causality_and_window_and_shows_nothing_outside_the_cache():
    rng = np.random.default_rng(1)
    B, T, Q = 2, 9, 4
    written = np.where(rng.random((B, T)) < 0.7, rng.integers(0, 5, (B, T)), int(EMPTY)).astype(np.int32)
    slots = rng.integers(0, T, (B, Q)).astype(np.int32)
    slots[0, -1] = T  # a dispatch's empty slot: outside the cache, it sees nothing
    for step, window, exclude_self in ((2, 0, False), (3, 3, True), (4, 1, False)):
        got = np.asarray(visible_mask(jnp.asarray(written), jnp.asarray(slots), step, causal=True,
                                      exclude_self=exclude_self, window=window))
        for b in range(B):
            for q in range(Q):
                for j in range(T):
                    i = slots[b, q]
                    want = i < T and written[b, j] <= step and j <= i and (window <= 0 or i - j < window)
                    want = want and not (exclude_self and j == i)
                    assert got[b, q, j] == want, (step, window, b, q, j)


def test_sequence_mask_with_padding_and_sliding_window():
    valid = np.array([[False, True, True, True, True, True], [True] * 6])
    slots = np.broadcast_to(np.arange(6), (2, 6))
    got = np.asarray(sequence_mask(jnp.asarray(slots), jnp.asarray(valid), causal=True, window=2))
    for b in range(2):
        for i in range(6):
            for j in range(6):
                assert got[b, i, j] == (valid[b, j] and j <= i and i - j < 2)
    full = np.asarray(sequence_mask(jnp.asarray(slots), jnp.asarray(valid), causal=False))
    np.testing.assert_array_equal(full, np.broadcast_to(valid[:, None, :], (2, 6, 6)))

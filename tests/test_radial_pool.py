"""``radial.pool.Pool``: what differs between the stacked and the per-layer layout, against plain loops.

Each primitive runs in both layouts, with the step index traced where the step code traces it, and is
compared with a loop over a Python list of layers written here.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radial_jax.models.kv_cache import EMPTY, KVCache, is_split
from radial_jax.models.stack import unstack_pool
from radial_jax.radial.pool import Pool

L, B, G, T, D = 3, 2, 1, 5, 4


def stacked_pool():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(L, 4, 4)), jnp.float32), "b": jnp.asarray(rng.normal(size=(L, 4)))}
    meta = {"rope": np.arange(L, dtype=np.int32), "window": np.zeros(L, np.int32)}
    return Pool(params, meta, L)


def both_layouts():
    pool = stacked_pool()
    return {"stacked": pool, "per_layer": Pool(unstack_pool(pool.params), pool.meta, L)}


@pytest.mark.parametrize("layout", ["stacked", "per_layer"])
def test_fold_and_scan_visit_every_layer_in_order_like_a_loop(layout):
    pool = both_layouts()[layout]
    x = jnp.ones((4,), jnp.float32)
    want = np.ones(4, np.float32)
    for l in range(L):  # the plain loop
        want = np.tanh(np.asarray(stacked_pool().params["w"][l]) @ want + np.asarray(stacked_pool().params["b"][l]))

    def step(l, x):
        p, _ = pool.layer(l)
        return jnp.tanh(p["w"] @ x + p["b"])

    folded = jax.jit(lambda x: pool.fold(step, x))(x)
    scanned = jax.jit(lambda x: pool.scan(lambda x, p, m, l: jnp.tanh(p["w"] @ x + p["b"]), x))(x)
    np.testing.assert_allclose(np.asarray(folded), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(scanned), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["stacked", "per_layer"])
def test_pick_runs_the_layer_of_a_traced_step_and_otherwise_past_the_last(layout):
    pool = both_layouts()[layout]

    def branch(l):
        return lambda: pool.layer(l)[0]["b"].sum() + 100.0 * pool.layer(l)[1]["rope"]

    pick = jax.jit(lambda s: pool.pick(s, branch, lambda: jnp.float32(-1.0)))
    for s in range(L + 2):
        want = -1.0 if s >= L else float(np.asarray(stacked_pool().params["b"][s]).sum()) + 100.0 * s
        assert float(pick(jnp.int32(s))) == pytest.approx(want, rel=1e-6)


def fresh_cache():
    return KVCache(k=jnp.zeros((L, B, G, T, D)), v=jnp.zeros((L, B, G, T, D)),
                   written_at=jnp.full((L, B, T), EMPTY, jnp.int32))


@pytest.mark.parametrize("layout", ["stacked", "per_layer"])
def test_write_picked_writes_the_layer_of_a_traced_step_only_and_nothing_past_the_last(layout):
    pool = both_layouts()[layout]
    kv = pool.own(fresh_cache())
    assert is_split(kv) == (layout == "per_layer")
    rows, slots = jnp.asarray([[0, 1]]), jnp.asarray([[2, 4]])
    k = jnp.full((1, 2, G, D), 7.0)
    write = jax.jit(lambda kv, s: pool.write_picked(kv, s, rows, slots, k, 2 * k, jnp.ones((1, 2), bool), s))
    for s in range(L + 1):
        got = Pool.restore(write(kv, jnp.int32(s)), like=fresh_cache())
        want_k = np.zeros((L, B, G, T, D))
        want_at = np.full((L, B, T), EMPTY)
        if s < L:  # the plain writes: rows 0 and 1 at slots 2 and 4 of layer s
            want_k[s, 0, :, 2], want_k[s, 1, :, 4] = 7.0, 7.0
            want_at[s, 0, 2], want_at[s, 1, 4] = s, s
        np.testing.assert_array_equal(np.asarray(got.k), want_k)
        np.testing.assert_array_equal(np.asarray(got.v), 2 * want_k)
        np.testing.assert_array_equal(np.asarray(got.written_at), want_at)


def test_a_cache_comes_back_in_the_layout_it_came_in():
    pools = both_layouts()
    cache = fresh_cache()
    for pool in pools.values():
        for given in (cache, pools["per_layer"].own(cache)):
            back = Pool.restore(pool.own(given), like=given)
            assert is_split(back) == is_split(given)

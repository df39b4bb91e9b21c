"""The measurement helpers of ``radial_jax.reporting.timing``: what they run, in what order, and what they return."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radial_jax.reporting.timing import CompileAhead, compile_in_parallel, interleave, ratio


def test_interleave_warms_up_then_alternates_the_sides_round_by_round():
    calls = []
    rounds = interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed ones
    assert {k: len(v) for k, v in rounds.items()} == {"a": 3, "b": 3}
    assert ratio({"slow": [2.0, 4.0, 9.0], "fast": [1.0, 1.0, 3.0]}, "slow", "fast") == {
        "median": 3.0, "min": 2.0, "max": 4.0, "n": 3}
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        interleave({"a": lambda: None}, repeats=0)


def test_programs_compiled_in_parallel_compute_what_jit_computes():
    x = jnp.arange(12.0).reshape(3, 4)
    fns = {"matmul": lambda a: a @ a.T, "softmax": lambda a: jax.nn.softmax(a, -1), "sum": lambda a: a.sum(0)}
    compiled, seconds = compile_in_parallel({k: jax.jit(f).lower(x) for k, f in fns.items()}, workers=2)
    assert set(compiled) == set(seconds) == set(fns)
    for key, f in fns.items():
        np.testing.assert_allclose(np.asarray(compiled[key](x)), np.asarray(f(x)), rtol=1e-6)
        assert seconds[key] > 0


def test_compile_ahead_fills_the_jit_cache_the_callers_later_calls_hit_and_reraises_failures():
    x = jnp.ones((2, 3))
    double = jax.jit(lambda a: a * 2)
    with CompileAhead([(double, (x,))]):
        pass
    assert double._cache_size() == 1
    np.testing.assert_array_equal(np.asarray(double(x)), 2 * np.ones((2, 3)))
    assert double._cache_size() == 1  # the later call found it compiled
    bad = jax.jit(lambda a: a @ a)  # [2, 3] @ [2, 3]: a shape error
    with pytest.raises(TypeError, match="dot_general"):
        CompileAhead([(bad, (x,))]).wait()

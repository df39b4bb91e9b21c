"""Wall-clock measurement that survives a shared machine: sides interleaved, medians with their spread.

``interleave({"a": fa, "b": fb}, repeats)`` runs ``fa, fb, fa, fb, ...`` (after a
warm-up round that compiles), so a noisy neighbour slows both alike; ``ratio``
and ``rate`` summarise per round (median, min, max), never the best run. The
benchmarks in ``experiments/`` and the pipeline's serving measurement use it.
``compile_in_parallel`` compiles the programs to be timed before any timing, several at once.
"""
from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Tuple


def block(out):
    """Wait for JAX's asynchronous dispatch (any pytree; numpy passes through)."""
    import jax
    return jax.block_until_ready(out)


def interleave(sides: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Seconds of each side over ``repeats`` rounds, the sides run one after the other inside a round."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in sides.values():
            block(fn())
    rounds = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            block(fn())
            rounds[name].append(time.perf_counter() - t0)
    return rounds


def summary(values: List[float]) -> dict:
    """``{"median", "min", "max", "n"}``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio(rounds: Dict[str, List[float]], slow: str, fast: str) -> dict:
    """Per-round ``time[slow] / time[fast]`` (the speed-up of ``fast``), summarised."""
    return summary([a / b for a, b in zip(rounds[slow], rounds[fast])])


def rate(rounds: Dict[str, List[float]], side: str, work: float) -> dict:
    """Per-round ``work / seconds`` (e.g. tokens/s), summarised."""
    return summary([work / s for s in rounds[side]])


def _threads(workers: Optional[int]) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)


def compile_in_parallel(lowered: dict, workers: Optional[int] = None) -> Tuple[dict, dict]:
    """``(executables, seconds)``: each of ``lowered`` (``{key: jax.jit(f).lower(...)}``) compiled on a pool of
    ``workers`` threads (default: the CPU count). XLA compiles with the GIL released and mostly on one core,
    so on 2 cores two programs compile in about the time of one; the programs are submitted in ``lowered``'s
    order (put the slowest first). ``seconds``: each one's compile time, shared cores and all (or the time
    to read it from JAX's compilation cache)."""
    def compile_one(item):
        key, low = item
        t0 = time.perf_counter()
        return key, low.compile(), time.perf_counter() - t0

    with _threads(workers) as pool:
        done = list(pool.map(compile_one, lowered.items()))
    return {key: exe for key, exe, _ in done}, {key: seconds for key, _, seconds in done}


class CompileAhead:
    """Compile while other work runs: each ``(jitted, args)`` of ``calls`` is called once on a pool of
    ``workers`` threads (default: the CPU count), which compiles it into its ``jit`` cache; the caller's own
    calls with arguments of those shapes and dtypes then find it compiled. ``wait()`` (or leaving a ``with``
    block) waits for them and raises what a call raised."""

    def __init__(self, calls, workers: Optional[int] = None):
        self._pool = _threads(workers)
        self._futures = [self._pool.submit(lambda f=f, a=a: block(f(*a))) for f, a in calls]

    def wait(self) -> None:
        self._pool.shutdown(wait=True)
        for future in self._futures:
            future.result()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.wait()

"""Wall-clock measurement that survives a shared machine: sides interleaved, medians with their spread.

``interleave({"a": fa, "b": fb}, repeats)`` runs ``fa, fb, fa, fb, ...`` (after a
warm-up round that compiles), so a noisy neighbour slows both alike; ``ratio``
and ``rate`` summarise per round (median, min, max), never the best run. The
benchmarks in ``experiments/`` and the pipeline's serving measurement use it.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List


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

"""What every benchmark in ``experiments/`` shares: interleaved timing, XLA FLOPs, the machine, the JSON.

Rules (the README's figures depend on them):

* sides are timed **interleaved** (A, B, A, B, ...), never one block after the
  other, so a noisy neighbour slows both alike; a ratio is taken per round and
  the **median** of the rounds is reported with its **spread** (min and max
  over rounds), never the best run;
* FLOPs are XLA's own (``jit(f).lower(...).compile().cost_analysis()``) where they
  apply, with a note when a rolled loop body had to be corrected for;
* every result file records the machine, the library versions, the settings and
  a list of **figures** (``figure(...)``), the only thing ``readme_tables.py``
  puts into the README.

Usage::

    rounds = interleave({"dense": run_dense, "routed": run_routed}, repeats=7)
    fig = figure("decode_b1_d50", "routed decode vs dense, batch 1, 50 % depth",
                 ratio(rounds, "dense", "routed"), unit="x", target=">= 1.6")
    write_result("results/bench_radial.json", "bench_radial", settings, [fig], extra)
"""
from __future__ import annotations

from pathlib import Path

from radial_jax.results import figure, machine, write_result
from radial_jax.timing import block, interleave, rate, ratio, summary

__all__ = ["RESULTS", "block", "figure", "interleave", "machine", "rate", "ratio", "summary", "write_result",
           "xla_flops"]

RESULTS = Path(__file__).resolve().parents[1] / "results"


def xla_flops(fn, *args, **kwargs) -> float:
    """FLOPs of ``jit(fn)(*args)`` by XLA's ``cost_analysis`` (a rolled loop's body is counted once)."""
    import jax
    cost = jax.jit(fn, **kwargs).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))



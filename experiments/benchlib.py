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

import json
import time
from pathlib import Path

from radial_jax.reporting.results import figure, machine, write_result
from radial_jax.reporting.timing import block, interleave, rate, ratio, summary

__all__ = ["RESULTS", "block", "figure", "interleave", "machine", "rate", "ratio", "stage", "summary",
           "write_result", "xla_flops"]

RESULTS = Path(__file__).resolve().parents[1] / "results"


def xla_flops(fn, *args, **kwargs) -> float:
    """FLOPs of ``jit(fn)(*args)`` by XLA's ``cost_analysis`` (a rolled loop's body is counted once)."""
    import jax
    cost = jax.jit(fn, **kwargs).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))




def stage(out: Path, name: str, compute):
    """``compute()``'s dict, saved as ``out/name.json`` (arrays as lists); reused when the file exists, so a
    long study stopped anywhere resumes at its first missing stage."""
    from radial_jax.reporting.files import atomic_write_json
    path = Path(out) / f"{name}.json"
    if path.exists():
        print(f"[{name}] reusing {path}")
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    result = compute()
    result["seconds"] = time.perf_counter() - t0
    atomic_write_json(path, result)
    print(f"[{name}] {time.perf_counter() - t0:.0f} s")
    return result

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
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

RESULTS = Path(__file__).resolve().parents[1] / "results"


def block(out):
    """Wait for JAX's asynchronous dispatch to finish (works on any pytree; no-op for numpy)."""
    try:
        import jax
        jax.block_until_ready(out)
    except ImportError:
        pass
    return out


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
    """``{"median", "min", "max", "n"}`` of a list of numbers."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio(rounds: Dict[str, List[float]], slow: str, fast: str) -> dict:
    """Per-round ``time[slow] / time[fast]`` (a speed-up of ``fast``), summarised."""
    return summary([a / b for a, b in zip(rounds[slow], rounds[fast])])


def rate(rounds: Dict[str, List[float]], side: str, work: float) -> dict:
    """Per-round ``work / seconds`` (e.g. tokens/s), summarised."""
    return summary([work / s for s in rounds[side]])


def xla_flops(fn, *args, **kwargs) -> float:
    """FLOPs of ``jit(fn)(*args)`` by XLA's ``cost_analysis`` (a rolled loop's body is counted once)."""
    import jax
    cost = jax.jit(fn, **kwargs).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def figure(key: str, label: str, value, *, unit: str = "", target: Optional[str] = None,
           met: Optional[bool] = None, note: str = "") -> dict:
    """One README figure. ``value``: a number or a ``summary``/``ratio`` dict (median and spread)."""
    if isinstance(value, dict):
        row = {"value": value["median"], "spread": [value["min"], value["max"]], "rounds": value["n"]}
    else:
        row = {"value": value}
    return {"key": key, "label": label, **row, "unit": unit, "target": target, "met": met, "note": note}


def machine() -> dict:
    """The machine and the versions a result was measured with."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
            "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    for name in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    try:
        import jax
        dev = jax.devices()[0]
        info["jax_backend"], info["device"] = dev.platform, getattr(dev, "device_kind", str(dev))
    except ImportError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def write_result(path, benchmark: str, settings: dict, figures: List[dict], details: Optional[dict] = None) -> Path:
    """Write the result JSON atomically (``results/<name>.json`` by convention)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": benchmark, "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
           "machine": machine(), "settings": settings, "figures": figures, "details": details or {}}
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(doc, f, indent=1, default=float)
    os.replace(f.name, path)
    return path

"""Result files that the README's tables are written from (``experiments/readme_tables.py``).

A result JSON holds the machine and versions it was measured on, the settings,
a list of **figures** (``figure(...)``: a key, a label, a value or a median with
its spread, a target and whether it is met) and free-form details.
Benchmarks (``experiments/benchlib.py``) and ``radial-jax pipeline --results``
write them with ``write_result``.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional


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
            "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}
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
                                            cwd=Path.cwd(), timeout=5).stdout.strip() or None
        # Python code changed since that commit: the figures are not that commit's code's
        info["git_dirty"] = bool(info["git_commit"]) and subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", "*.py"], cwd=Path.cwd(), timeout=5).returncode == 1
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

"""The scaling study: profile and simulate a family of models, then fit median ratio against size.

``run_scaling`` processes one model at a time and writes its results to
``<out>/models/<slug>/`` before the next starts (each file written
atomically), so an interrupted run loses no finished model and a rerun skips
what is done. ``collect`` gathers them into ``results.json`` / ``results.csv`` and
the PNGs: median ratio against parameter count (log axis) with a least-squares
trend in ``log10(params)`` and its extrapolation, per-layer profiles on a
normalised depth axis, dynamic depth and quality against the threshold.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from radial_jax.checkpoints.load import load
from radial_jax.checkpoints.reader import CheckpointReader
from radial_jax.profiling.residual import profile
from radial_jax.profiling.skipping import check_thresholds, simulate_skipping
from radial_jax.profiling.streaming import profile_streaming
from radial_jax.reporting.files import atomic_write_text, figure, save_figure

EXTRAPOLATE_TO = (1.75e11, 1e12)


def slug(name: str) -> str:
    return str(name).strip("/").replace("/", "--")


def run_scaling(models: Sequence[str], make_batches: Callable, out, *, thresholds: Sequence[float],
                streaming_above: float = float("inf"), dtype="float32", data_name: str = "data",
                mesh=None) -> List[dict]:
    """Profile (and simulate) each model; ``make_batches(model) -> (profile_batches, simulate_batches)``.

    ``mesh``: weights read sharded onto it (``rj.load(mesh=...)``; streamed layers too), so no host holds a
    whole model; with several processes only process 0 writes.
    """
    import jax
    thresholds = check_thresholds(thresholds)
    main = jax.process_index() == 0
    out = Path(out)
    done = []
    for name in models:
        d = out / "models" / slug(name)
        if (d / "profile.json").exists() and (d / "simulation.json").exists():
            print(f"[skip] {name}: results in {d}")
            done.append(name)
            continue
        d.mkdir(parents=True, exist_ok=True)
        reader = CheckpointReader(name)
        size = reader.num_params
        shell = reader.shell(dtype, name=str(name))
        prof_batches, sim_batches = make_batches(shell)
        if size > streaming_above:  # too big for memory: stream the layers; the oracle needs the whole model
            result = profile_streaming(name, prof_batches, dtype=dtype, data_name=data_name,
                                       **({} if mesh is None else {"mesh": mesh}))
            if main:
                result.save(d)
                atomic_write_text(d / "simulation.json", json.dumps({"skipped": "model streamed", "thresholds": []}))
        else:
            model = load(name, dtype=dtype, mesh=mesh)
            result = profile(model, prof_batches, data_name=data_name)
            simulation = simulate_skipping(model, sim_batches, thresholds, data_name=data_name)
            if main:
                result.save(d)
                simulation.save(d)
        print(result.table())
        done.append(name)
    return collect(out, [slug(m) for m in models])


def fit_trend(params: np.ndarray, medians: np.ndarray):
    """Least squares ``median = a + b * log10(params)``; returns ``(a, b)``."""
    b, a = np.polyfit(np.log10(params), medians, 1)
    return float(a), float(b)


def collect(out, slugs: Optional[Sequence[str]] = None) -> List[dict]:
    out = Path(out)
    slugs = slugs or sorted(p.name for p in (out / "models").iterdir())
    rows = []
    for s in slugs:
        d = out / "models" / s
        if not (d / "profile.json").exists():
            continue
        prof = json.loads((d / "profile.json").read_text())
        sim = json.loads((d / "simulation.json").read_text()) if (d / "simulation.json").exists() else {}
        rows.append({"model": prof["model"], "num_params": prof["num_params"], "num_layers": prof["num_layers"],
                     "tokens": prof["tokens"], "median_ratio_out": prof["median_ratio_out"],
                     "median_ratio_in": prof["median_ratio_in"],
                     "per_layer_median_out": [x["median"] for x in prof["ratios"]["out"]["blocks"]["per_layer"]],
                     "oracle": sim.get("thresholds", [])})
    rows.sort(key=lambda r: r["num_params"])
    summary = {"default_ratio": "ratio_out", "models": rows}
    if len(rows) >= 2:
        params = np.array([r["num_params"] for r in rows], float)
        a, b = fit_trend(params, np.array([r["median_ratio_out"] for r in rows]))
        summary["trend"] = {"form": "median_ratio_out = a + b * log10(num_params)", "a": a, "b": b,
                            "extrapolated": {f"{p:.3g}": a + b * np.log10(p) for p in EXTRAPOLATE_TO}}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=1))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "num_params", "num_layers", "tokens", "median_ratio_out", "median_ratio_in"])
    for r in rows:
        w.writerow([r[k] for k in ("model", "num_params", "num_layers", "tokens", "median_ratio_out",
                                   "median_ratio_in")])
    atomic_write_text(out / "results.csv", buf.getvalue())
    if rows:
        plot_scaling(summary, out / "scaling.png")
    return rows


def plot_scaling(summary: dict, path) -> None:
    rows = summary["models"]
    plt, fig, axes = figure(4, width=4.2)
    params = np.array([r["num_params"] for r in rows], float)
    med = np.array([r["median_ratio_out"] for r in rows])
    ax = axes[0]
    ax.scatter(params, med, color="tab:blue", zorder=3, label="median ratio_out")
    for r in rows:
        ax.annotate(Path(r["model"]).name, (r["num_params"], r["median_ratio_out"]), fontsize=7)
    if "trend" in summary:
        t = summary["trend"]
        xs = np.logspace(np.log10(params.min()), np.log10(max(EXTRAPOLATE_TO)), 50)
        ax.plot(xs, t["a"] + t["b"] * np.log10(xs), "--", color="tab:gray", label="trend (extrapolated)")
    ax.set(xscale="log", xlabel="parameters", ylabel="median ratio_out", title="median block contribution")
    ax.legend(fontsize=7)
    for r in rows:
        y = r["per_layer_median_out"]
        axes[1].plot(np.linspace(0, 1, len(y)), y, label=Path(r["model"]).name)
        if r["oracle"]:
            th = [o["threshold"] for o in r["oracle"]]
            axes[2].plot(th, [o["depth_fraction"] for o in r["oracle"]], marker="o", label=Path(r["model"]).name)
            q = [o["perplexity"] if o.get("perplexity") is not None else o.get("top1_agreement")
                 or o.get("embedding_cosine") for o in r["oracle"]]
            axes[3].plot(th, q, marker="o", label=Path(r["model"]).name)
    axes[1].set(xlabel="relative depth", ylabel="median ratio_out", yscale="log", title="per-layer profile")
    axes[2].set(xlabel="threshold", ylabel="depth (fraction of blocks)", title="oracle dynamic depth")
    axes[3].set(xlabel="threshold", ylabel="perplexity (LM) / top-1 agreement (ViT)", title="oracle quality")
    for a in axes[1:]:
        a.legend(fontsize=7)
    save_figure(plt, fig, path)

"""Evaluation of routed students against their teacher and the oracles (``radial-jax eval``).

Everything runs the real networks, and compute is what ran:

* teacher: the sequential model (``teacher.module``), every layer;
* students (one, or several by name: an ordered and a radial one): the Radial
  Network with its real dispatch; ``depth`` is layer visits / L per token,
  ``compute`` the executed FLOPs / the sequential model's (``radial_jax.models.flops``,
  by construction from the shapes that ran: layers at their rounded sizes, the
  router, *propagate* writes), ``route_stats`` what the routes did
  (``radial_jax.radial.stats``);
* layer oracle (docs/design.md §3 at layer granularity): a Radial Network with
  ``routing="oracle"``, ``cache_policy="propagate"`` and the *teacher's* layers,
  swept over thresholds (its probe is a simulation device and not counted);
* block oracle (§3 as written: attention and MLP blocks decided apart): the
  sequential model's ``threshold=`` forward; its compute is the fraction of
  layer FLOPs kept;
* each student's curve: its router swept over keep offsets (every layer column
  raised by ``offset`` against skip and exit), what the same router buys at other
  compute.

Comparisons "at the same compute" interpolate a curve at a student's executed
FLOPs fraction. ``flops_fraction_total`` adds the LM head, the same for all.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from radial_jax import defaults as D
from radial_jax.data.corpus import window_batches
from radial_jax.models.flops import dense_flops, head_flops
from radial_jax.models.perplexity import TokenWeighted, token_nll
from radial_jax.radial.router import with_keep_offset
from radial_jax.radial.stats import RouteStats
from radial_jax.reporting.timing import CompileAhead
from radial_jax.reporting.files import atomic_write_json, figure, save_figure

DEFAULT_THRESHOLDS = D.EVAL_THRESHOLDS
DEFAULT_OFFSETS = D.EVAL_OFFSETS


def _accumulate(fn, windows, batch_size, *args, keep_windows: bool = False):
    """Token-weighted perplexity and depth of ``fn(ids, *args) -> (nll_b, n, depth[, extra...])`` (``nll_b``:
    each window's summed NLL) over every window (a last, smaller batch too: the same tokens as ``radial-jax
    simulate`` scores on the same windows). ``keep_windows``: the row keeps each window's NLL (``window_nll``)
    for the paired comparisons (``training.paired``) that resample them."""
    if len(windows) < 1:
        raise ValueError("need at least one eval window, got 0")
    acc, extras, kept = TokenWeighted(), 0, []
    for ids in window_batches(windows, batch_size):
        nll_b, n, d, *more = fn(ids, *args)
        kept.append(np.asarray(nll_b, np.float64))
        acc.add(n, sums={"nll": kept[-1].sum()}, depth=d, **{f"extra{i}": m for i, m in enumerate(more)})
        extras = len(more)
    row = {"ppl": acc.perplexity("nll"), "nll": acc.mean("nll"), "depth": acc.mean("depth")}
    if keep_windows:
        row["window_nll"] = np.concatenate(kept).tolist()
    return row, (np.array([acc.mean(f"extra{i}") for i in range(extras)]) if extras else None)


def _nll(logits, ids):
    """``(nll_b, n)``: each window's summed next-token NLL (its first token unscored) and the targets counted."""
    return token_nll(logits, ids).sum(-1), jnp.float32(ids.shape[0] * (ids.shape[1] - 1))


def teacher_stats(teacher, windows, batch_size: int = 16) -> dict:
    """The sequential model's perplexity (depth 1: every token through every layer) and each window's NLL."""
    fn = jax.jit(lambda ids: (*_nll(teacher.module.apply({"params": teacher.params}, ids).logits, ids), 1.0))
    return _accumulate(fn, windows, batch_size, keep_windows=True)[0]


def radial_stats(student, params, windows, batch_size: int = 16, threshold: Optional[float] = None,
                 fn=None, routes: Optional[RouteStats] = None, keep_windows: bool = False) -> dict:
    """Perplexity, mean depth (``depth_fraction``) and ``compute`` (executed FLOPs / dense) of a
    ``RadialModel`` with ``params``; ``routes`` (a ``RouteStats``) also counts its routes; ``keep_windows``:
    each window's summed NLL too (``window_nll``)."""
    fn = fn or _radial_fn(student)
    thr = jnp.float32(0.0 if threshold is None else threshold)

    def run(ids):
        nll_b, n, depth, compute, router = fn(params, ids, thr)
        if routes is not None:
            routes.add(router, np.ones(ids.shape, bool))
        return nll_b, n, depth, compute
    row, extra = _accumulate(run, windows, batch_size, keep_windows=keep_windows)
    return {**row, "compute": float(extra[0])}


def _radial_fn(student):
    oracle = student.radial.is_oracle

    @jax.jit
    def fn(params, ids, thr):
        out = student.module.apply({"params": params}, ids, threshold=thr if oracle else None)
        return (*_nll(out.logits, ids), out.metrics.depth_fraction, out.metrics.compute_fraction, out.router)
    return fn


def layer_oracle_curve(student, teacher, windows, thresholds, batch_size: int = 16, progress: bool = False) -> list:
    """§3 at layer granularity through the Radial Network's oracle routing, the teacher's layers."""
    oracle = student.replace(routing="oracle", cache_policy="propagate", mode="ordered", max_steps=None,
                             capacity_factor=1.0, dispatch="token", gate="straight_through")
    params = {**teacher.params, "router": oracle.params["router"]}
    fn = _radial_fn(oracle)
    return [{"threshold": float(t), **radial_stats(oracle, params, windows, batch_size, threshold=t, fn=fn)}
            for t in tqdm(thresholds, desc="layer oracle", disable=not progress, leave=False)]


def block_oracle_curve(teacher, windows, thresholds, batch_size: int = 16, progress: bool = False) -> list:
    """§3 as written (attention and MLP blocks decided apart) through the sequential model. ``depth`` is
    the fraction of layer FLOPs kept; ``blocks_kept`` the fraction of blocks."""
    lc = teacher.config.layer_config()
    cost = lc.block_flops_per_token((windows.shape[1] + 1) / 2)
    w_attn = cost["attn"] / (cost["attn"] + cost["mlp"])

    @jax.jit
    def fn(ids, thr):
        out = teacher.module.apply({"params": teacher.params}, ids, threshold=thr)
        a, m = jnp.mean(out.stats.attn.keep), jnp.mean(out.stats.mlp.keep)
        return (*_nll(out.logits, ids), w_attn * a + (1 - w_attn) * m, (a + m) / 2)

    curve = []
    for t in tqdm(thresholds, desc="block oracle", disable=not progress, leave=False):
        row, extra = _accumulate(fn, windows, batch_size, jnp.float32(t))
        curve.append({"threshold": float(t), **row, "compute": row["depth"], "blocks_kept": float(extra[0])})
    return curve


def student_offset_curve(student, windows, offsets, batch_size: int = 16, progress: bool = False,
                         fn=None) -> list:
    """The student's router with every layer column ``offset`` above skip and exit, over ``offsets``.
    ``fn``: the student's compiled forward (``_radial_fn``), when the caller has one already."""
    fn = fn or _radial_fn(student)
    rows = []
    for o in tqdm(offsets, desc="router offsets", disable=not progress, leave=False):
        params = {**student.params, "router": with_keep_offset(student.params["router"], o)}
        rows.append({"offset": float(o), **radial_stats(student, params, windows, batch_size, fn=fn)})
    return rows


def interpolate_at(curve: Sequence[dict], x: float, key: str = "compute") -> Optional[float]:
    """Perplexity of a curve at ``curve[key] == x`` by linear interpolation (None outside its range)."""
    pts = sorted((c[key], c["ppl"]) for c in curve)
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    if not len(xs) or x < xs.min() - 1e-9 or x > xs.max() + 1e-9:
        return None
    return float(np.interp(x, xs, ys))


def evaluate(students, teacher, windows, *, thresholds=DEFAULT_THRESHOLDS, offsets=DEFAULT_OFFSETS,
             batch_size: int = 16, png: Optional[Path] = None, out_json: Optional[Path] = None,
             routes_png: Optional[Path] = None, progress: bool = True) -> dict:
    """Teacher vs students vs oracles on ``windows`` (``[n, seq_len]`` token ids); see the module docstring.

    ``students``: a ``RadialModel``, or ``{name: RadialModel}`` (e.g. the ordered and the radial student),
    all of the same ``teacher``, the sequential ``rj.Model`` they were distilled from (the oracles are the
    teacher's). ``routes_png``: a directory for each student's route plot (``<name>_routes.png``).
    Returns a dict; with one student, ``result["student"]`` is its row.
    """
    named: Dict[str, object] = dict(students) if isinstance(students, dict) else {"student": students}
    windows = np.asarray(windows)
    if windows.ndim != 2:
        raise ValueError(f"windows must be [n, seq_len], got shape {windows.shape}")
    if len(windows) < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} eval windows, got {len(windows)}")
    for name, student in named.items():
        if (student.config.num_layers != teacher.config.num_layers
                or student.config.vocab_size != teacher.config.vocab_size):
            raise ValueError(f"student {name!r} and the teacher must share the architecture (layers, vocabulary)")
    first = next(iter(named.values()))
    bar = tqdm(total=3 + 2 * len(named), desc="eval", disable=not progress)
    fns = {name: _radial_fn(student) for name, student in named.items()}  # one compile per student, started
    ids = next(iter(window_batches(windows, batch_size)))  # now, while the teacher and the oracles run
    ahead = CompileAhead([(fns[name], (s.params, ids, jnp.float32(0.0))) for name, s in named.items()])
    teacher_row = teacher_stats(teacher, windows, batch_size); bar.update()
    oracle = layer_oracle_curve(first, teacher, windows, thresholds, batch_size, progress); bar.update()
    blocks = block_oracle_curve(teacher, windows, thresholds, batch_size, progress); bar.update()
    ahead.wait()
    head = head_flops(teacher.config, 1)
    dense = dense_flops(teacher.config, 1, windows.shape[1], with_head=False)
    rows = {}
    for name, student in named.items():
        L, S = student.config.num_layers, student.radial.steps(student.config.num_layers)
        routes = RouteStats(L, S)
        fn = fns[name]  # one compile for the student's point and its offset curve
        point = radial_stats(student, student.params, windows, batch_size, fn=fn, routes=routes, keep_windows=True)
        bar.update()
        curve = student_offset_curve(student, windows, offsets, batch_size, progress, fn=fn); bar.update()
        oracle_ppl = interpolate_at(oracle, point["compute"])
        rows[name] = {
            **point, "mode": student.radial.mode, "radial_config": dataclasses.asdict(student.radial),
            "flops_fraction_total": (point["compute"] * dense + head) / (dense + head),
            "ppl_increase_vs_teacher": point["ppl"] / teacher_row["ppl"] - 1.0,
            "oracle_ppl_at_same_compute": oracle_ppl,
            "ppl_vs_oracle_at_same_compute": None if oracle_ppl is None else point["ppl"] / oracle_ppl - 1.0,
            "block_oracle_ppl_at_same_compute": interpolate_at(blocks, point["compute"]),
            "curve": curve, "route_stats": routes.summary()}
        if routes_png is not None:
            routes.plot(Path(routes_png) / f"{name}_routes.png", title=name)
    bar.close()
    result = {
        "teacher": teacher_row, "students": rows, "oracle_curve": oracle, "block_oracle_curve": blocks,
        "eval_tokens": int(windows.size),
        "depth_unit": "layer visits per token / L", "compute_unit": "executed FLOPs / the teacher's (layers)",
        "ratio_kind": "out (|F(x)| / |x + F(x)|, whole layer)",
    }
    if len(rows) == 1:
        result["student"] = next(iter(rows.values()))
    if png is not None:
        plot_curves(result, png)
        result["png"] = str(png)
    if out_json is not None:
        atomic_write_json(out_json, result)
    return result


def plot_curves(result: dict, png) -> None:
    """Perplexity against executed compute: the oracles, each student's router sweep and point, the teacher."""
    plt, fig, (ax,) = figure(1, width=6.0, height=4.2)
    for name, curve, style in (("layer oracle (threshold sweep)", result["oracle_curve"], "o-"),
                               ("block oracle (FLOPs kept)", result.get("block_oracle_curve", []), "^:")):
        pts = sorted((c["compute"], c["ppl"]) for c in curve)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name, ms=4, color="tab:gray")
    for (name, row), color in zip(result["students"].items(), ("tab:red", "tab:blue", "tab:green", "tab:purple")):
        pts = sorted((c["compute"], c["ppl"]) for c in row["curve"])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "s--", ms=4, color=color,
                label=f"{name} ({row['mode']}): router sweep")
        ax.plot([row["compute"]], [row["ppl"]], "*", ms=13, color=color, label=f"{name}")
    ax.axhline(result["teacher"]["ppl"], color="k", lw=0.8, label="teacher (all layers)")
    ax.set(xlabel="executed FLOPs / teacher (layers)", ylabel="perplexity", yscale="log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(plt, fig, png, dpi=120)

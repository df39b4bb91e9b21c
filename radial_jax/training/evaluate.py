"""Evaluation of a routed student against its teacher and the oracles (``radial-jax eval``).

Everything runs the real networks:

* teacher: the sequential model (``teacher.module``), every layer;
* student: the Radial Network with its real dispatch; its depth is
  ``metrics.depth_fraction`` (layer visits / L per token) and its compute
  ``metrics.compute_fraction`` (executed FLOPs / the sequential model's, by
  construction from the shapes that ran);
* layer oracle (DESIGN.md §3 at layer granularity): the same Radial Network with
  ``routing="oracle"``, ``cache_policy="propagate"`` and the *teacher's* layers,
  swept over thresholds;
* block oracle (§3 as written: attention and MLP blocks decided apart): the
  sequential model's ``threshold=`` forward; its depth is the fraction of layer
  FLOPs kept (blocks weighted by their cost);
* student curve: the router swept over keep offsets (``offset`` added to every
  keep logit: the exit/skip column's bias minus ``offset``), showing what the
  same router buys at other depths.

FLOPs are counted by ``radial_jax.flops`` from the shapes that ran: the student's
layers, router and *propagate* writes against the teacher's layers
(``compute``); ``flops_fraction_total`` adds the LM head, the same for both.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from radial_jax.flops import dense_flops, head_flops
from radial_jax.radial.router import with_keep_offset
from radial_jax.training import losses

DEFAULT_THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.8)
DEFAULT_OFFSETS = (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0)


def _batches(windows, batch_size):
    if len(windows) < batch_size:
        raise ValueError(f"need at least {batch_size} eval windows, got {len(windows)}")
    for i in range(0, len(windows) - batch_size + 1, batch_size):
        yield jnp.asarray(windows[i:i + batch_size])


def _accumulate(fn, windows, batch_size, *args):
    """Token-weighted perplexity and depth of ``fn(ids, *args) -> (nll_sum, n, depth[, extra...])``."""
    tot = cnt = dep = 0.0
    extra = None
    for ids in _batches(windows, batch_size):
        s, n, d, *more = fn(ids, *args)
        tot, cnt, dep = tot + float(s), cnt + float(n), dep + float(d) * float(n)
        more = np.array([float(m) * float(n) for m in more])
        extra = more if extra is None else extra + more
    row = {"ppl": float(np.exp(tot / cnt)), "nll": tot / cnt, "depth": dep / cnt}
    return row, (None if extra is None else extra / cnt)


def _nll(logits, ids):
    nll, n = losses.lm_cross_entropy(logits, ids)
    return nll * n, n


def teacher_stats(teacher, windows, batch_size: int = 16) -> dict:
    """The sequential model's perplexity (depth 1: every token through every layer)."""
    fn = jax.jit(lambda ids: (*_nll(teacher.module.apply({"params": teacher.params}, ids).logits, ids), 1.0))
    return _accumulate(fn, windows, batch_size)[0]


def radial_stats(student, params, windows, batch_size: int = 16, threshold: Optional[float] = None,
                 fn=None) -> dict:
    """Perplexity, mean depth (``depth_fraction``) and ``compute`` (executed FLOPs / dense) of a
    ``RadialModel`` with ``params``."""
    fn = fn or _radial_fn(student)
    thr = jnp.float32(0.0 if threshold is None else threshold)
    row, extra = _accumulate(lambda ids: fn(params, ids, thr), windows, batch_size)
    return {**row, "compute": float(extra[0])}


def _radial_fn(student):
    oracle = student.radial.routing == "oracle"

    @jax.jit
    def fn(params, ids, thr):
        out = student.module.apply({"params": params}, ids, threshold=thr if oracle else None)
        return (*_nll(out.logits, ids), out.metrics.depth_fraction, out.metrics.compute_fraction)
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
        curve.append({"threshold": float(t), **row, "blocks_kept": float(extra[0])})
    return curve


def student_offset_curve(student, windows, offsets, batch_size: int = 16, progress: bool = False) -> list:
    fn = _radial_fn(student)
    rows = []
    for o in tqdm(offsets, desc="router offsets", disable=not progress, leave=False):
        params = {**student.params, "router": with_keep_offset(student.params["router"], o)}
        rows.append({"offset": float(o), **radial_stats(student, params, windows, batch_size, fn=fn)})
    return rows


def interpolate_at_depth(curve: Sequence[dict], depth: float) -> Optional[float]:
    """Perplexity of a (depth, ppl) curve at ``depth`` by linear interpolation (None outside its range)."""
    pts = sorted((c["depth"], c["ppl"]) for c in curve)
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    if depth < xs.min() - 1e-9 or depth > xs.max() + 1e-9:
        return None
    return float(np.interp(depth, xs, ys))


def evaluate(student, teacher, windows, *, thresholds=DEFAULT_THRESHOLDS, offsets=DEFAULT_OFFSETS,
             batch_size: int = 16, png: Optional[Path] = None, out_json: Optional[Path] = None,
             progress: bool = True) -> dict:
    """Teacher vs student vs oracles on ``windows`` (``[n, seq_len]`` token ids); see the module docstring.

    ``student``: a ``RadialModel`` (``student.params`` trained). ``teacher``: the sequential ``rj.Model``
    it was distilled from (the oracles are always the teacher's).
    """
    windows = np.asarray(windows)
    if windows.ndim != 2:
        raise ValueError(f"windows must be [n, seq_len], got shape {windows.shape}")
    if len(windows) < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} eval windows, got {len(windows)}")
    if student.config.num_layers != teacher.config.num_layers or student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError("the student and the teacher must share the architecture (layers and vocabulary)")
    bar = tqdm(total=5, desc="eval", disable=not progress)
    teacher_row = teacher_stats(teacher, windows, batch_size); bar.update()
    routed = radial_stats(student, student.params, windows, batch_size); bar.update()
    oracle = layer_oracle_curve(student, teacher, windows, thresholds, batch_size, progress); bar.update()
    blocks = block_oracle_curve(teacher, windows, thresholds, batch_size, progress); bar.update()
    curve = student_offset_curve(student, windows, offsets, batch_size, progress); bar.update()
    bar.close()
    head = head_flops(student.config, 1)
    dense = dense_flops(student.config, 1, windows.shape[1], with_head=False)
    flops = {"flops_fraction_layers": routed["compute"],
             "flops_fraction_total": (routed["compute"] * dense + head) / (dense + head)}
    oracle_ppl = interpolate_at_depth(oracle, routed["depth"])
    result = {
        "teacher": teacher_row, "student": {**routed, **flops},
        "radial_config": dataclasses.asdict(student.radial),
        "ppl_increase_vs_teacher": routed["ppl"] / teacher_row["ppl"] - 1.0,
        "oracle_ppl_at_student_depth": oracle_ppl,
        "ppl_vs_oracle_at_same_depth": None if oracle_ppl is None else routed["ppl"] / oracle_ppl - 1.0,
        "block_oracle_ppl_at_student_depth": interpolate_at_depth(blocks, routed["depth"]),
        "oracle_curve": oracle, "block_oracle_curve": blocks, "student_curve": curve,
        "eval_tokens": int(windows.size),
        "depth_unit": "layer visits per token / L (real dispatch; block oracle: fraction of layer FLOPs kept)",
        "ratio_kind": "out (|F(x)| / |x + F(x)|, whole layer)",
    }
    if png is not None:
        plot_curves(result, png)
        result["png"] = str(png)
    if out_json is not None:
        from radial_jax.io import atomic_write_text
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out_json), json.dumps(result, indent=2))
    return result


def plot_curves(result: dict, png) -> None:
    """Perplexity against mean depth: the oracles (thresholds), the student (offsets), teacher, routed point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, curve, style in (("layer oracle (threshold sweep)", result["oracle_curve"], "o-"),
                               ("block oracle (x: layer FLOPs kept)", result.get("block_oracle_curve", []), "^:"),
                               ("student router (keep-offset sweep)", result["student_curve"], "s--")):
        if not curve:
            continue
        pts = sorted((c["depth"], c["ppl"]) for c in curve)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name, ms=4)
    ax.axhline(result["teacher"]["ppl"], color="k", lw=0.8, label="teacher (all layers)")
    ax.plot([result["student"]["depth"]], [result["student"]["ppl"]], "r*", ms=12, label="student")
    ax.set_xlabel("mean depth (fraction of layers)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(png).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(png)

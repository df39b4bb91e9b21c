"""Benchmark: does routing save real compute and latency? Routed vs dense, side by side, interleaved.

OPT-125M shapes by default (random weights; 12 layers of width 768), on a small
shared CPU pass smaller flags. Every timed pair is interleaved (dense, routed,
dense, routed, ...); ratios are per round, reported as the median and spread.
Both sides run in the inference layout (``with_layout("per_layer")``: per-layer
weights and caches, what ``generate`` serves).

* **decoding** (one token per row per step over a prefilled cache, the layer
  stack alone and with the LM head): batch 1 at 50 % and 25 % mean depth, batch 8
  at 50 %, ordered mode; routes from a fresh router whose keep bias is calibrated
  to the target depth on the decoded tokens (so depth comes from the router, not
  from the capacity);
* **prefill** (parallel forward of ``batch x length``): ordered and radial mode at
  capacity factor 0.5 and 0.25 (radial: a router with random routes over all layers
  and exit); the keep offset is bisected toward a depth just above the capacity, and
  since depth is measured after the budget, it ends at its bound: the routes want
  more than the budget admits, so the capacity binds and decides the depth (the
  refused visits are in the details, ``dropped``); executed FLOPs (by
  construction) against the dense model's;
* **prefill, routes that fit** (radial mode): the same random router calibrated
  where no budget binds to want 50 % and 25 % depth, served at the capacity
  fitted to its routes on other text (``fit_capacity``: factor, slack and static sizes), so the
  depth is the routes' own and compute follows them, not a budget;
* **overhead** at capacity factor 1 where every route runs (ordered: keep
  everything; radial: identity routes with a budget that drops nothing): the
  routed forward's wall time against dense.

XLA's FLOPs of the dense forward (``cost_analysis``, layer scan unrolled so every
layer counts) cross-check the by-construction count.

    python experiments/bench_radial.py                                       # 125M shapes
    python experiments/bench_radial.py --hidden 256 --ffn 1024 --heads 4 --layers 6 --length 128 --quick
    python experiments/bench_radial.py --only prefill_fitted --out /tmp/fitted.json          # some rows only
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import benchlib  # noqa: E402
import radial_jax as rj  # noqa: E402
from radial_jax.radial import RadialModel  # noqa: E402
from radial_jax.radial.router import with_keep_offset  # noqa: E402
from radial_jax.serving.speed import timed_decode  # noqa: E402


JOB_KINDS = ("overhead", "prefill", "prefill_fitted", "decode")  # what --only selects


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=3072)
    ap.add_argument("--vocab", type=int, default=50272)
    ap.add_argument("--batch", type=int, default=8, help="prefill batch")
    ap.add_argument("--length", type=int, default=512, help="prefill length")
    ap.add_argument("--decode-prompt", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds per pair")
    ap.add_argument("--quick", action="store_true", help="fewer settings (a smoke run)")
    ap.add_argument("--only", nargs="+", choices=JOB_KINDS, metavar="KIND",
                    help=f"run only these kinds of job ({', '.join(JOB_KINDS)}): a partial result, so --out must "
                         "name a file other than a committed results/bench_radial*.json")
    ap.add_argument("--out", default=str(benchlib.RESULTS / "bench_radial.json"))
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    if args.only and out.parent == benchlib.RESULTS.resolve() and out.name.startswith("bench_radial"):
        ap.error(f"--only writes some rows of the benchmark, and {args.out} is where a whole run is committed "
                 "(the README's tables read it); give --out another path, e.g. /tmp/bench_radial_only.json")
    return args


def calibrate(rm, ids, target: float, lo: float = -15.0, hi: float = 15.0, start: int = 0):
    """The router's keep offset (``with_keep_offset``) that gives ``target`` mean depth on ``ids``
    (bisection), measured on the tokens at positions ``>= start`` (decoding: the decoded tokens;
    the parallel forward routes them as decoding does, docs/design.md §4)."""
    L = rm.config.num_layers

    def measure(offset):
        trial = rm.replace(params={**rm.params, "router": with_keep_offset(rm.params["router"], offset)})
        depth_bt = trial.forward(ids, compute_logits=False).metrics.depth
        return float(jnp.mean(depth_bt[:, start:])) / L

    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if measure(mid) < target else (lo, mid)
    offset = (lo + hi) / 2
    return rm.replace(params={**rm.params, "router": with_keep_offset(rm.params["router"], offset)}), offset


def bench_decode(model, b, depth, args, figures, details):
    ids = np.random.default_rng(b).integers(3, model.config.vocab_size, (b, args.decode_prompt + args.decode_steps))
    rm = RadialModel.from_sequential(model, mode="ordered", router_init_scale=1.0, seed=b)
    rm, offset = calibrate(rm, jnp.asarray(ids), depth, start=args.decode_prompt)  # on the decoded tokens
    # both sides in the inference layout, through their decoding() and the one decode loop (what generate runs)
    dense_model, routed_model = model.with_layout("per_layer"), rm.with_layout("per_layer")
    prompt, feed = ids[:, :args.decode_prompt], ids[:, args.decode_prompt:]
    row = {"batch": b, "target_depth": depth, "keep_offset": offset, "layout": "per_layer"}
    half = b // 2  # what half the rows cost dense: the best a layer visited by half of them can do
    L = model.config.num_layers
    for head in (False, True):
        sides = {"dense": timed_decode(dense_model, prompt, feed, compute_logits=head),
                 "routed": timed_decode(routed_model, prompt, feed, compute_logits=head, record=("flops", "metrics"))}
        if half and not head:
            sides["dense_half"] = timed_decode(dense_model, prompt[:half], feed[:half], compute_logits=head)
        dense_flops = jax.device_get(sides["dense"]()["flops"])
        routed = jax.device_get(sides["routed"]())
        m = routed["metrics"]
        rounds = benchlib.interleave(sides, args.repeats)
        speedup = benchlib.ratio(rounds, "dense", "routed")
        key = "with_head" if head else "layers"
        if "dense_half" in sides:
            cost = benchlib.ratio(rounds, "dense_half", "dense")  # time(half the rows) / time(all of them)
            row["half_batch_time_ratio"] = cost
            figures.append(benchlib.figure(
                f"decode_b{b}_half_batch_cost", f"dense decode step time, batch {half} / batch {b}", cost,
                note="the floor of a layer that half the rows visit, relative to running it on all rows"))
        row[key] = {"speedup": speedup, "mean_depth_fraction": float(np.mean(m.depth_fraction)),
                    "compute_fraction": float(np.mean(m.compute_fraction)),
                    "step_flops_fraction": float(np.sum(routed["flops"]) / np.sum(dense_flops)),
                    "layers_run_fraction": float(np.mean(np.sum(m.layer_sizes > 0, axis=(1, 2)) / L)),
                    "dense_tokens_per_s": benchlib.rate(rounds, "dense", b * args.decode_steps),
                    "routed_tokens_per_s": benchlib.rate(rounds, "routed", b * args.decode_steps)}
        target = {(1, 0.5): 1.6, (1, 0.25): 3.0, (8, 0.5): 1.5}.get((b, depth))
        what = "layer stack" if not head else "with the LM head"
        figures.append(benchlib.figure(
            f"decode_b{b}_d{int(depth * 100)}_{key}",
            f"routed decode vs dense, batch {b}, {100 * row[key]['mean_depth_fraction']:.0f} % depth, {what}",
            speedup, unit="x", target=None if head or target is None else f">= {target}",
            met=None if head or target is None else speedup["median"] >= target,
            note=f"executed FLOPs {100 * row[key]['compute_fraction']:.0f} % of dense, layers run "
                 f"{100 * row[key]['layers_run_fraction']:.0f} %"))
        print("decode", b, depth, key, speedup, flush=True)
    details.setdefault("decode", []).append(row)


def serving_params(model, rm):
    """Both sides' parameters in the inference layout (what ``generate`` serves: per-layer weights)."""
    return model.with_layout("per_layer").params, rm.with_layout("per_layer").params


def routed_forward(rm):
    @jax.jit
    def f(params, ids):
        out = rm.module.apply({"params": params}, ids, compute_logits=False)
        return out.hidden, out.metrics
    return f


def time_prefill(model, rm, ids, dense_fwd, args):
    """The routed forward of ``rm`` against dense on ``ids``, interleaved: what ran and how fast."""
    f = routed_forward(rm)
    dense_params, routed_params = serving_params(model, rm)
    _, m = f(routed_params, ids)
    rounds = benchlib.interleave({"dense": lambda: dense_fwd(dense_params, ids),
                                  "routed": lambda: f(routed_params, ids)}, args.repeats)
    rc = rm.radial
    return {"mode": rc.mode, "capacity_factor": rc.capacity_factor, "capacity_slack": rc.capacity_slack,
            "prefill_buckets": rc.prefill_buckets, "c_max": rc.max_capacity(model.config.num_layers, ids.shape[1]),
            "speedup": benchlib.ratio(rounds, "dense", "routed"),
            "depth_fraction": float(m.depth_fraction), "compute_fraction": float(m.compute_fraction),
            "executed_flops": float(m.executed_flops), "dense_flops": float(m.dense_flops),
            "dropped": int(m.dropped.sum()), "layer_sizes": np.asarray(m.layer_sizes).tolist(), "layout": "per_layer"}


def prefill_figures(row, key, what, target, figures):
    """A prefill row's two figures: speed-up (``target``) and executed FLOPs against depth."""
    speedup = row["speedup"]
    figures.append(benchlib.figure(
        key, f"routed prefill vs dense, {what}", speedup, unit="x", target=f">= {target}",
        met=speedup["median"] >= target,
        note=f"depth {100 * row['depth_fraction']:.0f} %, executed FLOPs {100 * row['compute_fraction']:.0f} %"))
    figures.append(benchlib.figure(
        f"{key}_flops", f"routed prefill executed FLOPs / dense, {what}", row["compute_fraction"],
        target=f"<= depth {row['depth_fraction']:.2f} + 0.05",
        met=row["compute_fraction"] <= row["depth_fraction"] + 0.05))
    print(key, speedup, row["depth_fraction"], row["compute_fraction"], flush=True)


PREFILL_TARGETS = {0.5: 1.6, 0.25: 3.2}  # speed-up wanted at capacity (or depth) 0.5 and 0.25
# keep offsets searched for routes that fit: the random radial router's logits (scale 50) need more than
# +-15 to reach 50 % and 25 % depth at 125M shapes (there the search ended at its bounds, at 47 % and 35 %)
FITTED_OFFSET_RANGE = 150.0


def bench_prefill(model, ids, dense_fwd, mode, cf, args, figures, details):
    """A capacity that binds: routes that want a little more than ``cf`` admits."""
    if mode == "ordered":
        rm = RadialModel.from_sequential(model, mode=mode, capacity_factor=cf, router_init_scale=1.0, seed=3)
    else:  # random routes over every layer and exit: a balanced load
        rm = RadialModel.from_sequential(model, mode=mode, capacity_factor=cf, router_init_scale=50.0, seed=3)
    rm, offset = calibrate(rm, ids[:2], min(1.0, cf * 1.1))  # ends at its bound: the budget binds (docstring)
    row = {**time_prefill(model, rm, ids, dense_fwd, args), "keep_offset": offset}
    prefill_figures(row, f"prefill_{mode}_c{int(cf * 100)}", f"{mode} mode, capacity {cf}", PREFILL_TARGETS[cf],
                    figures)
    details.setdefault("prefill", []).append(row)


def bench_prefill_fitted(model, ids, dense_fwd, depth, args, figures, details):
    """Routes that fit: random radial routes that want ``depth`` (calibrated where no budget binds), served
    at the capacity fitted to them on other text (``fit_capacity``: nothing refused there)."""
    L = model.config.num_layers
    rm = RadialModel.from_sequential(model, mode="radial", capacity_factor=float(L), router_init_scale=50.0, seed=3)
    rm, offset = calibrate(rm, ids, depth, lo=-FITTED_OFFSET_RANGE, hi=FITTED_OFFSET_RANGE)
    calibration = np.random.default_rng(1).integers(3, model.config.vocab_size, ids.shape)
    fitted = rm.fit_capacity(calibration, batch_size=ids.shape[0])
    row = {**time_prefill(model, fitted, ids, dense_fwd, args), "keep_offset": offset, "target_depth": depth}
    prefill_figures(row, f"prefill_radial_fit_d{int(depth * 100)}",
                    f"radial mode, {100 * row['depth_fraction']:.0f} % depth (calibrated toward {100 * depth:.0f} %), "
                    "capacity fitted to the routes",
                    PREFILL_TARGETS[depth], figures)
    details.setdefault("prefill_fitted", []).append(row)


def bench_overhead(model, ids, dense_fwd, mode, args, figures, details):
    L = model.config.num_layers
    if mode == "ordered":  # learned router pushed to keep everything, nothing to drop at capacity 1
        rm = RadialModel.from_sequential(model, mode="ordered", capacity_factor=1.0)
        rm = rm.replace(params={**rm.params, "router": with_keep_offset(rm.params["router"], 30.0)})
    else:  # identity routes (layer s at step s) with a budget that drops nothing
        rm = RadialModel.from_sequential(model, mode="radial", routing="identity", capacity_factor=float(L))
    f = routed_forward(rm)
    dense_params, routed_params = serving_params(model, rm)
    _, m = f(routed_params, ids)
    assert float(m.depth_fraction) == 1.0 and int(m.dropped.sum()) == 0
    rounds = benchlib.interleave({"dense": lambda: dense_fwd(dense_params, ids),
                                  "routed": lambda: f(routed_params, ids)}, args.repeats)
    speed = benchlib.ratio(rounds, "dense", "routed")
    figures.append(benchlib.figure(f"overhead_{mode}", f"routed forward at full depth vs dense, {mode} mode",
                                   speed, unit="x", target=">= 0.95", met=speed["median"] >= 0.95,
                                   note=f"executed FLOPs {100 * float(m.compute_fraction):.0f} % of dense"))
    details.setdefault("overhead", []).append({"mode": mode, "speed": speed, "layout": "per_layer",
                                               "compute_fraction": float(m.compute_fraction)})
    print("overhead", mode, speed, flush=True)


def planned_jobs(args):
    """``[(kind, settings)]``: every job of a run (fewer with ``--quick``), those of ``--only``'s kinds."""
    jobs = [("overhead", m) for m in ("ordered", "radial")]
    jobs += [("prefill", (m, c)) for m in ("ordered", "radial") for c in ((0.5,) if args.quick else (0.5, 0.25))]
    jobs += [("prefill_fitted", d) for d in ((0.5,) if args.quick else (0.5, 0.25))]
    jobs += [("decode", (b, d)) for b, d in (((1, 0.5),) if args.quick else ((1, 0.5), (1, 0.25), (8, 0.5)))]
    return [(kind, job) for kind, job in jobs if not args.only or kind in args.only]


def main(argv=None):
    args = parse_args(argv)
    cfg = rj.OPTConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       ffn_dim=args.ffn, num_attention_heads=args.heads,
                       max_position_embeddings=max(2048, args.length, args.decode_prompt + args.decode_steps))
    model = rj.build(cfg, seed=0)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.length)), jnp.int32)
    dense_fwd = jax.jit(lambda p, x: model.module.apply({"params": p}, x, compute_logits=False).hidden)
    figures, details = [], {}
    from radial_jax.models.flops import dense_flops
    one_layer = rj.build(dataclasses.replace(cfg, num_hidden_layers=1), seed=0)
    xla_layer = benchlib.xla_flops(lambda p, x: one_layer.module.apply({"params": p}, x, compute_logits=False).hidden,
                                   one_layer.params, ids)
    details["flop_check"] = {"dense_by_construction": dense_flops(cfg, args.batch * args.length, args.length,
                                                                  with_head=False),
                             "xla_one_layer_model": xla_layer, "note": "XLA counts a one-layer model (embedding,"
                             " final norm, one layer); the scanned body of an L-layer model is counted once"}

    for kind, job in tqdm(planned_jobs(args), desc="bench_radial"):
        if kind == "overhead":
            bench_overhead(model, ids, dense_fwd, job, args, figures, details)
        elif kind == "prefill":
            bench_prefill(model, ids, dense_fwd, *job, args, figures, details)
        elif kind == "prefill_fitted":
            bench_prefill_fitted(model, ids, dense_fwd, job, args, figures, details)
        else:
            bench_decode(model, *job, args, figures, details)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    shapes = f"L {args.layers} x d {args.hidden}"  # the model every figure was measured on
    for fig in figures:
        fig["label"] = f"{fig['label']} ({shapes})"
    out = benchlib.write_result(args.out, "bench_radial", settings, figures, details)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

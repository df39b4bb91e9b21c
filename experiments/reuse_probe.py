"""Can reusing a layer pay? Static routes through a pretrained pool, at equal numbers of layer visits.

A radial router can only learn reuse if some route that runs a layer twice beats every route that does not, at
the same number of layer visits. This probe asks that of the pool itself, with no router and nothing trained:

* **no repeat**: greedy removal. From the full route, remove, one at a time, the layer whose removal costs
  the least NLL on calibration windows (training split), down to ``L - max(drops) - 1`` visits. The route of
  ``V`` visits is the greedy route of that length (ShortGPT's block-influence drop is scored too, for reference).
* **one repeat**: from the greedy route of ``V - 1`` visits, every route that runs one of its layers twice in
  a row (``..., j, j, ...``, the recursion of Relaxed Recursive Transformers and Mixture-of-Recursions), the
  best on the same calibration windows.

Both winners are then scored on held-out windows with the full model, paired (``radial_jax.training.paired``):
a repeat that pays is a ``repeat / no repeat`` ratio below 1 with its interval. Every scoring is a stage file
under ``--out``, so a stopped probe resumes.

    python experiments/reuse_probe.py --results results/reuse_probe_gemma.json      # Gemma 3 270M (GGUF)
    python experiments/reuse_probe.py --model runs/pipeline/teacher --out runs/reuse_probe_toy \\
        --results results/reuse_probe_toy.json                                       # the pipeline's teacher
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from benchlib import figure, stage, write_result  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint or GGUF file (default: Gemma 3 270M's GGUF)")
    p.add_argument("--out", default="runs/reuse_probe", help="stage files")
    p.add_argument("--drops", default="1,2,3", help="layers fewer than the model: V = L - k visits per k")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--calibration-windows", type=int, default=4, help="training-split windows the search scores")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows of the final comparison")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--adapt-steps", type=int, default=0,
                   help="also give both winners LoRA adapters trained this many steps against the frozen model "
                        "(one adapter per visit: a repeated layer's second visit gets its own); 0: untrained only")
    p.add_argument("--adapt-batch", type=int, default=2)
    p.add_argument("--adapt-lr", type=float, default=5e-4)
    p.add_argument("--adapt-rank", type=int, default=8)
    p.add_argument("--target-windows", type=int, default=64, help="training windows of the cached teacher targets")
    p.add_argument("--results", default=None, help="write the README figures to this JSON")
    args = p.parse_args(argv)
    args.drops = sorted({int(k) for k in args.drops.split(",")})
    return args


def main(argv=None) -> int:
    import radial_jax as rj
    from radial_jax.data import window_batches
    from radial_jax.data.packed import model_text_data
    from radial_jax.profiling.layer_drop import block_influence, least_influential, route_layers
    from radial_jax.models.perplexity import perplexity
    from radial_jax.training.paired import paired_bootstrap, window_nll
    from real_model_study import default_model
    args = parse_args(argv)
    out = Path(args.out)
    model = rj.load(args.model or default_model())
    L = model.config.num_layers
    if not args.drops or args.drops[0] < 1 or args.drops[-1] + 1 >= L:
        raise SystemExit(f"--drops must be integers in [1, {L - 2}] for this {L}-layer model; got {args.drops}")
    data = model_text_data("stdlib", model)
    held = data.windows(args.window, args.eval_windows)[0]
    calib, calib_mask, _ = data.windows(args.window, args.calibration_windows, split="train")
    B = args.batch_size

    def calibration_nll(route) -> float:  # one stage per route: the search's scores survive a restart
        name = "calib_" + "-".join(map(str, route))
        return stage(out / "search", name, lambda: {"nll": float(window_nll(
            route_layers(model, route), calib, B)[0].sum())})["nll"]

    def best(candidates):
        scores = [calibration_nll(r) for r in candidates]
        return candidates[int(np.argmin(scores))]

    greedy = {L: list(range(L))}  # visits -> the greedy route of that many visits
    for v in range(L - 1, L - args.drops[-1] - 2, -1):
        prev = greedy[v + 1]
        greedy[v] = best([prev[:i] + prev[i + 1:] for i in range(len(prev))])
    repeat = {}
    for k in args.drops:
        base = greedy[L - k - 1]
        repeat[L - k] = best([base[:i + 1] + [base[i]] + base[i + 1:] for i in range(len(base))])
    influence = block_influence(model, window_batches((calib, calib_mask), B))
    shortgpt = {L - k: [i for i in range(L) if i not in least_influential(influence, k)] for k in args.drops}

    def held_out(route):
        res = stage(out, "held_" + "-".join(map(str, route)), lambda: dict(zip(
            ("nll", "scored"), (a.tolist() for a in window_nll(route_layers(model, route), held, B, progress=True)))))
        return np.asarray(res["nll"]), np.asarray(res["scored"])

    full = held_out(list(range(L)))
    adapted = adapted_scorer(model, data, held, args, out) if args.adapt_steps > 0 else None
    rows = []
    for k in args.drops:
        v = L - k
        arms = {"no repeat (greedy)": greedy[v], "one repeat": repeat[v], "ShortGPT drop": shortgpt[v]}
        scores = {name: held_out(route) for name, route in arms.items()}
        if adapted is not None:  # the same adapters, targets and steps for both winners
            scores.update({f"{name}, adapted": adapted(arms[name]) for name in ("no repeat (greedy)", "one repeat")})
        rows.append({"visits": v, "routes": arms,
                     "perplexity": {n: perplexity(s[0].sum(), s[1].sum()) for n, s in scores.items()},
                     "vs_full": {n: paired_bootstrap(full, s, reps=args.bootstrap) for n, s in scores.items()},
                     "repeat_vs_no_repeat": paired_bootstrap(scores["no repeat (greedy)"], scores["one repeat"],
                                                             reps=args.bootstrap)})
        if adapted is not None:
            rows[-1]["adapted_repeat_vs_no_repeat"] = paired_bootstrap(
                scores["no repeat (greedy), adapted"], scores["one repeat, adapted"], reps=args.bootstrap)
        for key in ("repeat_vs_no_repeat", "adapted_repeat_vs_no_repeat"):
            if key in rows[-1]:
                r = rows[-1][key]
                print(f"{v} of {L} visits, {key}: one repeat {repeat[v]} / no repeat {greedy[v]}: perplexity "
                      f"{r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}]")
    summary = {"model": model.name, "layers": L, "full_perplexity": perplexity(full[0].sum(), full[1].sum()),
               "block_influence": influence.tolist(), "greedy_routes": {str(v): r for v, r in greedy.items()},
               "rows": rows}
    if args.results:
        write_figures(summary, args)
    return 0


def adapted_scorer(model, data, held, args, out: Path):
    """``route -> (nll[n], scored[n])`` on the held-out windows of the route given LoRA adapters trained against
    the frozen model's cached targets (``training.adapt``; resumable in ``out/adapt_<route>_run``)."""
    from radial_jax.profiling.layer_drop import route_layers
    from radial_jax.training.adapt import AdaptConfig, adapt
    from radial_jax.training.lora import LoraConfig
    from radial_jax.training.loop import TrainConfig
    from radial_jax.training.optim import OptimConfig
    from radial_jax.training.paired import window_nll
    from radial_jax.training.targets import TeacherTargets, compute_targets
    path = out / "targets.npz"
    if not path.exists():
        windows = data.windows(args.window, args.target_windows, split="train")[0]
        compute_targets(model, windows, batch_size=args.batch_size).save(path)
    targets = TeacherTargets.load(path)
    cfg = AdaptConfig(lora=LoraConfig(rank=args.adapt_rank), router_weight=0.0, compute_weight=0.0)
    train = TrainConfig(steps=args.adapt_steps, batch_size=args.adapt_batch, seq_len=args.window,
                        optim=OptimConfig(learning_rate=args.adapt_lr, warmup_steps=min(10, args.adapt_steps)),
                        checkpoint_every=max(1, args.adapt_steps // 4), eval_batches=0, log_every=5)

    def score(route):
        name = "-".join(map(str, route))

        def compute():
            student, _, _ = adapt(route_layers(model, route), targets, cfg, train, run_dir=out / f"adapt_{name}_run")
            nll, scored = window_nll(student, held, args.batch_size, progress=True)
            return {"nll": nll.tolist(), "scored": scored.tolist()}
        res = stage(out, f"held_adapted_{name}", compute)
        return np.asarray(res["nll"]), np.asarray(res["scored"])
    return score


def write_figures(summary, args) -> None:
    figs = []
    name = summary["model"].lower()
    short = "Gemma 3 270M" if "gemma" in name else "the pipeline's teacher" if "pipeline" in name else summary["model"]
    for row in summary["rows"]:
        r, v, L = row["repeat_vs_no_repeat"], row["visits"], summary["layers"]
        ppl = row["perplexity"]
        figs.append(figure(
            f"reuse_probe_{v}", f"{short}, {v} of {L} layer visits: best static route with one repeated layer / "
            f"best without (perplexity)", r["ratio"], unit="×", target="< 1 (a repeat pays)",
            met=r["high"] < 1,
            note=f"paired bootstrap 95 % [{r['low']:.3f}, {r['high']:.3f}]; perplexity: repeat "
                 f"{ppl['one repeat']:.1f} via {row['routes']['one repeat']}, no repeat "
                 f"{ppl['no repeat (greedy)']:.1f}, ShortGPT drop {ppl['ShortGPT drop']:.1f}, full model "
                 f"{summary['full_perplexity']:.1f}"))
        if "adapted_repeat_vs_no_repeat" in row:
            r = row["adapted_repeat_vs_no_repeat"]
            figs.append(figure(
                f"reuse_probe_{v}_adapted", f"{short}, {v} of {L} layer visits, each route given LoRA adapters "
                f"({args.adapt_steps} steps, one adapter per visit): with one repeated layer / without", r["ratio"],
                unit="×", target="< 1 (a repeat pays)", met=r["high"] < 1,
                note=f"paired bootstrap 95 % [{r['low']:.3f}, {r['high']:.3f}]; perplexity: repeat "
                     f"{ppl['one repeat, adapted']:.1f}, no repeat {ppl['no repeat (greedy), adapted']:.1f}"))
    settings = {k: v for k, v in vars(args).items() if k != "results"}
    write_result(args.results, "reuse_probe", settings, figs, summary)


if __name__ == "__main__":
    sys.exit(main())

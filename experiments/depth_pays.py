"""Does depth pay on the offline text, and from which training budget? L layers against L/2, same tokens.

A routed student of an L-layer teacher only shows something when the teacher beats a static model half as
deep trained on the same tokens: otherwise the half-depth model is the better use of the compute, whatever
the router does. This study trains the pipeline's teacher shape (``--size``, OPT-shaped, offline BPE) and the
same shape with half its layers, on the same batches in the same order (one seed drives initialisation and
order), for several training lengths and seeds, and compares them on the same held-out windows:

* per training length and seed, the perplexity ratio teacher / half-depth with a paired bootstrap 95 %
  interval over windows (``radial_jax.training.paired``); below 0.90 is the pipeline's "depth pays" gate;
* pooled over seeds: each window's NLL averaged over the seeds' models, then the same paired bootstrap;
* the wall time of each training run on this machine: what a gate at that length would cost the pipeline.

Every model's scores are a stage file under ``--out`` (reused on a rerun, so a stopped study resumes).

    python experiments/depth_pays.py --results results/depth_pays.json    # ~30 min on 2 CPU cores
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


def add_regime_args(p) -> None:
    """The flags that define what a stage file holds (data, model shape, training, held-out windows) and the
    statistics over them: shared with ``joint_recipes.py``, which reuses these stage files and must train and
    score its own models the same way."""
    from radial_jax import defaults as D
    p.add_argument("--data", default=D.DATA)
    p.add_argument("--size", default=D.SIZE, choices=tuple(D.SIZES))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--window", type=int, default=D.WINDOW)
    p.add_argument("--batch-size", type=int, default=D.BATCH_SIZE)
    p.add_argument("--lr", type=float, default=D.LEARNING_RATE)
    p.add_argument("--eval-windows", type=int, default=1024, help="held-out windows scored (paired)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--results", default=None, help="write the README figures to this JSON")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/depth_pays", help="stage files (one per trained model)")
    p.add_argument("--steps", default="600,2000,6000", help="training lengths (updates), comma-separated")
    add_regime_args(p)
    p.add_argument("--png", default=None, help="plot of the ratio against training tokens")
    args = p.parse_args(argv)
    args.steps = [int(s) for s in args.steps.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if min(args.steps) < 1 or not args.seeds:
        p.error("--steps must be positive integers and --seeds non-empty")
    return args


def train_and_score(args, data, layers: int, steps: int, seed: int, held) -> dict:
    """One model of ``layers`` layers trained ``steps`` updates with ``seed``; its per-window held-out NLL."""
    import time
    import radial_jax as rj
    from radial_jax import defaults as D
    from radial_jax.training.lm import train_lm
    from radial_jax.training.loop import TrainConfig
    from radial_jax.training.optim import OptimConfig
    from radial_jax.training.paired import window_nll
    config = rj.OPTConfig(vocab_size=data.vocab_size, max_position_embeddings=max(D.MIN_POSITIONS, args.window),
                          **{**D.SIZES[args.size], "num_hidden_layers": layers})
    train = TrainConfig(steps=steps, batch_size=args.batch_size, seq_len=args.window, seed=seed,
                        optim=OptimConfig(learning_rate=args.lr), checkpoint_every=steps)
    t0 = time.perf_counter()
    model, _ = train_lm(config, data, train=train)
    train_seconds = time.perf_counter() - t0
    nll, scored = window_nll(model, held, args.batch_size, progress=True, desc=f"score L{layers}")
    return {"layers": layers, "steps": steps, "seed": seed, "params": model.num_params,
            "tokens": steps * args.batch_size * args.window, "train_seconds": train_seconds,
            "nll": nll.tolist(), "scored": scored.tolist()}


def main(argv=None) -> int:
    from radial_jax import defaults as D
    from radial_jax.data.packed import text_data
    from radial_jax.models.perplexity import perplexity
    from radial_jax.training.paired import paired_bootstrap
    args = parse_args(argv)
    out = Path(args.out)
    data = text_data(args.data)
    held = data.windows(args.window, args.eval_windows)[0]
    L = D.SIZES[args.size]["num_hidden_layers"]
    depths = (L, max(1, L // 2))
    print(f"{args.data}: {len(data.train):,} training / {len(data.eval):,} held-out tokens; scoring {len(held)} x "
          f"{args.window}; {depths[0]} layers against {depths[1]}")

    def arm(res):
        return np.asarray(res["nll"]), np.asarray(res["scored"])

    rows = []
    for steps in args.steps:
        runs = {(d, seed): stage(out, f"L{d}_steps{steps}_seed{seed}",
                                 lambda d=d, seed=seed: train_and_score(args, data, d, steps, seed, held))
                for seed in args.seeds for d in depths}
        per_seed = []
        for seed in args.seeds:
            deep, half = runs[depths[0], seed], runs[depths[1], seed]
            per_seed.append({"seed": seed, "perplexity": perplexity(*(a.sum() for a in arm(deep))),
                             "half_perplexity": perplexity(*(a.sum() for a in arm(half))),
                             "train_seconds": deep["train_seconds"], "half_train_seconds": half["train_seconds"],
                             **paired_bootstrap(arm(half), arm(deep), reps=args.bootstrap)})
        mean = lambda d: tuple(np.mean([arm(runs[d, s])[i] for s in args.seeds], 0) for i in (0, 1))  # noqa: E731
        rows.append({"steps": steps, "tokens": runs[depths[0], args.seeds[0]]["tokens"], "layers": depths[0],
                     "half_layers": depths[1], "seeds": per_seed,
                     "pooled": paired_bootstrap(mean(depths[1]), mean(depths[0]), reps=args.bootstrap)})
        r = rows[-1]["pooled"]
        print(f"{steps} updates ({rows[-1]['tokens']:,} tokens): {depths[0]} / {depths[1]} layers perplexity "
              f"{r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}]; per seed "
              + ", ".join(f"{s['ratio']:.3f}" for s in per_seed))
    if args.png:
        plot(rows, args.png)
    if args.results:
        write_figures(rows, args)
    return 0


def write_figures(rows, args) -> None:
    figs = []
    for r in rows:
        p, secs = r["pooled"], np.mean([s["train_seconds"] for s in r["seeds"]])
        figs.append(figure(
            f"depth_pays_{r['steps']}", f"depth pays? {r['layers']} / {r['half_layers']} layers perplexity, "
            f"{r['tokens'] / 1e6:.2g}M training tokens ({r['steps']} updates)", p["ratio"], target="<= 0.90",
            met=p["ratio"] <= 0.9 and p["high"] < 1,
            note=f"paired bootstrap 95 % [{p['low']:.3f}, {p['high']:.3f}] over {p['windows']} windows, "
                 f"{len(r['seeds'])} seeds pooled (each: " + ", ".join(f"{s['ratio']:.3f}" for s in r["seeds"])
                 + f"); training the {r['layers']}-layer model took {secs:.0f} s of wall time on this shared machine"))
    settings = {k: v for k, v in vars(args).items() if k not in ("results", "png")}
    write_result(args.results, "depth_pays", settings, figs, {"rows": rows})


def plot(rows, png) -> None:
    from radial_jax.reporting.files import figure as new_figure, save_figure
    plt, fig, (ax,) = new_figure(1, width=5.5, height=3.8)
    for i, seed in enumerate(s["seed"] for s in rows[0]["seeds"]):
        pts = [(r["tokens"], s) for r in rows for s in r["seeds"] if s["seed"] == seed]
        x = np.array([t for t, _ in pts]) * (1 + 0.04 * i)
        y = np.array([s["ratio"] for _, s in pts])
        err = np.array([[s["ratio"] - s["low"] for _, s in pts], [s["high"] - s["ratio"] for _, s in pts]])
        ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, label=f"seed {seed}")
    ax.plot([r["tokens"] for r in rows], [r["pooled"]["ratio"] for r in rows], "k-", label="seeds pooled")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(0.9, color="tab:red", lw=0.8, ls="--", label="gate: depth pays 10 %")
    ax.set(xscale="log", xlabel="training tokens", ylabel=f"perplexity, {rows[0]['layers']} / "
                                                          f"{rows[0]['half_layers']} layers")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(plt, fig, png, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

"""``radial-jax pipeline``: the whole study on one model, offline by default.

Stages (each writes its results atomically and is skipped when a rerun finds them):

1. ``teacher``: train a small OPT-shaped LM on the embedded offline corpus
   (Python's documentation, ``radial_jax.data``) with the offline BPE tokenizer;
   or, with ``--model``, load a checkpoint instead (hub id or local directory).
2. ``profile``: residual ratios of every block on the held-out text (§2).
3. ``simulate``: oracle layer skipping over a threshold sweep (§3).
4. ``distill``: distil the teacher into a Radial Network (ordered mode; router
   and layers trained by default, ``--distill-train router`` freezes the layers)
   with ``radial_jax.training``.
5. ``evaluate``: perplexity and mean depth of the routed student against the
   teacher and the oracle at the same depth; the quality-against-compute PNG.

Everything lands in ``--out`` (default ``runs/pipeline``), with ``summary.json``
naming the model and data actually used.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np


def _done(path: Path) -> bool:
    return path.exists()


def run_pipeline(args) -> int:
    import jax
    import radial_jax as rj
    from radial_jax.data import perplexity_windows
    from radial_jax.io import atomic_write_text
    from radial_jax.profiling.skipping import check_thresholds
    from radial_jax.training.artifacts import load_model, save_model, save_student
    from radial_jax.training.cli import SIZES
    from radial_jax.training.loop import TrainConfig
    from radial_jax.training.optim import OptimConfig
    from radial_jax.training.pipeline import text_data

    thresholds = check_thresholds([float(t) for t in args.thresholds.split(",")])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    data = text_data(args.data)
    print(f"data: {data.source} ({len(data.train):,} train / {len(data.eval):,} eval tokens, "
          f"tokenizer vocab {data.vocab_size})")

    # 1. teacher
    t0 = time.perf_counter()
    teacher_dir = out / "teacher"
    if args.model:
        teacher = rj.load(args.model)
        teacher_name = str(args.model)
    elif _done(teacher_dir / "params.msgpack"):
        teacher, teacher_name = load_model(teacher_dir), "offline-opt (trained by this pipeline, reused)"
        print(f"[teacher] reusing {teacher_dir}")
    else:
        config = rj.OPTConfig(vocab_size=data.vocab_size, max_position_embeddings=max(256, args.window),
                              **SIZES[args.size])
        train = TrainConfig(steps=args.teacher_steps, batch_size=args.batch_size, seq_len=args.window,
                            optim=OptimConfig(learning_rate=args.lr), checkpoint_every=max(1, args.teacher_steps // 4))
        from radial_jax.training.lm import train_lm
        teacher, _ = train_lm(config, data, train=train, run_dir=out / "teacher_run")
        save_model(teacher, teacher_dir, data=data.source)
        teacher_name = "offline-opt (trained by this pipeline)"
    teacher.name = teacher_name
    timings["teacher_s"] = time.perf_counter() - t0
    print(f"[teacher] {teacher!r}")

    ids, mask, score = perplexity_windows(data.eval, args.window, args.window)
    ids, mask, score = ids[:args.max_windows], mask[:args.max_windows], score[:args.max_windows]
    batches = [(ids[i:i + args.batch_size], mask[i:i + args.batch_size], score[i:i + args.batch_size])
               for i in range(0, len(ids), args.batch_size)]
    data_name = f"{data.source} (held-out split)"

    # 2. profile
    t0 = time.perf_counter()
    if not _done(out / "profile" / "profile.json"):
        result = rj.profile(teacher, [b[:2] for b in batches], data_name=data_name)
        result.save(out / "profile")
        print(result.table())
    profile = json.loads((out / "profile" / "profile.json").read_text())
    timings["profile_s"] = time.perf_counter() - t0

    # 3. oracle simulation
    t0 = time.perf_counter()
    if not _done(out / "simulate" / "simulation.json"):
        sim = rj.simulate_skipping(teacher, batches, thresholds, data_name=data_name)
        sim.save(out / "simulate")
        print(sim.table())
    simulation = json.loads((out / "simulate" / "simulation.json").read_text())
    timings["simulate_s"] = time.perf_counter() - t0

    # 4-5. distillation into a Radial Network and its evaluation
    t0 = time.perf_counter()
    evaluation = None
    if args.distill_steps > 0:
        if not _done(out / "distill" / "eval.json"):
            from radial_jax.training.distill import DistillConfig, distill
            from radial_jax.training.evaluate import evaluate
            cfg = DistillConfig(oracle_threshold=args.oracle_threshold, compute_weight=args.compute_weight,
                                train=args.distill_train)
            train = TrainConfig(steps=args.distill_steps, batch_size=args.batch_size, seq_len=args.window,
                                optim=OptimConfig(learning_rate=args.distill_lr),
                                checkpoint_every=max(1, args.distill_steps // 2))
            student, _ = distill(teacher, data, cfg=cfg, train=train, run_dir=out / "distill_run")
            save_student(student, out / "distill" / "student", distill=dataclasses.asdict(cfg), data=data.source,
                         teacher=str(teacher_dir.resolve()) if not args.model else str(args.model))
            full = ids[mask.all(1)]  # whole windows only: evaluation scores every token of a window
            evaluate(student, teacher, full, png=out / "distill" / "curve.png", out_json=out / "distill" / "eval.json")
        evaluation = json.loads((out / "distill" / "eval.json").read_text())
    timings["distill_s"] = time.perf_counter() - t0

    summary = {
        "model": teacher.name, "num_params": teacher.num_params, "data": data_name,
        "backend": jax.default_backend(), "default_ratio": "ratio_out",
        "median_ratio_out": profile["median_ratio_out"], "median_ratio_in": profile["median_ratio_in"],
        "oracle": [{k: r[k] for k in ("threshold", "depth_fraction", "flops_kept", "perplexity")}
                   for r in simulation["thresholds"]],
        "radial_network": None if evaluation is None else {
            "trained": args.distill_train, "steps": args.distill_steps,
            "perplexity": evaluation["student"]["ppl"], "mean_depth_fraction": evaluation["student"]["depth"],
            "teacher_perplexity": evaluation["teacher"]["ppl"],
            "perplexity_increase_vs_teacher": evaluation["ppl_increase_vs_teacher"],
            "oracle_perplexity_at_same_depth": evaluation["oracle_ppl_at_student_depth"]},
        "timings_s": timings,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    print(f"\n== summary ({teacher.name}, {data_name}) ==")
    print(f"median residual ratio (ratio_out, attention+MLP blocks): {summary['median_ratio_out']:.4f}")
    for r in summary["oracle"]:
        print(f"oracle t={r['threshold']:<5} depth {100 * r['depth_fraction']:5.1f}%  FLOPs {100 * r['flops_kept']:5.1f}%"
              f"  ppl {r['perplexity']:.3f}")
    if summary["radial_network"]:
        rn = summary["radial_network"]
        oracle_ppl = rn["oracle_perplexity_at_same_depth"]
        print(f"Radial Network ({rn['trained']} trained, {rn['steps']} steps): depth "
              f"{100 * rn['mean_depth_fraction']:.1f}% of layers, ppl {rn['perplexity']:.3f} "
              f"(teacher {rn['teacher_perplexity']:.3f}, {100 * rn['perplexity_increase_vs_teacher']:+.1f}%; "
              f"oracle at same depth {oracle_ppl if oracle_ppl is None else round(oracle_ppl, 3)})")
    print(f"results in {out}/ (summary.json, profile/, simulate/, distill/)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="train (or load), profile, simulate, distil, evaluate: the whole study")
    p.add_argument("--out", default="runs/pipeline")
    p.add_argument("--model", default=None, help="use this checkpoint instead of training a small teacher")
    p.add_argument("--data", default="embedded", help="'embedded' (offline default), 'wikitext2', or text files")
    p.add_argument("--size", default="small", help="teacher size preset: tiny, small, base")
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--distill-steps", type=int, default=300, help="0 skips distillation")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate of the teacher's training")
    p.add_argument("--max-windows", type=int, default=256, help="held-out windows for profile/simulate/eval")
    p.add_argument("--thresholds", default="0,0.05,0.1,0.15,0.2,0.25,0.3,0.4,0.5")
    p.add_argument("--oracle-threshold", type=float, default=0.35, help="oracle labels for router supervision")
    p.add_argument("--compute-weight", type=float, default=0.3, help="weight of the expected-depth penalty")
    p.add_argument("--distill-train", choices=("router", "all"), default="all",
                   help="what distillation trains: the router only (layers frozen) or everything")
    p.add_argument("--distill-lr", type=float, default=1e-3)
    p.set_defaults(func=run_pipeline)

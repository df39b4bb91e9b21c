"""The offline default pipeline, end to end, and the issue's headline numbers.

1. train a small OPT-shaped LM on the embedded corpus (the teacher);
2. distil it into a Radial Network (ordered mode, router only, layers frozen;
   optionally continued in radial mode), for several oracle-label thresholds;
3. evaluate each: perplexity and mean depth against the teacher and against the
   layer-level oracle at the same depth; FLOPs kept; curve PNG.

Writes ``<out>/offline_distill_<train>.json`` and ``<out>/curve_<train>_<threshold>.png``.
Target (issue 5): <= 60 % mean depth at <= +5 % perplexity over the teacher.

    python experiments/offline_distill.py --out runs/offline --teacher-steps 600 --distill-steps 300
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

import radial_jax as rj
from radial_jax.io import atomic_write_text
from radial_jax.training.cli import SIZES
from radial_jax.training.distill import DistillConfig, distill
from radial_jax.training.evaluate import evaluate
from radial_jax.training.lm import train_lm
from radial_jax.training.loop import TrainConfig
from radial_jax.training.optim import OptimConfig
from radial_jax.training.pipeline import text_data


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/offline")
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--thresholds", default="0.15,0.2,0.25,0.3")
    ap.add_argument("--compute-weight", type=float, default=0.1)
    ap.add_argument("--train", default="router", choices=("router", "all"), help="what distillation trains")
    ap.add_argument("--radial-steps", type=int, default=0, help="continue each student in radial mode")
    ap.add_argument("--teacher-dir", default=None, help="reuse a teacher run dir (resumes / skips training)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=256)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = text_data("embedded")
    cfg = rj.OPTConfig(vocab_size=data.vocab_size, max_position_embeddings=128, **SIZES[args.size])
    t0 = time.time()
    teacher, hist = train_lm(cfg, data, args.teacher_steps, train=TrainConfig(
        batch_size=16, seq_len=args.seq_len, log_every=50, optim=OptimConfig(learning_rate=3e-3)),
        run_dir=Path(args.teacher_dir) if args.teacher_dir else out / "teacher")
    t_teacher = time.time() - t0
    windows = data.dataset(args.seq_len, 1, split="eval").all_windows(args.eval_windows)
    report = {"data": data.source, "tokenizer": getattr(data.tokenizer, "name", type(data.tokenizer).__name__),
              "train_tokens": int(len(data.train)), "eval_tokens": int(windows.size),
              "model": dataclasses.asdict(cfg), "teacher_steps": args.teacher_steps,
              "teacher_seconds": t_teacher, "runs": []}
    for thr in [float(x) for x in args.thresholds.split(",")]:
        t0 = time.time()
        dcfg = DistillConfig(oracle_threshold=thr, compute_weight=args.compute_weight, train=args.train)
        tc = TrainConfig(batch_size=16, seq_len=args.seq_len, log_every=50, optim=OptimConfig(learning_rate=3e-3))
        tag = f"{args.train}_{thr}"
        student, _ = distill(teacher, data, args.distill_steps, cfg=dcfg, train=tc, run_dir=out / f"distill_{tag}")
        if args.radial_steps:
            student, _ = distill(teacher, data, args.radial_steps, cfg=dcfg, mode="radial", train=tc,
                                 start_params=student.replace(mode="radial").params,
                                 run_dir=out / f"distill_{tag}_radial")
        res = evaluate(student, teacher, windows, png=out / f"curve_{tag}.png")
        s = res["student"]
        row = {"oracle_threshold": thr, "train": args.train, "mode": student.radial.mode, "seconds": time.time() - t0, "teacher_ppl": res["teacher"]["ppl"],
               "student_ppl": s["ppl"], "mean_depth": s["depth"], "ppl_increase": res["ppl_increase_vs_teacher"],
               "oracle_ppl_at_same_depth": res["oracle_ppl_at_student_depth"],
               "block_oracle_ppl_at_same_depth": res["block_oracle_ppl_at_student_depth"],
               "flops_kept_layers": s["flops_kept_layers"], "flops_kept_total": s["flops_kept_total"],
               "meets_target": bool(s["depth"] <= 0.6 and res["ppl_increase_vs_teacher"] <= 0.05),
               "oracle_curve": res["oracle_curve"], "student_curve": res["student_curve"],
               "block_oracle_curve": res["block_oracle_curve"]}
        report["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("curve")}))
    atomic_write_text(out / f"offline_distill_{args.train}.json", json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

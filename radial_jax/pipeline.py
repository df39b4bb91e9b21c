"""``radial-jax pipeline``: the whole study on one model, offline by default.

Stages (each writes its results atomically and is skipped when a rerun finds them):

1. ``teacher``: train a small OPT-shaped LM on offline text (by default the
   standard library's documentation and sources, ``radial_jax.data``) with the
   offline BPE tokenizer; or, with ``--model``, load a checkpoint instead (hub id,
   local directory or GGUF file, with its own tokenizer). ``half_depth``: for a
   teacher trained here, the same model with half its layers trained on the same
   tokens, the static baseline that tells whether depth pays and that a routed
   student must beat (``compare/half_depth.json``, paired bootstrap intervals).
2. ``profile``: residual ratios of every block on the held-out text (§2).
3. ``simulate``: oracle layer skipping over a threshold sweep (§3).
4. ``distill``: distil the teacher into a Radial Network in ordered mode (router
   and layers trained by default; ``--distill-train router`` freezes the layers),
   then, with ``--radial-steps``, continue it in radial mode from the ordered
   student (any layer, reuse, exit; the router alone by default, ``--radial-train``).
   Each student is then served (evaluated and timed) at the capacity its routes
   need on training text (``radial.capacity``).
5. ``evaluate``: perplexity, depth and *executed* FLOPs of the students against
   the teacher and the oracles; the quality-against-compute PNG; route plots.
6. ``serve``: measured wall-clock speed-ups of prefill and of decoding at batch
   1 and 8 against the teacher (``radial_jax.serving.speed``), the sides interleaved.

Everything lands in ``--out`` (default ``runs/pipeline``), with ``summary.json``
naming the model and data actually used; ``--results FILE`` also writes the
README's figures (``experiments/readme_tables.py``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def _done(path: Path) -> bool:
    return path.exists()


def _train_offline(args, data, where: Path, num_layers: int, role: str):
    """``(model, name)``: an OPT-shaped LM of the ``--size`` preset with ``num_layers`` layers, trained on
    ``data`` for ``--teacher-steps`` (reused when ``where`` has it). The teacher and its half-depth baseline
    are both made here, from the same tokens in the same order (same seed), so they differ only in depth."""
    from radial_jax.models.families.opt import OPTConfig
    from radial_jax import defaults as D
    from radial_jax.checkpoints.artifacts import load_model, save_model
    from radial_jax.training.lm import train_lm
    from radial_jax.training.loop import TrainConfig
    from radial_jax.training.optim import OptimConfig
    if _done(where / "config.json"):
        print(f"[{role}] reusing {where}")
        return load_model(where), f"offline-opt, {num_layers} layers (trained by this pipeline, reused)"
    config = OPTConfig(vocab_size=data.vocab_size, max_position_embeddings=max(D.MIN_POSITIONS, args.window),
                       **{**D.SIZES[args.size], "num_hidden_layers": num_layers})
    train = TrainConfig(steps=args.teacher_steps, batch_size=args.batch_size, seq_len=args.window,
                        optim=OptimConfig(learning_rate=args.lr), checkpoint_every=max(1, args.teacher_steps // 4))
    model, _ = train_lm(config, data, train=train, run_dir=where.parent / f"{where.name}_run")
    save_model(model, where, data=data.source)
    return model, f"offline-opt, {num_layers} layers (trained by this pipeline)"


def half_depth_comparison(teacher, half, students: dict, evaluation, windows_nt, batch_size: int) -> dict:
    """The teacher and each student against the half-depth baseline on the held-out windows.

    Per-window NLL of every model on the same windows, so each comparison is a paired bootstrap ratio of
    perplexities (``training.paired``): ``teacher_vs_half`` below 0.9 is "depth pays by at least 10 %"; a
    student's ``vs_half`` below 1 with its interval is "routing beats the static half-depth model", read at the
    student's executed layer FLOPs (``compute``) against the half model's; ``ppl_at_half_flops`` is the
    student's router sweep (``evaluate``'s curve) read at exactly the half model's FLOPs (no interval).
    """
    from radial_jax.models.flops import dense_flops
    from radial_jax.training.evaluate import interpolate_at
    from radial_jax.models.perplexity import perplexity
    from radial_jax.training.paired import paired_bootstrap, window_nll
    import numpy as np

    n, t = windows_nt.shape
    half_flops = dense_flops(half.config, 1, t, with_head=False) / dense_flops(teacher.config, 1, t, with_head=False)
    # the teacher and the students were scored on these windows by ``evaluate``: their per-window NLL is reused
    scored = lambda row: (np.asarray(row["window_nll"]), np.full(n, t - 1, np.float64))  # noqa: E731
    score = {"half": window_nll(half, windows_nt, batch_size, progress=True, desc="score half"),
             "teacher": scored(evaluation["teacher"]),
             **{name: scored(evaluation["students"][name]) for name in students}}
    if any(len(nll) != n for nll, _ in score.values()):
        raise ValueError(f"the evaluation scored other windows than these {n}; evaluate again on them")
    result = {"half_depth": {"layers": half.config.num_layers, "layer_flops_fraction": half_flops,
                             "perplexity": perplexity(*(a.sum() for a in score["half"]))},
              "teacher_vs_half": paired_bootstrap(score["half"], score["teacher"]), "students": {}}
    for name in students:
        row = evaluation["students"][name]
        result["students"][name] = {"compute": row["compute"], "vs_half": paired_bootstrap(score["half"], score[name]),
                                    "ppl_at_half_flops": interpolate_at(row["curve"], half_flops)}
    return result


def run_pipeline(args) -> int:
    import jax
    from radial_jax.checkpoints.load import load
    from radial_jax.profiling.residual import profile
    from radial_jax.profiling.skipping import simulate_skipping
    from radial_jax.data import window_batches
    from radial_jax.reporting.files import atomic_write_json
    from radial_jax.profiling.skipping import parse_thresholds
    from radial_jax import defaults as D
    from radial_jax.training.loop import TrainConfig
    from radial_jax.training.optim import OptimConfig
    from radial_jax.data.packed import model_text_data, text_data

    thresholds = parse_thresholds(args.thresholds)
    if args.serve_repeats > 0 and not 1 <= args.serve_tokens < args.window:
        raise ValueError(f"--serve-tokens must be in [1, --window) = [1, {args.window}): the decode steps follow a "
                         f"prompt of window - serve-tokens tokens; got {args.serve_tokens}")
    if args.serve_max_buckets < 1:
        raise ValueError(f"--serve-max-buckets must be >= 1 (static prefill sizes), got {args.serve_max_buckets}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings, started = {}, time.perf_counter()
    cache_dir = jax.config.jax_compilation_cache_dir  # radial_jax.cli.use_compile_cache; None: off
    cached_programs = len(list(Path(cache_dir).glob("*"))) if cache_dir and Path(cache_dir).is_dir() else 0
    stages_done_at_start = sorted({p.parent.name for p in out.glob("*/*.json")})

    # 1. teacher; the text is tokenised with the teacher's own tokenizer (the offline BPE for one trained here)
    t0 = time.perf_counter()
    teacher_dir = out / "teacher"
    if args.model:
        teacher, teacher_name = load(args.model), str(args.model)
        data = model_text_data(args.data, teacher)  # its own tokenizer; windows open with its BOS
    else:
        data = text_data(args.data)
    print(f"data: {data.source} ({len(data.train):,} train / {len(data.eval):,} eval tokens, "
          f"tokenizer {data.tokenizer_source}, vocab {data.vocab_size})")
    if not args.model:
        teacher, teacher_name = _train_offline(args, data, teacher_dir, D.SIZES[args.size]["num_hidden_layers"],
                                               "teacher")
    teacher.name = teacher_name
    timings["teacher_s"] = time.perf_counter() - t0
    print(f"[teacher] {teacher!r}")
    # the static baseline a routed student must beat: half the teacher's layers, trained on the same tokens
    half = None
    if not args.model:
        t0 = time.perf_counter()
        half, half_name = _train_offline(args, data, out / "half_depth", max(1, teacher.config.num_layers // 2),
                                         "half-depth")
        half.name = half_name
        timings["half_depth_s"] = time.perf_counter() - t0

    # one window set for profile, simulate and evaluate: the same teacher perplexity in all of them
    ids, mask, score = data.windows(args.window, args.max_windows)
    batches = window_batches((ids, mask, score), args.batch_size)
    data_name = f"{data.source} (held-out split)"

    # 2. profile
    t0 = time.perf_counter()
    if not _done(out / "profile" / "profile.json"):
        result = profile(teacher, [b[:2] for b in batches], data_name=data_name)
        result.save(out / "profile")
        print(result.table())
    profile = json.loads((out / "profile" / "profile.json").read_text())
    timings["profile_s"] = time.perf_counter() - t0

    # 3. oracle simulation
    t0 = time.perf_counter()
    if not _done(out / "simulate" / "simulation.json"):
        sim = simulate_skipping(teacher, batches, thresholds, data_name=data_name)
        sim.save(out / "simulate")
        print(sim.table())
    simulation = json.loads((out / "simulate" / "simulation.json").read_text())
    timings["simulate_s"] = time.perf_counter() - t0

    # 4-6. distillation (ordered, then radial), evaluation, serving speed
    evaluation = speed = None
    students = {}
    full = ids  # whole windows: evaluation scores every token of a window but its first, as simulate does
    if args.distill_steps > 0:
        from radial_jax.radial.config import MODES
        from radial_jax.training.distill_loss import DistillConfig
        from radial_jax.training.study import distill_phases, ordered_then_radial
        cfg = DistillConfig(oracle_threshold=args.oracle_threshold, compute_weight=args.compute_weight,
                            train=args.distill_train)
        teacher_ref = str(teacher_dir.resolve()) if not args.model else str(args.model)
        t0 = time.perf_counter()

        def phase_train(steps):
            return TrainConfig(steps=steps, batch_size=args.batch_size, seq_len=args.window,
                               optim=OptimConfig(learning_rate=args.distill_lr), checkpoint_every=max(1, steps // 2))
        radial_train = phase_train(args.radial_steps) if args.radial_steps > 0 else None
        phases = ordered_then_radial(cfg, phase_train(args.distill_steps), radial_train,
                                     cfg.radial_phase(args.radial_compute_weight, args.radial_train,
                                                      args.radial_oracle_threshold))
        students, _ = distill_phases(teacher, data, phases, run_dirs={m: out / f"distill_{m}_run" for m in MODES},
                                     students_dir=out / "distill",
                                     save_meta=dict(data=data.source, teacher=teacher_ref))
        timings["distill_s"] = time.perf_counter() - t0
        # served (evaluated, timed) at the capacity its routes need on training text (radial.capacity)
        t0 = time.perf_counter()
        calibration = data.windows(args.window, D.SERVE_CALIBRATION_WINDOWS, split="train")[0]
        for name in students:
            trained = students[name].radial.capacity_factor
            students[name], pads = students[name].fit_capacity(calibration, max_buckets=args.serve_max_buckets,
                                                               return_padding=True)
            rc = students[name].radial
            print(f"[serve] {name} student: capacity factor {rc.capacity_factor:.3f}, slack {rc.capacity_slack}, "
                  f"{rc.prefill_buckets} prefill buckets (trained at {trained:g}); padding of the calibration "
                  "loads by buckets: " + ", ".join(f"{n}: {p:.1%}" for n, p in pads.items()))
        timings["fit_capacity_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        eval_json = out / "distill" / "eval.json"
        evaluation = json.loads(eval_json.read_text()) if _done(eval_json) else {}
        if "window_nll" not in evaluation.get("teacher", {}):  # not evaluated yet, or by an older version
            from radial_jax.training.evaluate import evaluate
            evaluate(students, teacher, full, batch_size=min(args.batch_size, len(full)), png=out / "distill" / "curve.png",
                     out_json=eval_json, routes_png=out / "distill")
            evaluation = json.loads(eval_json.read_text())
        timings["evaluate_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if args.serve_repeats > 0:
            if not _done(out / "serve" / "speed.json"):
                from radial_jax.serving.speed import serving_speed
                speed = serving_speed(teacher, students, full, prompt_len=args.window - args.serve_tokens,
                                      new_tokens=args.serve_tokens, repeats=args.serve_repeats)
                atomic_write_json(out / "serve" / "speed.json", speed)
            speed = json.loads((out / "serve" / "speed.json").read_text())
        timings["serve_s"] = time.perf_counter() - t0

    comparison = None
    if half is not None:
        t0 = time.perf_counter()
        where = out / "compare" / "half_depth.json"
        if not _done(where) or set(json.loads(where.read_text())["students"]) != set(students):
            atomic_write_json(where, half_depth_comparison(teacher, half, students, evaluation, full,
                                                           min(args.batch_size, len(full))))
        comparison = json.loads(where.read_text())
        timings["compare_s"] = time.perf_counter() - t0

    summary = {
        "model": teacher.name, "num_params": teacher.num_params, "data": data_name,
        "backend": jax.default_backend(), "default_ratio": "ratio_out",
        "median_ratio_out": profile["median_ratio_out"], "median_ratio_in": profile["median_ratio_in"],
        "oracle": [{k: r[k] for k in ("threshold", "depth_fraction", "flops_kept", "perplexity")}
                   for r in simulation["thresholds"]],
        "teacher_perplexity": None if evaluation is None else evaluation["teacher"]["ppl"],
        "half_depth": None if comparison is None else {**comparison["half_depth"],
                                                       "teacher_vs_half": comparison["teacher_vs_half"]},
        "students": None if evaluation is None else {
            name: {"mode": s["mode"], "capacity_factor": s["radial_config"]["capacity_factor"],
                   "capacity_slack": s["radial_config"]["capacity_slack"],
                   "prefill_buckets": s["radial_config"]["prefill_buckets"],
                   "perplexity": s["ppl"], "depth_fraction": s["depth"],
                   "executed_flops_fraction": s["compute"],
                   "executed_flops_fraction_with_head": s["flops_fraction_total"],
                   "perplexity_increase_vs_teacher": s["ppl_increase_vs_teacher"],
                   "oracle_perplexity_at_same_compute": s["oracle_ppl_at_same_compute"],
                   "reuse_share": s["route_stats"]["reuse_token_share"], "exit_share": s["route_stats"]["exit_share"],
                   "drop_rate": s["route_stats"]["drop_rate"],
                   "speed": None if speed is None else speed["students"].get(name),
                   **({} if comparison is None else {k: comparison["students"][name][k]
                                                     for k in ("vs_half", "ppl_at_half_flops")})}
            for name, s in evaluation["students"].items()},
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "timings_s": {**timings, "total_s": time.perf_counter() - started},
        "compile_cache_programs_at_start": cached_programs, "stages_done_at_start": stages_done_at_start,
    }
    atomic_write_json(out / "summary.json", summary)
    if args.results:
        write_figures(summary, args.results)
    print_summary(summary, out)
    return 0


def write_figures(summary: dict, path) -> None:
    """The pipeline's result as README figures (``experiments/readme_tables.py``), next to the benchmarks'."""
    from radial_jax.reporting.results import figure, write_result
    figs = [figure("pipeline_teacher", "pipeline: teacher perplexity (held-out)",
                            summary["teacher_perplexity"])]
    half = summary.get("half_depth")
    if half:
        cmp = half["teacher_vs_half"]
        figs.append(figure("pipeline_half_depth", f"pipeline: half-depth model ({half['layers']} layers, same tokens), "
                                                  "perplexity (held-out)", half["perplexity"]))
        figs.append(figure(
            "pipeline_depth_pays", "pipeline: teacher / half-depth model perplexity (does depth pay?)", cmp["ratio"],
            target="<= 0.90", met=cmp["ratio"] <= 0.9 and cmp["high"] < 1,
            note=f"paired bootstrap 95 % [{cmp['low']:.3f}, {cmp['high']:.3f}] over {cmp['windows']} windows"))
    for name, s in (summary["students"] or {}).items():
        met = s["executed_flops_fraction"] <= 0.6 and s["perplexity_increase_vs_teacher"] <= 0.05
        figs.append(figure(
            f"pipeline_{name}", f"pipeline: {name} student, executed layer FLOPs / teacher's",
            s["executed_flops_fraction"],
            target="<= 0.60 at <= +5 % ppl", met=met,
            note=f"depth {100 * s['depth_fraction']:.0f} %, ppl {s['perplexity']:.1f} "
                 f"({100 * s['perplexity_increase_vs_teacher']:+.1f} %), with the head "
                 f"{s['executed_flops_fraction_with_head']:.3f}, oracle at same FLOPs "
                 f"{s['oracle_perplexity_at_same_compute'] or float('nan'):.1f}; served at capacity factor "
                 f"{s['capacity_factor']:.3g}, slack {s['capacity_slack']}, {s['prefill_buckets']} prefill buckets"))
        if s.get("vs_half"):
            cmp, at = s["vs_half"], s["ppl_at_half_flops"]
            figs.append(figure(
                f"pipeline_{name}_vs_half", f"pipeline: {name} student / half-depth model perplexity", cmp["ratio"],
                target="< 1 at <= the half model's layer FLOPs",
                met=cmp["high"] < 1 and s["executed_flops_fraction"] <= half["layer_flops_fraction"] + 1e-9,
                note=f"paired bootstrap 95 % [{cmp['low']:.3f}, {cmp['high']:.3f}]; student at "
                     f"{s['executed_flops_fraction']:.3f} of the layer FLOPs, half model at "
                     f"{half['layer_flops_fraction']:.3f}; its router sweep there: ppl "
                     + ("outside the sweep" if at is None else f"{at:.1f} (half model {half['perplexity']:.1f})")))
        if s["speed"]:
            for key, label in (("prefill_speedup", "prefill (generate's, batch 8)"),
                               ("decode_b1_speedup", "decode steps, batch 1"),
                               ("decode_b8_speedup", "decode steps, batch 8")):
                figs.append(figure(f"pipeline_{name}_{key}", f"pipeline: {name} student {label} vs teacher",
                                            s["speed"][key], unit="x"))
    timings = summary["timings_s"]
    figs.append(figure("pipeline_seconds", "pipeline: wall-clock seconds of this run", timings["total_s"], unit=" s",
                       target="<= 360 (a fresh clone)", met=timings["total_s"] <= 360,
                       note=f"{summary['compile_cache_programs_at_start']} programs in the compilation cache and "
                            f"{len(summary['stages_done_at_start'])} stages done at the start (0 and 0: a fresh "
                            "clone); seconds by stage: " + ", ".join(
                                f"{k[:-2]} {v:.0f}" for k, v in timings.items() if k != "total_s")))
    write_result(path, "pipeline", summary["settings"], figs, {k: v for k, v in summary.items()
                                                                        if k != "settings"})


def print_summary(summary: dict, out: Path) -> None:
    print(f"\n== summary ({summary['model']}, {summary['data']}) ==")
    print(f"median residual ratio (ratio_out, attention+MLP blocks): {summary['median_ratio_out']:.4f}")
    for r in summary["oracle"]:
        print(f"oracle t={r['threshold']:<5} depth {100 * r['depth_fraction']:5.1f}%  FLOPs {100 * r['flops_kept']:5.1f}%"
              f"  ppl {r['perplexity']:.3f}")
    half = summary.get("half_depth")
    if half:
        cmp = half["teacher_vs_half"]
        print(f"half-depth model ({half['layers']} layers, same tokens): ppl {half['perplexity']:.3f}; teacher / half "
              f"{cmp['ratio']:.3f} [{cmp['low']:.3f}, {cmp['high']:.3f}] (depth pays when <= 0.90)")
    if summary["students"]:
        print(f"teacher ppl {summary['teacher_perplexity']:.3f}")
        for name, s in summary["students"].items():
            speed = s["speed"] or {}
            line = (f"{name} student: depth {100 * s['depth_fraction']:.1f}%, executed FLOPs "
                    f"{100 * s['executed_flops_fraction']:.1f}% of the layers' "
                    f"({100 * s['executed_flops_fraction_with_head']:.1f}% with the head), ppl {s['perplexity']:.3f} "
                    f"({100 * s['perplexity_increase_vs_teacher']:+.1f}%), reuse {100 * s['reuse_share']:.0f}%, "
                    f"exit {100 * s['exit_share']:.0f}%")
            if s.get("vs_half"):
                v = s["vs_half"]
                line += f"; / half-depth ppl {v['ratio']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
            if speed:
                line += (f"; vs teacher: prefill {speed['prefill_speedup']['median']:.2f}x, decode b1 "
                         f"{speed['decode_b1_speedup']['median']:.2f}x, b8 {speed['decode_b8_speedup']['median']:.2f}x")
            print(line)
    print(f"results in {out}/ (summary.json, profile/, simulate/, distill/, serve/, compare/)")


def register(sub) -> None:
    from radial_jax import defaults as D
    p = sub.add_parser("pipeline", help="train (or load), profile, simulate, distil, evaluate, serve: the whole study")
    p.add_argument("--out", default="runs/pipeline")
    p.add_argument("--model", default=None, help="use this checkpoint instead of training a small teacher")
    p.add_argument("--data", default=D.DATA, help="'stdlib' (offline default), 'embedded', 'wikitext2', or text files")
    p.add_argument("--size", default=D.SIZE, choices=tuple(D.SIZES), help="teacher size preset")
    p.add_argument("--teacher-steps", type=int, default=D.TEACHER_STEPS)
    p.add_argument("--distill-steps", type=int, default=D.DISTILL_STEPS, help="ordered student; 0 skips distillation")
    p.add_argument("--radial-steps", type=int, default=D.RADIAL_STEPS,
                   help="radial student, continued from the ordered one; 0 skips it")
    p.add_argument("--window", type=int, default=D.WINDOW)
    p.add_argument("--batch-size", type=int, default=D.BATCH_SIZE)
    p.add_argument("--lr", type=float, default=D.LEARNING_RATE, help="learning rate of the teacher's training")
    p.add_argument("--max-windows", type=int, default=D.MAX_WINDOWS, help="held-out windows for profile/simulate/eval")
    p.add_argument("--thresholds", default=D.csv(D.PIPELINE_THRESHOLDS))
    p.add_argument("--oracle-threshold", type=float, default=D.ORACLE_THRESHOLD, help="oracle labels for router supervision")
    p.add_argument("--compute-weight", type=float, default=D.COMPUTE_WEIGHT,
                   help="weight of the expected-compute penalty (ordered student)")
    p.add_argument("--radial-compute-weight", type=float, default=D.RADIAL_COMPUTE_WEIGHT,
                   help="weight of the expected-compute penalty (radial student)")
    p.add_argument("--distill-train", choices=("router", "all"), default=D.DISTILL_TRAIN,
                   help="what distillation trains: the router only (layers frozen) or everything")
    p.add_argument("--radial-train", choices=("router", "all"), default=D.RADIAL_DISTILL_TRAIN,
                   help="what the radial phase trains (router only: the ordered student's layers kept)")
    p.add_argument("--radial-oracle-threshold", type=float, default=D.RADIAL_ORACLE_THRESHOLD,
                   help="oracle labels for router supervision in the radial phase")
    p.add_argument("--distill-lr", type=float, default=D.DISTILL_LR)
    p.add_argument("--serve-repeats", type=int, default=D.SERVE_REPEATS, help="interleaved timing rounds; 0 skips serving speed")
    p.add_argument("--serve-max-buckets", type=int, default=D.PIPELINE_SERVE_MAX_BUCKETS,
                   help="static prefill sizes at most for the served students: more pad less and compile longer")
    p.add_argument("--serve-tokens", type=int, default=D.SERVE_TOKENS,
                   help="decode steps per row when timing (after a prompt of window - serve-tokens tokens)")
    p.add_argument("--results", default=None, help="also write the README's figures to this JSON")
    p.set_defaults(func=run_pipeline)

"""``radial-jax train | distill | eval`` (registered by ``radial_jax.cli``).

Offline default pipeline::

    radial-jax train   --run-dir runs/teacher                 # small OPT on the standard library's text
    radial-jax distill --teacher runs/teacher/model --run-dir runs/student
    radial-jax eval    --student runs/student/student --out runs/eval   # eval.json + curve.png
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from radial_jax import defaults as D
from radial_jax.defaults import SIZES
from radial_jax.scale.pod import add_mesh_args, is_main_process, mesh_from_args, rules_for


def _common(p, steps, lr):
    p.add_argument("--data", default=D.DATA,
                   help="'stdlib' (offline), 'embedded', 'wikitext2', a .txt file or a directory")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=D.BATCH_SIZE, help="global batch")
    p.add_argument("--seq-len", type=int, default=D.WINDOW)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=D.WARMUP_STEPS)
    p.add_argument("--seed", type=int, default=D.SEED)
    p.add_argument("--checkpoint-every", type=int, default=D.CHECKPOINT_EVERY)
    p.add_argument("--debug", action="store_true", help="chex shape/finite checks after every step")
    p.add_argument("--run-dir", required=True, help="checkpoints, metrics.jsonl, TensorBoard; resumed if present")
    p.add_argument("--no-progress", action="store_true")
    add_memory_args(p)
    add_mesh_args(p)


def add_memory_args(p) -> None:
    """``--remat``, ``--compute-dtype``, ``--grad-accum`` (``radial_jax.training.memory.MemoryConfig``)."""
    from radial_jax.models.remat import POLICIES
    p.add_argument("--remat", choices=sorted(POLICIES), default="none",
                   help="recompute each layer in the backward pass: none, full (least memory), dots, dots_no_batch")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: mixed precision (fp32 master weights and optimiser state)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (gradient accumulation)")


def memory_config(args):
    """The ``MemoryConfig`` of the flags; on a mesh the state is donated (not in --debug)."""
    from radial_jax.training.memory import MemoryConfig
    return MemoryConfig(remat=args.remat, compute_dtype=args.compute_dtype, grad_accum=args.grad_accum,
                        donate=args.mesh is not None and not getattr(args, "debug", False))


def register(subparsers) -> None:
    t = subparsers.add_parser("train", help="train a sequential OPT-shaped LM (the teacher)")
    _common(t, D.TEACHER_STEPS, D.LEARNING_RATE)
    t.add_argument("--size", choices=sorted(SIZES), default=D.SIZE)
    t.set_defaults(func=cmd_train)

    d = subparsers.add_parser("distill", help="distil a sequential model into a Radial Network")
    _common(d, D.DISTILL_STEPS, D.DISTILL_LR)
    d.add_argument("--teacher", required=True, help="a 'radial-jax train' model dir or a hub-layout checkpoint")
    d.add_argument("--train", choices=("router", "all"), default=D.DISTILL_TRAIN, help="what is trained")
    d.add_argument("--temperature", type=float, default=D.TEMPERATURE)
    d.add_argument("--hidden-weight", type=float, default=D.HIDDEN_WEIGHT)
    d.add_argument("--router-weight", type=float, default=D.ROUTER_WEIGHT)
    d.add_argument("--oracle-threshold", type=float, default=D.ORACLE_THRESHOLD)
    d.add_argument("--compute-weight", type=float, default=D.COMPUTE_WEIGHT)
    d.add_argument("--radial-compute-weight", type=float, default=D.RADIAL_COMPUTE_WEIGHT,
                   help="the compute penalty's weight in the --radial-steps phase")
    d.add_argument("--radial-train", choices=("router", "all"), default=D.RADIAL_DISTILL_TRAIN,
                   help="what the --radial-steps phase trains (router only: the ordered phase's layers kept)")
    d.add_argument("--radial-oracle-threshold", type=float, default=D.RADIAL_ORACLE_THRESHOLD,
                   help="oracle labels for router supervision in the --radial-steps phase")
    d.add_argument("--mode", choices=("ordered", "radial"), default="ordered",
                   help="routing mode of the student (ordered: use or skip each layer in order)")
    d.add_argument("--capacity-factor", type=float, default=1.0, help="fraction of dense compute per step")
    d.add_argument("--radial-steps", type=int, default=0,
                   help="after the ordered phase, continue this many steps in radial mode (any layer, exit)")
    d.set_defaults(func=cmd_distill)

    e = subparsers.add_parser("eval", help="perplexity, mean depth, FLOPs kept, curve vs the oracle (PNG)")
    e.add_argument("--student", required=True, help="the 'student' dir written by 'radial-jax distill'")
    e.add_argument("--data", default=D.DATA)
    e.add_argument("--seq-len", type=int, default=D.WINDOW)
    e.add_argument("--max-windows", type=int, default=D.MAX_WINDOWS)
    e.add_argument("--out", required=True, help="directory for eval.json and curve.png")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--trained-capacity", action="store_true",
                   help="evaluate at the capacity the student was trained at (default: the capacity its routes need "
                        "on training text, as the pipeline serves its students)")
    add_mesh_args(e)
    e.set_defaults(func=cmd_eval)


def _train_config(args):
    from radial_jax.training.loop import TrainConfig
    from radial_jax.training.optim import OptimConfig
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                       optim=OptimConfig(learning_rate=args.lr, warmup_steps=args.warmup),
                       checkpoint_every=args.checkpoint_every, debug=args.debug)


def cmd_train(args) -> int:
    import jax
    from radial_jax.reporting.files import check_output_dir
    check_output_dir(args.run_dir, "--run-dir")
    mesh = mesh_from_args(args)  # --distributed first, then the mesh: before any other jax work
    from radial_jax.models.families.opt import OPTConfig
    from radial_jax.checkpoints.artifacts import save_model
    from radial_jax.training.lm import train_lm
    from radial_jax.data.packed import text_data
    data = text_data(args.data)
    train = _train_config(args)
    config = OPTConfig(vocab_size=data.vocab_size, max_position_embeddings=max(D.MIN_POSITIONS, args.seq_len),
                       **SIZES[args.size])
    model, history = train_lm(config, data, train=train, run_dir=args.run_dir, mesh=mesh,
                              progress=not args.no_progress, memory=memory_config(args), rules=rules_for(args.pool))
    if jax.process_index() == 0:
        save_model(model, Path(args.run_dir) / "model", data=data.source)
        print(json.dumps({"model": str(Path(args.run_dir) / "model"), "final": history[-1] if history else None}))
    return 0


def cmd_distill(args) -> int:
    from radial_jax.radial.artifacts import save_student
    from radial_jax.training.distill_loss import DistillConfig
    from radial_jax.training.study import Phase, distill_phases
    from radial_jax.data.packed import model_text_data
    from radial_jax.reporting.files import check_output_dir
    check_output_dir(args.run_dir, "--run-dir")
    if args.radial_steps < 0:
        raise ValueError(f"--radial-steps must be >= 0 (0: no radial phase), got {args.radial_steps}")
    if args.radial_steps and args.mode != "ordered":
        raise ValueError("--radial-steps continues an ordered phase in radial mode; it needs --mode ordered")
    # both phases' settings are checked before any work: a bad radial flag must not wait for the ordered phase
    cfg = DistillConfig(temperature=args.temperature, hidden_weight=args.hidden_weight,
                        router_weight=args.router_weight, oracle_threshold=args.oracle_threshold,
                        compute_weight=args.compute_weight, train=args.train)
    radial_cfg = cfg.radial_phase(args.radial_compute_weight, args.radial_train, args.radial_oracle_threshold) \
        if args.radial_steps else None
    mesh = mesh_from_args(args)
    memory, rules = memory_config(args), rules_for(args.pool)
    teacher = load_teacher(args.teacher, mesh, rules, memory)
    data = model_text_data(args.data, teacher)  # the teacher's own tokenizer, never a substitute
    phases = (Phase(args.mode, _train_config(args), cfg),)
    if args.radial_steps:
        # warm start: the radial network begins exactly where the ordered student is (to_radial scales the
        # capacity factor so each step's layer keeps its ordered budget: --capacity-factor is not passed again)
        phases += (Phase("radial", dataclasses.replace(_train_config(args), steps=args.radial_steps), radial_cfg),)
    students, history = distill_phases(
        teacher, data, phases, run_dirs={args.mode: args.run_dir, "radial": Path(args.run_dir) / "radial"},
        radial_kwargs={"capacity_factor": args.capacity_factor}, progress=not args.no_progress, mesh=mesh,
        memory=memory, rules=rules)
    student, final_cfg = students[phases[-1].mode], phases[-1].cfg  # what the saved student was last trained with
    if not is_main_process():
        return 0
    local = Path(args.teacher)
    out = save_student(student, Path(args.run_dir) / "student", distill=dataclasses.asdict(final_cfg), data=data.source,
                       teacher=str(local.resolve()) if local.exists() else str(args.teacher))
    print(json.dumps({"student": str(out), "final": history[-1] if history else None}))
    return 0


def load_teacher(name: str, mesh=None, rules=None, memory=None):
    """A ``radial-jax train`` model directory, a checkpoint directory or a hub id (``rj.load``). On a mesh it is
    placed sharded in the compute dtype: the frozen teacher of the step; the student's fp32 masters are made
    from it."""
    from radial_jax.checkpoints.load import load
    if mesh is None:
        return load(name)
    return load(name, mesh=mesh, rules=rules, dtype=memory.dtype)


def cmd_eval(args) -> int:
    from radial_jax.radial.artifacts import load_student
    from radial_jax.checkpoints.load import load
    from radial_jax.training.evaluate import evaluate
    from radial_jax.data.packed import model_text_data
    mesh = mesh_from_args(args)
    student, meta = load_student(args.student)
    if not meta.get("teacher"):
        raise ValueError(f"the teacher of {args.student} is not recorded; it is needed "
                         "for the comparison (teacher perplexity and the oracles)")
    if mesh is None:
        if not Path(meta["teacher"]).exists():
            raise ValueError(f"the teacher of {args.student} ({meta['teacher']!r}) was not found; it is needed "
                             "for the comparison (teacher perplexity and the oracles)")
        teacher = load(meta["teacher"])
    else:  # parameters sharded by the axis rules (the student's pool like the teacher's, the router replicated)
        from radial_jax.training.memory import MemoryConfig
        from radial_jax.training.pod_steps import radial_param_shardings
        from radial_jax.scale.sharding import to_mesh
        rules = rules_for(args.pool)
        teacher = load_teacher(meta["teacher"], mesh, rules, MemoryConfig())
        student = student.replace(params=to_mesh(student.params, radial_param_shardings(
            teacher.module, teacher.config, student.params, mesh, rules)))
    data = model_text_data(args.data, teacher)
    windows = data.windows(args.seq_len, args.max_windows)[0]
    if not args.trained_capacity:  # served at the capacity its routes need (radial.capacity), as the pipeline does
        student = student.fit_capacity(data.windows(args.seq_len, D.SERVE_CALIBRATION_WINDOWS, split="train")[0])
    out = Path(args.out)
    result = evaluate(student, teacher, windows, png=out / "curve.png", out_json=out / "eval.json",
                      progress=not args.no_progress)
    s, t = result["student"], result["teacher"]
    print(json.dumps({"teacher_ppl": t["ppl"], "student_ppl": s["ppl"], "mean_depth": s["depth"],
                      "capacity_factor": student.radial.capacity_factor,
                      "capacity_slack": student.radial.capacity_slack,
                      "prefill_buckets": student.radial.prefill_buckets,
                      "executed_flops_fraction": s["compute"], "ppl_increase_vs_teacher": s["ppl_increase_vs_teacher"],
                      "oracle_ppl_at_same_compute": s["oracle_ppl_at_same_compute"],
                      "reuse_share": s["route_stats"]["reuse_token_share"],
                      "exit_share": s["route_stats"]["exit_share"], "png": result.get("png")}, indent=2))
    return 0

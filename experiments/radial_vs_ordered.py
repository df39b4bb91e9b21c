"""Does the radial graph pay? Ordered vs radial students, the layer oracle, and joint training with reuse.

Offline, on ``--data`` (the standard library's text by default), minutes on 2 CPU cores (bigger settings
by flags), with the pipeline's distillation defaults (``radial_jax.defaults``):

A. distillation from one sequential teacher (an OPT-shaped model trained here, or
   ``--teacher-dir``): (a) the teacher, (b) the ordered student (skip only),
   (c) the radial student, warm-started from (b) (``RadialModel.to_radial``: it
   begins exactly where (b) is) and trained on to use any layer, reuse and exit
   (``DistillConfig.radial_phase``, as the pipeline does),
   (d) the layer oracle (§3) with the teacher's layers; every one evaluated on
   held-out windows by perplexity against *executed* FLOPs (what ran), each
   student with its router swept over keep offsets, so "at equal executed FLOPs"
   is an interpolation along a curve;
B. joint training from scratch at equal training tokens: (e) a radial network
   with a pool of ``L`` layers and ``S > L`` steps (reuse) against sequential
   models of ``L`` and of ``S`` layers.

Writes ``results/radial_vs_ordered.json`` (figures for the README through
``readme_tables.py``) and ``results/radial_vs_ordered.png`` (quality against
executed FLOPs, all of them); run files under ``--out``.

    python experiments/radial_vs_ordered.py                       # the defaults (about 20 minutes)
    python experiments/radial_vs_ordered.py --quick               # a smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


import benchlib  # noqa: E402
import radial_jax as rj  # noqa: E402
from radial_jax import defaults as D  # noqa: E402
from radial_jax.reporting.files import figure, save_figure  # noqa: E402
from radial_jax.checkpoints.artifacts import load_model, save_model  # noqa: E402
from radial_jax.training.distill_loss import DistillConfig  # noqa: E402
from radial_jax.training.study import distill_phases, ordered_then_radial  # noqa: E402
from radial_jax.training.evaluate import evaluate, interpolate_at, radial_stats  # noqa: E402
from radial_jax.training.joint import JointConfig, train_joint  # noqa: E402
from radial_jax.training.lm import make_lm_eval, train_lm  # noqa: E402
from radial_jax.training.loop import TrainConfig  # noqa: E402
from radial_jax.training.optim import OptimConfig  # noqa: E402
from radial_jax.data.packed import text_data  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/radial_vs_ordered")
    ap.add_argument("--data", default=D.DATA, help="offline text (radial_jax.data.packed.text_data)")
    ap.add_argument("--teacher-dir", default=None, help="a saved teacher (e.g. runs/pipeline/teacher) to reuse")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--teacher-steps", type=int, default=D.TEACHER_STEPS)
    ap.add_argument("--distill-steps", type=int, default=D.DISTILL_STEPS, help="ordered student")
    ap.add_argument("--radial-steps", type=int, default=D.RADIAL_STEPS, help="radial student, after the warm start")
    ap.add_argument("--joint-steps", type=int, default=600)
    ap.add_argument("--joint-layers", type=int, default=2, help="L: the radial pool and the small sequential model")
    ap.add_argument("--joint-steps-per-token", type=int, default=4, help="S > L: steps of the radial network")
    ap.add_argument("--window", type=int, default=D.WINDOW)
    ap.add_argument("--batch-size", type=int, default=D.BATCH_SIZE)
    ap.add_argument("--eval-windows", type=int, default=256)
    ap.add_argument("--compute-weight", type=float, default=D.COMPUTE_WEIGHT, help="the ordered student's")
    ap.add_argument("--cache-policy", choices=("mask", "propagate"), default=D.DISTILL_CACHE_POLICY,
                    help="the students' cache policy (this study's; the library's default is defaults.DISTILL_CACHE_POLICY)")
    ap.add_argument("--quick", action="store_true", help="tiny steps everywhere (a smoke run)")
    ap.add_argument("--results", default=str(benchlib.RESULTS / "radial_vs_ordered.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.teacher_steps, args.distill_steps, args.radial_steps, args.joint_steps = 40, 20, 20, 40
        args.eval_windows = 32
    if args.joint_steps_per_token <= args.joint_layers:
        ap.error("--joint-steps-per-token must exceed --joint-layers (the radial network reuses its pool)")
    return args


def train_config(args, steps, lr):
    return TrainConfig(steps=steps, batch_size=args.batch_size, seq_len=args.window, log_every=50,
                       checkpoint_every=max(1, steps // 2), optim=OptimConfig(learning_rate=lr))


def part_a(args, data, windows, out):
    """Teacher, ordered student, radial student, layer oracle: one evaluation."""
    if args.teacher_dir:
        teacher = load_model(args.teacher_dir)
    else:
        config = rj.OPTConfig(vocab_size=data.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                              ffn_dim=4 * args.hidden, num_attention_heads=4, max_position_embeddings=256)
        teacher, _ = train_lm(config, data, train=train_config(args, args.teacher_steps, 3e-3),
                              run_dir=out / "teacher_run")
        save_model(teacher, out / "teacher", data=data.source)
    dcfg = DistillConfig(compute_weight=args.compute_weight)  # the ordered phase; the radial one: radial_phase()
    policy = {"cache_policy": args.cache_policy}
    phases = ordered_then_radial(dcfg, train_config(args, args.distill_steps, 1e-3),
                                 train_config(args, args.radial_steps, 1e-3))
    students, history = distill_phases(teacher, data, phases, radial_kwargs=policy,
                                       run_dirs={"ordered": out / "ordered_run", "radial": out / "radial_run"})
    result = evaluate(students, teacher, windows, png=out / "curve.png",
                      out_json=out / "eval.json", routes_png=out)
    return result, [h for h in history if "drop_rate" in h]


def part_b(args, data, windows, out):
    """Joint training at equal tokens: radial (pool L, S steps) vs sequential L and S layers."""
    L, S = args.joint_layers, args.joint_steps_per_token
    shape = dict(vocab_size=data.vocab_size, hidden_size=args.hidden, ffn_dim=4 * args.hidden,
                 num_attention_heads=4, max_position_embeddings=256)
    tc = train_config(args, args.joint_steps, 3e-3)
    rows = {}
    for n in (L, S):
        config = rj.OPTConfig(num_hidden_layers=n, **shape)
        model, _ = train_lm(config, data, train=tc, run_dir=out / f"sequential_{n}_run")
        nll = make_lm_eval(model.module, windows)(model.params)
        rows[f"sequential_{n}"] = {"layers": n, "ppl": nll["eval_ppl"], "compute_vs_sequential_S": n / S}
    jc = JointConfig(mode="radial", route_start=args.joint_steps // 4, capacity_start=S / L,
                     capacity_end=0.75 * S / L, capacity_steps=args.joint_steps // 2, capacity_stages=3,
                     compute_weight=0.02)
    network, _ = train_joint(rj.OPTConfig(num_hidden_layers=L, **shape), data, cfg=jc, train=tc,
                             run_dir=out / "joint_run", radial_kwargs={"max_steps": S, "cache_policy": "propagate"})
    from radial_jax.radial.stats import RouteStats
    routes = RouteStats(L, S)
    point = radial_stats(network, network.params, windows, routes=routes)
    routes.plot(out / "joint_routes.png", title=f"joint radial (L={L}, S={S})")
    rows["radial_joint"] = {"pool_layers": L, "steps": S, "ppl": point["ppl"], "depth_visits": point["depth"] * L,
                            "compute_vs_sequential_L": point["compute"], "compute_vs_sequential_S":
                            point["compute"] * L / S, "route_stats": routes.summary(),
                            "radial_config": dataclasses.asdict(network.radial)}
    return rows


def plot(a: dict, b: dict, path, args):
    plt, fig, (ax, bx) = figure(2, width=5.5, height=4.2)
    for name, curve, style in (("layer oracle", a["oracle_curve"], "o-"),):
        pts = sorted((c["compute"], c["ppl"]) for c in curve)
        ax.plot(*zip(*pts), style, ms=4, color="tab:gray", label=name)
    for (name, row), color in zip(a["students"].items(), ("tab:red", "tab:blue")):
        pts = sorted((c["compute"], c["ppl"]) for c in row["curve"])
        ax.plot(*zip(*pts), "s--", ms=4, color=color, label=f"{name} student (router sweep)")
        ax.plot([row["compute"]], [row["ppl"]], "*", ms=13, color=color)
    ax.plot([1.0], [a["teacher"]["ppl"]], "kD", label="teacher")
    ax.set(xlabel="executed FLOPs / teacher", ylabel="held-out perplexity", yscale="log",
           title="A. distillation: quality vs executed compute")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    S = args.joint_steps_per_token
    for key, marker in (("sequential_" + str(args.joint_layers), "o"), ("sequential_" + str(S), "o"),
                        ("radial_joint", "*")):
        row = b[key]
        bx.plot([row["compute_vs_sequential_S"]], [row["ppl"]], marker, ms=12 if marker == "*" else 8,
                label=key.replace("_", " "))
    bx.set(xlabel=f"executed FLOPs / sequential {S} layers", ylabel="held-out perplexity",
           title="B. joint training at equal tokens")
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3)
    save_figure(plt, fig, path)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = text_data(args.data)
    windows = data.dataset(args.window, 1, split="eval").all_windows(args.eval_windows)
    t0 = time.time()
    a, radial_history = part_a(args, data, windows, out)
    t_a = time.time() - t0
    b = part_b(args, data, windows, out)
    t_b = time.time() - t0 - t_a
    png = Path(args.results).with_suffix(".png")
    plot(a, b, png, args)

    ordered, radial = a["students"]["ordered"], a["students"]["radial"]
    ordered_at = interpolate_at(ordered["curve"], radial["compute"])
    vs_ordered = None if ordered_at is None else radial["ppl"] / ordered_at - 1
    rs = radial["route_stats"]
    L, S = args.joint_layers, args.joint_steps_per_token
    joint, seq_l, seq_s = b["radial_joint"], b[f"sequential_{L}"], b[f"sequential_{S}"]
    f = benchlib.figure
    figures = [
        f("teacher_ppl", "teacher perplexity (held-out)", a["teacher"]["ppl"]),
        f("ordered_compute", "ordered student: executed FLOPs / teacher", ordered["compute"],
          note=f"ppl {ordered['ppl']:.1f} ({100 * ordered['ppl_increase_vs_teacher']:+.1f} %)"),
        f("radial_compute", "radial student: executed FLOPs / teacher", radial["compute"],
          note=f"ppl {radial['ppl']:.1f} ({100 * radial['ppl_increase_vs_teacher']:+.1f} %)"),
        f("radial_vs_ordered", "radial student vs ordered student at equal executed FLOPs (ppl change)",
          vs_ordered, target="<= +0.02", met=None if vs_ordered is None else vs_ordered <= 0.02,
          note="ordered curve interpolated" if vs_ordered is not None else "outside the ordered curve"),
        f("radial_reuse", "radial student: tokens that reuse a layer", rs["reuse_token_share"], target="> 0.05",
          met=rs["reuse_token_share"] > 0.05),
        f("radial_exit", "radial student: tokens that exit early", rs["exit_share"], target="> 0.05",
          met=rs["exit_share"] > 0.05),
        f("oracle_at_radial", "layer oracle perplexity at the radial student's executed FLOPs",
          radial["oracle_ppl_at_same_compute"]),
        f("joint_vs_sequential_L", f"joint radial (pool {L}, {S} steps) vs sequential {L} layers, equal tokens (ppl ratio)",
          joint["ppl"] / seq_l["ppl"], target="< 1", met=joint["ppl"] < seq_l["ppl"],
          note=f"{joint['ppl']:.1f} vs {seq_l['ppl']:.1f}; sequential {S}: {seq_s['ppl']:.1f}"),
        f("joint_compute_vs_sequential_S", f"joint radial: executed FLOPs / sequential {S} layers",
          joint["compute_vs_sequential_S"]),
    ]
    details = {"part_a": {k: v for k, v in a.items() if k != "students"} | {
        "students": {n: {k: v for k, v in r.items()} for n, r in a["students"].items()}},
        "radial_training_log": radial_history, "part_b": b, "seconds": {"part_a": t_a, "part_b": t_b},
        "plot": str(png.relative_to(Path(__file__).resolve().parents[1])) if png.is_absolute() else str(png)}
    settings = {k: v for k, v in vars(args).items() if k not in ("results", "out")}
    path = benchlib.write_result(args.results, "radial_vs_ordered", settings, figures, details)
    print(f"wrote {path} and {png}")
    for fig_ in figures:
        print(f"  {fig_['label']}: {fig_['value']}" + (f" ({fig_['note']})" if fig_['note'] else ""))


if __name__ == "__main__":
    main()

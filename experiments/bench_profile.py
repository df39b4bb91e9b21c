"""Benchmark: residual-ratio profiling against PyTorch forward hooks at equal work; streaming peak memory.

OPT-125M shapes, random weights saved once with ``save_pretrained`` and loaded by
both sides. **Equal work** on both sides, timed interleaved (``benchlib``):

* the decoder alone (no LM head on either side) on ``batch x length`` tokens;
* every block's input ``x`` and update ``f`` (attention, MLP, the whole layer),
  the ratios ``|f| / |x + f|`` and ``|f| / |x|`` of every token;
* the same statistics of them: count, mean, p10, median, p90 (exact) and a
  200-bins-per-decade log histogram, per (ratio kind, block group, layer) and over
  all layers, groups ``attn``, ``mlp``, ``layer`` and ``blocks`` (attn + mlp).

radial_jax: ``rj.profile`` on the model in the per-layer (inference) layout, then
every accumulator's summary. Reference: transformers' ``model.model.decoder``
with forward hooks capturing ``x`` and ``f``, the ratios and statistics in torch
(``torch.quantile``, ``torch.bucketize``). The medians of both are compared.

Streaming: a subprocess profiles with ``profile_streaming`` (compiled first on a
tiny batch) and samples its RSS every 2 ms; the peak growth over the baseline is
compared with (largest layer-or-embedding block + the activations of the data,
the stream and one layer's output). The compiled layer's workspace (attention
scores, MLP hidden) is part of the growth too.

    python experiments/bench_profile.py                    # -> results/bench_profile.json
    python experiments/bench_profile.py --layers 2 --length 64 --rounds 2 --out /tmp/bench_profile.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import RESULTS, figure, interleave, rate, ratio, write_result  # noqa: E402

STREAM_SCRIPT = r"""
import json, sys, threading, time
import numpy as np, psutil
from radial_jax.profiling.streaming import profile_streaming
path, b, t, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ids = np.random.default_rng(0).integers(3, vocab, (b, t))
proc = psutil.Process()
profile_streaming(path, [(ids[:1, :8], None)], progress=False)  # compile and warm up with a tiny batch
profile_streaming(path, [(ids, None)], progress=False)  # and at the measured shapes
base, peak, running = proc.memory_info().rss, 0, True
def sample():
    global peak
    while running:
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.002)
th = threading.Thread(target=sample); th.start()
r = profile_streaming(path, [(ids, None)], progress=False)
running = False; th.join()
print(json.dumps({"baseline_bytes": base, "peak_bytes": peak, "median": r.median}))
"""

KINDS, BLOCKS = ("out", "in"), ("attn", "mlp", "layer")


def torch_reference(decoder, ids, edges):
    """Decoder forward with hooks, then ratios and the statistics ``rj.profile`` gives, in torch."""
    import torch
    layers = decoder.layers
    cache = [dict() for _ in layers]
    hooks = []
    for layer, c in zip(layers, cache):
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a, k, c=c: c.__setitem__("x", a[0] if a else k["hidden_states"]), with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_hook(lambda m, a, o, c=c: c.__setitem__("fa", o[0])))
        hooks.append(layer.fc2.register_forward_hook(lambda m, a, o, c=c: c.__setitem__("fm", o)))
    with torch.inference_mode():
        decoder(input_ids=ids)
        ratios = {}  # (kind, block) -> [L, n]
        per = {(k, b): [] for k in KINDS for b in BLOCKS}
        for c in cache:
            x, fa = c["x"], c["fa"]
            fm = c["fm"].reshape(x.shape)
            x_m = x + fa
            for block, (bx, bf) in {"attn": (x, fa), "mlp": (x_m, fm), "layer": (x, fa + fm)}.items():
                nf = bf.norm(dim=-1).flatten()
                per[("out", block)].append(nf / (bx + bf).norm(dim=-1).flatten())
                per[("in", block)].append(nf / bx.norm(dim=-1).flatten())
        ratios = {key: torch.stack(v) for key, v in per.items()}
        q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)

        def stats(v):
            v = v.double().flatten()
            hist = torch.bincount(torch.bucketize(v, edges, right=True).clamp(1, len(edges) - 1) - 1,
                                  minlength=len(edges) - 1)
            return torch.cat([v.mean()[None], torch.quantile(v, q), hist[:1].double()])

        out = {}
        for kind in KINDS:
            for group in BLOCKS + ("blocks",):
                r = (torch.cat([ratios[(kind, "attn")], ratios[(kind, "mlp")]], dim=1) if group == "blocks"
                     else ratios[(kind, group)])
                out[(kind, group, "all")] = stats(r)
                for i in range(r.shape[0]):
                    out[(kind, group, i)] = stats(r[i])
    for h in hooks:
        h.remove()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--out", default=str(RESULTS / "bench_profile.json"))
    args = ap.parse_args(argv)
    import jax
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    import radial_jax as rj
    from radial_jax.profiling.stats import EDGES

    tmp = tempfile.mkdtemp()
    cfg = OPTConfig(num_hidden_layers=args.layers)  # OPT-125M shapes
    torch.manual_seed(0)
    ref = OPTForCausalLM(cfg).eval()
    ref.save_pretrained(tmp)
    model = rj.load(tmp).with_layout("per_layer")
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.length))
    tids = torch.tensor(ids)
    edges = torch.tensor(EDGES)

    def ours():
        r = rj.profile(model, [(ids, None)], progress=False)
        return r, [acc.summary() for acc in r.acc.values()]

    def theirs():
        return torch_reference(ref.model.decoder, tids, edges)

    r_ours, _ = ours()
    r_ref = theirs()
    med_ours, med_ref = r_ours.median, float(r_ref[("out", "blocks", "all")][2])
    decoder = jax.jit(lambda p, x: model.module.apply({"params": p}, x, compute_logits=False).hidden)

    # lists, not the dicts: their keys mix str and int layer ids, which jax.block_until_ready cannot sort
    def torch_decoder_alone():
        with torch.inference_mode():
            return ref.model.decoder(input_ids=tids).last_hidden_state

    rounds = interleave({"ours": lambda: list(ours()[1]), "torch": lambda: list(theirs().values()),
                         "decoder_alone": lambda: decoder(model.params, ids),
                         "torch_decoder_alone": torch_decoder_alone}, repeats=args.rounds)
    tokens = ids.size
    speed = ratio(rounds, "torch", "ours")
    figures = [figure("profile_vs_hooks", f"profiling tokens/s vs PyTorch hooks at equal work (decoder only, "
                      f"ratios + statistics, {args.batch} × {args.length})", speed, unit="×", target="≥ 1.2",
                      met=speed["median"] >= 1.2,
                      note=f"medians {med_ours:.4f} / {med_ref:.4f}")]
    # what bounds it: the profile against our bare decoder forward (same tokens, no ratios, no statistics)
    cost = ratio(rounds, "ours", "decoder_alone")
    figures.append(figure("profile_vs_bare_forward", f"profiling time / the bare decoder forward's ({args.batch} × "
                          f"{args.length}): what the ratios and statistics add", cost, unit="×", target="≤ 1.05",
                          met=cost["median"] <= 1.05,
                          note="1.0 means profiling costs what the forward costs; the rest is the matmuls"))
    # the ceiling of profile_vs_hooks were profiling free: the two bare forwards, side by side
    bare = ratio(rounds, "torch_decoder_alone", "decoder_alone")
    figures.append(figure("bare_forward_vs_torch", f"the bare decoder forwards ({args.batch} × {args.length}): "
                          "PyTorch's time / ours, the ceiling of profiling vs hooks", bare, unit="×"))
    details = {"ours_tokens_per_s": rate(rounds, "ours", tokens), "torch_tokens_per_s": rate(rounds, "torch", tokens),
               "decoder_alone_tokens_per_s": rate(rounds, "decoder_alone", tokens),
               "torch_decoder_alone_tokens_per_s": rate(rounds, "torch_decoder_alone", tokens),
               "speedup": speed, "profile_over_bare_forward": cost, "bare_forward_vs_torch": bare,
               "median_ratio_out": {"radial_jax": med_ours, "torch_hooks": med_ref},
               "seconds": rounds,
               "work": "both: decoder without LM head; x and f of every block; ratio_out and ratio_in per token; "
                       "count, mean, p10, median, p90 and a log histogram per (kind, group, layer) and over layers"}
    print(f"profiling: {speed['median']:.2f}x torch hooks ({details['ours_tokens_per_s']['median']:.0f} vs "
          f"{details['torch_tokens_per_s']['median']:.0f} tokens/s); medians {med_ours:.5f} / {med_ref:.5f}",
          flush=True)

    # streaming peak memory (a fresh process)
    proc = subprocess.run([sys.executable, "-c", STREAM_SCRIPT, tmp, str(args.batch), str(args.length),
                           str(cfg.vocab_size)], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep
                               + os.environ.get("PYTHONPATH", "")})
    mem = json.loads(proc.stdout.strip().splitlines()[-1])
    sizes = rj.CheckpointReader(tmp).param_bytes()
    block_bytes = max(sizes["layer"], sizes["non_layer"])  # the embedding tables are the largest block here
    act_bytes = args.batch * args.length * cfg.hidden_size * 4 * 2  # the stream kept + a layer's output
    growth = mem["peak_bytes"] - mem["baseline_bytes"]
    mem_ratio = growth / (block_bytes + act_bytes)
    figures.append(figure("streaming_peak_rss", f"streaming profile: peak RSS growth / (largest block + activations), "
                          f"OPT-125M shapes, {args.batch} × {args.length}", mem_ratio, unit="×", target="≤ 1.3",
                          met=mem_ratio <= 1.3, note="one run (a memory figure, not a timing)"))
    details["streaming"] = {"peak_rss_growth_bytes": growth, "largest_block_bytes": block_bytes,
                            "one_decoder_layer_bytes": sizes["layer"], "embedding_and_head_bytes": sizes["non_layer"],
                            "activation_bytes": act_bytes, "ratio_to_bound": mem_ratio,
                            "median_ratio_out": mem["median"]}
    print(f"streaming: peak RSS growth {growth / 1e6:.0f} MB = {mem_ratio:.2f} x (largest block "
          f"{block_bytes / 1e6:.0f} MB + activations {act_bytes / 1e6:.0f} MB)", flush=True)
    settings = {"batch": args.batch, "length": args.length, "layers": args.layers, "hidden": cfg.hidden_size,
                "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
                "model": "OPT-125M shapes, random weights (seed 0)", "layout": "per_layer"}
    path = write_result(args.out, "bench_profile", settings, figures, details)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Profiling throughput against PyTorch forward hooks, and the streaming mode's peak memory.

OPT-125M shapes, random weights saved once with ``save_pretrained`` and loaded by
both sides. Measured side by side in one run (interleaved repeats):

* radial_jax: ``rj.profile`` (one jitted forward per batch, no LM head, ratios
  computed on device, statistics on the host);
* reference: transformers' PyTorch forward with hooks capturing every block's
  input and update, the ratios computed from them, *and* the LM head (the
  model's forward always computes it).

Streaming: a subprocess profiles with ``profile_streaming`` (compiled first on a
tiny batch) and samples its RSS every 2 ms; the peak growth over the baseline
is compared with (largest layer + the activations of the data, the stream and
one layer's output). Note the compiled layer's workspace (attention scores,
MLP hidden) is part of the growth too.

    python experiments/bench_profile.py --out results/bench_profile.json
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STREAM_SCRIPT = r"""
import json, sys, threading, time
import numpy as np, psutil
from radial_jax.profiling.streaming import profile_streaming
path, b, t = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = np.random.default_rng(0).integers(3, 50000, (b, t))
proc = psutil.Process()
profile_streaming(path, [(ids[:1, :8], None)], progress=False)  # compile and warm up with a tiny batch
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


def torch_hooks_profile(model, ids):
    """Ratios from forward hooks (the reference's work: full forward incl. LM head, plus the hooks)."""
    import torch
    cache, out = {}, []
    hooks = []
    for i, layer in enumerate(model.model.decoder.layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, k, i=i: cache.__setitem__(("x", i), (a or (k["hidden_states"],))[0]), with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_hook(lambda m, a, o, i=i: cache.__setitem__(("fa", i), o[0])))
        hooks.append(layer.fc2.register_forward_hook(lambda m, a, o, i=i: cache.__setitem__(("fm", i), o)))
    with torch.no_grad():
        model(input_ids=ids)
        for i in range(len(model.model.decoder.layers)):
            x, fa = cache[("x", i)], cache[("fa", i)]
            fm = cache[("fm", i)].reshape(x.shape)
            out.append((fa.norm(dim=-1) / (x + fa).norm(dim=-1)).flatten())
            out.append((fm.norm(dim=-1) / (x + fa + fm).norm(dim=-1)).flatten())
        r = torch.cat(out)
        med = r.median().item()
    for h in hooks:
        h.remove()
    return med


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--out", default="results/bench_profile.json")
    args = ap.parse_args()
    import torch
    from transformers import OPTConfig, OPTForCausalLM
    import radial_jax as rj
    torch.set_num_threads(os.cpu_count())
    tmp = tempfile.mkdtemp()
    cfg = OPTConfig(num_hidden_layers=args.layers)  # OPT-125M shapes
    torch.manual_seed(0)
    ref = OPTForCausalLM(cfg).eval()
    ref.save_pretrained(tmp)
    model = rj.load(tmp)
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.length))
    tids = torch.tensor(ids)
    rj.profile(model, [(ids, None)], progress=False)  # compile
    torch_hooks_profile(ref, tids)  # warm-up
    ours, theirs = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter(); r = rj.profile(model, [(ids, None)], progress=False); ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); med_ref = torch_hooks_profile(ref, tids); theirs.append(time.perf_counter() - t0)
    tokens = ids.size
    ratio = float(np.median(np.array(theirs) / np.array(ours)))
    # streaming peak memory (fresh process)
    proc = subprocess.run([sys.executable, "-c", STREAM_SCRIPT, tmp, str(args.batch), str(args.length)],
                          capture_output=True, text=True, check=True)
    mem = json.loads(proc.stdout.strip().splitlines()[-1])
    reader = rj.CheckpointReader(tmp)
    sizes = reader.param_bytes()
    layer_bytes = max(sizes["layer"], sizes["non_layer"])  # the embedding tables are the largest "layer" here
    act_bytes = args.batch * args.length * cfg.hidden_size * 4 * 2  # stream kept + layer output
    growth = mem["peak_bytes"] - mem["baseline_bytes"]
    result = {
        "shapes": {"batch": args.batch, "length": args.length, "layers": args.layers, "hidden": cfg.hidden_size},
        "device": "cpu", "radial_jax_tokens_per_s": tokens / float(np.median(ours)),
        "torch_hooks_tokens_per_s": tokens / float(np.median(theirs)), "speedup": ratio,
        "target_speedup": 1.5,
        "work": {"radial_jax": "forward without LM head; ratios on device; exact statistics on host",
                 "torch_hooks": "full forward incl. LM head; hooks capture x and f; ratios + median in torch"},
        "median_ratio_out": {"radial_jax": r.median, "torch_hooks": med_ref},
        "streaming": {"peak_rss_growth_bytes": growth, "largest_layer_bytes": layer_bytes, "one_decoder_layer_bytes": sizes["layer"],
                      "embedding_and_head_bytes": sizes["non_layer"],
                      "activation_bytes": act_bytes, "ratio_to_bound": growth / (layer_bytes + act_bytes),
                      "target_ratio": 1.3},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

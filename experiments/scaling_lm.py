"""Median residual ratio against model size on WikiText-2, for a family of language models.

The paper's curve is OPT-125M ... OPT-66B; the same study runs over today's
families (``--family qwen2.5``: Qwen2.5-0.5B ... 72B; ``llama3``: Llama 3.2 1B ...
Llama 3.1 70B; ``gemma2``: 2B ... 27B), or any list of checkpoints (``--models``).

    python experiments/scaling_lm.py                         # OPT, all sizes, needs the hub (or its cache)
    python experiments/scaling_lm.py --family qwen2.5 --max-tokens 16384
    python experiments/scaling_lm.py --models facebook/opt-125m facebook/opt-350m
    python experiments/scaling_lm.py --family llama3 --tiny --out runs/scaling_tiny   # offline smoke run

Models above ``--streaming-above`` parameters are profiled layer by layer from
their checkpoint (one layer in memory); their oracle simulation is skipped.
Results: ``<out>/results.json``, ``results.csv``, ``scaling.png``, and per model
``models/<name>/`` (profile, per-layer CSV/PNG, simulation). A rerun skips the
models already done.
"""
import argparse
import tempfile

from radial_jax.data import load_text_source, perplexity_windows, tokenize
from radial_jax.profiling.scaling import run_scaling

FAMILIES = {
    "opt": [f"facebook/opt-{s}" for s in ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")],
    "qwen2.5": [f"Qwen/Qwen2.5-{s}" for s in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")],
    "llama3": ["meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.1-8B",
               "meta-llama/Llama-3.1-70B"],
    "gemma2": ["google/gemma-2-2b", "google/gemma-2-9b", "google/gemma-2-27b"],
}


def tiny_config(family: str, vocab: int, hidden: int, layers: int):
    """A transformers config of ``family``'s architecture at a tiny size (offline smoke mode)."""
    import transformers
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=256)
    if family == "opt":
        return transformers.OPTConfig(ffn_dim=4 * hidden, word_embed_proj_dim=hidden, **common)
    gated = dict(intermediate_size=4 * hidden, num_key_value_heads=2, **common)
    if family == "qwen2.5":
        return transformers.Qwen2Config(**gated)
    if family == "gemma2":
        return transformers.Gemma2Config(head_dim=hidden // 4, sliding_window=32, **gated)
    return transformers.LlamaConfig(**gated)


def tiny_checkpoints(root, family: str):
    """Random checkpoints of ``family`` at growing sizes (offline smoke mode: the numbers mean nothing)."""
    import torch
    from transformers import AutoModelForCausalLM
    from radial_jax.data import offline_tokenizer
    vocab = offline_tokenizer().vocab_size
    paths = []
    for i, (h, n) in enumerate([(32, 2), (64, 4), (96, 6)]):
        torch.manual_seed(i)
        path = f"{root}/tiny-{family}-{h}"
        AutoModelForCausalLM.from_config(tiny_config(family, vocab, h, n)).save_pretrained(path)
        paths.append(path)
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="opt", help="the sizes of one family")
    ap.add_argument("--models", nargs="+", default=None, help="checkpoints (hub ids or directories) instead")
    ap.add_argument("--data", default="wikitext2", help="wikitext2 (test split), embedded, or text files")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--thresholds", default="0,0.01,0.02,0.05,0.1,0.2")
    ap.add_argument("--streaming-above", type=float, default=3e9)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=None, help="default: runs/scaling_<family>")
    ap.add_argument("--tiny", action="store_true", help="offline smoke run on random tiny checkpoints")
    from radial_jax.scale.pod import add_mesh_args, mesh_from_args
    add_mesh_args(ap, pool=False)  # --mesh data,fsdp,tensor / --distributed: weights read sharded
    args = ap.parse_args()
    mesh = mesh_from_args(args)
    models = args.models or FAMILIES[args.family]
    args.out = args.out or f"runs/scaling_{args.family}"
    if args.tiny:
        models = tiny_checkpoints(tempfile.mkdtemp(), args.family)
        args.data, args.window, args.max_tokens = "embedded", 64, 4096

    def make_batches(model):
        tokenizer = None if args.tiny else model.tokenizer()
        docs, tokenizer = load_text_source(args.data, tokenizer)
        ids, mask, score = perplexity_windows(tokenize(docs, tokenizer)[:args.max_tokens], args.window)
        b = args.batch_size
        chunks = [slice(i, i + b) for i in range(0, len(ids), b)]
        return [(ids[c], mask[c]) for c in chunks], [(ids[c], mask[c], score[c]) for c in chunks]

    rows = run_scaling(models, make_batches, args.out, thresholds=[float(t) for t in args.thresholds.split(",")],
                       streaming_above=args.streaming_above, dtype=args.dtype, data_name=args.data, mesh=mesh)
    for r in rows:
        print(f"{r['model']:<32}{r['num_params'] / 1e6:>10.0f}M  median ratio_out {r['median_ratio_out']:.4f}")
    print(f"results in {args.out}/ (results.json, results.csv, scaling.png)")


if __name__ == "__main__":
    main()

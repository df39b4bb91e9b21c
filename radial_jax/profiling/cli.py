"""``radial-jax profile`` and ``radial-jax simulate``."""
from __future__ import annotations

import argparse
from pathlib import Path

from radial_jax import defaults as D


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="hub id (e.g. facebook/opt-125m) or local checkpoint directory")
    p.add_argument("--data", default=None,
                   help="text: 'embedded' (offline), 'wikitext2', a .txt file or directory; "
                        "ViT: an image folder or 'coco' (default: wikitext2 / coco)")
    p.add_argument("--window", type=int, default=D.PROFILE_WINDOW, help="tokens per window (text)")
    p.add_argument("--stride", type=int, default=None, help="window stride (default: window)")
    p.add_argument("--max-tokens", type=int, default=None, help="use at most this many tokens of the text")
    p.add_argument("--max-images", type=int, default=D.MAX_IMAGES, help="use at most this many images")
    p.add_argument("--batch-size", type=int, default=D.PROFILE_BATCH_SIZE)
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--out", default=None, help="output directory (default: runs/<command>/<model>)")
    from radial_jax.scale.pod import add_mesh_args
    add_mesh_args(p)


def load_model_and_data(args, with_scores: bool = False, load_weights: bool = True, mesh=None):
    """The model and its batches, all validated before any forward pass.

    ``load_weights=False`` (streaming) builds the bundle from the embeddings and heads only.
    ``mesh``: the weights are read sharded (each process its devices' slices; ``rj.load(mesh=...)``).
    """
    from radial_jax.checkpoints.load import load
    from radial_jax.checkpoints.reader import CheckpointReader
    from radial_jax.data import (coco_validation, image_folder, load_text_source, perplexity_windows, tokenize,
                                 window_batches)
    from radial_jax.data.images import ImageStats
    from radial_jax.scale.pod import rules_for
    if load_weights:
        model = load(args.model, dtype=args.dtype, mesh=mesh, rules=rules_for(getattr(args, "pool", "fsdp")))
    else:
        model = CheckpointReader(args.model).shell(args.dtype, name=str(args.model))
    if model.is_decoder:
        tokenizer = model.tokenizer()  # the model's own; a model without one is refused, never given another's
        source = args.data or "wikitext2"
        docs, tokenizer = load_text_source(source, tokenizer)
        tokens = tokenize(docs, tokenizer)[:args.max_tokens]
        window = min(args.window, model.config.max_length)
        if len(tokens) < window:
            raise ValueError(f"{source} gives {len(tokens)} tokens, shorter than one window of {window}; "
                             "use a smaller --window or more text")
        ids, mask, score = perplexity_windows(tokens, window, args.stride)
        batches = window_batches((ids, mask, score) if with_scores else (ids, mask), args.batch_size)
        return model, batches, source
    size, stats = model.config.image_size, ImageStats.of(model.tokenizer_path)  # the checkpoint's own statistics
    if args.data in (None, "coco"):
        return model, list(coco_validation(size, limit=args.max_images, batch_size=args.batch_size,
                                           stats=stats)), "coco-2017-val"
    return model, list(image_folder(args.data, size, limit=args.max_images, batch_size=args.batch_size,
                                    stats=stats)), args.data


def _out_dir(args, command: str) -> Path:
    return Path(args.out or Path("runs") / command / str(args.model).strip("/").replace("/", "--"))


def check_args(args, command: str) -> None:
    """The sizes and the output directory, checked before the model is loaded."""
    from radial_jax.reporting.files import check_output_dir
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--window", args.window, 2),
                             ("--max-images", args.max_images, 1), ("--stride", args.stride, 1),
                             ("--max-tokens", args.max_tokens, 2)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    check_output_dir(_out_dir(args, command))


def run_profile(args) -> int:
    from radial_jax.profiling.residual import profile
    from radial_jax.scale.pod import is_main_process, mesh_from_args
    check_args(args, "profile")
    mesh = mesh_from_args(args)
    model, batches, data_name = load_model_and_data(args, load_weights=not args.streaming, mesh=mesh)
    if args.streaming:
        from radial_jax.profiling.streaming import profile_streaming
        kw = {} if mesh is None else {"mesh": mesh}  # each layer read sharded (one process)
        result = profile_streaming(args.model, batches, dtype=args.dtype, data_name=data_name,
                                   keep_raw=args.save_raw, exact_limit=args.exact_limit, **kw)
    else:
        result = profile(model, batches, data_name=data_name, keep_raw=args.save_raw,
                         exact_limit=args.exact_limit)
    if not is_main_process():  # every process computed the same (replicated) statistics
        return 0
    out = result.save(_out_dir(args, "profile"))
    print(result.table())
    print(f"wrote {out}/profile.json, per_layer.csv, per_layer.png")
    return 0


def run_simulate(args) -> int:
    from radial_jax.profiling.skipping import simulate_skipping
    from radial_jax.profiling.skipping import parse_thresholds
    from radial_jax.scale.pod import is_main_process, mesh_from_args
    thresholds = parse_thresholds(args.thresholds)  # before loading anything
    check_args(args, "simulate")
    mesh = mesh_from_args(args)
    model, batches, data_name = load_model_and_data(args, with_scores=True, mesh=mesh)
    sim = simulate_skipping(model, batches, thresholds, ratio_kind=args.ratio, data_name=data_name)
    if not is_main_process():
        return 0
    out = sim.save(_out_dir(args, "simulate"))
    print(sim.table())
    print(f"wrote {out}/simulation.json, simulation.png")
    return 0


def register(sub) -> None:
    from radial_jax.models.layer import RATIO_KINDS
    p = sub.add_parser("profile", help="residual ratios per token, block and layer (docs/design.md §2)")
    add_data_args(p)
    p.add_argument("--streaming", action="store_true",
                   help="load one layer at a time from the checkpoint (models larger than memory)")
    p.add_argument("--save-raw", action="store_true", help="also save raw per-token ratios (raw.npz)")
    p.add_argument("--exact-limit", type=int, default=5_000_000,
                   help="values kept for exact quantiles; beyond it a log-histogram sketch (bound stated)")
    p.set_defaults(func=run_profile)
    s = sub.add_parser("simulate", help="oracle layer skipping over a threshold sweep (docs/design.md §3)")
    add_data_args(s)
    s.add_argument("--thresholds", default=D.csv(D.SIMULATE_THRESHOLDS), help="comma-separated values in [0, 1]")
    s.add_argument("--ratio", default=D.RATIO, choices=RATIO_KINDS, help="which ratio the threshold applies to")
    s.set_defaults(func=run_simulate)

"""``radial-jax generate``: a prompt in, text out, from a checkpoint and optionally its routed student.

::

    radial-jax generate --model facebook/opt-125m --prompt "The capital of France is" --max-new-tokens 20
    radial-jax generate --model runs/pipeline/teacher --student runs/pipeline/distill/radial \\
        --prompt "The for statement" --max-new-tokens 16

With ``--student`` the Radial Network decodes too, and its per-token depth (layer visits / L of the
forward pass that chose each new token) and executed FLOPs (prefill and decode steps, from
``GenerationOutput``) are printed against the sequential model's on the same tokens.
"""
from __future__ import annotations

from pathlib import Path

from radial_jax import defaults as D


def find_student(path):
    """A ``save_student`` directory, or a run directory holding one (``<run>/student``)."""
    from radial_jax.radial.artifacts import load_student
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--student {path}: no such directory")
    if not (p / "params.msgpack").is_file() and (p / "student" / "params.msgpack").is_file():
        p = p / "student"
    return load_student(p)[0]


def routed_summary(out, student, prompt_len: int) -> dict:
    """Mean depth of the new tokens and executed FLOPs / the sequential model's on the same work."""
    import numpy as np
    from radial_jax.models.flops import dense_flops, head_flops
    config, n = student.config, int(out.num_new[0])
    cache_len = prompt_len + out.new_tokens.shape[1]  # generate's default max_len
    dense = (dense_flops(config, prompt_len, cache_len, with_head=False) + head_flops(config, 1)
             + (n - 1) * dense_flops(config, 1, cache_len))
    executed = out.prefill_flops + float(np.sum(out.step_flops[:n]))
    depth = out.depth[0, :n] / config.num_layers
    return {"new_tokens": n, "depth_per_token": [round(float(d), 4) for d in depth],
            "mean_depth": float(depth.mean()), "executed_flops_fraction": executed / dense}


def cmd_generate(args) -> int:
    import jax
    from radial_jax.checkpoints.load import load
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if not args.prompt:
        raise ValueError("--prompt is empty; give some text to continue")
    model = load(args.model)
    if not model.is_decoder:
        raise ValueError(f"--model {args.model} is a {model.config.model_type} model; generate needs a language model")
    model = model.with_layout("per_layer")  # served: generate then copies no layer per call (Model.generate)
    tok = model.tokenizer()
    ids = tok(args.prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        raise ValueError(f"--prompt {args.prompt!r} gives no tokens")
    import numpy as np
    ids_bt = np.asarray([ids], np.int32)
    sampling = dict(do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_k=args.top_k,
                    top_p=args.top_p, rng=jax.random.key(args.seed) if args.temperature > 0 else None)
    bundles = [("model", model)]
    if args.student:
        student = find_student(args.student)
        if (student.config.vocab_size, student.config.num_layers) != (model.config.vocab_size,
                                                                      model.config.num_layers):
            raise ValueError(f"--student {args.student} does not match --model {args.model} "
                             f"(vocabulary, layers: {student.config.vocab_size}, {student.config.num_layers} vs "
                             f"{model.config.vocab_size}, {model.config.num_layers})")
        bundles.append(("student", student))
    for label, bundle in bundles:
        out = bundle.generate(ids_bt, max_new_tokens=args.max_new_tokens, return_output=True, **sampling)
        text = tok.decode(out.new_tokens[0, :int(out.num_new[0])], skip_special_tokens=True)
        if len(bundles) > 1:
            print(f"[{label}]")
        print(args.prompt + text)
        if label == "student":
            s = routed_summary(out, bundle, len(ids))
            print(f"routed: {s['new_tokens']} new tokens, mean depth {100 * s['mean_depth']:.1f}% of "
                  f"{bundle.config.num_layers} layers, executed FLOPs {100 * s['executed_flops_fraction']:.1f}% "
                  f"of the sequential model's; depth per token {s['depth_per_token']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a checkpoint and, with --student, its Radial Network")
    p.add_argument("--model", required=True, help="hub id, checkpoint directory or 'radial-jax train' model dir")
    p.add_argument("--student", default=None, help="a 'radial-jax distill' run dir or its student dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=D.MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=D.TEMPERATURE_SAMPLING, help="0: greedy decoding")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=D.SEED)
    p.set_defaults(func=cmd_generate)

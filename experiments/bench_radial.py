"""Benchmark: routed forward and decoding of a Radial Network vs the dense (sequential) OPT.

OPT-125M shapes by default (batch 8, length 512, 12 layers of width 768); on a
small shared CPU pass smaller flags. Measured side by side in one run:

* forward (layers + final norm, no LM head; and with the head) at capacity factors
  1, 0.5, 0.25, 0.125 in ordered and radial mode: XLA FLOPs from
  ``jit(...).lower(...).compile().cost_analysis()`` and median wall time. XLA's cost
  analysis counts a rolled loop body once, so the routed FLOPs come from a
  compile with the step loop unrolled (``scan_unroll=True``) and the dense FLOPs
  add ``L - 1`` times one layer's FLOPs to the scanned model's count;
* decoding tokens/s, one token per row per step over a prefilled global cache,
  routed (ordered mode, capacity 0.5 across the batch, router biased to keep, so
  mean depth = 50 %) vs the dense OPT decode step, with and without the LM head.

The router is a fresh one with its keep/layer logits biased up, so every
capacity binds (compute is static anyway: it is set by the capacity).

    python experiments/bench_radial.py --out bench_radial.json                # full shapes
    python experiments/bench_radial.py --batch 2 --length 128 --repeats 2     # small CPU
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import radial_jax as rj  # noqa: E402
from radial_jax.kv_cache import KVCache  # noqa: E402
from radial_jax.radial import RadialNetwork  # noqa: E402


def dense_flops(model, ids, head):
    """XLA counts a rolled scan body once: dense FLOPs = model (one layer counted) + (L - 1) x one layer."""
    from radial_jax.models.layer import TransformerLayer
    L = model.config.num_layers
    b, t = ids.shape
    total = flops_of(lambda p, x: model.module.apply({"params": p}, x, compute_logits=head), model.params, ids)
    layer = TransformerLayer(model.config.layer_config())
    p0 = jax.tree_util.tree_map(lambda a: a[0], model.params["layers"])
    x = jnp.zeros((b, t, model.config.hidden_size))
    mask = jnp.tril(jnp.ones((t, t), bool))[None].repeat(b, 0)
    one = flops_of(lambda p, x, m: layer.apply({"params": p}, x, m)[0], p0, x, mask)
    return total + (L - 1) * one


def flops_of(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def wall_of(fn, *args, repeats=3):
    f = jax.jit(fn)
    jax.block_until_ready(f(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def biased_router(params, num_layers):
    """Push the layer logits above exit/skip so that capacity, not the router, limits depth."""
    router = jax.tree_util.tree_map(lambda a: a, params["router"])
    bias = router["fc2"]["bias"]
    router["fc2"]["bias"] = bias.at[:num_layers].add(5.0)
    return {**params, "router": router}


def bench_decode(model, b, args):
    cfg, L = model.config, model.config.num_layers
    p_len, n = args.decode_prompt, args.decode_steps
    total = p_len + n
    prompt = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, (b, p_len)))
    feed = jnp.asarray(np.random.default_rng(2).integers(3, cfg.vocab_size, (b, n)))
    lc = cfg.layer_config()
    slots = jnp.broadcast_to(jnp.arange(p_len, dtype=jnp.int32), (b, p_len))
    dense_cache = model.module.apply({"params": model.params}, prompt, positions_bt=slots,
                                     cache=KVCache.create(L, b, total, lc.kv_heads, lc.head_dim),
                                     compute_logits=False).cache
    rm = RadialNetwork.from_sequential(model, mode="ordered", capacity_factor=0.5)
    rparams = biased_router(rm.params, L)
    routed_cache = rm.module.apply({"params": rparams}, prompt, positions_bt=slots,
                                   cache=rm.init_cache(b, total), compute_logits=False).cache

    def dense_decode(params, cache, toks, head):
        def body(cache, i):
            out = model.module.apply({"params": params}, toks[:, i][:, None],
                                     positions_bt=jnp.full((b, 1), p_len + i, jnp.int32), cache=cache,
                                     compute_logits=head)
            return out.cache, out.hidden[:, 0, 0]
        return jax.lax.scan(body, cache, jnp.arange(n))[1]

    def routed_decode(params, cache, toks, head):
        def body(cache, i):
            out = rm.module.apply({"params": params}, toks[:, i], jnp.full((b,), p_len + i, jnp.int32), cache,
                                  None, head, method="decode_step")
            return out.cache, out.metrics.mean_depth
        return jax.lax.scan(body, cache, jnp.arange(n))[1]

    rows = {}
    for head in (False, True):
        key = "with_head" if head else "body"
        td = wall_of(lambda p, c, t, head=head: dense_decode(p, c, t, head), model.params, dense_cache, feed,
                     repeats=args.repeats)
        tr = wall_of(lambda p, c, t, head=head: routed_decode(p, c, t, head), rparams, routed_cache, feed,
                     repeats=args.repeats)
        depth = float(np.mean(jax.jit(lambda p, c, t: routed_decode(p, c, t, False))(rparams, routed_cache, feed)))
        rows[key] = dict(batch=b, dense_tokens_per_s=b * n / td, routed_tokens_per_s=b * n / tr,
                         speedup=td / tr, routed_mean_depth_layers=depth, routed_depth_fraction=depth / L,
                         target_met=bool(td / tr >= 1.6))
        print("decode", key, json.dumps(rows[key]), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=3072)
    ap.add_argument("--vocab", type=int, default=50272)
    ap.add_argument("--capacities", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125])
    ap.add_argument("--modes", nargs="+", default=["ordered", "radial"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-prompt", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--decode-batch", type=int, nargs="+", default=None, help="default: --batch")
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--out", default="bench_radial.json")
    args = ap.parse_args(argv)

    cfg = rj.OPTConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       ffn_dim=args.ffn, num_attention_heads=args.heads,
                       max_position_embeddings=max(2048, args.length, args.decode_prompt + args.decode_steps))
    model = rj.build(cfg, seed=0)
    L = cfg.num_layers
    ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.length)))
    result = {"device": str(jax.devices()[0]), "config": vars(args), "forward": [], "decode": {}}

    if not args.skip_forward:
        def dense(params, x, head):
            return model.module.apply({"params": params}, x, compute_logits=head).hidden
        dense_rows = {}
        for head in (False, True):
            f = lambda p, x, head=head: model.module.apply({"params": p}, x, compute_logits=head)
            dense_rows[head] = dict(flops=dense_flops(model, ids, head),
                                    wall_s=wall_of(f, model.params, ids, repeats=args.repeats))
        result["dense"] = {"body": dense_rows[False], "with_head": dense_rows[True]}
        jobs = [(m, c) for m in args.modes for c in args.capacities]
        for mode, c in tqdm(jobs, desc="routed forward"):
            rm = RadialNetwork.from_sequential(model, mode=mode, capacity_factor=c)
            params = biased_router(rm.params, L)
            row = {"mode": mode, "capacity": c}
            for head in (False, True):
                f = lambda p, x, head=head, rm=rm: rm.module.apply({"params": p}, x, compute_logits=head)
                f_unrolled = lambda p, x, head=head, rm=rm: rm.replace(scan_unroll=True).module.apply(
                    {"params": p}, x, compute_logits=head)
                fl = flops_of(f_unrolled, params, ids)  # unrolled steps: every step counted
                wt = wall_of(f, params, ids, repeats=args.repeats)
                d = dense_rows[head]
                key = "with_head" if head else "body"
                row[key] = dict(flops=fl, wall_s=wt, flops_ratio=fl / d["flops"], speedup=d["wall_s"] / wt,
                                flops_target_met=bool(fl <= (c + 0.03) * d["flops"]),
                                speedup_target_met=(bool(d["wall_s"] / wt >= 0.8 / c) if c in (0.5, 0.25) else None))
            out = jax.jit(lambda p, x, rm=rm: rm.module.apply({"params": p}, x, compute_logits=False))(params, ids)
            row["mean_depth"] = float(out.metrics.mean_depth)
            row["dropped"] = int(out.metrics.dropped.sum())
            result["forward"].append(row)
            print(json.dumps(row), flush=True)

    # Decoding: dense OPT decode step vs routed (ordered, capacity 0.5 across the batch).
    for b in (args.decode_batch or [args.batch]):
        result["decode"][str(b)] = bench_decode(model, b, args)

    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

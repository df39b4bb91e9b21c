"""Probe: can a radial step's layers run as one grouped matmul (``jax.lax.ragged_dot``) on this backend?

A radial step sends each token to one of the ``L`` layers of the pool, at loads known only at run time.
Three ways to run one matmul of every layer (the MLP's first, ``e -> f``) on the step's tokens:

* ``switch``: each layer at the smallest static size that holds its load (``dispatch.prefill_sizes``),
  under a ``lax.switch``: the matmul part of ``radial.visit.run_layer``, the CPU path;
* ``padded``: every layer at the smallest static size that holds the largest load, one batched matmul
  ``[L, C, e] x [L, e, f]``: ``run_layers_grouped``;
* ``ragged``: one ``jax.lax.ragged_dot`` over the ``M`` tokens sorted by layer, the loads as its group sizes.

Reported for each: executed FLOPs (those of the sizes it runs at) and wall time, the three timed
interleaved; for ``ragged``, XLA's own FLOPs too (``cost_analysis``; it counts a switch at its costliest
branch, so the other two forms' counts would be their largest sizes', not what runs). Where JAX lowers
``ragged_dot`` to XLA's ``ragged_dot`` instruction (TPU and GPU by default; on GPU, the flag
``jax_ragged_dot_use_gpu_pallas_triton_lowering`` picks a Triton kernel), its FLOPs can be ``2 M e f``.
On CPU JAX expands it into a masked dense product over every group: ``L`` times that, which rules it out
there. The loads are the busiest step of the fitted-route prefill at 25 % depth in
``results/bench_radial_125m.json`` (OPT-125M shapes).

    python experiments/grouped_matmul.py                  # -> results/grouped_matmul.json
    python experiments/grouped_matmul.py --repeats 2 --out /tmp/grouped_matmul.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import RESULTS, figure, interleave, ratio, summary, write_result, xla_flops  # noqa: E402

LOADS_FROM = RESULTS / "bench_radial_125m.json"


def step_loads(path: Path, target_depth: float) -> tuple:
    """``(loads per layer, c_max, buckets, batch)`` of the step with the most tokens in ``path``'s fitted prefill."""
    if not path.exists():
        raise SystemExit(f"{path} not found: run experiments/bench_radial.py first, or pass --loads-from")
    result = json.loads(path.read_text())
    fitted = result["details"].get("prefill_fitted", [])
    runs = [r for r in fitted if r.get("target_depth") == target_depth]
    if not runs:
        raise SystemExit(f"{path} has no fitted prefill at target depth {target_depth}; it has "
                         f"{[r.get('target_depth') for r in fitted]}")
    run, batch = runs[0], result["settings"]["batch"]
    loads = max(run["layer_sizes"], key=sum)
    return tuple(int(n) for n in loads), int(run["c_max"]), int(run["prefill_buckets"]), int(batch)


def programs(loads, sizes, e: int, f: int):
    """``{name: (fn, args)}`` of the three forms, on random inputs of the shapes each needs."""
    import jax
    import jax.numpy as jnp
    from radial_jax.radial.dispatch import size_index

    L, C, M = len(loads), sizes[-1], int(sum(loads))
    rng = np.random.default_rng(0)
    w_lef = jnp.asarray(rng.standard_normal((L, e, f), np.float32) * 0.02)
    x_lce = rng.standard_normal((L, C, e), np.float32)  # each layer's tokens, padded to C
    x_me = jnp.asarray(np.concatenate([x_lce[l, :n] for l, n in enumerate(loads)]))  # the same, sorted by layer
    x_lce = jnp.asarray(x_lce)
    loads_l = jnp.asarray(loads, jnp.int32)

    def pad_rows(a, n):
        return jnp.pad(a, [(0, n - a.shape[0])] + [(0, 0)] * (a.ndim - 1))

    def switch(x_lce, w_lef, loads_l):
        def at(l, size):
            return lambda: pad_rows(x_lce[l, :size] @ w_lef[l], C) if size else jnp.zeros((C, f), x_lce.dtype)
        return jnp.stack([jax.lax.switch(size_index(sizes, loads_l[l]), [at(l, s) for s in sizes])
                          for l in range(L)])

    def padded(x_lce, w_lef, loads_l):
        def at(size):
            if not size:
                return lambda: jnp.zeros((L, C, f), x_lce.dtype)
            return lambda: jnp.pad(jnp.einsum("lce,lef->lcf", x_lce[:, :size], w_lef), [(0, 0), (0, C - size), (0, 0)])
        return jax.lax.switch(size_index(sizes, jnp.max(loads_l)), [at(s) for s in sizes])

    def ragged(x_me, w_lef, loads_l):
        return jax.lax.ragged_dot(x_me, w_lef, loads_l)

    return {"switch": (switch, (x_lce, w_lef, loads_l)), "padded": (padded, (x_lce, w_lef, loads_l)),
            "ragged": (ragged, (x_me, w_lef, loads_l))}


def check_same_values(forms, loads) -> float:
    """The three forms' products of the loaded rows agree (largest difference, relative); SystemExit otherwise."""
    outs = {name: np.asarray(fn(*a)) for name, (fn, a) in forms.items()}
    rows = {name: np.concatenate([o[l, :n] for l, n in enumerate(loads)]) for name, o in outs.items()
            if name != "ragged"}
    rows["ragged"] = outs["ragged"]
    scale = float(np.max(np.abs(rows["switch"])))
    worst = max(float(np.max(np.abs(r - rows["switch"]))) for r in rows.values()) / scale
    if worst > 1e-4:
        raise SystemExit(f"the forms disagree: largest difference {worst:.2e} of the largest value")
    return worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loads-from", type=Path, default=LOADS_FROM, help="a bench_radial.py result")
    ap.add_argument("--target-depth", type=float, default=0.25)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--ffn", type=int, default=3072)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=RESULTS / "grouped_matmul.json")
    args = ap.parse_args(argv)
    for name in ("hidden", "ffn", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    import jax
    from radial_jax.radial.dispatch import prefill_sizes, size_index

    loads, c_max, buckets, batch = step_loads(args.loads_from, args.target_depth)
    sizes = prefill_sizes(batch * c_max, buckets)
    e, f, M = args.hidden, args.ffn, sum(loads)
    ideal = 2.0 * M * e * f
    def run_size(load):  # the static size a load runs at
        return sizes[int(size_index(sizes, load))]
    exec_flops = {"switch": 2.0 * e * f * sum(run_size(n) for n in loads),
                  "padded": 2.0 * e * f * len(loads) * run_size(max(loads)),
                  "ragged": ideal}
    forms = {name: (jax.jit(fn), a) for name, (fn, a) in programs(loads, sizes, e, f).items()}
    agreement = check_same_values(forms, loads)  # compiles each form once, for the timing too
    fn, a = forms["ragged"]
    xla = {"ragged": xla_flops(fn, *a)}
    rounds = interleave({name: (lambda fn=fn, a=a: fn(*a)) for name, (fn, a) in forms.items()}, args.repeats)
    backend = jax.default_backend()
    figures = [
        figure("ragged_xla_flops", f"ragged_dot: XLA's FLOPs / 2 M e f ({backend}; {len(loads)} groups)",
               xla["ragged"] / ideal, unit="x", note="about 1 where lowered natively; the group count where expanded"),
        figure("ragged_vs_switch", f"ragged_dot vs per-layer switch, time ({backend})",
               ratio(rounds, "switch", "ragged"), unit="x", note="> 1: the grouped matmul is faster"),
        figure("padded_vs_switch", f"one padded batched matmul vs per-layer switch, time ({backend})",
               ratio(rounds, "switch", "padded"), unit="x", note="> 1: the padded batch is faster"),
    ]
    details = {"loads": list(loads), "sizes": list(sizes), "tokens": M, "largest_difference": agreement,
               "flops": {"ideal": ideal, "executed": exec_flops, "xla": xla},
               "seconds": {name: summary(v) for name, v in rounds.items()}}
    settings = {"loads_from": str(args.loads_from.name), "target_depth": args.target_depth, "hidden": e, "ffn": f,
                "c_max": c_max, "buckets": buckets, "batch": batch, "repeats": args.repeats}
    write_result(args.out, "grouped_matmul", settings, figures, details)
    for fig in figures:
        print(f"{fig['label']}: {fig['value']:.3g}{fig['unit']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

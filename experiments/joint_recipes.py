"""Can joint radial training learn reuse and exits that pay? Recipes on a pool of L/2 layers and L steps.

Issue 26, item 5: a Radial Network with a pool of ``L/2`` layers and ``L`` steps (a token may visit a
layer twice) trained from scratch on the same tokens, in the same order, as ``depth_pays``' sequential
models of ``L`` and ``L/2`` layers, and scored on the same held-out windows (their stage files are
reused when ``--depth-pays`` holds them). Arms (one config each, ``ARMS``):

* ``looped``: identity routing throughout (layer ``s mod L/2`` at step ``s``): static reuse, every token
  ``L`` visits: does reusing the pool pay at all against the ``L/2``-layer model? Under the global KV
  cache (docs/design.md §4.1) a second visit to a layer attends to the other tokens' K/V of their first
  visit (rule 1: first visit writes, a reuse never overwrites);
* ``looped_fresh_kv``: the same loop as a sequential ``L``-layer model whose layer ``s`` is the pool's
  layer ``s mod L/2`` (weights tied, trained through the tie): every visit attends to K/V of the same
  pass. The difference between the two loops is what the cache rule costs reuse;
* ``joint_default``: ``JointConfig`` as shipped (gate ``prob``, capacity falling to 0.75, a fixed
  compute weight);
* ``joint_explore``: straight-through gate (no jump when routing starts), capacity ``S`` (nothing
  dropped while training), the router sees the last layer visited, no exit at step 0, Gumbel
  exploration annealed to the argmax, and the compute as a constraint: a Lagrange multiplier towards
  ``--visit-target`` hard visits per token;
* ``joint_mixture``: ``joint_explore`` whose first three quarters of the learned updates mix the layers of
  each step (every token through every layer, updates weighted by the router's probabilities and
  survival; twice the layer compute of an update there), so that the gradient compares the layers,
  skipping and exiting before the hard routes take over;
* ``joint_grow``: no looped warm-up: the router starts near the sequential ``L/2``-layer model's routes
  (each layer once, then skip; ``start_routes="once"``, a softer push of 3) and mixes from the first
  update for three quarters of training, then hard routes with exploration and the visit target: reuse
  has to earn each visit beyond the ``L/2`` model's.

Per arm and seed: held-out perplexity, executed layer visits per token (their FLOPs, over the
``L``-layer model's: the layers have one shape), reuse and early-exit shares. Paired bootstrap
intervals against the ``L/2``- and ``L``-layer models, per seed and pooled over seeds (each window's NLL
averaged over the seeds' models), as ``depth_pays`` does. Resumable: one stage file per trained model.

    python experiments/joint_recipes.py --results results/joint_recipes.json   # ~1 h on 2 CPU cores
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from benchlib import figure, stage, write_result  # noqa: E402
from depth_pays import add_regime_args, train_and_score  # noqa: E402


def arms(visit_target: float, route_start: int, steps: int) -> dict:
    """``name -> (JointConfig fields, RadialConfig fields)`` of each recipe (pool ``L/2``, ``L`` steps)."""
    learned = steps - route_start
    return {
        "looped": ({"mode": "radial", "route_start": steps}, {}),
        "joint_default": ({"mode": "radial", "route_start": route_start}, {}),
        "joint_explore": ({"mode": "radial", "route_start": route_start, "gate": "straight_through",
                           "capacity_start": None, "capacity_end": None, "visit_target": visit_target,
                           "explore_start": 1.0, "explore_end": 0.0, "capacity_steps": max(learned, 1)},
                          {"router_last_layer": True, "min_exit_step": 1}),
        "joint_mixture": ({"mode": "radial", "route_start": route_start, "gate": "straight_through",
                           "capacity_start": None, "capacity_end": None, "visit_target": visit_target,
                           "mixture_steps": 3 * learned // 4, "explore_start": 0.5, "explore_end": 0.0,
                           "capacity_steps": max(learned, 1)},
                          {"router_last_layer": True, "min_exit_step": 1}),
        "joint_grow": ({"mode": "radial", "route_start": 0, "start_routes": "once", "router_align": 3.0,
                        "router_bias_init": 0.0,
                        "gate": "straight_through", "capacity_start": None, "capacity_end": None,
                        "visit_target": visit_target, "mixture_steps": 3 * steps // 4, "explore_start": 0.5,
                        "explore_end": 0.0, "capacity_steps": steps},
                       {"router_last_layer": True, "min_exit_step": 1}),
    }


TIED_LOOP = "looped_fresh_kv"  # not a JointConfig recipe: a sequential model with tied layers


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/joint_recipes", help="stage files (one per trained model)")
    p.add_argument("--depth-pays", default="runs/depth_pays", help="depth_pays' stage files (the sequential models)")
    p.add_argument("--arms", default=f"looped,{TIED_LOOP},joint_default,joint_explore,joint_mixture,joint_grow")
    p.add_argument("--steps", type=int, default=2000, help="training updates (depth_pays: 4 / 2 layers 0.976 here)")
    p.add_argument("--route-start", type=int, default=1000, help="identity warm-up updates before learned routing")
    p.add_argument("--visit-target", type=float, default=3.0, help="joint_explore: hard layer visits per token")
    add_regime_args(p)  # depth_pays' own: its stage files are reused
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.arms = args.arms.split(",")
    known = {**arms(args.visit_target, args.route_start, args.steps), TIED_LOOP: None}
    if unknown := [a for a in args.arms if a not in known]:
        p.error(f"unknown arms {unknown}; allowed: {sorted(known)}")
    if not 0 <= args.route_start <= args.steps or args.steps < 1 or not args.seeds:
        p.error("need --steps >= 1, 0 <= --route-start <= --steps and at least one seed")
    return args


def train_radial(args, data, arm: str, seed: int, held) -> dict:
    """One recipe's network trained from scratch with ``seed``; its per-window held-out NLL and routes."""
    import radial_jax as rj
    from radial_jax import defaults as D
    from radial_jax.radial.stats import RouteStats
    from radial_jax.training.joint import JointConfig, train_joint
    from radial_jax.training.loop import TrainConfig
    from radial_jax.training.optim import OptimConfig
    from radial_jax.training.paired import window_nll
    L = D.SIZES[args.size]["num_hidden_layers"]
    pool, steps = max(1, L // 2), L
    config = rj.OPTConfig(vocab_size=data.vocab_size, max_position_embeddings=max(D.MIN_POSITIONS, args.window),
                          **{**D.SIZES[args.size], "num_hidden_layers": pool})
    joint, radial = arms(args.visit_target, args.route_start, args.steps)[arm]
    full = float(steps)  # capacity factor S: phi = 1, nothing dropped
    joint = {k: (full if v is None else v) for k, v in joint.items()}
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.window, seed=seed,
                        optim=OptimConfig(learning_rate=args.lr), checkpoint_every=args.steps)
    t0 = time.perf_counter()
    net, history = train_joint(config, data, cfg=JointConfig(**joint), train=train,
                               radial_kwargs={"max_steps": steps, **radial})
    train_seconds = time.perf_counter() - t0
    routes = RouteStats(pool, steps)
    visits = []

    def count(out):
        routes.add(out.router, np.ones(out.metrics.depth.shape, bool))
        visits.append(np.asarray(out.metrics.depth, np.float64).mean(-1))

    nll, scored = window_nll(net, held, args.batch_size, on_output=count, progress=True, desc=f"score {arm}")
    return {"arm": arm, "seed": seed, "pool": pool, "steps": steps, "params": net.num_params,
            "radial": dataclasses.asdict(net.radial), "joint": joint, "train_seconds": train_seconds,
            "nll": nll.tolist(), "scored": scored.tolist(), "visits": np.concatenate(visits).tolist(),
            "routes": routes.summary(), "history_tail": [{k: float(v) for k, v in h.items()} for h in history[-5:]]}


def train_tied_loop(args, data, seed: int, held) -> dict:
    """The static loop with fresh K/V: an ``L``-layer sequential model whose layer ``s`` is layer ``s mod L/2``
    of a pool (the gradient of every use reaches the one tied copy), trained on the same tokens."""
    import jax
    import jax.numpy as jnp
    import radial_jax as rj
    from radial_jax import defaults as D
    from radial_jax.models.bundle import Model
    from radial_jax.models.perplexity import lm_cross_entropy
    from radial_jax.training.loop import TrainConfig, fit
    from radial_jax.training.optim import OptimConfig, make_optimizer
    from radial_jax.training.paired import window_nll
    from radial_jax.training.state import TrainState
    from radial_jax.training.steps import make_train_step, to_host
    L = D.SIZES[args.size]["num_hidden_layers"]
    shape = dict(vocab_size=data.vocab_size, max_position_embeddings=max(D.MIN_POSITIONS, args.window))
    pool = rj.build(rj.OPTConfig(**shape, **{**D.SIZES[args.size], "num_hidden_layers": L // 2}), seed=seed)
    full = rj.OPTConfig(**shape, **D.SIZES[args.size])
    module, order = rj.build(full, seed=seed).module, jnp.arange(L) % (L // 2)

    def looped(params):  # the pool's stacked layers, in loop order
        return {**params, "layers": jax.tree_util.tree_map(lambda a: a[order], params["layers"])}

    def loss(params, ids_bt, key):
        del key
        nll, n = lm_cross_entropy(module.apply({"params": looped(params)}, ids_bt).logits, ids_bt)
        return nll, {"tokens": n}

    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.window, seed=seed,
                        optim=OptimConfig(learning_rate=args.lr), checkpoint_every=args.steps).with_schedule()
    tx = make_optimizer(train.optim)
    t0 = time.perf_counter()
    state, _ = fit(TrainState.create(pool.params, tx, seed=seed), make_train_step(loss, tx),
                   data.dataset(train.seq_len, train.batch_size, seed=seed), train, desc="tied loop")
    train_seconds = time.perf_counter() - t0
    model = Model(full, looped(to_host(state.params)), name="tied-loop")
    nll, scored = window_nll(model, held, args.batch_size, progress=True, desc=f"score {TIED_LOOP}")
    tokens = int(len(held) * held.shape[1])
    return {"arm": TIED_LOOP, "seed": seed, "pool": L // 2, "steps": L, "params": pool.num_params,
            "train_seconds": train_seconds, "nll": nll.tolist(), "scored": scored.tolist(),
            "visits": [float(L)] * len(held), "routes": {"tokens": tokens, "reuse_token_share": 1.0,
                                                         "exit_share": 0.0, "exits_by_step": [0] * L}}


def train_arm(args, data, arm: str, seed: int, held) -> dict:
    if arm == TIED_LOOP:
        return train_tied_loop(args, data, seed, held)
    return train_radial(args, data, arm, seed, held)


def main(argv=None) -> int:
    from radial_jax import defaults as D
    from radial_jax.data.packed import text_data
    from radial_jax.models.perplexity import perplexity
    from radial_jax.training.paired import paired_bootstrap
    args = parse_args(argv)
    data = text_data(args.data)
    held = data.windows(args.window, args.eval_windows)[0]
    L = D.SIZES[args.size]["num_hidden_layers"]
    seq_args = argparse.Namespace(**{**vars(args), "steps": [args.steps]})
    runs = {}
    for seed in args.seeds:
        for d in (L, max(1, L // 2)):
            runs[f"L{d}", seed] = stage(Path(args.depth_pays), f"L{d}_steps{args.steps}_seed{seed}",
                                        lambda d=d, seed=seed: train_and_score(seq_args, data, d, args.steps, seed,
                                                                               held))
        for arm in args.arms:
            runs[arm, seed] = stage(Path(args.out), f"{arm}_steps{args.steps}_seed{seed}",
                                    lambda arm=arm, seed=seed: train_arm(args, data, arm, seed, held))

    def nll(name, seeds):
        return tuple(np.mean([np.asarray(runs[name, s][k]) for s in seeds], 0) for k in ("nll", "scored"))

    rows = []
    for arm in args.arms:
        per_seed = [{"seed": s, "perplexity": perplexity(*(a.sum() for a in nll(arm, [s]))),
                     "visits": float(np.mean(runs[arm, s]["visits"])),
                     "reuse": runs[arm, s]["routes"]["reuse_token_share"],
                     "early_exit": runs[arm, s]["routes"]["exit_share"],
                     "exit_step0": runs[arm, s]["routes"]["exits_by_step"][0] / runs[arm, s]["routes"]["tokens"],
                     "vs_half": paired_bootstrap(nll(f"L{L // 2}", [s]), nll(arm, [s]), reps=args.bootstrap),
                     "vs_full": paired_bootstrap(nll(f"L{L}", [s]), nll(arm, [s]), reps=args.bootstrap),
                     "train_seconds": runs[arm, s]["train_seconds"]} for s in args.seeds]
        rows.append({"arm": arm, "seeds": per_seed, "visits": float(np.mean([r["visits"] for r in per_seed])),
                     "reuse": float(np.mean([r["reuse"] for r in per_seed])),
                     "early_exit": float(np.mean([r["early_exit"] for r in per_seed])),
                     "vs_half": paired_bootstrap(nll(f"L{L // 2}", args.seeds), nll(arm, args.seeds),
                                                 reps=args.bootstrap),
                     "vs_full": paired_bootstrap(nll(f"L{L}", args.seeds), nll(arm, args.seeds),
                                                 reps=args.bootstrap)})
        r = rows[-1]
        print(f"{arm}: {r['visits']:.2f} visits of {L}; / {L // 2} layers {r['vs_half']['ratio']:.3f} "
              f"[{r['vs_half']['low']:.3f}, {r['vs_half']['high']:.3f}], / {L} layers {r['vs_full']['ratio']:.3f} "
              f"[{r['vs_full']['low']:.3f}, {r['vs_full']['high']:.3f}]; reuse {100 * r['reuse']:.1f} %, "
              f"early exits {100 * r['early_exit']:.1f} %; per seed / half "
              + ", ".join(f"{s['vs_half']['ratio']:.3f}" for s in r["seeds"]))
    depth = paired_bootstrap(nll(f"L{L // 2}", args.seeds), nll(f"L{L}", args.seeds), reps=args.bootstrap)
    print(f"reference: {L} / {L // 2} layers {depth['ratio']:.3f} [{depth['low']:.3f}, {depth['high']:.3f}]")
    if args.results:
        write_figures(rows, depth, args, L)
    return 0


def write_figures(rows, depth, args, L: int) -> None:
    half = L // 2
    at = f"{args.steps} updates"
    figs = [figure(f"joint_depth_reference_{args.steps}",
                   f"{L} / {half} layers perplexity, sequential, same tokens, {at}",
                   depth["ratio"], target="< 1", met=depth["high"] < 1,
                   note=f"paired 95 % [{depth['low']:.3f}, {depth['high']:.3f}], {len(args.seeds)} seeds pooled: "
                        "the regime where depth pays that the recipes need")]
    for r in rows:
        h, f = r["vs_half"], r["vs_full"]
        figs.append(figure(
            f"joint_{r['arm']}_vs_half_{args.steps}",
            f"{r['arm']} (pool {half}, {L} steps) / {half}-layer model perplexity, {at}",
            h["ratio"], target="< 1", met=h["high"] < 1,
            note=f"paired 95 % [{h['low']:.3f}, {h['high']:.3f}]; {r['visits']:.2f} layer visits per token "
                 f"({r['visits'] / L:.2f} of the {L}-layer model's); / {L} layers {f['ratio']:.3f} "
                 f"[{f['low']:.3f}, {f['high']:.3f}]; reuse {100 * r['reuse']:.1f} %, early exits "
                 f"{100 * r['early_exit']:.1f} %; per seed " + ", ".join(f"{s['vs_half']['ratio']:.3f}"
                                                                          for s in r["seeds"])))
    settings = {k: v for k, v in vars(args).items() if k != "results"}
    write_result(args.results, "joint_recipes", settings, figs, {"rows": rows, "depth": depth})


if __name__ == "__main__":
    sys.exit(main())

"""``radial-jax plan``: a memory and compute plan of a pod run, from compile-time figures, before paying for it.

``make_plan(config, mesh_sizes, task=..., batch=..., seq_len=...)`` builds the
*real* train or distillation step (``make_train_step``; for distillation the
step of ``radial_jax.training.pod_steps``) for the model's shapes, on a mesh of
simulated CPU devices, with abstract inputs (``jax.ShapeDtypeStruct`` carrying
their shardings: nothing is allocated), compiles it, and reports per device:

* ``params`` / ``optimizer`` / ``teacher`` / ``batch``: the bytes of this device's
  shards of the state and inputs (from the shardings; exact);
* XLA's ``memory_analysis()``: ``argument`` (all inputs), ``output``, ``alias``
  (outputs written into donated inputs), ``temp`` (everything else the step
  holds at once: activations kept for the backward pass, gradients, scratch) and
  ``peak = argument + output - alias + temp``;
* FLOPs per step: the model's matmul FLOPs by construction (``radial_jax.models.flops``:
  forward x 3 for forward and backward, plus a recomputed forward under
  ``remat="full"``, plus the teacher's and the oracle's forwards when distilling),
  and XLA's ``cost_analysis()`` sum over devices (which counts a rolled loop body
  once, so it is far below the real figure for a scanned stack);
* whether the peak fits each accelerator of ``radial_jax.scale.pod.ACCELERATORS``
  (at most ``USABLE_FRACTION`` of a device's memory).

The compiler is XLA's CPU backend, not the TPU's or GPU's: parameters, optimiser
state and inputs are exact for any backend; ``temp`` depends on the backend's
fusion and buffer assignment and is an estimate for an accelerator (TPU layouts
pad small trailing dimensions to tiles).

The simulated devices are set up by ``simulated_devices(n)`` before jax starts
its backend; the CLI does that itself.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np

TASKS = ("train", "distill")
# The settings the README recommends for distilling a 7-8B teacher on a TPU v4-32 slice (mesh 1,16,1); the
# CLI's defaults and experiments/plan_pod.py read them from here.
RECOMMENDED = dict(batch=64, grad_accum=4, seq_len=256, remat="full", compute_dtype="bfloat16", train="all")


def simulated_devices(n: int) -> None:
    """Ask for ``n`` CPU devices (before jax initialises its backend); a RuntimeError if it is too late."""
    import jax
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        if jax.default_backend() == "cpu" and jax.device_count() >= n:
            return
        raise RuntimeError(f"the plan needs {n} simulated CPU devices but jax already started with "
                           f"{jax.device_count()} {jax.default_backend()} device(s); run the plan in a fresh process "
                           f"(`radial-jax plan ...`) or set XLA_FLAGS=--xla_force_host_platform_device_count={n} "
                           "JAX_PLATFORMS=cpu")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", max(n, 1))


def load_plan_config(model: str, **config_kwargs):
    """A family config from a name in ``radial_jax.training.plan_configs`` (published configs, offline), a local
    directory with ``config.json``, a ``config.json`` file, or a hub id (its ``config.json`` only)."""
    from radial_jax.checkpoints.hub import read_json
    from radial_jax.models.family import config_from_hf
    from radial_jax.training.plan_configs import PUBLISHED_CONFIGS
    path = Path(os.path.expanduser(str(model)))
    if str(model) in PUBLISHED_CONFIGS:
        hf = PUBLISHED_CONFIGS[str(model)]
    elif path.is_dir():
        hf = read_json(path / "config.json", "model configuration")
    elif path.is_file():
        hf = read_json(path, "model configuration")
    else:
        from huggingface_hub import hf_hub_download
        try:
            hf = read_json(Path(hf_hub_download(str(model), "config.json")), "model configuration")
        except Exception as e:
            raise ValueError(f"{model!r} is not a known config ({sorted(PUBLISHED_CONFIGS)}), a directory or a "
                             f"config.json, and the hub did not give its config.json ({type(e).__name__}: {e})") from e
    return config_from_hf(hf, **config_kwargs)


def _shard_bytes(tree) -> int:
    """Bytes of one device's shard of every leaf (``ShapeDtypeStruct``s with shardings)."""
    import jax
    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree)))


def model_flops(config, task: str, batch: int, seq_len: int, memory, distill_cfg=None, radial=None) -> float:
    """Matmul FLOPs of one step by construction (see the module docstring)."""
    from radial_jax.models.flops import dense_flops
    forward = dense_flops(config, batch * seq_len, seq_len)
    backward_factor = 3 + (1 if memory.remat == "full" else 0)  # forward + backward (2x) (+ recomputed forward)
    if task == "train":
        return backward_factor * forward
    extra = forward  # the teacher's forward
    if radial.mode == "ordered" and distill_cfg.router_weight:
        extra += forward  # the oracle routing's forward (its labels)
    return backward_factor * forward + extra


@dataclasses.dataclass
class Plan:
    model: str
    task: str
    mesh: dict
    devices: int
    settings: dict
    bytes_per_device: dict
    flops: dict
    fits: dict
    compile_s: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        from radial_jax.scale.pod import USABLE_FRACTION
        b = self.bytes_per_device
        gib = lambda n: f"{n / 2 ** 30:10.3f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:10.3f} MiB"  # noqa: E731
        lines = [f"plan: {self.task} {self.model} on mesh {self.mesh} ({self.devices} devices), "
                 f"{', '.join(f'{k}={v}' for k, v in self.settings.items())}",
                 "bytes per device (compiled on simulated CPU devices; abstract inputs, nothing allocated):"]
        for key, label in (("params", "parameters (fp32 masters)"), ("optimizer", "optimiser state"),
                           ("teacher", "frozen teacher"), ("batch", "batch"),
                           ("argument", "XLA arguments (all inputs)"), ("output", "XLA outputs"),
                           ("alias", "XLA aliased (donated)"),
                           ("temp", "XLA temporaries (activations, grads, scratch)"), ("peak", "peak")):
            lines.append(f"  {label:<46}{gib(b[key])}")
        f = self.flops
        lines.append(f"FLOPs per step: {f['model']:.4g} (model matmuls, by construction); XLA cost_analysis "
                     f"{f['xla']:.4g} (rolled loop bodies counted once)")
        lines.append(f"fits (peak <= {USABLE_FRACTION:.0%} of a device's memory):")
        for name, r in self.fits.items():
            lines.append(f"  {name:<12}{r['memory_gib']:7.1f} GiB  {'yes' if r['fits'] else 'NO '}  "
                         f"({100 * r['used_fraction']:.0f}% used)")
        return "\n".join(lines)


def make_plan(config, mesh_sizes, *, task: str = "distill", batch: int = 16, seq_len: int = 512, memory=None,
              distill_cfg=None, radial_kwargs: Optional[dict] = None, pool: str = "fsdp", name: str = "model",
              optim=None) -> Plan:
    """Compile the step of ``task`` for ``config`` on a mesh of ``mesh_sizes`` simulated devices (see the
    module docstring). ``simulated_devices(prod(mesh_sizes))`` must have run before jax started."""
    import time
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    from radial_jax.models.bundle import example_inputs
    from radial_jax.models.family import family_of, module_for
    from radial_jax.scale.pod import ACCELERATORS, USABLE_FRACTION, build_mesh, rules_for
    from radial_jax.scale.sharding import batch_sharding, logical_specs
    from radial_jax.training.memory import MemoryConfig
    from radial_jax.training.optim import OptimConfig, make_optimizer
    from radial_jax.training.steps import abstract_state, jit_train_step, make_train_step
    from radial_jax.scale.sharding import param_shardings

    if task not in TASKS:
        raise ValueError(f"task {task!r} is unknown; allowed: {TASKS}")
    if not family_of(config).is_decoder:
        raise ValueError(f"the plan covers language models; {type(config).__name__} is not one")
    if seq_len > config.max_length:
        raise ValueError(f"seq_len {seq_len} exceeds the model's {config.max_length} positions")
    memory = memory or MemoryConfig()
    n = int(np.prod(mesh_sizes))
    if len(jax.devices()) < n:
        raise ValueError(f"the plan's mesh {tuple(mesh_sizes)} needs {n} simulated devices; jax has "
                         f"{len(jax.devices())} (call simulated_devices({n}) before jax starts)")
    mesh = build_mesh(tuple(mesh_sizes), devices=jax.devices()[:n])
    rules = rules_for(pool)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % (shards * memory.grad_accum):
        raise ValueError(f"the global batch {batch} must split over data x fsdp = {shards} devices and "
                         f"grad_accum = {memory.grad_accum} micro-batches (a multiple of {shards * memory.grad_accum})")
    module = module_for(config)
    specs = logical_specs(module, *example_inputs(config), rules=rules)
    params = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *example_inputs(config))))["params"]
    optim = optim or OptimConfig()
    settings = {"batch": batch, "seq_len": seq_len, "pool": pool, **memory.to_dict()}
    frozen, frozen_sh, radial = {}, None, None
    if task == "train":
        from radial_jax.training.lm import lm_loss_fn
        loss_fn = lm_loss_fn(module_for(config, memory.dtype))
        p_sh = param_shardings(params, specs, mesh)
        tx = make_optimizer(optim)
    else:
        from radial_jax.radial import RadialConfig, RadialModel
        from radial_jax.radial.network import init_router
        from radial_jax.training.distill_loss import DistillConfig, without_router
        from radial_jax.training.pod_steps import distill_parts
        distill_cfg = distill_cfg or DistillConfig()
        from radial_jax.defaults import DISTILL_CACHE_POLICY
        radial = RadialConfig(**{"mode": "ordered", "cache_policy": DISTILL_CACHE_POLICY,
                                 "router_hidden": distill_cfg.router_hidden, **(radial_kwargs or {})})
        L = config.num_layers
        router = jax.eval_shape(init_router(L, radial.steps(L), radial, config.hidden_size), jax.random.key(0))
        params = {**params, "router": router}
        student = RadialModel(config, radial, params)
        teacher = _AbstractTeacher(config, module)
        loss_fn, p_sh, frozen_dtype = distill_parts(student, teacher, distill_cfg, memory, mesh, rules)
        trainable = None if distill_cfg.train == "all" else (lambda path: path.startswith("router"))
        tx = make_optimizer(optim, trainable=trainable, params=params)
        settings.update(train=distill_cfg.train, mode=radial.mode, capacity_factor=radial.capacity_factor)
        if frozen_dtype is not None:
            frozen_sh = without_router(p_sh)
            frozen = jax.tree_util.tree_map(lambda p, s: jax.ShapeDtypeStruct(p.shape, frozen_dtype, sharding=s),
                                            without_router(params), frozen_sh)
    state, state_sh = abstract_state(params, tx, mesh, p_sh)
    b_sh = batch_sharding(mesh, 2)
    ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=b_sh)
    step = make_train_step(loss_fn, tx, memory=memory, jit=False, mesh=mesh)
    t0 = time.perf_counter()
    compiled = jit_train_step(step, state_sh, b_sh, frozen_sh, donate=memory.donate).lower(state, ids, frozen).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    b = {"params": _shard_bytes(state.params), "optimizer": _shard_bytes(state.opt_state),
         "teacher": _shard_bytes(frozen), "batch": _shard_bytes(ids),
         "argument": int(mem.argument_size_in_bytes), "output": int(mem.output_size_in_bytes),
         "alias": int(mem.alias_size_in_bytes), "temp": int(mem.temp_size_in_bytes),
         "generated_code": int(mem.generated_code_size_in_bytes)}
    b["peak"] = b["argument"] + b["output"] - b["alias"] + b["temp"]
    fits = {}
    for acc, (size, _) in ACCELERATORS.items():
        fits[acc] = {"memory_gib": size / 2 ** 30, "fits": b["peak"] <= USABLE_FRACTION * size,
                     "used_fraction": b["peak"] / size}
    flops = {"model": model_flops(config, task, batch, seq_len, memory, distill_cfg, radial),
             "xla": float(cost.get("flops", float("nan"))) * mesh.size}
    return Plan(model=name, task=task, mesh=dict(mesh.shape), devices=mesh.size, settings=settings,
                bytes_per_device=b, flops=flops, fits=fits, compile_s=compile_s)


class _AbstractTeacher:
    """What ``distill_parts`` reads of a teacher: its config and module (no parameters)."""

    def __init__(self, config, module):
        self.config, self.module = config, module


# -- the command ----------------------------------------------------------------------------------------
def register(sub) -> None:
    from radial_jax.scale.pod import ACCELERATORS, POOL_LAYOUTS, mesh_arg_type
    from radial_jax.models.remat import POLICIES
    p = sub.add_parser("plan", help="compile a train/distill step for a model on simulated devices: bytes per "
                                    "device, FLOPs, whether it fits an accelerator")
    p.add_argument("--model", required=True,
                   help="hub id (its config.json; facebook/opt-6.7b and meta-llama/Llama-3.1-8B are built in, "
                        "offline), a checkpoint directory or a config.json")
    p.add_argument("--mesh", type=mesh_arg_type, required=True, metavar="DATA,FSDP,TENSOR",
                   help="mesh axis sizes; their product is the number of simulated devices")
    p.add_argument("--task", choices=TASKS, default="distill")
    r = RECOMMENDED  # defaults: the README's recommended settings
    p.add_argument("--batch", type=int, default=r["batch"], help="global batch (sequences per step)")
    p.add_argument("--seq-len", type=int, default=r["seq_len"])
    p.add_argument("--remat", choices=sorted(POLICIES), default=r["remat"])
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default=r["compute_dtype"])
    p.add_argument("--grad-accum", type=int, default=r["grad_accum"])
    p.add_argument("--no-donate", action="store_true", help="compile without donating the state")
    p.add_argument("--pool", choices=POOL_LAYOUTS, default="fsdp")
    p.add_argument("--train", choices=("router", "all"), default=r["train"], help="distillation: what is trained")
    p.add_argument("--mode", choices=("ordered", "radial"), default="ordered")
    p.add_argument("--capacity-factor", type=float, default=1.0)
    p.add_argument("--accelerator", choices=sorted(ACCELERATORS), default=None,
                   help="exit with status 3 unless the plan fits this accelerator")
    p.add_argument("--json", default=None, help="also write the plan to this JSON file")
    p.set_defaults(func=cmd_plan)


def memory_from_args(args):
    from radial_jax.training.memory import MemoryConfig
    return MemoryConfig(remat=args.remat, compute_dtype=args.compute_dtype, grad_accum=args.grad_accum,
                        donate=not getattr(args, "no_donate", False) and not getattr(args, "debug", False))


def cmd_plan(args) -> int:
    from radial_jax.training.distill_loss import DistillConfig
    if -1 in args.mesh:
        raise ValueError(f"--mesh {','.join(map(str, args.mesh))}: a plan needs every size (no -1), since the "
                         "sizes set the number of simulated devices")
    simulated_devices(int(np.prod(args.mesh)))
    config = load_plan_config(args.model)
    plan = make_plan(config, args.mesh, task=args.task, batch=args.batch, seq_len=args.seq_len,
                     memory=memory_from_args(args), distill_cfg=DistillConfig(train=args.train),
                     radial_kwargs={"mode": args.mode, "capacity_factor": args.capacity_factor}, pool=args.pool,
                     name=str(args.model))
    print(plan.table())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(plan.to_dict(), indent=1))
    if args.accelerator and not plan.fits[args.accelerator]["fits"]:
        print(f"does NOT fit {args.accelerator}")
        return 3
    return 0

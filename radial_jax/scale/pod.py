"""Running on a pod: ``--mesh data,fsdp,tensor`` and ``--distributed`` for every long-running command.

Every command that does heavy work (``train``, ``distill``, ``eval``, ``profile``,
``simulate``, ``plan`` and the scaling experiments) adds these flags with
``add_mesh_args`` and turns them into a mesh with ``mesh_from_args``:

* ``--mesh data,fsdp,tensor``: the sizes of the three mesh axes of
  ``radial_jax.scale.sharding`` (``-1`` once: the devices left over; ``--mesh=-1,8,1``, with ``=``,
  when the value starts with ``-1``, or argparse takes it for an option). The value is
  checked when the command line is parsed (three integers, each ``>= 1`` or one
  ``-1``) and against the device count before any weight is read or step compiled.
* ``--distributed``: ``jax.distributed.initialize()`` first (multi-host). On Cloud
  TPU, SLURM and Open MPI JAX finds the coordinator itself; elsewhere set
  ``RADIAL_JAX_COORDINATOR=host:port``, ``RADIAL_JAX_NUM_PROCESSES`` and
  ``RADIAL_JAX_PROCESS_ID``. On CPU the collectives are gloo's.
* ``--pool fsdp|expert``: how the layer pool is split: ``fsdp`` (default, the one
  ``AXIS_RULES`` table: each layer's matrices split along ``embed`` over ``fsdp``
  and along ``mlp``/``heads`` over ``tensor``) or ``expert`` (whole layers over
  ``fsdp``, like the experts of an MoE: ``override_rules(layers="fsdp")``).

Placement is always decided by the one rules table (``radial_jax.scale.sharding``);
this module only parses and builds.

``ACCELERATORS`` is the one table of device memory sizes ``radial-jax plan``
compares its figures with.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Tuple

from radial_jax.scale.sharding import AXIS_RULES, MESH_AXES

GiB = 1024 ** 3
MiB = 1024 ** 2

# Memory of ONE JAX device, in bytes. TPUs: HBM per chip (a chip is one JAX device; v4 and v5p slices are
# named by TensorCores, 2 per chip, so a "v4-32" slice has 16 chips; v5e slices are named by chips), from the
# Cloud TPU system-architecture pages. GPUs: the total memory nvidia-smi reports.
ACCELERATORS = {
    "tpu-v4": (32 * GiB, "TPU v4 chip (a v4-32 slice = 16 chips)"),
    "tpu-v5e": (16 * GiB, "TPU v5e chip (a v5litepod-16 = 16 chips)"),
    "tpu-v5p": (95 * GiB, "TPU v5p chip (a v5p-32 slice = 16 chips)"),
    "a100-40gb": (40960 * MiB, "NVIDIA A100 40GB"),
    "a100-80gb": (81920 * MiB, "NVIDIA A100 80GB"),
    "h100-80gb": (81559 * MiB, "NVIDIA H100 80GB (SXM)"),
}
# A plan "fits" when its peak bytes per device are at most this share of the device's memory: the runtime, the
# compiled code and fragmentation take the rest.
USABLE_FRACTION = 0.9

POOL_LAYOUTS = ("fsdp", "expert")


def parse_mesh(text) -> Tuple[int, int, int]:
    """``"4,8,1"`` -> ``(4, 8, 1)``; a ValueError saying what is wrong and what is allowed otherwise."""
    allowed = (f"--mesh takes three comma-separated integers {','.join(MESH_AXES)} (the sizes of the mesh axes "
               "data, fsdp, tensor), each >= 1, or -1 for at most one axis (the devices left over); e.g. 4,8,1")
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 3:
        raise ValueError(f"--mesh {text!r} has {len(parts)} value(s). {allowed}")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--mesh {text!r} is not made of integers. {allowed}") from None
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ValueError(f"--mesh {text!r} has a size that is not allowed. {allowed}")
    return sizes


def mesh_arg_type(text):
    """argparse type of ``--mesh``: ``parse_mesh`` with its error as argparse's."""
    try:
        return parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_mesh_args(parser: argparse.ArgumentParser, pool: bool = True) -> None:
    """``--mesh``, ``--distributed`` (and ``--pool``) on a subcommand's parser."""
    parser.add_argument("--mesh", type=mesh_arg_type, default=None, metavar="DATA,FSDP,TENSOR",
                        help="run on a (data, fsdp, tensor) device mesh, e.g. 4,8,1 (-1: the devices left over; "
                             "write --mesh=-1,8,1 when the value starts with -1); default: no sharding")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (multi-host pods, SLURM)")
    if pool:
        parser.add_argument("--pool", choices=POOL_LAYOUTS, default="fsdp",
                            help="layer pool sharding: fsdp (matrices split by the axis rules) or expert "
                                 "(whole layers over the fsdp axis)")


def rules_for(pool: str = "fsdp") -> tuple:
    """The axis-rules table for a pool layout (``POOL_LAYOUTS``)."""
    from radial_jax.scale.sharding import override_rules
    if pool not in POOL_LAYOUTS:
        raise ValueError(f"pool layout {pool!r} is unknown; allowed: {POOL_LAYOUTS}")
    return AXIS_RULES if pool == "fsdp" else override_rules(layers="fsdp")


def initialize_distributed() -> None:
    """``jax.distributed.initialize()``, explicit when ``RADIAL_JAX_COORDINATOR`` / ``..._NUM_PROCESSES`` /
    ``..._PROCESS_ID`` are set (otherwise JAX detects Cloud TPU, SLURM or Open MPI); gloo collectives on CPU."""
    import jax
    env = {k: os.environ.get(f"RADIAL_JAX_{k.upper()}") for k in ("coordinator", "num_processes", "process_id")}
    kwargs = {}
    if any(env.values()):
        missing = [f"RADIAL_JAX_{k.upper()}" for k, v in env.items() if not v]
        if missing:
            raise ValueError(f"--distributed with RADIAL_JAX_COORDINATOR etc. needs all three; missing {missing}")
        kwargs = dict(coordinator_address=env["coordinator"], num_processes=int(env["num_processes"]),
                      process_id=int(env["process_id"]))
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


def build_mesh(sizes: Tuple[int, int, int], devices=None):
    """The mesh of ``sizes`` over all devices (every process's), or a ValueError naming the device count."""
    import jax
    from radial_jax.scale.sharding import make_mesh
    devices = jax.devices() if devices is None else devices
    try:
        return make_mesh(*sizes, devices=devices)
    except ValueError as e:
        raise ValueError(f"--mesh {','.join(map(str, sizes))} does not fit the {len(devices)} device(s) "
                         f"({jax.process_count()} process(es)): {e}. The product of the sizes must equal the "
                         "device count (use -1 for one axis to take what is left)") from None


def mesh_from_args(args) -> Optional[object]:
    """``--distributed`` first, then the mesh of ``--mesh`` (None without it). Call before any other jax work."""
    if getattr(args, "distributed", False):
        initialize_distributed()
    sizes = getattr(args, "mesh", None)
    if sizes is None:
        return None
    return build_mesh(tuple(sizes))


def is_main_process() -> bool:
    import jax
    return jax.process_index() == 0

"""Memory plans of distilling the large teachers on a TPU v4-32 slice, from compile-time figures.

    python experiments/plan_pod.py                  # writes results/plan_pod.json (a few minutes on 2 CPU cores)

Each plan is ``radial_jax.training.plan.make_plan`` (what ``radial-jax plan`` prints): the real distillation step
(teacher frozen and sharded in bf16, the student's pool fsdp-sharded with fp32 master weights and AdamW
moments, the router replicated, remat per layer, bf16 compute, gradient accumulation, donated state)
compiled for the model's shapes on 16 simulated CPU devices with abstract inputs. A v4-32 slice has 16
chips of 32 GiB (one JAX device each). The published config.json values come from
``radial_jax/training/plan_configs.py`` (no network). The same figures for one model::

    radial-jax plan --model facebook/opt-6.7b --mesh 1,16,1 --batch 64 --grad-accum 4 --seq-len 256 \\
        --remat full --compute-dtype bfloat16 --accelerator tpu-v4
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MESH = (1, 16, 1)  # TPU v4-32: 16 chips
MODELS = ("facebook/opt-6.7b", "meta-llama/Llama-3.1-8B")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "plan_pod.json"))
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    args = ap.parse_args(argv)
    from radial_jax.training.plan import simulated_devices
    simulated_devices(int(__import__("math").prod(MESH)))
    from benchlib import figure, write_result
    from radial_jax.training.plan import RECOMMENDED, load_plan_config, make_plan
    from radial_jax.scale.pod import ACCELERATORS, USABLE_FRACTION
    from radial_jax.training.distill_loss import DistillConfig
    from radial_jax.training.memory import MemoryConfig
    s = RECOMMENDED  # the README's settings (one source: radial_jax.training.plan)
    memory = MemoryConfig(remat=s["remat"], compute_dtype=s["compute_dtype"], grad_accum=s["grad_accum"], donate=True)
    figures, details = [], {}
    v4 = ACCELERATORS["tpu-v4"][0]
    for name in args.models:
        plan = make_plan(load_plan_config(name), MESH, task="distill", batch=s["batch"], seq_len=s["seq_len"],
                         memory=memory, distill_cfg=DistillConfig(train=s["train"]), name=name)
        print(plan.table(), flush=True)
        details[name] = plan.to_dict()
        short = name.split("/")[-1]
        b = plan.bytes_per_device
        figures.append(figure(f"plan_{short}_peak_gib", f"plan: distil {short} on TPU v4-32 (16 x 32 GiB), peak per "
                              f"device", b["peak"] / 2 ** 30, unit=" GiB", target=f"<= {USABLE_FRACTION * 32:.1f} GiB",
                              met=bool(b["peak"] <= USABLE_FRACTION * v4),
                              note=f"state {(b['params'] + b['optimizer'] + b['teacher']) / 2 ** 30:.1f} GiB, "
                                   f"XLA temp {b['temp'] / 2 ** 30:.1f} GiB; compile-time, CPU-compiled"))
        figures.append(figure(f"plan_{short}_tflops", f"plan: distil {short}, model TFLOPs per step",
                              plan.flops["model"] / 1e12, unit=" TFLOP"))
    settings = {"mesh": dict(zip(("data", "fsdp", "tensor"), MESH)), **s, "pool": "fsdp", "donate": True,
                "optimizer": "AdamW (fp32 moments)", "command": "radial-jax plan --model M --mesh 1,16,1 --batch 64 "
                "--grad-accum 4 --seq-len 256 --remat full --compute-dtype bfloat16 --train all"}
    print(f"wrote {write_result(args.out, 'plan_pod', settings, figures, details)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

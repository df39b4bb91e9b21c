#!/usr/bin/env bash
# Multi-node GPU run under SLURM: one process per GPU, jax.distributed across the nodes.
#
# `--distributed` calls jax.distributed.initialize(), which reads the SLURM environment (coordinator =
# the first node, process id = SLURM_PROCID, one local GPU per task). Outputs go to a shared path.
# Check the memory first: radial-jax plan --model M --mesh ... --accelerator a100-80gb (or h100-80gb).
#
# Usage: sbatch experiments/launch_slurm_gpu.sh distill --teacher facebook/opt-6.7b --data wikitext2 \
#            --mesh 1,16,1 --batch-size 64 --grad-accum 4 --seq-len 256 --remat full --compute-dtype bfloat16 \
#            --train all --steps 2000 --run-dir /shared/runs/opt-6.7b-radial
#        sbatch experiments/launch_slurm_gpu.sh experiments/scaling_lm.py --mesh 1,16,1 --out /shared/scaling
#SBATCH --job-name=radial-jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: sbatch $0 SUBCOMMAND|SCRIPT.py [ARGS...]" >&2; exit 2; }
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
if [[ "$1" == *.py ]]; then CMD=(python "$@"); else CMD=(python -m radial_jax.cli "$@"); fi
srun "${CMD[@]}" --distributed

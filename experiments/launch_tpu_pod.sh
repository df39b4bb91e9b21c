#!/usr/bin/env bash
# Run any radial-jax subcommand (or an experiment script) on every host of a Cloud TPU pod slice.
#
# Each host runs the same command with `--distributed` (jax.distributed.initialize(): on Cloud TPU it
# finds the coordinator and process ids itself) and `--mesh data,fsdp,tensor`; every placement comes from
# the one axis-rules table (radial_jax.scale.sharding). Checkpoints and outputs go to a path all hosts share
# (GCS bucket or NFS) so any host can resume. Check the memory first, on your laptop:
#   radial-jax plan --model facebook/opt-6.7b --mesh 1,16,1 --batch 64 --grad-accum 4 --seq-len 256 \
#       --remat full --compute-dtype bfloat16 --accelerator tpu-v4
#
# Usage (TPU v4-32 = 16 chips = 4 hosts):
#   # distil OPT-6.7B from the hub into a Radial Network (each host reads only its shards of the teacher)
#   TPU_NAME=my-pod ZONE=us-central2-b ./experiments/launch_tpu_pod.sh distill --teacher facebook/opt-6.7b \
#       --data wikitext2 --mesh 1,16,1 --batch-size 64 --grad-accum 4 --seq-len 256 --remat full \
#       --compute-dtype bfloat16 --train all --steps 2000 --run-dir gs://bucket/runs/opt-6.7b-radial
#   # the scaling curves (OPT-125M ... 66B): weights read sharded, no host holds a whole model
#   TPU_NAME=my-pod ZONE=us-central2-b ./experiments/launch_tpu_pod.sh experiments/scaling_lm.py \
#       --mesh 1,16,1 --out /mnt/shared/results/scaling_lm
#   # profile or simulate one large model
#   TPU_NAME=my-pod ZONE=us-central2-b ./experiments/launch_tpu_pod.sh profile --model facebook/opt-66b \
#       --mesh 1,16,1 --dtype bfloat16 --out /mnt/shared/runs/profile-66b
#   # the small teacher of the offline pipeline, from scratch
#   TPU_NAME=my-pod ZONE=us-central2-b ./experiments/launch_tpu_pod.sh train --mesh=-1,1,1 --size base \
#       --batch-size 256 --steps 20000 --run-dir gs://bucket/runs/teacher
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
[ $# -ge 1 ] || { echo "usage: $0 SUBCOMMAND|SCRIPT.py [ARGS...]  (see the comments at the top)" >&2; exit 2; }
REPO="${REPO:-~/radial_jax}"
if [[ "$1" == *.py ]]; then RUN="python $(printf '%q ' "$@")"; else RUN="python -m radial_jax.cli $(printf '%q ' "$@")"; fi

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  cd $REPO
  pip install -q -e . 'jax[tpu]'
  $RUN --distributed
"

#!/usr/bin/env bash
# Launch `radial-jax train` on every host of a Cloud TPU pod slice.
#
# Each host runs the same command; `--distributed` calls jax.distributed.initialize()
# (on Cloud TPU it discovers the coordinator and process ids itself). Every process
# reads its own rows of each global batch (PackedDataset process sharding) and the
# train step runs on a (data, fsdp, tensor) mesh built from the one axis-rules table.
# Checkpoints go to a shared path (GCS bucket or NFS) so any host can resume.
#
# Usage: TPU_NAME=my-pod ZONE=us-central2-b RUN_DIR=gs://bucket/runs/teacher \
#        MESH=8,4,1 STEPS=20000 ./experiments/launch_tpu_pod.sh
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
: "${RUN_DIR:?set RUN_DIR (shared by all hosts)}"
MESH="${MESH:--1,1,1}"          # data,fsdp,tensor; -1 takes the remaining devices
STEPS="${STEPS:-20000}"
SIZE="${SIZE:-base}"
BATCH="${BATCH:-256}"           # global batch, divisible by the number of hosts
DATA="${DATA:-embedded}"
REPO="${REPO:-~/radial_jax}"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  cd $REPO
  pip install -q -e . 'jax[tpu]'
  python -m radial_jax.cli train --distributed --mesh '$MESH' --size '$SIZE' --steps '$STEPS' \
      --batch-size '$BATCH' --data '$DATA' --run-dir '$RUN_DIR' --no-progress
"

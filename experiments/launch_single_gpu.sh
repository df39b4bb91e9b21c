#!/usr/bin/env bash
# The offline pipeline on one GPU (or CPU): train the teacher, distil, evaluate.
# Re-running resumes each stage from its newest checkpoint in RUN_DIR.
#
# Usage: RUN_DIR=runs/gpu STEPS=5000 ./experiments/launch_single_gpu.sh
set -euo pipefail
RUN_DIR="${RUN_DIR:-runs/single}"
STEPS="${STEPS:-2000}"
DISTILL_STEPS="${DISTILL_STEPS:-1000}"
SIZE="${SIZE:-small}"
DATA="${DATA:-embedded}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
python -m radial_jax.cli train   --size "$SIZE" --steps "$STEPS" --data "$DATA" --run-dir "$RUN_DIR/teacher"
python -m radial_jax.cli distill --teacher "$RUN_DIR/teacher/model" --steps "$DISTILL_STEPS" --data "$DATA" \
    --run-dir "$RUN_DIR/student"
python -m radial_jax.cli eval    --student "$RUN_DIR/student/student" --data "$DATA" --out "$RUN_DIR/eval"

#!/usr/bin/env bash
# Edit-R1 training on one GPU host (e.g. 8 x 80 GB): one process drives every GPU, parameters
# FSDP-sharded over all of them (configs/kontext.py: mesh (1, -1, 1)). For several hosts under SLURM, run
# this script through `srun --ntasks-per-node=1`: each process sees SLURM_NTASKS and joins the others.
#
#   launch/gpu_host.sh WORKDIR [--config.x=y ...]
# CONFIG=configs/qwen_image_edit.py (and its PIPELINE_DIR) trains Qwen-Image-Edit-2509 instead of Kontext.
set -euo pipefail
WORKDIR=${1:?workdir}; shift
PIPELINE_DIR=${PIPELINE_DIR:-/models/FLUX.1-Kontext-dev}
REWARD_DIR=${REWARD_DIR:-/models/Qwen2.5-VL-32B-Instruct}
CONFIG=${CONFIG:-configs/kontext.py}
DATASET_DIR=${DATASET_DIR:-/data/edit_r1}
cd "$(dirname "$0")/.."

# One-time setup: the runtime requirements plus jax's CUDA build of the same version.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -e . 'jax[cuda12]==0.10.2'
fi

# Overlap FSDP all-gathers with compute; let XLA take most of the GPU memory up front.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec .venv/bin/python launch/train.py --config="$CONFIG" --workdir="$WORKDIR" \
  --config.model.pipeline_dir="$PIPELINE_DIR" --config.reward.model_dir="$REWARD_DIR" \
  --config.data.dataset_dir="$DATASET_DIR" "$@"

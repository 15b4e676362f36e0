#!/usr/bin/env bash
# Edit-R1 training on a Cloud TPU pod slice: the same command on every host, one process each;
# jax.distributed.initialize() finds the other hosts itself (--distributed).
#
#   launch/tpu_pod.sh TPU_NAME ZONE WORKDIR [--config.x=y ...]
#
# Expects, on every host, this repository at ~/editr1_jax and the model folders and dataset at the
# paths below (a shared disk or a copy per host). WORKDIR must be reachable by every host for
# checkpoints (a shared filesystem mount; gs:// paths need tensorflow's or etils' GCS support).
# CONFIG=configs/qwen_image_edit.py (and its PIPELINE_DIR) trains Qwen-Image-Edit-2509 instead of Kontext.
set -euo pipefail
TPU_NAME=${1:?TPU name}; ZONE=${2:?zone}; WORKDIR=${3:?workdir}; shift 3
PIPELINE_DIR=${PIPELINE_DIR:-/mnt/disks/models/FLUX.1-Kontext-dev}
REWARD_DIR=${REWARD_DIR:-/mnt/disks/models/Qwen2.5-VL-32B-Instruct}
CONFIG=${CONFIG:-configs/kontext.py}
DATASET_DIR=${DATASET_DIR:-/mnt/disks/data/edit_r1}

# One-time setup on every host: the runtime requirements plus jax's TPU build of the same version.
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd ~/editr1_jax && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -e . 'jax[tpu]==0.10.2'"

# Every value is quoted for the remote shell (printf %q), so spaces and shell characters arrive as typed.
ARGS=$(printf ' %q' --workdir="$WORKDIR" --config.model.pipeline_dir="$PIPELINE_DIR" \
  --config.reward.model_dir="$REWARD_DIR" --config.data.dataset_dir="$DATASET_DIR" "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd ~/editr1_jax && .venv/bin/python launch/train.py --config=$(printf %q "$CONFIG") --distributed$ARGS"

#!/usr/bin/env bash
# Train on every host of a Cloud TPU slice: one `python -m flm_jax.train --multihost` per TPU VM worker, started
# over `gcloud compute tpus tpu-vm ssh --worker=all`. jax.distributed finds its peers from the TPU VM's metadata.
#
#   TPU_NAME=my-v5p-512 ZONE=us-east5-a WORKDIR=gs://my-bucket/52b EXPERIMENT=gin/experiments/my_52b.gin \
#     bash launch/tpu_pod.sh
#   DRY_RUN=1 ... bash launch/tpu_pod.sh   # print the training command (stdout) and the gcloud call (stderr)
#
# Before the first launch, put this checkout at CODE_DIR on every worker, e.g.
#   gcloud compute tpus tpu-vm scp --recurse --worker=all --zone="$ZONE" . "$TPU_NAME":flm_jax
# The training processes are children of the ssh sessions: launch from a tmux/screen session that stays up.
# Resuming after a preemption is running this again with the same settings (docs/scaling.md).
set -euo pipefail

TPU_NAME="${TPU_NAME:?set TPU_NAME to the TPU VM slice (gcloud compute tpus tpu-vm list)}"
ZONE="${ZONE:?set ZONE to the slice zone, e.g. us-east5-a}"
# Where config.gin, metrics and checkpoints go; every host must reach the same one (docs/scaling.md).
WORKDIR="${WORKDIR:?set WORKDIR, e.g. gs://my-bucket/52b}"
MODEL="${MODEL:-gin/models/52b.gin}"
# The mesh layout must be the one for this slice's type (its MeshLayout.topology): tpu_v5p_52b is a v5p-512.
MESH="${MESH:-gin/meshes/tpu_v5p_52b.gin}"
# Data mixture, steps and learning-rate schedule (docs/data.md), applied after the model and mesh files.
EXPERIMENT="${EXPERIMENT:?set EXPERIMENT to your data and steps gin file, a path inside CODE_DIR}"
# This repository on each worker, relative to the home directory there.
CODE_DIR="${CODE_DIR:-flm_jax}"
# The workers' Python, 3.11 or newer (pyproject.toml), e.g. a venv's python.
PYTHON="${PYTHON:-python3}"

TRAIN_CMD=("$PYTHON" -m flm_jax.train --gin_file="$MODEL" --gin_file="$MESH" --gin_file="$EXPERIMENT"
  --workdir="$WORKDIR" --multihost)

# printf %q quotes each word for the workers' shell (and works in macOS's bash 3.2).
REMOTE="cd $(printf '%q' "$CODE_DIR") && $(printf '%q' "$PYTHON") -m pip install -q -r requirements-tpu.txt"
REMOTE+=" && $(printf '%q ' "${TRAIN_CMD[@]}")"
LAUNCH=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$REMOTE")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${TRAIN_CMD[@]}"
  echo
  printf '%q ' "${LAUNCH[@]}" >&2
  echo >&2
  exit 0
fi
exec "${LAUNCH[@]}"

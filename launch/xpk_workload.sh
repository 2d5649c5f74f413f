#!/usr/bin/env bash
# Train on a TPU slice of a GKE cluster as an xpk workload: xpk starts one container per TPU VM host, each running
# `python -m flm_jax.train --multihost`; jax.distributed finds its peers from the TPU_WORKER_* variables GKE sets.
#
#   CLUSTER=my-cluster ZONE=us-east5-a DOCKER_IMAGE=gcr.io/my-project/flm_jax:tpu WORKDIR=gs://my-bucket/52b \
#     EXPERIMENT=gin/experiments/my_52b.gin bash launch/xpk_workload.sh
#   DRY_RUN=1 ... bash launch/xpk_workload.sh   # print the training command (stdout) and the xpk call (stderr)
#
# DOCKER_IMAGE holds this checkout at CODE_DIR with `pip install -r requirements-tpu.txt` already run in it, so a
# restarted container starts training at once. xpk restarts the workload up to MAX_RESTARTS times (a preemption,
# a failed host); each restart runs the same command, which resumes from WORKDIR's latest checkpoint.
set -euo pipefail

CLUSTER="${CLUSTER:?set CLUSTER to the GKE cluster (xpk cluster list)}"
ZONE="${ZONE:?set ZONE to the cluster zone, e.g. us-east5-a}"
DOCKER_IMAGE="${DOCKER_IMAGE:?set DOCKER_IMAGE to an image with this checkout and requirements-tpu.txt installed}"
# Where config.gin, metrics and checkpoints go; every host must reach the same one (docs/scaling.md).
WORKDIR="${WORKDIR:?set WORKDIR, e.g. gs://my-bucket/52b}"
MODEL="${MODEL:-gin/models/52b.gin}"
# The mesh layout and the slice type go together: TPU_TYPE is the mesh's MeshLayout.topology.
MESH="${MESH:-gin/meshes/tpu_v5p_52b.gin}"
TPU_TYPE="${TPU_TYPE:-v5p-512}"
# Data mixture, steps and learning-rate schedule (docs/data.md), applied after the model and mesh files.
EXPERIMENT="${EXPERIMENT:?set EXPERIMENT to your data and steps gin file, a path inside CODE_DIR}"
# The shipped layouts are compiled for one slice; multi-slice (DCN) meshes are not covered (docs/scaling.md).
NUM_SLICES="${NUM_SLICES:-1}"
# Unique in the cluster while it exists (xpk workload delete frees the name).
WORKLOAD="${WORKLOAD:-flm-train}"
MAX_RESTARTS="${MAX_RESTARTS:-10}"
# This repository inside the image.
CODE_DIR="${CODE_DIR:-/app}"

TRAIN_CMD=(python -m flm_jax.train --gin_file="$MODEL" --gin_file="$MESH" --gin_file="$EXPERIMENT"
  --workdir="$WORKDIR" --multihost)

LAUNCH=(xpk workload create --cluster="$CLUSTER" --zone="$ZONE" --workload="$WORKLOAD" --tpu-type="$TPU_TYPE"
  --num-slices="$NUM_SLICES" --max-restarts="$MAX_RESTARTS" --docker-image="$DOCKER_IMAGE"
  --command="cd $(printf '%q' "$CODE_DIR") && $(printf '%q ' "${TRAIN_CMD[@]}")")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${TRAIN_CMD[@]}"
  echo
  printf '%q ' "${LAUNCH[@]}" >&2
  echo >&2
  exit 0
fi
exec "${LAUNCH[@]}"

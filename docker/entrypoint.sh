#!/usr/bin/env bash
# Container entrypoint for mnist-dist (Docker image and Apptainer runscript).
#
#   [train] [train_ddp.py flags...]   torchrun --standalone --nproc-per-node=<visible GPUs, or 1> train_ddp.py FLAGS
#                                     unless a launcher started the container (see launcher_mode):
#                                     WORLD_SIZE+RANK set -> python train_ddp.py FLAGS (already a rank)
#                                     PET_* set           -> torchrun train_ddp.py FLAGS (torchrun reads PET_*)
#   evaluate FLAGS | download FLAGS   python -m mnist_dist evaluate|download FLAGS (one process)
#   COMMAND [ARGS...]                 anything else runs as given (bash, python, torchrun for multi-node, ...)
#
# Environment:
#   NPROC_PER_NODE         processes to start (default: visible GPUs, or 1 without GPUs)
#   CUDA_VISIBLE_DEVICES   when set, its entries are the visible GPUs ("" or "-1": none)
#   MNIST_DIST_TRAIN_SCRIPT  path of train_ddp.py (default: /app/train_ddp.py, where the image has it)
#   ENTRYPOINT_DRY_RUN=1   print the command instead of running it
set -euo pipefail

TRAIN_SCRIPT=${MNIST_DIST_TRAIN_SCRIPT:-/app/train_ddp.py}
PYTHON=${PYTHON:-python}

# Number of GPUs this container sees: CUDA_VISIBLE_DEVICES when set (CUDA stops at the first
# invalid entry such as -1), else the GPUs nvidia-smi lists, else 0.
visible_gpus() {
  local count=0 entry
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    IFS=',' read -r -a entries <<<"$CUDA_VISIBLE_DEVICES"
    for entry in "${entries[@]}"; do
      entry=${entry//[[:space:]]/}
      [[ -z "$entry" || "$entry" == -* ]] && break
      count=$((count + 1))
    done
  elif command -v nvidia-smi >/dev/null 2>&1; then
    count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  fi
  echo "$count"
}

nproc_per_node() {
  local n=${NPROC_PER_NODE:-}
  if [[ -z "$n" ]]; then
    n=$(visible_gpus)
    ((n > 0)) || n=1
  fi
  if [[ ! "$n" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: NPROC_PER_NODE must be a positive integer, got '$n'" >&2
    exit 2
  fi
  echo "$n"
}

# Who started this container? A launcher that made this process one rank already (WORLD_SIZE and
# RANK set, one process per pod: a Kubeflow PyTorchJob replica) -> "rank": run train_ddp.py itself.
# A launcher that set torchrun's own settings (PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, ...:
# Kubeflow Trainer's TrainJob, an elastic PyTorchJob, or a PyTorchJob with nprocPerNode > 1) but
# started no ranks -> "torchrun": torchrun with none of our flags, so the PET_* values rule (our
# --standalone would make every node a world of its own). Neither -> "standalone" (this script's).
launcher_mode() {
  if [[ -n "${WORLD_SIZE:-}" && -n "${RANK:-}" && "${PET_NPROC_PER_NODE:-1}" == 1 ]]; then
    echo rank
  elif [[ -n "$(compgen -e PET_)" ]]; then
    echo torchrun
  else
    echo standalone
  fi
}

run() {
  if [[ "${ENTRYPOINT_DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
    exit 0
  fi
  exec "$@"
}

command=${1:-train}
case "$command" in
train | -*)
  [[ "$command" == train && $# -gt 0 ]] && shift
  case "$(launcher_mode)" in
  rank) run "$PYTHON" "$TRAIN_SCRIPT" "$@" ;;
  torchrun) run "$PYTHON" -m torch.distributed.run "$TRAIN_SCRIPT" "$@" ;;
  *)
    nproc=$(nproc_per_node)
    run "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$nproc" "$TRAIN_SCRIPT" "$@"
    ;;
  esac
  ;;
evaluate | download)
  shift
  run "$PYTHON" -m mnist_dist "$command" "$@"
  ;;
*)
  run "$@"
  ;;
esac

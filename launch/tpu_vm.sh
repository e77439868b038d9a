#!/usr/bin/env bash
# TPU VM pod slice: the same command on every worker; jax.distributed auto-detects the pod.
#   launch/tpu_vm.sh my-tpu us-central2-b configs/pretrain.py gs-fuse-mounted/workdir
set -euo pipefail
TPU=${1:?tpu name}; ZONE=${2:?zone}; CONFIG=${3:?config}; WORKDIR=${4:?workdir}; shift 4
# Each worker runs the project's interpreter (launch/python.sh: $PYTHON, else its .venv), not a
# bare python3 that may lack the packages; the script's status is gcloud's.
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command \
  "cd ~/aacp_jax && . launch/python.sh && \"\$PY\" -m aacp_jax.main --config=$CONFIG --workdir=$WORKDIR $*"

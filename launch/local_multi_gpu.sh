#!/usr/bin/env bash
# One host, all its GPUs, one process (jit shards the batch over every local device).
#   launch/local_multi_gpu.sh configs/pretrain.py /runs/aacp [--config.batch_size=512]
set -euo pipefail
CONFIG=${1:?config}; WORKDIR=${2:?workdir}; shift 2
cd "$(dirname "$0")/.."
. launch/python.sh
# Let XLA take most of GPU memory up front; input work stays on the host.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec "$PY" -m aacp_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"

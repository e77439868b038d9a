#!/usr/bin/env bash
# Two processes on localhost with CPU devices: the multi-host code path without a cluster.
#   launch/local_two_process_cpu.sh /tmp/aacp_2proc [--config.total_steps=20]
set -euo pipefail
WORKDIR=${1:?workdir}; shift
cd "$(dirname "$0")/.."
PORT=${PORT:-$((20000 + RANDOM % 10000))}
export XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu
for i in 0 1; do
  python -m aacp_jax.main --config=configs/pretrain.py:demo --workdir="$WORKDIR" \
    --coordinator_address=127.0.0.1:$PORT --num_processes=2 --process_id=$i "$@" &
done
wait

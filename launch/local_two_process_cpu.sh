#!/usr/bin/env bash
# Two processes on localhost with CPU devices: the multi-host code path without a cluster.
#   launch/local_two_process_cpu.sh /tmp/aacp_2proc [--config.total_steps=20]
# Exits with the first failing process's status (and stops the other: it cannot go on alone).
set -euo pipefail
WORKDIR=${1:?workdir}; shift
cd "$(dirname "$0")/.."
. launch/python.sh
PORT=${PORT:-$((20000 + RANDOM % 10000))}
export XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu
pids=()
for i in 0 1; do
  "$PY" -m aacp_jax.main --config=configs/pretrain.py:demo --workdir="$WORKDIR" \
    --coordinator_address=127.0.0.1:$PORT --num_processes=2 --process_id=$i "$@" &
  pids+=($!)
done
# Ctrl-C / kill of this script: pass it on, so both processes checkpoint and stop.
stop_all() { [ "${#pids[@]}" -eq 0 ] || kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap stop_all INT TERM
status=0
running=${#pids[@]}
while [ "$running" -gt 0 ]; do
  running=0
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    if kill -0 "$pid" 2>/dev/null; then
      running=$((running + 1))
      continue
    fi
    code=0
    wait "$pid" || code=$?
    unset 'pids[i]'
    if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
      status=$code
      echo "launch: process $i exited with status $code; stopping the other" >&2
      stop_all
    fi
  done
  [ "$running" -eq 0 ] || sleep 1
done
exit "$status"

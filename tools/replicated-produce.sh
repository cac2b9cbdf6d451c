#!/usr/bin/env bash
# Replicated against unreplicated produce on one host, side by side.
#
#   tools/replicated-produce.sh [FJORD_BIN] [FJORD_BENCH_BIN] [ACKS]
#
# Runs, one after the other: a single node (one shard on core 0) with a 3-partition topic of
# replication factor 1, then three nodes (one shard each, all on core 0) with a 3-partition
# topic of replication factor 3; each time `fjord-bench produce` loads it from core 1 for 8 s
# (1 KiB records) with the given acks (default all). Prints throughput, latency and the CPU
# time all broker processes used. Ports 29001-29003 and 29101-29103 on loopback.
set -euo pipefail
fj=${1:-target/release/fjord}
bench=${2:-target/release/fjord-bench}
acks=${3:-all}
base=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$base"; }
trap cleanup EXIT
cpu_ticks() { local t=0; for p in "${pids[@]}"; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo "$t"; }
wait_ready() { for _ in $(seq 1 300); do grep -q "fjord ready" "$1" 2>/dev/null && return; sleep 0.1; done; echo "no start: $1" >&2; exit 1; }

run() {
  local mode=$1 rf
  pids=()
  if [ "$mode" = single ]; then
    rf=1
    "$fj" serve --cpus 0 --listen 127.0.0.1:29001 --data-dir "$base/single" >"$base/single.log" 2>&1 & pids+=($!)
    wait_ready "$base/single.log"
  else
    rf=3
    local v=1@127.0.0.1:29101,2@127.0.0.1:29102,3@127.0.0.1:29103
    for i in 1 2 3; do
      "$fj" serve --node-id $i --cpus 0 --overprovisioned --listen 127.0.0.1:2900$i \
        --data-dir "$base/n$i" --controllers $v >"$base/n$i.log" 2>&1 & pids+=($!)
    done
    for i in 1 2 3; do wait_ready "$base/n$i.log"; done
  fi
  # Retried while the cluster forms (registration, first controller).
  for _ in $(seq 1 50); do
    "$fj" topics --bootstrap 127.0.0.1:29001 create bench --partitions 3 --replication-factor $rf >/dev/null 2>&1 && break
    sleep 0.2
  done
  local c0; c0=$(cpu_ticks)
  echo "== $mode (replication factor $rf, acks=$acks)"
  "$bench" produce --bootstrap 127.0.0.1:29001 --cpus 1 --topic bench --acks "$acks" --duration 8 --connections 2 \
    | grep -E "MB/s|latency p50|latency p99 "
  local c1; c1=$(cpu_ticks)
  echo "broker CPU-seconds, all nodes: $(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.2f", (b - a) / 100 }')"
  kill "${pids[@]}"; wait 2>/dev/null || true
}

run single
run cluster

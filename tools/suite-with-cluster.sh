#!/usr/bin/env bash
# `fjord-bench suite` with its replicated row: one single node and one three-node cluster on
# this host, side by side, each broker shard on core 0 and the load on core 1.
#
#   tools/suite-with-cluster.sh [FJORD_BIN] [FJORD_BENCH_BIN] [SUITE ARGS...]
#
# e.g. `tools/suite-with-cluster.sh target/release/fjord target/release/fjord-bench --quick`.
# The single node listens on 127.0.0.1:29001 (data under a temporary directory, which the host
# probes also use); the cluster on 29011-29013 with controllers on 29111-29113.
set -euo pipefail
fj=${1:-target/release/fjord}
bench=${2:-target/release/fjord-bench}
shift $(( $# >= 2 ? 2 : $# ))
base=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$base"; }
trap cleanup EXIT
wait_ready() { for _ in $(seq 1 300); do grep -q "fjord ready" "$1" 2>/dev/null && return; sleep 0.1; done; echo "no start: $1" >&2; exit 1; }

"$fj" serve --cpus 0 --listen 127.0.0.1:29001 --data-dir "$base/single" >"$base/single.log" 2>&1 & pids+=($!)
single=$!
v=1@127.0.0.1:29111,2@127.0.0.1:29112,3@127.0.0.1:29113
cluster=()
for i in 1 2 3; do
  "$fj" serve --node-id $i --cpus 0 --overprovisioned --listen 127.0.0.1:2901$i \
    --data-dir "$base/n$i" --controllers $v >"$base/n$i.log" 2>&1 & pids+=($!)
  cluster+=($!)
done
wait_ready "$base/single.log"
for i in 1 2 3; do wait_ready "$base/n$i.log"; done
# The replicated row's topic, created once every node is registered (retried meanwhile).
for _ in $(seq 1 100); do
  "$fj" topics --bootstrap 127.0.0.1:29011 create fjord-bench-suite-rf3 --partitions 3 \
    --replication-factor 3 >/dev/null 2>&1 && break
  sleep 0.2
done
"$bench" suite --cpus 1 --bootstrap 127.0.0.1:29001 --data-dir "$base/single" \
  --broker-pid "$single" --replicated-bootstrap 127.0.0.1:29011 \
  --replicated-pids "$(IFS=,; echo "${cluster[*]}")" "$@"

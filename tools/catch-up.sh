#!/usr/bin/env bash
# A consumer catching up on a 1 GB backlog from disk, against the disk's O_DIRECT sequential
# read bandwidth measured in the same run (issue 11's measure).
#
#   tools/catch-up.sh [--fjord BIN] [--partitions N] [--runs R] [--rdkafka-performance BIN]
#                     [--data DIR] [--port P]
#
# Once: produces 1,000,000 records of 1 KiB (rdkafka_performance -P, linger.ms=5) into topic
# `cu` with N partitions (default 1) of a data directory kept in --data (default a temporary
# one). Then R times (default 3): stops the broker, drops the page cache, reads the largest
# segment of partition 0 with fio (1 MiB, O_DIRECT, queue depth 1, io_uring: "fio before"),
# starts the broker with one shard on core 0 and consumes everything from the beginning with
# rdkafka_performance -C on core 1 (default settings; `-p 0` for one partition, a consumer group
# for more), then reads the segment with fio again ("fio after"). Prints per run the
# consumer's MB/s (its own figure, MB = 10^6 bytes), the broker's CPU-seconds while it
# consumed, the page faults it took meanwhile, how long the block device was busy, what it read
# and in how many requests (the device's own counters), and the ratio of the consumer's MB/s to
# each fio figure.
#
# rdkafka_performance comes from librdkafka's examples: `python3 tools/librdkafka-suite.py
# --build-only` builds it from the rdkafka-sys crate into ~/.cache/fjord. Needs fio, and root to
# drop the page cache (without it, reads may come from the page cache).
set -euo pipefail
fj=target/release/fjord
parts=1
runs=3
rp=$(ls -d "$HOME"/.cache/fjord/librdkafka-*/build/examples/rdkafka_performance 2>/dev/null | tail -1 || true)
data=
port=29401
while [ $# -gt 0 ]; do
  case $1 in
    --fjord) fj=$2; shift 2 ;;
    --partitions) parts=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --rdkafka-performance) rp=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    *) echo "unknown argument: $1 (see the comment at the top of $0)" >&2; exit 2 ;;
  esac
done
[ -x "$fj" ] || { echo "no broker binary at $fj (cargo build --release, or --fjord BIN)" >&2; exit 2; }
[ -n "$rp" ] && [ -x "$rp" ] || {
  echo "no rdkafka_performance (python3 tools/librdkafka-suite.py --build-only, or --rdkafka-performance BIN)" >&2
  exit 2
}
command -v fio >/dev/null || { echo "fio is needed (apt-get install fio)" >&2; exit 2; }
[ "$parts" -ge 1 ] 2>/dev/null || { echo "--partitions must be a positive number" >&2; exit 2; }
cores=$(nproc)
bcore=0
ccore=$((cores > 1 ? 1 : 0))

tmp=$(mktemp -d)
keep=1
if [ -z "$data" ]; then data=$tmp/data; keep=0; fi
broker=
stop_broker() {
  if [ -n "$broker" ]; then kill "$broker" 2>/dev/null || true; wait "$broker" 2>/dev/null || true; broker=; fi
}
cleanup() { stop_broker; rm -rf "$tmp"; }
trap cleanup EXIT
start_broker() {
  taskset -c $bcore "$fj" serve --cores 1 --listen 127.0.0.1:$port --data-dir "$data" >"$tmp/broker.log" 2>&1 &
  broker=$!
  for _ in $(seq 1 600); do grep -q "fjord ready" "$tmp/broker.log" 2>/dev/null && return; sleep 0.1; done
  cat "$tmp/broker.log" >&2
  exit 1
}
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
faults() { awk '{print $10}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
drop_cache() {
  sync
  if ! (echo 3 >/proc/sys/vm/drop_caches) 2>/dev/null; then
    echo "warning: cannot drop the page cache (not root)" >&2
  fi
}

if [ ! -d "$data/cu-0" ]; then
  start_broker
  "$fj" topics --bootstrap 127.0.0.1:$port create cu --partitions "$parts" >/dev/null
  taskset -c $ccore "$rp" -P -t cu -s 1024 -c 1000000 -b 127.0.0.1:$port -X linger.ms=5 \
    >"$tmp/produce.log" 2>&1 || { cat "$tmp/produce.log" >&2; exit 1; }
  stop_broker
fi
seg=$(ls -S "$data"/cu-0/*.log | head -1)
dev=$(lsblk -no pkname "$(df --output=source "$data" | tail -1)" 2>/dev/null | head -1 || true)
[ -n "$dev" ] || dev=$(basename "$(df --output=source "$data" | tail -1)")
stat_file=/sys/block/$dev/stat
fio_mbs() {
  fio --name=seq --filename="$seg" --rw=read --direct=1 --bs=1M --iodepth=1 --ioengine=io_uring \
    --output-format=terse 2>/dev/null | awk -F';' '{ printf "%.0f", $7 * 1.024 / 1000 }'
}
# Reads completed, sectors read, ms the device was busy.
dev_stat() { if [ -r "$stat_file" ]; then awk '{print $1, $3, $10}' "$stat_file"; else echo "0 0 0"; fi; }

if [ "$parts" = 1 ]; then select=(-p 0); fi
for run in $(seq 1 "$runs"); do
  drop_cache
  before=$(fio_mbs)
  drop_cache
  start_broker
  [ "$parts" = 1 ] || select=(-G "catch-up-$run-$$")
  b0=$(ticks "$broker")
  f0=$(faults "$broker")
  read -r r0 s0 busy0 < <(dev_stat)
  out=$(taskset -c $ccore "$rp" -C -t cu "${select[@]}" -o beginning -c 1000000 -b 127.0.0.1:$port 2>&1 |
    grep "consumed in" | tail -1)
  b1=$(ticks "$broker")
  f1=$(faults "$broker")
  read -r r1 s1 busy1 < <(dev_stat)
  stop_broker
  after=$(fio_mbs)
  mbs=$(echo "$out" | grep -oE '[0-9.]+ MB/s' | head -1 | cut -d' ' -f1)
  [ -n "$mbs" ] || { echo "run $run: no result from rdkafka_performance" >&2; cat "$tmp/broker.log" >&2; exit 1; }
  awk -v run="$run" -v p="$parts" -v mbs="$mbs" -v fb="$before" -v fa="$after" \
    -v cpu="$(((b1 - b0)))" -v hz="$hz" -v busy="$((busy1 - busy0))" -v rd="$(((s1 - s0) * 512))" \
    -v reqs="$((r1 - r0))" -v flt="$((f1 - f0))" \
    'BEGIN { printf "run %d: partitions=%d consumer_MB/s=%.0f fio_before=%.0f fio_after=%.0f ratio_before=%.2f ratio_after=%.2f broker_cpu_s=%.2f disk_busy_ms=%d disk_read_MB=%.0f disk_requests=%d request_KB=%.0f broker_page_faults=%d\n",
             run, p, mbs, fb, fa, mbs / fb, mbs / fa, cpu / hz, busy, rd / 1e6, reqs, reqs ? rd / 1024 / reqs : 0, flt }'
done
if [ "$keep" = 1 ]; then echo "data kept in $data"; fi

#!/usr/bin/env bash
# What an idle consumer of many partitions costs the broker, in broker CPU-seconds per minute.
#
#   tools/idle-consumer.sh [--fjord BIN] [--partitions N] [--client kcat|confluent|kafka-python|none]
#                          [--seconds S] [--settle S] [--port P]
#
# Starts the broker with one shard on core 0 and a topic of N partitions (default 2000) with no
# data, then a consumer group member subscribed to all of them on core 1: kcat -G or
# confluent-kafka (librdkafka: a full fetch of every partition each fetch.wait.max.ms, no fetch
# sessions), or kafka-python (incremental fetch sessions, KIP-227); `none` measures the broker
# alone. After --settle seconds (default 25: the group forms, the consumer reaches the end of
# every partition) it reads the broker's and the client's CPU time over --seconds (default 60)
# from /proc and prints both per minute. Needs kcat, or python3 with the client package.
set -euo pipefail
fj=target/release/fjord
parts=2000
client=kcat
secs=60
settle=25
port=29301
while [ $# -gt 0 ]; do
  case $1 in
    --fjord) fj=$2; shift 2 ;;
    --partitions) parts=$2; shift 2 ;;
    --client) client=$2; shift 2 ;;
    --seconds) secs=$2; shift 2 ;;
    --settle) settle=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    *) echo "unknown argument: $1 (see the comment at the top of $0)" >&2; exit 2 ;;
  esac
done
case $client in
  kcat | confluent | kafka-python | none) ;;
  *) echo "--client must be kcat, confluent, kafka-python or none, not '$client'" >&2; exit 2 ;;
esac
[ -x "$fj" ] || { echo "no broker binary at $fj (cargo build --release, or --fjord BIN)" >&2; exit 2; }
cores=$(nproc)
[ "$cores" -ge 2 ] || echo "warning: one core only, broker and client share it" >&2
bcore=0
ccore=$((cores > 1 ? 1 : 0))

dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

taskset -c $bcore "$fj" serve --cores 1 --listen 127.0.0.1:$port --data-dir "$dir/data" \
  >"$dir/broker.log" 2>&1 &
broker=$!
pids+=($broker)
for _ in $(seq 1 300); do grep -q "fjord ready" "$dir/broker.log" 2>/dev/null && break; sleep 0.1; done
grep -q "fjord ready" "$dir/broker.log" || { cat "$dir/broker.log" >&2; exit 1; }
"$fj" topics --bootstrap 127.0.0.1:$port create idle --partitions "$parts" >/dev/null

case $client in
  kcat)
    taskset -c $ccore kcat -b 127.0.0.1:$port -G idle-consumer idle -q >/dev/null 2>"$dir/client.log" & ;;
  confluent)
    taskset -c $ccore python3 -c "
from confluent_kafka import Consumer
c = Consumer({'bootstrap.servers': '127.0.0.1:$port', 'group.id': 'idle-consumer',
              'auto.offset.reset': 'earliest'})
c.subscribe(['idle'])
while True:
    c.poll(1.0)" >/dev/null 2>"$dir/client.log" & ;;
  kafka-python)
    taskset -c $ccore python3 -c "
from kafka import KafkaConsumer
c = KafkaConsumer('idle', bootstrap_servers='127.0.0.1:$port', group_id='idle-consumer',
                  auto_offset_reset='earliest')
for _ in c:
    pass" >/dev/null 2>"$dir/client.log" & ;;
  none)
    sleep $((settle + secs + 5)) & ;;
esac
consumer=$!
pids+=($consumer)
sleep "$settle"
kill -0 "$consumer" 2>/dev/null || { echo "the client exited:" >&2; cat "$dir/client.log" >&2; exit 1; }
b0=$(ticks $broker)
c0=$(ticks $consumer)
sleep "$secs"
b1=$(ticks $broker)
c1=$(ticks $consumer)
per_min() { awk -v d="$1" -v hz="$hz" -v s="$secs" 'BEGIN { printf "%.3f", d / hz * 60 / s }'; }
echo "partitions=$parts client=$client broker_cpu_s_per_min=$(per_min $((b1 - b0))) client_cpu_s_per_min=$(per_min $((c1 - c0)))"

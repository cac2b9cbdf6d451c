"""A leader's death under Python clients, on a three-node Fjord cluster.

Usage: cluster_failover.py BOOTSTRAP1,BOOTSTRAP2,BOOTSTRAP3

confluent-kafka's idempotent acks=all producer writes to a topic with replication factor 3 and
min.insync.replicas=2; after its first 500 acknowledgements the script prints "killing now"
and goes on writing while the driving test kills the leader of partition 0 with SIGKILL. Then
kafka-python and aiokafka write acks=all through the surviving nodes, and consumers of all
three libraries read the topic back: every acknowledged record is there, the idempotent ones
exactly once. Exits non-zero on the first failed check.
"""
import asyncio
import sys
import time
import uuid

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from kafka import KafkaConsumer, KafkaProducer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

nodes = sys.argv[1].split(",")
bootstrap = ",".join(nodes)
TOPIC = "py-failover"


def check(cond, what):
    if not cond:
        print("FAILED:", what, flush=True)
        sys.exit(1)
    print("ok:", what, flush=True)


admin = AdminClient({"bootstrap.servers": bootstrap})
fs = admin.create_topics([NewTopic(TOPIC, 3, 3, config={"min.insync.replicas": "2"})])
for f in fs.values():
    f.result(15)
deadline = time.time() + 30
while time.time() < deadline:
    parts = admin.list_topics(topic=TOPIC, timeout=10).topics[TOPIC].partitions
    if len(parts) == 3 and all(len(p.isrs) == 3 and p.leader >= 0 for p in parts.values()):
        break
    time.sleep(0.2)
check(len(parts) == 3, "the topic is led and fully in sync")

# A group first: __consumer_offsets (replication factor 3) is created while all three nodes are
# up, as on any running cluster (Kafka creates it only with enough live brokers).
warm = Consumer({"bootstrap.servers": bootstrap, "group.id": "fo-warm", "auto.offset.reset": "earliest"})
warm.subscribe([TOPIC])
deadline = time.time() + 30
while not warm.assignment() and time.time() < deadline:
    warm.poll(0.2)
check(bool(warm.assignment()), "a consumer group formed (the offsets topic exists)")
warm.close()

acked = set()
failed = []


def report(err, msg):
    if err is None:
        acked.add(msg.value())
    else:
        failed.append(str(err))


p = Producer(
    {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "message.timeout.ms": 120000,
    }
)
i = 0
announced = False
end_at = None
while True:
    v = f"ck{i}".encode()
    try:
        p.produce(TOPIC, value=v, key=f"k{i % 97}".encode(), on_delivery=report)
        i += 1
    except BufferError:
        p.poll(0.05)
        continue
    p.poll(0)
    if i % 20 == 0:
        time.sleep(0.01)
    if not announced and len(acked) >= 500:
        # The driving test kills partition 0's leader now; writing goes on meanwhile.
        print("killing now", flush=True)
        announced = True
        end_at = time.time() + 6
    if end_at is not None and time.time() >= end_at:
        break
    if not announced and i > 200000:
        break
left = p.flush(120)
check(announced, "500 acknowledgements before the kill")
check(left == 0 and not failed, f"confluent-kafka: {i} sent, {len(acked)} acked, failed {failed[:3]}")

# After the failover: kafka-python and aiokafka write through what is left.
kp = KafkaProducer(bootstrap_servers=nodes, acks="all", retries=10, request_timeout_ms=30000)
futures = [kp.send(TOPIC, value=f"kp{j}".encode()) for j in range(200)]
kp.flush(60)
kp_acked = {f"kp{j}".encode() for j, f in enumerate(futures) if f.succeeded()}
kp.close()
check(len(kp_acked) == 200, f"kafka-python acks=all after the failover: {len(kp_acked)} of 200")


async def aio_produce():
    prod = AIOKafkaProducer(bootstrap_servers=nodes, acks="all")
    await prod.start()
    try:
        for j in range(200):
            await prod.send_and_wait(TOPIC, f"aio{j}".encode())
    finally:
        await prod.stop()


asyncio.run(aio_produce())
aio_acked = {f"aio{j}".encode() for j in range(200)}
print("ok: aiokafka acks=all after the failover: 200 of 200", flush=True)
everything = acked | kp_acked | aio_acked

# confluent-kafka group: every idempotent record exactly once, every other one at least once.
c = Consumer(
    {
        "bootstrap.servers": bootstrap,
        "group.id": "fo-" + uuid.uuid4().hex[:6],
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    }
)
c.subscribe([TOPIC])
counts = {}
deadline = time.time() + 90
while not everything.issubset(counts.keys()) and time.time() < deadline:
    m = c.poll(0.5)
    if m is not None and not m.error():
        counts[m.value()] = counts.get(m.value(), 0) + 1
c.close()
missing = everything - counts.keys()
check(not missing, f"confluent-kafka read every acknowledged record ({len(missing)} missing)")
twice = [v for v in acked if counts.get(v, 0) != 1]
check(not twice, f"idempotent records exactly once ({len(twice)} not)")

kc = KafkaConsumer(
    TOPIC,
    bootstrap_servers=nodes,
    group_id="fo-kp-" + uuid.uuid4().hex[:6],
    auto_offset_reset="earliest",
    enable_auto_commit=False,
    consumer_timeout_ms=10000,
)
seen = set()
for m in kc:
    seen.add(m.value)
    if everything.issubset(seen):
        break
kc.close()
check(everything.issubset(seen), f"kafka-python read every acknowledged record ({len(everything - seen)} missing)")


async def aio_consume():
    cons = AIOKafkaConsumer(
        TOPIC,
        bootstrap_servers=nodes,
        group_id="fo-aio-" + uuid.uuid4().hex[:6],
        auto_offset_reset="earliest",
    )
    await cons.start()
    got = set()
    try:
        end = time.time() + 60
        while not everything.issubset(got) and time.time() < end:
            batch = await cons.getmany(timeout_ms=1000)
            for msgs in batch.values():
                got.update(m.value for m in msgs)
    finally:
        await cons.stop()
    return got


got = asyncio.run(aio_consume())
check(everything.issubset(got), f"aiokafka read every acknowledged record ({len(everything - got)} missing)")
print(f"acknowledged {len(everything)}", flush=True)
print("all clients ok", flush=True)

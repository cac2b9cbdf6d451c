"""A three-node Fjord cluster seen by confluent-kafka, kafka-python and aiokafka.

Usage: cluster_clients.py BOOTSTRAP1,BOOTSTRAP2,BOOTSTRAP3
Each client connects through one node, sees the three brokers, and a topic with replication
factor 3 shows three replicas on three nodes; records produced through one client are read back
by a consumer group of another. Exits non-zero on the first failed check.
"""
import asyncio
import sys
import time
import uuid

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

nodes = sys.argv[1].split(",")


def check(cond, what):
    if not cond:
        print("FAILED:", what, flush=True)
        sys.exit(1)
    print("ok:", what, flush=True)


# confluent-kafka: three brokers, RF 3 placement.
admin = AdminClient({"bootstrap.servers": nodes[0]})
md = admin.list_topics(timeout=10)
check(sorted(md.brokers) == [1, 2, 3], f"confluent-kafka sees brokers {sorted(md.brokers)}")
for f in admin.create_topics([NewTopic("py-rf3", 3, 3)]).values():
    f.result(15)
md = admin.list_topics(topic="py-rf3", timeout=10)
parts = md.topics["py-rf3"].partitions
check(len(parts) == 3, "py-rf3 has 3 partitions")
for p in parts.values():
    check(sorted(p.replicas) == [1, 2, 3], f"partition {p.id} replicas {p.replicas}")
    check(sorted(p.isrs) == [1, 2, 3], f"partition {p.id} in-sync replicas {p.isrs}")

# kafka-python through the second node: cluster view, produce, group consume.
ka = KafkaAdminClient(bootstrap_servers=nodes[1])
desc = ka.describe_cluster()
ids = sorted(b["broker_id"] for b in desc["brokers"])
check(ids == [1, 2, 3], f"kafka-python describe_cluster brokers {ids}")
kp = KafkaProducer(bootstrap_servers=nodes[1], acks="all")
for i in range(300):
    kp.send("py-rf3", key=f"k{i}".encode(), value=f"kp{i}".encode())
kp.flush(30)
kp.close()

group = "py-group-" + uuid.uuid4().hex[:6]
c = Consumer(
    {
        "bootstrap.servers": nodes[2],
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    }
)
c.subscribe(["py-rf3"])
seen = set()
deadline = time.time() + 60
while len(seen) < 300 and time.time() < deadline:
    m = c.poll(0.5)
    if m is not None and not m.error():
        seen.add(m.value())
c.commit(asynchronous=False)
c.close()
check(len(seen) == 300, f"confluent-kafka group consumed {len(seen)} of 300")

# The group's committed offsets hold for kafka-python in the same group.
p = Producer({"bootstrap.servers": nodes[0]})
for i in range(50):
    p.produce("py-rf3", key=f"n{i}".encode(), value=f"new{i}".encode())
p.flush(30)
kc = KafkaConsumer(
    "py-rf3",
    bootstrap_servers=nodes[0],
    group_id=group,
    auto_offset_reset="earliest",
    enable_auto_commit=False,
    consumer_timeout_ms=8000,
)
got = set()
for m in kc:
    got.add(m.value)
    if len(got) >= 50:
        break
kc.close()
check(got == {f"new{i}".encode() for i in range(50)}, f"kafka-python resumed at the commit ({len(got)})")


async def aio():
    prod = AIOKafkaProducer(bootstrap_servers=nodes[2], acks="all")
    await prod.start()
    for i in range(100):
        await prod.send_and_wait("py-rf3", f"aio{i}".encode(), key=f"a{i}".encode())
    await prod.stop()
    cons = AIOKafkaConsumer(
        "py-rf3",
        bootstrap_servers=nodes[1],
        group_id="aio-" + uuid.uuid4().hex[:6],
        auto_offset_reset="earliest",
    )
    await cons.start()
    n = 0
    try:
        end = time.time() + 60
        while n < 450 and time.time() < end:
            batch = await cons.getmany(timeout_ms=1000)
            n += sum(len(v) for v in batch.values())
    finally:
        await cons.stop()
    return n


n = asyncio.run(aio())
check(n == 450, f"aiokafka group consumed {n} of 450")
print("all clients ok", flush=True)

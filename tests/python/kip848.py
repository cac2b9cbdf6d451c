#!/usr/bin/env python3
"""KIP-848 check with confluent-kafka (bundled librdkafka 2.16): two consumers with
group.protocol=consumer split a 6-partition topic 3/3, consume every record once, the group is
described through ConsumerGroupDescribe, one leaves and the other gets all 6.

Usage: kip848.py BOOTSTRAP   (exit 0: pass; 1: failure; 2: confluent_kafka missing)
"""

import sys
import time

try:
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic
except ImportError as e:
    print(f"missing module: {e}", file=sys.stderr)
    sys.exit(2)

boot = sys.argv[1]
topic, group = "kip848-py", "kip848-py-group"
admin = AdminClient({"bootstrap.servers": boot})
for f in admin.create_topics([NewTopic(topic, 6, 1)]).values():
    f.result(30)


def consumer(name):
    c = Consumer({
        "bootstrap.servers": boot, "group.id": group, "group.protocol": "consumer",
        "client.id": name, "auto.offset.reset": "earliest", "enable.auto.commit": False,
    })
    c.subscribe([topic])
    return c


def parts(c):
    return {tp.partition for tp in c.assignment()}


def poll_until(cs, cond, what, seen, timeout=60):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise SystemExit(f"FAIL: timed out waiting for {what}: {[parts(c) for c in cs]}")
        for i, c in enumerate(cs):
            m = c.poll(0.05)
            if m is None:
                continue
            if m.error():
                raise SystemExit(f"FAIL: consumer error {m.error()}")
            seen.append((i, m.partition(), m.offset()))


a, b = consumer("py-a"), consumer("py-b")
seen = []
poll_until([a, b], lambda: len(parts(a)) == 3 and len(parts(b)) == 3, "3/3 split", seen)
pa, pb = parts(a), parts(b)
assert pa.isdisjoint(pb) and pa | pb == set(range(6)), (pa, pb)
print(f"split: a={sorted(pa)} b={sorted(pb)}")

p = Producer({"bootstrap.servers": boot})
for part in range(6):
    for i in range(100):
        p.produce(topic, f"v{part}-{i}".encode(), partition=part)
p.flush(30)
poll_until([a, b], lambda: len(seen) >= 600, "600 records", seen)
assert len({(q, o) for _, q, o in seen}) == 600 == len(seen), "duplicates"
for who, q, _ in seen:
    assert q in (pa if who == 0 else pb), f"partition {q} read by the wrong member"
a.commit(asynchronous=False)
b.commit(asynchronous=False)
print("consumed 600 once; committed")

desc = admin.describe_consumer_groups([group])[group].result(30)
members = {m.client_id: sorted(tp.partition for tp in m.assignment.topic_partitions) for m in desc.members}
print(f"describe: state={desc.state} type={getattr(desc, 'type', '?')} assignor={desc.partition_assignor} members={members}")
assert members == {"py-a": sorted(pa), "py-b": sorted(pb)}, members

b.close()
poll_until([a], lambda: len(parts(a)) == 6, "a to own all 6", seen)
committed = {tp.partition: tp.offset for tp in a.committed([TopicPartition(topic, q) for q in range(6)], timeout=10)}
assert committed == {q: 100 for q in range(6)}, committed
print("after leave: a owns all 6; committed offsets read back")
listed = admin.list_consumer_groups().result(30)
for g in listed.valid:
    if g.group_id == group:
        print(f"list: {g.group_id} state={g.state} type={getattr(g, 'type', '?')}")
a.close()
print("PASS")

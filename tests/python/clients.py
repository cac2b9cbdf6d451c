#!/usr/bin/env python3
"""Drives a running Fjord broker with the three common Python Kafka clients.

Usage: clients.py BOOTSTRAP  (host:port)

Exits 0 when every check passes; on the first failure prints "FAIL: <what>" to stderr and
exits 1. Exits 2 when a client module is missing (pip install confluent-kafka kafka-python
aiokafka). Every wait has a deadline, so a broker that stops answering fails the run instead
of hanging it.
"""

import asyncio
import sys
import time
import traceback
import uuid

try:
    import confluent_kafka
    from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic
    import kafka
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
    import kafka.errors
    import aiokafka
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
except ImportError as e:  # pragma: no cover - environment problem, not a broker problem
    print(f"MISSING MODULE: {e}. Run: pip install confluent-kafka kafka-python aiokafka", file=sys.stderr)
    sys.exit(2)

BOOT = sys.argv[1]
RUN = uuid.uuid4().hex[:8]


class Fail(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Fail(what)


def step(name):
    print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)


# ---------------------------------------------------------------- confluent-kafka

def ck_create_topic(admin, name, partitions):
    fs = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)], operation_timeout=10)
    for t, f in fs.items():
        f.result(timeout=15)
    md = admin.list_topics(timeout=10)
    check(name in md.topics, f"confluent AdminClient: created topic {name} missing from metadata")
    check(len(md.topics[name].partitions) == partitions,
          f"confluent: topic {name} has {len(md.topics[name].partitions)} partitions, want {partitions}")
    # Creating it again must fail with TOPIC_ALREADY_EXISTS.
    fs = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    try:
        fs[name].result(timeout=15)
        raise Fail(f"confluent: re-creating {name} succeeded, want TOPIC_ALREADY_EXISTS")
    except confluent_kafka.KafkaException as e:
        check(e.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS,
              f"confluent: re-create error is {e.args[0]}, want TOPIC_ALREADY_EXISTS")


def ck_produce(topic, n, conf_extra, tag):
    conf = {"bootstrap.servers": BOOT, "linger.ms": 5, "message.timeout.ms": 20000}
    conf.update(conf_extra)
    p = Producer(conf)
    errors = []
    delivered = []

    def cb(err, msg):
        if err is not None:
            errors.append(err)
        else:
            delivered.append((msg.partition(), msg.offset()))

    for i in range(n):
        p.produce(topic, key=f"{tag}-k{i % 7}", value=f"{tag}-{i}", headers=[("tag", tag.encode())], on_delivery=cb)
        p.poll(0)
    left = p.flush(20)
    check(left == 0, f"confluent producer ({tag}): {left} messages not delivered after 20 s")
    check(not errors, f"confluent producer ({tag}): delivery errors {errors[:3]}")
    check(len(delivered) == n, f"confluent producer ({tag}): {len(delivered)} delivery reports, want {n}")
    check(len(set(delivered)) == n, f"confluent producer ({tag}): duplicate (partition, offset) in delivery reports")


def ck_consume(group, topic, want, deadline_s, commit_every=None, stop_after=None, idle_after_assign=None):
    """Subscribes with a group from earliest; returns the values read. Commits synchronously
    after every `commit_every` messages, and stops after `stop_after` messages (then commits
    and closes). With idle_after_assign, returns that many seconds after the assignment arrives."""
    c = Consumer({
        "bootstrap.servers": BOOT,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "session.timeout.ms": 6000,
    })
    c.subscribe([topic])
    got = []
    deadline = time.time() + deadline_s
    limit = stop_after if stop_after is not None else want
    assigned_at = None
    try:
        while len(got) < limit and time.time() < deadline:
            if idle_after_assign is not None:
                if assigned_at is None and c.assignment():
                    assigned_at = time.time()
                if assigned_at is not None and time.time() > assigned_at + idle_after_assign:
                    break
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise Fail(f"confluent consumer {group}: error {m.error()}")
            got.append(m.value().decode())
            check(m.headers() is not None and ("tag", m.value().decode().split("-")[0].encode()) in m.headers(),
                  f"confluent consumer: header missing on {m.value()!r}: {m.headers()}")
            if commit_every and len(got) % commit_every == 0:
                c.commit(asynchronous=False)
        if got and not (commit_every and len(got) % commit_every == 0):
            c.commit(asynchronous=False)
        check(idle_after_assign is None or assigned_at is not None,
              f"confluent consumer {group}: no assignment within {deadline_s} s")
        committed = c.committed(c.assignment(), timeout=10)
    finally:
        c.close()
    return got, committed


def confluent_checks():
    step("confluent-kafka: AdminClient create topic")
    admin = AdminClient({"bootstrap.servers": BOOT})
    topic = f"ck-{RUN}"
    ck_create_topic(admin, topic, 3)

    step("confluent-kafka: producer (defaults) and producer (enable.idempotence=true)")
    ck_produce(topic, 300, {}, "plain")
    ck_produce(topic, 300, {"enable.idempotence": True, "acks": "all"}, "idem")
    ck_produce(topic, 100, {"compression.type": "zstd"}, "zstd")
    total = 700

    step("confluent-kafka: group consumer reads 400, commits, closes")
    group = f"ckg-{RUN}"
    first, committed = ck_consume(group, topic, total, 60, commit_every=50, stop_after=400)
    check(len(first) == 400, f"confluent: first consumer read {len(first)}, want 400")
    committed_sum = sum(tp.offset for tp in committed if tp.offset >= 0)
    check(committed_sum == 400, f"confluent: committed offsets sum to {committed_sum}, want 400: {committed}")

    step("confluent-kafka: second consumer of the same group resumes after the commit")
    second, _ = ck_consume(group, topic, total - 400, 60)
    check(len(second) == total - 400, f"confluent: second consumer read {len(second)}, want {total - 400}")
    both = first + second
    check(len(set(both)) == total, f"confluent: {len(set(both))} distinct values over both consumers, want {total} "
          f"(overlap {len(set(first) & set(second))})")

    # The group has no members now; a third consumer finds nothing left.
    step("confluent-kafka: third consumer finds nothing new")
    third, _ = ck_consume(group, topic, 1, 20, idle_after_assign=1.5)
    check(third == [], f"confluent: third consumer re-read {len(third)} records: {third[:5]}")

    step("confluent-kafka: incremental_alter_configs, describe_configs, bad values refused")
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource
    res = ConfigResource("topic", topic, incremental_configs=[
        ConfigEntry("retention.ms", "120000", incremental_operation=AlterConfigOpType.SET)])
    for _, f in admin.incremental_alter_configs([res]).items():
        f.result(timeout=15)
    got = {}
    for _, f in admin.describe_configs([ConfigResource("topic", topic)]).items():
        got = {k: v.value for k, v in f.result(timeout=15).items()}
    check(got.get("retention.ms") == "120000", f"confluent: retention.ms after alter is {got.get('retention.ms')}")
    bad = ConfigResource("topic", topic, incremental_configs=[
        ConfigEntry("retention.ms", "soon", incremental_operation=AlterConfigOpType.SET)])
    for _, f in admin.incremental_alter_configs([bad]).items():
        try:
            f.result(timeout=15)
            check(False, "confluent: a bad retention.ms was accepted")
        except confluent_kafka.KafkaException as e:
            code = e.args[0].code()
            check(code == KafkaError.INVALID_CONFIG, f"confluent: bad config gave {e}, want INVALID_CONFIG")

    fs = admin.delete_topics([topic], operation_timeout=10)
    for t, f in fs.items():
        f.result(timeout=15)


def ck_cooperative():
    """cooperative-sticky (KIP-429): a second member takes half the partitions in two
    rebalances without the first member giving up the partitions it keeps; when it leaves,
    the first gets them back."""
    step("confluent-kafka: cooperative-sticky incremental rebalance")
    admin = AdminClient({"bootstrap.servers": BOOT})
    topic, group = f"coop-{RUN}", f"coopg-{RUN}"
    ck_create_topic(admin, topic, 4)

    def member():
        c = Consumer({"bootstrap.servers": BOOT, "group.id": group, "session.timeout.ms": 6000,
                      "heartbeat.interval.ms": 500, "partition.assignment.strategy": "cooperative-sticky"})
        ev = []
        c.subscribe([topic],
                    on_assign=lambda c, ps: ev.append(("+", {p.partition for p in ps})),
                    on_revoke=lambda c, ps: ev.append(("-", {p.partition for p in ps})))
        return c, ev

    def owned(ev):
        s = set()
        for op, ps in ev:
            s = s | ps if op == "+" else s - ps
        return s

    c1, e1 = member()
    deadline = time.time() + 20
    while owned(e1) != {0, 1, 2, 3} and time.time() < deadline:
        c1.poll(0.1)
    check(owned(e1) == {0, 1, 2, 3}, f"cooperative: first member owns {owned(e1)}: {e1}")
    c2, e2 = member()
    deadline = time.time() + 20
    while not (len(owned(e1)) == 2 and len(owned(e2)) == 2) and time.time() < deadline:
        c1.poll(0.05)
        c2.poll(0.05)
    check(len(owned(e1)) == 2 and len(owned(e2)) == 2 and not owned(e1) & owned(e2),
          f"cooperative: after the second joined, owned {owned(e1)} and {owned(e2)}: {e1} / {e2}")
    revoked = set().union(*[ps for op, ps in e1 if op == "-"])
    check(revoked == owned(e2), f"cooperative: first member revoked {revoked}, more than it handed over {owned(e2)}")
    c2.close()
    deadline = time.time() + 15
    while owned(e1) != {0, 1, 2, 3} and time.time() < deadline:
        c1.poll(0.1)
    check(owned(e1) == {0, 1, 2, 3}, f"cooperative: after the second left, first owns {owned(e1)}: {e1}")
    c1.close()


# ---------------------------------------------------------------- kafka-python

def kp_checks():
    topic = f"kp-{RUN}"
    group = f"kpg-{RUN}"
    step("kafka-python: KafkaAdminClient create/list topics")
    admin = KafkaAdminClient(bootstrap_servers=BOOT, request_timeout_ms=15000)
    r = admin.create_topics({topic: {"num_partitions": 2, "replication_factor": 1}})
    check(r["topics"][0]["error_code"] == 0, f"kafka-python: create_topics {r}")
    try:
        admin.create_topics({topic: {"num_partitions": 2, "replication_factor": 1}})
        raise Fail("kafka-python: re-creating a topic succeeded")
    except kafka.errors.TopicAlreadyExistsError:
        pass
    topics = admin.list_topics()
    check(topic in topics, f"kafka-python: list_topics lacks {topic}: {topics}")

    step("kafka-python: KafkaProducer send 200")
    p = KafkaProducer(bootstrap_servers=BOOT, acks="all", linger_ms=5)
    futs = [p.send(topic, key=f"k{i}".encode(), value=f"kp-{i}".encode(), headers=[("h", b"v")]) for i in range(200)]
    p.flush(timeout=20)
    for f in futs:
        md = f.get(timeout=20)
        check(md.offset >= 0, f"kafka-python: bad offset {md}")
    p.close(timeout=10)

    step("kafka-python: KafkaConsumer with group_id reads all, commits")
    c = KafkaConsumer(topic, bootstrap_servers=BOOT, group_id=group, auto_offset_reset="earliest",
                      enable_auto_commit=False, consumer_timeout_ms=1000, session_timeout_ms=6000,
                      heartbeat_interval_ms=1000)
    got = []
    deadline = time.time() + 60
    while len(got) < 200 and time.time() < deadline:
        batch = c.poll(timeout_ms=500)
        for tp, msgs in batch.items():
            for m in msgs:
                got.append(m.value.decode())
                check(m.headers == [("h", b"v")], f"kafka-python: headers {m.headers}")
    check(len(got) == 200 and len(set(got)) == 200, f"kafka-python consumer: {len(got)} records ({len(set(got))} distinct), want 200")
    c.commit()

    step("kafka-python: a second KafkaConsumer joins (rebalance), then leaves")
    c2 = KafkaConsumer(topic, bootstrap_servers=BOOT, group_id=group, auto_offset_reset="earliest",
                       enable_auto_commit=False, session_timeout_ms=6000, heartbeat_interval_ms=500)
    deadline = time.time() + 20
    while not (len(c.assignment()) == 1 and len(c2.assignment()) == 1) and time.time() < deadline:
        c.poll(timeout_ms=100)
        extra = c2.poll(timeout_ms=100)
        check(not extra, f"kafka-python: the second member re-read committed records: {extra}")
    check(len(c.assignment()) == 1 and len(c2.assignment()) == 1 and not c.assignment() & c2.assignment(),
          f"kafka-python: after the join {c.assignment()} / {c2.assignment()}")
    c2.close()
    deadline = time.time() + 15
    while len(c.assignment()) != 2 and time.time() < deadline:
        c.poll(timeout_ms=100)
    check(len(c.assignment()) == 2, f"kafka-python: after the second left, first owns {c.assignment()}")

    step("kafka-python: describe_groups / list_groups / list_group_offsets while the member is in")
    desc = admin.describe_groups([group])
    check(group in desc, f"kafka-python: describe_groups returned {desc}")
    d = desc[group]
    check(d.get("error") is None, f"kafka-python: describe_groups error {d.get('error')}")
    check(d["group_state"] == "Stable", f"kafka-python: group state {d['group_state']}, want Stable")
    check(d["protocol_type"] == "consumer", f"kafka-python: protocol_type {d['protocol_type']}")
    check(len(d["members"]) == 1, f"kafka-python: {len(d['members'])} members, want 1")
    assigned = d["members"][0]["member_assignment"]["assigned_partitions"]
    parts = sorted(p for a in assigned if a["topic"] == topic for p in a["partitions"])
    check(parts == [0, 1], f"kafka-python: member assignment {assigned}, want partitions [0, 1]")
    check(d["members"][0]["member_metadata"]["topics"] == [topic],
          f"kafka-python: member metadata {d['members'][0]['member_metadata']}")
    groups = admin.list_groups()
    mine = [g for g in groups if g["group_id"] == group]
    check(len(mine) == 1 and mine[0]["group_state"] == "Stable" and mine[0]["protocol_type"] == "consumer",
          f"kafka-python: list_groups entry for {group}: {mine}")
    offs = admin.list_group_offsets({group: None})[group]
    total = sum(v.offset for v in offs.values())
    check(total == 200 and len(offs) == 2, f"kafka-python: committed offsets {offs}, want 2 partitions summing to 200")
    c.close()

    desc = admin.describe_groups([group])[group]
    check(desc["group_state"] == "Empty" and desc["members"] == [],
          f"kafka-python: after close group {desc['group_state']} with {len(desc['members'])} members, want Empty/0")

    step("kafka-python: delete topic, list no longer shows it")
    # A closed KafkaConsumer can leave a Metadata request (allow_auto_topic_creation=true for
    # its subscription) queued on the broker behind its long-polling Fetch; processed after the
    # delete, it would rightly auto-create the topic again. Let those drain first.
    time.sleep(1.0)
    r = admin.delete_topics([topic], timeout_ms=15000)
    check(r["topics"][0]["error_code"] == 0, f"kafka-python: delete_topics {r}")
    deadline = time.time() + 10
    while topic in admin.list_topics() and time.time() < deadline:
        time.sleep(0.2)
    check(topic not in admin.list_topics(), f"kafka-python: {topic} still listed after delete_topics")
    admin.close()


# ---------------------------------------------------------------- aiokafka

async def aio_checks():
    topic = f"aio-{RUN}"
    group = f"aiog-{RUN}"
    step("aiokafka: AIOKafkaProducer send_and_wait (auto-created topic)")
    p = AIOKafkaProducer(bootstrap_servers=BOOT, enable_idempotence=True, compression_type="gzip")
    await p.start()
    try:
        offsets = []
        for i in range(50):
            md = await asyncio.wait_for(p.send_and_wait(topic, value=f"aio-{i}".encode(), key=b"same-key"), 20)
            offsets.append(md.offset)
        check(offsets == list(range(offsets[0], offsets[0] + 50)), f"aiokafka: offsets not consecutive on one key: {offsets[:10]}")
        batch = p.create_batch()
        for i in range(50, 100):
            batch.append(key=b"same-key", value=f"aio-{i}".encode(), timestamp=None)
        parts = await p.partitions_for(topic)
        fut = await p.send_batch(batch, topic, partition=sorted(parts)[0])
        await asyncio.wait_for(fut, 20)
    finally:
        await p.stop()

    step("aiokafka: AIOKafkaConsumer in a group reads all 100")
    c = AIOKafkaConsumer(topic, bootstrap_servers=BOOT, group_id=group, auto_offset_reset="earliest",
                         enable_auto_commit=False, session_timeout_ms=6000, heartbeat_interval_ms=1000)
    await c.start()
    got = []
    try:
        deadline = time.time() + 60
        while len(got) < 100 and time.time() < deadline:
            res = await c.getmany(timeout_ms=500)
            for tp, msgs in res.items():
                got.extend(m.value.decode() for m in msgs)
        await c.commit()
        committed = {tp: await c.committed(tp) for tp in c.assignment()}
    finally:
        await c.stop()
    want = [f"aio-{i}" for i in range(100)]
    check(got == want if len(committed) == 1 else sorted(got) == sorted(want),
          f"aiokafka consumer: read {len(got)} records, first {got[:5]}")
    check(sum(committed.values()) == 100, f"aiokafka: committed {committed}, want sum 100")

    step("aiokafka: a new consumer in the same group finds nothing new")
    c = AIOKafkaConsumer(topic, bootstrap_servers=BOOT, group_id=group, auto_offset_reset="earliest",
                         enable_auto_commit=False, session_timeout_ms=6000)
    await c.start()
    try:
        deadline = time.time() + 20
        assigned_at = None
        extra = []
        while time.time() < deadline:
            if assigned_at is None and c.assignment():
                assigned_at = time.time()
            if assigned_at is not None and time.time() > assigned_at + 1.5:
                break
            res = await c.getmany(timeout_ms=300)
            for tp, msgs in res.items():
                extra.extend(m.value for m in msgs)
        check(assigned_at is not None, "aiokafka: second consumer got no assignment within 20 s")
        check(extra == [], f"aiokafka: second consumer re-read {len(extra)} records")
    finally:
        await c.stop()


def main():
    t0 = time.time()
    print(f"confluent-kafka {confluent_kafka.version()[0]} (librdkafka {confluent_kafka.libversion()[0]}), "
          f"kafka-python {kafka.__version__}, aiokafka {aiokafka.__version__}; bootstrap {BOOT}", flush=True)
    try:
        confluent_checks()
        ck_cooperative()
        kp_checks()
        asyncio.run(asyncio.wait_for(aio_checks(), 120))
    except Fail as e:
        print(f"FAIL: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception as e:  # any client exception is a failure too, with its trace
        traceback.print_exc()
        print(f"FAIL: unexpected {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"ALL PYTHON CLIENT CHECKS PASSED in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()

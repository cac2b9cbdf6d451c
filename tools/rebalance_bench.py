#!/usr/bin/env python3
"""Rebalance time of a classic consumer group after a member dies (kill -9).

Usage: rebalance_bench.py --bootstrap 127.0.0.1:PORT [--members 10] [--partitions 100]
           [--session-ms 6000] [--heartbeat-ms 1000] [--runs 3] [--rate 20] [--json]

Against a broker already running on a loopback address (nothing else is accepted), per run:
  1. starts --members member processes (this script with --member: a confluent-kafka consumer,
     one JSON line per event) in a fresh group on one --partitions topic, while a producer
     thread writes --rate records/s to every partition;
  2. waits until every partition is assigned and every partition delivered a record;
  3. kill -9's the member holding partition 0 and measures
     (a) kill -> session timeout expiry: the first DescribeGroups poll (every 20 ms) that shows
         the group out of Stable or without the dead member (the broker's own view), or the
         first survivor revocation if that came earlier (it cannot precede the expiry);
     (b) expiry -> consumed again: every partition assigned to a live member AND a record
         received (by a live member, after the kill) from each of the dead member's partitions.
     Also printed: expiry -> first survivor revocation (learnt by heartbeat), expiry -> all
     partitions assigned, and expiry -> every partition of the new assignment delivering.
Repeats --runs times and prints min/median/max. Every child is killed at the end, even on
failure. Times come from one clock (time.time() in each process on this host).
"""

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time

# ------------------------------------------------------------------------------ member mode


def member_main(boot, group, topic, client_id, session_ms, heartbeat_ms, lifetime_s):
    """One group member: prints assign/revoke/lost events and the first record of each
    partition after each assignment (enough to time a rebalance, little enough output not to
    load the machine)."""
    from confluent_kafka import Consumer, KafkaError

    parent = os.getppid()
    assign_seq = [0]
    seen = set()  # partitions that delivered since the latest assignment

    def emit(**kw):
        kw["t"] = time.time()
        sys.stdout.write(json.dumps(kw) + "\n")
        sys.stdout.flush()

    def parts_of(ps):
        return sorted(p.partition for p in ps if p.topic == topic)

    def on_assign(c, ps):
        assign_seq[0] += 1
        seen.clear()
        emit(ev="assign", a=assign_seq[0], parts=parts_of(ps))

    def on_revoke(c, ps):
        emit(ev="revoke", parts=parts_of(ps))

    def on_lost(c, ps):
        emit(ev="lost", parts=parts_of(ps))

    c = Consumer(
        {
            "bootstrap.servers": boot,
            "group.id": group,
            "client.id": client_id,
            "auto.offset.reset": "latest",
            "enable.auto.commit": True,
            "session.timeout.ms": session_ms,
            "heartbeat.interval.ms": heartbeat_ms,
        }
    )
    c.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost)
    emit(ev="ready")
    deadline = time.time() + lifetime_s
    try:
        # Bounded: the lifetime cap, and the driver's death (re-parenting) ends the loop.
        while time.time() < deadline and os.getppid() == parent:
            m = c.poll(0.05)
            if m is None:
                continue
            if m.error():
                if m.error().code() != KafkaError._PARTITION_EOF:
                    emit(ev="error", what=str(m.error()))
                continue
            if m.topic() == topic and m.partition() not in seen:
                seen.add(m.partition())
                emit(ev="rec", a=assign_seq[0], p=m.partition(), o=m.offset())
    finally:
        c.close()


# ------------------------------------------------------------------------------ driver


class Child:
    """A member process and a thread that turns its stdout lines into queue items."""

    def __init__(self, index, argv, events):
        self.index = index
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1
        )
        self.thread = threading.Thread(target=self._read, args=(events,), daemon=True)
        self.thread.start()

    def _read(self, events):
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            ev["m"] = self.index
            events.put(ev)

    def kill(self):
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


CHILDREN = []


def kill_all():
    for ch in CHILDREN:
        ch.kill()
    CHILDREN.clear()


def on_signal(signum, frame):
    kill_all()
    sys.exit(128 + signum)


def check_loopback(bootstrap):
    for addr in bootstrap.split(","):
        host = addr.rsplit(":", 1)[0].strip("[]")
        if host not in ("127.0.0.1", "localhost", "::1"):
            sys.exit(f"rebalance_bench: {addr} is not a loopback address")


def create_topic(bootstrap, topic, partitions):
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    fut = admin.create_topics([NewTopic(topic, partitions, 1)], operation_timeout=30)[topic]
    try:
        fut.result(timeout=30)
    except Exception as e:  # an existing topic is fine if it has the right partition count
        if "TOPIC_ALREADY_EXISTS" not in str(e):
            raise
    deadline = time.time() + 30
    while time.time() < deadline:
        md = admin.list_topics(topic, timeout=10)
        t = md.topics.get(topic)
        if t is not None and t.error is None and len(t.partitions) == partitions:
            return admin
        time.sleep(0.2)
    raise RuntimeError(f"topic {topic} does not show {partitions} partitions after 30 s")


class Producer(threading.Thread):
    """Writes `rate` records/s to every partition until stopped."""

    def __init__(self, bootstrap, topic, partitions, rate):
        super().__init__(daemon=True)
        from confluent_kafka import Producer as P

        self.p = P({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": 1})
        self.topic, self.partitions, self.rate = topic, partitions, rate
        self.stop = threading.Event()
        self.errors = 0

    def _cb(self, err, msg):
        if err is not None:
            self.errors += 1

    def run(self):
        period = 1.0 / self.rate
        nxt = time.time()
        while not self.stop.is_set():
            for p in range(self.partitions):
                try:
                    self.p.produce(self.topic, b"x", partition=p, on_delivery=self._cb)
                except BufferError:
                    self.p.poll(0.01)
            self.p.poll(0)
            nxt += period
            delay = nxt - time.time()
            if delay > 0:
                self.stop.wait(delay)
            else:
                nxt = time.time()
        self.p.flush(5)


def group_view(admin, group, dead_client):
    """(stable_with_dead_member, state) from one DescribeGroups."""
    from confluent_kafka import ConsumerGroupState

    d = admin.describe_consumer_groups([group], request_timeout=5)[group].result(timeout=5)
    clients = {m.client_id for m in d.members}
    stable = d.state == ConsumerGroupState.STABLE
    return stable and dead_client in clients, str(d.state)


def one_run(args, run_no, admin, topic):
    group = f"rebalance-bench-{os.getpid()}-{int(time.time())}-{run_no}"
    all_parts = set(range(args.partitions))
    events = queue.Queue()
    me = os.path.abspath(__file__)
    for i in range(args.members):
        argv = [
            sys.executable, me, "--member", args.bootstrap, group, topic, f"rb-member-{i}",
            str(args.session_ms), str(args.heartbeat_ms), str(args.member_lifetime_s),
        ]
        CHILDREN.append(Child(i, argv, events))
    children = list(CHILDREN)

    owned = {i: set() for i in range(args.members)}  # member -> current partitions
    assign_seq = {i: 0 for i in range(args.members)}
    delivered = {i: set() for i in range(args.members)}  # since the member's latest assign

    def apply(ev):
        m = ev["m"]
        if ev["ev"] == "assign":
            owned[m] = set(ev["parts"])
            assign_seq[m] = ev["a"]
            delivered[m] = set()
        elif ev["ev"] in ("revoke", "lost"):
            owned[m] -= set(ev["parts"])
        elif ev["ev"] == "rec" and ev["a"] == assign_seq[m]:
            delivered[m].add(ev["p"])

    # 1. Everything assigned, every partition delivering.
    deadline = time.time() + args.setup_timeout_s
    while True:
        if time.time() > deadline:
            raise RuntimeError(f"run {run_no}: group not settled after {args.setup_timeout_s} s")
        try:
            apply(events.get(timeout=0.5))
        except queue.Empty:
            pass
        union = set().union(*owned.values())
        flowing = set().union(*delivered.values())
        if union == all_parts and flowing == all_parts and sum(map(len, owned.values())) == len(all_parts):
            break
    # Let a late event land before choosing the victim.
    time.sleep(1.0)
    while not events.empty():
        apply(events.get_nowait())
    victim = next(m for m in owned if 0 in owned[m])
    dead_parts = set(owned[victim])
    dead_client = f"rb-member-{victim}"
    stable, state = group_view(admin, group, dead_client)
    if not stable:
        raise RuntimeError(f"run {run_no}: group {state} before the kill")

    # 2. kill -9, then poll the broker's view of the group until the member has expired.
    t_kill = time.time()
    os.kill(children[victim].proc.pid, signal.SIGKILL)
    post = []  # events after the kill, for an exact replay by timestamp
    t_prev_poll = t_kill
    t_expire = None
    expire_deadline = t_kill + 5 * args.session_ms / 1000.0
    while t_expire is None:
        if time.time() > expire_deadline:
            raise RuntimeError(f"run {run_no}: dead member not expired after {5 * args.session_ms} ms")
        still, state = group_view(admin, group, dead_client)
        now = time.time()
        if args.trace:
            print(f"trace +{(now - t_kill) * 1000:.1f} ms describe: {state} dead-member-listed={still}", file=sys.stderr)
        if not still:
            t_expire = now
            expire_resolution = now - t_prev_poll
            break
        t_prev_poll = now
        while not events.empty():
            post.append(events.get_nowait())
        time.sleep(0.02)

    # 3. Wait until all partitions are owned by live members and each dead partition has
    # delivered a record to a live member; then replay the events in time order.
    live = [m for m in range(args.members) if m != victim]
    done_deadline = time.time() + args.recover_timeout_s

    def replay(evs):
        own = {m: set(owned[m]) for m in live}
        seq = {m: assign_seq[m] for m in live}
        first_rec = {}  # dead partition -> time of its first record after the kill
        new_assign = {}  # partition -> time it was assigned after the expiry
        newly_delivered = {}  # partition -> first record after that assignment
        t_revoke = t_assigned = t_done = t_all = None
        for ev in sorted(evs, key=lambda e: e["t"]):
            m = ev["m"]
            if m == victim:
                continue
            if ev["ev"] == "assign":
                own[m] = set(ev["parts"])
                seq[m] = ev["a"]
                for p in ev["parts"]:
                    new_assign[p] = ev["t"]
                    newly_delivered.pop(p, None)
            elif ev["ev"] in ("revoke", "lost"):
                own[m] -= set(ev["parts"])
                if t_revoke is None and ev["t"] >= t_kill:
                    t_revoke = ev["t"]
            elif ev["ev"] == "rec" and ev["a"] == seq[m]:
                if ev["p"] in dead_parts and ev["t"] > t_kill:
                    first_rec.setdefault(ev["p"], ev["t"])
                if ev["p"] in new_assign and ev["p"] not in newly_delivered:
                    newly_delivered[ev["p"]] = ev["t"]
            owned_now = set().union(*own.values())
            if t_assigned is None and owned_now == all_parts:
                t_assigned = ev["t"]
            if t_done is None and owned_now == all_parts and set(first_rec) >= dead_parts:
                t_done = ev["t"]
            if (t_all is None and owned_now == all_parts and new_assign
                    and set(newly_delivered) >= set(new_assign)):
                t_all = ev["t"]
        return t_revoke, t_assigned, t_done, t_all

    while True:
        if time.time() > done_deadline:
            raise RuntimeError(f"run {run_no}: not consumed again {args.recover_timeout_s} s after the kill")
        try:
            post.append(events.get(timeout=0.2))
        except queue.Empty:
            pass
        if replay(post)[2] is not None:
            break
    time.sleep(1.0)  # stragglers from other members' pipes
    while not events.empty():
        post.append(events.get_nowait())
    t_revoke, t_assigned, t_done, t_all = replay(post)
    # A survivor revokes only after hearing of the rebalance, so its first revocation also
    # bounds the expiry from above, often more tightly than the 20 ms DescribeGroups poll.
    t_expire_poll = t_expire
    if t_revoke is not None and t_prev_poll <= t_revoke < t_expire:
        t_expire = t_revoke
    if args.trace:
        for ev in sorted(post, key=lambda e: e["t"]):
            if ev["ev"] != "rec" or ev["t"] <= t_done:
                print(f"trace +{(ev['t'] - t_kill) * 1000:.1f} ms member {ev['m']}: {ev['ev']} "
                      f"{ev.get('parts', ev.get('p', ''))}", file=sys.stderr)
    kill_all()

    ms = lambda a, b: None if a is None or b is None else round((b - a) * 1000.0, 1)
    return {
        "run": run_no,
        "group": group,
        "victim_partitions": len(dead_parts),
        "kill_to_expiry_ms": ms(t_kill, t_expire),
        "kill_to_expiry_seen_by_poll_ms": ms(t_kill, t_expire_poll),
        "expiry_poll_resolution_ms": round(expire_resolution * 1000.0, 1),
        "expiry_to_first_revoke_ms": ms(t_expire, t_revoke),
        "expiry_to_all_assigned_ms": ms(t_expire, t_assigned),
        "expiry_to_consumed_ms": ms(t_expire, t_done),
        "expiry_to_all_new_assignments_delivering_ms": ms(t_expire, t_all),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--partitions", type=int, default=100)
    ap.add_argument("--topic", default=None, help="default: rebalance-bench-<pid>")
    ap.add_argument("--session-ms", type=int, default=6000)
    ap.add_argument("--heartbeat-ms", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=20.0, help="records/s written to each partition")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--setup-timeout-s", type=float, default=90.0)
    ap.add_argument("--recover-timeout-s", type=float, default=60.0)
    ap.add_argument("--member-lifetime-s", type=float, default=600.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--trace", action="store_true",
                    help="print every DescribeGroups poll and member event after the kill on stderr")
    args = ap.parse_args()
    check_loopback(args.bootstrap)
    if not (1 <= args.members <= 100 and 1 <= args.partitions <= 10000 and 1 <= args.runs <= 100):
        sys.exit("rebalance_bench: --members 1..100, --partitions 1..10000, --runs 1..100")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    topic = args.topic or f"rebalance-bench-{os.getpid()}"
    producer = None
    results = []
    try:
        admin = create_topic(args.bootstrap, topic, args.partitions)
        producer = Producer(args.bootstrap, topic, args.partitions, args.rate)
        producer.start()
        for r in range(1, args.runs + 1):
            res = one_run(args, r, admin, topic)
            results.append(res)
            if not args.json:
                print(" ".join(f"{k}={v}" for k, v in res.items()), flush=True)
    finally:
        kill_all()
        if producer is not None:
            producer.stop.set()
            producer.join(timeout=10)
    keys = ["kill_to_expiry_ms", "expiry_to_first_revoke_ms", "expiry_to_all_assigned_ms",
            "expiry_to_consumed_ms", "expiry_to_all_new_assignments_delivering_ms"]
    summary = {}
    for k in keys:
        vals = [r[k] for r in results if r[k] is not None]
        if vals:
            summary[k] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}
    if args.json:
        print(json.dumps({"runs": results, "summary": summary, "producer_errors": producer.errors}))
        return
    print(f"\n{len(results)} runs, {args.members} members, {args.partitions} partitions, "
          f"session.timeout.ms={args.session_ms}, heartbeat.interval.ms={args.heartbeat_ms}, "
          f"producer errors {producer.errors}")
    print("| figure (ms) | min | median | max |")
    print("| --- | ---: | ---: | ---: |")
    for k, s in summary.items():
        print(f"| {k} | {s['min']} | {s['median']} | {s['max']} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--member":
        a = sys.argv[2:]
        member_main(a[0], a[1], a[2], a[3], int(a[4]), int(a[5]), float(a[6]))
    else:
        main()

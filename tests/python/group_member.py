#!/usr/bin/env python3
"""One consumer-group member (confluent-kafka) for tests/groups.rs; runs until killed.

Usage: group_member.py BOOTSTRAP GROUP TOPIC [--instance-id ID] [--rate MSGS_PER_S]
                       [--session-ms MS] [--commit-ms MS]

Prints one JSON object per line on stdout, flushed at once, so that the driving test sees every
event of a process it kills -9:
  {"ev":"ready"}                                      consumer created, subscribed
  {"ev":"joined","gen":G,"member":M,"leader":B}       JoinGroup answered (from librdkafka's cgrp log)
  {"ev":"assign","gen":G,"parts":[p,...]}             on_assign
  {"ev":"revoke","gen":G,"parts":[p,...]}             on_revoke (the member stops owning them)
  {"ev":"lost","gen":G,"parts":[p,...]}               on_lost
  {"ev":"msg","gen":G,"p":p,"o":o,"v":value}          a record handed to the application
  {"ev":"error","what":...}                           a consumer error
Offsets are auto-committed every --commit-ms (offsets of records handed out by poll).
"""

import json
import logging
import re
import sys
import time

from confluent_kafka import Consumer, KafkaError

args = sys.argv[1:]
boot, group, topic = args[0], args[1], args[2]
opts = {}
i = 3
while i < len(args):
    opts[args[i]] = args[i + 1]
    i += 2
instance_id = opts.get("--instance-id")
rate = float(opts.get("--rate", "0"))
session_ms = int(opts.get("--session-ms", "6000"))
commit_ms = int(opts.get("--commit-ms", "200"))

state = {"gen": -1, "member": ""}


def emit(**kw):
    kw["t"] = round(time.time(), 3)
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


JOIN_RE = re.compile(r"JoinGroup response: GenerationId (-?\d+), Protocol \S*, LeaderId \S*( \(me\))?, my MemberId (\S+),")


class CgrpLog(logging.Handler):
    def emit(self, record):
        m = JOIN_RE.search(record.getMessage())
        if m and int(m.group(1)) >= 0:
            state["gen"] = int(m.group(1))
            state["member"] = m.group(3)
            emit(ev="joined", gen=state["gen"], member=state["member"], leader=m.group(2) is not None)


log = logging.getLogger("rdkafka")
log.setLevel(logging.DEBUG)
log.propagate = False
log.addHandler(CgrpLog())

conf = {
    "bootstrap.servers": boot,
    "group.id": group,
    "auto.offset.reset": "earliest",
    "enable.auto.commit": True,
    "auto.commit.interval.ms": commit_ms,
    "session.timeout.ms": session_ms,
    "heartbeat.interval.ms": 500,
    "debug": "cgrp",
}
if instance_id:
    conf["group.instance.id"] = instance_id


def parts_of(ps):
    return sorted(p.partition for p in ps if p.topic == topic)


def on_assign(c, ps):
    emit(ev="assign", gen=state["gen"], parts=parts_of(ps))


def on_revoke(c, ps):
    emit(ev="revoke", gen=state["gen"], parts=parts_of(ps))


def on_lost(c, ps):
    emit(ev="lost", gen=state["gen"], parts=parts_of(ps))


c = Consumer(conf, logger=log)
c.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost)
emit(ev="ready", instance=instance_id)
try:
    while True:
        m = c.poll(0.2)
        if m is None:
            continue
        if m.error():
            if m.error().code() != KafkaError._PARTITION_EOF:
                emit(ev="error", what=str(m.error()))
            continue
        emit(ev="msg", gen=state["gen"], p=m.partition(), o=m.offset(), v=m.value().decode())
        if rate > 0:
            time.sleep(1.0 / rate)
except KeyboardInterrupt:
    pass
finally:
    c.close()
    emit(ev="closed")

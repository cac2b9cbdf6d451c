"""Admin behaviour librdkafka's suite (test 0081) expects, through confluent-kafka's AdminClient:

- authorized operations (KIP-430) when asked for: Fjord has no authorizer, so, as Kafka without
  one, every operation of the resource type (cluster 7, topic 8, group 3);
- the topic configs flush.ms / flush.messages accepted by AlterConfigs and
  IncrementalAlterConfigs and reported by DescribeConfigs.

Usage: authorized_ops_and_flush.py BOOTSTRAP. Prints OK on success; any failure raises.
"""

import sys
import time

from confluent_kafka import Consumer, Producer, TopicCollection
from confluent_kafka.admin import (AclOperation, AdminClient, AlterConfigOpType, ConfigEntry,
                                   ConfigResource, NewTopic)

bootstrap = sys.argv[1]
admin = AdminClient({"bootstrap.servers": bootstrap})
T = 30

topic = "authz-flush"
for f in admin.create_topics([NewTopic(topic, 1, 1)]).values():
    f.result(T)

cluster = admin.describe_cluster(include_authorized_operations=True).result(T)
want = {AclOperation.ALTER, AclOperation.ALTER_CONFIGS, AclOperation.CLUSTER_ACTION,
        AclOperation.CREATE, AclOperation.DESCRIBE, AclOperation.DESCRIBE_CONFIGS,
        AclOperation.IDEMPOTENT_WRITE}
assert set(cluster.authorized_operations or []) == want, cluster.authorized_operations
plain = admin.describe_cluster().result(T)
assert not plain.authorized_operations, plain.authorized_operations

desc = admin.describe_topics(TopicCollection([topic]), include_authorized_operations=True)
t = desc[topic].result(T)
want = {AclOperation.ALTER, AclOperation.ALTER_CONFIGS, AclOperation.CREATE,
        AclOperation.DELETE, AclOperation.DESCRIBE, AclOperation.DESCRIBE_CONFIGS,
        AclOperation.READ, AclOperation.WRITE}
assert set(t.authorized_operations or []) == want, t.authorized_operations

# A group to describe: one consumer that joined and got its assignment.
group = "authz-group"
c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
              "auto.offset.reset": "earliest"})
c.subscribe([topic])
deadline = time.monotonic() + 60
while not c.assignment() and time.monotonic() < deadline:
    c.poll(0.2)
assert c.assignment(), "consumer never got an assignment"
g = admin.describe_consumer_groups([group], include_authorized_operations=True)[group].result(T)
assert set(g.authorized_operations or []) == {AclOperation.READ, AclOperation.DESCRIBE,
                                              AclOperation.DELETE}, g.authorized_operations
c.close()

res = ConfigResource(ConfigResource.Type.TOPIC, topic)


def describe(name):
    return admin.describe_configs([res])[res].result(T)[name].value


assert describe("flush.ms") == str(2**63 - 1), describe("flush.ms")
res_set = ConfigResource(ConfigResource.Type.TOPIC, topic, set_config={"flush.ms": "12345678"})
admin.alter_configs([res_set])[res_set].result(T)
assert describe("flush.ms") == "12345678"
inc = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[
    ConfigEntry("flush.messages", "1", incremental_operation=AlterConfigOpType.SET)])
admin.incremental_alter_configs([inc])[inc].result(T)
assert describe("flush.messages") == "1"
bad = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[
    ConfigEntry("flush.messages", "0", incremental_operation=AlterConfigOpType.SET)])
try:
    admin.incremental_alter_configs([bad])[bad].result(T)
    raise AssertionError("flush.messages=0 was accepted")
except Exception as e:  # KafkaException(INVALID_CONFIG)
    assert "INVALID_CONFIG" in str(e) or "nvalid" in str(e), e

# The topic, now written with an fdatasync per write, still takes and serves records.
p = Producer({"bootstrap.servers": bootstrap, "acks": "1"})
for i in range(10):
    p.produce(topic, value=b"v%d" % i)
assert p.flush(T) == 0
c = Consumer({"bootstrap.servers": bootstrap, "group.id": "reader"})
lo, hi = c.get_watermark_offsets(__import__("confluent_kafka").TopicPartition(topic, 0), T)
assert (lo, hi) == (0, 10), (lo, hi)
c.close()
print("OK")

// A three-node Fjord cluster seen by kafkajs: three brokers, a topic with replication factor 3
// placed on three nodes, records produced and read back by a consumer group. Then an idempotent
// acks=all producer keeps writing while the driving test kills the leader of partition 0 (when
// this prints "killing now"), and a new group reads every acknowledged record back once.
// Usage: node cluster.js HOST:PORT,HOST:PORT,HOST:PORT  (kafkajs on NODE_PATH)
const { Kafka, logLevel } = require('kafkajs');

const nodes = process.argv[2].split(',');
function check(cond, what) {
  if (!cond) {
    console.log('FAILED: ' + what);
    process.exit(1);
  }
  console.log('ok: ' + what);
}

async function main() {
  const kafka = new Kafka({ clientId: 'fjord-test', brokers: [nodes[0]], logLevel: logLevel.ERROR });
  const admin = kafka.admin();
  await admin.connect();
  const cluster = await admin.describeCluster();
  const ids = cluster.brokers.map((b) => b.nodeId).sort();
  check(JSON.stringify(ids) === '[1,2,3]', 'kafkajs sees brokers ' + JSON.stringify(ids));
  await admin.createTopics({ topics: [{ topic: 'js-rf3', numPartitions: 3, replicationFactor: 3 }] });
  const md = await admin.fetchTopicMetadata({ topics: ['js-rf3'] });
  const parts = md.topics[0].partitions;
  check(parts.length === 3, 'js-rf3 has 3 partitions');
  for (const p of parts) {
    check(new Set(p.replicas).size === 3, `partition ${p.partitionId} replicas ${p.replicas}`);
  }
  await admin.disconnect();

  const producer = kafka.producer();
  await producer.connect();
  const messages = [];
  for (let i = 0; i < 200; i++) messages.push({ key: 'k' + i, value: 'js' + i });
  await producer.send({ topic: 'js-rf3', acks: -1, messages });
  await producer.disconnect();

  const other = new Kafka({ clientId: 'fjord-test-c', brokers: [nodes[1]], logLevel: logLevel.ERROR });
  const consumer = other.consumer({ groupId: 'js-group', sessionTimeout: 10000 });
  await consumer.connect();
  await consumer.subscribe({ topic: 'js-rf3', fromBeginning: true });
  const seen = new Set();
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('only ' + seen.size + ' of 200 consumed')), 60000);
    consumer.run({
      eachMessage: async ({ message }) => {
        seen.add(message.value.toString());
        if (seen.size >= 200) {
          clearTimeout(timer);
          resolve();
        }
      },
    });
  });
  await consumer.disconnect();
  check(seen.size === 200, 'kafkajs group consumed 200');

  // The failover: every node as bootstrap, an idempotent producer writing through the kill.
  const all = new Kafka({ clientId: 'fjord-test-f', brokers: nodes, logLevel: logLevel.NOTHING });
  const idem = all.producer({ idempotent: true, maxInFlightRequests: 1 });
  await idem.connect();
  const acked = new Set();
  let announced = false;
  let endAt = 0;
  for (let i = 0; ; i++) {
    // One partition per send: kafkajs 2.2.4 resolves a send that spans several leaders
    // without the messages of a partition whose leader moved to a broker that had already
    // answered that send (kafkajs issue #1303, a client bug), which would look like loss here.
    const batch = [];
    for (let j = 0; j < 10; j++) batch.push({ partition: i % 3, value: 'fo' + (i * 10 + j) });
    const res = await idem.send({ topic: 'js-rf3', acks: -1, messages: batch });
    if (res.length !== 1 || res[0].errorCode !== 0) throw new Error('send answered ' + JSON.stringify(res));
    for (const m of batch) acked.add(m.value);
    if (!announced && acked.size >= 500) {
      console.log('killing now');
      announced = true;
      endAt = Date.now() + 6000;
    }
    if (announced && Date.now() >= endAt) break;
  }
  await idem.disconnect();
  check(acked.size > 500, `kafkajs idempotent acks=all wrote ${acked.size} through the kill`);
  const reader = all.consumer({ groupId: 'js-after-' + Date.now(), sessionTimeout: 10000 });
  await reader.connect();
  await reader.subscribe({ topic: 'js-rf3', fromBeginning: true });
  const counts = new Map();
  const where = new Map();
  const missingNow = () => [...acked].filter((v) => !counts.has(v));
  await new Promise((resolve, reject) => {
    const timer = setTimeout(
      () =>
        reject(
          new Error(
            'read ' + counts.size + ' of ' + acked.size + '; missing ' + JSON.stringify(missingNow().slice(0, 20)) +
              '; read up to ' + JSON.stringify([...where.entries()]),
          ),
        ),
      90000,
    );
    reader.run({
      eachMessage: async ({ partition, message }) => {
        const v = message.value.toString();
        where.set(partition, message.offset);
        if (!v.startsWith('fo')) return;
        counts.set(v, (counts.get(v) || 0) + 1);
        if (counts.size >= acked.size) {
          clearTimeout(timer);
          resolve();
        }
      },
    });
  });
  await reader.disconnect();
  const missing = [...acked].filter((v) => !counts.has(v)).length;
  const twice = [...counts.values()].filter((n) => n !== 1).length;
  check(missing === 0 && twice === 0, `every acknowledged record once (${missing} missing, ${twice} twice)`);
}

main().then(
  () => process.exit(0),
  (e) => {
    console.log('FAILED: ' + e);
    process.exit(1);
  },
);

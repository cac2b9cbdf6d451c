// A three-node Fjord cluster seen by kafkajs: three brokers, a topic with replication factor 3
// placed on three nodes, records produced and read back by a consumer group.
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
}

main().then(
  () => process.exit(0),
  (e) => {
    console.log('FAILED: ' + e);
    process.exit(1);
  },
);

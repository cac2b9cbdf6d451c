//! A cluster of real `fjord serve` processes on loopback: three controller voters and a
//! broker-only node, driven with librdkafka (the `rdkafka` crate) and `fjord cluster status`.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, Broker};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// Short sessions so that fencing is seen within a test's patience.
const SESSION_MS: &str = "node.broker_session_timeout_ms=3000";
const HEARTBEAT_MS: &str = "node.broker_heartbeat_interval_ms=500";

struct Cluster {
    nodes: Vec<(i32, Broker)>,
    voters: String,
    _slot: Slot,
}

/// At most this many clusters run at once: each is three or four brokers, and a loaded
/// 2-core machine turns timing margins into flakes.
const CLUSTERS_AT_ONCE: usize = 4;
static RUNNING: std::sync::Mutex<usize> = std::sync::Mutex::new(0);
static FREED: std::sync::Condvar = std::sync::Condvar::new();

struct Slot;

impl Slot {
    fn take() -> Slot {
        let mut n = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        while *n >= CLUSTERS_AT_ONCE {
            n = FREED.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *RUNNING.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        FREED.notify_one();
    }
}

impl Cluster {
    /// `voters` controller voters (ids 1..=voters) and `brokers` broker-only nodes after them;
    /// node i gets rack "r{i % 2}".
    fn start(voters: i32, brokers: i32) -> Cluster {
        let slot = Slot::take();
        let list: Vec<String> = (1..=voters)
            .map(|id| format!("{id}@127.0.0.1:{}", free_port()))
            .collect();
        let voters_arg = list.join(",");
        let mut nodes = Vec::new();
        for id in 1..=voters + brokers {
            nodes.push((id, Cluster::spawn(id, &voters_arg, None)));
        }
        Cluster {
            nodes,
            voters: voters_arg,
            _slot: slot,
        }
    }

    /// Like `start`, with extra `--set key=value` settings on every node.
    fn start_with(voters: i32, brokers: i32, settings: &[&str]) -> Cluster {
        let slot = Slot::take();
        let list: Vec<String> = (1..=voters)
            .map(|id| format!("{id}@127.0.0.1:{}", free_port()))
            .collect();
        let voters_arg = list.join(",");
        let mut nodes = Vec::new();
        for id in 1..=voters + brokers {
            nodes.push((id, Cluster::spawn_with(id, &voters_arg, None, settings)));
        }
        Cluster {
            nodes,
            voters: voters_arg,
            _slot: slot,
        }
    }

    fn spawn(id: i32, voters: &str, data: Option<std::path::PathBuf>) -> Broker {
        Cluster::spawn_with(id, voters, data, &[])
    }

    fn spawn_with(
        id: i32,
        voters: &str,
        data: Option<std::path::PathBuf>,
        settings: &[&str],
    ) -> Broker {
        let id_s = id.to_string();
        let rack = format!("r{}", id % 2);
        let mut args = vec![
            "--node-id",
            &id_s,
            "--controllers",
            voters,
            "--rack",
            &rack,
            // One shard each, pinned to core 0: several nodes share a host.
            "--cpus",
            "0",
            "--overprovisioned",
            "--set",
            SESSION_MS,
            "--set",
            HEARTBEAT_MS,
        ];
        for kv in settings {
            args.push("--set");
            args.push(kv);
        }
        Broker::start_in(data, &args)
    }

    /// Starts node `id` again on its own data (its old process is dead or is killed here),
    /// keeping its files, with `settings` as extra `--set`s.
    fn restart(&mut self, id: i32, settings: &[&str]) {
        let data = self.node(id).data().to_path_buf();
        let voters = self.voters.clone();
        self.node_mut(id).kill9();
        let mut b = Cluster::spawn_with(id, &voters, Some(data), settings);
        b.adopt_files_of(self.node_mut(id));
        *self.node_mut(id) = b;
    }

    fn node(&self, id: i32) -> &Broker {
        &self.nodes.iter().find(|(i, _)| *i == id).expect("node").1
    }

    fn node_mut(&mut self, id: i32) -> &mut Broker {
        &mut self
            .nodes
            .iter_mut()
            .find(|(i, _)| *i == id)
            .expect("node")
            .1
    }

    fn status(&self, via: i32) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_fjord"))
            .args(["cluster", "status", "--bootstrap"])
            .arg(self.node(via).bootstrap())
            .output()
            .expect("run fjord cluster status");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// The active controller, as `fjord cluster status` reports it.
    fn active_controller(&self, via: i32) -> Option<i32> {
        let s = self.status(via);
        let line = s
            .lines()
            .find(|l| l.starts_with("active controller: node "))?;
        line["active controller: node ".len()..]
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}

fn admin(bootstrap: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin")
}

/// A partition as librdkafka sees it: (leader, replicas, isr).
type PartitionView = (i32, Vec<i32>, Vec<i32>);

/// Broker ids and, per partition of `topic`, its view.
fn metadata(bootstrap: &str, topic: Option<&str>) -> (BTreeSet<i32>, Vec<PartitionView>) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("consumer");
    let Ok(md) = c.fetch_metadata(topic, Duration::from_secs(5)) else {
        return (BTreeSet::new(), Vec::new());
    };
    let brokers = md.brokers().iter().map(|b| b.id()).collect();
    let parts = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter())
        .map(|p| (p.leader(), p.replicas().to_vec(), p.isr().to_vec()))
        .collect();
    (brokers, parts)
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn create_topic(bootstrap: &str, name: &str, partitions: i32, rf: i32) {
    let a = admin(bootstrap);
    let t = NewTopic::new(name, partitions, TopicReplication::Fixed(rf));
    let r = futures::executor::block_on(a.create_topics(
        &[t],
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
    ))
    .expect("create_topics");
    for x in r {
        x.expect("topic created");
    }
}

fn produce(bootstrap: &str, topic: &str, n: usize) {
    produce_from(bootstrap, topic, 0, n)
}

fn produce_from(bootstrap: &str, topic: &str, start: usize, n: usize) {
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer");
    for i in start..start + n {
        let key = format!("k{i}");
        let value = format!("v{i}");
        p.send(BaseRecord::to(topic).key(&key).payload(&value))
            .expect("enqueue");
    }
    p.flush(Duration::from_secs(30))
        .expect("every record acknowledged");
}

fn consume_count(bootstrap: &str, topic: &str, partitions: i32, expected: usize) -> usize {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "cluster-assign-only")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    c.assign(&tpl).expect("assign");
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < expected && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            seen.insert(m.payload().map(|p| p.to_vec()).unwrap_or_default());
        }
    }
    seen.len()
}

#[test]
fn three_voters_and_a_broker_form_a_cluster_that_survives_losing_its_controller() {
    let mut cl = Cluster::start(3, 1);
    let all: BTreeSet<i32> = [1, 2, 3, 4].into();
    let boot = cl.node(4).bootstrap();
    wait_for(
        "every node registered and unfenced",
        Duration::from_secs(30),
        || (metadata(&boot, None).0 == all).then_some(()),
    );
    let status = cl.status(1);
    assert!(status.contains("cluster id: "), "{status}");
    for id in 1..=4 {
        assert!(
            status.contains(&format!("  {id:<6} 127.0.0.1:")),
            "node {id} missing from\n{status}"
        );
    }
    // One shard each, unfenced.
    assert_eq!(
        status
            .lines()
            .filter(|l| l.ends_with(" 1        unfenced"))
            .count(),
        4,
        "{status}"
    );

    // Replication factor 3: three distinct replicas per partition, spread over the nodes.
    create_topic(&cl.node(2).bootstrap(), "orders", 6, 3);
    let (_, parts) = metadata(&boot, Some("orders"));
    assert_eq!(parts.len(), 6);
    let mut leaders = BTreeSet::new();
    for (leader, replicas, isr) in &parts {
        let distinct: BTreeSet<i32> = replicas.iter().copied().collect();
        assert_eq!(distinct.len(), 3, "replicas {replicas:?}");
        assert!(distinct.is_subset(&all));
        // Followers replicate: every replica of a new partition is in sync.
        let in_sync: BTreeSet<i32> = isr.iter().copied().collect();
        assert_eq!(in_sync, distinct, "isr {isr:?}");
        assert_eq!(replicas[0], *leader);
        leaders.insert(*leader);
    }
    assert!(leaders.len() >= 3, "leaders spread over nodes: {leaders:?}");
    let rf4 = {
        let a = admin(&boot);
        let t = NewTopic::new("too-many", 1, TopicReplication::Fixed(5));
        futures::executor::block_on(a.create_topics(&[t], &AdminOptions::new()))
            .expect("create_topics")
    };
    assert!(
        matches!(
            &rf4[0],
            Err((
                _,
                rdkafka::types::RDKafkaErrorCode::InvalidReplicationFactor
            ))
        ),
        "{rf4:?}"
    );

    // Clients reach every leader through any node.
    produce(&boot, "orders", 300);
    assert_eq!(
        consume_count(&cl.node(1).bootstrap(), "orders", 6, 300),
        300
    );

    // kill -9 the active controller: another voter takes over and metadata changes go on.
    let active = wait_for("an active controller", Duration::from_secs(20), || {
        cl.active_controller(4)
    });
    cl.node_mut(active).kill9();
    let survivor = if active == 1 { 2 } else { 1 };
    let sb = cl.node(survivor).bootstrap();
    create_topic(&sb, "after-failover", 2, 2);
    let (_, parts) = metadata(&sb, Some("after-failover"));
    assert_eq!(parts.len(), 2);
    let new_active = wait_for("a new active controller", Duration::from_secs(20), || {
        cl.active_controller(survivor).filter(|a| *a != active)
    });
    assert_ne!(new_active, active);

    // The killed node misses its session timeout: fenced, gone from Metadata, and it leads
    // nothing any more.
    wait_for("the dead node fenced", Duration::from_secs(20), || {
        let (brokers, parts) = metadata(&sb, Some("orders"));
        (!brokers.contains(&active) && brokers.len() == 3 && parts.iter().all(|p| p.0 != active))
            .then_some(())
    });
    let status = cl.status(survivor);
    assert!(
        status.contains("fenced") && status.contains(&format!("node {new_active}")),
        "{status}"
    );

    // Restarted with the same data dir, it registers again and is unfenced.
    cl.restart(active, &[]);
    wait_for("the restarted node back", Duration::from_secs(90), || {
        (metadata(&sb, None).0 == all).then_some(())
    });
}

#[test]
fn a_live_node_id_is_refused_to_a_second_process_and_a_restart_is_accepted() {
    let mut cl = Cluster::start(1, 1);
    let boot = cl.node(1).bootstrap();
    let both: BTreeSet<i32> = [1, 2].into();
    wait_for("both nodes registered", Duration::from_secs(30), || {
        (metadata(&boot, None).0 == both).then_some(())
    });

    // Another process, another data dir, the same node id as the live node 2.
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_fjord"))
        .args([
            "serve",
            "--node-id",
            "2",
            "--cores",
            "1",
            "--overprovisioned",
        ])
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--controllers")
        .arg(&cl.voters)
        .output()
        .expect("run a duplicate");
    assert!(!out.status.success(), "the duplicate must exit non-zero");
    assert!(started.elapsed() < Duration::from_secs(30));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("registered by another live process"), "{log}");
    assert_eq!(
        metadata(&boot, None).0,
        both,
        "the first keeps its registration"
    );

    // The same node restarted on its data dir is accepted at once, within its old session.
    let restarted = Instant::now();
    let before = cl
        .node(2)
        .log()
        .matches("registered with the controller")
        .count();
    cl.node_mut(2).restart();
    wait_for("the restart registered", Duration::from_secs(10), || {
        (cl.node(2)
            .log()
            .matches("registered with the controller")
            .count()
            > before)
            .then_some(())
    });
    assert!(restarted.elapsed() < Duration::from_secs(10));

    // A data dir belongs to one node id.
    let data = cl.node(2).data().to_path_buf();
    cl.node_mut(2).kill9();
    let out = Command::new(env!("CARGO_BIN_EXE_fjord"))
        .args([
            "serve",
            "--node-id",
            "7",
            "--cores",
            "1",
            "--overprovisioned",
        ])
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--data-dir")
        .arg(&data)
        .arg("--controllers")
        .arg(&cl.voters)
        .output()
        .expect("run with a foreign data dir");
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("belongs to node 2"), "{log}");
}

#[test]
fn sigterm_moves_leadership_away_before_the_node_exits() {
    let mut cl = Cluster::start(3, 0);
    let all: BTreeSet<i32> = [1, 2, 3].into();
    let boot = cl.node(1).bootstrap();
    wait_registered(&boot, &all);
    create_topic(&boot, "spread", 6, 3);
    let (_, parts) = metadata(&boot, Some("spread"));
    assert!(
        parts.iter().any(|p| p.0 == 3),
        "node 3 leads something: {parts:?}"
    );
    let status = cl.node_mut(3).stop();
    assert!(status.success(), "clean exit on SIGTERM");
    let log = cl.node(3).log();
    assert!(
        log.contains("controlled shutdown: the controller moved"),
        "{log}"
    );
    // Right after the exit (well within a session timeout), node 3 leads nothing.
    let (_, parts) = metadata(&boot, Some("spread"));
    assert!(parts.iter().all(|p| p.0 != 3), "{parts:?}");
}

/// Waits until the brokers `via` lists are exactly `ids`.
fn wait_registered(via: &str, ids: &BTreeSet<i32>) {
    wait_for("every node registered", Duration::from_secs(30), || {
        (metadata(via, None).0 == *ids).then_some(())
    });
}

/// The `__consumer_offsets` partition of `group`: Kafka's rule, the group id's Java hash
/// modulo the partition count.
fn offsets_partition_of(group: &str, partitions: usize) -> usize {
    let hash = group
        .chars()
        .fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(c as i32));
    (hash & 0x7fff_ffff) as usize % partitions
}

/// Waits until every partition of `topic` has a leader other than `dead`.
fn wait_led_without(via: &str, topic: &str, dead: i32) {
    wait_for(
        &format!("every {topic} partition led by a live node"),
        Duration::from_secs(30),
        || {
            let (_, parts) = metadata(via, Some(topic));
            parts.iter().all(|p| p.0 > 0 && p.0 != dead).then_some(())
        },
    );
}

/// Consumes from `topic` in `group` (subscribe, so the group coordinator assigns) until
/// `expected` distinct values arrived or nothing came for a while; commits what it read.
fn group_consume(bootstrap: &str, group: &str, topic: &str, expected: usize) -> BTreeSet<Vec<u8>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    c.subscribe(&[topic]).expect("subscribe");
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                seen.insert(m.payload().map(|p| p.to_vec()).unwrap_or_default());
                quiet_since = Instant::now();
            }
            _ => {
                if seen.len() >= expected && quiet_since.elapsed() > Duration::from_secs(2) {
                    break;
                }
            }
        }
    }
    c.commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
        .expect("commit");
    seen
}

#[test]
fn consumer_groups_work_across_the_cluster_with_offsets_replicated_three_ways() {
    let cl = Cluster::start(3, 0);
    let all: BTreeSet<i32> = [1, 2, 3].into();
    let boot = cl.node(2).bootstrap();
    wait_registered(&boot, &all);
    create_topic(&boot, "events", 4, 3);
    produce(&boot, "events", 200);
    let first = group_consume(&cl.node(1).bootstrap(), "g1", "events", 200);
    assert_eq!(first.len(), 200);
    // The offsets topic was created through the controller with three replicas.
    let (_, parts) = metadata(&boot, Some("__consumer_offsets"));
    assert_eq!(parts.len(), 50);
    assert!(parts.iter().all(|p| p.1.len() == 3), "{parts:?}");
    // Committed offsets hold: the same group, through another node, gets only what is new.
    produce_from(&boot, "events", 200, 50);
    let second = group_consume(&cl.node(3).bootstrap(), "g1", "events", 50);
    assert_eq!(second.len(), 50, "only the records after the commit");
    assert!(second.is_disjoint(&first));
    // The coordinator's node dies: the group's offsets partition (Kafka's rule: the group
    // id's Java hash modulo the partition count) gets a new leader, which loads the group
    // from the replicated log and still knows the commits.
    let offsets_partition = offsets_partition_of("g1", parts.len());
    let (_, parts) = metadata(&boot, Some("__consumer_offsets"));
    let coordinator = parts[offsets_partition].0;
    assert!(coordinator > 0, "{parts:?}");
    let mut cl = cl;
    cl.node_mut(coordinator).kill9();
    let survivor = *all.iter().find(|n| **n != coordinator).unwrap();
    let sb = cl.node(survivor).bootstrap();
    wait_for("a new coordinator", Duration::from_secs(30), || {
        let (_, parts) = metadata(&sb, Some("__consumer_offsets"));
        parts
            .get(offsets_partition)
            .filter(|p| p.0 > 0 && p.0 != coordinator)
            .map(|_| ())
    });
    wait_led_without(&sb, "events", coordinator);
    produce_from(&sb, "events", 250, 30);
    let third = group_consume(&sb, "g1", "events", 30);
    assert_eq!(
        third.len(),
        30,
        "after the coordinator's death, only the records after the last commit"
    );
    assert!(third.is_disjoint(&first) && third.is_disjoint(&second));
}

#[test]
fn partitions_and_configs_change_through_any_node() {
    use rdkafka::admin::{AlterConfig, NewPartitions, ResourceSpecifier};
    let cl = Cluster::start(3, 0);
    let all: BTreeSet<i32> = [1, 2, 3].into();
    let boot = cl.node(1).bootstrap();
    wait_registered(&boot, &all);
    create_topic(&boot, "grow", 2, 2);
    let a = admin(&cl.node(2).bootstrap());
    let opts = AdminOptions::new();
    let r =
        futures::executor::block_on(a.create_partitions(&[NewPartitions::new("grow", 5)], &opts))
            .expect("create_partitions");
    r[0].as_ref().expect("grown");
    // Seen at once through a third node, the new partitions placed like the first ones.
    let (_, parts) = metadata(&cl.node(3).bootstrap(), Some("grow"));
    assert_eq!(parts.len(), 5);
    assert!(parts.iter().all(|p| p.1.len() == 2), "{parts:?}");
    let r =
        futures::executor::block_on(a.create_partitions(&[NewPartitions::new("grow", 3)], &opts))
            .expect("create_partitions");
    assert!(r[0].is_err(), "shrinking is refused");

    let r = futures::executor::block_on(a.alter_configs(
        &[AlterConfig::new(ResourceSpecifier::Topic("grow")).set("retention.ms", "120000")],
        &opts,
    ))
    .expect("alter_configs");
    r[0].as_ref().expect("altered");
    let other = admin(&cl.node(3).bootstrap());
    let d = futures::executor::block_on(
        other.describe_configs(&[ResourceSpecifier::Topic("grow")], &opts),
    )
    .expect("describe_configs");
    let res = d[0].as_ref().expect("described");
    assert_eq!(
        res.get("retention.ms")
            .and_then(|e| e.value.clone())
            .as_deref(),
        Some("120000")
    );
    // An invalid value changes nothing (librdkafka does not surface the per-resource error).
    let _ = futures::executor::block_on(a.alter_configs(
        &[AlterConfig::new(ResourceSpecifier::Topic("grow")).set("retention.ms", "soon")],
        &opts,
    ));
    let d = futures::executor::block_on(
        other.describe_configs(&[ResourceSpecifier::Topic("grow")], &opts),
    )
    .expect("describe_configs");
    let res = d[0].as_ref().expect("described");
    assert_eq!(
        res.get("retention.ms")
            .and_then(|e| e.value.clone())
            .as_deref(),
        Some("120000")
    );
}

/// A TCP proxy the test can cut: while cut, it closes what it carries and refuses new
/// connections (a network partition between two nodes).
struct Proxy {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    fn start(target: std::net::SocketAddr) -> Proxy {
        use std::sync::atomic::Ordering;
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = l.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let c = cut.clone();
        std::thread::spawn(move || {
            for inbound in l.incoming() {
                let Ok(inbound) = inbound else { continue };
                if c.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(outbound) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                    (outbound, inbound),
                ] {
                    let c = c.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            if c.load(Ordering::SeqCst) {
                                break;
                            }
                            match from.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e)
                                    if e.kind() == std::io::ErrorKind::WouldBlock
                                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                                Err(_) => break,
                            }
                        }
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, cut }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_partitioned_voter_loses_the_quorum_and_catches_up_after_the_heal() {
    // Node i reaches voter j through a proxy of its own (i -> j), so the test can cut node 3
    // off from the others while clients still reach every node directly.
    let slot = Slot::take();
    let real: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut proxies = Vec::new();
    let mut lists = Vec::new();
    for i in 1..=3 {
        let mut list = Vec::new();
        for j in 1..=3 {
            if i == j {
                list.push(format!("{j}@127.0.0.1:{}", real[j as usize - 1]));
            } else {
                let target = format!("127.0.0.1:{}", real[j as usize - 1])
                    .parse()
                    .unwrap();
                let p = Proxy::start(target);
                list.push(format!("{j}@127.0.0.1:{}", p.port));
                proxies.push(((i, j), p));
            }
        }
        lists.push(list.join(","));
    }
    let nodes: Vec<(i32, Broker)> = (1..=3)
        .map(|i| (i, Cluster::spawn(i, &lists[i as usize - 1], None)))
        .collect();
    let cl = Cluster {
        nodes,
        voters: String::new(),
        _slot: slot,
    };
    let all: BTreeSet<i32> = [1, 2, 3].into();
    wait_for("every node registered", Duration::from_secs(30), || {
        (metadata(&cl.node(1).bootstrap(), None).0 == all).then_some(())
    });
    create_topic(&cl.node(3).bootstrap(), "before-cut", 3, 1);

    // Cut node 3 off from nodes 1 and 2.
    for ((i, j), p) in &proxies {
        if *i == 3 || *j == 3 {
            p.set_cut(true);
        }
    }
    // The majority side elects (or keeps) a controller and commits without node 3.
    wait_for(
        "a controller on the majority side",
        Duration::from_secs(20),
        || cl.active_controller(1).filter(|a| *a != 3),
    );
    create_topic(&cl.node(1).bootstrap(), "during-cut", 2, 2);
    // Node 3 no longer heartbeats to that controller: fenced, out of Metadata on the majority.
    wait_for("node 3 fenced", Duration::from_secs(20), || {
        (!metadata(&cl.node(1).bootstrap(), None).0.contains(&3)).then_some(())
    });
    // Cut off, node 3 does not fence itself: it keeps serving what it has. Asked through
    // `fjord cluster status`, whose client talks to node 3 alone (librdkafka and kcat may ask
    // another broker they learnt of).
    let st = cl.status(3);
    let line = st
        .lines()
        .find(|l| l.trim_start().starts_with("3 "))
        .unwrap_or_default();
    assert!(
        line.ends_with(" unfenced"),
        "node 3 still serves itself:\n{st}"
    );

    // Heal: node 3 catches up with the metadata log and is unfenced again.
    for (_, p) in &proxies {
        p.set_cut(false);
    }
    wait_for(
        "node 3 caught up and unfenced",
        Duration::from_secs(30),
        || {
            let (_, parts) = metadata(&cl.node(3).bootstrap(), Some("during-cut"));
            (parts.len() == 2 && metadata(&cl.node(1).bootstrap(), None).0 == all).then_some(())
        },
    );
    let s = cl.status(3);
    let line = s
        .lines()
        .find(|l| l.trim_start().starts_with("3 "))
        .unwrap_or_default();
    assert!(line.ends_with(" unfenced"), "{s}");
}

#[test]
fn python_clients_and_kcat_see_a_three_node_cluster() {
    let cl = Cluster::start(3, 0);
    let all: BTreeSet<i32> = [1, 2, 3].into();
    wait_for("every node registered", Duration::from_secs(30), || {
        (metadata(&cl.node(1).bootstrap(), None).0 == all).then_some(())
    });
    let nodes: Vec<String> = (1..=3).map(|i| cl.node(i).bootstrap()).collect();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/cluster_clients.py"
    );
    let out = Command::new("python3")
        .arg(script)
        .arg(nodes.join(","))
        .output()
        .expect("python3 with confluent-kafka, kafka-python and aiokafka (pip install them)");
    assert!(
        out.status.success(),
        "python clients failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // kcat (librdkafka 2.0.2): three brokers, and a consumer group through the cluster.
    assert!(
        common::have("kcat"),
        "kcat is not installed (apt install kcat)"
    );
    let l = Command::new("kcat")
        .args(["-L", "-b", &nodes[1]])
        .output()
        .expect("kcat -L");
    let listing = String::from_utf8_lossy(&l.stdout);
    assert!(listing.contains(" 3 brokers:"), "{listing}");
    let g = Command::new("kcat")
        .args([
            "-b",
            &nodes[2],
            "-G",
            "kcat-group",
            "-o",
            "beginning",
            "-e",
            "-q",
            "py-rf3",
        ])
        .output()
        .expect("kcat -G");
    let lines = String::from_utf8_lossy(&g.stdout).lines().count();
    assert_eq!(lines, 450, "kcat group consumed {lines}");
}

/// Where `.ci/run` installs kafkajs (npm), unless FJORD_NODE_PATH names another place.
fn kafkajs_path() -> std::path::PathBuf {
    match std::env::var_os("FJORD_NODE_PATH") {
        Some(p) => p.into(),
        None => std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
            .join(".cache/fjord/js/node_modules"),
    }
}

#[test]
fn kafkajs_sees_a_three_node_cluster_and_rides_out_a_leaders_death() {
    let path = kafkajs_path();
    assert!(
        path.join("kafkajs").exists(),
        "kafkajs is not installed in {} (npm install --prefix ~/.cache/fjord/js kafkajs@2.2.4)",
        path.display()
    );
    let mut cl = Cluster::start(3, 0);
    let all: BTreeSet<i32> = [1, 2, 3].into();
    wait_for("every node registered", Duration::from_secs(30), || {
        (metadata(&cl.node(1).bootstrap(), None).0 == all).then_some(())
    });
    let nodes: Vec<String> = (1..=3).map(|i| cl.node(i).bootstrap()).collect();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js/cluster.js");
    let (ok, transcript, killed) = run_until_kill(
        Command::new("node")
            .arg(script)
            .arg(nodes.join(","))
            .env("NODE_PATH", &path),
        &mut cl,
        &nodes[0],
        "js-rf3",
    );
    assert!(
        ok && killed.is_some(),
        "kafkajs failed (killed node {killed:?}):\n{transcript}"
    );
}

/// Runs a client script that prints "killing now" when the leader of `topic`'s partition 0
/// should die: kills it (SIGKILL) then, and collects the rest. (success, transcript, killed).
fn run_until_kill(
    cmd: &mut Command,
    cl: &mut Cluster,
    via: &str,
    topic: &str,
) -> (bool, String, Option<i32>) {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the client runs (see the test's requirements)");
    let stdout = child.stdout.take().expect("stdout");
    let mut transcript = String::new();
    let mut killed = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.expect("a line");
        if line == "killing now" && killed.is_none() {
            let (_, parts) = metadata(via, Some(topic));
            let leader = parts.first().map(|p| p.0).expect("partition 0 led");
            cl.node_mut(leader).kill9();
            killed = Some(leader);
        }
        transcript.push_str(&line);
        transcript.push('\n');
    }
    let out = child.wait_with_output().expect("the client exits");
    transcript.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), transcript, killed)
}

#[test]
fn a_node_of_another_cluster_is_refused() {
    let mut first = Cluster::start(1, 1);
    let boot = first.node(1).bootstrap();
    let both: BTreeSet<i32> = [1, 2].into();
    wait_for("both nodes registered", Duration::from_secs(30), || {
        (metadata(&boot, None).0 == both).then_some(())
    });
    // Node 2 has recorded the first cluster's id in meta.properties.
    let data = first.node(2).data().to_path_buf();
    wait_for("the cluster id recorded", Duration::from_secs(10), || {
        std::fs::read_to_string(data.join("meta.properties"))
            .ok()
            .filter(|m| m.contains("cluster.id="))
    });
    first.node_mut(2).kill9();
    // A new quorum (a new cluster id) on fresh disks: node 2's data dir does not belong there.
    let second = Cluster::start(1, 0);
    let out = Command::new(env!("CARGO_BIN_EXE_fjord"))
        .args([
            "serve",
            "--node-id",
            "2",
            "--cores",
            "1",
            "--overprovisioned",
        ])
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--data-dir")
        .arg(&data)
        .arg("--controllers")
        .arg(&second.voters)
        .output()
        .expect("run node 2 against another cluster");
    assert!(!out.status.success(), "must exit non-zero");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("belongs to cluster"), "{log}");
}

/// Every record of `topic` from the beginning, as (partition, offset, value).
fn read_all(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    expected: usize,
) -> Vec<(i32, i64, Vec<u8>)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "cluster-read-all")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    c.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < expected && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            out.push((
                m.partition(),
                m.offset(),
                m.payload().map(|p| p.to_vec()).unwrap_or_default(),
            ));
        }
    }
    // Anything beyond what was expected (a duplicate) shows up in a short extra wait.
    let extra_until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < extra_until {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            out.push((
                m.partition(),
                m.offset(),
                m.payload().map(|p| p.to_vec()).unwrap_or_default(),
            ));
        }
    }
    out
}

#[test]
fn followers_replicate_and_acknowledged_records_survive_the_leaders_death() {
    let mut cl = Cluster::start(3, 0);
    let all: BTreeSet<i32> = [1, 2, 3].into();
    let boot = cl.node(1).bootstrap();
    wait_registered(&boot, &all);
    {
        let a = admin(&boot);
        let t =
            NewTopic::new("durable", 3, TopicReplication::Fixed(3)).set("min.insync.replicas", "2");
        let r = futures::executor::block_on(a.create_topics(&[t], &AdminOptions::new()))
            .expect("create_topics");
        r[0].as_ref().expect("created");
    }
    // An idempotent acks=all producer: every acknowledged record is on every in-sync replica.
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &boot)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "60000")
        .create()
        .expect("producer");
    for i in 0..1000 {
        let v = format!("d{i}");
        p.send(BaseRecord::<(), _>::to("durable").payload(&v))
            .expect("enqueue");
    }
    p.flush(Duration::from_secs(30)).expect("all acknowledged");
    let (_, parts) = metadata(&boot, Some("durable"));
    let victim = parts[0].0;
    // kill -9 the leader of partition 0; a replica from the ISR takes over with the data.
    cl.node_mut(victim).kill9();
    let survivor = *all.iter().find(|n| **n != victim).unwrap();
    let sb = cl.node(survivor).bootstrap();
    wait_for(
        "a new leader for every partition",
        Duration::from_secs(30),
        || {
            let (_, parts) = metadata(&sb, Some("durable"));
            (parts.len() == 3 && parts.iter().all(|p| p.0 >= 0 && p.0 != victim)).then_some(())
        },
    );
    // Writes go on with the two remaining replicas (min.insync.replicas = 2).
    for i in 1000..1200 {
        let v = format!("d{i}");
        p.send(BaseRecord::<(), _>::to("durable").payload(&v))
            .expect("enqueue");
    }
    p.flush(Duration::from_secs(60))
        .expect("acknowledged after the failover");
    let got = read_all(&sb, "durable", 3, 1200);
    let values: BTreeSet<Vec<u8>> = got.iter().map(|g| g.2.clone()).collect();
    assert_eq!(values.len(), 1200, "every acknowledged record is there");
    assert_eq!(got.len(), 1200, "and none twice");
    // The restarted node comes back as a follower and catches up.
    cl.restart(victim, &[]);
    wait_for(
        "the restarted node registered",
        Duration::from_secs(30),
        || (metadata(&sb, None).0 == all).then_some(()),
    );
    // Once it has caught up, its leaders let it back into the ISR (AlterPartition).
    wait_for(
        "the restarted node back in every ISR",
        Duration::from_secs(30),
        || {
            let (_, parts) = metadata(&sb, Some("durable"));
            (parts.len() == 3 && parts.iter().all(|p| p.2.contains(&victim))).then_some(())
        },
    );
    // DeleteRecords is answered once every live replica moved its log start (the low
    // watermark): followers follow their leader's log start.
    let mut per_partition = [0i64; 3];
    for g in &got {
        per_partition[g.0 as usize] = per_partition[g.0 as usize].max(g.1 + 1);
    }
    let (p, end) = (0..3)
        .map(|p| (p, per_partition[p]))
        .max_by_key(|x| x.1)
        .unwrap();
    let cut = end / 2;
    assert!(cut > 0, "{per_partition:?}");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("durable", p as i32, Offset::Offset(cut))
        .unwrap();
    let a = admin(&sb);
    let r = futures::executor::block_on(a.delete_records(&tpl, &AdminOptions::new()))
        .expect("delete_records");
    let e = r.find_partition("durable", p as i32).expect("answered");
    assert!(e.error().is_ok(), "{:?}", e.error());
    assert_eq!(e.offset(), Offset::Offset(cut), "the low watermark");
    for n in &all {
        let f = cl
            .node(*n)
            .data()
            .join(format!("durable-{p}"))
            .join("log-start-offset");
        let v: i64 = std::fs::read_to_string(&f)
            .unwrap_or_default()
            .trim()
            .parse()
            .unwrap_or(-1);
        assert_eq!(v, cut, "node {n}'s log start of durable-{p}");
    }
    // Every replica's lag, from each broker's DescribeLogDirs, in `fjord topics describe`.
    let (ok, out) = fjord_cli(&["topics", "--bootstrap", &sb, "describe", "durable"]);
    assert!(ok && out.contains("FOLLOWER LAG"), "{out}");
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert_eq!(rows.len(), 3, "{out}");
    for r in rows {
        let lag = r.split("  ").last().unwrap_or_default().trim();
        let entries: Vec<&str> = lag.split(' ').collect();
        assert_eq!(entries.len(), 2, "two followers per partition: {r}");
        assert!(
            entries.iter().all(|e| e
                .split_once(':')
                .is_some_and(|(_, l)| l.parse::<u64>().is_ok())),
            "{r}"
        );
    }
}

/// (base offset, CRC) of every batch in a partition's segment files: two replicas hold the
/// same data exactly when these agree.
fn batches_on_disk(dir: &std::path::Path) -> Vec<(i64, u32)> {
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let b = std::fs::read(&f).unwrap_or_default();
        let mut pos = 0usize;
        while pos + 61 <= b.len() {
            let base = i64::from_be_bytes(b[pos..pos + 8].try_into().unwrap());
            let len = i32::from_be_bytes(b[pos + 8..pos + 12].try_into().unwrap());
            if len <= 0 || pos + 12 + len as usize > b.len() {
                break;
            }
            let crc = u32::from_be_bytes(b[pos + 17..pos + 21].try_into().unwrap());
            out.push((base, crc));
            pos += 12 + len as usize;
        }
    }
    out
}

/// KIP-101/279: the old leader comes back with a tail nobody else has (acks=1 writes its
/// followers never fetched, in its old epoch); its first fetch names that epoch, the new
/// leader answers where the epoch ended in its own log, and the old leader cuts there and
/// refetches, ending byte for byte like the new leader.
#[test]
fn a_deposed_leader_cuts_its_unreplicated_tail_and_ends_identical_to_the_new_leader() {
    let mut cl = Cluster::start(3, 0);
    let all: BTreeSet<i32> = [1, 2, 3].into();
    let boot = cl.node(1).bootstrap();
    wait_registered(&boot, &all);
    create_topic(&boot, "diverge", 1, 3);
    let (_, parts) = metadata(&boot, Some("diverge"));
    let old = parts[0].0;
    // The followers stop (SIGSTOP) while the leader takes acks=1 writes they never see;
    // then the leader dies and a follower takes over.
    let signal = |b: &Broker, sig: &str| {
        let pid = b.child.as_ref().expect("running").id().to_string();
        let st = Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(st.success());
    };
    let followers: Vec<i32> = all.iter().copied().filter(|n| *n != old).collect();
    produce_from(&boot, "diverge", 0, 100);
    for f in &followers {
        signal(cl.node(*f), "-STOP");
    }
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", cl.node(old).bootstrap())
        .set("acks", "1")
        .create()
        .expect("producer");
    // A fetch the followers sent before they stopped may still be answered into their
    // sockets: the first batch goes there, the second reaches no follower.
    for round in 0..2 {
        for i in 0..1000 {
            let v = format!("lost{round}-{i}");
            p.send(BaseRecord::<(), _>::to("diverge").payload(&v))
                .expect("enqueue");
        }
        p.flush(Duration::from_secs(30))
            .expect("acks=1 answered by the leader alone");
        std::thread::sleep(Duration::from_millis(300));
    }
    cl.node_mut(old).kill9();
    for f in &followers {
        signal(cl.node(*f), "-CONT");
    }
    let ob = cl.node(followers[0]).bootstrap();
    let new = wait_for("a new leader", Duration::from_secs(30), || {
        let (_, parts) = metadata(&ob, Some("diverge"));
        parts.first().map(|p| p.0).filter(|l| *l >= 0 && *l != old)
    });
    // The new leader writes on from its own end, over offsets the old leader had used.
    produce_from(&ob, "diverge", 1000, 3000);
    let data = cl.node(old).data().to_path_buf();
    cl.restart(old, &[]);
    wait_for(
        "the old leader back in the ISR",
        Duration::from_secs(30),
        || {
            let (_, parts) = metadata(&ob, Some("diverge"));
            parts.first().filter(|p| p.2.contains(&old)).map(|_| ())
        },
    );
    let leader_dir = cl.node(new).data().join("diverge-0");
    let old_dir = data.join("diverge-0");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (a, b) = (batches_on_disk(&leader_dir), batches_on_disk(&old_dir));
        if !a.is_empty() && a == b {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replicas differ: new leader {new} holds {a:?}, the old leader {old} holds {b:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Three controller voters and a broker-only node: the leader of a partition is killed (-9)
/// three times under an idempotent acks=all producer and comes back each time; every
/// acknowledged record is read back, none twice.
#[test]
fn repeated_leader_kills_under_an_idempotent_acks_all_producer_lose_and_duplicate_nothing() {
    let mut cl = Cluster::start(3, 1);
    let all: BTreeSet<i32> = [1, 2, 3, 4].into();
    let boot: Vec<String> = (1..=4).map(|i| cl.node(i).bootstrap()).collect();
    wait_for("every node registered", Duration::from_secs(30), || {
        (metadata(&boot[0], None).0 == all).then_some(())
    });
    {
        let a = admin(&boot[0]);
        let t =
            NewTopic::new("churn", 2, TopicReplication::Fixed(3)).set("min.insync.replicas", "2");
        let r = futures::executor::block_on(a.create_topics(&[t], &AdminOptions::new()))
            .expect("create_topics");
        r[0].as_ref().expect("created");
    }
    // A producer thread sends without pause; each acknowledged value is recorded from its
    // delivery report, failures counted.
    let producer = BackgroundProducer::start(&boot.join(","), "churn", "c");
    for round in 0..3 {
        let boot: Vec<String> = (1..=4).map(|i| cl.node(i).bootstrap()).collect();
        let leader = wait_for("a leader to kill", Duration::from_secs(30), || {
            boot.iter().find_map(|b| {
                let (_, parts) = metadata(b, Some("churn"));
                parts.first().map(|p| p.0).filter(|l| *l >= 0)
            })
        });
        std::thread::sleep(Duration::from_millis(500));
        cl.node_mut(leader).kill9();
        let other = *all.iter().find(|n| **n != leader).unwrap();
        let ob = cl.node(other).bootstrap();
        wait_for(
            &format!("round {round}: a new leader"),
            Duration::from_secs(30),
            || {
                let (_, parts) = metadata(&ob, Some("churn"));
                (parts.len() == 2 && parts.iter().all(|p| p.0 >= 0 && p.0 != leader)).then_some(())
            },
        );
        cl.restart(leader, &[]);
        wait_for(
            &format!("round {round}: back in every ISR"),
            Duration::from_secs(60),
            || {
                let (_, parts) = metadata(&ob, Some("churn"));
                (parts.len() == 2 && parts.iter().all(|p| p.2.len() == 3)).then_some(())
            },
        );
    }
    let (sent, acked, failed) = producer.stop();
    assert!(
        sent > 0 && acked.len() as u64 + failed == sent,
        "sent {sent}, acked {}, failed {failed}",
        acked.len()
    );
    // A restarted node listens on a new port: read through one as it is now.
    let got = read_all(&cl.node(1).bootstrap(), "churn", 2, acked.len());
    let values: BTreeSet<Vec<u8>> = got.iter().map(|g| g.2.clone()).collect();
    let missing = acked.difference(&values).count();
    assert_eq!(
        missing,
        0,
        "acknowledged records lost: {missing} of {}",
        acked.len()
    );
    assert_eq!(got.len(), values.len(), "no record twice");
}

/// An idempotent acks=all producer on its own thread, sending `<prefix><n>` to `topic`
/// without pause (about 2,000 records a second: mid-flight at any kill) until stopped.
struct BackgroundProducer {
    acked: std::sync::Arc<std::sync::Mutex<BTreeSet<Vec<u8>>>>,
    failed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl BackgroundProducer {
    fn start(bootstrap: &str, topic: &str, prefix: &str) -> BackgroundProducer {
        let acked = std::sync::Arc::default();
        let failed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ctx = AckContext {
            acked: std::sync::Arc::clone(&acked),
            failed: failed.clone(),
        };
        let (stop2, bootstrap, topic, prefix) = (
            stop.clone(),
            bootstrap.to_string(),
            topic.to_string(),
            prefix.to_string(),
        );
        let thread = std::thread::spawn(move || {
            let p: rdkafka::producer::BaseProducer<AckContext> = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .set("message.timeout.ms", "120000")
                .create_with_context(ctx)
                .expect("producer");
            let mut i = 0u64;
            while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                let v = format!("{prefix}{i}").into_bytes();
                if p.send(BaseRecord::<(), _>::to(&topic).payload(&v)).is_ok() {
                    i += 1;
                }
                p.poll(Duration::from_millis(if i.is_multiple_of(10) {
                    5
                } else {
                    0
                }));
            }
            p.flush(Duration::from_secs(120))
                .expect("flushed at the end");
            i
        });
        BackgroundProducer {
            acked,
            failed,
            stop,
            thread,
        }
    }

    /// Stops, flushes, and returns (sent, acknowledged values, failed deliveries).
    fn stop(self) -> (u64, BTreeSet<Vec<u8>>, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let sent = self.thread.join().expect("producer thread");
        let acked = self.acked.lock().unwrap().clone();
        (
            sent,
            acked,
            self.failed.load(std::sync::atomic::Ordering::SeqCst),
        )
    }
}

/// Records what the broker acknowledged, from librdkafka's delivery reports.
struct AckContext {
    acked: std::sync::Arc<std::sync::Mutex<BTreeSet<Vec<u8>>>>,
    failed: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl rdkafka::ClientContext for AckContext {}

impl rdkafka::producer::ProducerContext for AckContext {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        match r {
            Ok(m) => {
                self.acked
                    .lock()
                    .unwrap()
                    .insert(m.payload().map(|p| p.to_vec()).unwrap_or_default());
            }
            Err(_) => {
                self.failed
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }
}

/// Sends `n` acks=all records with no retries and returns (acknowledged, errors by name).
fn produce_acks_all_no_retry(
    bootstrap: &str,
    topic: &str,
    n: usize,
) -> (usize, std::collections::BTreeMap<String, usize>) {
    let mut futures_ok = 0usize;
    let mut errors = std::collections::BTreeMap::new();
    let fp: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("retries", "0")
        .set("enable.idempotence", "false")
        .set("message.timeout.ms", "20000")
        .create()
        .expect("future producer");
    for i in 0..n {
        let v = format!("nomin-{i}");
        let r = futures::executor::block_on(fp.send(
            rdkafka::producer::FutureRecord::<(), _>::to(topic).payload(&v),
            Duration::from_secs(5),
        ));
        match r {
            Ok(_) => futures_ok += 1,
            Err((e, _)) => {
                let name = match e.rdkafka_error_code() {
                    Some(c) => format!("{c:?}"),
                    None => e.to_string(),
                };
                *errors.entry(name).or_default() += 1;
            }
        }
    }
    (futures_ok, errors)
}

/// Kafka's promise for acks=all: with two of a partition's three replicas gone and
/// min.insync.replicas=2, the producer is refused (NOT_ENOUGH_REPLICAS) and nothing is
/// acknowledged, both while a controller quorum shrinks the ISR and when the quorum is gone
/// too (the leader then stops counting followers that stopped fetching).
#[test]
fn acks_all_is_refused_with_two_replicas_down_with_or_without_a_quorum() {
    let mut cl = Cluster::start_with(3, 2, &["node.replica_lag_time_max_ms=3000"]);
    let all: BTreeSet<i32> = [1, 2, 3, 4, 5].into();
    let boot = cl.node(4).bootstrap();
    wait_for("every node registered", Duration::from_secs(60), || {
        (metadata(&boot, None).0 == all).then_some(())
    });
    {
        let a = admin(&boot);
        // Leader 4 (broker-only) everywhere; "quorate" loses two nodes of which one is a
        // voter, "leaderless-quorum" loses two voters.
        let t1 = NewTopic::new("quorate", 1, TopicReplication::Variable(&[&[4, 5, 1]]))
            .set("min.insync.replicas", "2");
        let t2 = NewTopic::new("no-quorum", 1, TopicReplication::Variable(&[&[4, 2, 3]]))
            .set("min.insync.replicas", "2");
        let r = futures::executor::block_on(a.create_topics(&[t1, t2], &AdminOptions::new()))
            .expect("create_topics");
        for t in r {
            t.expect("created with an explicit assignment");
        }
    }
    for t in ["quorate", "no-quorum"] {
        let parts = wait_for(
            "the assignment in metadata",
            Duration::from_secs(30),
            || {
                let (_, parts) = metadata(&boot, Some(t));
                parts
                    .first()
                    .filter(|p| p.0 == 4 && p.2.len() == 3)
                    .cloned()
            },
        );
        assert_eq!(parts.1.len(), 3, "{t}: {parts:?}");
        let (ok, errors) = produce_acks_all_no_retry(&boot, t, 5);
        assert_eq!(ok, 5, "{t}: all replicas up, acks=all succeeds: {errors:?}");
    }
    // Two replicas of "quorate" die; voters 2 and 3 keep the quorum.
    cl.node_mut(5).kill9();
    cl.node_mut(1).kill9();
    let (ok, errors) = {
        // Within the lag limit the leader still counts them; afterwards it refuses.
        std::thread::sleep(Duration::from_secs(5));
        produce_acks_all_no_retry(&boot, "quorate", 10)
    };
    assert_eq!(ok, 0, "nothing acknowledged: {errors:?}");
    assert!(
        errors.keys().all(|k| k.starts_with("NotEnoughReplicas")),
        "refused as Kafka refuses: {errors:?}"
    );
    // The controller took them out of the ISR.
    wait_for(
        "the ISR shrunk to the leader",
        Duration::from_secs(30),
        || {
            let (_, parts) = metadata(&boot, Some("quorate"));
            parts.first().filter(|p| p.2 == vec![4]).map(|_| ())
        },
    );
    // Now the quorum goes too: voters 2 and 3 die, and "no-quorum" loses both followers.
    cl.node_mut(2).kill9();
    cl.node_mut(3).kill9();
    std::thread::sleep(Duration::from_secs(5));
    for t in ["no-quorum", "quorate"] {
        let (ok, errors) = produce_acks_all_no_retry(&boot, t, 10);
        assert_eq!(
            ok, 0,
            "{t}: nothing acknowledged without a quorum: {errors:?}"
        );
        assert!(
            errors.keys().all(|k| k.starts_with("NotEnoughReplicas")),
            "{t}: refused, not timed out: {errors:?}"
        );
    }
}

fn fjord_cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fjord"))
        .args(args)
        .output()
        .expect("run fjord");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn leader_of(bootstrap: &str, topic: &str) -> Option<PartitionView> {
    let (_, parts) = metadata(bootstrap, Some(topic));
    parts.into_iter().next()
}

/// Kafka's auto.leader.rebalance.enable: a partition whose preferred replica (the first of
/// an operator's `--replica-assignment`) died and came back gets it back as leader.
#[test]
fn leadership_returns_to_the_preferred_replica_once_it_is_back_in_sync() {
    let mut cl = Cluster::start_with(3, 0, &["node.leader_imbalance_check_interval_ms=1000"]);
    let all: BTreeSet<i32> = [1, 2, 3].into();
    let boot = cl.node(2).bootstrap();
    wait_registered(&boot, &all);
    let (ok, out) = fjord_cli(&[
        "topics",
        "--bootstrap",
        &boot,
        "create",
        "pref",
        "--replica-assignment",
        "1:2:3",
    ]);
    assert!(ok, "{out}");
    wait_for("node 1 leads", Duration::from_secs(30), || {
        leader_of(&boot, "pref").filter(|p| p.0 == 1).map(|_| ())
    });
    produce(&boot, "pref", 50);
    cl.node_mut(1).kill9();
    wait_for("another leader", Duration::from_secs(30), || {
        leader_of(&boot, "pref").filter(|p| p.0 > 1).map(|_| ())
    });
    produce_from(&boot, "pref", 50, 50);
    cl.restart(1, &["node.leader_imbalance_check_interval_ms=1000"]);
    wait_for("node 1 leads again", Duration::from_secs(60), || {
        leader_of(&boot, "pref")
            .filter(|p| p.0 == 1 && p.2.len() == 3)
            .map(|_| ())
    });
    assert_eq!(consume_count(&boot, "pref", 1, 100), 100);
}

/// ElectLeaders through `fjord topics elect-leaders`, with the automatic rebalance off:
/// preferred elections move leadership only to a live in-sync preferred replica, and an
/// unclean election gives a partition whose whole ISR is gone a leader from outside it.
#[test]
fn elect_leaders_runs_preferred_and_unclean_elections() {
    let mut cl = Cluster::start_with(
        3,
        1,
        &[
            "node.auto_leader_rebalance_enable=false",
            "node.replica_lag_time_max_ms=3000",
        ],
    );
    let all: BTreeSet<i32> = [1, 2, 3, 4].into();
    let boot = cl.node(4).bootstrap();
    wait_for("every node registered", Duration::from_secs(60), || {
        (metadata(&boot, None).0 == all).then_some(())
    });
    for (t, a) in [("pref", "2:3:4"), ("lost", "4:1")] {
        let (ok, out) = fjord_cli(&[
            "topics",
            "--bootstrap",
            &boot,
            "create",
            t,
            "--replica-assignment",
            a,
        ]);
        assert!(ok, "{out}");
    }
    wait_for("both topics led", Duration::from_secs(30), || {
        (leader_of(&boot, "pref").is_some_and(|p| p.0 == 2 && p.2.len() == 3)
            && leader_of(&boot, "lost").is_some_and(|p| p.0 == 4 && p.2.len() == 2))
        .then_some(())
    });
    let elect = |args: &[&str]| {
        let mut a = vec!["topics", "--bootstrap", &boot, "elect-leaders"];
        a.extend_from_slice(args);
        fjord_cli(&a)
    };
    let (ok, out) = elect(&["--topic", "pref"]);
    assert!(ok && out.contains("ElectionNotNeeded"), "{out}");
    // Node 2 dies and comes back: the leadership stays where it went until asked.
    cl.node_mut(2).kill9();
    wait_for("pref led elsewhere", Duration::from_secs(30), || {
        leader_of(&boot, "pref")
            .filter(|p| p.0 > 0 && p.0 != 2)
            .map(|_| ())
    });
    cl.restart(
        2,
        &[
            "node.auto_leader_rebalance_enable=false",
            "node.replica_lag_time_max_ms=3000",
        ],
    );
    wait_for("node 2 back in the ISR", Duration::from_secs(60), || {
        leader_of(&boot, "pref")
            .filter(|p| p.2.len() == 3)
            .map(|_| ())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_ne!(leader_of(&boot, "pref").map(|p| p.0), Some(2));
    let (ok, out) = elect(&["--topic", "pref"]);
    assert!(ok && out.contains("pref-0: elected"), "{out}");
    wait_for("node 2 leads pref", Duration::from_secs(30), || {
        leader_of(&boot, "pref").filter(|p| p.0 == 2).map(|_| ())
    });
    // "lost": its follower (voter 1) stops and drops out of the ISR, then the leader (4)
    // dies: no in-sync replica is left, so the partition has no leader.
    let stop = |cl: &Cluster, id: i32, sig: &str| {
        let pid = cl
            .node(id)
            .child
            .as_ref()
            .expect("running")
            .id()
            .to_string();
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill")
            .success());
    };
    stop(&cl, 1, "-STOP");
    let b3 = cl.node(3).bootstrap();
    wait_for(
        "the ISR of lost shrunk to 4",
        Duration::from_secs(60),
        || {
            leader_of(&b3, "lost")
                .filter(|p| p.2 == vec![4])
                .map(|_| ())
        },
    );
    cl.node_mut(4).kill9();
    stop(&cl, 1, "-CONT");
    wait_for("lost has no leader", Duration::from_secs(30), || {
        leader_of(&b3, "lost").filter(|p| p.0 < 0).map(|_| ())
    });
    wait_for("node 1 registered again", Duration::from_secs(30), || {
        metadata(&b3, None).0.contains(&1).then_some(())
    });
    let (ok, out) = fjord_cli(&["topics", "--bootstrap", &b3, "describe", "--offline"]);
    let all_out = fjord_cli(&["topics", "--bootstrap", &b3, "describe"]).1;
    assert!(
        ok && out.contains("lost") && !out.contains("pref"),
        "{out}\nall:\n{all_out}"
    );
    let (ok, out) = fjord_cli(&[
        "topics",
        "--bootstrap",
        &b3,
        "elect-leaders",
        "--election-type",
        "unclean",
        "--topic",
        "lost",
    ]);
    assert!(ok && out.contains("lost-0: elected"), "{out}");
    wait_for("node 1 leads lost", Duration::from_secs(30), || {
        leader_of(&b3, "lost")
            .filter(|p| p.0 == 1 && p.2 == vec![1])
            .map(|_| ())
    });
}

/// Keeps librdkafka's log lines (its `debug` output) for a test to look at.
struct LogContext {
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl rdkafka::ClientContext for LogContext {
    fn log(&self, _level: rdkafka::config::RDKafkaLogLevel, fac: &str, line: &str) {
        self.lines.lock().unwrap().push(format!("{fac} {line}"));
    }
}

impl rdkafka::consumer::ConsumerContext for LogContext {}

/// KIP-392: with `replica.selector.class` set to the rack-aware selector, a consumer in another
/// rack than the leader is sent to an in-sync replica in its own rack, and reads everything
/// from it.
#[test]
fn a_consumer_reads_from_an_in_sync_replica_in_its_own_rack() {
    // Racks: node 1 r1, node 2 r0, node 3 r1.
    let cl = Cluster::start_with(
        3,
        0,
        &["replica.selector.class=org.apache.kafka.common.replica.RackAwareReplicaSelector"],
    );
    let all: BTreeSet<i32> = [1, 2, 3].into();
    let boot = cl.node(2).bootstrap();
    wait_registered(&boot, &all);
    let (ok, out) = fjord_cli(&[
        "topics",
        "--bootstrap",
        &boot,
        "create",
        "near",
        "--replica-assignment",
        "2:1:3",
    ]);
    assert!(ok, "{out}");
    wait_for("node 2 leads near", Duration::from_secs(30), || {
        leader_of(&boot, "near")
            .filter(|p| p.0 == 2 && p.2.len() == 3)
            .map(|_| ())
    });
    produce(&boot, "near", 300);
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let c: BaseConsumer<LogContext> = ClientConfig::new()
        .set("bootstrap.servers", &boot)
        .set("group.id", "near-readers")
        .set("client.rack", "r1")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("debug", "fetch")
        .set_log_level(rdkafka::config::RDKafkaLogLevel::Debug)
        .create_with_context(LogContext {
            lines: lines.clone(),
        })
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("near", 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).expect("assign");
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 300 && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            seen.insert(m.offset());
        }
    }
    assert_eq!(seen.len(), 300, "every record read");
    let lines = lines.lock().unwrap();
    let moved = lines
        .iter()
        .find(|l| l.contains("preferred replica updated"))
        .cloned();
    assert!(
        moved
            .as_deref()
            .is_some_and(|l| l.contains("to 1") || l.contains("to 3")),
        "the leader sent the consumer to a replica in rack r1: {moved:?}\n{}",
        lines
            .iter()
            .filter(|l| l.contains("near"))
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// KIP-455 under an idempotent acks=all producer: `fjord topics reassign` moves a topic onto a
/// new node (its leader among the replicas leaving), then drains another node; the new
/// replicas copy the log, the old ones are removed from disk, and every acknowledged record is
/// read back once. A move that cannot finish (its new replica is dead) is listed and cancelled.
#[test]
fn reassignment_moves_replicas_between_nodes_under_load_and_cancels() {
    // Several fetchers per leader (Kafka's num.replica.fetchers) share the followed partitions.
    let mut cl = Cluster::start_with(3, 1, &["num.replica.fetchers=3"]);
    let all: BTreeSet<i32> = [1, 2, 3, 4].into();
    let boot = cl.node(2).bootstrap();
    wait_for("every node registered", Duration::from_secs(60), || {
        (metadata(&boot, None).0 == all).then_some(())
    });
    let cli = |args: &[&str]| {
        let mut a = vec!["topics", "--bootstrap", &boot];
        a.extend_from_slice(args);
        fjord_cli(&a)
    };
    let (ok, out) = cli(&[
        "create",
        "moving",
        "--replica-assignment",
        "1:2:3,2:3:1",
        "--config",
        "min.insync.replicas=2",
    ]);
    assert!(ok, "{out}");
    wait_for("the topic led by 1 and 2", Duration::from_secs(30), || {
        let (_, parts) = metadata(&boot, Some("moving"));
        (parts.len() == 2 && parts[0].0 == 1 && parts[1].0 == 2).then_some(())
    });
    let producer = BackgroundProducer::start(&boot, "moving", "m");
    // A backlog for the new replica to copy.
    std::thread::sleep(Duration::from_secs(2));
    let on_disk = |node: i32, p: i32| cl.node(node).data().join(format!("moving-{p}")).exists();
    assert!(on_disk(1, 0) && on_disk(1, 1) && !on_disk(4, 0));
    // Another move's throttle entry, which this move's throttling must leave alone.
    {
        let a = admin(&boot);
        let cfg =
            rdkafka::admin::AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic("moving"))
                .set("min.insync.replicas", "2")
                .set("leader.replication.throttled.replicas", "9:9");
        let r = futures::executor::block_on(a.alter_configs(&[cfg], &AdminOptions::new()))
            .expect("alter_configs");
        r[0].as_ref().expect("altered");
    }
    // Node 1 (partition 0's leader) leaves, node 4 joins, throttled far above what it needs.
    let (ok, out) = cli(&[
        "reassign",
        "moving",
        "--replica-assignment",
        "4:2:3,2:3:4",
        "--throttle",
        "500000000",
        "--wait",
    ]);
    assert!(
        ok && out.contains("2 partitions moved") && out.contains("throttles removed"),
        "{out}"
    );
    let (ok, out) = cli(&["describe", "moving"]);
    assert!(
        ok && out.contains("leader.replication.throttled.replicas=9:9 (topic)\n")
            && out.contains("follower.replication.throttled.replicas=\n")
            && out.contains("min.insync.replicas=2 (topic)"),
        "only this move's throttle entries were lifted: {out}"
    );
    let (_, parts) = metadata(&boot, Some("moving"));
    assert_eq!(parts[0].1, vec![4, 2, 3], "{parts:?}");
    assert_eq!(parts[1].1, vec![2, 3, 4], "{parts:?}");
    assert_eq!(
        parts[0].0, 4,
        "the first in-sync target replica took over: {parts:?}"
    );
    wait_for("node 1's replicas removed", Duration::from_secs(30), || {
        (!on_disk(1, 0) && !on_disk(1, 1)).then_some(())
    });
    assert!(on_disk(4, 0) && on_disk(4, 1));
    // Drain node 3: its replicas go to the node holding the fewest (1, which holds none now).
    let (ok, out) = cli(&["reassign", "--drain", "3", "--wait"]);
    assert!(ok && out.contains("partitions moved"), "{out}");
    let (_, parts) = metadata(&boot, Some("moving"));
    assert_eq!(parts[0].1, vec![4, 2, 1], "{parts:?}");
    assert_eq!(parts[1].1, vec![2, 1, 4], "{parts:?}");
    wait_for("node 3's replicas removed", Duration::from_secs(30), || {
        (!on_disk(3, 0) && !on_disk(3, 1)).then_some(())
    });
    let (sent, acked, failed) = producer.stop();
    assert!(
        sent > 0 && failed == 0 && acked.len() as u64 == sent,
        "sent {sent}, acked {}, failed {failed}",
        acked.len()
    );
    let got = read_all(&boot, "moving", 2, acked.len());
    let values: BTreeSet<Vec<u8>> = got.iter().map(|g| g.2.clone()).collect();
    assert_eq!(
        acked.difference(&values).count(),
        0,
        "acknowledged records lost"
    );
    assert_eq!(got.len(), values.len(), "no record twice");
    // A move onto a dead node stays in progress until cancelled; the partition keeps working.
    cl.node_mut(3).kill9();
    let (ok, out) = cli(&[
        "reassign",
        "moving",
        "--partition",
        "0",
        "--replica-assignment",
        "4:2:3",
    ]);
    assert!(ok, "{out}");
    let (ok, out) = cli(&["reassign", "moving"]);
    assert!(
        ok && out.contains("4,2,3,1") && out.contains("moving"),
        "{out}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let (ok, out) = cli(&["reassign", "moving"]);
    assert!(ok && out.contains("4,2,3,1"), "still moving: {out}");
    let (ok, out) = cli(&["describe", "moving"]);
    assert!(
        ok && out.contains("partition 0 is moving: adding 3, removing 1"),
        "{out}"
    );
    let (ok, out) = cli(&["reassign", "moving", "--cancel"]);
    assert!(ok && out.contains("moving-0: move cancelled"), "{out}");
    let (ok, out) = cli(&["reassign", "moving"]);
    assert!(ok && out.contains("no reassignment in progress"), "{out}");
    let (_, parts) = metadata(&boot, Some("moving"));
    assert_eq!(
        parts[0].1,
        vec![4, 2, 1],
        "back to the original replicas: {parts:?}"
    );
    // Refusals: an unknown broker, a duplicate.
    for bad in ["4:2:9", "4:4:2"] {
        let (ok, out) = cli(&[
            "reassign",
            "moving",
            "--partition",
            "0",
            "--replica-assignment",
            bad,
        ]);
        assert!(
            !ok && out.contains("InvalidReplicaAssignment"),
            "{bad}: {out}"
        );
    }
    produce(&boot, "moving", 20);
    // A replica moved away while its node was down is removed when the node is back, and so
    // is a directory an earlier run set aside for deletion; replicas it still holds stay.
    cl.restart(3, &[]);
    cl.node_mut(1).kill9();
    let (ok, out) = cli(&[
        "reassign",
        "moving",
        "--partition",
        "1",
        "--replica-assignment",
        "2:4",
        "--wait",
    ]);
    assert!(ok, "{out}");
    let aside = cl.node(1).data().join("moving-9.12345-delete");
    std::fs::create_dir_all(&aside).expect("a set-aside directory");
    std::fs::write(aside.join("00000000000000000000.log"), b"junk").expect("junk");
    let held = |cl: &Cluster, p: i32| cl.node(1).data().join(format!("moving-{p}")).exists();
    assert!(
        held(&cl, 1),
        "node 1 is down: its old replica is still there"
    );
    cl.restart(1, &[]);
    wait_for(
        "node 1's stray replica and set-aside directory removed",
        Duration::from_secs(60),
        || (!held(&cl, 1) && !aside.exists()).then_some(()),
    );
    wait_for(
        "node 1 back in partition 0's ISR",
        Duration::from_secs(60),
        || {
            let (_, parts) = metadata(&boot, Some("moving"));
            (parts.len() == 2 && parts[0].2.len() == 3).then_some(())
        },
    );
    let listing: Vec<String> = std::fs::read_dir(cl.node(1).data())
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        held(&cl, 0),
        "the replica node 1 still holds stays: {listing:?} in {}\n{:?}",
        cl.node(1).data().display(),
        metadata(&boot, Some("moving"))
    );
}

/// KIP-73: `fjord topics reassign --throttle` holds the copy to the rate (a replica joining a
/// 4 MB partition at 250 KB/s is still far behind after 3 s, where an unthrottled copy takes
/// well under a second here), and `--wait` ends with the throttles removed.
#[test]
fn a_throttled_reassignment_copies_at_the_rate_and_clears_its_throttles() {
    let cl = Cluster::start(3, 1);
    let all: BTreeSet<i32> = [1, 2, 3, 4].into();
    let boot = cl.node(1).bootstrap();
    wait_for("every node registered", Duration::from_secs(60), || {
        (metadata(&boot, None).0 == all).then_some(())
    });
    let cli = |args: &[&str]| {
        let mut a = vec!["topics", "--bootstrap", &boot];
        a.extend_from_slice(args);
        fjord_cli(&a)
    };
    let (ok, out) = cli(&["create", "slow", "--replica-assignment", "1"]);
    assert!(ok, "{out}");
    wait_for("the topic led", Duration::from_secs(30), || {
        leader_of(&boot, "slow").filter(|p| p.0 == 1).map(|_| ())
    });
    {
        let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &boot)
            .set("acks", "all")
            .create()
            .expect("producer");
        let value = vec![b'x'; 1000];
        for i in 0..4000 {
            let key = format!("k{i}");
            p.send(BaseRecord::to("slow").key(&key).payload(&value))
                .expect("enqueue");
        }
        p.flush(Duration::from_secs(30)).expect("acknowledged");
    }
    let (ok, out) = cli(&[
        "reassign",
        "slow",
        "--replica-assignment",
        "1:4",
        "--throttle",
        "250000",
    ]);
    assert!(ok && out.contains("throttled to 250000"), "{out}");
    std::thread::sleep(Duration::from_secs(3));
    let (ok, out) = cli(&["reassign", "slow"]);
    assert!(ok && out.contains("1,4"), "still moving after 3 s: {out}");
    let (ok, out) = cli(&["describe", "slow"]);
    assert!(ok, "{out}");
    let lag: i64 = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("4:")?.parse().ok())
        .unwrap_or_else(|| panic!("no lag of replica 4: {out}"));
    assert!(
        lag > 1000,
        "replica 4 copied at most about 1 MB by now, lag {lag}: {out}"
    );
    // The bare --wait waits for the move in progress, then lifts the throttles.
    let (ok, out) = cli(&["reassign", "slow", "--wait"]);
    assert!(ok && out.contains("throttles removed"), "{out}");
    let (_, parts) = metadata(&boot, Some("slow"));
    assert_eq!(
        (parts[0].1.clone(), parts[0].2.len()),
        (vec![1, 4], 2),
        "{parts:?}"
    );
    let (ok, out) = cli(&["describe", "slow"]);
    assert!(
        ok && out.contains("leader.replication.throttled.replicas"),
        "{out}"
    );
    assert!(
        !out.contains("throttled.replicas=0:"),
        "throttles lifted: {out}"
    );
    assert_eq!(consume_count(&boot, "slow", 1, 1), 1);
}

/// Issue 10's promises with the Python clients and kcat: confluent-kafka's idempotent acks=all
/// producer keeps writing while partition 0's leader is killed (SIGKILL) and loses and
/// duplicates nothing; kafka-python and aiokafka then write acks=all through the survivors,
/// and every acknowledged record is read back by all three libraries and by kcat.
#[test]
fn python_clients_and_kcat_ride_out_a_leaders_death() {
    let mut cl = Cluster::start(3, 0);
    let all: BTreeSet<i32> = [1, 2, 3].into();
    wait_for("every node registered", Duration::from_secs(30), || {
        (metadata(&cl.node(1).bootstrap(), None).0 == all).then_some(())
    });
    let nodes: Vec<String> = (1..=3).map(|i| cl.node(i).bootstrap()).collect();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/cluster_failover.py"
    );
    let (ok, transcript, killed) = run_until_kill(
        Command::new("python3").arg(script).arg(nodes.join(",")),
        &mut cl,
        &nodes[0],
        "py-failover",
    );
    assert!(
        ok && transcript.contains("all clients ok"),
        "python clients failed (killed node {killed:?}):\n{transcript}"
    );
    let killed = killed.expect("a leader was killed");
    let acked: usize = transcript
        .lines()
        .find_map(|l| l.strip_prefix("acknowledged ")?.parse().ok())
        .expect("the acknowledged count");
    let survivor = nodes[(killed as usize) % 3].clone();
    let k = Command::new("kcat")
        .args([
            "-C",
            "-b",
            &survivor,
            "-t",
            "py-failover",
            "-o",
            "beginning",
            "-e",
            "-q",
        ])
        .output()
        .expect("kcat -C");
    let read = String::from_utf8_lossy(&k.stdout).lines().count();
    assert!(
        read >= acked,
        "kcat read {read} of {acked} acknowledged records"
    );
}

/// A KIP-848 consumer on the whole cluster whose rebalance callbacks are counted.
fn counting_consumer(
    bootstrap: &str,
    group: &str,
    topic: &str,
) -> (
    BaseConsumer<common::Rebalances>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c: BaseConsumer<common::Rebalances> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("group.protocol", "consumer")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        // A stopped node answers nothing: give up on it in seconds, not a minute.
        .set("socket.timeout.ms", "5000")
        .set("topic.metadata.refresh.interval.ms", "2000")
        .create_with_context(common::Rebalances(n.clone()))
        .expect("consumer");
    c.subscribe(&[topic]).expect("subscribe");
    (c, n)
}

fn owned(c: &BaseConsumer<common::Rebalances>) -> BTreeSet<i32> {
    c.assignment()
        .map(|a| a.elements().iter().map(|e| e.partition()).collect())
        .unwrap_or_default()
}

/// (consumer index, partition, offset) of every record read.
type Reads = BTreeSet<(usize, i32, i64)>;

/// Polls both consumers until `until` holds, collecting (consumer, partition, offset); errors
/// of unreachable nodes are expected while one is stopped.
fn poll_both(
    cs: [&BaseConsumer<common::Rebalances>; 2],
    seen: &mut Reads,
    what: &str,
    until: &dyn Fn(&Reads) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !until(seen) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        for (i, c) in cs.iter().enumerate() {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(50)) {
                assert!(
                    seen.insert((i, m.partition(), m.offset())),
                    "{}/{} read twice",
                    m.partition(),
                    m.offset()
                );
            }
        }
    }
}

/// Committed offsets as the group's coordinator reports them to a member (OffsetFetch v9 with
/// its member epoch).
fn committed_of(c: &BaseConsumer<common::Rebalances>) -> Vec<(i32, i64)> {
    wait_for("the committed offsets", Duration::from_secs(30), || {
        let tpl = c.committed(Duration::from_secs(5)).ok()?;
        Some(
            tpl.elements()
                .iter()
                .map(|e| (e.partition(), e.offset().to_raw().unwrap_or(-1)))
                .collect(),
        )
    })
}

/// Group coordination follows the leadership of the group's `__consumer_offsets` partition.
/// The coordinator's node is stopped (SIGSTOP: fenced, its process alive): the new leader
/// loads the KIP-848 group from the replicated records and the members heartbeat on at their
/// epochs with their partitions, no rebalance. The node resumes and leads the partition again
/// (preferred leader) without a restart: it reloads what the other coordinator stored
/// meanwhile, so the commits made there hold.
#[test]
fn group_coordination_follows_the_offsets_partition_leader() {
    let settings = [
        "node.leader_imbalance_check_interval_ms=1000",
        "group.consumer_heartbeat_interval_ms=500",
    ];
    let cl = Cluster::start_with(3, 0, &settings);
    let all: BTreeSet<i32> = [1, 2, 3].into();
    let boot = cl.node(1).bootstrap();
    wait_registered(&boot, &all);
    let everyone = [1, 2, 3].map(|i| cl.node(i).bootstrap()).join(",");
    create_topic(&boot, "k848", 6, 3);
    let group = "k848-group";
    let (a, na) = counting_consumer(&everyone, group, "k848");
    let (b, nb) = counting_consumer(&everyone, group, "k848");
    let rebalances = || {
        na.load(std::sync::atomic::Ordering::SeqCst) + nb.load(std::sync::atomic::Ordering::SeqCst)
    };
    let mut seen = BTreeSet::new();
    poll_both([&a, &b], &mut seen, "a 3/3 split", &|_| {
        owned(&a).len() == 3 && owned(&b).len() == 3
    });
    let mut settled = (rebalances(), Instant::now());
    while settled.1.elapsed() < Duration::from_secs(3) {
        let until = Instant::now() + Duration::from_millis(200);
        poll_both([&a, &b], &mut seen, "a poll", &|_| Instant::now() > until);
        if rebalances() != settled.0 {
            settled = (rebalances(), Instant::now());
        }
    }
    let before = (owned(&a), owned(&b), rebalances());
    produce(&boot, "k848", 120);
    poll_both([&a, &b], &mut seen, "120 records", &|s| s.len() >= 120);
    a.commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
        .expect("commit a");
    b.commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
        .expect("commit b");

    let offsets_partition = offsets_partition_of(group, 50);
    let leader = |via: &str| -> i32 {
        let (_, parts) = metadata(via, Some("__consumer_offsets"));
        parts.get(offsets_partition).map(|p| p.0).unwrap_or(-1)
    };
    let coordinator = leader(&boot);
    assert!(coordinator > 0);
    let pid = cl.node(coordinator).child.as_ref().expect("running").id();
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP");
    let survivor = *all.iter().find(|n| **n != coordinator).unwrap();
    let sb = cl.node(survivor).bootstrap();
    wait_for("another coordinator", Duration::from_secs(30), || {
        let l = leader(&sb);
        (l > 0 && l != coordinator).then_some(())
    });
    wait_led_without(&sb, "k848", coordinator);
    produce_from(&sb, "k848", 120, 120);
    poll_both([&a, &b], &mut seen, "120 more records", &|s| s.len() >= 240);
    a.commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
        .expect("commit a on the new coordinator");
    b.commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
        .expect("commit b on the new coordinator");
    let committed_meanwhile = (committed_of(&a), committed_of(&b));
    assert_eq!(
        (owned(&a), owned(&b), rebalances()),
        before,
        "the members kept their partitions and epochs across the coordinator's failover"
    );

    signal("-CONT");
    wait_for(
        "the first coordinator leads again",
        Duration::from_secs(60),
        || (leader(&sb) == coordinator).then_some(()),
    );
    // The members find it; what it reports is what the other coordinator stored.
    let until = Instant::now() + Duration::from_secs(3);
    poll_both([&a, &b], &mut seen, "3 s", &|_| Instant::now() > until);
    assert_eq!(
        (committed_of(&a), committed_of(&b)),
        committed_meanwhile,
        "the returning coordinator reloaded the commits made while it was away"
    );
    produce_from(&sb, "k848", 240, 60);
    poll_both([&a, &b], &mut seen, "60 more records", &|s| s.len() >= 300);
    assert_eq!((owned(&a), owned(&b), rebalances()), before);
}

/// KIP-841: a follower that dies caught up on an idle partition is fenced, and the leader does
/// not propose it back into the ISR. (It did: the follower still looked caught up, and as a
/// pending addition it counted for the high watermark until `replica.lag.time.max.ms`, 30 s,
/// had passed since its last fetch, holding up every acks=all write to the partition, and so
/// every group's store in an idle `__consumer_offsets` partition.)
#[test]
fn a_fenced_follower_does_not_hold_up_acks_all_writes() {
    let mut cl = Cluster::start(3, 0);
    let all: BTreeSet<i32> = [1, 2, 3].into();
    let boot = cl.node(1).bootstrap();
    wait_registered(&boot, &all);
    let (ok, out) = fjord_cli(&[
        "topics",
        "--bootstrap",
        &boot,
        "create",
        "idle3",
        "--replica-assignment",
        "1:2:3",
    ]);
    assert!(ok, "{out}");
    produce(&boot, "idle3", 10);
    wait_for(
        "node 1 leads with all three in sync",
        Duration::from_secs(30),
        || {
            leader_of(&boot, "idle3")
                .filter(|p| p.0 == 1 && p.2.len() == 3)
                .map(|_| ())
        },
    );
    cl.node_mut(3).kill9();
    wait_for("node 3 out of the ISR", Duration::from_secs(30), || {
        leader_of(&boot, "idle3")
            .filter(|p| p.0 == 1 && !p.2.contains(&3))
            .map(|_| ())
    });
    // A few ISR checks later, the leader has not asked to take the fenced node back.
    std::thread::sleep(Duration::from_secs(3));
    let asked: Vec<String> = cl
        .node(1)
        .log()
        .lines()
        .filter(|l| l.contains("idle3-0: asking to change the ISR") && l.ends_with(", 3]"))
        .map(str::to_owned)
        .collect();
    assert!(asked.is_empty(), "{asked:#?}");
    let started = Instant::now();
    let (acked, errors) = produce_acks_all_no_retry(&boot, "idle3", 5);
    assert_eq!(
        (acked, &errors),
        (5, &Default::default()),
        "acks=all with nodes 1 and 2 in sync"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "acknowledged in {:?}",
        started.elapsed()
    );
}

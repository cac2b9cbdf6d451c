//! Admin subcommands (`fjord topics …`, `fjord groups …`): a small blocking Kafka client that
//! talks to any running broker over the protocol, like kafka-topics.sh / kafka-consumer-groups.sh.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};

pub struct Client {
    stream: TcpStream,
    correlation_id: i32,
}

fn sb(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

/// An error code with the broker's message, if any: `NotController (41) (why)`.
fn refusal(code: i16, message: Option<StrBytes>) -> String {
    let why = message.map(|m| format!(" ({m})")).unwrap_or_default();
    format!("{}{why}", err_name(code))
}

fn err_name(code: i16) -> String {
    match kafka_protocol::ResponseError::try_from_code(code) {
        Some(e) => format!("{e:?} ({code})"),
        None => format!("error {code}"),
    }
}

impl Client {
    pub fn connect(addr: &str) -> anyhow::Result<Client> {
        use std::net::ToSocketAddrs;
        let resolved = addr
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve {addr}"))?
            .next()
            .ok_or_else(|| anyhow!("{addr} resolves to no address"))?;
        let stream = TcpStream::connect_timeout(&resolved, Duration::from_secs(5))
            .with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client {
            stream,
            correlation_id: 0,
        })
    }

    pub fn call<R: Request>(&mut self, version: i16, req: &R) -> anyhow::Result<R::Response> {
        self.correlation_id += 1;
        let mut h = RequestHeader::default();
        h.request_api_key = R::KEY;
        h.request_api_version = version;
        h.correlation_id = self.correlation_id;
        h.client_id = Some(sb("fjord-admin"));
        let mut buf = BytesMut::new();
        h.encode(&mut buf, R::header_version(version))?;
        req.encode(&mut buf, version)?;
        let mut frame = (buf.len() as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(&buf);
        self.stream.write_all(&frame)?;
        let mut len = [0u8; 4];
        self.stream
            .read_exact(&mut len)
            .context("broker closed the connection")?;
        let n = i32::from_be_bytes(len);
        if !(4..=(256 << 20)).contains(&n) {
            bail!("bad response size {n}");
        }
        let mut body = vec![0u8; n as usize];
        self.stream.read_exact(&mut body)?;
        let mut b = Bytes::from(body);
        let rh = ResponseHeader::decode(
            &mut b,
            <R::Response as HeaderVersion>::header_version(version),
        )?;
        if rh.correlation_id != self.correlation_id {
            bail!("correlation id mismatch");
        }
        R::Response::decode(&mut b, version)
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum TopicsCmd {
    /// List topics with their partition counts.
    List {
        /// Include internal topics.
        #[arg(long)]
        all: bool,
    },
    /// Partitions, leaders, replicas, ISR, offsets and configs of a topic (of every topic
    /// when none is named), optionally only the partitions in trouble.
    Describe {
        topic: Option<String>,
        /// Only partitions whose ISR is smaller than their replica set.
        #[arg(long)]
        under_replicated: bool,
        /// Only partitions whose ISR is smaller than the topic's min.insync.replicas (acks=all
        /// writes are refused there).
        #[arg(long)]
        under_min_isr: bool,
        /// Only partitions without a leader.
        #[arg(long)]
        offline: bool,
    },
    /// Create a topic.
    Create {
        topic: String,
        #[arg(long, default_value_t = 1)]
        partitions: i32,
        /// Replicas per partition (default: the cluster's default, 1).
        #[arg(long, value_name = "N")]
        replication_factor: Option<i16>,
        /// Place the replicas yourself, as Kafka's kafka-topics: partitions separated by
        /// commas, each one's brokers by colons, preferred leader first (`1:2:3,2:3:1`).
        #[arg(long, value_name = "ASSIGNMENT", conflicts_with_all = ["partitions", "replication_factor"])]
        replica_assignment: Option<String>,
        /// Topic config, repeatable: --config retention.ms=60000
        #[arg(long = "config", value_name = "KEY=VALUE")]
        configs: Vec<String>,
    },
    /// Delete a topic.
    Delete { topic: String },
    /// Elect leaders (Kafka's kafka-leader-election): give partitions back to their preferred
    /// replica, or a leaderless partition a leader from outside its ISR (unclean: the records
    /// only the lost replicas held are gone).
    ElectLeaders {
        /// preferred or unclean.
        #[arg(long = "election-type", value_parser = ["preferred", "unclean"], default_value = "preferred")]
        election_type: String,
        /// Only this topic's partitions (default: every partition; preferred only).
        #[arg(long)]
        topic: Option<String>,
        /// Only this partition of the topic.
        #[arg(long, requires = "topic")]
        partition: Option<i32>,
    },
    /// Move partitions' replicas to other brokers (Kafka's kafka-reassign-partitions): the new
    /// replicas copy the log from the leader and the old ones are removed once the new ones are
    /// in sync. Without a change to make, lists the moves in progress.
    Reassign {
        /// The topic whose partitions move (all topics with --drain when omitted).
        topic: Option<String>,
        /// The new replicas, as for create: `4:2:3,2:3:4` gives partition 0, 1, … theirs in
        /// order (with --partition, one list for that partition).
        #[arg(long, value_name = "ASSIGNMENT", requires = "topic")]
        replica_assignment: Option<String>,
        /// Only this partition (with --replica-assignment or --cancel).
        #[arg(long, requires = "topic")]
        partition: Option<i32>,
        /// Move every replica off this broker, each onto the live broker holding the fewest
        /// replicas that the partition does not use yet (before removing the broker).
        #[arg(long, value_name = "BROKER", conflicts_with_all = ["replica_assignment", "cancel"])]
        drain: Option<i32>,
        /// Cancel the moves in progress (of the topic, or of --partition): the partitions go
        /// back to their original replicas.
        #[arg(long, requires = "topic", conflicts_with = "replica_assignment")]
        cancel: bool,
        /// Hold the copying to this many bytes per second per broker (KIP-73): the leaders of
        /// the moving partitions serve, and their new replicas fetch, no faster while outside
        /// the ISR. Sets the brokers' leader/follower.replication.throttled.rate (cluster-wide)
        /// and the topics' *.replication.throttled.replicas; `--wait` removes them at the end.
        #[arg(long, value_name = "BYTES_PER_SEC", conflicts_with = "cancel")]
        throttle: Option<u64>,
        /// Wait until the moves are complete, printing their progress, then remove the
        /// throttles (without a move: wait for the moves in progress).
        #[arg(long)]
        wait: bool,
    },
}

/// Kafka's `--replica-assignment` format: `1:2:3,2:3:1`.
fn parse_assignment(s: &str) -> anyhow::Result<Vec<Vec<i32>>> {
    s.split(',')
        .map(|p| {
            p.split(':')
                .map(|b| {
                    b.trim()
                        .parse::<i32>()
                        .map_err(|_| anyhow!("--replica-assignment: {b:?} is not a broker id"))
                })
                .collect()
        })
        .collect()
}

#[derive(clap::Subcommand, Debug)]
pub enum GroupsCmd {
    /// List consumer groups and their states.
    List,
    /// State, members, assignment and per-partition lag of a group.
    Describe { group: String },
}

fn metadata(c: &mut Client, topics: Option<Vec<String>>) -> anyhow::Result<MetadataResponse> {
    let mut req = MetadataRequest::default();
    // Looking at a topic must never create it.
    req.allow_auto_topic_creation = false;
    req.topics = topics.map(|ts| {
        ts.into_iter()
            .map(|t| {
                let mut x = metadata_request::MetadataRequestTopic::default();
                x.name = Some(TopicName(sb(&t)));
                x
            })
            .collect()
    });
    c.call(12, &req)
}

/// (earliest, latest) per partition.
fn offsets(
    c: &mut Client,
    topic: &str,
    partitions: &[i32],
) -> anyhow::Result<BTreeMap<i32, (i64, i64)>> {
    let mut out = BTreeMap::new();
    for ts in [-2i64, -1] {
        let mut req = ListOffsetsRequest::default();
        req.replica_id = BrokerId(-1);
        let mut t = list_offsets_request::ListOffsetsTopic::default();
        t.name = TopicName(sb(topic));
        for p in partitions {
            let mut lp = list_offsets_request::ListOffsetsPartition::default();
            lp.partition_index = *p;
            lp.timestamp = ts;
            t.partitions.push(lp);
        }
        req.topics.push(t);
        let resp = c.call(5, &req)?;
        for t in resp.topics {
            for p in t.partitions {
                let e = out.entry(p.partition_index).or_insert((-1, -1));
                if ts == -2 {
                    e.0 = p.offset;
                } else {
                    e.1 = p.offset;
                }
            }
        }
    }
    Ok(out)
}

/// (topic, partition, broker) → how far that replica is behind its leader's high watermark,
/// from every reachable broker's DescribeLogDirs.
fn replica_lags(
    brokers: &BTreeMap<i32, String>,
    topic: Option<&str>,
) -> BTreeMap<(String, i32, i32), i64> {
    let mut out = BTreeMap::new();
    for (id, addr) in brokers {
        let Ok(mut c) = Client::connect(addr) else {
            continue;
        };
        // Every replica the broker holds (null topics), filtered here.
        let mut req = DescribeLogDirsRequest::default();
        req.topics = None;
        let Ok(resp) = c.call(4, &req) else {
            continue;
        };
        for dir in resp.results {
            for t in dir.topics {
                if topic.is_some_and(|want| want != t.name.0.as_str()) {
                    continue;
                }
                for p in t.partitions {
                    out.insert((t.name.0.to_string(), p.partition_index, *id), p.offset_lag);
                }
            }
        }
    }
    out
}

/// One config value of a topic, as DescribeConfigs gives it.
fn topic_config(c: &mut Client, topic: &str, key: &str) -> anyhow::Result<Option<String>> {
    let mut req = DescribeConfigsRequest::default();
    let mut r = describe_configs_request::DescribeConfigsResource::default();
    r.resource_type = 2;
    r.resource_name = sb(topic);
    r.configuration_keys = Some(vec![sb(key)]);
    req.resources.push(r);
    let resp = c.call(1, &req)?;
    Ok(resp
        .results
        .into_iter()
        .flat_map(|r| r.configs)
        .find(|cfg| cfg.name.as_str() == key)
        .and_then(|cfg| cfg.value.map(|v| v.to_string())))
}

fn print_topic_configs(c: &mut Client, topic: &str) -> anyhow::Result<()> {
    let mut req = DescribeConfigsRequest::default();
    let mut r = describe_configs_request::DescribeConfigsResource::default();
    r.resource_type = 2;
    r.resource_name = sb(topic);
    req.resources.push(r);
    let resp = c.call(1, &req)?;
    println!("Configs:");
    for res in resp.results {
        for cfg in res.configs {
            let src = if cfg.config_source == 1 {
                " (topic)"
            } else {
                ""
            };
            println!(
                "  {}={}{src}",
                cfg.name,
                cfg.value.map(|v| v.to_string()).unwrap_or_default()
            );
        }
    }
    Ok(())
}

pub fn topics(bootstrap: &str, cmd: TopicsCmd) -> anyhow::Result<()> {
    let mut c = Client::connect(bootstrap)?;
    match cmd {
        TopicsCmd::List { all } => {
            let md = metadata(&mut c, None)?;
            println!("{:<40} {:>10}  ID", "TOPIC", "PARTITIONS");
            let mut rows: Vec<_> = md.topics.iter().filter(|t| all || !t.is_internal).collect();
            rows.sort_by(|a, b| {
                a.name
                    .as_ref()
                    .map(|n| n.0.as_str())
                    .cmp(&b.name.as_ref().map(|n| n.0.as_str()))
            });
            for t in rows {
                let name = t.name.as_ref().map(|n| n.0.to_string()).unwrap_or_default();
                println!("{:<40} {:>10}  {}", name, t.partitions.len(), t.topic_id);
            }
        }
        TopicsCmd::Describe {
            topic,
            under_replicated,
            under_min_isr,
            offline,
        } => {
            let filtered = under_replicated || under_min_isr || offline;
            let md = metadata(&mut c, topic.clone().map(|t| vec![t]))?;
            let brokers: BTreeMap<i32, String> = md
                .brokers
                .iter()
                .map(|b| (b.node_id.0, format!("{}:{}", b.host, b.port)))
                .collect();
            let mut topics: Vec<_> = md
                .topics
                .iter()
                .filter(|t| topic.is_some() || !t.is_internal || filtered)
                .collect();
            topics.sort_by_key(|t| t.name.as_ref().map(|n| n.0.to_string()));
            // Offsets come from each partition's leader, lag from every broker's log dirs.
            let mut leaders: BTreeMap<i32, Client> = BTreeMap::new();
            let lags = replica_lags(&brokers, topic.as_deref());
            for t in topics {
                let name = t.name.as_ref().map(|n| n.0.to_string()).unwrap_or_default();
                if t.error_code != 0 {
                    bail!("{name}: {}", err_name(t.error_code));
                }
                let min_isr = topic_config(&mut c, &name, "min.insync.replicas")?
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(1);
                let mut parts: Vec<_> = t.partitions.iter().collect();
                parts.sort_by_key(|p| p.partition_index);
                let rows: Vec<_> = parts
                    .into_iter()
                    .filter(|p| {
                        let rf = p.replica_nodes.len();
                        let isr = p.isr_nodes.len();
                        !filtered
                            || (under_replicated && isr < rf)
                            || (under_min_isr && isr < min_isr.min(rf.max(1)))
                            || (offline && p.leader_id.0 < 0)
                    })
                    .collect();
                if filtered && rows.is_empty() {
                    continue;
                }
                println!(
                    "Topic: {name}  Id: {}  Partitions: {}  ReplicationFactor: {}  min.insync.replicas: {min_isr}{}",
                    t.topic_id,
                    t.partitions.len(),
                    t.partitions.first().map_or(0, |p| p.replica_nodes.len()),
                    if t.is_internal { "  Internal" } else { "" }
                );
                println!(
                    "{:>9} {:>7} {:>6} {:>12} {:>12} {:>12} {:>12}  FOLLOWER LAG",
                    "PARTITION", "LEADER", "EPOCH", "REPLICAS", "ISR", "EARLIEST", "LATEST"
                );
                for p in rows {
                    let ids = |v: &[BrokerId]| {
                        v.iter()
                            .map(|b| b.0.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    let leader = p.leader_id.0;
                    let (lo, hi) = match brokers.get(&leader) {
                        Some(addr) if leader >= 0 => {
                            if let std::collections::btree_map::Entry::Vacant(e) =
                                leaders.entry(leader)
                            {
                                if let Ok(lc) = Client::connect(addr) {
                                    e.insert(lc);
                                }
                            }
                            leaders
                                .get_mut(&leader)
                                .and_then(|lc| offsets(lc, &name, &[p.partition_index]).ok())
                                .and_then(|o| o.get(&p.partition_index).copied())
                                .unwrap_or((-1, -1))
                        }
                        _ => (-1, -1),
                    };
                    let lag: Vec<String> = p
                        .replica_nodes
                        .iter()
                        .filter(|r| r.0 != leader)
                        .map(|r| {
                            lags.get(&(name.clone(), p.partition_index, r.0))
                                .map_or(format!("{}:?", r.0), |l| format!("{}:{l}", r.0))
                        })
                        .collect();
                    println!(
                        "{:>9} {:>7} {:>6} {:>12} {:>12} {:>12} {:>12}  {}",
                        p.partition_index,
                        if leader < 0 {
                            "none".to_string()
                        } else {
                            leader.to_string()
                        },
                        p.leader_epoch,
                        ids(&p.replica_nodes),
                        ids(&p.isr_nodes),
                        lo,
                        hi,
                        lag.join(" ")
                    );
                }
                if topic.is_some() {
                    // Moves in progress (the replica lists above hold both old and new).
                    let list = |v: &[i32]| {
                        v.iter()
                            .map(|b| b.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    for (_, p, _, adding, removing) in reassignments(&mut c, Some(&name))? {
                        println!(
                            "  partition {p} is moving: adding {}, removing {}",
                            list(&adding),
                            list(&removing)
                        );
                    }
                }
                if topic.is_some() && !filtered {
                    print_topic_configs(&mut c, &name)?;
                }
            }
        }
        TopicsCmd::Create {
            topic,
            partitions,
            replication_factor,
            replica_assignment,
            configs,
        } => {
            let mut req = CreateTopicsRequest::default();
            req.timeout_ms = 30_000;
            let mut t = create_topics_request::CreatableTopic::default();
            t.name = TopicName(sb(&topic));
            let mut partitions = partitions;
            match replica_assignment {
                Some(a) => {
                    let a = parse_assignment(&a)?;
                    partitions = a.len() as i32;
                    t.num_partitions = -1;
                    t.replication_factor = -1;
                    for (i, replicas) in a.into_iter().enumerate() {
                        let mut x = create_topics_request::CreatableReplicaAssignment::default();
                        x.partition_index = i as i32;
                        x.broker_ids = replicas.into_iter().map(BrokerId).collect();
                        t.assignments.push(x);
                    }
                }
                None => {
                    t.num_partitions = partitions;
                    t.replication_factor = replication_factor.unwrap_or(-1);
                }
            }
            for kv in configs {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--config wants KEY=VALUE, got {kv:?}"))?;
                let mut cfg = create_topics_request::CreatableTopicConfig::default();
                cfg.name = sb(k);
                cfg.value = Some(sb(v));
                t.configs.push(cfg);
            }
            req.topics.push(t);
            let resp = c.call(5, &req)?;
            for r in resp.topics {
                if r.error_code != 0 {
                    bail!(
                        "cannot create {topic}: {}{}",
                        err_name(r.error_code),
                        r.error_message
                            .map(|m| format!(": {m}"))
                            .unwrap_or_default()
                    );
                }
            }
            println!("created topic {topic} with {partitions} partitions");
        }
        TopicsCmd::Delete { topic } => {
            let mut req = DeleteTopicsRequest::default();
            req.timeout_ms = 30_000;
            req.topic_names.push(TopicName(sb(&topic)));
            let resp = c.call(4, &req)?;
            for r in resp.responses {
                if r.error_code != 0 {
                    bail!("cannot delete {topic}: {}", err_name(r.error_code));
                }
            }
            println!("deleted topic {topic}");
        }
        TopicsCmd::ElectLeaders {
            election_type,
            topic,
            partition,
        } => elect_leaders(&mut c, &election_type, topic, partition)?,
        TopicsCmd::Reassign {
            topic,
            replica_assignment,
            partition,
            drain,
            cancel,
            throttle,
            wait,
        } => {
            let moves: Vec<(String, i32, Option<Vec<i32>>)> = if let Some(d) = drain {
                drain_plan(&mut c, topic.as_deref(), d)?
            } else if let Some(a) = replica_assignment {
                let topic = topic.clone().unwrap_or_default();
                let a = parse_assignment(&a)?;
                match partition {
                    Some(p) if a.len() == 1 => vec![(topic, p, Some(a[0].clone()))],
                    Some(_) => bail!("--partition takes one replica list: 4:2:3"),
                    None => a
                        .into_iter()
                        .enumerate()
                        .map(|(p, r)| (topic.clone(), p as i32, Some(r)))
                        .collect(),
                }
            } else if cancel {
                let topic = topic.clone().unwrap_or_default();
                let running = reassignments(&mut c, Some(&topic))?;
                running
                    .into_iter()
                    .filter(|r| partition.is_none_or(|p| p == r.1))
                    .map(|r| (r.0, r.1, None))
                    .collect()
            } else {
                let running = reassignments(&mut c, topic.as_deref())?;
                print_reassignments(&running);
                if wait {
                    let moves: Vec<_> = running.into_iter().map(|r| (r.0, r.1, None)).collect();
                    wait_reassigned(&mut c, &moves)?;
                    clear_throttles(&mut c, &moves, None)?;
                }
                return Ok(());
            };
            if moves.is_empty() {
                println!("nothing to move");
                return Ok(());
            }
            let added = match throttle {
                Some(rate) => Some(set_throttles(&mut c, &moves, rate)?),
                None => None,
            };
            alter_reassignments(&mut c, &moves)?;
            if wait && !cancel {
                wait_reassigned(&mut c, &moves)?;
                if let Some(added) = &added {
                    clear_throttles(&mut c, &moves, Some(added))?;
                }
            }
        }
    }
    Ok(())
}

/// A running move: (topic, partition, replicas, adding, removing).
type Reassignment = (String, i32, Vec<i32>, Vec<i32>, Vec<i32>);

fn reassignments(c: &mut Client, topic: Option<&str>) -> anyhow::Result<Vec<Reassignment>> {
    let mut req = ListPartitionReassignmentsRequest::default();
    req.timeout_ms = 30_000;
    if let Some(topic) = topic {
        let md = metadata(c, Some(vec![topic.to_string()]))?;
        let t = md
            .topics
            .first()
            .ok_or_else(|| anyhow!("no answer for {topic}"))?;
        if t.error_code != 0 {
            bail!("{topic}: {}", err_name(t.error_code));
        }
        let mut x =
            list_partition_reassignments_request::ListPartitionReassignmentsTopics::default();
        x.name = TopicName(sb(topic));
        x.partition_indexes = t.partitions.iter().map(|p| p.partition_index).collect();
        req.topics = Some(vec![x]);
    }
    let resp = c.call(0, &req)?;
    if resp.error_code != 0 {
        bail!("ListPartitionReassignments: {}", err_name(resp.error_code));
    }
    let ids = |v: &[BrokerId]| v.iter().map(|b| b.0).collect::<Vec<i32>>();
    let mut out = Vec::new();
    for t in resp.topics {
        for p in t.partitions {
            out.push((
                t.name.0.to_string(),
                p.partition_index,
                ids(&p.replicas),
                ids(&p.adding_replicas),
                ids(&p.removing_replicas),
            ));
        }
    }
    Ok(out)
}

fn print_reassignments(running: &[Reassignment]) {
    if running.is_empty() {
        println!("no reassignment in progress");
        return;
    }
    println!(
        "{:<40} {:>9}  {:<16} {:<12} REMOVING",
        "TOPIC", "PARTITION", "REPLICAS", "ADDING"
    );
    let list = |v: &[i32]| {
        v.iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    for (t, p, r, a, d) in running {
        println!(
            "{t:<40} {p:>9}  {:<16} {:<12} {}",
            list(r),
            list(a),
            list(d)
        );
    }
}

/// Every replica on `broker` moved to another live broker: the one holding the fewest replicas
/// (counting the moves planned so far) among those the partition does not use, lowest id on a
/// tie. The replacement takes the drained broker's place in the list (and its leadership
/// preference).
fn drain_plan(
    c: &mut Client,
    topic: Option<&str>,
    broker: i32,
) -> anyhow::Result<Vec<(String, i32, Option<Vec<i32>>)>> {
    let running = reassignments(c, topic)?;
    if !running.is_empty() {
        print_reassignments(&running);
        bail!("finish (--wait) or --cancel the moves in progress before draining a broker");
    }
    let md = metadata(c, topic.map(|t| vec![t.to_string()]))?;
    let mut load: BTreeMap<i32, usize> = md
        .brokers
        .iter()
        .map(|b| (b.node_id.0, 0))
        .filter(|(id, _)| *id != broker)
        .collect();
    for t in &md.topics {
        for p in &t.partitions {
            for r in &p.replica_nodes {
                if let Some(n) = load.get_mut(&r.0) {
                    *n += 1;
                }
            }
        }
    }
    let mut out = Vec::new();
    for t in &md.topics {
        let name = t.name.as_ref().map(|n| n.0.to_string()).unwrap_or_default();
        if t.error_code != 0 {
            bail!("{name}: {}", err_name(t.error_code));
        }
        for p in &t.partitions {
            let replicas: Vec<i32> = p.replica_nodes.iter().map(|b| b.0).collect();
            if !replicas.contains(&broker) {
                continue;
            }
            let Some((&to, _)) = load
                .iter()
                .filter(|(id, _)| !replicas.contains(id))
                .min_by_key(|(id, n)| (**n, **id))
            else {
                bail!(
                    "{name}-{}: no live broker outside {replicas:?} to move to",
                    p.partition_index
                );
            };
            *load.entry(to).or_default() += 1;
            let target = replicas
                .iter()
                .map(|r| if *r == broker { to } else { *r })
                .collect();
            out.push((name.clone(), p.partition_index, Some(target)));
        }
    }
    out.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    Ok(out)
}

fn alter_reassignments(
    c: &mut Client,
    moves: &[(String, i32, Option<Vec<i32>>)],
) -> anyhow::Result<()> {
    use alter_partition_reassignments_request::{ReassignablePartition, ReassignableTopic};
    let mut req = AlterPartitionReassignmentsRequest::default();
    req.timeout_ms = 30_000;
    req.allow_replication_factor_change = true;
    for (topic, p, target) in moves {
        let name = TopicName(sb(topic));
        let at = match req.topics.iter().position(|t| t.name == name) {
            Some(i) => i,
            None => {
                let mut t = ReassignableTopic::default();
                t.name = name;
                req.topics.push(t);
                req.topics.len() - 1
            }
        };
        let mut rp = ReassignablePartition::default();
        rp.partition_index = *p;
        rp.replicas = target
            .as_ref()
            .map(|v| v.iter().map(|b| BrokerId(*b)).collect());
        req.topics[at].partitions.push(rp);
    }
    let resp = c.call(0, &req)?;
    if resp.error_code != 0 {
        bail!(
            "AlterPartitionReassignments: {}",
            refusal(resp.error_code, resp.error_message)
        );
    }
    let mut failed = 0;
    for t in resp.responses {
        for p in t.partitions {
            let target = moves
                .iter()
                .find(|m| m.0 == t.name.0.as_str() && m.1 == p.partition_index)
                .and_then(|m| m.2.clone());
            if p.error_code == 0 {
                match target {
                    Some(r) => println!("{}-{}: moving to {r:?}", t.name.0, p.partition_index),
                    None => println!("{}-{}: move cancelled", t.name.0, p.partition_index),
                }
            } else {
                failed += 1;
                println!(
                    "{}-{}: {}",
                    t.name.0,
                    p.partition_index,
                    refusal(p.error_code, p.error_message)
                );
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} partitions were not reassigned", moves.len());
    }
    Ok(())
}

const LEADER_THROTTLED: &str = "leader.replication.throttled.replicas";
const FOLLOWER_THROTTLED: &str = "follower.replication.throttled.replicas";
const THROTTLE_RATES: [&str; 2] = [
    "leader.replication.throttled.rate",
    "follower.replication.throttled.rate",
];

/// Kafka's IncrementalAlterConfigs operations.
const SET: i8 = 0;
const DELETE: i8 = 1;
const APPEND: i8 = 2;
const SUBTRACT: i8 = 3;

/// One IncrementalAlterConfigs resource: (name, operation, value) per change.
fn alter_configs(
    c: &mut Client,
    resource_type: i8,
    name: &str,
    changes: &[(&str, i8, Option<String>)],
) -> anyhow::Result<()> {
    use incremental_alter_configs_request::{AlterConfigsResource, AlterableConfig};
    let mut res = AlterConfigsResource::default();
    res.resource_type = resource_type;
    res.resource_name = sb(name);
    for (k, op, v) in changes {
        let mut x = AlterableConfig::default();
        x.name = sb(k);
        x.config_operation = *op;
        x.value = v.as_deref().map(sb);
        res.configs.push(x);
    }
    let mut req = IncrementalAlterConfigsRequest::default();
    req.resources.push(res);
    let resp = c.call(1, &req)?;
    for r in resp.responses {
        if r.error_code != 0 {
            bail!(
                "configs of {name}: {}",
                refusal(r.error_code, r.error_message)
            );
        }
    }
    Ok(())
}

/// Throttled replicas added per topic: (leader list items, follower list items).
type Throttles = BTreeMap<String, (Vec<String>, Vec<String>)>;

/// KIP-73 throttles for `moves`, as Kafka's reassignment tool sets them: the replicas the
/// partitions have now serve (leader side), the replicas they gain fetch (follower side), both
/// at `rate` bytes a second on every broker. The topics' lists are appended to (another move's
/// entries stay); returns what was added.
fn set_throttles(
    c: &mut Client,
    moves: &[(String, i32, Option<Vec<i32>>)],
    rate: u64,
) -> anyhow::Result<Throttles> {
    let mut added = Throttles::new();
    let topics: std::collections::BTreeSet<&str> = moves.iter().map(|m| m.0.as_str()).collect();
    for topic in topics {
        let md = metadata(c, Some(vec![topic.to_string()]))?;
        let current: BTreeMap<i32, Vec<i32>> = md
            .topics
            .iter()
            .flat_map(|t| t.partitions.iter())
            .map(|p| {
                (
                    p.partition_index,
                    p.replica_nodes.iter().map(|b| b.0).collect(),
                )
            })
            .collect();
        let (mut leaders, mut followers) = (Vec::new(), Vec::new());
        for (_, p, target) in moves.iter().filter(|m| m.0 == topic) {
            let now = current.get(p).cloned().unwrap_or_default();
            leaders.extend(now.iter().map(|b| format!("{p}:{b}")));
            let target = target.clone().unwrap_or_default();
            followers.extend(
                target
                    .iter()
                    .filter(|b| !now.contains(b))
                    .map(|b| format!("{p}:{b}")),
            );
        }
        let changes: Vec<(&str, i8, Option<String>)> = [
            (LEADER_THROTTLED, &leaders),
            (FOLLOWER_THROTTLED, &followers),
        ]
        .into_iter()
        .filter(|(_, items)| !items.is_empty())
        .map(|(k, items)| (k, APPEND, Some(items.join(","))))
        .collect();
        alter_configs(c, 2, topic, &changes)?;
        added.insert(topic.to_string(), (leaders, followers));
    }
    let rates: Vec<(&str, i8, Option<String>)> = THROTTLE_RATES
        .iter()
        .map(|k| (*k, SET, Some(rate.to_string())))
        .collect();
    alter_configs(c, 4, "", &rates)?;
    println!("throttled to {rate} bytes/s per broker while the replicas copy");
    Ok(added)
}

/// Lifts the throttles once the moves are done: the list entries `added` (from
/// `set_throttles`), or with `None` the topics' whole lists (Kafka's `--verify` way); a list
/// left empty is removed, and so are the brokers' rates.
fn clear_throttles(
    c: &mut Client,
    moves: &[(String, i32, Option<Vec<i32>>)],
    added: Option<&Throttles>,
) -> anyhow::Result<()> {
    if moves.is_empty() {
        return Ok(());
    }
    let topics: std::collections::BTreeSet<&str> = moves.iter().map(|m| m.0.as_str()).collect();
    for topic in topics {
        if let Some((leaders, followers)) = added.and_then(|a| a.get(topic)) {
            let changes: Vec<(&str, i8, Option<String>)> =
                [(LEADER_THROTTLED, leaders), (FOLLOWER_THROTTLED, followers)]
                    .into_iter()
                    .filter(|(_, items)| !items.is_empty())
                    .map(|(k, items)| (k, SUBTRACT, Some(items.join(","))))
                    .collect();
            alter_configs(c, 2, topic, &changes)?;
        }
        let mut gone = Vec::new();
        for k in [LEADER_THROTTLED, FOLLOWER_THROTTLED] {
            let left = topic_config(c, topic, k)?.unwrap_or_default();
            if added.is_none() || left.trim().is_empty() {
                gone.push((k, DELETE, None));
            }
        }
        if !gone.is_empty() {
            alter_configs(c, 2, topic, &gone)?;
        }
    }
    let rates: Vec<(&str, i8, Option<String>)> =
        THROTTLE_RATES.iter().map(|k| (*k, DELETE, None)).collect();
    alter_configs(c, 4, "", &rates)?;
    println!("throttles removed");
    Ok(())
}

/// Polls until none of `moves` is in progress any more (bounded by the moves themselves: the
/// operator interrupts a move that cannot finish, or cancels it).
fn wait_reassigned(
    c: &mut Client,
    moves: &[(String, i32, Option<Vec<i32>>)],
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut last_print = std::time::Instant::now();
    loop {
        let running: Vec<Reassignment> = reassignments(c, None)?
            .into_iter()
            .filter(|r| moves.iter().any(|m| m.0 == r.0 && m.1 == r.1))
            .collect();
        // Done means: no longer listed, and the metadata shows the target replicas.
        let landed = running.is_empty() && {
            let topics: Vec<String> = moves.iter().map(|m| m.0.clone()).collect();
            let md = metadata(c, Some(topics))?;
            moves.iter().all(|(t, p, target)| {
                let Some(target) = target else { return true };
                md.topics
                    .iter()
                    .filter(|x| x.name.as_ref().is_some_and(|n| n.0.as_str() == t))
                    .flat_map(|x| x.partitions.iter())
                    .any(|x| {
                        x.partition_index == *p
                            && x.replica_nodes.iter().map(|b| b.0).collect::<Vec<_>>() == *target
                    })
            })
        };
        if landed {
            println!(
                "{} partitions moved in {:.1} s",
                moves.len(),
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            println!(
                "{} of {} partitions still moving",
                running.len(),
                moves.len()
            );
            last_print = std::time::Instant::now();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn elect_leaders(
    c: &mut Client,
    election_type: &str,
    topic: Option<String>,
    partition: Option<i32>,
) -> anyhow::Result<()> {
    let mut req = ElectLeadersRequest::default();
    req.election_type = if election_type == "unclean" { 1 } else { 0 };
    req.timeout_ms = 30_000;
    if let Some(topic) = &topic {
        let parts: Vec<i32> = match partition {
            Some(p) => vec![p],
            None => {
                let md = metadata(c, Some(vec![topic.clone()]))?;
                let t = md
                    .topics
                    .first()
                    .ok_or_else(|| anyhow!("no answer for {topic}"))?;
                if t.error_code != 0 {
                    bail!("{topic}: {}", err_name(t.error_code));
                }
                t.partitions.iter().map(|p| p.partition_index).collect()
            }
        };
        let mut tp = elect_leaders_request::TopicPartitions::default();
        tp.topic = TopicName(sb(topic));
        tp.partitions = parts;
        req.topic_partitions = Some(vec![tp]);
    } else if election_type == "unclean" {
        bail!("an unclean election names its partitions: --topic (and --partition)");
    }
    let resp = c.call(2, &req)?;
    if resp.error_code != 0 {
        bail!("ElectLeaders: {}", err_name(resp.error_code));
    }
    let mut elected = 0;
    for t in resp.replica_election_results {
        for p in t.partition_result {
            if p.error_code == 0 {
                elected += 1;
                println!("{}-{}: elected", t.topic.0, p.partition_id);
            } else {
                println!(
                    "{}-{}: {}",
                    t.topic.0,
                    p.partition_id,
                    refusal(p.error_code, p.error_message)
                );
            }
        }
    }
    println!("{elected} leaders elected");
    Ok(())
}

pub fn groups(bootstrap: &str, cmd: GroupsCmd) -> anyhow::Result<()> {
    let mut c = Client::connect(bootstrap)?;
    match cmd {
        GroupsCmd::List => {
            let resp = c.call(4, &ListGroupsRequest::default())?;
            if resp.error_code != 0 {
                bail!("list groups: {}", err_name(resp.error_code));
            }
            println!("{:<40} {:<22} PROTOCOL TYPE", "GROUP", "STATE");
            let mut gs = resp.groups;
            gs.sort_by(|a, b| a.group_id.0.as_str().cmp(b.group_id.0.as_str()));
            for g in gs {
                println!(
                    "{:<40} {:<22} {}",
                    g.group_id.0, g.group_state, g.protocol_type
                );
            }
        }
        GroupsCmd::Describe { group } => {
            let mut req = DescribeGroupsRequest::default();
            req.groups.push(GroupId(sb(&group)));
            let resp = c.call(5, &req)?;
            let g = resp
                .groups
                .first()
                .ok_or_else(|| anyhow!("no answer for {group}"))?;
            if g.error_code != 0 {
                bail!("{group}: {}", err_name(g.error_code));
            }
            println!(
                "Group: {group}  State: {}  Protocol: {} {}",
                g.group_state, g.protocol_type, g.protocol_data
            );
            let mut owner: BTreeMap<(String, i32), String> = BTreeMap::new();
            println!("Members: {}", g.members.len());
            for m in &g.members {
                let mut assigned = Vec::new();
                let mut a = m.member_assignment.clone();
                if a.remaining() >= 2 {
                    let v = a.get_i16();
                    if let Ok(asg) = ConsumerProtocolAssignment::decode(&mut a, v.clamp(0, 3)) {
                        for tp in asg.assigned_partitions {
                            for p in tp.partitions {
                                owner.insert((tp.topic.0.to_string(), p), m.member_id.to_string());
                                assigned.push(format!("{}-{p}", tp.topic.0));
                            }
                        }
                    }
                }
                let inst = m
                    .group_instance_id
                    .as_ref()
                    .map(|i| format!(" instance={i}"))
                    .unwrap_or_default();
                println!(
                    "  {} client={} host={}{inst} partitions=[{}]",
                    m.member_id,
                    m.client_id,
                    m.client_host,
                    assigned.join(",")
                );
            }
            let mut req = OffsetFetchRequest::default();
            req.group_id = GroupId(sb(&group));
            req.topics = None;
            let resp = c.call(7, &req)?;
            if resp.error_code != 0 {
                bail!("offsets of {group}: {}", err_name(resp.error_code));
            }
            println!(
                "{:<30} {:>9} {:>12} {:>12} {:>10}  MEMBER",
                "TOPIC", "PARTITION", "COMMITTED", "LOG-END", "LAG"
            );
            for t in resp.topics {
                let name = t.name.0.to_string();
                let parts: Vec<i32> = t.partitions.iter().map(|p| p.partition_index).collect();
                let offs = offsets(&mut c, &name, &parts).unwrap_or_default();
                for p in t.partitions {
                    let end = offs.get(&p.partition_index).map(|o| o.1).unwrap_or(-1);
                    let lag = if p.committed_offset >= 0 && end >= 0 {
                        (end - p.committed_offset).to_string()
                    } else {
                        "-".into()
                    };
                    let m = owner
                        .get(&(name.clone(), p.partition_index))
                        .cloned()
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "{:<30} {:>9} {:>12} {:>12} {:>10}  {m}",
                        name, p.partition_index, p.committed_offset, end, lag
                    );
                }
            }
        }
    }
    Ok(())
}

/// One broker config of the broker at `bootstrap` (DescribeConfigs on its own node id), or None
/// when it does not report that key.
pub fn broker_config(bootstrap: &str, key: &str) -> anyhow::Result<Option<String>> {
    let mut c = Client::connect(bootstrap)?;
    let meta = metadata(&mut c, Some(Vec::new()))?;
    let node = meta
        .brokers
        .first()
        .map(|b| b.node_id.0)
        .unwrap_or(0)
        .to_string();
    let mut req = DescribeConfigsRequest::default();
    let mut r = describe_configs_request::DescribeConfigsResource::default();
    r.resource_type = 4;
    r.resource_name = sb(&node);
    r.configuration_keys = Some(vec![sb(key)]);
    req.resources.push(r);
    let resp = c.call(1, &req)?;
    for res in resp.results {
        if res.error_code != 0 {
            bail!("DescribeConfigs: {}", err_name(res.error_code));
        }
        for cfg in res.configs {
            if cfg.name.as_str() == key {
                return Ok(cfg.value.map(|v| v.to_string()));
            }
        }
    }
    Ok(None)
}

#[derive(clap::Subcommand, Debug)]
pub enum ClusterCmd {
    /// Nodes (id, address, rack, fenced), the active controller, the quorum's term and each
    /// voter's lag behind the committed metadata log.
    Status,
}

pub fn cluster(bootstrap: &str, cmd: ClusterCmd) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::Status => print!("{}", cluster_status(bootstrap)?),
    }
    Ok(())
}

/// DescribeCluster (fenced brokers included) and DescribeQuorum, as text.
pub fn cluster_status(bootstrap: &str) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let mut c = Client::connect(bootstrap)?;
    let mut req = DescribeClusterRequest::default();
    req.include_fenced_brokers = true;
    req.endpoint_type = 1;
    let cl = c.call(2, &req)?;
    if cl.error_code != 0 {
        bail!("DescribeCluster: {}", err_name(cl.error_code));
    }
    let mut q = DescribeQuorumRequest::default();
    let mut t = describe_quorum_request::TopicData::default();
    t.topic_name = TopicName(sb("__cluster_metadata"));
    let mut p = describe_quorum_request::PartitionData::default();
    p.partition_index = 0;
    t.partitions.push(p);
    q.topics.push(t);
    let qr = c.call(1, &q)?;
    let mut out = String::new();
    writeln!(out, "cluster id: {}", cl.cluster_id)?;
    if qr.error_code != 0 {
        writeln!(out, "quorum: {}", err_name(qr.error_code))?;
    }
    let part = qr.topics.first().and_then(|t| t.partitions.first());
    if let Some(p) = part {
        if p.leader_id.0 >= 0 {
            writeln!(
                out,
                "active controller: node {} (term {}), metadata log committed up to {}",
                p.leader_id.0, p.leader_epoch, p.high_watermark
            )?;
        } else {
            writeln!(out, "active controller: none (term {})", p.leader_epoch)?;
        }
    }
    writeln!(out, "nodes:")?;
    writeln!(
        out,
        "  {:<6} {:<24} {:<10} {:<8} STATE",
        "ID", "ADDRESS", "RACK", "SHARDS"
    )?;
    let mut brokers: Vec<_> = cl.brokers.iter().collect();
    brokers.sort_by_key(|b| b.broker_id.0);
    for b in brokers {
        let addr = format!("{}:{}", b.host, b.port);
        // Each live node says how many shards it runs (a broker config); "?" if unreachable.
        let shards = if b.is_fenced {
            None
        } else {
            broker_config(&addr, "fjord.shards").ok().flatten()
        };
        writeln!(
            out,
            "  {:<6} {:<24} {:<10} {:<8} {}",
            b.broker_id.0,
            addr,
            b.rack
                .as_ref()
                .map(|r| r.to_string())
                .unwrap_or_else(|| "-".into()),
            shards.unwrap_or_else(|| "?".into()),
            if b.is_fenced { "fenced" } else { "unfenced" }
        )?;
    }
    if let Some(p) = part {
        writeln!(out, "voters:")?;
        writeln!(out, "  {:<6} {:<12} LAG", "ID", "LOG END")?;
        for v in &p.current_voters {
            writeln!(
                out,
                "  {:<6} {:<12} {}",
                v.replica_id.0,
                v.log_end_offset,
                (p.high_watermark - v.log_end_offset).max(0)
            )?;
        }
    }
    Ok(out)
}

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
    /// Partitions, leaders, offsets and configs of a topic.
    Describe { topic: String },
    /// Create a topic.
    Create {
        topic: String,
        #[arg(long, default_value_t = 1)]
        partitions: i32,
        /// Replicas per partition (default: the cluster's default, 1).
        #[arg(long, value_name = "N")]
        replication_factor: Option<i16>,
        /// Topic config, repeatable: --config retention.ms=60000
        #[arg(long = "config", value_name = "KEY=VALUE")]
        configs: Vec<String>,
    },
    /// Delete a topic.
    Delete { topic: String },
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
        TopicsCmd::Describe { topic } => {
            let md = metadata(&mut c, Some(vec![topic.clone()]))?;
            let t = md
                .topics
                .first()
                .ok_or_else(|| anyhow!("no answer for {topic}"))?;
            if t.error_code != 0 {
                bail!("{topic}: {}", err_name(t.error_code));
            }
            println!(
                "Topic: {topic}  Id: {}  Partitions: {}  Internal: {}",
                t.topic_id,
                t.partitions.len(),
                t.is_internal
            );
            let parts: Vec<i32> = t.partitions.iter().map(|p| p.partition_index).collect();
            let offs = offsets(&mut c, &topic, &parts)?;
            println!(
                "{:>9} {:>7} {:>12} {:>12} {:>10}",
                "PARTITION", "LEADER", "EARLIEST", "LATEST", "ISR"
            );
            let mut sorted: Vec<_> = t.partitions.iter().collect();
            sorted.sort_by_key(|p| p.partition_index);
            for p in sorted {
                let (lo, hi) = offs.get(&p.partition_index).copied().unwrap_or((-1, -1));
                let isr: Vec<String> = p.isr_nodes.iter().map(|b| b.0.to_string()).collect();
                println!(
                    "{:>9} {:>7} {:>12} {:>12} {:>10}",
                    p.partition_index,
                    p.leader_id.0,
                    lo,
                    hi,
                    isr.join(",")
                );
            }
            let mut req = DescribeConfigsRequest::default();
            let mut r = describe_configs_request::DescribeConfigsResource::default();
            r.resource_type = 2;
            r.resource_name = sb(&topic);
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
        }
        TopicsCmd::Create {
            topic,
            partitions,
            replication_factor,
            configs,
        } => {
            let mut req = CreateTopicsRequest::default();
            req.timeout_ms = 30_000;
            let mut t = create_topics_request::CreatableTopic::default();
            t.name = TopicName(sb(&topic));
            t.num_partitions = partitions;
            t.replication_factor = replication_factor.unwrap_or(-1);
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
    }
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

//! The controller listener of a voter (its address in `--controllers`): raft messages from the
//! other voters, metadata fetches from brokers, and the broker-to-controller Kafka requests
//! (BrokerRegistration, BrokerHeartbeat, CreateTopics, DeleteTopics, AllocateProducerIds,
//! DescribeQuorum). A voter that is not the active controller relays a Kafka request to the one
//! that is (waiting a moment for an election if there is none), so a broker may ask any voter.

use std::rc::Rc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::AsyncWriteExt;
use glommio::net::{TcpListener, TcpStream};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use protobuf::Message as _;
use uuid::Uuid;

use super::quorum::{ProposeFail, QuorumService};
use super::wire::{self, Conn};
use crate::cluster::meta_properties::decode_uuid;
use crate::cluster::{metadata, topic_config};
use crate::quorum::controller::{CreateTopicRequest, HeartbeatRequest, RegisterRequest};
use crate::quorum::record::Listener;
use crate::server::errors as ec;

/// Connections a voter accepts at once on its controller listener; more wait in the backlog.
const CONNECTIONS_MAX: usize = 1024;

pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::{FromRawFd, IntoRawFd};
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let sk = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    sk.set_reuse_address(true)?;
    sk.bind(&addr.into())?;
    sk.listen(128)?;
    // Safety: a freshly bound, listening TCP socket we own and hand over whole.
    Ok(unsafe { TcpListener::from_raw_fd(sk.into_raw_fd()) })
}

pub async fn accept_loop(listener: TcpListener, svc: Rc<QuorumService>) {
    let open = Rc::new(std::cell::Cell::new(0usize));
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("controller listener: accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if open.get() >= CONNECTIONS_MAX {
            continue;
        }
        open.set(open.get() + 1);
        let svc = svc.clone();
        let open = open.clone();
        glommio::spawn_local(async move {
            if let Err(e) = connection(stream, svc).await {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    tracing::debug!("controller listener: connection closed: {e}");
                }
            }
            open.set(open.get() - 1);
        })
        .detach();
    }
}

async fn connection(mut stream: TcpStream, svc: Rc<QuorumService>) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    loop {
        let frame = wire::read_frame(&mut stream).await?;
        let key = i16::from_be_bytes([frame[0], frame[1]]);
        match key {
            wire::RAFT_MESSAGE_KEY => {
                let msg = raft::eraftpb::Message::parse_from_bytes(&frame[8..])
                    .map_err(|e| std::io::Error::other(format!("bad raft message: {e}")))?;
                svc.step(msg);
            }
            wire::METADATA_FETCH_KEY => {
                let out = metadata_fetch(&svc, &frame).await?;
                stream.write_all(&out).await?;
            }
            _ => {
                let Some(out) = kafka_request(&svc, &frame).await? else {
                    // No controller to answer: the broker tries again, elsewhere.
                    return Ok(());
                };
                stream.write_all(&out).await?;
            }
        }
    }
}

async fn metadata_fetch(svc: &QuorumService, frame: &Bytes) -> std::io::Result<Vec<u8>> {
    let mut b = frame.slice(4..);
    let correlation_id = b.get_i32();
    if b.remaining() < 12 {
        return Err(std::io::Error::other("short metadata fetch"));
    }
    let known = b.get_u64();
    let wait_ms = b.get_u32().min(10_000);
    if svc.image().applied_index <= known {
        svc.wait_applied_past(known, Duration::from_millis(wait_ms as u64))
            .await;
    }
    let img = svc.image();
    let mut body = BytesMut::new();
    body.put_i32(correlation_id);
    body.put_u64(img.applied_index);
    body.put_i32(svc.leader_id().unwrap_or(-1));
    body.put_u64(svc.term());
    if img.applied_index > known {
        body.extend_from_slice(&img.encode_snapshot());
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.put_i32(body.len() as i32);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Answers (or relays) one Kafka request; `None` when no controller can answer it now.
async fn kafka_request(svc: &Rc<QuorumService>, frame: &Bytes) -> std::io::Result<Option<Vec<u8>>> {
    Box::pin(kafka_request_inner(svc, frame, true)).await
}

/// `outer`: a frame from the connection; an envelope's inner request is not an envelope again.
async fn kafka_request_inner(
    svc: &Rc<QuorumService>,
    frame: &Bytes,
    outer: bool,
) -> std::io::Result<Option<Vec<u8>>> {
    if frame.len() < 8 {
        return Err(std::io::Error::other("a request shorter than its header"));
    }
    if !svc.is_leader() {
        let Some(leader) = svc.wait_for_leader(Duration::from_secs(5)).await else {
            return Ok(None);
        };
        if leader != svc.node.node_id {
            let Some(addr) = svc.voter_addr(leader) else {
                return Ok(None);
            };
            let mut out = Vec::with_capacity(4 + frame.len());
            out.put_i32(frame.len() as i32);
            out.extend_from_slice(frame);
            let relayed = async {
                let mut c = Conn::connect(addr, Duration::from_secs(1)).await?;
                c.relay(&out).await
            };
            return match relayed.await {
                Ok(resp) => {
                    let mut w = Vec::with_capacity(4 + resp.len());
                    w.put_i32(resp.len() as i32);
                    w.extend_from_slice(&resp);
                    Ok(Some(w))
                }
                Err(_) => Ok(None),
            };
        }
    }
    let mut peek = &frame[..];
    let api_key = peek.get_i16();
    let version = peek.get_i16();
    let Ok(key) = ApiKey::try_from(api_key) else {
        return Err(std::io::Error::other(format!("unknown api key {api_key}")));
    };
    let range = key.valid_versions();
    if version < range.min || version > range.max {
        return Err(std::io::Error::other(format!(
            "unsupported version {version} of {key:?}"
        )));
    }
    let mut body = frame.clone();
    let header = RequestHeader::decode(&mut body, key.request_header_version(version))
        .map_err(|e| std::io::Error::other(format!("bad request header: {e}")))?;
    let mut probe = crate::server::bounded_decode::ProbeBuf::new(body.clone());
    let probed = crate::server::bounded_decode::probe_decode(key, &mut probe, version)
        .map_err(|e| std::io::Error::other(format!("malformed {key:?}: {e}")))?;
    let req = if probe.clamps == 0 {
        probed
    } else {
        RequestKind::decode(key, &mut body, version)
            .map_err(|e| std::io::Error::other(format!("malformed {key:?}: {e}")))?
    };
    let resp = match req {
        RequestKind::BrokerRegistration(r) => {
            ResponseKind::BrokerRegistration(register(svc, r).await)
        }
        RequestKind::BrokerHeartbeat(r) => ResponseKind::BrokerHeartbeat(heartbeat(svc, r).await),
        RequestKind::CreateTopics(r) => ResponseKind::CreateTopics(create_topics(svc, r).await),
        RequestKind::DeleteTopics(r) => {
            ResponseKind::DeleteTopics(delete_topics(svc, version, r).await)
        }
        RequestKind::AllocateProducerIds(r) => {
            ResponseKind::AllocateProducerIds(allocate_producer_ids(svc, r).await)
        }
        RequestKind::DescribeQuorum(_) => ResponseKind::DescribeQuorum(describe_quorum(svc)),
        RequestKind::Envelope(e) if outer => {
            // KIP-590: a broker forwards its client's request; answer it as its own.
            let mut r = EnvelopeResponse::default();
            match Box::pin(kafka_request_inner(svc, &e.request_data, false)).await {
                Ok(Some(out)) => r.response_data = Some(Bytes::from(out).slice(4..)),
                _ => r.error_code = ec::NOT_CONTROLLER,
            }
            ResponseKind::Envelope(r)
        }
        RequestKind::AlterPartition(r) => {
            ResponseKind::AlterPartition(alter_partition(svc, r).await)
        }
        RequestKind::CreatePartitions(r) => {
            ResponseKind::CreatePartitions(create_partitions(svc, r).await)
        }
        RequestKind::IncrementalAlterConfigs(r) => {
            ResponseKind::IncrementalAlterConfigs(alter_configs(svc, r).await)
        }
        RequestKind::ElectLeaders(r) => ResponseKind::ElectLeaders(elect_leaders(svc, r).await),
        RequestKind::AlterPartitionReassignments(r) => {
            ResponseKind::AlterPartitionReassignments(alter_reassignments(svc, r).await)
        }
        _ => {
            return Err(std::io::Error::other(format!(
                "{key:?} is not a controller request"
            )))
        }
    };
    let mut out = BytesMut::new();
    out.put_i32(0);
    let mut h = ResponseHeader::default();
    h.correlation_id = header.correlation_id;
    h.encode(&mut out, key.response_header_version(version))
        .map_err(std::io::Error::other)?;
    resp.encode(&mut out, version)
        .map_err(std::io::Error::other)?;
    let n = (out.len() - 4) as i32;
    out[..4].copy_from_slice(&n.to_be_bytes());
    Ok(Some(out.to_vec()))
}

/// ElectLeaders (KIP-460): preferred or unclean elections for the named partitions (all
/// partitions when none are named), in one change. Kafka's answers: ELECTION_NOT_NEEDED,
/// PREFERRED_LEADER_NOT_AVAILABLE, ELIGIBLE_LEADERS_NOT_AVAILABLE, UNKNOWN_TOPIC_OR_PARTITION;
/// asked for every partition, only the ones that needed an election are listed.
async fn elect_leaders(svc: &QuorumService, r: ElectLeadersRequest) -> ElectLeadersResponse {
    use crate::quorum::controller::{elect, ElectionKind};
    let mut resp = ElectLeadersResponse::default();
    let kind = match r.election_type {
        0 => ElectionKind::Preferred,
        1 => ElectionKind::Unclean,
        other => {
            resp.error_code = ec::INVALID_REQUEST;
            tracing::debug!("ElectLeaders with unknown election type {other}");
            return resp;
        }
    };
    let named: Option<Vec<(String, i32)>> = r.topic_partitions.as_ref().map(|ts| {
        ts.iter()
            .flat_map(|t| t.partitions.iter().map(|p| (t.topic.0.to_string(), *p)))
            .collect()
    });
    type Outcome = Vec<(String, i32, i16, Option<String>)>;
    let outcome = svc
        .propose(|_, img, _, _| {
            let mut results: Outcome = Vec::new();
            let mut recs = Vec::new();
            let wanted: Vec<(String, i32)> = match &named {
                Some(n) => n.clone(),
                None => img
                    .topics
                    .values()
                    .flat_map(|t| t.partitions.keys().map(|p| (t.name.clone(), *p)))
                    .collect(),
            };
            for (topic, p) in wanted {
                let part = img
                    .topic_ids
                    .get(&topic)
                    .and_then(|id| img.topics.get(id))
                    .and_then(|t| t.partitions.get(&p));
                let Some(part) = part else {
                    let msg = format!("{topic}-{p} does not exist");
                    results.push((topic, p, ec::UNKNOWN_TOPIC_OR_PARTITION, Some(msg)));
                    continue;
                };
                match elect(img, part, kind) {
                    Ok(next) => {
                        recs.push(crate::quorum::record::MetadataRecord::Partition(next));
                        results.push((topic, p, ec::NONE, None));
                    }
                    Err(crate::quorum::controller::ControllerError::ElectionNotNeeded)
                        if named.is_none() => {}
                    Err(e) => results.push((topic, p, e.code(), Some(e.to_string()))),
                }
            }
            Ok((results, recs))
        })
        .await;
    match outcome {
        Ok(results) => {
            for (topic, p, code, msg) in results {
                let name = TopicName(StrBytes::from_string(topic));
                let at = match resp
                    .replica_election_results
                    .iter()
                    .position(|x| x.topic == name)
                {
                    Some(i) => i,
                    None => {
                        let mut t = elect_leaders_response::ReplicaElectionResult::default();
                        t.topic = name;
                        resp.replica_election_results.push(t);
                        resp.replica_election_results.len() - 1
                    }
                };
                let mut pr = elect_leaders_response::PartitionResult::default();
                pr.partition_id = p;
                pr.error_code = code;
                pr.error_message = msg.map(StrBytes::from_string);
                resp.replica_election_results[at].partition_result.push(pr);
            }
        }
        Err(f) => resp.error_code = fail_code(&f),
    }
    resp
}

/// AlterPartitionReassignments (KIP-455): every named partition's move (or cancel) judged by
/// the controller's rules, all in one change.
async fn alter_reassignments(
    svc: &QuorumService,
    r: AlterPartitionReassignmentsRequest,
) -> AlterPartitionReassignmentsResponse {
    use alter_partition_reassignments_response::{
        ReassignablePartitionResponse, ReassignableTopicResponse,
    };
    let wanted: Vec<(String, i32, Option<Vec<i32>>)> = r
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(|p| {
                let target = p.replicas.as_ref().map(|v| v.iter().map(|b| b.0).collect());
                (t.name.0.to_string(), p.partition_index, target)
            })
        })
        .collect();
    let allow_rf_change = r.allow_replication_factor_change;
    type Outcome = Vec<(String, i32, i16, Option<String>)>;
    let outcome = svc
        .propose(|ctl, img, _, _| {
            // Each partition is judged against the image its predecessors in the request leave.
            let mut after = img.clone();
            let mut results: Outcome = Vec::new();
            let mut recs = Vec::new();
            for (topic, p, target) in &wanted {
                match ctl.alter_reassignment(&after, topic, *p, target.as_deref(), allow_rf_change)
                {
                    Ok(changes) => {
                        after.apply_all(&changes);
                        recs.extend(changes);
                        results.push((topic.clone(), *p, ec::NONE, None));
                    }
                    Err(e) => results.push((topic.clone(), *p, e.code(), Some(e.to_string()))),
                }
            }
            Ok((results, recs))
        })
        .await;
    let mut resp = AlterPartitionReassignmentsResponse::default();
    resp.allow_replication_factor_change = allow_rf_change;
    match outcome {
        Ok(results) => {
            for (topic, p, code, msg) in results {
                let name = TopicName(StrBytes::from_string(topic));
                let at = match resp.responses.iter().position(|x| x.name == name) {
                    Some(i) => i,
                    None => {
                        let mut t = ReassignableTopicResponse::default();
                        t.name = name;
                        resp.responses.push(t);
                        resp.responses.len() - 1
                    }
                };
                let mut pr = ReassignablePartitionResponse::default();
                pr.partition_index = p;
                pr.error_code = code;
                pr.error_message = msg.map(StrBytes::from_string);
                resp.responses[at].partitions.push(pr);
            }
        }
        Err(f) => {
            resp.error_code = fail_code(&f);
            if let ProposeFail::Rejected(e) = &f {
                resp.error_message = Some(StrBytes::from_string(e.to_string()));
            }
        }
    }
    resp
}

fn fail_code(f: &ProposeFail) -> i16 {
    match f {
        ProposeFail::NotLeader => ec::NOT_CONTROLLER,
        ProposeFail::Rejected(e) => e.code(),
        ProposeFail::Timeout => ec::REQUEST_TIMED_OUT,
    }
}

async fn register(svc: &QuorumService, r: BrokerRegistrationRequest) -> BrokerRegistrationResponse {
    let req = RegisterRequest {
        broker_id: r.broker_id.0,
        incarnation_id: r.incarnation_id,
        directory_id: r.log_dirs.first().copied().unwrap_or(Uuid::nil()),
        cluster_id: decode_uuid(r.cluster_id.as_str()),
        listeners: r
            .listeners
            .iter()
            .map(|l| Listener {
                name: l.name.to_string(),
                host: l.host.to_string(),
                port: l.port,
            })
            .collect(),
        rack: r.rack.as_ref().map(|s| s.to_string()),
    };
    let mut resp = BrokerRegistrationResponse::default();
    match svc
        .propose(|ctl, img, index, now| {
            ctl.register(img, &req, index as i64, now)
                .map(|recs| (index as i64, recs))
        })
        .await
    {
        Ok(epoch) => {
            tracing::info!(
                "broker {} registered with epoch {epoch} (incarnation {})",
                req.broker_id,
                req.incarnation_id
            );
            resp.broker_epoch = epoch;
        }
        Err(f) => {
            if let ProposeFail::Rejected(e) = &f {
                tracing::warn!("registration of broker {} refused: {e}", req.broker_id);
            }
            resp.error_code = fail_code(&f);
            resp.broker_epoch = -1;
        }
    }
    resp
}

async fn heartbeat(svc: &QuorumService, r: BrokerHeartbeatRequest) -> BrokerHeartbeatResponse {
    let req = HeartbeatRequest {
        broker_id: r.broker_id.0,
        broker_epoch: r.broker_epoch,
        metadata_offset: r.current_metadata_offset.max(0) as u64,
        want_shutdown: r.want_shut_down,
    };
    let mut resp = BrokerHeartbeatResponse::default();
    match svc
        .propose(|ctl, img, _, now| ctl.heartbeat(img, &req, now))
        .await
    {
        Ok(reply) => {
            resp.is_fenced = reply.fenced;
            resp.is_caught_up = !reply.fenced;
            resp.should_shut_down = reply.should_shut_down;
        }
        Err(f) => {
            resp.error_code = fail_code(&f);
            resp.is_fenced = true;
        }
    }
    resp
}

/// Kafka's `default.replication.factor`.
const DEFAULT_REPLICATION_FACTOR: i32 = 1;

async fn create_topics(svc: &QuorumService, r: CreateTopicsRequest) -> CreateTopicsResponse {
    let mut resp = CreateTopicsResponse::default();
    for t in r.topics {
        let name = t.name.0.to_string();
        let mut res = create_topics_response::CreatableTopicResult::default();
        res.name = t.name.clone();
        res.num_partitions = -1;
        res.replication_factor = -1;
        let mut configs = std::collections::BTreeMap::new();
        let mut refused: Option<(i16, String)> = None;
        if let Err(m) = metadata::valid_topic_name(&name) {
            if name != crate::group::OFFSETS_TOPIC {
                refused = Some((ec::INVALID_TOPIC_EXCEPTION, m));
            }
        }
        // An operator's placement: partition i's replicas, preferred leader first.
        let assignment: Option<Vec<Vec<i32>>> = (!t.assignments.is_empty()).then(|| {
            let mut a: Vec<_> = t.assignments.iter().collect();
            a.sort_by_key(|x| x.partition_index);
            a.iter()
                .map(|x| x.broker_ids.iter().map(|b| b.0).collect())
                .collect()
        });
        if assignment.is_some() {
            let indexes: Vec<i32> = {
                let mut v: Vec<i32> = t.assignments.iter().map(|x| x.partition_index).collect();
                v.sort_unstable();
                v
            };
            if indexes.iter().enumerate().any(|(i, p)| *p != i as i32) {
                refused.get_or_insert((
                    ec::INVALID_REPLICA_ASSIGNMENT,
                    "assignments must name partitions 0..n once each".into(),
                ));
            }
            if t.num_partitions != -1 || t.replication_factor != -1 {
                refused.get_or_insert((
                    ec::INVALID_REQUEST,
                    "give either assignments or partitions and replication factor, not both".into(),
                ));
            }
        }
        for c in &t.configs {
            let v = c.value.as_ref().map(|v| v.to_string()).unwrap_or_default();
            if let Err(m) = topic_config::validate(c.name.as_str(), &v) {
                refused.get_or_insert((ec::INVALID_CONFIG, m));
            }
            configs.insert(c.name.to_string(), v);
        }
        let partitions = if let Some(a) = &assignment {
            a.len() as i32
        } else if t.num_partitions == -1 {
            svc.node.tuning.log.num_partitions
        } else {
            t.num_partitions
        };
        let rf = if let Some(a) = &assignment {
            a.first().map_or(0, |r| r.len() as i32)
        } else if t.replication_factor == -1 {
            DEFAULT_REPLICATION_FACTOR
        } else {
            t.replication_factor as i32
        };
        if rf < 1 {
            refused.get_or_insert((
                ec::INVALID_REPLICATION_FACTOR,
                "Replication factor must be larger than 0.".into(),
            ));
        }
        if let Some((code, msg)) = refused {
            res.error_code = code;
            res.error_message = Some(StrBytes::from_string(msg));
            resp.topics.push(res);
            continue;
        }
        let req = CreateTopicRequest {
            name: name.clone(),
            topic_id: Uuid::new_v4(),
            partitions,
            replication_factor: rf,
            configs,
            assignment,
        };
        let validate_only = r.validate_only;
        let outcome = svc
            .propose(|ctl, img, _, _| {
                let recs = ctl.create_topic(img, &req)?;
                // Validation runs the same rules and proposes nothing.
                Ok(((), if validate_only { Vec::new() } else { recs }))
            })
            .await;
        match outcome {
            Ok(()) => {
                if !validate_only {
                    res.topic_id = req.topic_id;
                    tracing::info!(
                        "created topic {name}: {partitions} partitions, replication factor {rf}"
                    );
                }
                res.num_partitions = partitions;
                res.replication_factor = rf as i16;
            }
            Err(f) => {
                res.error_code = fail_code(&f);
                if let ProposeFail::Rejected(e) = &f {
                    res.error_message = Some(StrBytes::from_string(e.to_string()));
                }
            }
        }
        resp.topics.push(res);
    }
    resp
}

async fn delete_topics(
    svc: &QuorumService,
    version: i16,
    r: DeleteTopicsRequest,
) -> DeleteTopicsResponse {
    let mut wanted: Vec<(Option<String>, Uuid)> = Vec::new();
    if version < 6 {
        wanted.extend(
            r.topic_names
                .iter()
                .map(|n| (Some(n.0.to_string()), Uuid::nil())),
        );
    } else {
        wanted.extend(
            r.topics
                .iter()
                .map(|t| (t.name.as_ref().map(|n| n.0.to_string()), t.topic_id)),
        );
    }
    let mut resp = DeleteTopicsResponse::default();
    for (name, id) in wanted {
        let name = name.or_else(|| svc.image().topics.get(&id).map(|t| t.name.clone()));
        let mut res = delete_topics_response::DeletableTopicResult::default();
        res.topic_id = id;
        let Some(name) = name else {
            res.error_code = ec::UNKNOWN_TOPIC_ID;
            resp.responses.push(res);
            continue;
        };
        res.name = Some(TopicName(StrBytes::from_string(name.clone())));
        if name == crate::group::OFFSETS_TOPIC {
            res.error_code = ec::INVALID_TOPIC_EXCEPTION;
            resp.responses.push(res);
            continue;
        }
        let topic_id = svc.image().topic_ids.get(&name).copied();
        match svc
            .propose(|ctl, img, _, _| ctl.delete_topic(img, &name).map(|r| ((), r)))
            .await
        {
            Ok(()) => {
                res.topic_id = topic_id.unwrap_or(id);
                tracing::info!("deleted topic {name}");
            }
            Err(f) => res.error_code = fail_code(&f),
        }
        resp.responses.push(res);
    }
    resp
}

async fn allocate_producer_ids(
    svc: &QuorumService,
    r: AllocateProducerIdsRequest,
) -> AllocateProducerIdsResponse {
    let mut resp = AllocateProducerIdsResponse::default();
    let block = crate::quorum::ControllerConfig::default().producer_id_block_size;
    match svc
        .propose(|ctl, img, _, _| ctl.allocate_producer_ids(img, r.broker_id.0, r.broker_epoch))
        .await
    {
        Ok(start) => {
            resp.producer_id_start = ProducerId(start);
            resp.producer_id_len = block as i32;
        }
        Err(f) => resp.error_code = fail_code(&f),
    }
    resp
}

fn describe_quorum(svc: &QuorumService) -> DescribeQuorumResponse {
    let mut p = describe_quorum_response::PartitionData::default();
    p.leader_id = BrokerId(svc.leader_id().unwrap_or(-1));
    p.leader_epoch = svc.term() as i32;
    p.high_watermark = svc.commit_index() as i64;
    for (id, matched) in svc.progress() {
        let mut v = describe_quorum_response::ReplicaState::default();
        v.replica_id = BrokerId(id as i32);
        v.log_end_offset = matched as i64;
        v.last_fetch_timestamp = -1;
        v.last_caught_up_timestamp = -1;
        p.current_voters.push(v);
    }
    let mut t = describe_quorum_response::TopicData::default();
    t.topic_name = TopicName(StrBytes::from_static_str("__cluster_metadata"));
    t.partitions.push(p);
    let mut resp = DescribeQuorumResponse::default();
    resp.topics.push(t);
    resp
}

async fn create_partitions(
    svc: &QuorumService,
    r: CreatePartitionsRequest,
) -> CreatePartitionsResponse {
    let mut resp = CreatePartitionsResponse::default();
    for t in r.topics {
        let mut res = create_partitions_response::CreatePartitionsTopicResult::default();
        res.name = t.name.clone();
        let name = t.name.0.to_string();
        // The operator's placement of the new partitions, preferred leader first.
        let assignment: Option<Vec<Vec<i32>>> = t.assignments.as_ref().map(|a| {
            a.iter()
                .map(|x| x.broker_ids.iter().map(|b| b.0).collect())
                .collect()
        });
        let validate_only = r.validate_only;
        match svc
            .propose(|ctl, img, _, _| {
                let recs = ctl.create_partitions(img, &name, t.count, assignment.as_deref())?;
                Ok(((), if validate_only { Vec::new() } else { recs }))
            })
            .await
        {
            Ok(()) => {}
            Err(f) => {
                res.error_code = fail_code(&f);
                if let ProposeFail::Rejected(e) = &f {
                    res.error_message = Some(StrBytes::from_string(e.to_string()));
                }
            }
        }
        resp.results.push(res);
    }
    resp
}

/// Topic (resource type 2) and dynamic broker (4) config changes, already resolved by the
/// forwarding broker into sets (operation 0) and deletions (operation 1), validated there.
async fn alter_configs(
    svc: &QuorumService,
    r: IncrementalAlterConfigsRequest,
) -> IncrementalAlterConfigsResponse {
    let mut resp = IncrementalAlterConfigsResponse::default();
    for res in r.resources {
        let mut out = incremental_alter_configs_response::AlterConfigsResourceResponse::default();
        out.resource_type = res.resource_type;
        out.resource_name = res.resource_name.clone();
        let name = res.resource_name.to_string();
        let mut changes = Vec::new();
        for c in &res.configs {
            let value = c.value.as_ref().map(|v| v.to_string());
            match c.config_operation {
                0 => {
                    let v = value.unwrap_or_default();
                    if res.resource_type == 2 {
                        if let Err(m) = topic_config::validate(c.name.as_str(), &v) {
                            out.error_code = ec::INVALID_CONFIG;
                            out.error_message = Some(StrBytes::from_string(m));
                        }
                    }
                    changes.push((c.name.to_string(), Some(v)));
                }
                1 => changes.push((c.name.to_string(), None)),
                _ => {
                    out.error_code = ec::INVALID_REQUEST;
                    out.error_message = Some(StrBytes::from_static_str(
                        "the controller takes resolved set and delete operations only",
                    ));
                }
            }
        }
        // A broker resource is named by its id, or "" for every broker.
        let broker = match res.resource_type {
            2 => None,
            4 if name.is_empty() => Some(crate::quorum::record::ALL_BROKERS),
            4 => match name.parse::<i32>() {
                Ok(id) if id >= 0 => Some(id),
                _ => {
                    out.error_code = ec::INVALID_REQUEST;
                    out.error_message = Some(StrBytes::from_string(format!(
                        "{name:?} is not a broker id"
                    )));
                    None
                }
            },
            _ => {
                out.error_code = ec::INVALID_REQUEST;
                None
            }
        };
        if out.error_code == ec::NONE {
            let outcome = svc
                .propose(|ctl, img, _, _| {
                    let recs = match broker {
                        Some(b) => ctl.alter_broker_configs(b, &changes)?,
                        None => ctl.alter_topic_configs(img, &name, &changes)?,
                    };
                    Ok(((), if r.validate_only { Vec::new() } else { recs }))
                })
                .await;
            if let Err(f) = outcome {
                out.error_code = fail_code(&f);
                if let ProposeFail::Rejected(e) = &f {
                    out.error_message = Some(StrBytes::from_string(e.to_string()));
                }
            }
        }
        resp.responses.push(out);
    }
    resp
}

/// AlterPartition from a partition's leader: ISR changes, judged by the controller's rules.
async fn alter_partition(svc: &QuorumService, r: AlterPartitionRequest) -> AlterPartitionResponse {
    let mut resp = AlterPartitionResponse::default();
    for t in r.topics {
        let mut tr = alter_partition_response::TopicData::default();
        tr.topic_id = t.topic_id;
        for p in t.partitions {
            let mut pr = alter_partition_response::PartitionData::default();
            pr.partition_index = p.partition_index;
            let new_isr: Vec<i32> = if p.new_isr_with_epochs.is_empty() {
                p.new_isr.iter().map(|b| b.0).collect()
            } else {
                p.new_isr_with_epochs
                    .iter()
                    .map(|b| b.broker_id.0)
                    .collect()
            };
            let outcome = svc
                .propose(|ctl, img, _, _| {
                    ctl.alter_partition(
                        img,
                        r.broker_id.0,
                        r.broker_epoch,
                        t.topic_id,
                        p.partition_index,
                        p.leader_epoch,
                        p.partition_epoch,
                        &new_isr,
                    )
                })
                .await;
            match outcome {
                Ok(next) => {
                    pr.leader_id = BrokerId(next.leader);
                    pr.leader_epoch = next.leader_epoch;
                    pr.isr = next.isr.iter().map(|b| BrokerId(*b)).collect();
                    pr.partition_epoch = next.partition_epoch;
                }
                Err(f) => pr.error_code = fail_code(&f),
            }
            tr.partitions.push(pr);
        }
        resp.topics.push(tr);
    }
    resp
}

//! `sink`: a minimal fake broker. It answers ApiVersions, Metadata, CreateTopics, ListOffsets,
//! Produce (discarding the data) and Fetch (serving a fixed pre-built batch), with as little
//! work as possible, so that `fjord-bench` against it shows the tool's own ceiling.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use anyhow::{anyhow, Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use clap::Args;
use glommio::net::TcpListener;
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, BrokerId, CreateTopicsRequest,
    CreateTopicsResponse, FetchRequest, FetchResponse, FindCoordinatorRequest,
    FindCoordinatorResponse, HeartbeatRequest, HeartbeatResponse, JoinGroupRequest,
    JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse, ListOffsetsRequest,
    ListOffsetsResponse, MetadataRequest, MetadataResponse, ProduceRequest, ProduceResponse,
    ResponseHeader, SyncGroupRequest, SyncGroupResponse,
};
use kafka_protocol::protocol::{
    decode_request_header_from_buffer, Decodable, Encodable, HeaderVersion, StrBytes,
};
use kafka_protocol::records::Compression;

use crate::produce::{build_pool, Keys};
use crate::proto::{self, ERROR_NONE, ERROR_TOPIC_ALREADY_EXISTS, ERROR_UNSUPPORTED_VERSION};
use crate::Common;

#[derive(Args, Clone, Debug)]
pub struct SinkArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub listen: String,
    /// Partitions reported for topics that were not created explicitly.
    #[arg(long, default_value_t = 16)]
    pub partitions: i32,
    /// Value size of the records in the batch served by Fetch.
    #[arg(long, default_value_t = 1024)]
    pub record_size: usize,
}

const SUPPORTED: [ApiKey; 11] = [
    ApiKey::Produce,
    ApiKey::Fetch,
    ApiKey::ListOffsets,
    ApiKey::Metadata,
    ApiKey::ApiVersions,
    ApiKey::CreateTopics,
    ApiKey::FindCoordinator,
    ApiKey::JoinGroup,
    ApiKey::SyncGroup,
    ApiKey::Heartbeat,
    ApiKey::LeaveGroup,
];

/// Records in the served batch.
const TEMPLATE_RECORDS: i64 = 100;

const ERROR_MEMBER_ID_REQUIRED: i16 = 79;

struct SinkState {
    host: String,
    port: i32,
    default_partitions: i32,
    topics: RefCell<HashMap<String, i32>>,
    template: Bytes,
    next_offset: RefCell<i64>,
    /// Group coordinator of the simplest kind: every join makes a one-member generation whose
    /// member is its own leader (enough to exercise the client's group code path).
    next_member: RefCell<u64>,
    assignments: RefCell<HashMap<String, Bytes>>,
}

pub fn run(common: &Common, args: &SinkArgs) -> Result<()> {
    let addr: std::net::SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(&args.listen)
        .with_context(|| format!("bad --listen {}", args.listen))?
        .next()
        .ok_or_else(|| anyhow!("bad --listen {}", args.listen))?;
    let template = build_pool(
        args.record_size,
        TEMPLATE_RECORDS as u64,
        Compression::None,
        Keys::None,
        1,
        9,
    )?
    .pop()
    .ok_or_else(|| anyhow!("empty template"))?;
    let mut handles = Vec::new();
    for i in 0..common.threads as usize {
        let (template, partitions) = (template.clone(), args.partitions);
        handles.push(crate::spawn_executor(
            common.cpu_for(i),
            move || async move {
                // Every executor binds the same address (SO_REUSEPORT); the kernel spreads
                // connections over them.
                let listener =
                    TcpListener::bind(addr).map_err(|e| anyhow!("cannot listen on {addr}: {e}"))?;
                if i == 0 {
                    let local = listener
                        .local_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    eprintln!("fjord-bench sink listening on {local}");
                }
                let host = if addr.ip().is_unspecified() {
                    "127.0.0.1".to_string()
                } else {
                    addr.ip().to_string()
                };
                let state = Rc::new(SinkState {
                    host,
                    port: addr.port() as i32,
                    default_partitions: partitions,
                    topics: RefCell::new(HashMap::new()),
                    template,
                    next_offset: RefCell::new(0),
                    next_member: RefCell::new(0),
                    assignments: RefCell::new(HashMap::new()),
                });
                loop {
                    let stream = match listener.accept().await {
                        Ok(s) => s,
                        Err(e) => {
                            eprintln!("sink: accept: {e}");
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let state = state.clone();
                    glommio::spawn_local(async move {
                        if let Err(e) = serve(stream, state).await {
                            eprintln!("sink: connection: {e:#}");
                        }
                    })
                    .detach();
                }
                #[allow(unreachable_code)]
                Ok::<(), anyhow::Error>(())
            },
        )?);
    }
    for h in handles {
        h.join().map_err(|e| anyhow!("sink executor: {e}"))??;
    }
    Ok(())
}

/// The requests the sink understands (kafka-protocol's RequestKind needs a feature the
/// broker crate does not enable, and enabling it here would rebuild the crate for both).
enum RequestKind {
    ApiVersions,
    Metadata(MetadataRequest),
    CreateTopics(CreateTopicsRequest),
    ListOffsets(ListOffsetsRequest),
    Produce(ProduceRequest),
    Fetch(FetchRequest),
    FindCoordinator(FindCoordinatorRequest),
    JoinGroup(JoinGroupRequest),
    SyncGroup(SyncGroupRequest),
    Heartbeat,
    LeaveGroup,
}

fn decode_request(key: ApiKey, frame: &mut Bytes, version: i16) -> Result<RequestKind> {
    Ok(match key {
        ApiKey::ApiVersions => {
            ApiVersionsRequest::decode(frame, version)?;
            RequestKind::ApiVersions
        }
        ApiKey::Metadata => RequestKind::Metadata(MetadataRequest::decode(frame, version)?),
        ApiKey::CreateTopics => {
            RequestKind::CreateTopics(CreateTopicsRequest::decode(frame, version)?)
        }
        ApiKey::ListOffsets => {
            RequestKind::ListOffsets(ListOffsetsRequest::decode(frame, version)?)
        }
        ApiKey::Produce => RequestKind::Produce(ProduceRequest::decode(frame, version)?),
        ApiKey::Fetch => RequestKind::Fetch(FetchRequest::decode(frame, version)?),
        ApiKey::FindCoordinator => {
            RequestKind::FindCoordinator(FindCoordinatorRequest::decode(frame, version)?)
        }
        ApiKey::JoinGroup => RequestKind::JoinGroup(JoinGroupRequest::decode(frame, version)?),
        ApiKey::SyncGroup => RequestKind::SyncGroup(SyncGroupRequest::decode(frame, version)?),
        ApiKey::Heartbeat => {
            HeartbeatRequest::decode(frame, version)?;
            RequestKind::Heartbeat
        }
        ApiKey::LeaveGroup => {
            LeaveGroupRequest::decode(frame, version)?;
            RequestKind::LeaveGroup
        }
        _ => return Err(anyhow!("sink does not implement {key:?}")),
    })
}

fn encode_response<R: Encodable + HeaderVersion>(
    buf: &mut BytesMut,
    correlation_id: i32,
    version: i16,
    resp: &R,
) -> Result<()> {
    buf.clear();
    buf.put_i32(0);
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(buf, R::header_version(version))?;
    resp.encode(buf, version)?;
    let n = (buf.len() - 4) as i32;
    buf[0..4].copy_from_slice(&n.to_be_bytes());
    Ok(())
}

async fn serve(stream: glommio::net::TcpStream, st: Rc<SinkState>) -> Result<()> {
    let (mut reader, mut writer) = proto::split(stream);
    let mut out = BytesMut::with_capacity(1 << 20);
    while let Some(mut frame) = reader.next().await? {
        let header = decode_request_header_from_buffer(&mut frame)?;
        let version = header.request_api_version;
        let corr = header.correlation_id;
        let key =
            ApiKey::try_from(header.request_api_key).map_err(|_| anyhow!("unknown api key"))?;
        if key == ApiKey::ApiVersions && version > 3 {
            // Kafka answers an unknown ApiVersions version in v0 layout with error 35.
            encode_response(&mut out, corr, 0, &api_versions(ERROR_UNSUPPORTED_VERSION))?;
            writer.write(&out).await?;
            continue;
        }
        let req = decode_request(key, &mut frame, version)?;
        match req {
            RequestKind::ApiVersions => {
                encode_response(&mut out, corr, version, &api_versions(ERROR_NONE))?
            }
            RequestKind::Metadata(r) => {
                let names: Vec<String> = match &r.topics {
                    Some(ts) => ts
                        .iter()
                        .filter_map(|t| t.name.as_ref().map(|n| n.0.to_string()))
                        .collect(),
                    None => st.topics.borrow().keys().cloned().collect(),
                };
                let topics = names
                    .into_iter()
                    .map(|name| {
                        let n = st
                            .topics
                            .borrow()
                            .get(&name)
                            .copied()
                            .unwrap_or(st.default_partitions);
                        MetadataResponseTopic::default()
                            .with_name(Some(proto::topic_name(&name)))
                            .with_partitions(
                                (0..n)
                                    .map(|p| {
                                        MetadataResponsePartition::default()
                                            .with_partition_index(p)
                                            .with_leader_id(BrokerId(0))
                                            .with_replica_nodes(vec![BrokerId(0)])
                                            .with_isr_nodes(vec![BrokerId(0)])
                                    })
                                    .collect(),
                            )
                    })
                    .collect();
                let resp = MetadataResponse::default()
                    .with_brokers(vec![MetadataResponseBroker::default()
                        .with_node_id(BrokerId(0))
                        .with_host(StrBytes::from_string(st.host.clone()))
                        .with_port(st.port)])
                    .with_cluster_id(Some(StrBytes::from_static_str("fjord-bench-sink")))
                    .with_controller_id(BrokerId(0))
                    .with_topics(topics);
                encode_response(&mut out, corr, version, &resp)?
            }
            RequestKind::FindCoordinator(r) => {
                // v4+ answers per key in `coordinators`; older versions in top-level fields.
                let resp = if version >= 4 {
                    FindCoordinatorResponse::default().with_coordinators(
                        r.coordinator_keys
                            .iter()
                            .map(|k| {
                                Coordinator::default()
                                    .with_key(k.clone())
                                    .with_node_id(BrokerId(0))
                                    .with_host(StrBytes::from_string(st.host.clone()))
                                    .with_port(st.port)
                            })
                            .collect(),
                    )
                } else {
                    FindCoordinatorResponse::default()
                        .with_node_id(BrokerId(0))
                        .with_host(StrBytes::from_string(st.host.clone()))
                        .with_port(st.port)
                };
                encode_response(&mut out, corr, version, &resp)?
            }
            RequestKind::JoinGroup(r) => {
                let resp = if r.member_id.is_empty() && version >= 4 {
                    let mut n = st.next_member.borrow_mut();
                    *n += 1;
                    JoinGroupResponse::default()
                        .with_error_code(ERROR_MEMBER_ID_REQUIRED)
                        .with_member_id(StrBytes::from_string(format!("sink-member-{n}")))
                } else {
                    let member = if r.member_id.is_empty() {
                        let mut n = st.next_member.borrow_mut();
                        *n += 1;
                        StrBytes::from_string(format!("sink-member-{n}"))
                    } else {
                        r.member_id.clone()
                    };
                    let proto = r.protocols.first().cloned().unwrap_or_default();
                    JoinGroupResponse::default()
                        .with_generation_id(1)
                        .with_protocol_type(Some(r.protocol_type.clone()))
                        .with_protocol_name(Some(proto.name.clone()))
                        .with_leader(member.clone())
                        .with_member_id(member.clone())
                        .with_members(vec![JoinGroupResponseMember::default()
                            .with_member_id(member)
                            .with_metadata(proto.metadata)])
                };
                encode_response(&mut out, corr, version, &resp)?
            }
            RequestKind::SyncGroup(r) => {
                for a in &r.assignments {
                    st.assignments
                        .borrow_mut()
                        .insert(a.member_id.as_str().to_string(), a.assignment.clone());
                }
                let mine = st
                    .assignments
                    .borrow()
                    .get(r.member_id.as_str())
                    .cloned()
                    .unwrap_or_default();
                let resp = SyncGroupResponse::default()
                    .with_protocol_type(r.protocol_type.clone())
                    .with_protocol_name(r.protocol_name.clone())
                    .with_assignment(mine);
                encode_response(&mut out, corr, version, &resp)?
            }
            RequestKind::Heartbeat => {
                encode_response(&mut out, corr, version, &HeartbeatResponse::default())?
            }
            RequestKind::LeaveGroup => {
                encode_response(&mut out, corr, version, &LeaveGroupResponse::default())?
            }
            RequestKind::CreateTopics(r) => {
                let mut results = Vec::new();
                for t in &r.topics {
                    let name = t.name.0.as_str().to_string();
                    let exists = st.topics.borrow().contains_key(&name);
                    let n = if t.num_partitions > 0 {
                        t.num_partitions
                    } else {
                        st.default_partitions
                    };
                    if !exists {
                        st.topics.borrow_mut().insert(name, n);
                    }
                    results.push(
                        CreatableTopicResult::default()
                            .with_name(t.name.clone())
                            .with_error_code(if exists {
                                ERROR_TOPIC_ALREADY_EXISTS
                            } else {
                                ERROR_NONE
                            })
                            .with_num_partitions(n)
                            .with_replication_factor(1),
                    );
                }
                encode_response(
                    &mut out,
                    corr,
                    version,
                    &CreateTopicsResponse::default().with_topics(results),
                )?
            }
            RequestKind::ListOffsets(r) => {
                let topics = r
                    .topics
                    .iter()
                    .map(|t| {
                        ListOffsetsTopicResponse::default()
                            .with_name(t.name.clone())
                            .with_partitions(
                                t.partitions
                                    .iter()
                                    .map(|p| {
                                        ListOffsetsPartitionResponse::default()
                                            .with_partition_index(p.partition_index)
                                            .with_timestamp(-1)
                                            // "Latest" is far away: the sink always has more.
                                            .with_offset(if p.timestamp == -1 {
                                                1 << 40
                                            } else {
                                                0
                                            })
                                    })
                                    .collect(),
                            )
                    })
                    .collect();
                encode_response(
                    &mut out,
                    corr,
                    version,
                    &ListOffsetsResponse::default().with_topics(topics),
                )?
            }
            RequestKind::Produce(r) => {
                if r.acks == 0 {
                    continue;
                }
                let responses = r
                    .topic_data
                    .iter()
                    .map(|t| {
                        TopicProduceResponse::default()
                            .with_name(t.name.clone())
                            .with_partition_responses(
                                t.partition_data
                                    .iter()
                                    .map(|p| {
                                        let mut next = st.next_offset.borrow_mut();
                                        let base = *next;
                                        *next += 1;
                                        PartitionProduceResponse::default()
                                            .with_index(p.index)
                                            .with_base_offset(base)
                                            .with_log_append_time_ms(-1)
                                    })
                                    .collect(),
                            )
                    })
                    .collect();
                encode_response(
                    &mut out,
                    corr,
                    version,
                    &ProduceResponse::default().with_responses(responses),
                )?
            }
            RequestKind::Fetch(r) => {
                let mut budget = r.max_bytes.max(0) as usize;
                let responses = r
                    .topics
                    .iter()
                    .map(|t| {
                        FetchableTopicResponse::default()
                            .with_topic(t.topic.clone())
                            .with_partitions(
                                t.partitions
                                    .iter()
                                    .map(|p| {
                                        let limit =
                                            (p.partition_max_bytes.max(0) as usize).min(budget);
                                        let copies = (limit / st.template.len()).max(1);
                                        budget = budget.saturating_sub(copies * st.template.len());
                                        let records =
                                            serve_template(&st.template, p.fetch_offset, copies);
                                        PartitionData::default()
                                            .with_partition_index(p.partition)
                                            .with_high_watermark(
                                                p.fetch_offset + copies as i64 * TEMPLATE_RECORDS,
                                            )
                                            .with_last_stable_offset(
                                                p.fetch_offset + copies as i64 * TEMPLATE_RECORDS,
                                            )
                                            .with_log_start_offset(0)
                                            .with_records(Some(records))
                                    })
                                    .collect(),
                            )
                    })
                    .collect();
                encode_response(
                    &mut out,
                    corr,
                    version,
                    &FetchResponse::default().with_responses(responses),
                )?
            }
        }
        writer.write(&out).await?;
    }
    Ok(())
}

/// `copies` of the template batch renumbered from `offset`; baseOffset lies before the CRC'd
/// range, so the CRC stays valid.
fn serve_template(template: &Bytes, offset: i64, copies: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(template.len() * copies);
    for i in 0..copies {
        let start = b.len();
        b.extend_from_slice(template);
        let base = offset + i as i64 * TEMPLATE_RECORDS;
        b[start..start + 8].copy_from_slice(&base.to_be_bytes());
    }
    b.freeze()
}

fn api_versions(error_code: i16) -> ApiVersionsResponse {
    let keys = SUPPORTED
        .iter()
        .filter_map(|k| {
            proto::implemented(*k).map(|(lo, hi)| {
                ApiVersion::default()
                    .with_api_key(*k as i16)
                    .with_min_version(lo)
                    .with_max_version(hi)
            })
        })
        .collect();
    ApiVersionsResponse::default()
        .with_error_code(error_code)
        .with_api_keys(keys)
}

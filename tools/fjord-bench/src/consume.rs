//! `consume`: a direct fetch loop over every partition (or a group member's assignment),
//! parsing only RecordBatch headers to count records and advance offsets.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use clap::{Args, ValueEnum};
use kafka_protocol::messages::consumer_protocol_assignment::TopicPartition;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::{
    ApiKey, BrokerId, ConsumerProtocolAssignment, ConsumerProtocolSubscription, FetchRequest,
    GroupId, HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest, SyncGroupRequest,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

use crate::hist::{Progress, Report};
use crate::proto::{self, error_name, BatchHeader, Client, TopicLayout, Versions};
use crate::Common;

#[derive(Args, Clone, Debug)]
pub struct ConsumeArgs {
    #[arg(long)]
    pub topic: String,
    #[arg(long, value_enum, default_value_t = From::Earliest)]
    pub from: From,
    /// Fetch response size limit (FetchRequest max_bytes).
    #[arg(long, default_value_t = 50 << 20)]
    pub fetch_max_bytes: i32,
    /// Per-partition limit (partition_max_bytes).
    #[arg(long, default_value_t = 1 << 20)]
    pub partition_max_bytes: i32,
    /// How long the broker may hold a fetch waiting for min_bytes.
    #[arg(long, default_value_t = 500)]
    pub max_wait_ms: i32,
    #[arg(long, default_value_t = 1)]
    pub min_bytes: i32,
    /// Stop after this many records.
    #[arg(long)]
    pub records: Option<u64>,
    /// Stop after this many seconds (default 10 unless --records or --until-end is given).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Stop once every partition has been read up to its high watermark.
    #[arg(long)]
    pub until_end: bool,
    /// Join this consumer group (range assignment computed by the leader) instead of reading
    /// every partition directly.
    #[arg(long)]
    pub group: Option<String>,
    /// Verify the CRC32C of every batch (costs CPU in the tool).
    #[arg(long)]
    pub check_crc: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
pub enum From {
    Earliest,
    Latest,
}

impl From {
    pub fn timestamp(self) -> i64 {
        match self {
            From::Earliest => -2,
            From::Latest => -1,
        }
    }
}

/// The Fetch request parameters of one run.
#[derive(Clone, Debug)]
pub struct FetchParams {
    pub topic: String,
    pub version: i16,
    pub max_wait_ms: i32,
    pub min_bytes: i32,
    pub max_bytes: i32,
    pub partition_max_bytes: i32,
}

/// Per-partition read position.
#[derive(Clone, Copy, Debug)]
pub struct Position {
    pub offset: i64,
    pub high_watermark: i64,
}

/// One Fetch round trip for `partitions`; calls `on_batch` for every complete batch at or past
/// the fetch position and advances positions (next offset = baseOffset + lastOffsetDelta + 1).
pub async fn fetch_once(
    client: &mut Client,
    params: &FetchParams,
    partitions: &[i32],
    positions: &mut BTreeMap<i32, Position>,
    errors: &mut BTreeMap<String, u64>,
    mut on_batch: impl FnMut(i32, i64, BatchHeader, &[u8]),
) -> Result<()> {
    let req = FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(params.max_wait_ms)
        .with_min_bytes(params.min_bytes)
        .with_max_bytes(params.max_bytes)
        .with_isolation_level(0)
        .with_session_id(0)
        .with_session_epoch(-1)
        .with_topics(vec![FetchTopic::default()
            .with_topic(proto::topic_name(&params.topic))
            .with_partitions(
                partitions
                    .iter()
                    .filter_map(|p| positions.get(p).map(|pos| (p, pos)))
                    .map(|(p, pos)| {
                        FetchPartition::default()
                            .with_partition(*p)
                            .with_current_leader_epoch(-1)
                            .with_fetch_offset(pos.offset)
                            .with_last_fetched_epoch(-1)
                            .with_log_start_offset(-1)
                            .with_partition_max_bytes(params.partition_max_bytes)
                    })
                    .collect(),
            )]);
    let resp = client.call_v(&req, params.version).await?;
    if resp.error_code != proto::ERROR_NONE {
        *errors.entry(error_name(resp.error_code)).or_insert(0) += 1;
        return Ok(());
    }
    for t in &resp.responses {
        for p in &t.partitions {
            let Some(pos) = positions.get_mut(&p.partition_index) else {
                continue;
            };
            if p.error_code != proto::ERROR_NONE {
                *errors.entry(error_name(p.error_code)).or_insert(0) += 1;
                continue;
            }
            pos.high_watermark = p.high_watermark;
            let Some(records) = &p.records else { continue };
            let fetch_offset = pos.offset;
            let mut next = pos.offset;
            proto::for_each_batch(records, |h, bytes| {
                let last = h.base_offset + h.last_offset_delta as i64;
                if last < fetch_offset {
                    return;
                }
                on_batch(p.partition_index, fetch_offset, h, bytes);
                next = next.max(last + 1);
            })
            .with_context(|| format!("partition {}", p.partition_index))?;
            pos.offset = next;
        }
    }
    Ok(())
}

/// Records of a batch at or past `fetch_offset` (a compressed batch may start before it).
pub fn new_records(fetch_offset: i64, h: &BatchHeader) -> u64 {
    if h.is_control {
        return 0;
    }
    if h.base_offset >= fetch_offset {
        h.record_count.max(0) as u64
    } else {
        (h.base_offset + h.last_offset_delta as i64 - fetch_offset + 1).max(0) as u64
    }
}

struct Shared {
    params: FetchParams,
    versions: Versions,
    from: From,
    t0: Instant,
    deadline: Option<Instant>,
    records_limit: Option<u64>,
    records_total: AtomicU64,
    until_end: bool,
    check_crc: bool,
    progress: Arc<Progress>,
}

impl Shared {
    fn should_stop(&self) -> bool {
        self.deadline.map(|d| Instant::now() >= d).unwrap_or(false)
            || self
                .records_limit
                .map(|l| self.records_total.load(Ordering::Relaxed) >= l)
                .unwrap_or(false)
    }
}

pub fn run(common: &Common, args: &ConsumeArgs) -> Result<Report> {
    let (versions, layout) = crate::produce::setup(common, &args.topic, None)?;
    run_with(common, args, versions, layout)
}

pub fn run_with(
    common: &Common,
    args: &ConsumeArgs,
    versions: Versions,
    layout: TopicLayout,
) -> Result<Report> {
    let version = versions.pick(ApiKey::Fetch)?;
    let duration = match (args.duration, args.records, args.until_end) {
        (Some(d), _, _) => Some(Duration::from_secs_f64(d.max(0.0))),
        (None, None, false) => Some(Duration::from_secs(10)),
        _ => None,
    };
    let progress = Progress::new();
    let t0 = Instant::now();
    let shared = Arc::new(Shared {
        params: FetchParams {
            topic: layout.topic.clone(),
            version,
            max_wait_ms: args.max_wait_ms,
            min_bytes: args.min_bytes,
            max_bytes: args.fetch_max_bytes,
            partition_max_bytes: args.partition_max_bytes,
        },
        versions,
        from: args.from,
        t0,
        deadline: duration.map(|d| t0 + d),
        records_limit: args.records,
        records_total: AtomicU64::new(0),
        until_end: args.until_end,
        check_crc: args.check_crc,
        progress: progress.clone(),
    });
    let mut common = common.clone();
    if args.group.is_some() {
        // One member per process keeps the group logic simple; run several processes for more.
        common.threads = 1;
    }
    let threads = common.threads as usize;
    let group = args.group.clone();
    let bootstrap = common.bootstrap.clone();
    let results = crate::run_parallel(&common, "consume", &progress, |i| {
        let mine: Vec<(i32, String)> = layout
            .partitions
            .iter()
            .enumerate()
            .filter(|(j, _)| j % threads == i)
            .map(|(_, p)| p.clone())
            .collect();
        let (shared, group, bootstrap, layout) = (
            shared.clone(),
            group.clone(),
            bootstrap.clone(),
            layout.clone(),
        );
        Box::new(move || async move {
            match group {
                None => {
                    let assignment = Rc::new(RefCell::new(Some(mine)));
                    consume_task(shared, assignment).await
                }
                Some(g) => group_member(shared, g, bootstrap, layout).await,
            }
        })
    })?;
    let mut report = Report::new("consume");
    for r in results {
        report.merge(r);
    }
    report.extra.push(("fetch_version".into(), version.into()));
    report
        .extra
        .push(("partitions".into(), layout.partitions.len().into()));
    Ok(report)
}

/// Fetches the partitions in `assignment` until told to stop; a new assignment (group
/// rebalance) replaces the partition set between two fetches.
async fn consume_task(
    sh: Arc<Shared>,
    assignment: Rc<RefCell<Option<Vec<(i32, String)>>>>,
) -> Result<Report> {
    let mut report = Report::new("consume");
    let mut clients: HashMap<String, Client> = HashMap::new();
    let mut positions: BTreeMap<i32, Position> = BTreeMap::new();
    let mut leaders: Vec<(String, Vec<i32>)> = Vec::new();
    let mut idle_rounds = 0u32;
    loop {
        if sh.should_stop() {
            break;
        }
        // Take the new assignment first: the borrow must end before the awaits below.
        let next = assignment.borrow_mut().take();
        if let Some(new) = next {
            let layout = TopicLayout {
                topic: sh.params.topic.clone(),
                partitions: new.clone(),
            };
            let ids: Vec<i32> = new.iter().map(|(p, _)| *p).collect();
            leaders = layout.by_leader(&ids);
            positions.retain(|p, _| ids.contains(p));
            for (addr, parts) in &leaders {
                if !clients.contains_key(addr) {
                    clients.insert(
                        addr.clone(),
                        Client::connect(addr, Some(sh.versions.clone())).await?,
                    );
                }
                let missing: Vec<i32> = parts
                    .iter()
                    .copied()
                    .filter(|p| !positions.contains_key(p))
                    .collect();
                if missing.is_empty() {
                    continue;
                }
                let client = clients.get_mut(addr).ok_or_else(|| anyhow!("no client"))?;
                let start =
                    proto::list_offsets(client, &sh.params.topic, &missing, sh.from.timestamp())
                        .await?;
                let end = proto::list_offsets(client, &sh.params.topic, &missing, -1).await?;
                for p in missing {
                    positions.insert(
                        p,
                        Position {
                            offset: start[&p],
                            high_watermark: end[&p],
                        },
                    );
                }
            }
        }
        if leaders.is_empty() {
            glommio::timer::sleep(Duration::from_millis(50)).await;
            continue;
        }
        if sh.until_end && positions.values().all(|p| p.offset >= p.high_watermark) {
            break;
        }
        let mut got = 0u64;
        for (addr, parts) in &leaders {
            let client = clients.get_mut(addr).ok_or_else(|| anyhow!("no client"))?;
            let (mut records, mut bytes) = (0u64, 0u64);
            let check_crc = sh.check_crc;
            let mut crc_errors = 0u64;
            fetch_once(
                client,
                &sh.params,
                parts,
                &mut positions,
                &mut report.errors,
                |_, fo, h, b| {
                    records += new_records(fo, &h);
                    bytes += h.batch_bytes as u64;
                    if check_crc && !proto::batch_crc_ok(b) {
                        crc_errors += 1;
                    }
                },
            )
            .await?;
            if crc_errors > 0 {
                *report.errors.entry("CORRUPT_BATCH_CRC".into()).or_insert(0) += crc_errors;
            }
            report.records += records;
            report.bytes += bytes;
            got += records;
            sh.records_total.fetch_add(records, Ordering::Relaxed);
            sh.progress.add(records, bytes);
        }
        if got > 0 {
            report.elapsed = Instant::now() - sh.t0;
            idle_rounds = 0;
        } else {
            idle_rounds += 1;
            if idle_rounds > 1 && sh.params.max_wait_ms == 0 {
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    if report.elapsed.is_zero() {
        report.elapsed = Instant::now() - sh.t0;
    }
    Ok(report)
}

const ERROR_REBALANCE_IN_PROGRESS: i16 = 27;
const ERROR_MEMBER_ID_REQUIRED: i16 = 79;
const ERROR_COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;

struct Membership {
    member_id: StrBytes,
    generation: i32,
}

async fn find_coordinator(bootstrap: &str, versions: &Versions, group: &str) -> Result<Client> {
    let mut client = Client::connect(bootstrap, Some(versions.clone())).await?;
    let addr = crate::commits::find_coordinator(&mut client, group).await?;
    match Client::connect(&addr, Some(versions.clone())).await {
        Ok(c) => Ok(c),
        // Advertised listeners are often wrong in single-broker setups.
        Err(_) => Ok(client),
    }
}

fn encode_versioned<T: Encodable>(v: &T, version: i16) -> Result<Bytes> {
    let mut buf = BytesMut::new();
    buf.put_i16(version);
    v.encode(&mut buf, version)?;
    Ok(buf.freeze())
}

/// Range assignment over the members subscribed to `topic`, the way Kafka's RangeAssignor
/// does it for one topic: members sorted by id, the first (n % m) get one extra partition.
pub fn range_assign(members: &[StrBytes], partitions: &[i32]) -> Vec<(StrBytes, Vec<i32>)> {
    let mut members: Vec<StrBytes> = members.to_vec();
    members.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let mut parts = partitions.to_vec();
    parts.sort();
    let m = members.len().max(1);
    let (per, extra) = (parts.len() / m, parts.len() % m);
    let mut out = Vec::new();
    let mut start = 0;
    for (i, member) in members.into_iter().enumerate() {
        let n = per + usize::from(i < extra);
        out.push((member, parts[start..start + n].to_vec()));
        start += n;
    }
    out
}

async fn join_and_sync(
    coord: &mut Client,
    group: &str,
    topic: &str,
    all_partitions: &[i32],
    member_id: StrBytes,
) -> Result<(Membership, Vec<i32>)> {
    let join_version = coord.versions.pick(ApiKey::JoinGroup)?;
    let sync_version = coord.versions.pick(ApiKey::SyncGroup)?;
    let subscription = encode_versioned(
        &ConsumerProtocolSubscription::default()
            .with_topics(vec![StrBytes::from_string(topic.to_string())]),
        0,
    )?;
    let mut member_id = member_id;
    let mut attempts = 0;
    let join = loop {
        attempts += 1;
        if attempts > 20 {
            bail!("JoinGroup {group}: gave up after {attempts} attempts");
        }
        let req = JoinGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
            .with_session_timeout_ms(30_000)
            .with_rebalance_timeout_ms(30_000)
            .with_member_id(member_id.clone())
            .with_protocol_type(StrBytes::from_static_str("consumer"))
            .with_protocols(vec![JoinGroupRequestProtocol::default()
                .with_name(StrBytes::from_static_str("range"))
                .with_metadata(subscription.clone())]);
        let resp = coord.call_v(&req, join_version).await?;
        match resp.error_code {
            proto::ERROR_NONE => break resp,
            ERROR_MEMBER_ID_REQUIRED => member_id = resp.member_id.clone(),
            ERROR_REBALANCE_IN_PROGRESS | ERROR_COORDINATOR_LOAD_IN_PROGRESS => {
                glommio::timer::sleep(Duration::from_millis(200)).await
            }
            c => bail!("JoinGroup {group}: {}", error_name(c)),
        }
    };
    let member_id = join.member_id.clone();
    let assignments = if join.leader == member_id {
        let mut subscribed = Vec::new();
        for m in &join.members {
            let mut meta = m.metadata.clone();
            let topics = if meta.remaining() >= 2 {
                let v = meta.get_i16();
                ConsumerProtocolSubscription::decode(&mut meta, v.clamp(0, 3))
                    .map(|s| s.topics)
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            if topics.iter().any(|t| t.as_str() == topic) {
                subscribed.push(m.member_id.clone());
            }
        }
        let mut out = Vec::new();
        for (member, parts) in range_assign(&subscribed, all_partitions) {
            let a = ConsumerProtocolAssignment::default().with_assigned_partitions(vec![
                TopicPartition::default()
                    .with_topic(proto::topic_name(topic))
                    .with_partitions(parts),
            ]);
            out.push(
                SyncGroupRequestAssignment::default()
                    .with_member_id(member)
                    .with_assignment(encode_versioned(&a, 0)?),
            );
        }
        out
    } else {
        Vec::new()
    };
    let req = SyncGroupRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
        .with_generation_id(join.generation_id)
        .with_member_id(member_id.clone())
        .with_protocol_type(Some(StrBytes::from_static_str("consumer")))
        .with_protocol_name(Some(StrBytes::from_static_str("range")))
        .with_assignments(assignments);
    let resp = coord.call_v(&req, sync_version).await?;
    if resp.error_code != proto::ERROR_NONE {
        bail!("SyncGroup {group}: {}", error_name(resp.error_code));
    }
    let mut bytes = resp.assignment.clone();
    let mut mine = Vec::new();
    if bytes.remaining() >= 2 {
        let v = bytes.get_i16();
        let a = ConsumerProtocolAssignment::decode(&mut bytes, v.clamp(0, 3))?;
        for tp in a.assigned_partitions {
            if tp.topic.0.as_str() == topic {
                mine.extend(tp.partitions);
            }
        }
    }
    Ok((
        Membership {
            member_id,
            generation: join.generation_id,
        },
        mine,
    ))
}

async fn group_member(
    sh: Arc<Shared>,
    group: String,
    bootstrap: String,
    layout: TopicLayout,
) -> Result<Report> {
    let mut coord = find_coordinator(&bootstrap, &sh.versions, &group).await?;
    let all: Vec<i32> = layout.partitions.iter().map(|(p, _)| *p).collect();
    let (membership, mine) =
        join_and_sync(&mut coord, &group, &layout.topic, &all, StrBytes::default()).await?;
    let assignment = Rc::new(RefCell::new(Some(leaders_of(&layout, &mine))));
    let done = Rc::new(Cell::new(false));
    let rebalances = Rc::new(Cell::new(0u64));
    let heartbeat = glommio::spawn_local({
        let (assignment, done, rebalances) = (assignment.clone(), done.clone(), rebalances.clone());
        async move {
            let mut membership = membership;
            let hb_version = coord.versions.pick(ApiKey::Heartbeat)?;
            let group_id = GroupId(StrBytes::from_string(group.clone()));
            let mut last_beat = Instant::now();
            while !done.get() {
                glommio::timer::sleep(Duration::from_millis(100)).await;
                if last_beat.elapsed() < Duration::from_secs(3) {
                    continue;
                }
                last_beat = Instant::now();
                let req = HeartbeatRequest::default()
                    .with_group_id(group_id.clone())
                    .with_generation_id(membership.generation)
                    .with_member_id(membership.member_id.clone());
                let resp = coord.call_v(&req, hb_version).await?;
                match resp.error_code {
                    proto::ERROR_NONE => {}
                    ERROR_REBALANCE_IN_PROGRESS => {
                        let (m, mine) = join_and_sync(
                            &mut coord,
                            &group,
                            &layout.topic,
                            &all,
                            membership.member_id.clone(),
                        )
                        .await?;
                        membership = m;
                        *assignment.borrow_mut() = Some(leaders_of(&layout, &mine));
                        rebalances.set(rebalances.get() + 1);
                    }
                    c => bail!("Heartbeat {group}: {}", error_name(c)),
                }
            }
            // Leaving lets the next run's member join without waiting for a session timeout.
            let leave_version = coord.versions.pick(ApiKey::LeaveGroup)?;
            let req = if leave_version >= 3 {
                LeaveGroupRequest::default()
                    .with_group_id(group_id)
                    .with_members(vec![
                        MemberIdentity::default().with_member_id(membership.member_id.clone())
                    ])
            } else {
                LeaveGroupRequest::default()
                    .with_group_id(group_id)
                    .with_member_id(membership.member_id.clone())
            };
            let _ = coord.call_v(&req, leave_version).await;
            Ok::<(), anyhow::Error>(())
        }
    });
    let report = consume_task(sh, assignment).await;
    done.set(true);
    let hb = heartbeat.await;
    let mut report = report?;
    if let Err(e) = hb {
        *report.errors.entry(format!("group: {e:#}")).or_insert(0) += 1;
    }
    report
        .extra
        .push(("group_rebalances".into(), rebalances.get().into()));
    Ok(report)
}

fn leaders_of(layout: &TopicLayout, ids: &[i32]) -> Vec<(i32, String)> {
    layout
        .partitions
        .iter()
        .filter(|(p, _)| ids.contains(p))
        .cloned()
        .collect()
}

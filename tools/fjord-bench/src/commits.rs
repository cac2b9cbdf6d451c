//! `commits`: OffsetCommit throughput. Simple commits (generation -1, empty member id: what a
//! client using assign() sends) for `--groups` distinct group ids, round robin, each sent to
//! its group's coordinator over pipelined connections. Measures what a broker's group
//! coordinator costs per commit: routing to the coordinator, appending to
//! `__consumer_offsets`, and answering.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use bytes::BytesMut;
use clap::Args;
use glommio::channels::local_channel;
use glommio::sync::Semaphore;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::{ApiKey, FindCoordinatorRequest, GroupId, OffsetCommitRequest};
use kafka_protocol::protocol::StrBytes;
use serde_json::{json, Value};

use crate::hist::{ms, new_hist, LatencyTap, Progress, Report, PERCENTILES};
use crate::proto::{self, error_name, Client, Versions};
use crate::Common;

#[derive(Args, Clone, Debug)]
pub struct CommitsArgs {
    /// Topic whose partitions' offsets are committed.
    #[arg(long, default_value = "fjord-bench-commits")]
    pub topic: String,
    /// Create the topic with this many partitions first (an existing topic is fine).
    #[arg(long)]
    pub create_partitions: Option<i32>,
    /// Distinct group ids, committed to round robin.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub groups: u64,
    /// Group ids are PREFIX-0 … PREFIX-(N-1).
    #[arg(long, default_value = "fjord-bench-commits")]
    pub group_prefix: String,
    /// Partitions (0..P of the topic) in each OffsetCommit request.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub partitions: u64,
    /// TCP connections per coordinator.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub connections: u64,
    /// Pipelined requests per connection.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub in_flight: u64,
    /// Run for this many seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
}

/// FindCoordinator answers worth retrying: the coordinator is still loading or moving.
const RETRIABLE_COORDINATOR_ERRORS: [i16; 3] = [
    14, // COORDINATOR_LOAD_IN_PROGRESS
    15, // COORDINATOR_NOT_AVAILABLE
    16, // NOT_COORDINATOR
];

/// FindCoordinator attempts per group, 100 ms apart, before giving up.
const FIND_COORDINATOR_ATTEMPTS_MAX: u32 = 50;

struct Shared {
    topic: String,
    version: i16,
    partitions: Vec<i32>,
    in_flight: u64,
    t0: Instant,
    deadline: Instant,
    progress: Arc<Progress>,
}

#[derive(Clone)]
struct ConnSpec {
    index: u64,
    addr: String,
    groups: Vec<String>,
}

/// What one connection measured, on top of the commit count and latency held in `Report`.
#[derive(Clone, Default)]
struct Counts {
    requests: u64,
}

pub fn run(common: &Common, args: &CommitsArgs) -> Result<()> {
    if args.duration <= 0.0 {
        bail!("--duration must be positive");
    }
    let groups: Vec<String> = (0..args.groups)
        .map(|i| format!("{}-{i}", args.group_prefix))
        .collect();
    let (versions, topic_partitions, coordinators) = setup(common, args, groups.clone())?;
    if (args.partitions as usize) > topic_partitions {
        bail!(
            "--partitions {} but {} has only {topic_partitions} partitions (use --create-partitions)",
            args.partitions,
            args.topic
        );
    }
    let version = versions.pick(ApiKey::OffsetCommit)?;

    // Every connection to a coordinator cycles through all of that coordinator's groups, each
    // starting at a different place: groups are committed to equally often, and even one group
    // gets concurrent commits from several connections (as from several clients).
    let mut by_coordinator: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (g, addr) in groups.iter().zip(coordinators) {
        by_coordinator.entry(addr).or_default().push(g.clone());
    }
    let mut conns = Vec::new();
    for (addr, gs) in &by_coordinator {
        let n = args.connections as usize;
        for c in 0..n {
            let start = c * gs.len() / n;
            conns.push(ConnSpec {
                index: conns.len() as u64,
                addr: addr.clone(),
                groups: gs[start..].iter().chain(&gs[..start]).cloned().collect(),
            });
        }
    }
    let conns_total = conns.len() as u64;

    let progress = Progress::new();
    let t0 = Instant::now();
    let shared = Arc::new(Shared {
        topic: args.topic.clone(),
        version,
        partitions: (0..args.partitions as i32).collect(),
        in_flight: args.in_flight,
        t0,
        deadline: t0 + Duration::from_secs_f64(args.duration),
        progress: progress.clone(),
    });
    let threads = common.threads as usize;
    let results = crate::run_parallel(common, "commits", &progress, |i| {
        let mine: Vec<ConnSpec> = conns
            .iter()
            .filter(|c| c.index as usize % threads == i)
            .cloned()
            .collect();
        let shared = shared.clone();
        Box::new(move || thread_main(mine, shared))
    })?;
    let mut report = Report::new("commits");
    let mut counts = Counts::default();
    for (r, c) in results {
        report.merge(r);
        counts.requests += c.requests;
    }
    if report.latency.is_none() {
        report.latency = Some(new_hist());
    }
    print(
        &report,
        &counts,
        &[
            ("offset_commit_version", version.into()),
            ("groups", args.groups.into()),
            ("partitions_per_commit", args.partitions.into()),
            ("coordinators", by_coordinator.len().into()),
            ("connections", conns_total.into()),
            ("in_flight", args.in_flight.into()),
        ],
        common.json,
    );
    if report.records == 0 {
        bail!("no offset was committed ({} errors)", report.error_count());
    }
    Ok(())
}

/// ApiVersions, optional CreateTopics, Metadata and one FindCoordinator per group, on a
/// short-lived executor. Returns the topic's partition count and each group's coordinator
/// address (in `groups` order).
fn setup(
    common: &Common,
    args: &CommitsArgs,
    groups: Vec<String>,
) -> Result<(Versions, usize, Vec<String>)> {
    let bootstrap = common.bootstrap.clone();
    let topic = args.topic.clone();
    let create = args.create_partitions;
    crate::on_executor(common.cpu_for(0), move || async move {
        let mut client = Client::connect(&bootstrap, None).await?;
        let layout = proto::prepare_topic(&mut client, &topic, create).await?;
        let mut coordinators = Vec::with_capacity(groups.len());
        // An advertised address we cannot reach is replaced by the bootstrap address (a
        // single-broker setup with a wrong advertised listener); checked once per address.
        let mut reachable: BTreeMap<String, String> = BTreeMap::new();
        for g in &groups {
            let addr = find_coordinator(&mut client, g).await?;
            let usable = match reachable.get(&addr) {
                Some(a) => a.clone(),
                None => {
                    let a = match proto::connect(&addr, None).await {
                        Ok(_) => addr.clone(),
                        Err(e) => {
                            eprintln!(
                                "fjord-bench: coordinator {addr} unreachable ({e}); using {bootstrap}"
                            );
                            bootstrap.clone()
                        }
                    };
                    reachable.insert(addr.clone(), a.clone());
                    a
                }
            };
            coordinators.push(usable);
        }
        Ok((client.versions, layout.partitions.len(), coordinators))
    })
}

/// The coordinator address of `group`, retrying while the coordinator is loading.
pub(crate) async fn find_coordinator(client: &mut Client, group: &str) -> Result<String> {
    let version = client.versions.pick(ApiKey::FindCoordinator)?;
    for _ in 0..FIND_COORDINATOR_ATTEMPTS_MAX {
        let mut req = FindCoordinatorRequest::default().with_key_type(0);
        req = if version >= 4 {
            req.with_coordinator_keys(vec![StrBytes::from_string(group.to_string())])
        } else {
            req.with_key(StrBytes::from_string(group.to_string()))
        };
        let resp = client.call_v(&req, version).await?;
        let (code, host, port) = if version >= 4 {
            let c = resp
                .coordinators
                .first()
                .ok_or_else(|| anyhow!("FindCoordinator {group}: empty answer"))?;
            (c.error_code, c.host.to_string(), c.port)
        } else {
            (resp.error_code, resp.host.to_string(), resp.port)
        };
        match code {
            proto::ERROR_NONE => return Ok(format!("{host}:{port}")),
            c if RETRIABLE_COORDINATOR_ERRORS.contains(&c) => {
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }
            c => bail!("FindCoordinator {group}: {}", error_name(c)),
        }
    }
    bail!("FindCoordinator {group}: no coordinator after 5 s")
}

async fn thread_main(conns: Vec<ConnSpec>, shared: Arc<Shared>) -> Result<(Report, Counts)> {
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| glommio::spawn_local(conn_main(c, shared.clone())))
        .collect();
    let mut report = Report::new("commits");
    let mut counts = Counts::default();
    let mut connect_errors = Vec::new();
    let n = tasks.len();
    for t in tasks {
        match t.await {
            Ok((r, c)) => {
                report.merge(r);
                counts.requests += c.requests;
            }
            Err(e) => connect_errors.push(e),
        }
    }
    if n > 0 && connect_errors.len() == n {
        return Err(connect_errors.remove(0));
    }
    for e in connect_errors {
        *report.errors.entry(format!("connect: {e}")).or_insert(0) += 1;
    }
    Ok((report, counts))
}

struct InFlight {
    correlation_id: i32,
    sent: Instant,
}

async fn conn_main(spec: ConnSpec, sh: Arc<Shared>) -> Result<(Report, Counts)> {
    let stream = proto::connect(&spec.addr, Some(proto::REQUEST_TIMEOUT)).await?;
    let (mut reader, mut writer) = proto::split(stream);
    let report = Rc::new(RefCell::new(Report::new("commits")));
    report.borrow_mut().latency = Some(new_hist());
    let counts = Rc::new(RefCell::new(Counts::default()));
    let sem = Rc::new(Semaphore::new(sh.in_flight));
    let (tx, rx) = local_channel::new_unbounded::<InFlight>();

    let reader_task = {
        let (report, counts, sem, sh) = (report.clone(), counts.clone(), sem.clone(), sh.clone());
        glommio::spawn_local(async move {
            let mut tap = LatencyTap::new();
            while let Some(inf) = rx.recv().await {
                let Some(frame) = reader.next_or_stop(&report, &sem).await else {
                    break;
                };
                let now = Instant::now();
                let mut r = report.borrow_mut();
                match proto::decode_response::<OffsetCommitRequest>(
                    frame,
                    inf.correlation_id,
                    sh.version,
                ) {
                    Ok(resp) => {
                        let mut ok = 0u64;
                        for t in &resp.topics {
                            for p in &t.partitions {
                                if p.error_code == proto::ERROR_NONE {
                                    ok += 1;
                                } else {
                                    *r.errors.entry(error_name(p.error_code)).or_insert(0) += 1;
                                }
                            }
                        }
                        r.records += ok;
                        counts.borrow_mut().requests += 1;
                        sh.progress.add(ok, 0);
                        tap.record(&mut r, &sh.progress, sh.t0, inf.sent, now);
                    }
                    Err(e) => {
                        *r.errors.entry(format!("decode: {e}")).or_insert(0) += 1;
                        drop(r);
                        sem.close();
                        break;
                    }
                }
                drop(r);
                sem.signal(1);
            }
        })
    };

    let mut buf = BytesMut::with_capacity(256 + 16 * sh.partitions.len());
    let topic = proto::topic_name(&sh.topic);
    let group_ids: Vec<GroupId> = spec
        .groups
        .iter()
        .map(|g| GroupId(StrBytes::from_string(g.clone())))
        .collect();
    let mut k: u64 = 0;
    loop {
        if Instant::now() >= sh.deadline {
            break;
        }
        if sem.acquire(1).await.is_err() {
            break;
        }
        // Offsets grow with k so that every commit changes the stored value.
        let offset = (k / group_ids.len() as u64) as i64;
        let req = OffsetCommitRequest::default()
            .with_group_id(group_ids[(k % group_ids.len() as u64) as usize].clone())
            .with_generation_id_or_member_epoch(-1)
            .with_member_id(StrBytes::from_static_str(""))
            .with_topics(vec![OffsetCommitRequestTopic::default()
                .with_name(topic.clone())
                .with_partitions(
                    sh.partitions
                        .iter()
                        .map(|p| {
                            OffsetCommitRequestPartition::default()
                                .with_partition_index(*p)
                                .with_committed_offset(offset)
                        })
                        .collect(),
                )]);
        let correlation_id = (k & 0x7fff_ffff) as i32;
        proto::encode_request(&mut buf, correlation_id, sh.version, &req)?;
        let inf = InFlight {
            correlation_id,
            sent: Instant::now(),
        };
        if tx.send(inf).await.is_err() {
            break;
        }
        if let Err(e) = writer.write(&buf).await {
            *report
                .borrow_mut()
                .errors
                .entry(format!("io: {e}"))
                .or_insert(0) += 1;
            break;
        }
        k += 1;
    }
    drop(tx);
    reader_task.await;
    let r = report.borrow().clone();
    let c = counts.borrow().clone();
    Ok((r, c))
}

fn per_sec(n: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

fn print(report: &Report, counts: &Counts, extra: &[(&str, Value)], as_json: bool) {
    let commits_per_s = per_sec(report.records, report.elapsed);
    let requests_per_s = per_sec(counts.requests, report.elapsed);
    let hist = report.latency.as_ref().filter(|h| !h.is_empty());
    if as_json {
        let mut v = json!({
            "command": "commits",
            "commits": report.records,
            "requests": counts.requests,
            "elapsed_s": report.elapsed.as_secs_f64(),
            "commits_per_s": commits_per_s,
            "requests_per_s": requests_per_s,
            "errors": report.errors,
        });
        if let Some(h) = hist {
            let mut lat = serde_json::Map::new();
            for (name, q) in PERCENTILES {
                lat.insert(format!("{name}_ms"), json!(ms(h.value_at_percentile(q))));
            }
            lat.insert("max_ms".into(), json!(ms(h.max())));
            lat.insert("mean_ms".into(), json!(h.mean() / 1000.0));
            lat.insert("count".into(), json!(h.len()));
            v["latency"] = Value::Object(lat);
        }
        for (k, val) in extra {
            v[*k] = val.clone();
        }
        println!("{v}");
        return;
    }
    println!("| commits | value |");
    println!("| --- | ---: |");
    println!("| partitions committed | {} |", report.records);
    println!("| requests | {} |", counts.requests);
    println!("| elapsed | {:.2} s |", report.elapsed.as_secs_f64());
    println!("| commits/s | {commits_per_s:.0} |");
    println!("| requests/s | {requests_per_s:.0} |");
    if let Some(h) = hist {
        for (name, q) in PERCENTILES {
            println!(
                "| latency {name} | {:.3} ms |",
                ms(h.value_at_percentile(q))
            );
        }
        println!("| latency max | {:.3} ms |", ms(h.max()));
    }
    for (k, val) in extra {
        println!("| {k} | {val} |");
    }
    if report.errors.is_empty() {
        println!("| errors | 0 |");
    }
    for (k, n) in &report.errors {
        println!("| error {k} | {n} |");
    }
}

//! `suite`: the standard matrix against one broker (produce 1/16 partitions × acks 1/all,
//! catch-up reads of a backlog larger than the cache with 1 and 16 partitions, cached consume,
//! e2e at half the measured max rate) plus the host's physical limits measured in the same run
//! (O_DIRECT write and read bandwidth, fdatasync latency, loopback TCP bandwidth), so each
//! broker figure can be read as a fraction of what the machine can do. With `--broker-pid`,
//! every row also shows the broker's CPU-seconds per GB moved.

use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use serde_json::json;

use crate::consume::{ConsumeArgs, From};
use crate::e2e::E2eArgs;
use crate::hist::{ms, new_hist, record_us, Report};
use crate::produce::{CompressionArg, Keys, PartitionsUsed, ProduceArgs};
use crate::Common;

#[derive(Args, Clone, Debug)]
pub struct SuiteArgs {
    /// Directory (on the broker's disk) for the O_DIRECT write and fdatasync probes; skipped
    /// if absent.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Every step a few seconds long (smoke test).
    #[arg(long)]
    pub quick: bool,
    /// The broker's process id, to report its resident memory after the 10,000-partition step
    /// (read from /proc/PID/status; same host only).
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Partitions of the many-partitions step.
    #[arg(long, default_value_t = 10_000)]
    pub many_partitions: i32,
    /// A three-node cluster to run the replicated row against (replication factor 3,
    /// acks=all, 3 partitions), e.g. started with `tools/replicated-produce.sh`'s layout.
    #[arg(long, value_name = "HOST:PORT")]
    pub replicated_bootstrap: Option<String>,
    /// The cluster's broker process ids: the replicated row's CPU-seconds per GB is theirs
    /// summed.
    #[arg(long, value_name = "PID,PID,...", value_delimiter = ',')]
    pub replicated_pids: Vec<u32>,
}

/// Resident set size of a process, in MiB, from /proc.
fn rss_mib(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// CPU-seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz.max(1.0))
}

/// Runs one step and measures the CPU-seconds per GB of the step's payload over all `pids`.
fn with_cpu_of(
    pids: &[u32],
    step: impl FnOnce() -> Result<Report>,
) -> Result<(Report, Option<f64>)> {
    let sum = || -> Option<f64> { pids.iter().map(|p| cpu_seconds(*p)).sum() };
    let before = if pids.is_empty() { None } else { sum() };
    let r = step()?;
    let after = if pids.is_empty() { None } else { sum() };
    let per_gb = match (before, after) {
        (Some(b), Some(a)) if r.bytes > 0 => Some((a - b) / (r.bytes as f64 / 1e9)),
        _ => None,
    };
    Ok((r, per_gb))
}

/// Runs one step and measures the broker's CPU-seconds per GB of the step's payload.
fn with_cpu(
    pid: Option<u32>,
    step: impl FnOnce() -> Result<Report>,
) -> Result<(Report, Option<f64>)> {
    let before = pid.and_then(cpu_seconds);
    let r = step()?;
    let after = pid.and_then(cpu_seconds);
    let per_gb = match (before, after) {
        (Some(b), Some(a)) if r.bytes > 0 => Some((a - b) / (r.bytes as f64 / 1e9)),
        _ => None,
    };
    Ok((r, per_gb))
}

pub struct HostLimits {
    pub disk_write_mb_s: Option<f64>,
    /// Sequential O_DIRECT reads, 1 MiB, one at a time.
    pub disk_read_mb_s: Option<f64>,
    pub fdatasync: Option<Histogram<u64>>,
    pub loopback_mb_s: f64,
}

/// Sequential O_DIRECT write bandwidth: `total` bytes in 1 MiB aligned writes, then one
/// fdatasync, timed together.
pub fn probe_disk_write(dir: &Path, total: usize) -> Result<f64> {
    const CHUNK: usize = 1 << 20;
    let path = dir.join(".fjord-bench-probe-write");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .with_context(|| format!("O_DIRECT open {}", path.display()))?;
    let buf = AlignedBuf::new(CHUNK, 0x5a);
    let t0 = Instant::now();
    let mut off = 0u64;
    while (off as usize) < total {
        file.write_all_at(buf.as_slice(), off)
            .context("O_DIRECT write")?;
        off += CHUNK as u64;
    }
    file.sync_data()?;
    let secs = t0.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(total as f64 / secs / 1e6)
}

/// Sequential O_DIRECT read bandwidth, 1 MiB reads one at a time, of a file of `total` bytes
/// written (and synced) first.
pub fn probe_disk_read(dir: &Path, total: usize) -> Result<f64> {
    const CHUNK: usize = 1 << 20;
    let path = dir.join(".fjord-bench-probe-read");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .with_context(|| format!("O_DIRECT open {}", path.display()))?;
    let mut buf = AlignedBuf::new(CHUNK, 0x3c);
    let mut off = 0u64;
    while (off as usize) < total {
        file.write_all_at(buf.as_slice(), off)
            .context("O_DIRECT write")?;
        off += CHUNK as u64;
    }
    file.sync_data()?;
    let t0 = Instant::now();
    let mut off = 0u64;
    while (off as usize) < total {
        file.read_exact_at(buf.as_mut_slice(), off)
            .context("O_DIRECT read")?;
        off += CHUNK as u64;
    }
    let secs = t0.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(total as f64 / secs / 1e6)
}

/// Latency of `n` × (4 KiB O_DIRECT write + fdatasync), appending.
pub fn probe_fdatasync(dir: &Path, n: usize) -> Result<Histogram<u64>> {
    let path = dir.join(".fjord-bench-probe-sync");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .with_context(|| format!("O_DIRECT open {}", path.display()))?;
    let buf = AlignedBuf::new(4096, 0xa5);
    let mut hist = new_hist();
    for i in 0..n {
        let t0 = Instant::now();
        file.write_all_at(buf.as_slice(), (i * 4096) as u64)?;
        file.sync_data()?;
        record_us(&mut hist, t0.elapsed());
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(hist)
}

/// One sender thread writing 1 MiB chunks to one receiver thread over 127.0.0.1.
pub fn probe_loopback(duration: Duration) -> Result<f64> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::spawn(move || -> std::io::Result<(u64, Duration)> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        let t0 = Instant::now();
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok((total, t0.elapsed()));
            }
            total += n as u64;
        }
    });
    let mut s = std::net::TcpStream::connect(addr)?;
    let chunk = vec![0x33u8; 1 << 20];
    let t0 = Instant::now();
    while t0.elapsed() < duration {
        s.write_all(&chunk)?;
    }
    drop(s);
    let (bytes, elapsed) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("loopback receiver panicked"))??;
    Ok(bytes as f64 / elapsed.as_secs_f64() / 1e6)
}

struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize, fill: u8) -> AlignedBuf {
        let storage = vec![fill; len + 4096];
        let start = (4096 - (storage.as_ptr() as usize % 4096)) % 4096;
        AlignedBuf {
            storage,
            start,
            len,
        }
    }
    fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

pub fn measure_host(args: &SuiteArgs) -> Result<HostLimits> {
    let (disk, read, sync) = match &args.data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            let total = if args.quick { 64 << 20 } else { 256 << 20 };
            (
                Some(probe_disk_write(dir, total)?),
                Some(probe_disk_read(dir, total * 4)?),
                Some(probe_fdatasync(dir, 200)?),
            )
        }
        None => (None, None, None),
    };
    let loopback = probe_loopback(Duration::from_secs(if args.quick { 1 } else { 3 }))?;
    Ok(HostLimits {
        disk_write_mb_s: disk,
        disk_read_mb_s: read,
        fdatasync: sync,
        loopback_mb_s: loopback,
    })
}

/// The suite's produce step: 1 KiB records, 100 per batch, 5 requests in flight per connection.
fn suite_produce(
    topic: impl Into<String>,
    acks: i16,
    connections: u64,
    duration: Option<f64>,
    records: Option<u64>,
) -> ProduceArgs {
    ProduceArgs {
        topic: topic.into(),
        create_partitions: None,
        partitions_used: PartitionsUsed::All,
        record_size: 1024,
        batch_records: 100,
        acks,
        compression: CompressionArg::None,
        keys: Keys::None,
        connections,
        in_flight: 5,
        rate: 0,
        duration,
        records,
    }
}

/// The suite's consume step: every partition from earliest to its end.
fn suite_consume(topic: impl Into<String>, step_s: f64) -> ConsumeArgs {
    ConsumeArgs {
        topic: topic.into(),
        from: From::Earliest,
        fetch_max_bytes: 50 << 20,
        partition_max_bytes: 1 << 20,
        max_wait_ms: 500,
        min_bytes: 1,
        records: None,
        duration: Some(step_s * 2.0),
        until_end: true,
        group: None,
        check_crc: false,
    }
}

pub fn run(common: &Common, args: &SuiteArgs) -> Result<()> {
    let step_s = if args.quick { 3.0 } else { 15.0 };
    eprintln!("suite: measuring host limits");
    let host = measure_host(args)?;
    // (step, report, fraction of its host limit, broker CPU-seconds per GB)
    let mut rows: Vec<(String, Report, Option<f64>, Option<f64>)> = Vec::new();
    let pid = args.broker_pid;

    let mut max_rate_p1 = 0.0f64;
    for (parts, topic) in [(1, "fjord-bench-suite-p1"), (16, "fjord-bench-suite-p16")] {
        let (versions, layout) = crate::produce::setup(common, topic, Some(parts))?;
        for acks in [1i16, -1] {
            eprintln!("suite: produce {parts} partition(s), acks={acks}");
            let connections = if parts > 1 { 4 } else { 1 };
            let a = suite_produce(topic, acks, connections, Some(step_s), None);
            let (r, cpu) = with_cpu(pid, || {
                crate::produce::run_with(common, &a, versions.clone(), layout.clone())
            })?;
            if parts == 1 && acks == 1 {
                max_rate_p1 = r.records_per_sec();
            }
            let frac = host.disk_write_mb_s.map(|d| r.mb_per_sec() / d);
            let acks_s = if acks == -1 {
                "all".to_string()
            } else {
                acks.to_string()
            };
            rows.push((
                format!("produce 1 KiB, {parts} partition(s), acks={acks_s}"),
                r,
                frac,
                cpu,
            ));
        }
        if parts == 16 {
            // What the produce steps wrote is far more than the batch cache holds.
            eprintln!("suite: catch up on {topic} from earliest");
            let c = suite_consume(topic, step_s);
            let (r, cpu) = with_cpu(pid, || {
                crate::consume::run_with(common, &c, versions.clone(), layout.clone())
            })?;
            let frac = host.disk_read_mb_s.map(|d| r.mb_per_sec() / d);
            rows.push((
                "catch-up: 16 partitions from earliest, backlog beyond the cache".into(),
                r,
                frac,
                cpu,
            ));
        }
    }

    // Catch-up on one partition: a backlog of many times its batch cache, read from the start.
    {
        let topic = "fjord-bench-suite-backlog";
        let (versions, layout) = crate::produce::setup(common, topic, Some(1))?;
        let records = if args.quick { 256 * 1024 } else { 1024 * 1024 };
        eprintln!("suite: write a {} MiB backlog to {topic}", records / 1024);
        let fill = suite_produce(topic, 1, 1, None, Some(records));
        crate::produce::run_with(common, &fill, versions.clone(), layout.clone())?;
        eprintln!("suite: catch up on {topic} from earliest");
        let c = suite_consume(topic, step_s * 4.0);
        let (r, cpu) = with_cpu(pid, || {
            crate::consume::run_with(common, &c, versions, layout)
        })?;
        let frac = host.disk_read_mb_s.map(|d| r.mb_per_sec() / d);
        rows.push((
            format!(
                "catch-up: 1 partition from earliest, {} MiB backlog",
                records / 1024
            ),
            r,
            frac,
            cpu,
        ));
    }

    // Data still in the broker's cache: a fresh topic small enough to stay there (about
    // 6 MiB per partition), read right after it is written.
    {
        let topic = "fjord-bench-suite-cached";
        let (versions, layout) = crate::produce::setup(common, topic, Some(16))?;
        eprintln!("suite: fill {topic}, then consume it from the cache");
        let fill = suite_produce(topic, 1, 1, None, Some(16 * 6_000));
        crate::produce::run_with(common, &fill, versions.clone(), layout.clone())?;
        let c = suite_consume(topic, step_s);
        let (r, cpu) = with_cpu(pid, || {
            crate::consume::run_with(common, &c, versions, layout)
        })?;
        let frac = Some(r.mb_per_sec() / host.loopback_mb_s);
        rows.push((
            "consume 16 partitions from the broker's cache".into(),
            r,
            frac,
            cpu,
        ));
    }

    // Many partitions: produce round robin over all of them, then the broker's memory.
    let many = args.many_partitions.max(1);
    let rss_after_many = {
        let topic = format!("fjord-bench-suite-p{many}");
        eprintln!("suite: produce over {many} partitions");
        let (versions, layout) = crate::produce::setup(common, &topic, Some(many))?;
        let a = suite_produce(topic.clone(), 1, 4, Some(step_s), None);
        let (r, cpu) = with_cpu(pid, || {
            crate::produce::run_with(common, &a, versions, layout)
        })?;
        let frac = host.disk_write_mb_s.map(|d| r.mb_per_sec() / d);
        rows.push((
            format!("produce 1 KiB, {many} partitions, acks=1"),
            r,
            frac,
            cpu,
        ));
        args.broker_pid.and_then(rss_mib)
    };
    let rate = ((max_rate_p1 * 0.5) as u64).max(100);
    eprintln!("suite: e2e at {rate} records/s");
    let (versions, layout) = crate::produce::setup(common, "fjord-bench-suite-e2e", Some(1))?;
    let e = E2eArgs {
        topic: "fjord-bench-suite-e2e".into(),
        create_partitions: None,
        rate,
        duration: step_s,
        record_size: 1024,
    };
    let (r, cpu) = with_cpu(pid, || crate::e2e::run_with(common, &e, versions, layout))?;
    rows.push((
        format!("e2e latency at {rate} rec/s (50% of max)"),
        r,
        None,
        cpu,
    ));

    // Replicated: the same produce as the single-node acks=all row, on a three-node cluster
    // with every partition on all three nodes.
    if let Some(rb) = &args.replicated_bootstrap {
        let mut rc = common.clone();
        rc.bootstrap = rb.clone();
        let topic = "fjord-bench-suite-rf3";
        eprintln!("suite: produce 3 partitions, replication factor 3, acks=all on {rb}");
        let (versions, layout) = crate::produce::setup_rf(&rc, topic, Some(3), 3)?;
        let a = suite_produce(topic, -1, 2, Some(step_s), None);
        let (r, cpu) = with_cpu_of(&args.replicated_pids, || {
            crate::produce::run_with(&rc, &a, versions, layout)
        })?;
        let frac = host.disk_write_mb_s.map(|d| r.mb_per_sec() / d);
        rows.push((
            "produce 1 KiB, 3 partitions, replication factor 3 (3 nodes), acks=all".into(),
            r,
            frac,
            cpu,
        ));
    }

    if common.json {
        let mut out = json!({
            "bootstrap": common.bootstrap,
            "host": {
                "disk_write_mb_s": host.disk_write_mb_s,
                "disk_read_mb_s": host.disk_read_mb_s,
                "fdatasync_p50_ms": host.fdatasync.as_ref().map(|h| ms(h.value_at_percentile(50.0))),
                "fdatasync_p99_ms": host.fdatasync.as_ref().map(|h| ms(h.value_at_percentile(99.0))),
                "loopback_mb_s": host.loopback_mb_s,
            },
            "broker_rss_mib_after_many_partitions": rss_after_many,
        });
        out["steps"] = rows
            .iter()
            .map(|(name, r, frac, cpu)| {
                let mut v = r.to_json();
                v["step"] = json!(name);
                v["fraction_of_limit"] = json!(frac);
                v["broker_cpu_s_per_gb"] = json!(cpu);
                v
            })
            .collect();
        println!("{out}");
        return Ok(());
    }
    println!(
        "fjord-bench suite against {} ({})",
        common.bootstrap,
        if args.quick { "quick" } else { "full" }
    );
    println!();
    println!("| measurement | records/s | MB/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | of host limit | broker CPU-s/GB |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let f = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
    for (name, r, frac, cpu) in &rows {
        let max = r
            .latency
            .as_ref()
            .filter(|h| !h.is_empty())
            .map(|h| ms(h.max()));
        println!(
            "| {name} | {:.0} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
            r.records_per_sec(),
            r.mb_per_sec(),
            f(r.latency_ms(50.0)),
            f(r.latency_ms(99.0)),
            f(r.latency_ms(99.9)),
            f(max),
            r.error_count(),
            frac.map(|x| format!("{:.0}%", x * 100.0))
                .unwrap_or_else(|| "-".into()),
            f(*cpu),
        );
    }
    match host.disk_write_mb_s {
        Some(d) => {
            println!("| host: O_DIRECT sequential write (1 MiB) | | {d:.1} | | | | | | 100% | |")
        }
        None => println!("| host: O_DIRECT sequential write | | (no --data-dir) | | | | | | | |"),
    }
    if let Some(d) = host.disk_read_mb_s {
        println!("| host: O_DIRECT sequential read (1 MiB, one at a time) | | {d:.1} | | | | | | 100% | |");
    }
    if let Some(h) = &host.fdatasync {
        println!(
            "| host: 4 KiB write + fdatasync | {:.0}/s | | {:.2} | {:.2} | {:.2} | {:.2} | | | |",
            1000.0 / h.mean() * 1000.0,
            ms(h.value_at_percentile(50.0)),
            ms(h.value_at_percentile(99.0)),
            ms(h.value_at_percentile(99.9)),
            ms(h.max())
        );
    }
    println!(
        "| host: loopback TCP (1 stream) | | {:.1} | | | | | | 100% | |",
        host.loopback_mb_s
    );
    match rss_after_many {
        Some(m) => println!(
            "| broker resident memory after the {many}-partition step | | {m:.0} MiB | | | | | | | |"
        ),
        None => println!("| broker resident memory | | (give --broker-pid) | | | | | | | |"),
    }
    println!();
    println!(
        "Produce rows are compared with the disk write bandwidth, catch-up reads with the disk read bandwidth, cached consume with loopback TCP."
    );
    Ok(())
}

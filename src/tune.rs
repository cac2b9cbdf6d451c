//! `fjord tune`: measures this host (cores, memory, the data disk's sequential write bandwidth
//! at several queue depths, write and fdatasync latency) and writes a tuning file from it, the
//! way Redpanda's `rpk iotune` does. Progress goes to stderr; the file to --output or stdout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use glommio::io::{DmaFile, OpenOptions};

#[derive(clap::Args, Debug)]
pub struct TuneArgs {
    /// Directory on the disk that will hold the data (a scratch file is written and removed).
    #[arg(long, value_name = "DIR", default_value = "./fjord-data")]
    pub data_dir: PathBuf,
    /// Where to write the tuning file. Default: standard output.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Bytes written per bandwidth measurement.
    #[arg(long, value_name = "BYTES", default_value_t = 256 << 20)]
    pub bytes: u64,
}

#[derive(Debug, Default)]
struct Measured {
    cores: usize,
    memory_bytes: u64,
    /// (queue depth, MB/s) for 1 MiB O_DIRECT sequential writes.
    write_mbps: Vec<(usize, f64)>,
    write_4k_p50_us: f64,
    fsync_p50_us: f64,
    fsync_p99_us: f64,
}

fn progress(msg: &str) {
    eprint!("\r\x1b[2K[fjord tune] {msg}");
    let _ = std::io::stderr().flush();
}

use crate::config::mem_total_bytes;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

async fn seq_write(file: &DmaFile, total: u64, depth: usize) -> anyhow::Result<f64> {
    const BLOCK: usize = 1 << 20;
    let blocks = (total / BLOCK as u64).max(1);
    let start = Instant::now();
    let mut next = 0u64;
    // `depth` writes in flight at a time.
    while next < blocks {
        let n = (blocks - next).min(depth as u64);
        let futs = (0..n).map(|i| {
            let mut buf = file.alloc_dma_buffer(BLOCK);
            buf.as_bytes_mut().fill(0x5a);
            file.write_at(buf, (next + i) * BLOCK as u64)
        });
        for r in futures::future::join_all(futs).await {
            r.map_err(|e| anyhow::anyhow!("write failed: {e}"))?;
        }
        next += n;
    }
    file.fdatasync()
        .await
        .map_err(|e| anyhow::anyhow!("fdatasync failed: {e}"))?;
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    Ok(blocks as f64 * BLOCK as f64 / secs / 1e6)
}

async fn measure(dir: &Path, bytes: u64) -> anyhow::Result<Measured> {
    let mut m = Measured {
        cores: core_affinity::get_core_ids().map(|c| c.len()).unwrap_or(1),
        memory_bytes: mem_total_bytes(),
        ..Default::default()
    };
    // The DMA probe file first (see DESIGN.md: an empty first file misleads glommio).
    let probe = dir.join(".dma-probe");
    if std::fs::metadata(&probe)
        .map(|md| md.len() < 4096)
        .unwrap_or(true)
    {
        std::fs::write(&probe, vec![0x5au8; 4096])?;
    }
    let f = DmaFile::open(&probe)
        .await
        .map_err(|e| anyhow::anyhow!("probe: {e}"))?;
    let _ = f.read_at(0, 4096).await;
    let _ = f.close().await;
    let path = dir.join(".fjord-tune-scratch");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .dma_open(&path)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    for depth in [1usize, 4, 16] {
        progress(&format!(
            "sequential 1 MiB O_DIRECT writes, queue depth {depth} ..."
        ));
        let mbps = seq_write(&file, bytes, depth).await?;
        m.write_mbps.push((depth, mbps));
        progress(&format!(
            "sequential writes, queue depth {depth}: {mbps:.0} MB/s\n"
        ));
    }
    let mut lat = Vec::new();
    let mut sync_lat = Vec::new();
    for i in 0..200u64 {
        if i % 20 == 0 {
            progress(&format!("4 KiB write + fdatasync latency: {i}/200"));
        }
        let mut buf = file.alloc_dma_buffer(4096);
        buf.as_bytes_mut().fill(1);
        let t = Instant::now();
        file.write_at(buf, i * 4096)
            .await
            .map_err(|e| anyhow::anyhow!("write failed: {e}"))?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        file.fdatasync()
            .await
            .map_err(|e| anyhow::anyhow!("fdatasync failed: {e}"))?;
        sync_lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    m.write_4k_p50_us = percentile(&mut lat, 0.5);
    m.fsync_p50_us = percentile(&mut sync_lat, 0.5);
    m.fsync_p99_us = percentile(&mut sync_lat, 0.99);
    progress(&format!(
        "4 KiB write p50 {:.0} µs, fdatasync p50 {:.0} µs p99 {:.0} µs\n",
        m.write_4k_p50_us, m.fsync_p50_us, m.fsync_p99_us
    ));
    let _ = file.close().await;
    let _ = std::fs::remove_file(&path);
    Ok(m)
}

/// The tuning file: the commented default with the values this host calls for.
fn render(m: &Measured, data_dir: &Path) -> String {
    let best =
        m.write_mbps
            .iter()
            .cloned()
            .fold((1usize, 0f64), |a, b| if b.1 > a.1 * 1.05 { b } else { a });
    let ring_depth = (best.0 * 16).next_power_of_two().clamp(128, 4096);
    let per_core_mem = m.memory_bytes / m.cores.max(1) as u64;
    let cache = (per_core_mem / 256).clamp(8 << 20, 64 << 20);
    let defaults = crate::config::Tuning::load(None).expect("the built-in tuning parses");
    let io_memory =
        crate::config::io_memory_for(per_core_mem, defaults.memory.read_ahead_bytes_per_shard);
    // Slow flushes: let one fdatasync wait a little to cover more writes.
    let window_us = if m.fsync_p50_us > 2000.0 { 500 } else { 0 };
    let mut text = crate::config::DEFAULT_TUNING.to_string();
    let set = |text: &mut String, key: &str, value: String| {
        let mut out = String::new();
        for line in text.lines() {
            if line.trim_start().starts_with(&format!("{key} =")) {
                let comment = line
                    .find('#')
                    .map(|i| format!("  {}", &line[i..]))
                    .unwrap_or_default();
                out.push_str(&format!("{key} = {value}{comment}\n"));
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        *text = out;
    };
    set(&mut text, "data_dir", format!("\"{}\"", data_dir.display()));
    set(&mut text, "ring_depth", ring_depth.to_string());
    set(
        &mut text,
        "batch_cache_bytes_per_partition",
        cache.to_string(),
    );
    // A quarter of each core's share of memory for its partitions' caches.
    set(
        &mut text,
        "batch_cache_bytes_per_shard",
        (per_core_mem / 4).to_string(),
    );
    set(&mut text, "io_memory_bytes", io_memory.to_string());
    set(&mut text, "group_commit_window_us", window_us.to_string());
    let writes: Vec<String> = m
        .write_mbps
        .iter()
        .map(|(d, v)| format!("qd{d} {v:.0} MB/s"))
        .collect();
    format!(
        "# Written by `fjord tune` from measurements of this host:\n\
         #   cores {}, memory {} MiB\n\
         #   data disk ({}): 1 MiB O_DIRECT sequential writes {}\n\
         #   4 KiB write p50 {:.0} µs; fdatasync p50 {:.0} µs, p99 {:.0} µs\n\
         # Chosen: ring_depth {ring_depth} (best queue depth {} x 16), batch cache {} MiB per partition,\n\
         #   io_memory {} MiB per shard, group commit window {window_us} µs.\n\n{text}",
        m.cores,
        m.memory_bytes >> 20,
        data_dir.display(),
        writes.join(", "),
        m.write_4k_p50_us,
        m.fsync_p50_us,
        m.fsync_p99_us,
        best.0,
        cache >> 20,
        io_memory >> 20,
    )
}

pub fn run(a: TuneArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("cannot create {}", a.data_dir.display()))?;
    let dir = a.data_dir.clone();
    let bytes = a.bytes.max(1 << 20);
    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name("fjord-tune")
        .spawn(move || async move { measure(&dir, bytes).await })
        .map_err(|e| anyhow::anyhow!("cannot start the measuring executor: {e}"))?;
    let m = ex
        .join()
        .map_err(|e| anyhow::anyhow!("measurement failed: {e}"))??;
    let text = render(&m, &a.data_dir);
    // The file we write must be one `fjord serve --config` accepts.
    crate::config::Tuning::parse(&text, "generated")?;
    match &a.output {
        Some(p) => {
            std::fs::write(p, &text).with_context(|| format!("cannot write {}", p.display()))?;
            eprintln!("[fjord tune] wrote {}", p.display());
        }
        None => print!("{text}"),
    }
    Ok(())
}

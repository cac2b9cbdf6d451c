//! fjord-bench: a load generator that speaks the Kafka protocol itself, for any
//! Kafka-compatible broker (Fjord, Kafka, Redpanda), plus a fake broker (`sink`) to show the
//! tool is not the bottleneck and a `suite` that measures a broker against the host's limits.

#![allow(clippy::type_complexity)]

mod commits;
mod consume;
mod e2e;
mod hist;
mod produce;
mod proto;
mod sink;
mod suite;

use std::future::Future;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use clap::{Args, Parser, Subcommand};
use glommio::{LocalExecutorBuilder, Placement};

#[derive(Parser)]
#[command(
    name = "fjord-bench",
    version,
    about = "Load generator for Kafka-compatible brokers"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone, Debug)]
pub struct Common {
    /// Broker to bootstrap from (HOST:PORT).
    #[arg(long, global = true, default_value = "127.0.0.1:9092")]
    pub bootstrap: String,
    /// Print the final summary as one JSON object.
    #[arg(long, global = true)]
    pub json: bool,
    /// Number of glommio executors (threads) generating load.
    #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub threads: u32,
    /// CPUs to pin executors to, e.g. "1" or "0,1" or "0-3" (default: the last core).
    #[arg(long, global = true, value_parser = parse_cpus)]
    pub cpus: Option<CpuList>,
}

impl Common {
    /// The core executor `i` runs on.
    pub fn cpu_for(&self, i: usize) -> Option<usize> {
        match &self.cpus {
            Some(CpuList(list)) if !list.is_empty() => Some(list[i % list.len()]),
            _ => core_affinity::get_core_ids().and_then(|ids| ids.last().map(|c| c.id)),
        }
    }
}

/// A parsed --cpus list (a newtype so clap treats it as one value).
#[derive(Clone, Debug)]
pub struct CpuList(pub Vec<usize>);

fn parse_cpus(s: &str) -> Result<CpuList, String> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: usize = a.trim().parse().map_err(|_| format!("bad cpu '{a}'"))?;
                let b: usize = b.trim().parse().map_err(|_| format!("bad cpu '{b}'"))?;
                if a > b {
                    return Err(format!("bad cpu range {part}"));
                }
                out.extend(a..=b);
            }
            None => out.push(
                part.trim()
                    .parse()
                    .map_err(|_| format!("bad cpu '{part}'"))?,
            ),
        }
    }
    if out.is_empty() {
        return Err("empty cpu list".into());
    }
    Ok(CpuList(out))
}

#[derive(Subcommand)]
enum Command {
    /// Produce records as fast as possible or at a fixed rate; report throughput and latency.
    Produce(produce::ProduceArgs),
    /// Fetch every partition of a topic directly (or as a group member); report throughput.
    Consume(consume::ConsumeArgs),
    /// Produce at a fixed rate and consume concurrently; report produce-to-consume latency.
    E2e(e2e::E2eArgs),
    /// A minimal fake broker that discards produced data and serves a fixed batch.
    Sink(sink::SinkArgs),
    /// Simple OffsetCommit requests over many group ids; report commits/s and latency.
    Commits(commits::CommitsArgs),
    /// Run the standard matrix against a broker and print one markdown table.
    Suite(suite::SuiteArgs),
}

/// Runs `f` on a fresh glommio executor pinned to `cpu`, waiting for its result.
pub fn on_executor<T, F, Fut>(cpu: Option<usize>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>> + 'static,
{
    spawn_executor(cpu, f)?
        .join()
        .map_err(|e| anyhow!("executor failed: {e}"))?
}

pub fn spawn_executor<T, F, Fut>(
    cpu: Option<usize>,
    f: F,
) -> Result<glommio::ExecutorJoinHandle<Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>> + 'static,
{
    LocalExecutorBuilder::new(Placement::Unbound)
        .name("fjord-bench")
        .spawn(move || async move {
            if let Some(id) = cpu {
                // Pinning is best effort: a bad --cpus entry should not kill the run.
                core_affinity::set_for_current(core_affinity::CoreId { id });
            }
            f().await
        })
        .map_err(|e| anyhow!("cannot start glommio executor: {e}"))
}

/// Runs `make(i)` on `common.threads` executors while printing progress, returning every
/// executor's result.
pub fn run_parallel<T, F, Fut>(
    common: &Common,
    label: &str,
    progress: &Arc<hist::Progress>,
    make: F,
) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Box<dyn FnOnce() -> Fut + Send + 'static>,
    Fut: Future<Output = Result<T>> + 'static,
{
    let threads = common.threads as usize;
    let mut handles = Vec::new();
    for i in 0..threads {
        let f = make(i);
        let p = progress.clone();
        let handle = spawn_executor(common.cpu_for(i), move || async move {
            let r = f().await;
            p.threads_done
                .fetch_add(1, std::sync::atomic::Ordering::Release);
            r
        });
        match handle {
            Ok(h) => handles.push(h),
            Err(e) => {
                progress
                    .threads_done
                    .fetch_add(1, std::sync::atomic::Ordering::Release);
                // Join what is already running before reporting.
                progress.watch(label, handles.len() + 1);
                for h in handles {
                    let _ = h.join();
                }
                return Err(e);
            }
        }
    }
    progress.watch(label, threads);
    let mut out = Vec::new();
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(e) => first_err = first_err.or(Some(anyhow!("executor failed: {e}"))),
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

fn run(cli: Cli) -> Result<()> {
    let common = cli.common;
    match cli.command {
        Command::Produce(a) => {
            let report = produce::run(&common, &a)?;
            report.print(common.json);
            if report.records == 0 && report.error_count() > 0 {
                bail!(
                    "no record was acknowledged ({} errors)",
                    report.error_count()
                );
            }
        }
        Command::Consume(a) => consume::run(&common, &a)?.print(common.json),
        Command::E2e(a) => e2e::run(&common, &a)?.print(common.json),
        Command::Sink(a) => sink::run(&common, &a)?,
        Command::Suite(a) => suite::run(&common, &a)?,
        Command::Commits(a) => commits::run(&common, &a)?,
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!(
            "fjord-bench: error: {}",
            format!("{e:#}").replace('\n', " ")
        );
        std::process::exit(1);
    }
}

//! Command line: `fjord serve` and admin subcommands. Errors become one-line messages.

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use clap::{Parser, Subcommand};
use glommio::{LocalExecutorBuilder, Placement};

use crate::cluster::metadata;
use crate::cluster::node::Node;
use crate::config::Tuning;
use crate::shard::{self, Job, Mesh, Shard};

#[derive(Parser, Debug)]
#[command(
    name = "fjord",
    version,
    about = "A Kafka-compatible, thread-per-core message broker"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the broker.
    Serve(ServeArgs),
    /// Measure this host and write a tuning file for it.
    Tune(crate::tune::TuneArgs),
    /// Manage topics on a running broker (any Kafka-compatible broker).
    Topics {
        /// Broker to talk to.
        #[arg(long, default_value = "127.0.0.1:9092", value_name = "HOST:PORT")]
        bootstrap: String,
        #[command(subcommand)]
        cmd: crate::admin::TopicsCmd,
    },
    /// A live per-shard view of a running broker, over its metrics endpoint (like htop).
    Top(crate::top::TopArgs),
    /// The effective configuration: `config show` prints every setting and where it came from.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// The cluster a running node belongs to: nodes, the active controller, the quorum.
    Cluster {
        /// Node to talk to (before or after the subcommand).
        #[arg(
            long,
            global = true,
            default_value = "127.0.0.1:9092",
            value_name = "HOST:PORT"
        )]
        bootstrap: String,
        #[command(subcommand)]
        cmd: crate::admin::ClusterCmd,
    },
    /// Inspect consumer groups on a running broker: state, members, assignment, lag.
    Groups {
        /// Broker to talk to.
        #[arg(long, default_value = "127.0.0.1:9092", value_name = "HOST:PORT")]
        bootstrap: String,
        #[command(subcommand)]
        cmd: crate::admin::GroupsCmd,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Print the effective configuration (default < --config file < --set) with the source of
    /// each value.
    Show(ConfigArgs),
}

/// Where settings come from: the embedded default, then a file naming what differs, then flags.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// Tuning file (TOML) naming only what differs from the embedded tuning/default.toml.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override one setting, e.g. `--set log.num_partitions=4` or Kafka's `--set
    /// num.partitions=4`. Repeatable; applied after the file, in order.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address every shard listens on (HOST:PORT). Default: the tuning file's node.listen (127.0.0.1:9092).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<std::net::SocketAddr>,
    /// Host:port advertised to clients in Metadata. Default: the listen address.
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Data directory. Default: the tuning file's node.data_dir (./fjord-data).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// This node's id in the cluster (Kafka's node.id). Default: the tuning file's node.id (0).
    #[arg(long, value_name = "N")]
    pub node_id: Option<i32>,
    /// The controller quorum's voters, ID@HOST:PORT,... (Kafka's controller.quorum.voters). A
    /// node whose id is listed runs a voter on that address. Without it the node is a
    /// one-node cluster.
    #[arg(long, value_name = "ID@HOST:PORT,...")]
    pub controllers: Option<String>,
    /// This node's rack: replicas of a partition are spread across racks.
    #[arg(long, value_name = "RACK")]
    pub rack: Option<String>,
    /// Pin the shards to these cores, e.g. `1`, `2-5` or `0,2`: one shard per core listed
    /// (several nodes can share a host this way).
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub cpus: Option<CpuList>,
    /// Number of shards (cores) to run. Default: every core the tuning file names (all cores).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub cores: Option<u16>,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Run more shards than cores (they share cores, unpinned). Without it, asking for more
    /// shards than cores is refused.
    #[arg(long)]
    pub overprovisioned: bool,
    /// Serve Prometheus metrics on HOST:PORT (GET /metrics). Default: the tuning file's
    /// metrics.listen (none).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Log format: text or json (one object per line). Default: the tuning file's
    /// logging.format (text).
    #[arg(long, value_name = "FORMAT", value_parser = ["text", "json"])]
    pub log_format: Option<String>,
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Serve(a) => serve(a),
        Cmd::Tune(a) => crate::tune::run(a),
        Cmd::Topics { bootstrap, cmd } => crate::admin::topics(&bootstrap, cmd),
        Cmd::Groups { bootstrap, cmd } => crate::admin::groups(&bootstrap, cmd),
        Cmd::Cluster { bootstrap, cmd } => crate::admin::cluster(&bootstrap, cmd),
        Cmd::Config {
            cmd: ConfigCmd::Show(a),
        } => config_show(&a),
        Cmd::Top(a) => crate::top::run(a),
    }
}

/// Cores named on the command line (`--cpus`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

fn parse_cpu_list(s: &str) -> Result<CpuList, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |x: &str| {
            x.trim()
                .parse::<usize>()
                .map_err(|_| format!("{x:?} in --cpus {s:?} is not a core number"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b || b - a > 4096 {
                    return Err(format!("range {part:?} in --cpus is empty or too large"));
                }
                out.extend(a..=b);
            }
            None => out.push(num(part)?),
        }
    }
    if out.is_empty() {
        return Err("--cpus names no core".into());
    }
    Ok(CpuList(out))
}

fn config_show(a: &ConfigArgs) -> anyhow::Result<()> {
    let layered = Tuning::load_layered(a.config.as_deref(), &a.set)?;
    let mut out =
        String::from("# Effective configuration: embedded default < --config file < --set\n");
    let mut section = "";
    for e in &layered.entries {
        let (s, key) = e.key.split_once('.').unwrap_or(("", &e.key));
        if s != section && !s.is_empty() {
            out.push_str(&format!("\n[{s}]\n"));
            section = s;
        }
        if s.is_empty() {
            // `core` holds the per-core overrides, an array of tables.
            if let toml::Value::Array(tables) = &e.value {
                for t in tables {
                    out.push_str(&format!("\n{:<48} # {}\n", "[[core]]", e.source));
                    if let toml::Value::Table(t) = t {
                        for (k, v) in t {
                            out.push_str(&format!("{k} = {v}\n"));
                        }
                    }
                }
            }
            continue;
        }
        let line = format!("{key} = {}", e.value);
        out.push_str(&format!("{line:<48} # {}\n", e.source));
    }
    print!("{out}");
    Ok(())
}

/// Logs go to stderr, as text or JSON, filtered by the tuning file's levels and then RUST_LOG.
fn init_tracing(l: &crate::config::LoggingSection) {
    let mut directives = l.levels.clone();
    if let Ok(env) = std::env::var("RUST_LOG") {
        if !env.trim().is_empty() {
            // Later directives for the same module replace earlier ones: RUST_LOG wins.
            directives.push(',');
            directives.push_str(&env);
        }
    }
    let filter = tracing_subscriber::EnvFilter::builder().parse_lossy(&directives);
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if l.format == "json" {
        b.json().try_init()
    } else {
        b.try_init()
    };
}

fn raise_fd_limit() {
    // Every partition keeps its segment files open: lift the soft limit to the hard one.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Each shard's I/O memory is locked when glommio registers it with io_uring (in each of its
/// three rings). Lifts the soft RLIMIT_MEMLOCK to the hard one and says plainly when that is
/// still too little: glommio then only warns that registering failed, and disk reads pin
/// their pages one read at a time (slower catch-up reads; nothing else changes).
fn check_memlock(io_memory: &[usize]) {
    let need = io_memory.iter().sum::<usize>() as u64 * 3;
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) != 0 {
            return;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &raised) == 0 {
                r = raised;
            }
        }
    }
    if r.rlim_cur == libc::RLIM_INFINITY || r.rlim_cur as u64 >= need || can_lock_memory() {
        return;
    }
    tracing::warn!(
        "memory.io_memory_bytes ({} MiB per shard) cannot be locked: RLIMIT_MEMLOCK is {} KiB \
         (counted per user, across its processes) and this broker needs {} KiB, so disk reads \
         will pin their pages each time. Raise it (ulimit -l, or LimitMEMLOCK= under systemd), \
         grant CAP_IPC_LOCK, or set a smaller memory.io_memory_bytes",
        io_memory.iter().max().copied().unwrap_or(0) >> 20,
        r.rlim_cur / 1024,
        need / 1024
    );
}

/// Whether this process may lock memory beyond RLIMIT_MEMLOCK (CAP_IPC_LOCK in its effective
/// capabilities: root on a host, not root in a default container).
fn can_lock_memory() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Whether glommio sees `core` among the online CPUs (it refuses to bind to one it does not).
fn glommio_knows_cpu(core: usize) -> bool {
    glommio::CpuSet::online().is_ok_and(|s| !s.filter(|c| c.cpu == core).is_empty())
}

/// Glommio probes a device with a read at offset 0 of the first DMA file opened on it; an
/// empty first file makes it wrongly decide the disk supports polled I/O. Give it data.
const PROBE_FILE: &str = ".dma-probe";

fn write_probe(data_dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let p = data_dir.join(PROBE_FILE);
    let ok = std::fs::metadata(&p)
        .map(|m| m.len() >= 4096)
        .unwrap_or(false);
    if !ok {
        std::fs::write(&p, vec![0x5au8; 4096])
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(p)
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let mut tuning = Tuning::load_layered(a.config.config.as_deref(), &a.config.set)?.tuning;
    if let Some(m) = a.metrics_listen {
        tuning.metrics.listen = m.to_string();
    }
    if let Some(f) = &a.log_format {
        tuning.logging.format = f.clone();
    }
    init_tracing(&tuning.logging);
    if let Some(l) = a.listen {
        tuning.node.listen = l.to_string();
    }
    if let Some(d) = &a.data_dir {
        tuning.node.data_dir = d.display().to_string();
    }
    if let Some(id) = a.node_id {
        tuning.node.node_id = id;
    }
    if let Some(c) = &a.controllers {
        tuning.node.controllers = c.clone();
    }
    if let Some(r) = &a.rack {
        tuning.node.rack = r.clone();
    }
    if let Some(cpus) = &a.cpus {
        tuning.shards.cores = cpus.0.clone();
    }
    if tuning.node.node_id < 0 {
        bail!("node id {} is negative", tuning.node.node_id);
    }
    // Checked before anything touches the data dir.
    let voters = if tuning.node.controllers.trim().is_empty() {
        None
    } else {
        Some(
            crate::server::controller::wire::parse_voters(&tuning.node.controllers)
                .map_err(|e| anyhow::anyhow!("--controllers: {e}"))?,
        )
    };
    let listen: std::net::SocketAddr = tuning.node.listen.parse().context("node.listen")?;
    let advertised = a.advertise.clone().unwrap_or_else(|| {
        if tuning.node.advertised_listener.is_empty() {
            tuning.node.listen.clone()
        } else {
            tuning.node.advertised_listener.clone()
        }
    });
    let (adv_host, adv_port) = match advertised.rsplit_once(':') {
        Some((h, p)) => (
            h.trim_matches(|c| c == '[' || c == ']').to_string(),
            p.parse::<i32>().ok(),
        ),
        None => (String::new(), None),
    };
    let Some(adv_port) = adv_port.filter(|_| !adv_host.is_empty()) else {
        bail!("--advertise must be HOST:PORT, got {advertised:?}");
    };
    let data_dir = tuning.data_dir();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let dir_lock = crate::cluster::meta_properties::lock(&data_dir).map_err(anyhow::Error::msg)?;
    let identity = crate::cluster::meta_properties::load_or_create(&data_dir, tuning.node.node_id)
        .map_err(anyhow::Error::msg)?;
    let cluster_settings = match voters {
        None => None,
        Some(voters) => Some(crate::cluster::node::ClusterSettings {
            voters,
            rack: Some(tuning.node.rack.clone()).filter(|r| !r.is_empty()),
            directory_id: identity.directory_id,
            incarnation_id: uuid::Uuid::new_v4(),
            known_cluster_id: identity.cluster_id.clone(),
        }),
    };
    let probe = write_probe(&data_dir)?;
    raise_fd_limit();
    // Refuse a port another process serves: SO_REUSEPORT would otherwise share it silently.
    // A process killed a moment ago can leave its listener open while the kernel tears down
    // its io_uring: give that a few seconds before calling the port taken.
    let mut taken = true;
    for _ in 0..30 {
        if std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_err() {
            taken = false;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if taken {
        bail!("cannot listen on {listen}: address already in use");
    }

    let online: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let (cores, pin) = shard_cores(
        &online,
        &tuning.shards,
        a.cores.map(usize::from),
        a.overprovisioned,
    )?;
    check_memlock(
        &cores
            .iter()
            .map(|&c| tuning.for_core(c).io_memory_bytes)
            .collect::<Vec<_>>(),
    );
    let image = if cluster_settings.is_some() {
        // A clustered node serves what the metadata log says, once it has caught up.
        metadata::MetadataImage::default()
    } else {
        metadata::load_image(&data_dir)?
    };
    let cluster = metadata::load_or_init_cluster(&data_dir)?;
    // Bound before the shards start so that a taken port fails the start, not a later scrape;
    // the bound address (port 0 picks one) is what DescribeConfigs reports as metrics.listen.
    let mut metrics_addr = None;
    let metrics_listener = if tuning.metrics.listen.is_empty() {
        None
    } else {
        let addr: std::net::SocketAddr = tuning.metrics.listen.parse().context("metrics.listen")?;
        let l = std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        let bound = l.local_addr().context("metrics listener")?;
        tuning.metrics.listen = bound.to_string();
        metrics_addr = Some(bound);
        Some(l)
    };
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for _ in &cores {
        let (tx, rx) = flume::bounded::<Job>(tuning.shards.job_queue_max);
        senders.push(tx);
        receivers.push(rx);
    }
    let mesh: Mesh = Arc::new(senders);
    let node = Arc::new(Node {
        node_id: tuning.node.node_id,
        data_dir: data_dir.clone(),
        advertised_host: adv_host,
        advertised_port: adv_port,
        cluster_id: cluster.cluster_id.clone(),
        meta: ArcSwap::from_pointee(image),
        shard_count: mesh.len(),
        next_producer_id: AtomicI64::new(cluster.producer_id_block_end),
        producer_id_block_end: AtomicI64::new(cluster.producer_id_block_end),
        tuning: tuning.clone(),
        cluster: cluster_settings,
        broker_epoch: AtomicI64::new(-1),
    });

    if node.cluster.is_none() {
        // A single node's controller creates the compacted internal topic that holds committed
        // offsets and group state, as it creates any topic (a cluster's does so on first use).
        crate::cluster::controller::ensure_internal_topic(
            &node,
            crate::group::OFFSETS_TOPIC,
            tuning.group.offsets_topic_num_partitions,
        )
        .map_err(|(_, m)| anyhow::anyhow!("cannot create {}: {m}", crate::group::OFFSETS_TOPIC))?;
    }
    if let Some(l) = metrics_listener {
        crate::server::metrics_endpoint::spawn(l, mesh.clone(), cores.clone())
            .context("cannot start the metrics thread")?;
    }
    // Installed before any shard listens, so that a SIGTERM arriving as soon as the port
    // answers still means a clean shutdown, not the default action (death without a flush).
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("cannot install signal handlers")?;
    let (status_tx, status_rx) = std::sync::mpsc::channel::<Result<usize, String>>();
    let mut handles = Vec::new();
    for (i, (core, rx)) in cores.iter().copied().zip(receivers).enumerate() {
        let node = node.clone();
        let mesh = mesh.clone();
        let status = status_tx.clone();
        let probe = probe.clone();
        let st = tuning.for_core(core);
        // A pinned shard is placed by glommio itself: its thread is bound to the core before
        // the executor allocates (its I/O memory then comes from the core's NUMA node), and
        // glommio honours spin_before_park only for a bound executor.
        let placement = if pin && glommio_knows_cpu(core) {
            Placement::Fixed(core)
        } else {
            Placement::Unbound
        };
        let builder = LocalExecutorBuilder::new(placement)
            .name(&format!("fjord-shard-{i}"))
            .io_memory(st.io_memory_bytes)
            .ring_depth(st.ring_depth)
            .spin_before_park(Duration::from_micros(st.spin_before_park_us));
        let h = builder
            .spawn(move || async move {
                if pin {
                    core_affinity::set_for_current(core_affinity::CoreId { id: core });
                }
                // Created here, on its own thread: a shard is Rc-based and never leaves it.
                let shard = Rc::new(Shard::new(i, st, node, mesh));
                if let Err(e) = shard_main(shard, rx, probe, listen, status.clone()).await {
                    let _ = status.send(Err(format!("shard {i}: {e:#}")));
                }
            })
            .map_err(|e| anyhow::anyhow!("cannot start shard {i}: {e}"))?;
        handles.push(h);
    }
    drop(status_tx);
    for _ in 0..cores.len() {
        match status_rx.recv() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("{e}"),
            Err(_) => bail!("a shard stopped during start-up"),
        }
    }
    tracing::info!(
        "fjord ready: listening on {listen} with {} shards on cores {:?}, data in {}",
        cores.len(),
        cores,
        data_dir.display()
    );
    if let Some(m) = metrics_addr {
        tracing::info!("metrics at http://{m}/metrics");
    }
    let sig = signals.forever().next();
    tracing::info!("signal {sig:?}: shutting down");
    if node.cluster.is_some() {
        // Kafka's controlled shutdown: leaderships move away before the node stops serving.
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let job: Job = Box::new(move || {
            Box::pin(async move {
                if let Some(h) = crate::server::controller::handle() {
                    h.controlled_shutdown(Duration::from_secs(15)).await;
                }
                let _ = done_tx.send(());
            })
        });
        if mesh[node.controller_shard()].send(job).is_ok() {
            let _ = done_rx.recv_timeout(Duration::from_secs(20));
        }
    }
    for tx in mesh.iter() {
        let job: Job = Box::new(|| {
            Box::pin(async {
                let sh = shard::local();
                let tx = sh.stop_tx.borrow_mut().take();
                if let Some(tx) = tx {
                    let _ = tx.send(());
                }
            })
        });
        let _ = tx.send(job);
    }
    for h in handles {
        let _ = h.join();
    }
    drop(dir_lock);
    tracing::info!("fjord stopped");
    Ok(())
}

/// The core each shard runs on, and whether to pin: one shard per core, on the cores the tuning
/// file names (or every online core). More shards than that is refused unless overprovisioning
/// was asked for; then the shards share cores round robin and run unpinned, since pinning two
/// busy-polling reactors to one core would starve one of them.
fn shard_cores(
    online: &[usize],
    s: &crate::config::ShardsSection,
    want: Option<usize>,
    overprovisioned_flag: bool,
) -> anyhow::Result<(Vec<usize>, bool)> {
    let named = !s.cores.is_empty();
    let mut cores: Vec<usize> = if named {
        s.cores.clone()
    } else {
        online.to_vec()
    };
    if cores.is_empty() {
        // The online cores could not be read: run one shard on core 0.
        cores.push(0);
    }
    for c in &cores {
        if !online.is_empty() && !online.contains(c) {
            bail!("shards.cores names core {c}, which is not online (online: {online:?})");
        }
    }
    let mut distinct = cores.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let n = want.unwrap_or(cores.len());
    let over = overprovisioned_flag || s.overprovisioned;
    if n > distinct.len() || distinct.len() < cores.len() {
        let what = if named {
            format!("the {} cores shards.cores names", distinct.len())
        } else {
            format!("the {} online cores", distinct.len())
        };
        if !over {
            let asked = match want {
                Some(n) => format!("--cores {n}"),
                None => format!("shards.cores = {cores:?}"),
            };
            bail!(
                "{asked}: more shards than {what} ({distinct:?}); Fjord runs one shard per core: pass --overprovisioned to share cores (unpinned)"
            );
        }
        tracing::warn!(
            "overprovisioned: {n} shards on {what} ({distinct:?}); shards share cores and run unpinned"
        );
        let base = distinct;
        return Ok(((0..n).map(|i| base[i % base.len()]).collect(), false));
    }
    cores.truncate(n);
    Ok((cores, s.pin))
}

async fn shard_main(
    shard: Rc<Shard>,
    rx: flume::Receiver<Job>,
    probe: PathBuf,
    listen: std::net::SocketAddr,
    status: std::sync::mpsc::Sender<Result<usize, String>>,
) -> anyhow::Result<()> {
    let f = glommio::io::OpenOptions::new()
        .read(true)
        .dma_open(&probe)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open probe file {}: {e}", probe.display()))?;
    let _ = f.read_at(0, 4096).await;
    let _ = f.close().await;
    let node = shard.node.clone();
    if !node.tuning.metrics.listen.is_empty() {
        crate::metrics::enable_on_this_thread();
    }
    crate::log::storage::set_syncs_in_flight(shard.tuning.syncs_in_flight);
    crate::log::read_ahead::configure(
        node.tuning.memory.read_ahead_bytes_per_shard,
        node.tuning.memory.read_ahead_bytes_per_partition,
    );
    let (stop_tx, stop_rx) = futures::channel::oneshot::channel();
    *shard.stop_tx.borrow_mut() = Some(stop_tx);
    shard::install(shard.clone());
    glommio::spawn_local(shard::serve_jobs(rx)).detach();
    shard.open_owned_partitions().await;
    let gcfg = crate::group::state::GroupConfig {
        min_session_timeout_ms: node.tuning.group.min_session_timeout_ms,
        max_session_timeout_ms: node.tuning.group.max_session_timeout_ms,
        initial_rebalance_delay_ms: node.tuning.group.initial_rebalance_delay_ms,
        ..Default::default()
    };
    let groups = Rc::new(crate::group::GroupShard::new(gcfg));
    groups.sync_partitions(&shard).await;
    *shard.groups.borrow_mut() = Some(groups.clone());
    glommio::spawn_local(groups.ticker(shard.clone())).detach();
    let listener = bind_listener(listen, &node.tuning.net)
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    glommio::spawn_local(crate::server::accept_loop(listener, shard.clone())).detach();
    glommio::spawn_local(retention_loop(shard.clone())).detach();
    if node.shard_count > 1 {
        glommio::spawn_local(reclaim_loop()).detach();
    }
    if node.cluster.is_some() && shard.id == node.controller_shard() {
        crate::server::controller::start(&shard)?;
    }
    let _ = status.send(Ok(shard.id));
    let _ = stop_rx.await;
    for p in shard.open_partitions() {
        if let Err(e) = p.log.flush().await {
            tracing::error!("flush of {}-{} failed: {e}", p.topic, p.index);
        }
    }
    Ok(())
}

/// A reader that has not read for this long gives back its read-ahead (window and extents).
const READ_AHEAD_IDLE: Duration = Duration::from_secs(10);

/// Frees the disk read buffers this shard read that other shards have finished writing out
/// (a shard's own disk reads free them too; this covers a shard that stops reading).
async fn reclaim_loop() {
    loop {
        glommio::timer::sleep(Duration::from_millis(250)).await;
        crate::log::dma_bytes::reclaim();
    }
}

async fn retention_loop(shard: Rc<Shard>) {
    let retention_every_ms = shard.node.tuning.log.retention_check_interval_ms.max(100);
    // The cleaner looks more often than retention (Kafka: log.cleaner.backoff.ms, 15 s), so a
    // compacted topic's max.compaction.lag.ms is honoured within that.
    let cleaner_every_ms = shard
        .node
        .tuning
        .log
        .cleaner_backoff_ms
        .clamp(100, retention_every_ms);
    let mut last_retention_ms = crate::log::now_ms();
    loop {
        glommio::timer::sleep(Duration::from_millis(cleaner_every_ms)).await;
        let now = crate::log::now_ms();
        let retention_due = now.saturating_sub(last_retention_ms) + 50 >= retention_every_ms;
        if retention_due {
            last_retention_ms = now;
        }
        // Partitions opened since the last pass shrank everyone's share of the cache budget.
        let cap = shard.cache_cap();
        for p in shard.open_partitions() {
            p.log.trim_cache(cap);
            p.log.drop_idle_read_ahead(READ_AHEAD_IDLE);
        }
        for p in shard.open_partitions() {
            let Some(cfg) = shard.node.effective_config(&p.topic) else {
                continue;
            };
            if cfg.compact {
                // At most one cleaning pass per partition per interval; the heavy part runs
                // on the blocking pool, so appends on this shard carry on meanwhile.
                let cs = crate::log::compaction::CleanerSettings {
                    segment_bytes: cfg.segment_bytes,
                    delete_retention_ms: cfg.delete_retention_ms,
                    min_cleanable_dirty_ratio: cfg.min_cleanable_dirty_ratio,
                    max_compaction_lag_ms: cfg.max_compaction_lag_ms,
                };
                match p.log.compact(&cs, now).await {
                    Ok(Some(st)) => tracing::info!(
                        "compacted {}-{}: {} -> {} bytes, {} -> {} segments, kept {} records, dropped {} ({} tombstones)",
                        p.topic,
                        p.index,
                        st.bytes_before,
                        st.bytes_after,
                        st.segments_before,
                        st.segments_after,
                        st.records_kept,
                        st.records_dropped,
                        st.tombstones_dropped
                    ),
                    Ok(None) => {}
                    Err(e) => tracing::warn!("compaction of {}-{} failed: {e}", p.topic, p.index),
                }
            }
            if !cfg.delete || !retention_due {
                continue;
            }
            let s = crate::log::LogSettings {
                segment_bytes: cfg.segment_bytes,
                segment_ms: cfg.segment_ms,
                retention_ms: cfg.retention_ms,
                retention_bytes: cfg.retention_bytes,
                cache_bytes_max: cap,
                visibility_sync_delay_us: cfg.visibility_sync_delay_us,
            };
            let n = p.log.enforce_retention(&s, now).await;
            if n > 0 {
                p.log_start_moved();
                tracing::info!("retention removed {n} segments of {}-{}", p.topic, p.index);
            }
        }
    }
}

/// One listener per shard on the same port (SO_REUSEPORT); SO_REUSEADDR so that a restart does
/// not wait for the previous run's TIME_WAIT connections.
fn bind_listener(
    addr: std::net::SocketAddr,
    net: &crate::config::NetSection,
) -> std::io::Result<glommio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::{FromRawFd, IntoRawFd};
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let sk = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    sk.set_reuse_address(true)?;
    sk.set_reuse_port(true)?;
    // Accepted sockets inherit the listener's buffer sizes.
    if net.socket_send_buffer_bytes > 0 {
        sk.set_send_buffer_size(net.socket_send_buffer_bytes)?;
    }
    if net.socket_recv_buffer_bytes > 0 {
        sk.set_recv_buffer_size(net.socket_recv_buffer_bytes)?;
    }
    sk.bind(&addr.into())?;
    sk.listen(1024)?;
    // Safety: the fd is a freshly bound, listening TCP socket we own and hand over whole.
    Ok(unsafe { glommio::net::TcpListener::from_raw_fd(sk.into_raw_fd()) })
}

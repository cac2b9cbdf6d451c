//! Test harness: runs the real `fjord` binary on a free loopback port with a temporary data
//! directory, and kills it when the test ends (even on panic).
#![allow(dead_code)]

pub mod raw;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Broker {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    /// The temporary directory of an earlier process whose data dir this one took over
    /// (`adopt_files_of`): removed with this broker, not before.
    _adopted: Option<tempfile::TempDir>,
    pub extra_args: Vec<String>,
}

/// A port for a broker to listen on later. Taken below Linux's ephemeral range (32768 and
/// up), from a per-process counter: a port the kernel hands out at random (to a client's
/// outgoing connection, or to another test's port 0) could take it between this call and
/// the broker's bind, which made cluster tests fail with "Address already in use".
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 12_000;
    const SPAN: u32 = 20_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id() * 7919 % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().unwrap().port()
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Broker {
        Broker::start_in(None, extra)
    }

    /// Like `start_with`, with the data directory given (e.g. on a special file system).
    pub fn start_in(data_dir: Option<PathBuf>, extra: &[&str]) -> Broker {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data_dir = data_dir.unwrap_or_else(|| tmp.path().join("data"));
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut b = Broker {
            child: None,
            addr,
            data_dir,
            _tmp: Some(tmp),
            _adopted: None,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
        };
        b.spawn();
        b
    }

    pub fn bootstrap(&self) -> String {
        self.addr.to_string()
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        // Every shard is serving once the broker logs "fjord ready": the port alone answers as
        // soon as the first shard listens, while others may still be recovering partitions.
        let ready_before = self.log().matches("fjord ready").count();
        let child = Command::new(env!("CARGO_BIN_EXE_fjord"))
            .arg("serve")
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            // glommio's I/O memory is locked and faulted in when a shard starts: by default
            // the read-ahead's room (hundreds of MiB per shard), which the many short-lived
            // brokers of these tests do not need (a test's own --set comes later and wins).
            .args(["--set", "memory.io_memory_bytes=16777216"])
            .args(&self.extra_args)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn fjord");
        self.child = Some(child);
        wait_port(self.addr, Duration::from_secs(30));
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.log().matches("fjord ready").count() <= ready_before {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("broker exited during startup ({st}):\n{}", self.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "broker not ready within 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self._tmp
            .as_ref()
            .map(|t| t.path().join("broker.log"))
            .unwrap_or_else(|| PathBuf::from("/tmp/fjord-broker.log"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            // The kernel may keep the listener a moment longer while it tears down io_uring.
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline
                && TcpStream::connect_timeout(&self.addr, Duration::from_millis(100)).is_ok()
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe {
            libc_kill(c.id() as i32, 15);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("broker did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn data(&self) -> &Path {
        &self.data_dir
    }

    /// Takes over the temporary directories of `old`, whose data dir this broker was started
    /// on: dropping `old` must not delete the files this one runs on.
    pub fn adopt_files_of(&mut self, old: &mut Broker) {
        self._adopted = old._tmp.take().or_else(|| old._adopted.take());
        if let Some(older) = old._adopted.take() {
            // Only one level is kept per broker: keep the older one alive too by leaking it
            // into this process's lifetime (test processes are short).
            std::mem::forget(older);
        }
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

impl Drop for Broker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- broker log ----\n{}", self.log());
        }
        self.kill9();
    }
}

/// Counts librdkafka's rebalance callbacks: a member whose coordinator keeps its state makes
/// none, one that is told it is unknown loses its partitions and gets them again.
pub struct Rebalances(pub std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl rdkafka::ClientContext for Rebalances {}

impl rdkafka::consumer::ConsumerContext for Rebalances {
    fn pre_rebalance(
        &self,
        _: &rdkafka::consumer::BaseConsumer<Self>,
        _: &rdkafka::consumer::Rebalance<'_>,
    ) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

pub fn wait_port(addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    panic!("broker did not listen on {addr} within {timeout:?}");
}

pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The metrics address the broker logged (it binds port 0 and reports the port it got).
pub fn metrics_addr(b: &Broker) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = b.log();
        // The last one logged: a restarted broker listens on a new port.
        if let Some((_, rest)) = log.rsplit_once("metrics at http://") {
            if let Some(addr) = rest.split("/metrics").next() {
                return addr.parse().expect("metrics address");
            }
        }
        assert!(
            Instant::now() < deadline,
            "no metrics address in log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: fjord\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    let (head, body) = out.split_once("\r\n\r\n").expect("HTTP response");
    (head.to_string(), body.to_string())
}

/// The value of an unlabelled-or-shard-labelled counter summed over shards, from the metrics
/// endpoint (0 when absent).
pub fn metric_total(addr: SocketAddr, name: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics");
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

//! The broker driven by the three common Python clients (confluent-kafka, kafka-python,
//! aiokafka) through `tests/python/clients.py`. A missing python3 or module FAILS the test: a
//! compatibility suite that silently skips proves nothing.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Broker;

const INSTALL_HINT: &str = "pip install confluent-kafka kafka-python aiokafka";

fn python_ready() {
    let out = Command::new("python3")
        .arg("-c")
        .arg("import confluent_kafka, kafka, aiokafka")
        .output()
        .unwrap_or_else(|e| {
            panic!("python3 is not runnable ({e}); install python3, then {INSTALL_HINT}")
        });
    assert!(
        out.status.success(),
        "a Python Kafka client module is missing: {}\nrun: {INSTALL_HINT}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

#[test]
fn confluent_kafka_python_kafka_python_and_aiokafka() {
    python_ready();
    let b = Broker::start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/clients.py");
    let started = Instant::now();
    let mut child = Command::new("python3")
        .arg(script)
        .arg(b.bootstrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    // Read both pipes on threads so that a chatty client cannot block on a full pipe.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let limit = Duration::from_secs(180);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = t_out.join().unwrap();
    let err = t_err.join().unwrap();
    eprintln!("---- clients.py stdout ----\n{out}---- clients.py stderr ----\n{err}");
    let status = status.unwrap_or_else(|| panic!("clients.py did not finish within {limit:?}"));
    assert_ne!(
        status.code(),
        Some(2),
        "Python client module missing: {INSTALL_HINT}"
    );
    assert!(
        status.success(),
        "clients.py failed ({status}): {}",
        err.lines()
            .filter(|l| l.starts_with("FAIL"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    assert!(
        out.contains("ALL PYTHON CLIENT CHECKS PASSED"),
        "clients.py exited 0 without its closing line"
    );
    eprintln!("python clients: {:.1}s", started.elapsed().as_secs_f64());
}

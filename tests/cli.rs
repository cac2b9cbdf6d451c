//! The command line as an operator uses it: admin subcommands against a running broker,
//! `fjord tune`, and clear one-line errors for bad flags and bad tuning files.

mod common;

use std::process::Command;

use common::Broker;

fn fjord(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fjord"))
        .args(args)
        .output()
        .expect("run fjord");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn topics_and_groups_admin_commands() {
    let b = Broker::start();
    let bs = b.bootstrap();
    let (ok, out, err) = fjord(&[
        "topics",
        "--bootstrap",
        &bs,
        "create",
        "cli-t",
        "--partitions",
        "3",
        "--config",
        "retention.ms=60000",
    ]);
    assert!(ok, "create: {out} {err}");
    let (ok, _, err) = fjord(&[
        "topics",
        "--bootstrap",
        &bs,
        "create",
        "cli-t",
        "--partitions",
        "3",
    ]);
    assert!(
        !ok && err.contains("TopicAlreadyExists"),
        "duplicate create: {err}"
    );
    let (ok, out, _) = fjord(&["topics", "--bootstrap", &bs, "list"]);
    assert!(
        ok && out.contains("cli-t") && !out.contains("__consumer_offsets"),
        "{out}"
    );
    let (ok, out, err) = fjord(&["topics", "--bootstrap", &bs, "describe", "cli-t"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("Partitions: 3") && out.contains("retention.ms=60000 (topic)"),
        "{out}"
    );

    // A group with a committed offset, through a real client.
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .create()
        .unwrap();
    for i in 0..10 {
        p.send(
            BaseRecord::<(), _>::to("cli-t")
                .partition(1)
                .payload(&format!("{i}")),
        )
        .unwrap();
    }
    p.flush(std::time::Duration::from_secs(10)).unwrap();
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .set("group.id", "cli-group")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("cli-t", 1, Offset::Offset(4))
        .unwrap();
    c.commit(&tpl, CommitMode::Sync).expect("commit");
    let (ok, out, err) = fjord(&["groups", "--bootstrap", &bs, "list"]);
    assert!(ok && out.contains("cli-group"), "{out} {err}");
    let (ok, out, err) = fjord(&["groups", "--bootstrap", &bs, "describe", "cli-group"]);
    assert!(ok, "{err}");
    // partition 1: committed 4, log end 10, lag 6
    let row = out
        .lines()
        .find(|l| l.starts_with("cli-t") && l.split_whitespace().nth(1) == Some("1"))
        .unwrap_or_default();
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cols[1..5], &["1", "4", "10", "6"], "{out}");

    let (ok, _, err) = fjord(&["topics", "--bootstrap", &bs, "delete", "cli-t"]);
    assert!(ok, "{err}");
    let (ok, _, err) = fjord(&["topics", "--bootstrap", &bs, "describe", "cli-t"]);
    assert!(!ok && err.contains("UnknownTopicOrPartition"), "{err}");
}

#[test]
fn bad_flags_and_bad_tuning_files_are_refused_in_one_line() {
    let (ok, _, err) = fjord(&["serve", "--cores", "0"]);
    assert!(!ok && err.contains("--cores"), "{err}");
    let (ok, _, err) = fjord(&["serve", "--listen", "not-an-address"]);
    assert!(!ok && err.contains("--listen"), "{err}");
    let (ok, _, err) = fjord(&["serve", "--cpus", "3-1"]);
    assert!(!ok && err.contains("--cpus"), "{err}");
    let (ok, _, err) = fjord(&["serve", "--controllers", "0@127.0.0.1:1"]);
    assert!(!ok && err.contains("voter ids start at 1"), "{err}");
    let (ok, _, err) = fjord(&["serve", "--controllers", "1@127.0.0.1:1,1@127.0.0.1:2"]);
    assert!(!ok && err.contains("listed twice"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let text = fjord::config::DEFAULT_TUNING.replace("[io]", "[io]\nring_dept = 5");
    std::fs::write(&bad, text).unwrap();
    let (ok, _, err) = fjord(&["serve", "--config", bad.to_str().unwrap()]);
    assert!(!ok, "unknown key refused");
    let line = err.lines().last().unwrap_or_default();
    assert!(
        line.contains("bad.toml") && line.contains("line") && line.contains("ring_dept"),
        "{err}"
    );
    let (ok, _, err) = fjord(&["serve", "--config", "/no/such/file.toml"]);
    assert!(!ok && err.contains("/no/such/file.toml"), "{err}");
    let (ok, _, err) = fjord(&["topics", "--bootstrap", "127.0.0.1:1", "list"]);
    assert!(!ok && err.contains("cannot connect"), "{err}");
}

#[test]
fn tune_writes_a_file_serve_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("host.toml");
    let data = dir.path().join("data");
    let (ok, _, err) = fjord(&[
        "tune",
        "--data-dir",
        data.to_str().unwrap(),
        "--bytes",
        "8388608",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.contains("Written by `fjord tune`") && text.contains("fdatasync p50"),
        "{text}"
    );
    fjord::config::Tuning::parse(&text, "host.toml").expect("the generated file parses");
    assert!(
        !data.join(".fjord-tune-scratch").exists(),
        "scratch file removed"
    );
}

/// A tuning file that names only what differs, `--set` overrides (Fjord's and Kafka's names)
/// and `fjord config show` telling where each value came from.
#[test]
fn partial_config_and_set_overrides_take_effect() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("partial.toml");
    // Kafka's name at the top, Fjord's under its section: nothing else is required.
    std::fs::write(
        &cfg,
        "num.partitions = 3\n\n[log]\nretention.hours = 2\nsegment_bytes = 1048576\n",
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let (ok, out, err) = fjord(&[
        "config",
        "show",
        "--config",
        c,
        "--set",
        "log.segment.bytes=2097152",
    ]);
    assert!(ok, "{err}");
    let line = |key: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("{key} missing from:\n{out}"))
            .to_string()
    };
    assert!(
        line("num_partitions").contains("= 3")
            && line("num_partitions").contains("partial.toml line 1"),
        "{out}"
    );
    assert!(
        line("retention_ms").contains("= 7200000") && line("retention_ms").contains("line 4"),
        "{out}"
    );
    assert!(
        line("segment_bytes").contains("= 2097152")
            && line("segment_bytes").contains("--set log.segment.bytes=2097152"),
        "{out}"
    );
    assert!(line("ring_depth").ends_with("# default"), "{out}");

    // The broker runs with the merged result: the flag wins over the file.
    let b = Broker::start_with(&["--config", c, "--set", "num.partitions=5"]);
    let bs = b.bootstrap();
    let (ok, out, err) = fjord(&[
        "topics",
        "--bootstrap",
        &bs,
        "create",
        "defaulted",
        "--partitions=-1",
    ]);
    assert!(ok, "create: {out} {err}");
    let (ok, out, err) = fjord(&["topics", "--bootstrap", &bs, "describe", "defaulted"]);
    assert!(ok, "{err}");
    assert!(out.contains("Partitions: 5"), "{out}");
    assert!(out.contains("retention.ms=7200000"), "{out}");

    // A bad override names itself, in one line, and the broker does not start.
    let (ok, _, err) = fjord(&["serve", "--config", c, "--set", "io.ring_depth=1"]);
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("--set io.ring_depth=1") && err.contains("between 8 and 32768"),
        "{err}"
    );
    let (ok, _, err) = fjord(&["serve", "--set", "io.ring_dept=64"]);
    assert!(
        !ok && err.contains("io.ring_dept") && err.contains("did you mean io.ring_depth"),
        "{err}"
    );
    let (ok, _, err) = fjord(&["serve", "--set", "num.partitions=many"]);
    assert!(
        !ok && err.contains("num.partitions") && err.contains("integer"),
        "{err}"
    );
    std::fs::write(&cfg, "[log]\nnum_partitions = 0\n").unwrap();
    let (ok, _, err) = fjord(&["serve", "--config", c]);
    assert!(
        !ok && err.contains("partial.toml line 2") && err.contains("log.num_partitions"),
        "{err}"
    );
}

#[test]
fn more_shards_than_cores_is_refused_unless_overprovisioned() {
    let online = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let too_many = (online + 1).to_string();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (ok, _, err) = fjord(&[
        "serve",
        "--cores",
        &too_many,
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:1",
    ]);
    assert!(!ok, "refused");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("--cores {too_many}")) && err.contains("--overprovisioned"),
        "{err}"
    );
    // Asked for explicitly, the extra shards run (unpinned) and serve clients.
    let b = Broker::start_with(&["--cores", &too_many, "--overprovisioned"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !b.log().contains("fjord ready") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let log = b.log();
    assert!(
        log.contains("overprovisioned") && log.contains(&format!("with {too_many} shards")),
        "{log}"
    );
    let (ok, out, err) = fjord(&[
        "topics",
        "--bootstrap",
        &b.bootstrap(),
        "create",
        "op",
        "--partitions",
        "4",
    ]);
    assert!(ok, "{out} {err}");
}

/// `--log-format json` writes one JSON object per line; levels per module come from the
/// tuning file (`logging.levels`) and then RUST_LOG.
#[test]
fn json_logs_and_per_module_levels() {
    let mut b = Broker::start_with(&[
        "--log-format",
        "json",
        "--set",
        "logging.levels=warn,fjord::cli=info",
    ]);
    assert!(b.stop().success());
    let log = b.log();
    let mut ready = false;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let msg = v["fields"]["message"].as_str().unwrap_or_default();
        if msg.starts_with("fjord ready") {
            ready = v["level"] == "INFO" && v["target"] == "fjord::cli";
        }
    }
    assert!(ready, "{log}");

    // One module held at warn: its info lines are not written, the rest are.
    let quiet = "logging.levels=info,fjord::cluster=warn";
    let mut b = Broker::start_with(&["--set", quiet]);
    let (ok, out, err) = fjord(&["topics", "--bootstrap", &b.bootstrap(), "create", "quiet-t"]);
    assert!(ok, "{out} {err}");
    assert!(b.stop().success());
    let log = b.log();
    assert!(
        log.contains("fjord ready") && !log.contains("created topic"),
        "{log}"
    );

    // RUST_LOG comes after the file's levels and wins for the modules it names.
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("broker.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let port = common::free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_fjord"))
        .args(["serve", "--set", quiet, "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "fjord::cluster=info")
        .stderr(log)
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Kill(child);
    let wait_for = |what: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if text.contains(what) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {what:?} in:\n{text}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    wait_for("fjord ready");
    let bs = format!("127.0.0.1:{port}");
    let (ok, out, err) = fjord(&["topics", "--bootstrap", &bs, "create", "loud-t"]);
    assert!(ok, "{out} {err}");
    wait_for("created topic loud-t");
}

//! librdkafka's own regression suite, its quick single-broker subset and its fetch-from-follower
//! test on a three-node cluster, against this build's `fjord` binary: `tools/librdkafka-suite.py --quick` builds librdkafka's test runner once
//! into a cache folder, starts a fresh broker per chunk of tests, and fails if any test fails.
//!
//! The build needs a C toolchain and Debian's -dev packages for zstd, lz4, zlib, ssl, sasl2,
//! curl and rapidjson. Without them this test says so loudly and passes, unless
//! FJORD_REQUIRE_LIBRDKAFKA_SUITE=1 (set by .ci/run, which installs them), where it fails.

use std::process::Command;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/librdkafka-suite.py");

/// Whether the suite can be built here: when it cannot, a loud skip, or a failure under
/// FJORD_REQUIRE_LIBRDKAFKA_SUITE=1.
fn suite_available(test: &str) -> bool {
    let required = std::env::var("FJORD_REQUIRE_LIBRDKAFKA_SUITE").as_deref() == Ok("1");
    let check = Command::new("python3")
        .arg(SCRIPT)
        .arg("--check-deps")
        .output();
    let missing = match check {
        Err(e) => Some(format!("cannot run python3: {e}")),
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(String::from_utf8_lossy(&o.stderr).trim().to_string()),
    };
    if let Some(why) = missing {
        if required {
            panic!("FJORD_REQUIRE_LIBRDKAFKA_SUITE=1 but the suite cannot be built: {why}");
        }
        eprintln!(
            "\n*** SKIPPED {test}: {why}\n*** install the build dependencies (see .ci/run) or \
             set FJORD_REQUIRE_LIBRDKAFKA_SUITE=1 to make this a failure\n"
        );
        return false;
    }
    true
}

/// librdkafka's fetch-from-follower test (0101, KIP-392), which needs three brokers in three
/// racks, against a three-node Fjord cluster (`--cluster`).
#[test]
fn librdkafka_fetch_from_follower_passes_on_a_three_node_cluster() {
    if !suite_available("librdkafka_fetch_from_follower_passes_on_a_three_node_cluster") {
        return;
    }
    let out = Command::new("python3")
        .arg(SCRIPT)
        .args(["--cluster", "--tests", "0101", "--fjord"])
        .arg(env!("CARGO_BIN_EXE_fjord"))
        .output()
        .expect("run tools/librdkafka-suite.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("librdkafka suite: 1 passed, 0 failed"),
        "{stdout}\nstderr:\n{stderr}"
    );
}

#[test]
fn librdkafka_quick_suite_passes() {
    if !suite_available("librdkafka_quick_suite_passes") {
        return;
    }
    let out = Command::new("python3")
        .arg(SCRIPT)
        .arg("--quick")
        .arg("--fjord")
        .arg(env!("CARGO_BIN_EXE_fjord"))
        .output()
        .expect("run tools/librdkafka-suite.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The table and closing line show in the test's output (cargo test prints it on failure,
    // and with --nocapture).
    println!("{stdout}");
    let closing = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("librdkafka suite: "))
        .unwrap_or_else(|| panic!("no closing line; stderr:\n{stderr}"));
    assert!(
        out.status.success(),
        "{closing}\n{stdout}\nstderr:\n{stderr}"
    );
    // A run where nothing passed would be a broken harness, not a green suite.
    let passed: u32 = closing
        .trim_start_matches("librdkafka suite: ")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(passed >= 10, "too few tests passed: {closing}");
}

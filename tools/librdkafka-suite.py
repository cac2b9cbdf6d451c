#!/usr/bin/env python3
"""Run librdkafka's own regression suite against a fresh, single-node Fjord.

librdkafka's tests come with the crates.io package rdkafka-sys 4.10.0+2.12.1 (librdkafka 2.12.1).
This script fetches that package through cargo, builds librdkafka, its test runner and
examples/rdkafka_performance once into a cache folder, then runs the chosen tests in small
chunks, each against a freshly started Fjord (so one crashing test, client or broker, costs only
its chunk), and prints a table (test, result, reason) and one closing line:

    librdkafka suite: N passed, N failed, N skipped

Exit code: 0 when nothing failed, 1 when a test failed, 2 on a setup error (build, broker start),
3 when build dependencies are missing (`--check-deps` checks only that).

Every test that is not run is named with its reason: tools/librdkafka-skip.txt (next to this
script) lists the ones skipped on purpose; broker-less (local) tests, tests for another scenario
and manual tests are skipped as the runner's `-L` mode and default scenario do, and are listed
with that reason.

Usage:
    tools/librdkafka-suite.py [--quick] [--tests 0001,0002,...] [--fjord PATH] [--cache DIR]
                              [--chunk N] [--build-only] [--keep-logs DIR] [--cluster]

With --cluster every chunk runs against a fresh three-node cluster (racks RACK1-3, the
rack-aware replica selector), and the tests skipped only for needing three brokers run too,
e.g. `tools/librdkafka-suite.py --cluster --tests 0101`.

Build dependencies (Debian): build-essential python3 libzstd-dev libsasl2-dev libcurl4-openssl-dev
liblz4-dev rapidjson-dev libssl-dev zlib1g-dev.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

RDKAFKA_SYS_VERSION = "4.10.0+2.12.1"
LIBRDKAFKA_VERSION = "2.12.1"
# The broker version the tests are told they run against: gates tests by the Kafka features
# they need (Fjord implements the Kafka 3.x protocol set).
KAFKA_VERSION = "3.9.0"
# Tests told another broker version, each run in a chunk of its own, with the reason.
KAFKA_VERSION_FOR = {
    # Its 3.x variants force librdkafka onto Produce v1 and message format v0/v1
    # (api.version.request=false, broker.version.fallback=0.9.0); Fjord stores RecordBatch v2
    # only and, like Kafka 4.0, serves Produce v3+. As against Kafka 4.0, the test then checks
    # CreateTime and LogAppendTime timestamps with v2 batches only.
    "0052": "4.0.0",
}
# The suite's default scenario (tests/scenarios/default.json): auto-created topics with 4
# partitions.
NUM_PARTITIONS = 4

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SKIP_FILE = os.path.join(HERE, "librdkafka-skip.txt")

# The CI subset: single-broker tests that each take a few seconds in quick mode, covering
# produce/consume, partitions, offsets, groups, headers, timestamps, compaction refusal, admin
# configs and idempotence.
QUICK_TESTS = [
    "0001", "0002", "0003", "0005", "0007", "0008", "0011", "0012", "0013", "0014", "0015",
    "0017", "0021", "0029", "0030", "0031", "0034", "0035", "0036", "0040", "0044", "0048",
    "0054", "0056", "0060", "0063", "0070", "0073", "0085", "0090", "0092", "0099", "0130",
    "0140",
]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class SetupError(Exception):
    pass


def run(cmd, cwd=None, env=None, quiet_log=None):
    """Runs a build step; its output goes to quiet_log (shown on failure)."""
    with open(quiet_log, "ab") if quiet_log else open(os.devnull, "wb") as out:
        r = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = ""
        if quiet_log:
            with open(quiet_log, "rb") as f:
                tail = f.read()[-4000:].decode("utf-8", "replace")
        raise SetupError(f"`{' '.join(cmd)}` failed (exit {r.returncode}) in {cwd}\n{tail}")


# ---------------------------------------------------------------------------------------------
# Build


def locate_source(cache):
    """Fetches rdkafka-sys through cargo (a throwaway project in the cache folder) and returns
    the path of its bundled librdkafka source tree."""
    proj = os.path.join(cache, "fetch")
    os.makedirs(os.path.join(proj, "src"), exist_ok=True)
    with open(os.path.join(proj, "Cargo.toml"), "w") as f:
        f.write(
            "[package]\nname = \"librdkafka-suite-fetch\"\nversion = \"0.0.0\"\n"
            "edition = \"2021\"\npublish = false\n\n[workspace]\n\n[dependencies]\n"
            f"rdkafka-sys = {{ version = \"={RDKAFKA_SYS_VERSION.split('+')[0]}\", "
            "default-features = false }\n"
        )
    with open(os.path.join(proj, "src", "lib.rs"), "w") as f:
        f.write("")
    manifest = os.path.join(proj, "Cargo.toml")
    logf = os.path.join(cache, "build.log")
    # Offline first: the package is usually in cargo's cache already (Fjord's own tests build
    # the rdkafka crate, which depends on this very rdkafka-sys).
    try:
        run(["cargo", "fetch", "--offline", "--manifest-path", manifest], quiet_log=logf)
    except SetupError:
        run(["cargo", "fetch", "--manifest-path", manifest], quiet_log=logf)
    meta = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--offline", "--manifest-path", manifest],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False,
    )
    if meta.returncode != 0:
        raise SetupError("cargo metadata failed: " + meta.stderr.decode("utf-8", "replace"))
    for p in json.loads(meta.stdout)["packages"]:
        if p["name"] == "rdkafka-sys" and p["version"] == RDKAFKA_SYS_VERSION:
            src = os.path.join(os.path.dirname(p["manifest_path"]), "librdkafka")
            if not os.path.isfile(os.path.join(src, "tests", "test.c")):
                raise SetupError(f"{src} has no tests/test.c")
            return src
    raise SetupError(f"rdkafka-sys {RDKAFKA_SYS_VERSION} not found in cargo metadata")


# What the build needs: (compiler, header) pairs, each with the Debian package providing it.
BUILD_HEADERS = [
    ("cc", "zstd.h", "libzstd-dev"),
    ("cc", "lz4.h", "liblz4-dev"),
    ("cc", "zlib.h", "zlib1g-dev"),
    ("cc", "openssl/ssl.h", "libssl-dev"),
    ("cc", "sasl/sasl.h", "libsasl2-dev"),
    ("cc", "curl/curl.h", "libcurl4-openssl-dev"),
    ("c++", "rapidjson/document.h", "rapidjson-dev"),
]


def missing_deps(cache):
    """What is missing to build (or, once built, to run) the suite; empty when all is there."""
    missing = [t for t in ("cargo",) if shutil.which(t) is None]
    if os.path.exists(os.path.join(cache, "build", ".fjord-suite-built")):
        return missing
    missing += [t for t in ("cc", "c++", "make") if shutil.which(t) is None]
    for compiler, header, pkg in BUILD_HEADERS:
        if shutil.which(compiler) is None:
            continue
        lang = "c++" if compiler == "c++" else "c"
        r = subprocess.run([compiler, "-x", lang, "-E", "-o", os.devnull, "-"],
                           input=f"#include <{header}>\n".encode(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if r.returncode != 0:
            missing.append(f"{header} ({pkg})")
    return missing


def build(cache):
    """Builds librdkafka, tests/test-runner and examples/rdkafka_performance once into
    cache/build; returns that directory. Concurrent runs wait for one build."""
    import fcntl
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return build_locked(cache)


def build_locked(cache):
    tree = os.path.join(cache, "build")
    stamp = os.path.join(tree, ".fjord-suite-built")
    if os.path.exists(stamp):
        return tree
    os.makedirs(cache, exist_ok=True)
    logf = os.path.join(cache, "build.log")
    open(logf, "w").close()
    src = locate_source(cache)
    log(f"building librdkafka {LIBRDKAFKA_VERSION} from {src} into {tree} (log: {logf})")
    # Build in a copy: the cargo registry's source tree is shared and must stay pristine.
    if os.path.exists(tree):
        shutil.rmtree(tree)
    shutil.copytree(src, tree, symlinks=True)
    jobs = str(os.cpu_count() or 1)
    env = dict(os.environ)
    # No downloads of mklove modules or dependencies: use what the system has.
    run(["./configure", "--no-download", "--disable-debug-symbols"], cwd=tree, env=env,
        quiet_log=logf)
    run(["make", "-j", jobs, "libs"], cwd=tree, env=env, quiet_log=logf)
    run(["make", "-j", jobs, "test-runner"], cwd=os.path.join(tree, "tests"), env=env,
        quiet_log=logf)
    run(["make", "rdkafka_performance"], cwd=os.path.join(tree, "examples"), env=env,
        quiet_log=logf)
    for exe in ("tests/test-runner", "examples/rdkafka_performance"):
        if not os.access(os.path.join(tree, exe), os.X_OK):
            raise SetupError(f"build finished but {exe} is missing (see {logf})")
    open(stamp, "w").close()
    return tree


# ---------------------------------------------------------------------------------------------
# The test list


def parse_tests(tree):
    """Reads the runner's test table (tests/test.c): [(name, number, text of its entry)]."""
    with open(os.path.join(tree, "tests", "test.c")) as f:
        text = f.read()
    start = text.index("struct test tests[] = {")
    end = text.index("\n};", start)
    body = text[start:end]
    out = []
    parts = re.split(r"(?=_TEST\()", body)
    for part in parts:
        m = re.match(r"_TEST\((\d{4})_(\w+)", part)
        if m:
            # Cut preprocessor lines (#if WITH_SOCKEM ...) out of the entry's text.
            entry = "\n".join(l for l in part.splitlines() if not l.strip().startswith("#"))
            out.append((f"{m.group(1)}_{m.group(2)}", m.group(1), entry))
    return out


def static_skip_reason(entry):
    """Why the runner itself would not run this test in `-L` mode, default scenario; None if
    it runs."""
    m = re.search(r"_TEST\(\w+,\s*([^,)]*)", entry)
    flags = m.group(1) if m else ""
    if "TEST_F_LOCAL" in flags:
        return "broker-less client test (runner option -L: broker tests only)"
    if re.search(r"TEST_F_KNOWN_ISSUE\b", flags):
        return "librdkafka marks it a known issue of its own (the runner skips those)"
    if "TEST_F_MANUAL" in flags:
        return "manual test (needs a human or a special setup)"
    sc = re.search(r'\.scenario\s*=\s*"([^"]*)"', entry)
    if sc and "default" not in sc.group(1).split(","):
        return f"needs the '{sc.group(1)}' scenario (the default scenario is run)"
    return None


def load_skip_list():
    """tools/librdkafka-skip.txt: `NNNN reason` lines skip a test number, `NNNN/function
    reason` lines one group of its subtests (those a function of the test's source starts);
    # comments. Returns ({number: reason}, {number: {function: reason}})."""
    skips, sub_skips = {}, {}
    with open(SKIP_FILE) as f:
        for lineno, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            m = re.match(r"(\d{4})(?:/(\w+))?\s+(.+)", line)
            if not m:
                raise SetupError(f"{SKIP_FILE}:{lineno}: expected `NNNN reason` or "
                                 "`NNNN/function reason`")
            if m.group(2):
                sub_skips.setdefault(m.group(1), {})[m.group(2)] = m.group(3).strip()
            else:
                skips[m.group(1)] = m.group(3).strip()
    return skips, sub_skips


def subtest_functions(tree, number):
    """The functions of test NNNN's source that start subtests (SUB_TEST...), in source order:
    the runner's SUBTESTS filter selects a subtest by `function:` prefix."""
    found = []
    for fn in sorted(os.listdir(os.path.join(tree, "tests"))):
        if not (fn.startswith(number + "-") and fn.endswith((".c", ".cpp"))):
            continue
        current = None
        with open(os.path.join(tree, "tests", fn)) as f:
            for line in f:
                m = re.match(r"^(?:static\s+)?(?:[\w\*]+\s+)*\**(\w+)\s*\([^;]*$", line)
                if m and not line[0].isspace() and m.group(1) not in ("if", "while", "for"):
                    current = m.group(1)
                if "SUB_TEST" in line and current and current not in found:
                    found.append(current)
    return found


# ---------------------------------------------------------------------------------------------
# The broker


class Fjord:
    """A fresh Fjord: temp data dir, free loopback port, the suite's scenario settings."""

    def __init__(self, binary, workdir):
        self.binary = binary
        self.workdir = workdir
        self.proc = None
        self.port = None
        self.logpath = os.path.join(workdir, "fjord.log")
        # A cluster node's flags, and the port it must take (its peers know it already).
        self.extra = []
        self.fixed_port = None

    def tuning(self, port, data_dir):
        # A tuning file names only what differs from the embedded default.
        # group.initial.rebalance.delay.ms stays at Kafka's default (3 s), as in the clusters
        # the suite is written for: several tests start their consumers together and expect
        # them to get their first assignment in one generation.
        # A small per-shard cache: the machine is shared with the test runner.
        t = "\n".join([
            "[node]",
            f'listen = "127.0.0.1:{port}"',
            f"data_dir = {json.dumps(data_dir)}",
            "[log]",
            f"num_partitions = {NUM_PARTITIONS}",
            "auto_create_topics = true",
            "[memory]",
            f"batch_cache_bytes_per_shard = {128 * 1024 * 1024}",
            "",
        ])
        path = os.path.join(self.workdir, "fjord.toml")
        with open(path, "w") as f:
            f.write(t)
        return path

    def start(self):
        last = ""
        for _attempt in range(5):
            data_dir = tempfile.mkdtemp(prefix="data-", dir=self.workdir)
            # The port is picked by the OS; another process may take it before Fjord binds
            # it, in which case Fjord refuses to start and we try another one.
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if self.fixed_port is not None:
                port = self.fixed_port
            cfg = self.tuning(port, data_dir)
            logf = open(self.logpath, "ab")
            self.proc = subprocess.Popen(
                [self.binary, "serve", "--config", cfg] + self.extra,
                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
            )
            logf.close()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                        self.port = port
                        return
                except OSError:
                    time.sleep(0.05)
            last = self.log_tail()
            self.stop()
        raise SetupError(f"fjord did not start; its log:\n{last}")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        """SIGTERM, then SIGKILL after 20 s; returns the exit code (None if it had to be
        killed)."""
        if self.proc is None:
            return None
        code = self.proc.poll()
        if code is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                code = None
        self.proc = None
        return code

    def log_tail(self, n=4000):
        try:
            with open(self.logpath, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""


class FjordCluster:
    """Three Fjord nodes forming a cluster (three controller voters on loopback), racks RACK1,
    RACK2 and RACK3 and the rack-aware replica selector: what librdkafka's multi-broker tests
    (0101 fetch from follower, replication factor 3) expect."""

    def __init__(self, binary, workdir):
        self.nodes = []
        self.binary = binary
        self.workdir = workdir
        self.port = None
        self.bootstrap = None
        self.logpath = os.path.join(workdir, "fjord-cluster.log")

    def start(self):
        ports = []
        for _ in range(6):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        voters = ",".join(f"{i + 1}@127.0.0.1:{ports[3 + i]}" for i in range(3))
        for i in range(3):
            node = Fjord(self.binary, os.path.join(self.workdir, f"node{i + 1}"))
            os.makedirs(node.workdir, exist_ok=True)
            node.extra = [
                "--node-id", str(i + 1), "--controllers", voters, "--rack", f"RACK{i + 1}",
                "--cpus", "0", "--overprovisioned", "--set", "node.replica_selector=rack",
            ]
            node.fixed_port = ports[i]
            node.start()
            self.nodes.append(node)
        self.port = self.nodes[0].port
        self.bootstrap = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        # Ready for topics of replication factor 3 once every node is registered.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = subprocess.run(
                [self.binary, "cluster", "status", "--bootstrap", f"127.0.0.1:{self.port}"],
                capture_output=True, text=True)
            if out.stdout.count("unfenced") >= 3:
                return
            time.sleep(0.2)
        raise SetupError("the three-node cluster did not form; node 1's log:\n"
                         + self.nodes[0].log_tail())

    def alive(self):
        return all(n.alive() for n in self.nodes)

    def stop(self):
        codes = [n.stop() for n in self.nodes]
        if any(c is None for c in codes):
            return None
        bad = [c for c in codes if c not in (0, -signal.SIGTERM)]
        return bad[0] if bad else 0

    def log_tail(self, n=4000):
        return "\n".join(f"--- node {i + 1}\n" + node.log_tail(n // 3)
                         for i, node in enumerate(self.nodes))


# ---------------------------------------------------------------------------------------------
# Running chunks

ANSI = re.compile(r"\x1b\[[0-9;]*m")
SUMMARY = re.compile(r"^\|\s*(\d{4}_\w+)\s*\|\s*(\w+)\s*\|\s*[\d.]+s\s*\|\s?(.*)$")
RUNNING = re.compile(r"=+ Running test (\d{4}_\w+) =+")
RESULT = re.compile(r"=+ Test (\d{4}_\w+) (PASSED|FAILED|SKIPPED) =+")
FAILED_AT = re.compile(r'^### Test "(\d{4}_\w+)[^"]*" failed at ([^ ]+?)\(\) at .*###$')
# A skip reason may run into the next log line when the test gave it without a newline.
SKIPPING = re.compile(r"^\[(\d{4}_\w+)\s+/\s*[\d.]+s\] .*SKIPPING TEST: (.*?)(?:\[\d{4}_\w+\s+/.*)?$")


def parse_output(text):
    """The runner's per-test outcome from its output: {name: (state, reason)} for the tests
    that finished (PASSED, FAILED, SKIPPED), and the names of those that started.

    A failing test ends its thread where it fails (no "Test X FAILED" line), and the runner
    then usually aborts at exit because that test's client threads are still alive, before
    printing its summary: so failures are read from the `### Test "X" failed at` lines."""
    results, started = {}, []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = RUNNING.search(line)
        if m:
            started.append(m.group(1))
            continue
        m = FAILED_AT.match(line)
        if m:
            name = m.group(1)
            msg = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if name not in results or results[name][0] != "FAILED":
                results[name] = ("FAILED", f"{m.group(2)}: {msg}")
            continue
        m = SKIPPING.match(line)
        if m:
            results.setdefault(m.group(1), ("SKIPPED", m.group(2).strip()))
            continue
        m = RESULT.search(line)
        if m:
            name, state = m.group(1), m.group(2)
            prev = results.get(name)
            if prev is None or (state == "FAILED" and prev[0] != "FAILED"):
                results[name] = (state, "")
            continue
        m = SUMMARY.match(line.strip())
        if m:
            name, state, reason = m.group(1), m.group(2), m.group(3).strip()
            prev = results.get(name)
            if prev is None or (not prev[1] and reason):
                results[name] = (state if prev is None else prev[0], reason)
    return results, started


# Some tests create their topics with Kafka's bin/kafka-topics.sh (found through KAFKA_PATH).
# This stand-in does the same through Fjord's own admin CLI (CreateTopics/DeleteTopics over the
# wire), so those tests run; anything else it is asked for fails loudly.
KAFKA_TOPICS_SH = r"""#!/bin/sh
# Stand-in for Kafka's bin/kafka-topics.sh, written by tools/librdkafka-suite.py.
fjord=%(fjord)s
op= bootstrap= topic= partitions=1 rf=1
set -- "$@"
configs=
while [ $# -gt 0 ]; do
  case "$1" in
    --bootstrap-server) bootstrap=$2; shift 2 ;;
    --create|--delete) op=$1; shift ;;
    --topic) topic=$2; shift 2 ;;
    --partitions) partitions=$2; shift 2 ;;
    --replication-factor) rf=$2; shift 2 ;;
    --config) configs="$configs --config $2"; shift 2 ;;
    *) echo "kafka-topics.sh stand-in: unsupported argument $1" >&2; exit 1 ;;
  esac
done
[ "$rf" -le %(brokers)s ] || { echo "kafka-topics.sh stand-in: replication factor $rf on %(brokers)s broker(s)" >&2; exit 1; }
case "$op" in
  --create) exec "$fjord" topics --bootstrap "$bootstrap" create "$topic" --partitions "$partitions" --replication-factor "$rf" $configs ;;
  --delete) exec "$fjord" topics --bootstrap "$bootstrap" delete "$topic" ;;
  *) echo "kafka-topics.sh stand-in: no --create or --delete" >&2; exit 1 ;;
esac
"""


def write_kafka_path(chunk_dir, fjord_bin, brokers=1):
    """A KAFKA_PATH holding the kafka-topics.sh stand-in."""
    kpath = os.path.join(chunk_dir, "kafka")
    os.makedirs(os.path.join(kpath, "bin"))
    script = os.path.join(kpath, "bin", "kafka-topics.sh")
    with open(script, "w") as f:
        f.write(KAFKA_TOPICS_SH % {"fjord": shlex.quote(os.path.abspath(fjord_bin)),
                                   "brokers": brokers})
    os.chmod(script, 0o755)
    return kpath


def run_chunk(tree, fjord_bin, numbers, workdir, timeout_s, verbose, kafka_version,
              subtests=None, cluster=False):
    """Runs the tests with these numbers against a fresh Fjord. Returns ({name: (state,
    reason)}, started names, runner exit code or None on timeout, broker problem or None,
    runner output path, broker log path)."""
    chunk_dir = tempfile.mkdtemp(prefix="chunk-" + "-".join(numbers)[:40] + "-", dir=workdir)
    broker = FjordCluster(fjord_bin, chunk_dir) if cluster else Fjord(fjord_bin, chunk_dir)
    broker.start()
    try:
        return run_against(broker, tree, fjord_bin, numbers, chunk_dir, timeout_s, verbose,
                           kafka_version, subtests)
    finally:
        # Also on an exception or Ctrl-C: no broker outlives its chunk.
        broker.stop()


def run_against(broker, tree, fjord_bin, numbers, chunk_dir, timeout_s, verbose, kafka_version,
                subtests):
    conf = os.path.join(chunk_dir, "test.conf")
    with open(conf, "w") as f:
        f.write(f"bootstrap.servers={getattr(broker, 'bootstrap', None) or f'127.0.0.1:{broker.port}'}\n")
        # The suite's default timeouts assume a dedicated machine; this one is shared.
        f.write("test.timeout.multiplier=2\n")
    env = dict(os.environ)
    env.update({
        "TESTS": ",".join(numbers),
        "TEST_KAFKA_VERSION": kafka_version,
        "RDKAFKA_TEST_CONF": conf,
        "TEST_MODE": "bare",
        "LD_LIBRARY_PATH": os.path.join(tree, "src") + ":" + os.path.join(tree, "src-cpp"),
        "RDKAFKA_GITVER": LIBRDKAFKA_VERSION,
        "KAFKA_PATH": write_kafka_path(chunk_dir, fjord_bin,
                                       3 if isinstance(broker, FjordCluster) else 1),
        "BROKERS": f"127.0.0.1:{broker.port}",
    })
    for k in ("TESTS_SKIP", "TESTS_SKIP_BEFORE", "SUBTESTS", "TEST_SCENARIO", "TEST_LEVEL"):
        env.pop(k, None)
    if subtests:
        env["SUBTESTS"] = subtests
    tests_dir = os.path.join(tree, "tests")
    before = set(os.listdir(tests_dir))
    out_path = os.path.join(chunk_dir, "test-runner.log")
    with open(out_path, "wb") as out:
        # -L: broker tests only; -Q: quick mode; -p1: one test at a time (2-core machine).
        proc = subprocess.Popen(
            ["./test-runner", "-L", "-Q", "-p1"],
            cwd=tests_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            # Timed out, or interrupted: the runner and anything it started go.
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    # The runner leaves stats_*.json files in its directory: keep the cached tree clean.
    for f in set(os.listdir(tests_dir)) - before:
        if f.startswith("stats_") and f.endswith(".json"):
            os.unlink(os.path.join(tests_dir, f))
    broker_problem = None
    if not broker.alive():
        broker_problem = "fjord exited during the chunk: " + broker.log_tail(600).strip()
    if broker_problem is None:
        stop_code = broker.stop()
        if stop_code is None:
            broker_problem = "fjord did not stop within 20 s of SIGTERM"
        elif stop_code not in (0, -signal.SIGTERM):
            broker_problem = f"fjord exited with {stop_code} on SIGTERM"
    with open(out_path, "rb") as f:
        text = ANSI.sub("", f.read().decode("utf-8", "replace"))
    if verbose:
        sys.stderr.write(text)
    results, started = parse_output(text)
    return results, started, code, broker_problem, out_path, broker.logpath


def tail_failure(out_path):
    """The last failure line of a runner output, for a note."""
    with open(out_path, "rb") as f:
        text = ANSI.sub("", f.read().decode("utf-8", "replace"))
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("### Test") and i + 1 < len(lines):
            return lines[i + 1]
    return lines[-1] if lines else ""


def record(rows, name, results, crash, code, problem, out_path):
    """Turns the runner's outcome for one test into a table row."""
    if name in results:
        state, reason = results[name]
        if state == "PASSED":
            rows[name] = ("passed", "")
        elif state == "SKIPPED":
            rows[name] = ("skipped", "runner: " + (reason or "skipped"))
        else:
            rows[name] = ("failed", reason or state)
    elif crash:
        why = "timed out" if code is None else f"test-runner died (exit {code}) in this test"
        rows[name] = ("failed", f"{why} (log: {out_path})")
    else:
        rows[name] = ("skipped", "runner: not run (filtered by the runner)")
    if rows[name][0] == "failed" and problem and problem not in rows[name][1]:
        rows[name] = ("failed", rows[name][1] + f" [{problem}]")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the CI subset (a few minutes)")
    ap.add_argument("--tests", help="comma-separated test numbers (default: all)")
    ap.add_argument("--fjord", default=os.path.join(REPO, "target", "release", "fjord"),
                    help="the fjord binary (default: target/release/fjord)")
    ap.add_argument("--cache", default=os.environ.get(
        "FJORD_LIBRDKAFKA_CACHE",
        os.path.join(os.path.expanduser("~"), ".cache", "fjord", f"librdkafka-{LIBRDKAFKA_VERSION}")),
        help="where librdkafka is built (env FJORD_LIBRDKAFKA_CACHE)")
    ap.add_argument("--chunk", type=int, default=4, help="test numbers per broker start")
    ap.add_argument("--chunk-timeout", type=int, default=900, help="seconds per chunk")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--check-deps", action="store_true",
                    help="exit 0 if the suite can be built and run here, else 3 naming what is missing")
    ap.add_argument("--group-protocol", choices=["classic", "consumer"], default="classic",
                    help="consumer group protocol the tests use (consumer: KIP-848)")
    ap.add_argument("--keep-logs", help="copy every chunk's logs into this directory")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the runner's output")
    ap.add_argument("--cluster", action="store_true",
                    help="run against a three-node Fjord cluster (racks RACK1-3, rack-aware "
                         "replica selector) instead of one node; tests skipped only because "
                         "they need three brokers then run")
    args = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C, so that every started broker and runner is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # The runner reads it from the environment (test_consumer_group_protocol_classic()).
    os.environ["TEST_CONSUMER_GROUP_PROTOCOL"] = args.group_protocol

    missing = missing_deps(os.path.abspath(args.cache))
    if args.check_deps or missing:
        if missing:
            log("librdkafka suite: missing build dependencies: " + ", ".join(missing))
            return 3
        return 0
    try:
        tree = build(os.path.abspath(args.cache))
    except SetupError as e:
        log(f"librdkafka suite: setup failed: {e}")
        return 2
    if args.build_only:
        log(f"built: {tree}/tests/test-runner")
        return 0
    if not os.access(args.fjord, os.X_OK):
        log(f"librdkafka suite: no fjord binary at {args.fjord} (cargo build --release, or "
            "--fjord PATH)")
        return 2

    try:
        skips, sub_skips = load_skip_list()
    except (SetupError, OSError) as e:
        log(f"librdkafka suite: {e}")
        return 2
    tests = parse_tests(tree)
    numbers = sorted({n for _, n, _ in tests})
    if args.quick:
        wanted = QUICK_TESTS
    elif args.tests:
        wanted = [t.strip()[:4] for t in args.tests.split(",") if t.strip()]
    else:
        wanted = numbers
    unknown = [w for w in wanted if w not in numbers]
    if unknown:
        log(f"librdkafka suite: unknown test numbers: {', '.join(unknown)}")
        return 2

    rows = {}  # name -> (result, reason)
    notes = []
    to_run = []
    split_runs = []  # (number, function): a test run one group of subtests at a time
    for number in wanted:
        entries = [(name, e) for name, n, e in tests if n == number]
        if number in skips and not (args.cluster and "3 brokers" in skips[number]):
            for name, _ in entries:
                rows[name] = ("skipped", skips[number])
            continue
        runnable = False
        for name, e in entries:
            why = static_skip_reason(e)
            if why:
                rows[name] = ("skipped", why)
            else:
                runnable = True
        if runnable and number in sub_skips:
            functions = subtest_functions(tree, number)
            unknown_fns = [f for f in sub_skips[number] if f not in functions]
            if unknown_fns:
                log(f"librdkafka suite: {SKIP_FILE}: {number} has no subtests in "
                    f"{', '.join(unknown_fns)}")
                return 2
            for name, e in entries:
                if name in rows:
                    continue
                for fn in functions:
                    if fn in sub_skips[number]:
                        rows[f"{name}/{fn}"] = ("skipped", sub_skips[number][fn])
            split_runs += [(number, fn) for fn in functions if fn not in sub_skips[number]]
        elif runnable:
            to_run.append(number)

    workdir = tempfile.mkdtemp(prefix="librdkafka-suite-")
    common_set = [n for n in to_run if n not in KAFKA_VERSION_FOR]
    chunks = [common_set[i:i + args.chunk] for i in range(0, len(common_set), args.chunk)]
    chunks += [[n] for n in to_run if n in KAFKA_VERSION_FOR]
    started = time.monotonic()
    try:
        pending = list(chunks)
        while pending:
            chunk = pending.pop(0)
            log(f"[{time.monotonic() - started:6.0f}s] running {','.join(chunk)}")
            try:
                results, started_names, code, problem, out_path, broker_log = run_chunk(
                    tree, args.fjord, chunk, workdir, args.chunk_timeout, args.verbose,
                    KAFKA_VERSION_FOR.get(chunk[0], KAFKA_VERSION), cluster=args.cluster)
            except SetupError as e:
                log(f"librdkafka suite: {e}")
                return 2
            if args.keep_logs:
                os.makedirs(args.keep_logs, exist_ok=True)
                for p in (out_path, broker_log):
                    shutil.copy(p, os.path.join(
                        args.keep_logs, f"{'-'.join(chunk)}-{os.path.basename(p)}"))
            # Tests the runner started but never finished: it crashed or timed out there, and
            # the tests after it in the chunk did not run at all.
            unfinished = [n for n in started_names if n not in results]
            if unfinished and len(chunk) > 1:
                redo = [n for n in chunk if not any(
                    name in results for name, num, _ in tests if num == n)]
                log(f"  chunk {','.join(chunk)} broke off in {unfinished[0]}; "
                    f"running {','.join(redo)} one by one")
                for name, num, _ in tests:
                    if num in chunk and num not in redo and name not in rows:
                        record(rows, name, results, None, None, None, out_path)
                pending = [[n] for n in redo] + pending
                continue
            for name, num, _ in tests:
                if num in chunk and name not in rows:
                    crashed = name in unfinished
                    record(rows, name, results, crashed and (code, problem) or None,
                           code, problem, out_path)
            for name in sorted(rows):
                if name[:4] in chunk:
                    res, reason = rows[name]
                    log(f"  {name}: {res} {reason[:200]}")
            if problem:
                notes.append(f"chunk {','.join(chunk)}: {problem}")
            if code not in (0, None) and not any(
                    rows.get(name, ("",))[0] == "failed" for name, num, _ in tests if num in chunk):
                notes.append(f"chunk {','.join(chunk)}: test-runner exited {code} with no test "
                             f"failed (see {out_path}): " + tail_failure(out_path))
        for number, fn in split_runs:
            log(f"[{time.monotonic() - started:6.0f}s] running {number} subtests {fn}")
            try:
                results, started_names, code, problem, out_path, broker_log = run_chunk(
                    tree, args.fjord, [number], workdir, args.chunk_timeout, args.verbose,
                    KAFKA_VERSION_FOR.get(number, KAFKA_VERSION), subtests=fn + ":",
                    cluster=args.cluster)
            except SetupError as e:
                log(f"librdkafka suite: {e}")
                return 2
            if args.keep_logs:
                os.makedirs(args.keep_logs, exist_ok=True)
                for p in (out_path, broker_log):
                    shutil.copy(p, os.path.join(
                        args.keep_logs, f"{number}-{fn}-{os.path.basename(p)}"))
            with open(out_path, "rb") as f:
                text = ANSI.sub("", f.read().decode("utf-8", "replace"))
            ran = len(re.findall(r"\[ " + re.escape(fn) + r":\d+.*: PASS \(", text))
            for name, num, e in tests:
                if num != number or name in rows:
                    continue
                sub = {}
                record(sub, name, results, name in started_names and name not in results
                       and (code, problem) or None, code, problem, out_path)
                res, reason = sub[name]
                if res == "passed" and ran == 0:
                    res, reason = "skipped", "runner: no subtest of this group runs in quick mode"
                elif res == "passed":
                    reason = f"{ran} subtest(s)"
                rows[f"{name}/{fn}"] = (res, reason)
                log(f"  {name}/{fn}: {res} {reason[:200]}")
        chunks += [[f"{n}/{fn}"] for n, fn in split_runs]
    finally:
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)

    passed = sum(1 for r, _ in rows.values() if r == "passed")
    failed = sum(1 for r, _ in rows.values() if r == "failed")
    skipped = sum(1 for r, _ in rows.values() if r == "skipped")
    print("| test | result | reason |")
    print("| --- | --- | --- |")
    for name in sorted(rows):
        res, reason = rows[name]
        reason = reason.replace("|", "/").replace("\n", " ")
        if len(reason) > 300:
            reason = reason[:300] + "..."
        print(f"| {name} | {res} | {reason} |")
    for n in notes:
        print(f"note: {n}")
    print(f"(ran in {time.monotonic() - started:.0f} s, librdkafka {LIBRDKAFKA_VERSION}, "
          f"TEST_KAFKA_VERSION={KAFKA_VERSION} (" + ", ".join(
              f"{n}: {v}" for n, v in sorted(KAFKA_VERSION_FOR.items())) +
          f"), group protocol {args.group_protocol}, {len(chunks)} chunks)")
    print(f"librdkafka suite: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

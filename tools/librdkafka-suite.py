#!/usr/bin/env python3
"""Run librdkafka's own regression suite against a fresh, single-node Fjord.

librdkafka's tests come with the crates.io package rdkafka-sys 4.10.0+2.12.1 (librdkafka 2.12.1).
This script fetches that package through cargo, builds librdkafka, its test runner and
examples/rdkafka_performance once into a cache folder, then runs the chosen tests in small
chunks, each against a freshly started Fjord (so one crashing test, client or broker, costs only
its chunk), and prints a table (test, result, reason) and one closing line:

    librdkafka suite: N passed, N failed, N skipped

Exit code: 0 when nothing failed, 1 when a test failed, 2 on a setup error (build, broker start).

Every test that is not run is named with its reason: tools/librdkafka-skip.txt (next to this
script) lists the ones skipped on purpose; broker-less (local) tests, tests for another scenario
and manual tests are skipped as the runner's `-L` mode and default scenario do, and are listed
with that reason.

Usage:
    tools/librdkafka-suite.py [--quick] [--tests 0001,0002,...] [--fjord PATH] [--cache DIR]
                              [--chunk N] [--build-only] [--keep-logs DIR]

Build dependencies (Debian): build-essential python3 libzstd-dev libsasl2-dev libcurl4-openssl-dev
liblz4-dev rapidjson-dev libssl-dev zlib1g-dev.
"""

import argparse
import json
import os
import re
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
    "0001", "0002", "0005", "0007", "0011", "0012", "0013", "0014", "0015", "0017", "0019",
    "0021", "0030", "0031", "0036", "0040", "0047", "0052", "0053", "0054", "0063", "0065",
    "0073", "0082", "0083", "0092", "0099",
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
            f"rdkafka-sys = {{ version = \"={RDKAFKA_SYS_VERSION}\", default-features = false }}\n"
        )
    with open(os.path.join(proj, "src", "lib.rs"), "w") as f:
        f.write("")
    manifest = os.path.join(proj, "Cargo.toml")
    logf = os.path.join(cache, "build.log")
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


def build(cache):
    """Builds librdkafka, tests/test-runner and examples/rdkafka_performance once into
    cache/build; returns that directory."""
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
    if "TEST_F_MANUAL" in flags:
        return "manual test (needs a human or a special setup)"
    sc = re.search(r'\.scenario\s*=\s*"([^"]*)"', entry)
    if sc and "default" not in sc.group(1).split(","):
        return f"needs the '{sc.group(1)}' scenario (the default scenario is run)"
    return None


def load_skip_list():
    """tools/librdkafka-skip.txt: `NNNN reason` lines; # comments."""
    skips = {}
    with open(SKIP_FILE) as f:
        for lineno, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            m = re.match(r"(\d{4})\s+(.+)", line)
            if not m:
                raise SetupError(f"{SKIP_FILE}:{lineno}: expected `NNNN reason`")
            skips[m.group(1)] = m.group(2).strip()
    return skips


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

    def tuning(self, port, data_dir):
        with open(os.path.join(REPO, "tuning", "default.toml")) as f:
            t = f.read()

        def setkey(text, key, value):
            new, n = re.subn(rf"(?m)^{key}\s*=.*$", f"{key} = {value}", text)
            if n != 1:
                raise SetupError(f"tuning/default.toml: key {key} not found once")
            return new

        t = setkey(t, "listen", f'"127.0.0.1:{port}"')
        t = setkey(t, "data_dir", json.dumps(data_dir))
        t = setkey(t, "num_partitions", str(NUM_PARTITIONS))
        t = setkey(t, "auto_create_topics", "true")
        # Each test is short-lived and makes its own groups: Kafka's test clusters (trivup)
        # do not wait 3 s for more members either.
        t = setkey(t, "initial_rebalance_delay_ms", "0")
        # A small per-shard cache: the machine is shared with the test runner.
        t = setkey(t, "batch_cache_bytes_per_shard", str(128 * 1024 * 1024))
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
            cfg = self.tuning(port, data_dir)
            logf = open(self.logpath, "ab")
            self.proc = subprocess.Popen(
                [self.binary, "serve", "--config", cfg],
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


# ---------------------------------------------------------------------------------------------
# Running chunks

ANSI = re.compile(r"\x1b\[[0-9;]*m")
SUMMARY = re.compile(r"^\|\s*(\d{4}_\w+)\s*\|\s*(\w+)\s*\|\s*[\d.]+s\s*\|\s?(.*)$")


def run_chunk(tree, fjord_bin, numbers, workdir, timeout_s, verbose):
    """Runs the tests with these numbers against a fresh Fjord. Returns ({name: (state,
    reason)}, runner exit code or None on timeout, broker problem or None, output path)."""
    chunk_dir = tempfile.mkdtemp(prefix="chunk-" + "-".join(numbers)[:40] + "-", dir=workdir)
    broker = Fjord(fjord_bin, chunk_dir)
    broker.start()
    conf = os.path.join(chunk_dir, "test.conf")
    with open(conf, "w") as f:
        f.write(f"bootstrap.servers=127.0.0.1:{broker.port}\n")
        # The suite's default timeouts assume a dedicated machine; this one is shared.
        f.write("test.timeout.multiplier=2\n")
    env = dict(os.environ)
    env.update({
        "TESTS": ",".join(numbers),
        "TEST_KAFKA_VERSION": KAFKA_VERSION,
        "RDKAFKA_TEST_CONF": conf,
        "TEST_MODE": "bare",
        "LD_LIBRARY_PATH": os.path.join(tree, "src") + ":" + os.path.join(tree, "src-cpp"),
        "RDKAFKA_GITVER": LIBRDKAFKA_VERSION,
    })
    env.pop("TESTS_SKIP", None)
    out_path = os.path.join(chunk_dir, "test-runner.log")
    with open(out_path, "wb") as out:
        # -L: broker tests only; -Q: quick mode; -p1: one test at a time (2-core machine).
        proc = subprocess.Popen(
            ["./test-runner", "-L", "-Q", "-p1"],
            cwd=os.path.join(tree, "tests"), env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    broker_problem = None
    if not broker.alive():
        broker_problem = "fjord exited during the chunk: " + broker.log_tail(600).strip()
    stop_code = broker.stop()
    if broker_problem is None and stop_code not in (0, None, -signal.SIGTERM):
        broker_problem = f"fjord exited with {stop_code} on SIGTERM"
    with open(out_path, "rb") as f:
        text = ANSI.sub("", f.read().decode("utf-8", "replace"))
    if verbose:
        sys.stderr.write(text)
    results = {}
    for line in text.splitlines():
        m = SUMMARY.match(line.strip())
        if m:
            results[m.group(1)] = (m.group(2), m.group(3).strip())
    if not results or code is None:
        # No summary: say why with the last failure lines of the output.
        fails = [l for l in text.splitlines() if "FAIL" in l or "assert" in l.lower()]
        broker_problem = broker_problem or (fails[-1] if fails else None)
    return results, code, broker_problem, out_path, broker.logpath


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
    ap.add_argument("--keep-logs", help="copy every chunk's logs into this directory")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the runner's output")
    args = ap.parse_args()

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
        skips = load_skip_list()
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
    to_run = []
    for number in wanted:
        entries = [(name, e) for name, n, e in tests if n == number]
        if number in skips:
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
        if runnable:
            to_run.append(number)

    workdir = tempfile.mkdtemp(prefix="librdkafka-suite-")
    chunks = [to_run[i:i + args.chunk] for i in range(0, len(to_run), args.chunk)]
    started = time.monotonic()
    try:
        pending = list(chunks)
        while pending:
            chunk = pending.pop(0)
            log(f"[{time.monotonic() - started:6.0f}s] running {','.join(chunk)}")
            try:
                results, code, problem, out_path, broker_log = run_chunk(
                    tree, args.fjord, chunk, workdir, args.chunk_timeout, args.verbose)
            except SetupError as e:
                log(f"librdkafka suite: {e}")
                return 2
            if args.keep_logs:
                os.makedirs(args.keep_logs, exist_ok=True)
                for p in (out_path, broker_log):
                    shutil.copy(p, os.path.join(args.keep_logs, f"{'-'.join(chunk)}-{os.path.basename(p)}"))
            crashed = code is None or (not results)
            if crashed and len(chunk) > 1:
                # One test took the chunk down: run each of its tests on its own to find it.
                log(f"  chunk {','.join(chunk)} did not finish ({problem}); splitting it")
                pending = [[n] for n in chunk] + pending
                continue
            for name, e in [(name, e) for name, n, e in tests if n in chunk]:
                if name in rows:
                    continue
                if name in results:
                    state, reason = results[name]
                    if state == "PASSED":
                        rows[name] = ("passed", "")
                    elif state == "SKIPPED":
                        rows[name] = ("skipped", "runner: " + reason)
                    else:
                        rows[name] = ("failed", reason or state)
                elif crashed:
                    why = "timed out" if code is None else f"test-runner exited {code} without a summary"
                    rows[name] = ("failed", f"{why}; {problem or ''} (log: {out_path})")
                else:
                    rows[name] = ("skipped", "runner: not run (filtered by the runner)")
                if rows[name][0] == "failed" and problem and problem not in rows[name][1]:
                    rows[name] = ("failed", rows[name][1] + f" [{problem}]")
            for name, (res, reason) in sorted(rows.items()):
                if name[:4] in chunk:
                    log(f"  {name}: {res} {reason[:200]}")
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
    print(f"(ran in {time.monotonic() - started:.0f} s, librdkafka {LIBRDKAFKA_VERSION}, "
          f"TEST_KAFKA_VERSION={KAFKA_VERSION}, {len(chunks)} chunks)")
    print(f"librdkafka suite: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

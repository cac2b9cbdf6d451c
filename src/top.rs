//! `fjord top`: a live terminal view of a running broker, over its Prometheus endpoint.
//! Every second it scrapes `/metrics`, turns counters into rates over the last interval and
//! draws one row per shard (or per hot partition, group, API) with ratatui. Reads only the
//! metrics endpoint: it works wherever that is reachable, over ssh included.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};

#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// The broker's metrics endpoint (its --metrics-listen address).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,
    /// The broker's Kafka address: its metrics endpoint is asked for through DescribeConfigs
    /// (broker config `metrics.listen`) when --metrics is not given.
    #[arg(long, value_name = "HOST:PORT")]
    pub bootstrap: Option<String>,
    /// Refresh interval.
    #[arg(long, default_value_t = 1000, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub interval_ms: u64,
}

/// One scrape: (name, labels) → value. Labels are kept sorted so series compare equal.
#[derive(Default, Clone)]
pub struct Scrape {
    pub samples: Vec<(String, BTreeMap<String, String>, f64)>,
    pub at: Option<Instant>,
}

/// Parses the Prometheus text format as Fjord writes it (no escaped quotes in label values).
pub fn parse(text: &str) -> Scrape {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split("\",")
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim_matches('"').to_string()))
            .collect();
        samples.push((name.to_string(), labels, value));
    }
    Scrape {
        samples,
        at: Some(Instant::now()),
    }
}

impl Scrape {
    /// Sum of `name` over series whose labels include `want`.
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    fn label_values(&self, name: &str, label: &str) -> BTreeSet<String> {
        self.samples
            .iter()
            .filter(|(n, _, _)| n == name)
            .filter_map(|(_, l, _)| l.get(label).cloned())
            .collect()
    }

    /// Cumulative bucket counts (le → count) of histogram `name`, summed over matching series.
    fn buckets(&self, name: &str, want: &[(&str, &str)]) -> BTreeMap<u64, f64> {
        let mut out: BTreeMap<u64, f64> = BTreeMap::new();
        let bucket = format!("{name}_bucket");
        for (n, l, v) in &self.samples {
            if *n != bucket
                || !want
                    .iter()
                    .all(|(k, x)| l.get(*k).map(String::as_str) == Some(x))
            {
                continue;
            }
            let Some(le) = l.get("le") else { continue };
            // Keyed in nanoseconds so that buckets sort as numbers; +Inf sorts last.
            let key = if le == "+Inf" {
                u64::MAX
            } else {
                le.parse::<f64>()
                    .map(|s| (s * 1e9) as u64)
                    .unwrap_or(u64::MAX)
            };
            *out.entry(key).or_default() += v;
        }
        out
    }
}

/// The `q` quantile (in seconds) of what a histogram recorded between two scrapes,
/// interpolated within its bucket as Prometheus' histogram_quantile does.
fn quantile(prev: &BTreeMap<u64, f64>, cur: &BTreeMap<u64, f64>, q: f64) -> Option<f64> {
    let delta: Vec<(u64, f64)> = cur
        .iter()
        .map(|(le, c)| (*le, c - prev.get(le).copied().unwrap_or(0.0)))
        .collect();
    let total = delta.last().map(|(_, c)| *c).unwrap_or(0.0);
    if total <= 0.0 {
        return None;
    }
    let target = q * total;
    let mut lower = (0u64, 0.0f64);
    for (le, c) in delta {
        if c >= target {
            if le == u64::MAX {
                return Some(lower.0 as f64 / 1e9);
            }
            let span = (c - lower.1).max(f64::MIN_POSITIVE);
            let frac = ((target - lower.1) / span).clamp(0.0, 1.0);
            return Some((lower.0 as f64 + frac * (le - lower.0) as f64) / 1e9);
        }
        lower = (le, c);
    }
    None
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum View {
    Shards,
    Partitions,
    Groups,
    Apis,
}

impl View {
    const ALL: [View; 4] = [View::Shards, View::Partitions, View::Groups, View::Apis];
    fn title(self) -> &'static str {
        match self {
            View::Shards => "shards",
            View::Partitions => "hot partitions",
            View::Groups => "groups",
            View::Apis => "APIs",
        }
    }
}

/// A table to draw: header, rows of cells, and each column's width.
pub struct TableData {
    pub header: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
    /// Sort keys, one per row per column (numbers sort numerically).
    keys: Vec<Vec<SortKey>>,
    widths: Vec<u16>,
}

#[derive(Clone, PartialEq, PartialOrd)]
enum SortKey {
    Num(f64),
    Text(String),
}

fn rate(prev: &Scrape, cur: &Scrape, name: &str, want: &[(&str, &str)], secs: f64) -> f64 {
    ((cur.sum(name, want) - prev.sum(name, want)) / secs).max(0.0)
}

fn fmt_ms(s: Option<f64>) -> String {
    match s {
        Some(s) if s < 0.001 => format!("{:.3}", s * 1e3),
        Some(s) => format!("{:.1}", s * 1e3),
        None => "-".into(),
    }
}

/// APIs whose requests wait on purpose (long-poll fetches, group joins and syncs).
const WAITING_APIS: &[&str] = &["Fetch", "JoinGroup", "SyncGroup"];

fn shards_table(prev: &Scrape, cur: &Scrape, secs: f64) -> TableData {
    let mut rows = Vec::new();
    let mut keys = Vec::new();
    let mut shards: Vec<String> = cur
        .label_values("fjord_requests_total", "shard")
        .into_iter()
        .chain(cur.label_values("fjord_partitions", "shard"))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    shards.sort_by_key(|s| s.parse::<u64>().unwrap_or(u64::MAX));
    for sh in shards {
        let l = [("shard", sh.as_str())];
        let core = cur
            .samples
            .iter()
            .find(|(n, lb, _)| {
                n == "fjord_reactor_busy_seconds_total" && lb.get("shard") == Some(&sh)
            })
            .and_then(|(_, lb, _)| lb.get("core").cloned())
            .unwrap_or_default();
        let busy = rate(prev, cur, "fjord_reactor_busy_seconds_total", &l, secs) * 100.0;
        let rps = rate(prev, cur, "fjord_requests_total", &l, secs);
        let mb_in = rate(prev, cur, "fjord_produce_bytes_total", &l, secs) / 1e6;
        let mb_out = rate(prev, cur, "fjord_fetch_bytes_total", &l, secs) / 1e6;
        // Fetch and group joins wait by design (long poll, rebalance): their latency would
        // hide everything else, so the shard's p99 leaves them out (the APIs view has them).
        let (mut b0, mut b1) = (BTreeMap::new(), BTreeMap::new());
        for api in cur.label_values("fjord_requests_total", "api") {
            if WAITING_APIS.contains(&api.as_str()) {
                continue;
            }
            let la = [("shard", sh.as_str()), ("api", api.as_str())];
            for (dst, src) in [(&mut b0, prev), (&mut b1, cur)] {
                for (le, c) in src.buckets("fjord_request_latency_seconds", &la) {
                    *dst.entry(le).or_insert(0.0) += c;
                }
            }
        }
        let p99 = quantile(&b0, &b1, 0.99);
        let hits = cur.sum("fjord_batch_cache_hits_total", &l);
        let misses = cur.sum("fjord_batch_cache_misses_total", &l);
        let (dh, dm) = (
            hits - prev.sum("fjord_batch_cache_hits_total", &l),
            misses - prev.sum("fjord_batch_cache_misses_total", &l),
        );
        // The last interval's ratio when there were reads, else the ratio since start.
        let hit = if dh + dm > 0.0 {
            Some(dh / (dh + dm))
        } else if hits + misses > 0.0 {
            Some(hits / (hits + misses))
        } else {
            None
        };
        let mem = cur.sum("fjord_batch_cache_bytes", &l);
        let budget = cur.sum("fjord_batch_cache_budget_bytes", &l);
        let parts = cur.sum("fjord_partitions", &l);
        let conns = cur.sum("fjord_connections", &l);
        let queue = cur.sum("fjord_cross_shard_queue_depth", &l);
        rows.push(vec![
            sh.clone(),
            core.clone(),
            format!("{busy:.0}%"),
            format!("{rps:.0}"),
            format!("{mb_in:.2}"),
            format!("{mb_out:.2}"),
            fmt_ms(p99),
            hit.map(|h| format!("{:.0}%", h * 100.0))
                .unwrap_or_else(|| "-".into()),
            format!("{:.0}/{:.0} MiB", mem / 1048576.0, budget / 1048576.0),
            format!("{parts:.0}"),
            format!("{conns:.0}"),
            format!("{queue:.0}"),
        ]);
        keys.push(vec![
            SortKey::Num(sh.parse().unwrap_or(0.0)),
            SortKey::Num(core.parse().unwrap_or(0.0)),
            SortKey::Num(busy),
            SortKey::Num(rps),
            SortKey::Num(mb_in),
            SortKey::Num(mb_out),
            SortKey::Num(p99.unwrap_or(0.0)),
            SortKey::Num(hit.unwrap_or(0.0)),
            SortKey::Num(mem),
            SortKey::Num(parts),
            SortKey::Num(conns),
            SortKey::Num(queue),
        ]);
    }
    TableData {
        header: vec![
            "SHARD",
            "CORE",
            "BUSY",
            "REQ/S",
            "MB/S IN",
            "MB/S OUT",
            "P99 MS*",
            "CACHE HIT",
            "CACHE MEM",
            "PARTS",
            "CONNS",
            "QUEUE",
        ],
        rows,
        keys,
        widths: vec![6, 5, 6, 9, 9, 9, 9, 10, 18, 7, 6, 6],
    }
}

fn partitions_table(prev: &Scrape, cur: &Scrape, secs: f64) -> TableData {
    let mut seen = BTreeSet::new();
    for (n, l, _) in &cur.samples {
        if n == "fjord_partition_produce_bytes_total" || n == "fjord_partition_fetch_bytes_total" {
            if let (Some(t), Some(p)) = (l.get("topic"), l.get("partition")) {
                seen.insert((t.clone(), p.clone()));
            }
        }
    }
    let mut rows = Vec::new();
    let mut keys = Vec::new();
    for (t, p) in seen {
        let l = [("topic", t.as_str()), ("partition", p.as_str())];
        let inb = rate(prev, cur, "fjord_partition_produce_bytes_total", &l, secs) / 1e6;
        let outb = rate(prev, cur, "fjord_partition_fetch_bytes_total", &l, secs) / 1e6;
        let total_in = cur.sum("fjord_partition_produce_bytes_total", &l) / 1e6;
        rows.push(vec![
            t.clone(),
            p.clone(),
            format!("{inb:.2}"),
            format!("{outb:.2}"),
            format!("{total_in:.1}"),
        ]);
        keys.push(vec![
            SortKey::Text(t),
            SortKey::Num(p.parse().unwrap_or(0.0)),
            SortKey::Num(inb),
            SortKey::Num(outb),
            SortKey::Num(total_in),
        ]);
    }
    TableData {
        header: vec!["TOPIC", "PARTITION", "MB/S IN", "MB/S OUT", "MB IN TOTAL"],
        rows,
        keys,
        widths: vec![32, 10, 10, 10, 12],
    }
}

fn groups_table(prev: &Scrape, cur: &Scrape, secs: f64) -> TableData {
    let mut rows = Vec::new();
    let mut keys = Vec::new();
    for g in cur.label_values("fjord_group_lag_records", "group") {
        let l = [("group", g.as_str())];
        let lag = cur.sum("fjord_group_lag_records", &l);
        let before = prev.sum("fjord_group_lag_records", &l);
        let trend = (lag - before) / secs;
        rows.push(vec![g.clone(), format!("{lag:.0}"), format!("{trend:+.0}")]);
        keys.push(vec![
            SortKey::Text(g),
            SortKey::Num(lag),
            SortKey::Num(trend),
        ]);
    }
    // Groups by state, per shard, as a second block of rows.
    let mut states: BTreeMap<String, f64> = BTreeMap::new();
    for (n, l, v) in &cur.samples {
        if n == "fjord_groups" {
            if let Some(s) = l.get("state") {
                *states.entry(s.clone()).or_default() += v;
            }
        }
    }
    for (s, n) in states {
        rows.push(vec![
            format!("[{s}]"),
            format!("{n:.0} groups"),
            String::new(),
        ]);
        keys.push(vec![
            SortKey::Text(format!("~{s}")),
            SortKey::Num(-1.0),
            SortKey::Num(0.0),
        ]);
    }
    TableData {
        header: vec!["GROUP", "LAG (RECORDS)", "LAG CHANGE/S"],
        rows,
        keys,
        widths: vec![40, 16, 14],
    }
}

fn apis_table(prev: &Scrape, cur: &Scrape, secs: f64) -> TableData {
    let mut rows = Vec::new();
    let mut keys = Vec::new();
    for api in cur.label_values("fjord_requests_total", "api") {
        let l = [("api", api.as_str())];
        let rps = rate(prev, cur, "fjord_requests_total", &l, secs);
        let eps = rate(prev, cur, "fjord_request_errors_total", &l, secs);
        let total = cur.sum("fjord_requests_total", &l);
        let b0 = prev.buckets("fjord_request_latency_seconds", &l);
        let b1 = cur.buckets("fjord_request_latency_seconds", &l);
        let p50 = quantile(&b0, &b1, 0.5);
        let p99 = quantile(&b0, &b1, 0.99);
        rows.push(vec![
            api.clone(),
            format!("{rps:.0}"),
            fmt_ms(p50),
            fmt_ms(p99),
            format!("{eps:.0}"),
            format!("{total:.0}"),
        ]);
        keys.push(vec![
            SortKey::Text(api),
            SortKey::Num(rps),
            SortKey::Num(p50.unwrap_or(0.0)),
            SortKey::Num(p99.unwrap_or(0.0)),
            SortKey::Num(eps),
            SortKey::Num(total),
        ]);
    }
    TableData {
        header: vec!["API", "REQ/S", "P50 MS", "P99 MS", "ERRORS/S", "TOTAL"],
        rows,
        keys,
        widths: vec![26, 9, 8, 8, 9, 12],
    }
}

fn table_for(view: View, prev: &Scrape, cur: &Scrape, secs: f64) -> TableData {
    match view {
        View::Shards => shards_table(prev, cur, secs),
        View::Partitions => partitions_table(prev, cur, secs),
        View::Groups => groups_table(prev, cur, secs),
        View::Apis => apis_table(prev, cur, secs),
    }
}

fn scrape(addr: SocketAddr) -> anyhow::Result<Scrape> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("cannot reach the metrics endpoint at {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let Some((head, body)) = out.split_once("\r\n\r\n") else {
        bail!("{addr} did not answer with HTTP");
    };
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!(
            "{addr}/metrics answered {}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(parse(body))
}

/// The metrics address: --metrics, or what the broker at --bootstrap reports.
fn endpoint(a: &TopArgs) -> anyhow::Result<SocketAddr> {
    let given = match (&a.metrics, &a.bootstrap) {
        (Some(m), _) => m.clone(),
        (None, Some(b)) => crate::admin::broker_config(b, "metrics.listen")?
            .filter(|v| !v.is_empty())
            .with_context(|| {
                format!("the broker at {b} serves no metrics: start it with --metrics-listen")
            })?,
        (None, None) => "127.0.0.1:9644".to_string(),
    };
    given
        .to_socket_addrs()
        .with_context(|| format!("--metrics {given}: not a HOST:PORT"))?
        .next()
        .with_context(|| format!("--metrics {given}: no address"))
}

pub fn run(a: TopArgs) -> anyhow::Result<()> {
    let addr = endpoint(&a)?;
    // Fail in one line before taking over the terminal.
    let mut prev = scrape(addr)?;
    let mut cur = prev.clone();
    let mut terminal = ratatui::try_init().context("cannot open the terminal")?;
    let r = ui_loop(&mut terminal, addr, &a, &mut prev, &mut cur);
    ratatui::restore();
    r
}

fn ui_loop(
    terminal: &mut ratatui::DefaultTerminal,
    addr: SocketAddr,
    a: &TopArgs,
    prev: &mut Scrape,
    cur: &mut Scrape,
) -> anyhow::Result<()> {
    let interval = Duration::from_millis(a.interval_ms);
    let mut view = View::Shards;
    let mut sort_col = 0usize;
    let mut descending = false;
    let mut status = String::new();
    let mut next = Instant::now() + interval;
    loop {
        let secs = match (prev.at, cur.at) {
            (Some(p), Some(c)) if c > p => (c - p).as_secs_f64(),
            _ => 1.0,
        };
        let mut data = table_for(view, prev, cur, secs);
        let ncols = data.header.len();
        let col = sort_col.min(ncols - 1);
        let mut order: Vec<usize> = (0..data.rows.len()).collect();
        order.sort_by(|&x, &y| {
            let o = data.keys[x][col]
                .partial_cmp(&data.keys[y][col])
                .unwrap_or(std::cmp::Ordering::Equal);
            if descending {
                o.reverse()
            } else {
                o
            }
        });
        let rows: Vec<Row> = order
            .iter()
            .map(|&i| Row::new(std::mem::take(&mut data.rows[i])))
            .collect();
        let header: Vec<String> = data
            .header
            .iter()
            .enumerate()
            .map(|(i, h)| {
                if i == col {
                    format!("{h}{}", if descending { "▼" } else { "▲" })
                } else {
                    h.to_string()
                }
            })
            .collect();
        let total_rps = rate(prev, cur, "fjord_requests_total", &[], secs);
        let mb_in = rate(prev, cur, "fjord_produce_bytes_total", &[], secs) / 1e6;
        let mb_out = rate(prev, cur, "fjord_fetch_bytes_total", &[], secs) / 1e6;
        let shards = cur.label_values("fjord_partitions", "shard").len();
        let views: Vec<String> = View::ALL
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if *v == view {
                    format!("[{}:{}]", i + 1, v.title())
                } else {
                    format!(" {}:{} ", i + 1, v.title())
                }
            })
            .collect();
        let head1 = format!(
            "fjord top  {addr}  shards {shards}  {total_rps:.0} req/s  in {mb_in:.2} MB/s  out {mb_out:.2} MB/s  every {:.1}s  {status}",
            interval.as_secs_f64()
        );
        let note = if view == View::Shards {
            "  *p99 leaves out Fetch, JoinGroup, SyncGroup (they wait by design)"
        } else {
            ""
        };
        let head2 = format!("{}   s/S: sort  r: reverse  q: quit{note}", views.join(""));
        let widths: Vec<Constraint> = data.widths.iter().map(|w| Constraint::Length(*w)).collect();
        terminal.draw(|f| {
            let [top, body] =
                Layout::vertical([Constraint::Length(2), Constraint::Min(1)]).areas(f.area());
            f.render_widget(
                Paragraph::new(vec![Line::from(head1.clone()), Line::from(head2.clone())]),
                top,
            );
            let table = Table::new(rows, widths)
                .header(Row::new(header).style(Style::new().add_modifier(Modifier::REVERSED)))
                .block(Block::new());
            f.render_widget(table, body);
        })?;
        // Wait for a key until the next refresh is due.
        loop {
            let now = Instant::now();
            if now >= next {
                break;
            }
            if event::poll(next - now)? {
                if let Event::Key(k) = event::read()? {
                    if k.kind != KeyEventKind::Press {
                        continue;
                    }
                    match k.code {
                        KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                            return Ok(())
                        }
                        KeyCode::Char(c @ '1'..='4') => {
                            view = View::ALL[c as usize - '1' as usize];
                            sort_col = 0;
                        }
                        KeyCode::Tab => {
                            let i = View::ALL.iter().position(|v| *v == view).unwrap_or(0);
                            view = View::ALL[(i + 1) % View::ALL.len()];
                            sort_col = 0;
                        }
                        KeyCode::Char('s') | KeyCode::Right => {
                            sort_col = (col + 1) % ncols;
                            descending = sort_col != 0;
                        }
                        KeyCode::Char('S') | KeyCode::Left => {
                            sort_col = (col + ncols - 1) % ncols;
                            descending = sort_col != 0;
                        }
                        KeyCode::Char('r') => descending = !descending,
                        _ => {}
                    }
                    break;
                }
            }
        }
        if Instant::now() >= next {
            next = Instant::now() + interval;
            match scrape(addr) {
                Ok(s) => {
                    *prev = std::mem::replace(cur, s);
                    status.clear();
                }
                Err(e) => status = format!("(stale: {e})"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fjord_text_and_computes_rates_and_quantiles() {
        let a = parse(
            "# HELP x y\nfjord_requests_total{shard=\"0\",api=\"Produce\"} 10\n\
             fjord_request_latency_seconds_bucket{shard=\"0\",api=\"Produce\",le=\"0.001\"} 0\n\
             fjord_request_latency_seconds_bucket{shard=\"0\",api=\"Produce\",le=\"0.002\"} 0\n\
             fjord_request_latency_seconds_bucket{shard=\"0\",api=\"Produce\",le=\"+Inf\"} 0\n",
        );
        let b = parse(
            "fjord_requests_total{shard=\"0\",api=\"Produce\"} 110\n\
             fjord_request_latency_seconds_bucket{shard=\"0\",api=\"Produce\",le=\"0.001\"} 50\n\
             fjord_request_latency_seconds_bucket{shard=\"0\",api=\"Produce\",le=\"0.002\"} 100\n\
             fjord_request_latency_seconds_bucket{shard=\"0\",api=\"Produce\",le=\"+Inf\"} 100\n",
        );
        assert_eq!(
            rate(&a, &b, "fjord_requests_total", &[("shard", "0")], 2.0),
            50.0
        );
        let l = [("api", "Produce")];
        let q50 = quantile(
            &a.buckets("fjord_request_latency_seconds", &l),
            &b.buckets("fjord_request_latency_seconds", &l),
            0.5,
        )
        .unwrap();
        assert!((q50 - 0.001).abs() < 1e-9, "{q50}");
        let q99 = quantile(
            &a.buckets("fjord_request_latency_seconds", &l),
            &b.buckets("fjord_request_latency_seconds", &l),
            0.99,
        )
        .unwrap();
        assert!(q99 > 0.0019 && q99 <= 0.002, "{q99}");
        assert!(quantile(&b.buckets("x", &l), &b.buckets("x", &l), 0.5).is_none());
        let t = shards_table(&a, &b, 1.0);
        assert_eq!(t.rows.len(), 1);
        assert_eq!(t.rows[0][3], "100");
    }
}

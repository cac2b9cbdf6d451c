//! The Prometheus endpoint: one std thread, outside the shards, answering `GET /metrics`.
//! Each scrape asks every shard for a snapshot through the mesh and waits at most
//! `SCRAPE_TIMEOUT` for each, so a stuck shard shows as missing rather than hanging the scrape.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::shard::{Job, Mesh};

use crate::metrics::{render, Snapshot};

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// A scraper's request head larger than this is refused.
const REQUEST_HEAD_BYTES_MAX: usize = 8192;

/// Serves metrics on `listener` from a thread of its own.
pub fn spawn(listener: TcpListener, mesh: Mesh, cores: Vec<usize>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("fjord-metrics".into())
        .spawn(move || {
            // One scraper at a time: scrapes are rare (seconds apart) and cheap.
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => {
                        if let Err(e) = answer(s, &mesh, &cores) {
                            tracing::debug!("metrics request failed: {e}");
                        }
                    }
                    Err(e) => {
                        tracing::warn!("metrics accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        })?;
    Ok(())
}

fn answer(mut s: TcpStream, mesh: &Mesh, cores: &[usize]) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > REQUEST_HEAD_BYTES_MAX {
            return reply(
                &mut s,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            );
        }
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return reply(&mut s, "405 Method Not Allowed", "text/plain", "GET only\n");
    }
    match path.split('?').next().unwrap_or("") {
        "/metrics" => {
            let body = scrape(mesh, cores);
            reply(&mut s, "200 OK", prometheus::TEXT_FORMAT, &body)
        }
        "/" => reply(
            &mut s,
            "200 OK",
            "text/plain",
            "fjord: metrics at /metrics\n",
        ),
        _ => reply(&mut s, "404 Not Found", "text/plain", "not found\n"),
    }
}

fn reply(s: &mut TcpStream, status: &str, ctype: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    s.flush()
}

/// Every shard's snapshot (those that answer in time), rendered.
pub fn scrape(mesh: &Mesh, cores: &[usize]) -> String {
    let mut rxs = Vec::with_capacity(mesh.len());
    for (i, tx) in mesh.iter().enumerate() {
        let (stx, srx) = flume::bounded::<Snapshot>(1);
        let core = cores.get(i).copied().unwrap_or(i);
        let job: Job = Box::new(move || {
            Box::pin(async move {
                let s = crate::shard::snapshot(&crate::shard::local(), core);
                let _ = stx.send(s);
            })
        });
        if tx.send(job).is_ok() {
            rxs.push(Some(srx));
        } else {
            rxs.push(None);
        }
    }
    let deadline = Instant::now() + SCRAPE_TIMEOUT;
    let mut snaps = Vec::with_capacity(rxs.len());
    let mut missing = 0;
    for rx in rxs {
        let got = rx.and_then(|rx| {
            rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .ok()
        });
        match got {
            Some(s) => snaps.push(s),
            None => missing += 1,
        }
    }
    let depths: Vec<usize> = mesh.iter().map(|tx| tx.len()).collect();
    render(&snaps, &depths, missing)
}

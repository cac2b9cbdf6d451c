//! Startup recovery of a partition directory, with plain blocking file I/O (it runs before the
//! shard serves anything). Closed segments get a header scan; the last segment also gets a CRC
//! check of every batch and is truncated at the first torn or corrupt one.

use std::collections::HashMap;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use super::batch::{crc_of, BatchHeader, HEADER_BYTES};
use super::{index, ProducerEntry, DMA_ALIGN, INDEX_INTERVAL_BYTES};

pub struct RecoveredSegment {
    pub base_offset: u64,
    pub next_offset: u64,
    pub size: u64,
    pub path: PathBuf,
    pub offset_index: Vec<(u64, u64)>,
    pub time_index: Vec<(i64, u64)>,
    pub max_timestamp: i64,
    pub created_ms: u64,
    /// Bytes of the last partial DMA block (only meaningful for the last segment).
    pub tail: Vec<u8>,
}

pub struct Recovered {
    pub segments: Vec<RecoveredSegment>,
    pub log_start_offset: u64,
    pub producers: HashMap<i64, ProducerEntry>,
}

const LSO_FILE: &str = "log-start-offset";

pub fn write_log_start_offset(dir: &Path, offset: u64) -> std::io::Result<()> {
    let tmp = dir.join("log-start-offset.tmp");
    std::fs::write(&tmp, offset.to_string())?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(LSO_FILE))
}

fn read_log_start_offset(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join(LSO_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

struct ScanResult {
    valid_bytes: u64,
    next_offset: Option<u64>,
    offset_index: Vec<(u64, u64)>,
    time_index: Vec<(i64, u64)>,
    max_timestamp: i64,
    first_timestamp: Option<i64>,
}

/// Scans batches from the start of a segment. `check_crc` reads whole batches; otherwise only
/// headers are read. Stops at the first batch that is torn, corrupt or out of sequence.
fn scan_segment(
    path: &Path,
    base_offset: u64,
    check_crc: bool,
    producers: &mut HashMap<i64, ProducerEntry>,
) -> std::io::Result<ScanResult> {
    let f = std::fs::File::open(path)?;
    let file_len = f.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut pos = 0u64;
    let mut expected = base_offset;
    let mut res = ScanResult {
        valid_bytes: 0,
        next_offset: None,
        offset_index: Vec::new(),
        time_index: Vec::new(),
        max_timestamp: -1,
        first_timestamp: None,
    };
    let mut since_index = 0u64;
    let mut header = [0u8; HEADER_BYTES];
    let mut body = Vec::new();
    // Bounded: each pass advances pos by at least HEADER_BYTES or stops.
    while pos + HEADER_BYTES as u64 <= file_len {
        if r.read_exact(&mut header).is_err() {
            break;
        }
        let h = BatchHeader::new(&header);
        let total = h.total_bytes() as u64;
        if h.batch_length() < (HEADER_BYTES - 12) as i32 || h.magic() != 2 || pos + total > file_len
        {
            break;
        }
        let base = h.base_offset();
        if base < 0 || (base as u64) < expected || h.last_offset_delta() < 0 {
            break;
        }
        if check_crc {
            body.clear();
            body.extend_from_slice(&header);
            body.resize(total as usize, 0);
            if r.read_exact(&mut body[HEADER_BYTES..]).is_err() || crc_of(&body) != h.crc() {
                break;
            }
        } else if r.seek_relative(total as i64 - HEADER_BYTES as i64).is_err() {
            break;
        }
        let base = base as u64;
        let last = base + h.last_offset_delta() as u64;
        if res.offset_index.is_empty() || since_index >= INDEX_INTERVAL_BYTES {
            res.offset_index.push((base, pos));
            since_index = 0;
        }
        since_index += total;
        let ts = h.max_timestamp();
        if ts > res.max_timestamp {
            res.max_timestamp = ts;
            res.time_index.push((ts, base));
        }
        res.first_timestamp.get_or_insert(h.base_timestamp());
        if h.producer_id() >= 0 && !h.is_control() {
            producers.entry(h.producer_id()).or_default().record(
                h.producer_epoch(),
                h.base_sequence(),
                h.last_sequence(),
                base,
            );
        }
        pos += total;
        res.valid_bytes = pos;
        expected = last + 1;
        res.next_offset = Some(expected);
    }
    Ok(res)
}

pub fn recover(dir: &Path) -> std::io::Result<Recovered> {
    // A compaction pass interrupted by a crash leaves `.cleaned` / `.swap` files behind.
    super::compaction::recover_leftovers(dir)?;
    let mut bases: Vec<u64> = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(".log") {
            if let Ok(b) = stem.parse::<u64>() {
                bases.push(b);
            }
        }
    }
    bases.sort_unstable();
    let mut producers = HashMap::new();
    let mut segments: Vec<RecoveredSegment> = Vec::new();
    let n = bases.len();
    let mut prev_next: Option<u64> = None;
    for (i, base) in bases.iter().copied().enumerate() {
        let path = dir.join(super::segment_file_name(base, "log"));
        let is_last = i + 1 == n;
        if let Some(p) = prev_next {
            if base < p {
                tracing::warn!(
                    "segment {} overlaps its predecessor; removing it",
                    path.display()
                );
                remove_segment_files(&path);
                continue;
            }
        }
        let scan = scan_segment(&path, base, is_last, &mut producers)?;
        let file_len = std::fs::metadata(&path)?.len();
        let mut stop_here = false;
        if scan.valid_bytes < file_len {
            // The last segment's tail past the last good batch is padding or a torn write.
            if !is_last {
                tracing::warn!(
                    "closed segment {} is damaged at byte {}; truncating and dropping later segments",
                    path.display(),
                    scan.valid_bytes
                );
                stop_here = true;
            } else if file_len - scan.valid_bytes >= DMA_ALIGN
                || !is_zero_tail(&path, scan.valid_bytes)?
            {
                tracing::warn!(
                    "truncating {} from {} to {} bytes (torn or corrupt tail)",
                    path.display(),
                    file_len,
                    scan.valid_bytes
                );
            }
            let f = std::fs::OpenOptions::new().write(true).open(&path)?;
            f.set_len(scan.valid_bytes)?;
            f.sync_all()?;
        }
        let size = scan.valid_bytes;
        let next_offset = scan.next_offset.unwrap_or(base);
        // Indexes: use the files when they match this segment, else what the scan rebuilt.
        let (offset_index, time_index) = if !is_last {
            let oi = index::read_index(&path.with_extension("index"), size);
            let ti = index::read_index(&path.with_extension("timeindex"), size);
            match (oi, ti) {
                (Some(oi), Some(ti)) => (
                    oi.into_iter().map(|(o, p)| (o as u64, p as u64)).collect(),
                    ti.into_iter().map(|(t, o)| (t, o as u64)).collect(),
                ),
                _ => {
                    let oi: Vec<(i64, i64)> = scan
                        .offset_index
                        .iter()
                        .map(|(o, p)| (*o as i64, *p as i64))
                        .collect();
                    let ti: Vec<(i64, i64)> = scan
                        .time_index
                        .iter()
                        .map(|(t, o)| (*t, *o as i64))
                        .collect();
                    let _ = index::write_index(&path.with_extension("index"), size, &oi);
                    let _ = index::write_index(&path.with_extension("timeindex"), size, &ti);
                    (scan.offset_index, scan.time_index)
                }
            }
        } else {
            (scan.offset_index, scan.time_index)
        };
        let tail = if is_last {
            let tail_len = (size % DMA_ALIGN) as usize;
            let mut t = vec![0u8; tail_len];
            if tail_len > 0 {
                let mut f = std::fs::File::open(&path)?;
                f.seek(std::io::SeekFrom::Start(size - tail_len as u64))?;
                f.read_exact(&mut t)?;
            }
            t
        } else {
            Vec::new()
        };
        let created_ms = scan
            .first_timestamp
            .filter(|t| *t > 0)
            .map(|t| t as u64)
            .unwrap_or_else(super::now_ms);
        segments.push(RecoveredSegment {
            base_offset: base,
            next_offset,
            size,
            path,
            offset_index,
            time_index,
            max_timestamp: scan.max_timestamp,
            created_ms,
            tail,
        });
        prev_next = Some(next_offset);
        if stop_here {
            for later in &bases[i + 1..] {
                remove_segment_files(&dir.join(super::segment_file_name(*later, "log")));
            }
            break;
        }
    }
    // A closed segment whose data is empty adds nothing; keep only a non-empty chain plus the last.
    if let Some(last) = segments.last_mut() {
        if !last.tail.is_empty() && last.size % DMA_ALIGN != last.tail.len() as u64 {
            last.tail.clear();
        }
    }
    let log_start_offset = read_log_start_offset(dir);
    Ok(Recovered {
        segments,
        log_start_offset,
        producers,
    })
}

fn is_zero_tail(path: &Path, from: u64) -> std::io::Result<bool> {
    let mut f = std::fs::File::open(path)?;
    f.seek(std::io::SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    f.take(DMA_ALIGN).read_to_end(&mut buf)?;
    Ok(buf.iter().all(|b| *b == 0))
}

fn remove_segment_files(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("index"));
    let _ = std::fs::remove_file(path.with_extension("timeindex"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::batch::{patch_header, tests::make_batch};

    fn write_log(dir: &Path, batches: &[Vec<u8>], garbage: &[u8]) -> PathBuf {
        let path = dir.join(crate::log::segment_file_name(0, "log"));
        let mut all = Vec::new();
        let mut off = 0i64;
        for b in batches {
            let mut b = b.clone();
            patch_header(&mut b, off, 0);
            off += BatchHeader::new(&b).last_offset_delta() as i64 + 1;
            all.extend_from_slice(&b);
        }
        all.extend_from_slice(garbage);
        std::fs::write(&path, all).unwrap();
        path
    }

    #[test]
    fn truncates_torn_tail() {
        let d = tempfile::tempdir().unwrap();
        let b1 = make_batch(3, 10);
        let b2 = make_batch(2, 20);
        let torn = &make_batch(5, 30)[..40];
        let path = write_log(d.path(), &[b1.clone(), b2.clone()], torn);
        let r = recover(d.path()).unwrap();
        assert_eq!(r.segments.len(), 1);
        assert_eq!(r.segments[0].next_offset, 5);
        assert_eq!(r.segments[0].size, (b1.len() + b2.len()) as u64);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            (b1.len() + b2.len()) as u64
        );
    }

    #[test]
    fn truncates_at_crc_mismatch() {
        let d = tempfile::tempdir().unwrap();
        let b1 = make_batch(3, 10);
        let mut b2 = make_batch(2, 20);
        let n = b2.len();
        b2[n - 1] ^= 0xff;
        write_log(d.path(), &[b1.clone(), b2], &[]);
        let r = recover(d.path()).unwrap();
        assert_eq!(r.segments[0].next_offset, 3);
        assert_eq!(r.segments[0].size, b1.len() as u64);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let d = tempfile::tempdir().unwrap();
        let mut seed = 0x9e3779b97f4a7c15u64;
        for round in 0..200 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 3000) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 56)) as u8).collect();
            if round % 3 == 0 {
                // A valid batch followed by noise.
                let mut b = make_batch(2, 1);
                b.extend_from_slice(&bytes);
                bytes = b;
            }
            std::fs::write(
                d.path().join(crate::log::segment_file_name(0, "log")),
                &bytes,
            )
            .unwrap();
            let r = recover(d.path()).unwrap();
            assert!(r.segments[0].size <= bytes.len() as u64, "seed {seed}");
        }
    }
}

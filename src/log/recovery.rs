//! Startup recovery of a partition directory, with plain blocking file I/O (it runs off the
//! reactor, before the partition serves anything).
//!
//! What is trusted: every closed segment was fdatasync'd before the next one was created, and
//! `recovery-point-offset` names an offset below which everything was synced (written at each
//! roll and at clean shutdown). Segments wholly below it get a header scan (indexes, producer
//! state); the others get a CRC check of every batch.
//!
//! What a damaged segment costs: a torn or corrupt batch past the recovery point in the last
//! segment is a write the crash cut short, and the tail from it is truncated (it was never
//! acknowledged as synced). Damage anywhere else is damage to synced data: the segment is
//! quarantined (renamed aside for the operator, logged loudly), its readable prefix is kept,
//! the offsets up to the next segment become a gap that reads skip as Kafka skips missing
//! offsets, every later segment is served, and the log end never moves back (fsynced data is
//! never deleted because an earlier segment is damaged).

use std::collections::HashMap;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use super::batch::{crc_of, BatchHeader, HEADER_BYTES};
use super::{
    index, storage, ProducerBatch, ProducerEntry, QuarantinedSegment, DMA_ALIGN,
    INDEX_INTERVAL_BYTES,
};

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
    pub quarantined: Vec<QuarantinedSegment>,
    /// Everything below this was synced before the last stop (0 when unknown).
    pub recovery_point: u64,
    /// The leader epochs of the batches scanned, in log order.
    pub epochs: super::epochs::EpochCache,
}

const LSO_FILE: &str = "log-start-offset";
const RECOVERY_POINT_FILE: &str = "recovery-point-offset";
/// Suffix of a quarantined segment: `<segment>.log.quarantined-at-<byte>`.
const QUARANTINE_MARK: &str = ".quarantined-at-";
/// Suffix of a segment's readable prefix while it is being put in place.
const PREFIX_SUFFIX: &str = ".prefix";

/// Persists the log start offset (atomically, durably) before segments below it are removed.
pub async fn write_log_start_offset(dir: &Path, offset: u64) -> std::io::Result<()> {
    storage::write_file_durably(&dir.join(LSO_FILE), offset.to_string().into_bytes()).await
}

const HIGH_WATERMARK_FILE: &str = "high-watermark";
const EPOCH_CHECKPOINT_FILE: &str = "leader-epoch-checkpoint";

/// Kafka's leader-epoch-checkpoint format: a version line (0), the entry count, then one
/// "epoch start-offset" line per entry.
fn epoch_checkpoint_bytes(entries: &[(i32, u64)]) -> Vec<u8> {
    let mut s = format!("0\n{}\n", entries.len());
    for (e, o) in entries {
        s.push_str(&format!("{e} {o}\n"));
    }
    s.into_bytes()
}

/// Persists the leader-epoch cache (atomically, durably).
pub async fn write_epoch_checkpoint(dir: &Path, entries: &[(i32, u64)]) -> std::io::Result<()> {
    storage::write_file_durably(
        &dir.join(EPOCH_CHECKPOINT_FILE),
        epoch_checkpoint_bytes(entries),
    )
    .await
}

/// The checkpointed leader-epoch cache; entries that do not parse are skipped (recovery's
/// scan of the batches covers what a lost checkpoint held, except what compaction removed).
pub fn read_epoch_checkpoint(dir: &Path) -> Vec<(i32, u64)> {
    let Ok(text) = std::fs::read_to_string(dir.join(EPOCH_CHECKPOINT_FILE)) else {
        return Vec::new();
    };
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let (e, o) = l.trim().split_once(' ')?;
            Some((e.parse().ok()?, o.parse().ok()?))
        })
        .collect()
}

/// Persists a replicated partition's high watermark: after a restart a follower cuts its log
/// back to it before it fetches (what lies past it may differ from the leader's log).
pub async fn write_high_watermark(dir: &Path, hw: u64) -> std::io::Result<()> {
    storage::write_file_durably(&dir.join(HIGH_WATERMARK_FILE), hw.to_string().into_bytes()).await
}

pub fn read_high_watermark(dir: &Path) -> Option<u64> {
    read_offset_file(dir, HIGH_WATERMARK_FILE)
}

/// Persists an offset below which every byte of the log is synced.
pub async fn write_recovery_point(dir: &Path, offset: u64) -> std::io::Result<()> {
    storage::write_file_durably(
        &dir.join(RECOVERY_POINT_FILE),
        offset.to_string().into_bytes(),
    )
    .await
}

fn read_offset_file(dir: &Path, name: &str) -> Option<u64> {
    std::fs::read_to_string(dir.join(name))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

fn read_log_start_offset(dir: &Path) -> u64 {
    read_offset_file(dir, LSO_FILE).unwrap_or(0)
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
    epochs: &mut super::epochs::EpochCache,
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
        epochs.observe(h.partition_leader_epoch(), base);
        if h.producer_id() >= 0 && !h.is_control() {
            producers.entry(h.producer_id()).or_default().record(
                h.producer_epoch(),
                ProducerBatch {
                    first_seq: h.base_sequence(),
                    last_seq: h.last_sequence(),
                    base_offset: base,
                    last_offset: last,
                },
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
    finish_quarantines(dir)?;
    let mut bases: Vec<u64> = Vec::new();
    let mut quarantined = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(".log") {
            if let Ok(b) = stem.parse::<u64>() {
                bases.push(b);
            }
        } else if let Some((_, at)) = name.split_once(QUARANTINE_MARK) {
            // Set aside by an earlier start; the gap it left is recomputed below.
            quarantined.push(QuarantinedSegment {
                path: e.path(),
                damaged_at_byte: at.parse().unwrap_or(0),
                gap_from_offset: 0,
                gap_to_offset: 0,
            });
        }
    }
    bases.sort_unstable();
    // Without a recovery point (a log from before it existed) nothing is assumed synced.
    let recovery_point = read_offset_file(dir, RECOVERY_POINT_FILE).unwrap_or(0);
    let mut producers = HashMap::new();
    let mut epochs = super::epochs::EpochCache::default();
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
        let next_base = bases.get(i + 1).copied();
        let wholly_synced = next_base.map(|nb| nb <= recovery_point).unwrap_or(false);
        let scan = scan_segment(
            &path,
            base,
            is_last || !wholly_synced,
            &mut producers,
            &mut epochs,
        )?;
        let file_len = std::fs::metadata(&path)?.len();
        let scanned_end = scan.next_offset.unwrap_or(base);
        let mut extra_empty_segment = None;
        if scan.valid_bytes < file_len {
            let torn_tail = is_last && scanned_end >= recovery_point;
            if torn_tail {
                // The last segment's tail past the last good batch is padding or a write the
                // crash cut short.
                if file_len - scan.valid_bytes >= DMA_ALIGN
                    || !is_zero_tail(&path, scan.valid_bytes)?
                {
                    tracing::warn!(
                        "truncating {} from {} to {} bytes (torn or corrupt tail)",
                        path.display(),
                        file_len,
                        scan.valid_bytes
                    );
                }
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(scan.valid_bytes)?;
                storage::sync_file_blocking(&path)?;
            } else {
                let gap_to = next_base.unwrap_or(recovery_point);
                let q = quarantine(&path, scan.valid_bytes, scanned_end, gap_to)?;
                if is_last {
                    // The synced end lies past the damage: writes resume there, never below.
                    extra_empty_segment = Some(gap_to);
                }
                quarantined.push(q);
            }
        }
        let size = scan.valid_bytes;
        let next_offset = scanned_end;
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
        let tail = if is_last && extra_empty_segment.is_none() {
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
        if let Some(new_base) = extra_empty_segment {
            let path = dir.join(super::segment_file_name(new_base, "log"));
            std::fs::File::create(&path)?;
            storage::sync_file_blocking(&path)?;
            storage::sync_dir_blocking(dir)?;
            segments.push(RecoveredSegment {
                base_offset: new_base,
                next_offset: new_base,
                size: 0,
                path,
                offset_index: Vec::new(),
                time_index: Vec::new(),
                max_timestamp: -1,
                created_ms: super::now_ms(),
                tail: Vec::new(),
            });
        }
    }
    // The gaps of segments quarantined by earlier starts: from the end of the kept prefix to the
    // next segment.
    for q in quarantined.iter_mut().filter(|q| q.gap_to_offset == 0) {
        let name = q
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let base = name
            .split('.')
            .next()
            .and_then(|b| b.parse::<u64>().ok())
            .unwrap_or(0);
        if let Some(i) = segments.iter().position(|s| s.base_offset == base) {
            q.gap_from_offset = segments[i].next_offset;
            q.gap_to_offset = segments
                .get(i + 1)
                .map(|s| s.base_offset)
                .unwrap_or(segments[i].next_offset);
        }
    }
    let log_start_offset = read_log_start_offset(dir);
    let epochs = super::epochs::EpochCache::merge(&read_epoch_checkpoint(dir), &epochs);
    Ok(Recovered {
        segments,
        log_start_offset,
        producers,
        quarantined,
        recovery_point,
        epochs,
    })
}

/// Sets a damaged segment aside and puts its readable prefix (`valid_bytes`) in its place:
/// the prefix is written to a new file and synced, the damaged file renamed, the prefix renamed
/// to the segment's name, the directory synced. `finish_quarantines` completes a crash in
/// between.
fn quarantine(
    path: &Path,
    valid_bytes: u64,
    gap_from_offset: u64,
    gap_to_offset: u64,
) -> std::io::Result<QuarantinedSegment> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut prefix_name = path.as_os_str().to_owned();
    prefix_name.push(PREFIX_SUFFIX);
    let prefix = PathBuf::from(prefix_name);
    {
        let mut src = std::fs::File::open(path)?.take(valid_bytes);
        let mut dst = std::fs::File::create(&prefix)?;
        std::io::copy(&mut src, &mut dst)?;
    }
    storage::sync_file_blocking(&prefix)?;
    let mut aside_name = path.as_os_str().to_owned();
    aside_name.push(format!("{QUARANTINE_MARK}{valid_bytes}"));
    let aside = PathBuf::from(aside_name);
    std::fs::rename(path, &aside)?;
    std::fs::rename(&prefix, path)?;
    let _ = std::fs::remove_file(path.with_extension("index"));
    let _ = std::fs::remove_file(path.with_extension("timeindex"));
    storage::sync_dir_blocking(dir)?;
    tracing::error!(
        "segment {} is damaged at byte {valid_bytes}: quarantined as {}; offsets {gap_from_offset}..{gap_to_offset} are lost, everything else is served",
        path.display(),
        aside.display()
    );
    Ok(QuarantinedSegment {
        path: aside,
        damaged_at_byte: valid_bytes,
        gap_from_offset,
        gap_to_offset,
    })
}

/// Completes a quarantine that a crash interrupted: a `<segment>.log.prefix` left behind either
/// replaces a segment already renamed aside, or is dropped when the segment is still in place
/// (the quarantine then starts over).
fn finish_quarantines(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(seg) = name.strip_suffix(PREFIX_SUFFIX) else {
            continue;
        };
        let seg_path = dir.join(seg);
        if seg_path.exists() {
            std::fs::remove_file(e.path())?;
        } else {
            std::fs::rename(e.path(), &seg_path)?;
        }
        storage::sync_dir_blocking(dir)?;
    }
    Ok(())
}

fn is_zero_tail(path: &Path, from: u64) -> std::io::Result<bool> {
    let mut f = std::fs::File::open(path)?;
    f.seek(std::io::SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    f.take(DMA_ALIGN).read_to_end(&mut buf)?;
    Ok(buf.iter().all(|b| *b == 0))
}

/// Cuts the log in `dir` so that it ends before `offset` (a follower whose tail may differ
/// from its new leader's): removes the segments from `offset` on, newest first, then cuts the
/// segment holding `offset` before the batch that holds it. The recovery point and the saved
/// high watermark are lowered to the new end first, so that a crash in between leaves a log
/// recovery accepts (a shorter prefix, which the follower fetches again). With `start_over`,
/// everything goes and the log starts again at `offset` (a follower behind its leader's log
/// start). Runs with the partition closed; returns the new log end.
pub fn truncate_blocking(dir: &Path, offset: u64, start_over: bool) -> std::io::Result<u64> {
    let mut bases: Vec<u64> = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        if let Some(stem) = name.to_string_lossy().strip_suffix(".log") {
            if let Ok(b) = stem.parse::<u64>() {
                bases.push(b);
            }
        }
    }
    bases.sort_unstable();
    let keep: Vec<u64> = if start_over {
        Vec::new()
    } else {
        bases.iter().copied().filter(|b| *b < offset).collect()
    };
    // Where the cut falls in the last kept segment (read only; nothing changes yet).
    let mut cut: Option<(PathBuf, u64, u64)> = None;
    let end = match keep.last() {
        None => offset,
        Some(&base) => {
            let path = dir.join(super::segment_file_name(base, "log"));
            let mut f = BufReader::new(std::fs::File::open(&path)?);
            let len = std::fs::metadata(&path)?.len();
            let mut pos = 0u64;
            let mut end = base;
            let mut head = [0u8; HEADER_BYTES];
            // Bounded by the file: every step moves past one whole batch.
            while pos + HEADER_BYTES as u64 <= len {
                f.seek(std::io::SeekFrom::Start(pos))?;
                f.read_exact(&mut head)?;
                let h = BatchHeader::new(&head);
                let first = h.base_offset().max(0) as u64;
                let last = first + h.last_offset_delta().max(0) as u64;
                if h.batch_length() <= 0 || last >= offset {
                    break;
                }
                pos += h.total_bytes() as u64;
                end = last + 1;
            }
            if pos < len {
                cut = Some((path, pos, len));
            }
            end
        }
    };
    // The checkpointed epochs that start at or past the cut go first, too.
    let kept: Vec<(i32, u64)> = read_epoch_checkpoint(dir)
        .into_iter()
        .filter(|(_, start)| !start_over && *start < end)
        .collect();
    if dir.join(EPOCH_CHECKPOINT_FILE).exists() {
        storage::write_file_durably_blocking(
            &dir.join(EPOCH_CHECKPOINT_FILE),
            &epoch_checkpoint_bytes(&kept),
        )?;
    }
    for (name, value) in [(RECOVERY_POINT_FILE, end), (HIGH_WATERMARK_FILE, end)] {
        if read_offset_file(dir, name).is_some_and(|v| v > value) {
            storage::write_file_durably_blocking(&dir.join(name), value.to_string().as_bytes())?;
        }
    }
    if keep.is_empty() {
        // The log starts over at `end`, durably, before its segments go.
        storage::write_file_durably_blocking(&dir.join(LSO_FILE), end.to_string().as_bytes())?;
    }
    // Newest first: a crash midway leaves a prefix.
    for base in bases.iter().rev().filter(|b| !keep.contains(b)) {
        remove_segment_files(&dir.join(super::segment_file_name(*base, "log")));
    }
    if let Some((path, pos, _)) = cut {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)?
            .set_len(pos)?;
        storage::sync_file_blocking(&path)?;
        // Rebuilt by recovery from what is left.
        let _ = std::fs::remove_file(path.with_extension("index"));
        let _ = std::fs::remove_file(path.with_extension("timeindex"));
    }
    storage::sync_dir_blocking(dir)?;
    Ok(end)
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
    fn truncation_cuts_before_the_batch_holding_the_offset_and_drops_later_segments() {
        let d = tempfile::tempdir().unwrap();
        // Segment 0 holds offsets 0..5 (batches of 3 and 2), segment 5 holds 5..9.
        write_log(d.path(), &[make_batch(3, 10), make_batch(2, 20)], &[]);
        let mut b3 = make_batch(4, 30);
        patch_header(&mut b3, 5, 0);
        std::fs::write(d.path().join(crate::log::segment_file_name(5, "log")), &b3).unwrap();
        std::fs::write(d.path().join(RECOVERY_POINT_FILE), "9").unwrap();
        // Offset 4 lies inside the second batch: the cut is before it, at 3.
        assert_eq!(truncate_blocking(d.path(), 4, false).unwrap(), 3);
        assert!(!d
            .path()
            .join(crate::log::segment_file_name(5, "log"))
            .exists());
        assert_eq!(read_offset_file(d.path(), RECOVERY_POINT_FILE), Some(3));
        let r = recover(d.path()).unwrap();
        assert_eq!(r.segments.len(), 1);
        assert_eq!(r.segments[0].next_offset, 3);
        // At a batch boundary nothing more is cut; below everything the log starts over.
        assert_eq!(truncate_blocking(d.path(), 3, false).unwrap(), 3);
        assert_eq!(truncate_blocking(d.path(), 0, false).unwrap(), 0);
        let r = recover(d.path()).unwrap();
        assert!(r.segments.iter().all(|s| s.next_offset == 0));
        assert_eq!(r.log_start_offset, 0);
        // Behind the leader's log start: everything goes, the log starts there.
        write_log(d.path(), &[make_batch(3, 10)], &[]);
        assert_eq!(truncate_blocking(d.path(), 50, true).unwrap(), 50);
        let r = recover(d.path()).unwrap();
        assert!(r.segments.is_empty());
        assert_eq!(r.log_start_offset, 50);
    }

    #[test]
    fn recovery_rebuilds_the_leader_epoch_cache_from_batch_headers() {
        let d = tempfile::tempdir().unwrap();
        let mut all = Vec::new();
        // Offsets 0..3 in epoch 2, 3..5 in epoch 2, 5..9 in epoch 7.
        for (base, n, epoch) in [(0i64, 3, 2), (3, 2, 2), (5, 4, 7)] {
            let mut b = make_batch(n, 10);
            patch_header(&mut b, base, epoch);
            all.extend_from_slice(&b);
        }
        std::fs::write(d.path().join(crate::log::segment_file_name(0, "log")), &all).unwrap();
        let r = recover(d.path()).unwrap();
        assert_eq!(r.epochs.latest(), 7);
        assert_eq!((r.epochs.epoch_at(4), r.epochs.epoch_at(5)), (2, 7));
        assert_eq!(
            r.epochs.end_offset_for(2, 9, None),
            Some(crate::log::epochs::EpochEnd {
                epoch: 2,
                end_offset: 5
            })
        );
        // A checkpoint knows an epoch the batches no longer show (compaction removed it).
        std::fs::write(
            d.path().join(EPOCH_CHECKPOINT_FILE),
            epoch_checkpoint_bytes(&[(2, 0), (4, 4), (7, 5)]),
        )
        .unwrap();
        let r = recover(d.path()).unwrap();
        assert_eq!(r.epochs.epoch_at(4), 4);
        assert_eq!(
            r.epochs.end_offset_for(2, 9, None).map(|e| e.end_offset),
            Some(4)
        );
        // A cut before the epoch-7 batch leaves epoch 4 the latest after the next open, and
        // the checkpoint loses what the cut removed.
        truncate_blocking(d.path(), 5, false).unwrap();
        assert_eq!(read_epoch_checkpoint(d.path()), vec![(2, 0), (4, 4)]);
        assert_eq!(recover(d.path()).unwrap().epochs.latest(), 4);
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

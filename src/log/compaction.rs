//! Log compaction for `cleanup.policy=compact`: keeps only the latest record per key in the
//! closed segments of a partition (never the active one), as Kafka's log cleaner does.
//!
//! Split in two, like the rest of the log:
//! - a blocking core (`clean_log` and the pure batch functions below it) that reads closed
//!   segment files with std::fs, builds key → latest offset over the dirty range (pass 1), and
//!   rewrites every segment up to the end of that range into `<base>.cleaned` files (pass 2),
//!   which it fsyncs and renames to `<base>.swap`. It runs on glommio's blocking thread pool, so
//!   decompression, re-encoding and fsync never stall the shard.
//! - a thin shell (`SharedLog::compact`) on the shard that snapshots the closed segments, runs
//!   the core, then swaps each `.swap` in place of the segments it replaces in one synchronous
//!   step (no RefCell borrow is held across an await).
//!
//! Crash safety (Kafka's `.cleaned` → `.swap` scheme, simplified): a `.cleaned` file is never
//! trusted (recovery deletes it); a `.swap` file exists only once complete and fsync'd, so
//! recovery finishes the swap by renaming it over its `.log`. Replaced segments after the first
//! of a group are deleted before the rename; a leftover one is either dropped by recovery's
//! overlap check or only holds superseded records, which compaction semantics allow.
//!
//! Offsets are preserved: a rewritten batch has base offset = its first kept record's offset and
//! each record keeps its absolute offset, so segments and batches get gaps, which reads and
//! recovery accept. Batches are re-encoded with their original compression codec; a batch whose
//! records are all kept is copied byte for byte.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use kafka_protocol::records::{
    Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions,
};

use super::batch::{self, BatchHeader, HEADER_BYTES, LOG_OVERHEAD};
use super::{segment_file_name, LogError, Segment, SharedLog, INDEX_INTERVAL_BYTES};

/// Persisted "cleaned up to" offset of a partition (plain decimal), so that a restart does not
/// treat the whole log as dirty again.
pub const CHECKPOINT_FILE: &str = "cleaner-offset-checkpoint";
/// Memory bound of the key → offset map of one cleaning pass (key bytes plus per-entry
/// overhead). When the dirty range has more keys, the pass stops at a segment boundary and the
/// next pass continues from there (Kafka's dedupe buffer works the same way).
pub const OFFSET_MAP_BYTES_MAX: usize = 64 << 20;
/// Estimated bytes of one map entry besides the key (hash table slot, box header, offset).
const MAP_ENTRY_OVERHEAD_BYTES: usize = 48;
/// A batch larger than this in a closed segment is treated as damage, not data.
const BATCH_BYTES_MAX: usize = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum CleanError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: malformed batch at byte {pos}: {message}")]
    Malformed {
        path: String,
        pos: u64,
        message: String,
    },
}

impl CleanError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        CleanError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Per-topic settings of the cleaner, resolved from topic config by the caller.
#[derive(Debug, Clone, Copy)]
pub struct CleanerSettings {
    /// segment.bytes: the cleaner groups adjacent segments while their sizes sum to at most this.
    pub segment_bytes: u64,
    /// delete.retention.ms: how long a tombstone is kept after its timestamp.
    pub delete_retention_ms: i64,
    /// min.cleanable.dirty.ratio: dirty bytes / closed bytes needed to start a pass.
    pub min_cleanable_dirty_ratio: f64,
    /// max.compaction.lag.ms: a pass starts whatever the ratio once the oldest dirty closed
    /// segment is this old.
    pub max_compaction_lag_ms: i64,
}

/// What the cleaner needs to know of one closed segment.
#[derive(Debug, Clone)]
pub struct SegmentSnapshot {
    pub base_offset: u64,
    pub next_offset: u64,
    /// Valid bytes of the segment; the file is read up to here only.
    pub size: u64,
    pub path: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CleanStats {
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub records_kept: u64,
    pub records_dropped: u64,
    pub tombstones_dropped: u64,
    pub segments_before: usize,
    pub segments_after: usize,
}

/// One rewritten group of adjacent segments, ready to be swapped in.
#[derive(Debug)]
pub struct CleanedGroup {
    /// (base offset, size) of the segments it replaces, ascending; the first names the result.
    pub members: Vec<(u64, u64)>,
    pub base_offset: u64,
    /// One past the last offset the replaced segments covered (not the last kept record).
    pub next_offset: u64,
    pub swap_path: PathBuf,
    pub size: u64,
    pub offset_index: Vec<(u64, u64)>,
    pub time_index: Vec<(i64, u64)>,
    pub max_timestamp: i64,
    /// When its segments were first cleaned (this pass, for those cleaned now).
    pub first_cleaned_ms: i64,
}

#[derive(Debug)]
pub struct CleanOutcome {
    pub groups: Vec<CleanedGroup>,
    /// Every offset below this has been compacted against the keys seen up to it.
    pub cleaned_up_to: u64,
    pub stats: CleanStats,
}

/// Key → offset of its latest record in the dirty range.
#[derive(Default)]
pub struct OffsetMap {
    map: HashMap<Box<[u8]>, u64>,
    bytes: usize,
}

impl OffsetMap {
    pub fn put(&mut self, key: &[u8], offset: u64) {
        if let Some(o) = self.map.get_mut(key) {
            *o = (*o).max(offset);
            return;
        }
        self.bytes += key.len() + MAP_ENTRY_OVERHEAD_BYTES;
        self.map.insert(key.into(), offset);
    }
    pub fn get(&self, key: &[u8]) -> Option<u64> {
        self.map.get(key).copied()
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The cleaner's persisted state: "cleaned up to" on the first line, then one line per closed
/// segment the cleaner has rewritten, "<base offset> <ms of its first cleaning>" (a tombstone
/// is dropped once delete.retention.ms has passed since the segment holding it was first
/// cleaned, as Kafka's delete horizon does). A file from before the second part reads as none.
pub fn read_checkpoint(dir: &Path) -> (u64, BTreeMap<u64, i64>) {
    let text = std::fs::read_to_string(dir.join(CHECKPOINT_FILE)).unwrap_or_default();
    let mut lines = text.lines();
    let cleaned_up_to = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    let first_cleaned = lines
        .filter_map(|l| {
            let (b, t) = l.trim().split_once(' ')?;
            Some((b.parse().ok()?, t.parse().ok()?))
        })
        .collect();
    (cleaned_up_to, first_cleaned)
}

pub fn write_checkpoint(
    dir: &Path,
    offset: u64,
    first_cleaned: &BTreeMap<u64, i64>,
) -> std::io::Result<()> {
    let mut text = offset.to_string();
    for (base, ms) in first_cleaned {
        text.push_str(&format!("\n{base} {ms}"));
    }
    super::storage::write_file_durably_blocking(&dir.join(CHECKPOINT_FILE), text.as_bytes())
}

/// Dirty bytes / bytes of all closed segments (0 when there are none).
pub fn dirty_ratio(closed: &[SegmentSnapshot], cleaned_up_to: u64) -> f64 {
    let total: u64 = closed.iter().map(|s| s.size).sum();
    if total == 0 {
        return 0.0;
    }
    let dirty: u64 = closed
        .iter()
        .filter(|s| s.base_offset >= cleaned_up_to)
        .map(|s| s.size)
        .sum();
    dirty as f64 / total as f64
}

/// When the tombstones of a segment may go: delete.retention.ms after the segment was first
/// cleaned (None: never cleaned yet, so they stay this pass).
pub fn tombstone_deadline(first_cleaned_ms: Option<i64>, delete_retention_ms: i64) -> Option<i64> {
    if delete_retention_ms < 0 {
        return None;
    }
    first_cleaned_ms.map(|t| t.saturating_add(delete_retention_ms))
}

/// Produce to a compacted topic: Kafka refuses records without a key there (a key is what
/// compaction keeps the latest record of). Returns the positions of the keyless records,
/// counted over the payload's records, as the produce response's `record_errors` report them.
/// Decodes (and decompresses) the records, so only produce to a compacted topic pays for it,
/// never the hot path of other topics; the payload is bounded by the request size limit.
pub fn keyless_records(payload: &Bytes) -> Result<Vec<i32>, String> {
    use bytes::Buf;
    let mut buf = payload.clone();
    let mut index = 0i32;
    let mut keyless = Vec::new();
    while buf.has_remaining() {
        let set = RecordBatchDecoder::decode(&mut buf).map_err(|e| e.to_string())?;
        for r in &set.records {
            if r.key.is_none() && !r.control {
                keyless.push(index);
            }
            index = index.saturating_add(1);
        }
    }
    Ok(keyless)
}

/// Pass 1 on one batch: records every key's offset. Control batches carry no user keys.
pub fn map_batch(raw: &Bytes, map: &mut OffsetMap) -> Result<(), String> {
    if raw.len() < HEADER_BYTES {
        return Err("batch shorter than its header".into());
    }
    if BatchHeader::new(raw).is_control() {
        return Ok(());
    }
    let mut buf = raw.clone();
    let set = RecordBatchDecoder::decode(&mut buf).map_err(|e| e.to_string())?;
    for r in &set.records {
        if let (Some(k), true) = (&r.key, r.offset >= 0) {
            map.put(k, r.offset as u64);
        }
    }
    Ok(())
}

/// Pass 2 on one batch: appends to `out` the batch holding only the records to keep (nothing
/// when none is kept). A record is kept when it has a key, no later record of that key is in
/// `map`, and it is not a tombstone past `tombstones_until` (see `tombstone_deadline`).
///
/// `producer_last` holds the base offsets of each idempotent producer's last batch: such a batch
/// is kept whole, whatever its records, because a restart rebuilds the producer's epoch and
/// sequence from it (Kafka's cleaner keeps it for the same reason).
pub fn clean_batch(
    raw: &Bytes,
    map: &OffsetMap,
    tombstones_until: Option<i64>,
    now_ms: i64,
    producer_last: &HashSet<u64>,
    out: &mut Vec<u8>,
    stats: &mut CleanStats,
) -> Result<(), String> {
    if raw.len() < HEADER_BYTES {
        return Err("batch shorter than its header".into());
    }
    let h = BatchHeader::new(raw);
    if h.producer_id() >= 0 && producer_last.contains(&(h.base_offset() as u64)) {
        stats.records_kept += h.last_offset_delta().max(0) as u64 + 1;
        out.extend_from_slice(raw);
        return Ok(());
    }
    if h.is_control() {
        // Transaction markers are out of scope: keep them as they are.
        out.extend_from_slice(raw);
        return Ok(());
    }
    let mut buf = raw.clone();
    let set = RecordBatchDecoder::decode(&mut buf).map_err(|e| e.to_string())?;
    let total = set.records.len();
    let mut kept: Vec<Record> = Vec::with_capacity(total);
    for r in set.records {
        let Some(k) = &r.key else {
            stats.records_dropped += 1;
            continue;
        };
        // Keys not in the map only occur below the previous cleaned-up-to point, which is
        // already unique per key.
        if map.get(k).is_some_and(|latest| latest != r.offset as u64) {
            stats.records_dropped += 1;
            continue;
        }
        if r.value.is_none() && tombstones_until.is_some_and(|d| d <= now_ms) {
            stats.records_dropped += 1;
            stats.tombstones_dropped += 1;
            continue;
        }
        kept.push(r);
    }
    stats.records_kept += kept.len() as u64;
    if kept.is_empty() {
        return Ok(());
    }
    if kept.len() == total {
        out.extend_from_slice(raw);
        return Ok(());
    }
    let mut enc = BytesMut::new();
    let opts = RecordEncodeOptions {
        version: 2,
        compression: set.compression,
    };
    RecordBatchEncoder::encode(&mut enc, kept.iter(), &opts).map_err(|e| e.to_string())?;
    if enc.len() < HEADER_BYTES {
        return Err("re-encoded batch is shorter than a header".into());
    }
    // Records of one original batch share (offset - sequence), so the encoder emits exactly one
    // batch; assert that rather than silently writing something else.
    if BatchHeader::new(&enc).total_bytes() != enc.len() {
        return Err("re-encoding split one batch into several".into());
    }
    if h.is_log_append_time() {
        // The encoder knows no timestamp type: restore the flag and the append time.
        batch::set_log_append_time(&mut enc, h.max_timestamp());
    }
    out.extend_from_slice(&enc);
    Ok(())
}

/// Reads whole batches of a closed segment, up to its valid size.
struct BatchReader {
    r: BufReader<std::fs::File>,
    path: PathBuf,
    pos: u64,
    size: u64,
}

impl BatchReader {
    fn open(seg: &SegmentSnapshot) -> Result<BatchReader, CleanError> {
        let f = std::fs::File::open(&seg.path).map_err(|e| CleanError::io(&seg.path, e))?;
        Ok(BatchReader {
            r: BufReader::with_capacity(1 << 20, f),
            path: seg.path.clone(),
            pos: 0,
            size: seg.size,
        })
    }

    fn malformed(&self, message: &str) -> CleanError {
        CleanError::Malformed {
            path: self.path.display().to_string(),
            pos: self.pos,
            message: message.into(),
        }
    }

    /// The next batch with the file position it starts at, or None at the end.
    fn next_batch(&mut self) -> Result<Option<(u64, Bytes)>, CleanError> {
        if self.pos >= self.size {
            return Ok(None);
        }
        if self.pos + HEADER_BYTES as u64 > self.size {
            return Err(self.malformed("bytes after the last batch"));
        }
        let mut head = [0u8; LOG_OVERHEAD];
        self.r
            .read_exact(&mut head)
            .map_err(|e| CleanError::io(&self.path, e))?;
        let len = i32::from_be_bytes([head[8], head[9], head[10], head[11]]);
        if len < (HEADER_BYTES - LOG_OVERHEAD) as i32 || len as usize > BATCH_BYTES_MAX {
            return Err(self.malformed("bad batch length"));
        }
        let total = len as u64 + LOG_OVERHEAD as u64;
        if self.pos + total > self.size {
            return Err(self.malformed("batch runs past the segment end"));
        }
        let mut b = vec![0u8; total as usize];
        b[..LOG_OVERHEAD].copy_from_slice(&head);
        self.r
            .read_exact(&mut b[LOG_OVERHEAD..])
            .map_err(|e| CleanError::io(&self.path, e))?;
        let at = self.pos;
        self.pos += total;
        Ok(Some((at, Bytes::from(b))))
    }
}

/// A group being written: `<base>.cleaned`, plus the indexes of what went into it.
struct GroupWriter {
    members: Vec<(u64, u64)>,
    in_bytes: u64,
    next_offset: u64,
    cleaned_path: PathBuf,
    w: BufWriter<std::fs::File>,
    size: u64,
    offset_index: Vec<(u64, u64)>,
    time_index: Vec<(i64, u64)>,
    max_timestamp: i64,
    since_index: u64,
    /// When the group's segments were first cleaned (the latest of them).
    first_cleaned_ms: Option<i64>,
}

impl GroupWriter {
    fn create(dir: &Path, base: u64) -> Result<GroupWriter, CleanError> {
        let cleaned_path = dir.join(segment_file_name(base, "cleaned"));
        let f =
            std::fs::File::create(&cleaned_path).map_err(|e| CleanError::io(&cleaned_path, e))?;
        Ok(GroupWriter {
            members: Vec::new(),
            in_bytes: 0,
            next_offset: base,
            cleaned_path,
            w: BufWriter::with_capacity(1 << 20, f),
            size: 0,
            offset_index: Vec::new(),
            time_index: Vec::new(),
            max_timestamp: -1,
            since_index: 0,
            first_cleaned_ms: None,
        })
    }

    /// Appends cleaned batches (whole batches only) and indexes them as the log does.
    fn write(&mut self, batches: &[u8]) -> Result<(), CleanError> {
        let mut at = 0usize;
        while at + HEADER_BYTES <= batches.len() {
            let h = BatchHeader::new(&batches[at..]);
            let total = h.total_bytes();
            let base = h.base_offset().max(0) as u64;
            let pos = self.size + at as u64;
            if self.offset_index.is_empty() || self.since_index >= INDEX_INTERVAL_BYTES {
                self.offset_index.push((base, pos));
                self.since_index = 0;
            }
            self.since_index += total as u64;
            if h.max_timestamp() > self.max_timestamp {
                self.max_timestamp = h.max_timestamp();
                self.time_index.push((h.max_timestamp(), base));
            }
            at += total;
        }
        self.w
            .write_all(batches)
            .map_err(|e| CleanError::io(&self.cleaned_path, e))?;
        self.size += batches.len() as u64;
        Ok(())
    }

    /// Makes the file durable and marks it complete by renaming it to `.swap`.
    fn finish(self) -> Result<CleanedGroup, CleanError> {
        let path = self.cleaned_path.clone();
        let f = self
            .w
            .into_inner()
            .map_err(|e| CleanError::io(&path, e.into_error()))?;
        f.sync_all().map_err(|e| CleanError::io(&path, e))?;
        let swap_path = path.with_extension("swap");
        std::fs::rename(&path, &swap_path).map_err(|e| CleanError::io(&swap_path, e))?;
        let base_offset = self
            .members
            .first()
            .map(|m| m.0)
            .unwrap_or(self.next_offset);
        Ok(CleanedGroup {
            members: self.members,
            base_offset,
            next_offset: self.next_offset,
            swap_path,
            size: self.size,
            offset_index: self.offset_index,
            time_index: self.time_index,
            max_timestamp: self.max_timestamp,
            first_cleaned_ms: self.first_cleaned_ms.unwrap_or(0),
        })
    }
}

/// Removes every `.cleaned` and `.swap` file of the given groups (an abandoned pass).
pub fn discard(groups: &[CleanedGroup], dir: &Path) {
    for g in groups {
        let _ = std::fs::remove_file(&g.swap_path);
        let _ = std::fs::remove_file(dir.join(segment_file_name(g.base_offset, "cleaned")));
    }
}

/// The blocking core of one cleaning pass over `closed` (ascending, never the active segment).
/// Returns None when there is nothing dirty. On error, files it created are removed.
pub fn clean_log(
    dir: &Path,
    closed: &[SegmentSnapshot],
    cleaned_up_to: u64,
    s: &CleanerSettings,
    now_ms: i64,
    producer_last: &HashSet<u64>,
    first_cleaned: &BTreeMap<u64, i64>,
) -> Result<Option<CleanOutcome>, CleanError> {
    // Pass 1: key → latest offset over the dirty segments, as far as the map budget allows.
    let mut map = OffsetMap::default();
    let mut mapped_end = None;
    for seg in closed.iter().filter(|x| x.base_offset >= cleaned_up_to) {
        let mut rd = BatchReader::open(seg)?;
        // Bounded by the segment size: each batch advances the reader.
        while let Some((_, raw)) = rd.next_batch()? {
            map_batch(&raw, &mut map).map_err(|m| rd.malformed(&m))?;
        }
        mapped_end = Some(seg.next_offset);
        if map.bytes() > OFFSET_MAP_BYTES_MAX {
            break;
        }
    }
    let Some(mapped_end) = mapped_end else {
        return Ok(None);
    };

    // Pass 2: rewrite every segment below the end of the mapped range, grouping neighbours
    // whose original sizes fit in one segment (so tiny cleaned segments merge on later passes).
    let mut stats = CleanStats::default();
    let mut done: Vec<CleanedGroup> = Vec::new();
    let mut current: Option<GroupWriter> = None;
    let r = rewrite(
        dir,
        closed,
        mapped_end,
        &map,
        s,
        now_ms,
        producer_last,
        first_cleaned,
        &mut stats,
        &mut done,
        &mut current,
    );
    if let Err(e) = r {
        discard(&done, dir);
        if let Some(g) = current {
            let _ = std::fs::remove_file(&g.cleaned_path);
        }
        return Err(e);
    }
    stats.bytes_after = done.iter().map(|g| g.size).sum();
    stats.segments_after = done.len();
    Ok(Some(CleanOutcome {
        groups: done,
        cleaned_up_to: mapped_end,
        stats,
    }))
}

/// Pass 2 proper: see `clean_log`. Completed groups go to `done`; the one being written stays
/// in `current` so that the caller can remove it on error.
#[allow(clippy::too_many_arguments)]
fn rewrite(
    dir: &Path,
    closed: &[SegmentSnapshot],
    mapped_end: u64,
    map: &OffsetMap,
    s: &CleanerSettings,
    now_ms: i64,
    producer_last: &HashSet<u64>,
    first_cleaned: &BTreeMap<u64, i64>,
    stats: &mut CleanStats,
    done: &mut Vec<CleanedGroup>,
    current: &mut Option<GroupWriter>,
) -> Result<(), CleanError> {
    let mut out = Vec::new();
    for seg in closed.iter().filter(|x| x.base_offset < mapped_end) {
        stats.bytes_before += seg.size;
        stats.segments_before += 1;
        let fits = current
            .as_ref()
            .is_some_and(|g| g.in_bytes + seg.size <= s.segment_bytes);
        if !fits {
            if let Some(g) = current.take() {
                done.push(g.finish()?);
            }
            *current = Some(GroupWriter::create(dir, seg.base_offset)?);
        }
        let Some(g) = current.as_mut() else { continue };
        let seg_first_cleaned = first_cleaned.get(&seg.base_offset).copied();
        let until = tombstone_deadline(seg_first_cleaned, s.delete_retention_ms);
        // The group's first cleaning is its latest member's, so no tombstone leaves early.
        let member_first = seg_first_cleaned.unwrap_or(now_ms);
        g.first_cleaned_ms = Some(
            g.first_cleaned_ms
                .map_or(member_first, |t| t.max(member_first)),
        );
        let mut rd = BatchReader::open(seg)?;
        while let Some((_, raw)) = rd.next_batch()? {
            out.clear();
            clean_batch(&raw, map, until, now_ms, producer_last, &mut out, stats)
                .map_err(|m| rd.malformed(&m))?;
            g.write(&out)?;
        }
        g.members.push((seg.base_offset, seg.size));
        g.in_bytes += seg.size;
        g.next_offset = seg.next_offset;
    }
    if let Some(g) = current.take() {
        done.push(g.finish()?);
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CleanError::io(dir, e))
}

/// Recovery of leftovers of an interrupted pass: a `.cleaned` file may be incomplete and is
/// deleted; a `.swap` file is complete (fsync'd before its rename) and replaces its `.log`.
pub fn recover_leftovers(dir: &Path) -> std::io::Result<()> {
    let mut swaps = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".cleaned") {
            tracing::warn!("removing incomplete cleaner output {}", e.path().display());
            std::fs::remove_file(e.path())?;
        } else if name.ends_with(".swap") {
            swaps.push(e.path());
        }
    }
    for swap in &swaps {
        let log = swap.with_extension("log");
        tracing::warn!(
            "completing interrupted compaction swap {} -> {}",
            swap.display(),
            log.display()
        );
        // Stale indexes of the replaced segment must not be trusted by a later size match.
        let _ = std::fs::remove_file(log.with_extension("index"));
        let _ = std::fs::remove_file(log.with_extension("timeindex"));
        std::fs::rename(swap, &log)?;
    }
    if !swaps.is_empty() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl SharedLog {
    /// One cleaning pass when the dirty ratio calls for it. Appends continue meanwhile: only
    /// closed segments are read and replaced, and no borrow is held across an await.
    pub async fn compact(
        &self,
        s: &CleanerSettings,
        now: u64,
    ) -> Result<Option<CleanStats>, LogError> {
        let (dir, closed, cleaned_up_to) = {
            let log = self.inner.borrow();
            let active_base = log.segments.keys().next_back().copied().unwrap_or(0);
            let closed: Vec<SegmentSnapshot> = log
                .segments
                .values()
                .filter(|x| x.base_offset < active_base)
                .map(|x| SegmentSnapshot {
                    base_offset: x.base_offset,
                    next_offset: x.next_offset,
                    size: x.size,
                    path: x.path.clone(),
                })
                .collect();
            (log.dir.clone(), closed, log.cleaned_up_to.min(active_base))
        };
        let first_cleaned = self.inner.borrow().cleaner_first_cleaned.clone();
        let producer_last: HashSet<u64> = self
            .inner
            .borrow()
            .producers
            .values()
            .filter_map(|p| p.batches.back().map(|b| b.base_offset))
            .collect();
        let overdue = {
            let log = self.inner.borrow();
            let active_base = log.segments.keys().next_back().copied().unwrap_or(0);
            log.segments
                .range(cleaned_up_to..active_base)
                .next()
                .is_some_and(|(_, x)| {
                    (now as i64).saturating_sub(x.created_ms as i64) >= s.max_compaction_lag_ms
                })
        };
        if closed.is_empty()
            || (dirty_ratio(&closed, cleaned_up_to) < s.min_cleanable_dirty_ratio && !overdue)
        {
            return Ok(None);
        }
        let (s2, dir2, closed2) = (*s, dir.clone(), closed.clone());
        let outcome = glommio::executor()
            .spawn_blocking(move || {
                clean_log(
                    &dir2,
                    &closed2,
                    cleaned_up_to,
                    &s2,
                    now as i64,
                    &producer_last,
                    &first_cleaned,
                )
            })
            .await
            .map_err(|e| LogError::io(&dir, std::io::Error::other(e.to_string())))?;
        let Some(outcome) = outcome else {
            return Ok(None);
        };
        let mut applied = 0usize;
        let mut aborted = false;
        let groups = outcome.groups;
        // Bounded by the number of groups.
        for (i, g) in groups.iter().enumerate() {
            match self.swap_in(&dir, g).await {
                Ok(true) => {
                    applied += 1;
                    let mut log = self.inner.borrow_mut();
                    for (member, _) in &g.members {
                        log.cleaner_first_cleaned.remove(member);
                    }
                    log.cleaner_first_cleaned
                        .insert(g.base_offset, g.first_cleaned_ms);
                }
                Ok(false) => {
                    // The segments changed under us (DeleteRecords, topic deletion): give up
                    // this pass; the next one starts from a fresh snapshot.
                    discard(&groups[i..], &dir);
                    aborted = true;
                    break;
                }
                Err(e) => {
                    // Group i's `.swap` stays: its members may be half deleted already, and
                    // recovery completes a `.swap` at the next start.
                    discard(&groups[i + 1..], &dir);
                    return Err(e);
                }
            }
        }
        let new_indexes: Vec<(PathBuf, u64, Vec<(i64, i64)>, Vec<(i64, i64)>)> = {
            let mut log = self.inner.borrow_mut();
            if !aborted {
                log.cleaned_up_to = log.cleaned_up_to.max(outcome.cleaned_up_to);
            }
            log.max_timestamp = log
                .segments
                .values()
                .filter_map(|x| x.time_index.last().copied())
                .max_by_key(|(t, _)| *t)
                .unwrap_or((-1, 0));
            log.segments
                .values()
                .filter(|x| x.base_offset < outcome.cleaned_up_to)
                .map(|x| {
                    (
                        x.path.clone(),
                        x.size,
                        x.offset_index
                            .iter()
                            .map(|(o, p)| (*o as i64, *p as i64))
                            .collect(),
                        x.time_index.iter().map(|(t, o)| (*t, *o as i64)).collect(),
                    )
                })
                .collect()
        };
        let checkpoint = {
            let mut log = self.inner.borrow_mut();
            let log = &mut *log;
            let live = &log.segments;
            log.cleaner_first_cleaned
                .retain(|b, _| live.contains_key(b));
            let up_to = if aborted {
                log.cleaned_up_to
            } else {
                outcome.cleaned_up_to
            };
            (up_to, log.cleaner_first_cleaned.clone())
        };
        let dir2 = dir.clone();
        glommio::executor()
            .spawn_blocking(move || {
                if let Err(e) = std::fs::File::open(&dir2).and_then(|d| d.sync_all()) {
                    tracing::warn!("could not fsync {}: {e}", dir2.display());
                }
                for (path, size, oi, ti) in new_indexes {
                    if let Err(e) =
                        super::index::write_index(&path.with_extension("index"), size, &oi)
                            .and_then(|_| {
                                super::index::write_index(
                                    &path.with_extension("timeindex"),
                                    size,
                                    &ti,
                                )
                            })
                    {
                        tracing::warn!("could not write index of {}: {e}", path.display());
                    }
                }
                {
                    if let Err(e) = write_checkpoint(&dir2, checkpoint.0, &checkpoint.1) {
                        tracing::warn!(
                            "could not write cleaner checkpoint in {}: {e}",
                            dir2.display()
                        );
                    }
                }
            })
            .await;
        let mut stats = outcome.stats;
        if aborted || applied < stats.segments_after {
            stats.segments_after = applied;
        }
        Ok(Some(stats))
    }

    /// Replaces the members of `g` by its `.swap` file. Ok(false) when they are no longer the
    /// segments the pass read.
    async fn swap_in(&self, dir: &Path, g: &CleanedGroup) -> Result<bool, LogError> {
        // Open before the synchronous swap below; the descriptor follows the rename. Never
        // create: a vanished `.swap` means the partition directory was deleted meanwhile.
        let file = glommio::io::OpenOptions::new()
            .read(true)
            .write(true)
            .dma_open(&g.swap_path)
            .await
            .map_err(|e| super::glommio_io(&g.swap_path, e))?;
        let mut log = self.inner.borrow_mut();
        let log = &mut *log;
        let active_base = log.segments.keys().next_back().copied().unwrap_or(0);
        let unchanged = g
            .members
            .iter()
            .all(|(b, sz)| *b < active_base && log.segments.get(b).is_some_and(|x| x.size == *sz));
        if !unchanged {
            drop(file);
            return Ok(false);
        }
        let Some(first) = g.members.first().map(|m| m.0) else {
            return Ok(false);
        };
        let log_path = dir.join(segment_file_name(first, "log"));
        // Later members go first: if we crash before the rename, the `.swap` still exists and
        // recovery completes it.
        for (b, _) in g.members.iter().skip(1) {
            let p = dir.join(segment_file_name(*b, "log"));
            std::fs::remove_file(&p).map_err(|e| LogError::io(&p, e))?;
            let _ = std::fs::remove_file(p.with_extension("index"));
            let _ = std::fs::remove_file(p.with_extension("timeindex"));
        }
        let _ = std::fs::remove_file(log_path.with_extension("index"));
        let _ = std::fs::remove_file(log_path.with_extension("timeindex"));
        std::fs::rename(&g.swap_path, &log_path).map_err(|e| LogError::io(&log_path, e))?;
        let created_ms = log
            .segments
            .get(&first)
            .map(|x| x.created_ms)
            .unwrap_or_else(super::now_ms);
        for (b, _) in &g.members {
            // Readers holding the old Rc<DmaFile> keep reading the unlinked old file.
            log.segments.remove(b);
        }
        log.segments.insert(
            first,
            Segment {
                base_offset: first,
                next_offset: g.next_offset,
                size: g.size,
                file: Rc::new(file),
                path: log_path,
                offset_index: g.offset_index.clone(),
                time_index: g.time_index.clone(),
                max_timestamp: g.max_timestamp,
                created_ms,
                bytes_since_index: 0,
            },
        );
        // The cache must not serve records the cleaner removed.
        while log
            .cache
            .front()
            .is_some_and(|b| b.base_offset < g.next_offset)
        {
            if let Some(b) = log.cache.pop_front() {
                log.cache_bytes -= b.bytes.len();
            }
        }
        // The directory fsync is left to the caller's blocking task: until it happens, a crash
        // leaves either the `.swap` (recovery completes it) or the renamed `.log`.
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::records::{Compression, TimestampType};

    fn rec(offset: i64, key: Option<&str>, value: Option<&str>, ts: i64) -> Record {
        Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset,
            sequence: -1,
            timestamp: ts,
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
            headers: Default::default(),
        }
    }

    /// One batch of consecutive records starting at `base`: (key, value) pairs.
    fn batch(base: i64, kv: &[(Option<&str>, Option<&str>)], ts: i64, c: Compression) -> Vec<u8> {
        let recs: Vec<Record> = kv
            .iter()
            .enumerate()
            .map(|(i, (k, v))| {
                let mut r = rec(base + i as i64, *k, *v, ts + i as i64);
                // As a non-idempotent producer's batch decodes: sequence = -1 + delta.
                r.sequence = -1 + i as i32;
                r
            })
            .collect();
        let mut b = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut b,
            recs.iter(),
            &RecordEncodeOptions {
                version: 2,
                compression: c,
            },
        )
        .unwrap();
        b.to_vec()
    }

    fn decode_all(data: &[u8]) -> Vec<(i64, Option<String>, Option<String>)> {
        let mut buf = Bytes::copy_from_slice(data);
        let mut out = Vec::new();
        for set in RecordBatchDecoder::decode_all(&mut buf).unwrap() {
            for r in set.records {
                let s =
                    |b: &Option<Bytes>| b.as_ref().map(|x| String::from_utf8(x.to_vec()).unwrap());
                out.push((r.offset, s(&r.key), s(&r.value)));
            }
        }
        out
    }

    fn split(data: &[u8]) -> Vec<Bytes> {
        let mut v = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let n = BatchHeader::new(&data[at..]).total_bytes();
            v.push(Bytes::copy_from_slice(&data[at..at + n]));
            at += n;
        }
        v
    }

    const S: CleanerSettings = CleanerSettings {
        segment_bytes: 1 << 20,
        delete_retention_ms: 86_400_000,
        min_cleanable_dirty_ratio: 0.5,
        max_compaction_lag_ms: i64::MAX,
    };

    fn clean_bytes(data: &[u8], s: &CleanerSettings, now: i64) -> (Vec<u8>, CleanStats) {
        let mut map = OffsetMap::default();
        for b in split(data) {
            map_batch(&b, &mut map).unwrap();
        }
        let mut out = Vec::new();
        let mut stats = CleanStats::default();
        for b in split(data) {
            // As for a segment cleaned once already, at time 0.
            let until = tombstone_deadline(Some(0), s.delete_retention_ms);
            clean_batch(&b, &map, until, now, &HashSet::new(), &mut out, &mut stats).unwrap();
        }
        (out, stats)
    }

    #[test]
    fn tombstones_outlive_their_first_cleaning_by_delete_retention() {
        let data = batch(0, &[(Some("k"), None)], 1_000, Compression::None);
        let b = Bytes::from(data);
        let mut map = OffsetMap::default();
        map_batch(&b, &mut map).unwrap();
        let run = |first_cleaned: Option<i64>, now: i64| {
            let mut out = Vec::new();
            let mut stats = CleanStats::default();
            let until = tombstone_deadline(first_cleaned, 100);
            clean_batch(&b, &map, until, now, &HashSet::new(), &mut out, &mut stats).unwrap();
            stats.tombstones_dropped
        };
        // However old its timestamp, a tombstone survives the pass that first cleans it...
        assert_eq!(run(None, 1_000_000), 0);
        // ...and is dropped once delete.retention.ms has passed since then, not before.
        assert_eq!(run(Some(1_000_000), 1_000_099), 0);
        assert_eq!(run(Some(1_000_000), 1_000_100), 1);
    }

    #[test]
    fn compaction_keeps_an_idempotent_producers_last_batch() {
        // Producer 7's only batch holds key "a", superseded by a later non-idempotent record:
        // the batch stays whole, so a restart still knows producer 7's epoch and sequence.
        let mut recs: Vec<Record> = vec![rec(0, Some("a"), Some("old"), 10)];
        recs[0].producer_id = 7;
        recs[0].producer_epoch = 2;
        recs[0].sequence = 41;
        let mut first = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut first,
            recs.iter(),
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )
        .unwrap();
        let first = first.freeze();
        let second = Bytes::from(batch(1, &[(Some("a"), Some("new"))], 20, Compression::None));
        let mut map = OffsetMap::default();
        map_batch(&first, &mut map).unwrap();
        map_batch(&second, &mut map).unwrap();
        let mut stats = CleanStats::default();
        let mut out = Vec::new();
        clean_batch(
            &first,
            &map,
            None,
            30,
            &HashSet::new(),
            &mut out,
            &mut stats,
        )
        .unwrap();
        assert!(
            out.is_empty(),
            "without protection the superseded batch goes"
        );
        let protected: HashSet<u64> = [0u64].into_iter().collect();
        clean_batch(&first, &map, None, 30, &protected, &mut out, &mut stats).unwrap();
        assert_eq!(
            &out[..],
            &first[..],
            "the producer's last batch is kept byte for byte"
        );
    }

    #[test]
    fn keyless_records_are_found_across_batches_and_codecs() {
        let mut payload = batch(
            0,
            &[(Some("a"), Some("1")), (None, Some("2"))],
            1,
            Compression::None,
        );
        payload.extend(batch(
            2,
            &[(None, Some("3")), (Some("b"), None), (None, None)],
            1,
            Compression::Lz4,
        ));
        assert_eq!(
            keyless_records(&Bytes::from(payload)).unwrap(),
            vec![1, 2, 4]
        );
        let keyed = batch(0, &[(Some("a"), Some("1"))], 1, Compression::Gzip);
        assert!(keyless_records(&Bytes::from(keyed)).unwrap().is_empty());
        let mut corrupt = batch(0, &[(None, Some("1"))], 1, Compression::None);
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        assert!(keyless_records(&Bytes::from(corrupt)).is_err());
    }

    #[test]
    fn compaction_keeps_latest_per_key_with_offsets() {
        for c in [
            Compression::None,
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let mut data = batch(
                0,
                &[
                    (Some("a"), Some("a0")),
                    (Some("b"), Some("b0")),
                    (Some("a"), Some("a1")),
                ],
                1000,
                c,
            );
            data.extend(batch(
                3,
                &[
                    (Some("c"), Some("c0")),
                    (None, Some("nokey")),
                    (Some("b"), Some("b1")),
                ],
                2000,
                c,
            ));
            data.extend(batch(6, &[(Some("a"), Some("a2"))], 3000, c));
            let (out, stats) = clean_bytes(&data, &S, 10_000);
            let got = decode_all(&out);
            let want = vec![
                (3, Some("c".into()), Some("c0".into())),
                (5, Some("b".into()), Some("b1".into())),
                (6, Some("a".into()), Some("a2".into())),
            ];
            assert_eq!(got, want, "{c:?}");
            assert_eq!(stats.records_kept, 3);
            assert_eq!(stats.records_dropped, 4);
            // Batch structure: the first batch vanished, the second starts at its first kept
            // record and keeps the codec, the last is copied byte for byte.
            let batches = split(&out);
            assert_eq!(batches.len(), 2, "{c:?}");
            let h = BatchHeader::new(&batches[0]);
            assert_eq!(h.base_offset(), 3);
            assert_eq!(h.last_offset_delta(), 2);
            assert_eq!(h.records_count(), 2);
            assert_eq!(h.compression(), c as i16);
            assert_eq!(batch::crc_of(&batches[0]), h.crc());
            assert_eq!(&batches[1][..], &data[data.len() - batches[1].len()..]);
        }
    }

    #[test]
    fn compaction_tombstones_kept_until_delete_retention() {
        let mut data = batch(
            0,
            &[(Some("k"), Some("v0")), (Some("x"), Some("x0"))],
            1000,
            Compression::None,
        );
        data.extend(batch(2, &[(Some("k"), None)], 5000, Compression::None));
        // Young tombstone: kept, older value of its key dropped.
        let (out, stats) = clean_bytes(&data, &S, 6000);
        assert_eq!(
            decode_all(&out),
            vec![
                (1, Some("x".into()), Some("x0".into())),
                (2, Some("k".into()), None)
            ]
        );
        assert_eq!(stats.tombstones_dropped, 0);
        // Past delete.retention.ms after its timestamp: dropped too.
        let s = CleanerSettings {
            delete_retention_ms: 100,
            ..S
        };
        let (out, stats) = clean_bytes(&data, &s, 5100);
        assert_eq!(
            decode_all(&out),
            vec![(1, Some("x".into()), Some("x0".into()))]
        );
        assert_eq!(stats.tombstones_dropped, 1);
        // A value written after the tombstone supersedes it.
        data.extend(batch(
            3,
            &[(Some("k"), Some("v1"))],
            7000,
            Compression::None,
        ));
        let (out, _) = clean_bytes(&data, &S, 8000);
        assert_eq!(
            decode_all(&out),
            vec![
                (1, Some("x".into()), Some("x0".into())),
                (3, Some("k".into()), Some("v1".into()))
            ]
        );
    }

    #[test]
    fn compaction_log_append_time_flag_survives_rewrite() {
        let mut b = batch(
            0,
            &[
                (Some("a"), Some("1")),
                (Some("a"), Some("2")),
                (Some("b"), Some("3")),
            ],
            10,
            Compression::None,
        );
        batch::set_log_append_time(&mut b, 777);
        let (out, _) = clean_bytes(&b, &S, 1000);
        let h = BatchHeader::new(&out);
        assert!(h.is_log_append_time());
        assert_eq!(h.max_timestamp(), 777);
        assert_eq!(h.base_offset(), 1);
        assert_eq!(batch::crc_of(&out), h.crc());
    }

    fn write_segment(dir: &Path, base: u64, batches: &[Vec<u8>]) -> SegmentSnapshot {
        let path = dir.join(segment_file_name(base, "log"));
        let all: Vec<u8> = batches.concat();
        std::fs::write(&path, &all).unwrap();
        let mut next = base;
        for b in split(&all) {
            let h = BatchHeader::new(&b);
            next = h.base_offset() as u64 + h.last_offset_delta() as u64 + 1;
        }
        SegmentSnapshot {
            base_offset: base,
            next_offset: next,
            size: all.len() as u64,
            path,
        }
    }

    #[test]
    fn compaction_clean_log_groups_swaps_and_recovers() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        // Four closed segments of 3 updates each over keys k0..k2, then an active one.
        let mut closed = Vec::new();
        for seg in 0..4u64 {
            let base = seg * 3;
            let kv: Vec<(String, String)> = (0..3)
                .map(|i| (format!("k{i}"), format!("v{}", base + i)))
                .collect();
            let kv: Vec<(Option<&str>, Option<&str>)> = kv
                .iter()
                .map(|(k, v)| (Some(k.as_str()), Some(v.as_str())))
                .collect();
            closed.push(write_segment(
                dir,
                base,
                &[batch(base as i64, &kv, 1000, Compression::Lz4)],
            ));
        }
        let active = write_segment(
            dir,
            12,
            &[batch(
                12,
                &[(Some("k0"), Some("v12"))],
                1000,
                Compression::None,
            )],
        );
        assert_eq!(dirty_ratio(&closed, 0), 1.0);
        let s = CleanerSettings {
            segment_bytes: 10_000,
            ..S
        };
        let out = clean_log(dir, &closed, 0, &s, 2000, &HashSet::new(), &BTreeMap::new())
            .unwrap()
            .unwrap();
        assert_eq!(out.cleaned_up_to, 12);
        assert_eq!(out.groups.len(), 1, "small segments merge into one");
        let g = &out.groups[0];
        assert_eq!(g.members.len(), 4);
        assert_eq!((g.base_offset, g.next_offset), (0, 12));
        assert!(g.swap_path.exists());
        assert_eq!(out.stats.records_kept, 3);
        assert!(out.stats.bytes_after < out.stats.bytes_before);
        assert_eq!(dirty_ratio(&closed, 12), 0.0);
        // A crash now: recovery completes the swap, the overlapping old segments go, and the
        // log reads back the latest value per key with original offsets, then the active one.
        std::fs::write(dir.join(segment_file_name(99, "cleaned")), b"partial").unwrap();
        let r = crate::log::recovery::recover(dir).unwrap();
        assert!(!dir.join(segment_file_name(99, "cleaned")).exists());
        assert!(!g.swap_path.exists());
        let bases: Vec<u64> = r.segments.iter().map(|x| x.base_offset).collect();
        assert_eq!(bases, vec![0, 12]);
        let data = std::fs::read(&r.segments[0].path).unwrap();
        assert_eq!(
            decode_all(&data),
            vec![
                (9, Some("k0".into()), Some("v9".into())),
                (10, Some("k1".into()), Some("v10".into())),
                (11, Some("k2".into()), Some("v11".into())),
            ]
        );
        assert_eq!(r.segments[0].next_offset, 12);
        assert_eq!(r.segments[1].size, active.size);
    }

    #[test]
    fn compaction_clean_section_dedups_against_dirty_keys() {
        // A clean section (below cleaned_up_to) is deduplicated against the dirty keys only.
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let s0 = write_segment(
            dir,
            0,
            &[batch(
                0,
                &[(Some("a"), Some("a0")), (Some("b"), Some("b0"))],
                1,
                Compression::None,
            )],
        );
        let s1 = write_segment(
            dir,
            2,
            &[batch(2, &[(Some("a"), Some("a2"))], 1, Compression::None)],
        );
        let s = CleanerSettings {
            segment_bytes: 1,
            ..S
        };
        let out = clean_log(dir, &[s0, s1], 2, &s, 10, &HashSet::new(), &BTreeMap::new())
            .unwrap()
            .unwrap();
        assert_eq!(out.groups.len(), 2, "segment_bytes too small to merge");
        let g0 = std::fs::read(&out.groups[0].swap_path).unwrap();
        assert_eq!(
            decode_all(&g0),
            vec![(1, Some("b".into()), Some("b0".into()))]
        );
        let g1 = std::fs::read(&out.groups[1].swap_path).unwrap();
        assert_eq!(
            decode_all(&g1),
            vec![(2, Some("a".into()), Some("a2".into()))]
        );
        discard(&out.groups, dir);
        assert!(!out.groups[0].swap_path.exists());
    }
}

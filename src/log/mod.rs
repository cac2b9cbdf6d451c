//! The partition log: segment files, sparse indexes, recovery, append, read, retention.
//!
//! Owns the files of one partition directory and nothing else. Never touches the network or
//! another shard's partitions. Appends go through glommio DMA files: the partially filled tail
//! block is kept in memory and rewritten (aligned) with the next append. Writes are serialized
//! by the caller (one writer per partition).
//!
//! Failure model (the README's storage section says it for users; `tests/power_loss.rs` checks
//! it through `storage::sim`):
//! - `flushed_offset` is the synced end and the only end readers are given; it moves only after
//!   an fdatasync that covered it succeeded while the partition was not fenced.
//! - A failed write (ENOSPC, EIO, short) fails the batches of its round, cuts the file back to
//!   the logical end and hands the same offsets out again; a failed fdatasync fences the
//!   partition until restart (never retried: the kernel reports a writeback error once).
//! - Durable order: a closed segment is synced before the next is created; new directory
//!   entries are synced before anything in them is acknowledged; the log start offset and the
//!   recovery point are replaced atomically (`storage::write_file_durably`).
//! - Recovery (`recovery.rs`) truncates only a torn tail past the recovery point and quarantines
//!   damage anywhere else; it never deletes data that was synced.

pub mod batch;
pub mod compaction;
pub mod dma_bytes;
pub mod epochs;
pub mod index;
pub mod read_ahead;
pub mod recovery;
pub mod storage;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use glommio::io::{DmaFile, OpenOptions};

use batch::{BatchHeader, BatchInfo, HEADER_BYTES};

/// Alignment used for every DMA write: a multiple of any logical block size we meet.
pub const DMA_ALIGN: u64 = 4096;
/// The header bytes the broker rewrites when serving a batch (baseOffset, batchLength,
/// partitionLeaderEpoch); they lie before the CRC'd range.
const PATCHED_PREFIX_BYTES: usize = 16;
/// One index entry per this many bytes appended.
pub const INDEX_INTERVAL_BYTES: u64 = 4096;

/// Which leader epoch an appended batch carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochStamp {
    /// The leader's own epoch: a produce on the leader.
    Leader(i32),
    /// The one in the batch: a follower appends what its leader stamped.
    AsSent,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("offset {offset} out of range [{start}, {end}]")]
    OffsetOutOfRange { offset: i64, start: u64, end: u64 },
}

impl LogError {
    pub fn io(path: &Path, source: impl Into<std::io::Error>) -> Self {
        LogError::Io {
            path: path.display().to_string(),
            source: source.into(),
        }
    }
}

fn glommio_io(path: &Path, e: glommio::GlommioError<()>) -> LogError {
    LogError::io(path, std::io::Error::other(e.to_string()))
}

pub fn segment_file_name(base_offset: u64, ext: &str) -> String {
    format!("{base_offset:020}.{ext}")
}

/// Settings the log needs on each append; resolved from topic config by the caller.
#[derive(Debug, Clone, Copy)]
pub struct LogSettings {
    pub segment_bytes: u64,
    pub segment_ms: u64,
    pub retention_ms: i64,
    pub retention_bytes: i64,
    pub cache_bytes_max: usize,
    /// Delay of the background sync after a write (see `tuning` log.visibility_sync_delay_us).
    pub visibility_sync_delay_us: u64,
}

pub struct Segment {
    pub base_offset: u64,
    /// One past the last offset stored in this segment.
    pub next_offset: u64,
    /// Logical bytes (the file may hold zero padding past this while it is active).
    pub size: u64,
    pub file: Rc<DmaFile>,
    pub path: PathBuf,
    /// Sparse (first offset of a batch, file position), ascending.
    pub offset_index: Vec<(u64, u64)>,
    /// Sparse (max timestamp so far, first offset of the batch that raised it), ascending.
    pub time_index: Vec<(i64, u64)>,
    pub max_timestamp: i64,
    pub created_ms: u64,
    bytes_since_index: u64,
}

impl Segment {
    /// A new, empty active segment starting at `base`.
    fn empty(base: u64, file: DmaFile, path: PathBuf, now_ms: u64) -> Segment {
        Segment {
            base_offset: base,
            next_offset: base,
            size: 0,
            file: Rc::new(file),
            path,
            offset_index: Vec::new(),
            time_index: Vec::new(),
            max_timestamp: -1,
            created_ms: now_ms,
            bytes_since_index: 0,
        }
    }

    fn note_batch(&mut self, base_offset: u64, pos: u64, len: u64, max_ts: i64) {
        if self.offset_index.is_empty() || self.bytes_since_index >= INDEX_INTERVAL_BYTES {
            self.offset_index.push((base_offset, pos));
            self.bytes_since_index = 0;
        }
        self.bytes_since_index += len;
        if max_ts > self.max_timestamp {
            self.max_timestamp = max_ts;
            self.time_index.push((max_ts, base_offset));
        }
    }

    fn position_for(&self, offset: u64) -> u64 {
        match self.offset_index.partition_point(|(o, _)| *o <= offset) {
            0 => 0,
            i => self.offset_index[i - 1].1,
        }
    }

    /// A job that writes this segment's index files (run off the reactor).
    fn index_writer(&self) -> impl FnOnce() -> std::io::Result<()> + Send + 'static {
        let oi: Vec<(i64, i64)> = self
            .offset_index
            .iter()
            .map(|(o, p)| (*o as i64, *p as i64))
            .collect();
        let ti: Vec<(i64, i64)> = self
            .time_index
            .iter()
            .map(|(t, o)| (*t, *o as i64))
            .collect();
        let (path, size) = (self.path.clone(), self.size);
        move || {
            index::write_index(&path.with_extension("index"), size, &oi)?;
            index::write_index(&path.with_extension("timeindex"), size, &ti)
        }
    }
}

/// One of a producer's recent batches on this partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerBatch {
    pub first_seq: i32,
    pub last_seq: i32,
    pub base_offset: u64,
    pub last_offset: u64,
}

/// Producer idempotence state of one producer id on this partition.
#[derive(Debug, Clone, Default)]
pub struct ProducerEntry {
    pub epoch: i16,
    /// Last few batches, newest last. Kafka keeps 5.
    pub batches: VecDeque<ProducerBatch>,
}

pub const PRODUCER_BATCHES_KEPT: usize = 5;

impl ProducerEntry {
    pub fn record(&mut self, epoch: i16, batch: ProducerBatch) {
        if epoch != self.epoch {
            self.epoch = epoch;
            self.batches.clear();
        }
        if self.batches.len() == PRODUCER_BATCHES_KEPT {
            self.batches.pop_front();
        }
        self.batches.push_back(batch);
    }
}

/// A damaged closed segment found by recovery, renamed aside; its readable prefix stays in the
/// log and the offsets past it are a gap.
#[derive(Debug, Clone)]
pub struct QuarantinedSegment {
    /// The renamed file, kept for the operator.
    pub path: PathBuf,
    /// Byte position of the first damaged batch.
    pub damaged_at_byte: u64,
    /// First offset no longer served (the end of the readable prefix).
    pub gap_from_offset: u64,
    /// First offset served again (the next segment's base, or the old log end).
    pub gap_to_offset: u64,
}

pub struct Log {
    pub dir: PathBuf,
    pub segments: BTreeMap<u64, Segment>,
    /// Bytes of the active segment's last partial DMA block, to be rewritten with the next append.
    tail: Vec<u8>,
    pub log_start_offset: u64,
    pub log_end_offset: u64,
    /// Offsets below this are fdatasync'd: the end consumers may read (a power cut keeps it).
    flushed_offset: u64,
    /// Set when a write or fdatasync failed in a way that leaves the file's state unknown: the
    /// partition refuses writes until restart and serves only what was synced. An fsync is
    /// never retried (after a failed fdatasync the kernel may have dropped the dirty pages, and
    /// a retry would report success for data that is gone).
    fenced: Option<String>,
    /// Segments recovery found damaged and set aside.
    pub quarantined: Vec<QuarantinedSegment>,
    /// Recent batches, newest last, for tail reads without disk I/O.
    cache: VecDeque<batch::StoredBatch>,
    cache_bytes: usize,
    pub producers: std::collections::HashMap<i64, ProducerEntry>,
    /// Max timestamp over the log, with the first offset of the batch holding it.
    pub max_timestamp: (i64, u64),
    /// Offsets below this were compacted (cleanup.policy=compact); the rest is dirty.
    pub cleaned_up_to: u64,
    /// Closed segments the cleaner rewrote: base offset → when first cleaned (tombstones in
    /// them go delete.retention.ms after that).
    pub cleaner_first_cleaned: BTreeMap<u64, i64>,
    /// The first offset each leader epoch wrote (rebuilt from the batches at every open).
    epochs: epochs::EpochCache,
    /// The next offset to assign: log_end_offset plus what is queued but not yet written.
    pub next_offset: u64,
    /// Patched batches queued for the next DMA write, and what they are.
    pending: Vec<u8>,
    pending_batches: Vec<PendingBatch>,
}

/// A batch accepted (offsets assigned) but not yet written.
struct PendingBatch {
    base: u64,
    last: u64,
    /// Position within `Log::pending`.
    pos: usize,
    len: usize,
    max_ts: i64,
    producer_id: i64,
    /// The epoch stamped in its header.
    epoch: i32,
    /// What the cache will hold once written: the producer's bytes (or a patched copy).
    cache: Bytes,
}

/// A partition log shared by the tasks of one shard.
pub struct SharedLog {
    pub inner: RefCell<Log>,
    syncing: Cell<bool>,
    sync_waiters: RefCell<Vec<futures::channel::oneshot::Sender<()>>>,
    /// A flusher task is writing queued batches.
    pub flushing: Cell<bool>,
    /// Segment files are being removed (retention, DeleteRecords, a follower following its
    /// leader's log start): a truncation waits for it, so that no file it reopens vanishes.
    pub removing: Cell<bool>,
    /// (offset, waiter): answered once everything below offset is written (or failed).
    write_waiters: RefCell<Vec<(u64, futures::channel::oneshot::Sender<Result<(), String>>)>>,
    /// The sequential reader's window and the read ahead of it.
    read_ahead: read_ahead::ReadAhead,
}

async fn open_dma_rw(path: &Path) -> Result<DmaFile, LogError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .dma_open(path)
        .await
        .map_err(|e| glommio_io(path, e))
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl SharedLog {
    /// Opens (recovering if needed) the log in `dir`, creating it when absent. Recovery runs
    /// off the reactor; what it keeps is made durable before the log is used: the directory and
    /// the active segment are synced, so that the recovered end really is the synced end.
    pub async fn open(dir: PathBuf) -> Result<SharedLog, LogError> {
        let rec = {
            let d = dir.clone();
            storage::off_reactor(move || -> std::io::Result<recovery::Recovered> {
                storage::create_dir_durably_blocking(&d)?;
                recovery::recover(&d)
            })
            .await
            .map_err(|e| LogError::io(&dir, e))?
        };
        let mut segments = BTreeMap::new();
        let mut tail = Vec::new();
        let n = rec.segments.len();
        for (i, s) in rec.segments.into_iter().enumerate() {
            let file = open_dma_rw(&s.path).await?;
            if i + 1 == n {
                tail = s.tail;
            }
            segments.insert(
                s.base_offset,
                Segment {
                    base_offset: s.base_offset,
                    next_offset: s.next_offset,
                    size: s.size,
                    file: Rc::new(file),
                    path: s.path,
                    offset_index: s.offset_index,
                    time_index: s.time_index,
                    max_timestamp: s.max_timestamp,
                    created_ms: s.created_ms,
                    bytes_since_index: 0,
                },
            );
        }
        let log_end_offset = segments
            .values()
            .next_back()
            .map(|s| s.next_offset)
            .unwrap_or(0);
        let mut log_start_offset = rec
            .log_start_offset
            .max(segments.keys().next().copied().unwrap_or(0));
        if log_start_offset > log_end_offset {
            log_start_offset = log_end_offset;
        }
        if segments.is_empty() {
            let base = log_start_offset;
            let path = dir.join(segment_file_name(base, "log"));
            let file = open_dma_rw(&path).await?;
            segments.insert(base, Segment::empty(base, file, path, now_ms()));
        }
        // What lies past the recovery point may be in the page cache only (a killed process,
        // perhaps in the middle of a roll, before the closed segment was synced): sync it before
        // anything below its end is served or acknowledged again. After a clean stop the
        // recovery point already covers it, and a start with many partitions skips the sync.
        for seg in segments
            .values()
            .filter(|s| s.next_offset > rec.recovery_point)
        {
            storage::fdatasync(&seg.file, &seg.path)
                .await
                .map_err(|e| LogError::io(&seg.path, e))?;
        }
        storage::sync_dir(&dir)
            .await
            .map_err(|e| LogError::io(&dir, e))?;
        let max_timestamp = segments
            .values()
            .filter_map(|s| s.time_index.last().copied())
            .max_by_key(|(t, _)| *t)
            .unwrap_or((-1, 0));
        let (cleaned_up_to, cleaner_first_cleaned) = compaction::read_checkpoint(&dir);
        Ok(SharedLog {
            inner: RefCell::new(Log {
                dir,
                segments,
                tail,
                log_start_offset,
                log_end_offset,
                flushed_offset: log_end_offset,
                fenced: None,
                quarantined: rec.quarantined,
                cache: VecDeque::new(),
                cache_bytes: 0,
                producers: rec.producers,
                max_timestamp,
                cleaned_up_to,
                cleaner_first_cleaned,
                next_offset: log_end_offset,
                epochs: {
                    let mut e = rec.epochs;
                    e.truncate_from_end(log_end_offset);
                    e.truncate_from_start(log_start_offset);
                    e
                },
                pending: Vec::new(),
                pending_batches: Vec::new(),
            }),
            syncing: Cell::new(false),
            sync_waiters: RefCell::new(Vec::new()),
            flushing: Cell::new(false),
            removing: Cell::new(false),
            write_waiters: RefCell::new(Vec::new()),
            read_ahead: read_ahead::ReadAhead::default(),
        })
    }

    /// The end of what is on stable storage: the high watermark of a single replica.
    pub fn synced_end(&self) -> u64 {
        self.inner.borrow().flushed_offset
    }

    /// Why the partition refuses writes, if it does (see `Log::fenced`).
    pub fn fenced(&self) -> Option<String> {
        self.inner.borrow().fenced.clone()
    }

    /// Stops all writes to this log object for good (a replica closed to be truncated and
    /// reopened): nothing queued or arriving later is written, so no segment is created
    /// while the files are cut.
    pub fn retire(&self, reason: &str) {
        {
            let mut log = self.inner.borrow_mut();
            if log.fenced.is_none() {
                log.fenced = Some(reason.to_string());
            }
        }
        self.fail_pending(reason);
    }

    /// Stops all writes until restart, answering everything queued or waiting with `reason`.
    fn fence(&self, reason: &str) {
        {
            let mut log = self.inner.borrow_mut();
            if log.fenced.is_none() {
                tracing::error!(
                    "partition {} fenced until restart: {reason}",
                    log.dir.display()
                );
                log.fenced = Some(reason.to_string());
            }
        }
        self.fail_pending(reason);
        for w in self.sync_waiters.borrow_mut().drain(..) {
            let _ = w.send(());
        }
    }

    pub fn log_end_offset(&self) -> u64 {
        self.inner.borrow().log_end_offset
    }

    /// The epoch of the last batch written (-1 for none): a follower's LastFetchedEpoch.
    pub fn latest_epoch(&self) -> i32 {
        self.inner.borrow().epochs.latest()
    }

    /// The epoch of the batch holding `offset` (-1 when unknown).
    pub fn epoch_at(&self, offset: u64) -> i32 {
        self.inner.borrow().epochs.epoch_at(offset)
    }

    /// Runs `f` with the epoch cache and the log end.
    pub fn with_epochs<R>(&self, f: impl FnOnce(&epochs::EpochCache, u64) -> R) -> R {
        let log = self.inner.borrow();
        f(&log.epochs, log.log_end_offset)
    }

    /// Where leader epoch `requested` ends in this log (OffsetForLeaderEpoch, a follower's
    /// divergence check); `leading` is the epoch this replica leads in, if it does.
    pub fn end_offset_for_epoch(
        &self,
        requested: i32,
        leading: Option<i32>,
    ) -> Option<epochs::EpochEnd> {
        let log = self.inner.borrow();
        log.epochs
            .end_offset_for(requested, log.log_end_offset, leading)
    }
    pub fn log_start_offset(&self) -> u64 {
        self.inner.borrow().log_start_offset
    }

    /// Rolls to a new segment when the active one is full or old. Caller holds the write lock.
    async fn maybe_roll(&self, incoming: u64, s: &LogSettings, now: u64) -> Result<(), LogError> {
        let (roll, old_file, old_path) = {
            let log = self.inner.borrow();
            let Some(active) = log.segments.values().next_back() else {
                return Ok(());
            };
            let full = active.size > 0 && active.size + incoming > s.segment_bytes;
            let old = active.size > 0 && now.saturating_sub(active.created_ms) >= s.segment_ms;
            (full || old, active.file.clone(), active.path.clone())
        };
        if !roll {
            return Ok(());
        }
        // Close the old segment: drop its zero padding, make it durable, persist its indexes.
        let (size, index_job) = {
            let log = self.inner.borrow();
            let active = log.segments.values().next_back().expect("active segment");
            (active.size, active.index_writer())
        };
        old_file
            .truncate(size)
            .await
            .map_err(|e| glommio_io(&old_path, e))?;
        if let Err(e) = storage::fdatasync(&old_file, &old_path).await {
            let e = LogError::io(&old_path, e);
            self.fence(&format!("fdatasync failed: {e}"));
            return Err(e);
        }
        // Another sync of this segment failed meanwhile: the kernel reports a lost writeback
        // once, so this sync's success proves nothing, and no recovery point may vouch for
        // the segment.
        if let Some(reason) = self.fenced() {
            return Err(LogError::io(&old_path, std::io::Error::other(reason)));
        }
        // Indexes carry a CRC and the segment size; a stale or torn one is rebuilt by recovery,
        // so they need no fsync ordering of their own.
        if let Err(e) = storage::off_reactor(index_job).await {
            tracing::warn!("could not write index of {}: {e}", old_path.display());
        }
        let base = self.inner.borrow().log_end_offset;
        let dir = self.inner.borrow().dir.clone();
        let path = dir.join(segment_file_name(base, "log"));
        // A deleted topic's writer may still be finishing its queue: glommio cannot open a file
        // in a directory that is gone (it panics on the missing file system), so refuse first.
        if !dir.is_dir() {
            return Err(LogError::io(
                &dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "partition directory was removed",
                ),
            ));
        }
        let file = open_dma_rw(&path).await?;
        // The new file's directory entry must survive a crash before anything in it is acked;
        // then every segment below `base` is closed and synced: the new recovery point.
        storage::sync_dir(&dir)
            .await
            .map_err(|e| LogError::io(&dir, e))?;
        if let Some(reason) = self.fenced() {
            return Err(LogError::io(&dir, std::io::Error::other(reason)));
        }
        recovery::write_recovery_point(&dir, base)
            .await
            .map_err(|e| LogError::io(&dir, e))?;
        let mut log = self.inner.borrow_mut();
        if log.fenced.is_none() {
            let flushed = log.log_end_offset;
            log.flushed_offset = log.flushed_offset.max(flushed);
        }
        log.tail.clear();
        log.segments
            .insert(base, Segment::empty(base, file, path, now));
        Ok(())
    }

    /// Queues validated batches (`payload` as the producer sent them, `infos` from
    /// validation) for the next write: assigns their offsets and patches a copy of their headers
    /// now, so that queue order is offset order. Returns (base offset, end offset). The batches
    /// become readable when a flush round has written them.
    pub fn enqueue(
        &self,
        payload: &Bytes,
        infos: &[BatchInfo],
        stamp: EpochStamp,
        log_append_time_ms: Option<i64>,
    ) -> (u64, u64) {
        let mut log = self.inner.borrow_mut();
        let log = &mut *log;
        let base = log.next_offset;
        let start = log.pending.len();
        log.pending.extend_from_slice(payload);
        let mut next = base;
        let mut first_base = None;
        for info in infos {
            let at = start + info.pos;
            if stamp == EpochStamp::AsSent {
                // A follower keeps its leader's offsets, gaps a compacted leader has included.
                let sent = u64::from_be_bytes(log.pending[at..at + 8].try_into().unwrap_or([0; 8]));
                next = next.max(sent);
            }
            first_base.get_or_insert(next);
            let last = next + info.last_offset_delta as u64;
            let b = &mut log.pending[at..at + info.len];
            let epoch = match stamp {
                EpochStamp::Leader(e) => e,
                EpochStamp::AsSent => info.leader_epoch,
            };
            batch::patch_header(b, next as i64, epoch);
            let cache = match log_append_time_ms {
                Some(t) => {
                    batch::set_log_append_time(b, t);
                    Bytes::copy_from_slice(b)
                }
                None => payload.slice(info.pos..info.pos + info.len),
            };
            log.pending_batches.push(PendingBatch {
                base: next,
                last,
                pos: at,
                len: info.len,
                max_ts: log_append_time_ms.unwrap_or(info.max_timestamp),
                producer_id: info.producer_id,
                epoch,
                cache,
            });
            next = last + 1;
        }
        log.next_offset = next;
        (first_base.unwrap_or(base), next)
    }

    /// Queues and writes at once: for a single writer (benches, tests, internal topics).
    pub async fn append(
        &self,
        payload: &Bytes,
        infos: &[BatchInfo],
        s: &LogSettings,
        stamp: EpochStamp,
        log_append_time_ms: Option<i64>,
    ) -> Result<u64, LogError> {
        let (base, _) = self.enqueue(payload, infos, stamp, log_append_time_ms);
        self.flush_round(s).await?;
        Ok(base)
    }

    /// Bytes the batch cache holds (for metrics).
    pub fn cache_bytes(&self) -> usize {
        self.inner.borrow().cache_bytes
    }

    /// Gives back the read-ahead of a reader that has not read for `idle` (see
    /// `ReadAhead::drop_if_idle`).
    pub fn drop_idle_read_ahead(&self, idle: std::time::Duration) {
        self.read_ahead.drop_if_idle(idle);
    }

    /// Drops the oldest cached batches beyond `max` bytes (the newest one always stays).
    pub fn trim_cache(&self, max: usize) {
        let mut log = self.inner.borrow_mut();
        while log.cache_bytes > max && log.cache.len() > 1 {
            if let Some(b) = log.cache.pop_front() {
                log.cache_bytes -= b.bytes.len();
            }
        }
    }

    pub fn is_syncing(&self) -> bool {
        self.syncing.get()
    }

    /// A receiver answered once every offset below `end` is written, or the write failed.
    pub fn wait_written(
        &self,
        end: u64,
    ) -> futures::channel::oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = futures::channel::oneshot::channel();
        if self.inner.borrow().log_end_offset >= end {
            let _ = tx.send(Ok(()));
        } else {
            self.write_waiters.borrow_mut().push((end, tx));
        }
        rx
    }

    /// Writes what is queued, up to the end of the active segment, in one DMA write (rewriting
    /// the partial tail block), then makes it readable. Returns false when nothing was queued.
    /// One writer at a time: the caller holds `flushing` and calls again while this returns true.
    pub async fn flush_round(&self, s: &LogSettings) -> Result<bool, LogError> {
        let first = self.inner.borrow().pending_batches.first().map(|b| b.len);
        let Some(first) = first else {
            return Ok(false);
        };
        if let Some(reason) = self.fenced() {
            self.fail_pending(&reason);
            let dir = self.inner.borrow().dir.clone();
            return Err(LogError::io(&dir, std::io::Error::other(reason)));
        }
        if let Err(e) = self.maybe_roll(first as u64, s, now_ms()).await {
            self.fail_pending(&e.to_string());
            return Err(e);
        }
        // A sync that failed while the roll ran has fenced the partition and failed the queue.
        if let Some(reason) = self.fenced() {
            self.fail_pending(&reason);
            let dir = self.inner.borrow().dir.clone();
            return Err(LogError::io(&dir, std::io::Error::other(reason)));
        }
        if self.inner.borrow().pending_batches.is_empty() {
            return Ok(false);
        }
        let (file, path, write_pos, buf, pending, batches, new_tail) = {
            let mut log = self.inner.borrow_mut();
            let log = &mut *log;
            // Take the batches that fit in the active segment (at least one): a segment never
            // grows far past segment.bytes however much was queued.
            let active_size = log
                .segments
                .values()
                .next_back()
                .map(|a| a.size)
                .unwrap_or(0);
            let room = s.segment_bytes.saturating_sub(active_size) as usize;
            let mut take = 0usize;
            let mut bytes_taken = 0usize;
            for b in &log.pending_batches {
                if take > 0 && bytes_taken + b.len > room {
                    break;
                }
                take += 1;
                bytes_taken += b.len;
            }
            let (pending, batches) = if take == log.pending_batches.len() {
                (
                    std::mem::take(&mut log.pending),
                    std::mem::take(&mut log.pending_batches),
                )
            } else {
                let rest_bytes = log.pending.split_off(bytes_taken);
                let rest_batches = log.pending_batches.split_off(take);
                let taken = (
                    std::mem::replace(&mut log.pending, rest_bytes),
                    std::mem::replace(&mut log.pending_batches, rest_batches),
                );
                for b in log.pending_batches.iter_mut() {
                    b.pos -= bytes_taken;
                }
                taken
            };
            let active = log
                .segments
                .values()
                .next_back()
                .expect("log always has an active segment");
            let tail_len = log.tail.len();
            debug_assert_eq!(active.size % DMA_ALIGN, tail_len as u64);
            // A follower copies a compacted leader's gaps: a batch may start past the end.
            debug_assert!(batches
                .first()
                .is_some_and(|b| b.base >= log.log_end_offset));
            let write_pos = active.size - tail_len as u64;
            let total = tail_len + pending.len();
            let buf_len = total.div_ceil(DMA_ALIGN as usize) * DMA_ALIGN as usize;
            let mut buf = active.file.alloc_dma_buffer(buf_len);
            let bytes = buf.as_bytes_mut();
            bytes[..tail_len].copy_from_slice(&log.tail);
            bytes[tail_len..total].copy_from_slice(&pending);
            bytes[total..].fill(0);
            let new_tail_len = total % DMA_ALIGN as usize;
            let new_tail = bytes[total - new_tail_len..total].to_vec();
            (
                active.file.clone(),
                active.path.clone(),
                write_pos,
                buf,
                pending,
                batches,
                new_tail,
            )
        };
        let buf_len = buf.len();
        let result = match storage::fault(storage::Op::Write, &path) {
            Err(e) => Err(LogError::io(&path, e)),
            Ok(()) => match file.write_at(buf, write_pos).await {
                Ok(n) if n == buf_len => {
                    crate::metrics::dma_written(n);
                    Ok(n)
                }
                Ok(_) => Err(LogError::io(
                    &path,
                    std::io::Error::other("short DMA write"),
                )),
                Err(e) => Err(glommio_io(&path, e)),
            },
        };
        let written = match result {
            Ok(n) => n,
            Err(e) => {
                self.fail_batches(&batches, &e.to_string());
                // Part of the failed write may have reached the file: cut it back to the
                // logical end so that the offsets handed out again never sit beside stale
                // batches a restart could pick up. If even that fails, the file's state is
                // unknown and the partition is fenced.
                let logical_end = write_pos + self.inner.borrow().tail.len() as u64;
                if let Err(t) = file.truncate(logical_end).await {
                    self.fence(&format!("write failed ({e}) and truncate failed ({t})"));
                }
                return Err(e);
            }
        };
        debug_assert_eq!(written, buf_len);
        let epochs_before = self.inner.borrow().epochs.entries().len();
        let end = {
            let mut log = self.inner.borrow_mut();
            let log = &mut *log;
            log.tail = new_tail;
            let cache_max = s.cache_bytes_max;
            let active = log
                .segments
                .values_mut()
                .next_back()
                .expect("active segment");
            let seg_pos0 = active.size;
            let mut end = log.log_end_offset;
            for b in batches {
                active.note_batch(b.base, seg_pos0 + b.pos as u64, b.len as u64, b.max_ts);
                if b.max_ts > log.max_timestamp.0 {
                    log.max_timestamp = (b.max_ts, b.base);
                }
                log.epochs.observe(b.epoch, b.base);
                log.cache_bytes += b.cache.len();
                log.cache.push_back(batch::StoredBatch {
                    base_offset: b.base,
                    last_offset: b.last,
                    max_timestamp: b.max_ts,
                    leader_epoch: b.epoch,
                    bytes: b.cache,
                });
                end = b.last + 1;
            }
            active.size += pending.len() as u64;
            active.next_offset = end;
            log.log_end_offset = end;
            while log.cache_bytes > cache_max && log.cache.len() > 1 {
                if let Some(b) = log.cache.pop_front() {
                    log.cache_bytes -= b.bytes.len();
                }
            }
            end
        };
        self.answer_waiters(end, Ok(()));
        // A new leader epoch (a leader change: rare) is checkpointed, so that compaction cannot
        // take the knowledge of where it started; one epoch alone needs no checkpoint.
        let changed = {
            let log = self.inner.borrow();
            let n = log.epochs.entries().len();
            (n != epochs_before && n >= 2).then(|| {
                let entries: Vec<(i32, u64)> = log
                    .epochs
                    .entries()
                    .iter()
                    .map(|e| (e.epoch, e.start_offset))
                    .collect();
                (log.dir.clone(), entries)
            })
        };
        if let Some((dir, entries)) = changed {
            if let Err(e) = recovery::write_epoch_checkpoint(&dir, &entries).await {
                tracing::warn!(
                    "cannot checkpoint the leader epochs of {}: {e}",
                    dir.display()
                );
            }
        }
        Ok(true)
    }

    fn answer_waiters(&self, upto: u64, r: Result<(), String>) {
        let mut ws = self.write_waiters.borrow_mut();
        let mut keep = Vec::with_capacity(ws.len());
        for (off, tx) in ws.drain(..) {
            if off <= upto {
                let _ = tx.send(r.clone());
            } else {
                keep.push((off, tx));
            }
        }
        *ws = keep;
    }

    /// A failed write: nothing queued is stored. Offsets are handed out again from the log end,
    /// and producers whose batches were lost start over (their next batch gets
    /// OUT_OF_ORDER_SEQUENCE_NUMBER, and the client re-inits as Kafka clients do).
    fn fail_batches(&self, batches: &[PendingBatch], msg: &str) {
        {
            let mut log = self.inner.borrow_mut();
            for b in batches {
                if b.producer_id >= 0 {
                    log.producers.remove(&b.producer_id);
                }
            }
        }
        self.fail_pending(msg);
    }

    fn fail_pending(&self, msg: &str) {
        {
            let mut log = self.inner.borrow_mut();
            let pids: Vec<i64> = log
                .pending_batches
                .iter()
                .map(|b| b.producer_id)
                .filter(|p| *p >= 0)
                .collect();
            for p in pids {
                log.producers.remove(&p);
            }
            log.pending.clear();
            log.pending_batches.clear();
            log.next_offset = log.log_end_offset;
        }
        self.answer_waiters(u64::MAX, Err(msg.to_string()));
    }

    /// Group commit: returns once every offset below `offset` is on stable storage. One
    /// fdatasync covers every append that completed while the previous one ran. `offset` must
    /// already be written (callers wait for the write first). A failed fdatasync fences the
    /// partition: this call and every other waiter get the error, and it is never retried.
    pub async fn sync_to(&self, offset: u64) -> Result<(), LogError> {
        // Bounded: a caller waits for at most the sync in flight when it arrived and the one
        // started after it, whose target covers everything written before it started.
        for _ in 0..4u32 {
            if let Some(reason) = self.fenced() {
                let dir = self.inner.borrow().dir.clone();
                return Err(LogError::io(&dir, std::io::Error::other(reason)));
            }
            if self.inner.borrow().flushed_offset >= offset {
                return Ok(());
            }
            if self.syncing.get() {
                let (tx, rx) = futures::channel::oneshot::channel();
                self.sync_waiters.borrow_mut().push(tx);
                let _ = rx.await;
                continue;
            }
            self.syncing.set(true);
            let (target, file, path) = {
                let log = self.inner.borrow();
                let a = log.segments.values().next_back().expect("active segment");
                (log.log_end_offset, a.file.clone(), a.path.clone())
            };
            let r = storage::fdatasync(&file, &path)
                .await
                .map_err(|e| LogError::io(&path, e));
            self.syncing.set(false);
            match r {
                // A failure seen by a concurrent sync (a roll's) fences the partition, and the
                // kernel reports a writeback error to one caller only: a sync that "succeeds"
                // after a fence proves nothing.
                Ok(()) if self.fenced().is_none() => {
                    let mut log = self.inner.borrow_mut();
                    // A roll during the sync may have raised it already.
                    log.flushed_offset = log.flushed_offset.max(target);
                }
                Ok(()) => {}
                Err(e) => {
                    self.fence(&format!("fdatasync failed: {e}"));
                    return Err(e);
                }
            }
            for w in self.sync_waiters.borrow_mut().drain(..) {
                let _ = w.send(());
            }
        }
        if self.inner.borrow().flushed_offset >= offset {
            return Ok(());
        }
        let dir = self.inner.borrow().dir.clone();
        Err(LogError::io(
            &dir,
            std::io::Error::other(format!("offset {offset} is not written, cannot sync it")),
        ))
    }

    /// Reads batches starting with the one that holds `offset`, up to `max_bytes` (at least one
    /// whole batch), below `upper` (the high watermark), as one contiguous buffer.
    pub async fn read(&self, offset: u64, max_bytes: usize, upper: u64) -> Result<Bytes, LogError> {
        let chunks = self.read_chunks(offset, max_bytes, upper).await?;
        if chunks.len() == 1 {
            return Ok(chunks.into_iter().next().unwrap_or_default());
        }
        let mut out = BytesMut::with_capacity(chunks.iter().map(|c| c.len()).sum());
        for c in chunks {
            out.extend_from_slice(&c);
        }
        Ok(out.freeze())
    }

    /// Like `read`, but as chunks that are served without copying: from the cache, each batch is
    /// a 16-byte patched header (baseOffset, batchLength, partitionLeaderEpoch) followed by a
    /// slice of the producer's own bytes; from disk, one buffer.
    pub async fn read_chunks(
        &self,
        offset: u64,
        max_bytes: usize,
        upper: u64,
    ) -> Result<Vec<Bytes>, LogError> {
        {
            let log = self.inner.borrow();
            if offset < log.log_start_offset || offset > log.log_end_offset {
                return Err(LogError::OffsetOutOfRange {
                    offset: offset as i64,
                    start: log.log_start_offset,
                    end: log.log_end_offset,
                });
            }
            if offset >= upper {
                return Ok(Vec::new());
            }
            if let Some(front) = log.cache.front() {
                if front.base_offset <= offset {
                    let i = log.cache.partition_point(|b| b.last_offset < offset);
                    let mut chunks = Vec::new();
                    let mut headers = BytesMut::new();
                    let mut total = 0usize;
                    for b in log.cache.iter().skip(i) {
                        if b.base_offset >= upper
                            || (total > 0 && total + b.bytes.len() > max_bytes)
                        {
                            break;
                        }
                        if b.bytes.len() < PATCHED_PREFIX_BYTES {
                            break;
                        }
                        headers.extend_from_slice(&b.bytes[..PATCHED_PREFIX_BYTES]);
                        batch::patch_header(&mut headers, b.base_offset as i64, b.leader_epoch);
                        chunks.push(headers.split().freeze());
                        chunks.push(b.bytes.slice(PATCHED_PREFIX_BYTES..));
                        total += b.bytes.len();
                    }
                    crate::metrics::cache_lookup(true);
                    return Ok(chunks);
                }
            }
        }
        crate::metrics::cache_lookup(false);
        let stream = RefCell::new(None);
        let r = self.read_disk(&stream, offset, max_bytes, upper).await;
        if let Some(s) = stream.take() {
            s.trim();
        }
        r
    }

    /// Reads whole batches from disk starting with the one holding `offset`, as slices of what
    /// the read-ahead window of this reader's stream holds (no copy per batch).
    async fn read_disk(
        &self,
        stream: &RefCell<Option<Rc<read_ahead::Stream>>>,
        offset: u64,
        max_bytes: usize,
        upper: u64,
    ) -> Result<Vec<Bytes>, LogError> {
        let mut out: Vec<Bytes> = Vec::new();
        let mut served = 0usize;
        let mut want = offset;
        // Bounded by the number of segments: each pass finishes one segment.
        for _ in 0..1_000_000u32 {
            let (file, path, mut pos, size, seg_next) = {
                let log = self.inner.borrow();
                let seg = match log.segments.range(..=want).next_back() {
                    Some((_, s)) if want < s.next_offset => s,
                    _ => match log.segments.range(want + 1..).next() {
                        Some((_, s)) => s,
                        None => break,
                    },
                };
                (
                    seg.file.clone(),
                    seg.path.clone(),
                    seg.position_for(want),
                    seg.size,
                    seg.next_offset,
                )
            };
            let ra = stream
                .borrow_mut()
                .get_or_insert_with(|| self.read_ahead.pick(&file, want, pos))
                .clone();
            // A sequential reader goes on where its last fetch stopped (the index's entry
            // may lie before it, outside what was read ahead).
            if let Some(p) = ra.resume_at(&file, want) {
                if pos <= p && p <= size {
                    pos = p;
                }
            }
            while pos < size {
                let budget = max_bytes.saturating_sub(served) as u64;
                let chunk = budget.clamp(64 * 1024, 8 << 20).min(size - pos) as usize;
                let data = ra
                    .read(&file, pos, chunk, size)
                    .await
                    .map_err(|e| LogError::io(&path, std::io::Error::other(e)))?;
                let mut at = 0usize;
                // The span of `data` served so far in this pass: [span_from, at).
                let mut span_from = None;
                let mut done = false;
                while at + HEADER_BYTES <= data.len() {
                    let h = BatchHeader::new(&data[at..]);
                    let total = h.total_bytes();
                    let base = h.base_offset() as u64;
                    let last = base + h.last_offset_delta().max(0) as u64;
                    // Never written by us (stop rather than loop on garbage), or not readable.
                    if total < HEADER_BYTES || base >= upper {
                        done = true;
                        break;
                    }
                    // A batch that does not fit ends the answer, read whole or not (its header
                    // says): the rest of it is not waited for.
                    if last >= want && served > 0 && served + total > max_bytes {
                        done = true;
                        break;
                    }
                    if at + total > data.len() {
                        break;
                    }
                    if last >= want {
                        span_from.get_or_insert(at);
                        served += total;
                        want = last + 1;
                    }
                    at += total;
                }
                if let Some(from) = span_from {
                    out.push(data.slice(from..at));
                    ra.served(&file, pos + at as u64, want);
                }
                if done {
                    return Ok(out);
                }
                if at == 0 {
                    // One batch larger than what was read: read it whole.
                    if data.len() < HEADER_BYTES {
                        break;
                    }
                    let h = BatchHeader::new(&data);
                    let total = h.total_bytes();
                    let last = h.base_offset() as u64 + h.last_offset_delta().max(0) as u64;
                    let whole = ra
                        .read(&file, pos, total, size)
                        .await
                        .map_err(|e| LogError::io(&path, std::io::Error::other(e)))?;
                    if whole.len() < total {
                        break;
                    }
                    if last >= want {
                        if served > 0 && served + total > max_bytes {
                            return Ok(out);
                        }
                        out.push(whole.slice(..total));
                        served += total;
                        want = last + 1;
                        ra.served(&file, pos + total as u64, want);
                    }
                    at = total;
                }
                pos += at as u64;
                if served >= max_bytes {
                    return Ok(out);
                }
            }
            want = want.max(seg_next);
            if want >= upper {
                break;
            }
        }
        Ok(out)
    }

    /// The first offset whose batch max timestamp is >= ts, with the segment position to
    /// search from. Record-level resolution is done by the caller by decoding that batch.
    pub async fn batch_for_timestamp(&self, ts: i64) -> Result<Option<Bytes>, LogError> {
        let start = {
            let log = self.inner.borrow();
            let mut found = None;
            for seg in log.segments.values() {
                if seg.max_timestamp >= ts {
                    let i = seg.time_index.partition_point(|(t, _)| *t < ts);
                    // The batch that raised the max to >= ts, or a later one; start a bit earlier
                    // from the previous entry so that no batch with ts in range is skipped.
                    let from = if i == 0 {
                        seg.base_offset
                    } else {
                        seg.time_index[i - 1].1
                    };
                    found = Some(from.max(log.log_start_offset));
                    break;
                }
            }
            found
        };
        let Some(mut from) = start else {
            return Ok(None);
        };
        let upper = self.log_end_offset();
        // Scan forward batch by batch until one holds a timestamp >= ts (bounded by the log).
        for _ in 0..10_000_000u32 {
            let bytes = self.read(from, 1 << 20, upper).await?;
            if bytes.is_empty() {
                return Ok(None);
            }
            let mut at = 0;
            while at + HEADER_BYTES <= bytes.len() {
                let h = BatchHeader::new(&bytes[at..]);
                let total = h.total_bytes();
                if at + total > bytes.len() {
                    break;
                }
                if h.max_timestamp() >= ts {
                    return Ok(Some(bytes.slice(at..at + total)));
                }
                from = h.base_offset() as u64 + h.last_offset_delta() as u64 + 1;
                at += total;
            }
            if from >= upper {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// Deletes whole segments below `offset` and raises the log start offset (DeleteRecords).
    /// The new start is durable before this returns.
    pub async fn delete_records_before(&self, offset: u64) -> Result<u64, LogError> {
        if let Some(reason) = self.fenced() {
            let dir = self.inner.borrow().dir.clone();
            return Err(LogError::io(&dir, std::io::Error::other(reason)));
        }
        let (new_start, dir) = {
            let mut log = self.inner.borrow_mut();
            let new_start = offset.min(log.log_end_offset).max(log.log_start_offset);
            log.log_start_offset = new_start;
            log.epochs.truncate_from_start(new_start);
            (new_start, log.dir.clone())
        };
        recovery::write_log_start_offset(&dir, new_start)
            .await
            .map_err(|e| LogError::io(&dir, e))?;
        self.remove_segments_where(|seg, _| seg.next_offset <= new_start)
            .await;
        Ok(new_start)
    }

    /// Applies retention; returns the number of segments deleted.
    pub async fn enforce_retention(&self, s: &LogSettings, now: u64) -> usize {
        let mut removed = 0;
        if s.retention_ms >= 0 {
            let cutoff = now as i64 - s.retention_ms;
            removed += self
                .remove_segments_where(|seg, _| seg.max_timestamp < cutoff)
                .await;
        }
        if s.retention_bytes >= 0 {
            let total: u64 = self.inner.borrow().segments.values().map(|x| x.size).sum();
            let mut excess = total as i64 - s.retention_bytes;
            let mut sizes: Vec<(u64, u64)> = self
                .inner
                .borrow()
                .segments
                .values()
                .map(|x| (x.base_offset, x.size))
                .collect();
            sizes.pop();
            let mut doomed = std::collections::HashSet::new();
            for (b, sz) in sizes {
                if excess <= 0 {
                    break;
                }
                if excess - sz as i64 >= 0 {
                    excess -= sz as i64;
                    doomed.insert(b);
                } else {
                    break;
                }
            }
            removed += self
                .remove_segments_where(|seg, _| doomed.contains(&seg.base_offset))
                .await;
        }
        removed
    }

    /// Removes closed segments from the oldest while `pred` holds (never the active one). An
    /// empty closed segment (compaction can leave one) is removed like any other. The new log
    /// start offset is made durable before the files go, so a crash in between leaves only
    /// files below the start, which recovery ignores.
    async fn remove_segments_where(&self, pred: impl Fn(&Segment, &Log) -> bool) -> usize {
        // A retired log (a replica closed for truncation) removes nothing: its files are the
        // reopened replica's now.
        if self.fenced().is_some() || self.removing.get() {
            return 0;
        }
        self.removing.set(true);
        let n = self.remove_segments_now(pred).await;
        self.removing.set(false);
        n
    }

    async fn remove_segments_now(&self, pred: impl Fn(&Segment, &Log) -> bool) -> usize {
        let (doomed, new_start, dir) = {
            let mut log = self.inner.borrow_mut();
            let mut keys = Vec::new();
            let n = log.segments.len();
            for (i, (k, seg)) in log.segments.iter().enumerate() {
                if i + 1 == n || !pred(seg, &log) {
                    break;
                }
                keys.push(*k);
            }
            let mut out = Vec::new();
            for k in keys {
                if let Some(seg) = log.segments.remove(&k) {
                    out.push(seg);
                }
            }
            let mut new_start = None;
            if let Some(first) = log.segments.keys().next().copied() {
                if first > log.log_start_offset {
                    log.log_start_offset = first;
                    new_start = Some(first);
                }
            }
            let start = log.log_start_offset;
            log.epochs.truncate_from_start(start);
            while log
                .cache
                .front()
                .map(|b| b.last_offset < start)
                .unwrap_or(false)
            {
                if let Some(b) = log.cache.pop_front() {
                    log.cache_bytes -= b.bytes.len();
                }
            }
            (out, new_start, log.dir.clone())
        };
        if let Some(start) = new_start {
            if let Err(e) = recovery::write_log_start_offset(&dir, start).await {
                tracing::warn!(
                    "could not persist log start offset of {}: {e}",
                    dir.display()
                );
            }
        }
        let n = doomed.len();
        let mut paths = Vec::with_capacity(n * 3);
        for seg in &doomed {
            paths.push(seg.path.clone());
            paths.push(seg.path.with_extension("index"));
            paths.push(seg.path.with_extension("timeindex"));
            tracing::info!("deleting segment {}", seg.path.display());
        }
        drop(doomed);
        if n > 0 {
            if let Err(e) = storage::remove_files(paths).await {
                tracing::warn!("could not remove segment files in {}: {e}", dir.display());
            }
            if let Err(e) = storage::sync_dir(&dir).await {
                tracing::warn!("could not sync {}: {e}", dir.display());
            }
        }
        n
    }

    /// Flushes everything appended so far and records the synced end as the recovery point
    /// (shutdown): the next start CRC-checks only what lies past it.
    pub async fn flush(&self) -> Result<(), LogError> {
        let end = self.log_end_offset();
        self.sync_to(end).await?;
        let dir = self.inner.borrow().dir.clone();
        recovery::write_recovery_point(&dir, end)
            .await
            .map_err(|e| LogError::io(&dir, e))
    }
}

#[cfg(test)]
mod tests {
    use super::batch::tests::make_batch;
    use super::storage::sim::{Fault, SimDisk};
    use super::*;

    /// Runs `f` on a glommio executor with a data directory whose device glommio has probed.
    fn on_executor<F, Fut>(f: F)
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let probe = root.join(".dma-probe");
        std::fs::write(&probe, vec![1u8; 4096]).unwrap();
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .make()
            .unwrap();
        ex.run(async move {
            let p = DmaFile::open(&probe).await.unwrap();
            let _ = p.read_at(0, 4096).await;
            let _ = p.close().await;
            f(root).await;
        });
    }

    fn settings(segment_bytes: u64) -> LogSettings {
        LogSettings {
            segment_bytes,
            segment_ms: u64::MAX / 2,
            retention_ms: -1,
            retention_bytes: -1,
            cache_bytes_max: 1 << 20,
            visibility_sync_delay_us: 0,
        }
    }

    async fn append(log: &SharedLog, records: i32, ts: i64, s: &LogSettings) -> u64 {
        let payload = Bytes::from(make_batch(records, ts));
        let mut infos = Vec::new();
        batch::validate_payload(&payload, 1 << 20, &mut infos).unwrap();
        log.append(&payload, &infos, s, EpochStamp::Leader(0), None)
            .await
            .unwrap()
    }

    #[test]
    fn a_follower_keeps_its_leaders_offsets_gaps_and_epochs() {
        on_executor(|root| async move {
            let dir = root.join("t-0");
            let log = SharedLog::open(dir.clone()).await.unwrap();
            let s = settings(1 << 20);
            // What a compacted leader sends: offsets 0..3 in epoch 2, then 10..12 in epoch 5.
            let mut a = make_batch(3, 10);
            batch::patch_header(&mut a, 0, 2);
            let mut b = make_batch(2, 20);
            batch::patch_header(&mut b, 10, 5);
            let mut bytes = a.clone();
            bytes.extend_from_slice(&b);
            let payload = Bytes::from(bytes);
            let mut infos = Vec::new();
            batch::validate_payload(&payload, 1 << 20, &mut infos).unwrap();
            log.append(&payload, &infos, &s, EpochStamp::AsSent, None)
                .await
                .unwrap();
            assert_eq!(log.log_end_offset(), 12);
            assert_eq!(
                (log.epoch_at(2), log.epoch_at(10), log.latest_epoch()),
                (2, 5, 5)
            );
            let read = log.read(5, 1 << 20, 12).await.unwrap();
            let h = BatchHeader::new(&read);
            assert_eq!((h.base_offset(), h.partition_leader_epoch()), (10, 5));
            log.flush().await.unwrap();
            drop(log);
            // Reopened: the same offsets and epochs, from the files.
            let log = SharedLog::open(dir).await.unwrap();
            assert_eq!(log.log_end_offset(), 12);
            assert_eq!(
                log.end_offset_for_epoch(2, None).map(|e| e.end_offset),
                Some(10)
            );
        });
    }

    /// Writes a segment file holding `batches` (records, timestamp) from `base`.
    fn write_segment(dir: &Path, base: u64, batches: &[(i32, i64)]) -> u64 {
        let mut bytes = Vec::new();
        let mut next = base;
        for (n, ts) in batches {
            let mut b = make_batch(*n, *ts);
            batch::patch_header(&mut b, next as i64, 0);
            next += *n as u64;
            bytes.extend_from_slice(&b);
        }
        std::fs::write(dir.join(segment_file_name(base, "log")), bytes).unwrap();
        next
    }

    #[test]
    fn offsets_are_dense_and_survive_reopen() {
        on_executor(|root| async move {
            let dir = root.join("t-0");
            let s = settings(1024);
            let log = SharedLog::open(dir.clone()).await.unwrap();
            let mut expect = 0;
            for i in 0..40 {
                let base = append(&log, 1 + i % 5, 1_000 + i as i64, &s).await;
                assert_eq!(base, expect);
                expect += 1 + (i % 5) as u64;
            }
            log.sync_to(expect).await.unwrap();
            assert_eq!(log.synced_end(), expect);
            assert!(log.inner.borrow().segments.len() > 1, "small segments roll");
            log.flush().await.unwrap();
            drop(log);
            let log = SharedLog::open(dir).await.unwrap();
            assert_eq!(log.log_end_offset(), expect);
            assert_eq!(log.synced_end(), expect);
            let bytes = log.read(0, 1 << 20, expect).await.unwrap();
            assert!(!bytes.is_empty());
        });
    }

    /// A log of `n` batches of 5 records in one segment, opened afresh (nothing cached: every
    /// read goes to disk), and its end offset.
    async fn disk_log(root: &Path, n: i64) -> (SharedLog, u64) {
        let dir = root.join("t-0");
        std::fs::create_dir_all(&dir).unwrap();
        let batches: Vec<(i32, i64)> = (0..n).map(|i| (5, 1_000 + i)).collect();
        let end = write_segment(&dir, 0, &batches);
        (SharedLog::open(dir).await.unwrap(), end)
    }

    /// One fetch from `*next`: its batches follow on with no gaps, and `*next` moves past them.
    async fn fetch_in_order(log: &SharedLog, next: &mut u64, max: usize, end: u64) -> Vec<Bytes> {
        let chunks = log.read_chunks(*next, max, end).await.unwrap();
        for c in &chunks {
            let mut at = 0;
            while at < c.len() {
                let h = BatchHeader::new(&c[at..]);
                assert_eq!(h.base_offset() as u64, *next, "batches in order, no gaps");
                *next = h.base_offset() as u64 + h.last_offset_delta() as u64 + 1;
                at += h.total_bytes();
            }
        }
        chunks
    }

    #[test]
    fn sequential_disk_reads_are_served_from_read_ahead() {
        on_executor(|root| async move {
            let (log, end) = disk_log(&root, 3000).await;
            assert_eq!(log.log_end_offset(), end);
            // Nothing is cached after a restart: every read goes to disk.
            let (mut next, mut reads) = (0u64, 0u64);
            while next < end {
                let chunks = fetch_in_order(&log, &mut next, 64 << 10, end).await;
                reads += 1;
                for c in &chunks {
                    assert!(
                        dma_bytes::is_read_buffer(c),
                        "served as a slice of a disk read buffer, not a copy"
                    );
                }
                assert!(!chunks.is_empty(), "read at {next} returned nothing");
            }
            // A reader that has caught up leaves at most a small remainder behind.
            assert!(
                read_ahead::bytes_in_use() <= 256 << 10,
                "{} bytes still held",
                read_ahead::bytes_in_use()
            );
            let ra = &log.read_ahead;
            let from_memory = ra.stats.hits.get() + ra.stats.ahead_used.get();
            assert!(
                from_memory * 10 >= reads * 8,
                "{from_memory} of {reads} reads served from what was read ahead"
            );
            // Each fetch goes on where the last one stopped, not at the index entry before it
            // (outside the window), so only the first read goes to the disk itself.
            assert_eq!(ra.stats.direct.get(), 1, "{reads} reads");
            // A reader elsewhere is served directly, correctly.
            let chunks = log.read_chunks(5, 64 << 10, end).await.unwrap();
            assert_eq!(BatchHeader::new(&chunks[0]).base_offset(), 5);
        });
    }

    /// While a reader is served from its window, the disk works ahead of it: once the next
    /// extent is read, the one after it is started, even while the reader is away.
    #[test]
    fn a_reader_served_from_its_window_has_two_extents_read_ahead() {
        on_executor(|root| async move {
            let (log, end) = disk_log(&root, 20_000).await;
            let mut next = 0u64;
            let fetch = async |next: &mut u64, max: usize| {
                fetch_in_order(&log, next, max, end).await;
            };
            fetch(&mut next, 64 << 10).await;
            assert_eq!(
                log.read_ahead.extents_ahead(),
                1,
                "the next extent is on its way"
            );
            // Served from that extent now, with the one after it on its way.
            fetch(&mut next, 64 << 10).await;
            assert_eq!(log.read_ahead.stats.hits.get(), 0);
            assert_eq!(log.read_ahead.extents_ahead(), 1);
            // That one lands while the reader is away, and the one after it starts then,
            // not at the reader's next fetch.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while log.read_ahead.extents_ahead() < 2 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no extent was started after the one that landed ({} read)",
                    log.read_ahead.extents_read()
                );
                glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
            }
            assert!(log.read_ahead.extents_read() >= 1);
            fetch(&mut next, 16 << 10).await;
            assert_eq!(log.read_ahead.stats.hits.get(), 1, "served from the window");
            assert_eq!(log.read_ahead.extents_ahead(), 2);
            assert_eq!(log.read_ahead.stats.direct.get(), 1);
            // A reader that stops gives it all back once it has been idle.
            assert!(read_ahead::bytes_in_use() > 0);
            log.drop_idle_read_ahead(std::time::Duration::ZERO);
            assert_eq!(log.read_ahead.extents_ahead(), 0);
            assert_eq!(read_ahead::bytes_in_use(), 0);
        });
    }

    /// Two readers of one partition at different places (say, two consumer groups catching
    /// up) each keep their own window: neither moves the other's, so after its first read
    /// neither goes to the disk itself.
    #[test]
    fn two_readers_of_a_partition_keep_their_own_read_ahead() {
        on_executor(|root| async move {
            let (log, end) = disk_log(&root, 20_000).await;
            let fetch = async |next: &mut u64| {
                fetch_in_order(&log, next, 64 << 10, end).await;
            };
            let (mut a, mut b) = (0u64, end / 2);
            for _ in 0..20 {
                fetch(&mut a).await;
                fetch(&mut b).await;
            }
            assert!(a > 20 * 1_000 && b > end / 2 + 20 * 1_000, "{a} {b}");
            assert_eq!(log.read_ahead.stats.direct.get(), 2, "one first read each");
            assert_eq!(log.read_ahead.streams(), 2);
        });
    }

    #[test]
    fn retention_passes_empty_closed_segments() {
        on_executor(|root| async move {
            let dir = root.join("t-0");
            std::fs::create_dir_all(&dir).unwrap();
            // Closed segments: old data, an empty one (as compaction can leave), old data; then
            // the active segment with new data.
            let next = write_segment(&dir, 0, &[(3, 1_000)]);
            std::fs::write(dir.join(segment_file_name(next, "log")), b"").unwrap();
            let next = write_segment(&dir, next + 2, &[(2, 2_000)]);
            let end = write_segment(&dir, next + 5, &[(1, i64::MAX / 2)]);
            let log = SharedLog::open(dir.clone()).await.unwrap();
            assert_eq!(log.inner.borrow().segments.len(), 4);
            let mut s = settings(1 << 20);
            s.retention_ms = 10_000;
            let removed = log.enforce_retention(&s, 1_000_000).await;
            assert_eq!(removed, 3, "the empty segment does not stop retention");
            assert_eq!(log.log_start_offset(), next + 5);
            assert_eq!(log.log_end_offset(), end);
        });
    }

    #[test]
    fn failed_write_leaves_no_stale_batches_and_offsets_resume() {
        on_executor(|root| async move {
            let dir = root.join("t-0");
            let s = settings(1 << 20);
            let log = SharedLog::open(dir.clone()).await.unwrap();
            append(&log, 2, 1_000, &s).await;
            let sim = SimDisk::install(&root).unwrap();
            sim.set_faults(vec![Fault {
                op: storage::Op::Write,
                nth: 0,
                errno: 28,
            }]);
            let payload = Bytes::from(make_batch(50, 2_000));
            let mut infos = Vec::new();
            batch::validate_payload(&payload, 1 << 20, &mut infos).unwrap();
            assert!(log
                .append(&payload, &infos, &s, EpochStamp::Leader(0), None)
                .await
                .is_err());
            assert!(log.fenced().is_none(), "ENOSPC does not fence");
            let path = dir.join(segment_file_name(0, "log"));
            let logical = log.inner.borrow().segments[&0].size;
            assert_eq!(std::fs::metadata(&path).unwrap().len(), logical);
            // The offsets of the failed batch are handed out again.
            assert_eq!(append(&log, 1, 3_000, &s).await, 2);
            SimDisk::uninstall();
            log.flush().await.unwrap();
            drop(log);
            let log = SharedLog::open(dir).await.unwrap();
            assert_eq!(log.log_end_offset(), 3);
        });
    }

    #[test]
    fn failed_sync_fences_and_is_never_retried() {
        on_executor(|root| async move {
            let dir = root.join("t-0");
            let s = settings(1 << 20);
            let log = SharedLog::open(dir.clone()).await.unwrap();
            let sim = SimDisk::install(&root).unwrap();
            sim.set_faults(vec![Fault {
                op: storage::Op::Sync,
                nth: 0,
                errno: 5,
            }]);
            append(&log, 2, 1_000, &s).await;
            assert!(log.sync_to(2).await.is_err());
            assert!(log.fenced().is_some());
            // Every later sync fails without touching the disk; the synced end stays.
            assert!(log.sync_to(2).await.is_err());
            assert_eq!(log.synced_end(), 0);
            let payload = Bytes::from(make_batch(1, 2_000));
            let mut infos = Vec::new();
            batch::validate_payload(&payload, 1 << 20, &mut infos).unwrap();
            assert!(log
                .append(&payload, &infos, &s, EpochStamp::Leader(0), None)
                .await
                .is_err());
            SimDisk::uninstall();
        });
    }
}

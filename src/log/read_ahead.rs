//! Read-ahead for a partition's sequential reader (a consumer or follower catching up from
//! disk): when a fetch reads segment bytes, the next extent is already being read while the
//! response travels and the client asks again, so a sequential reader is served from memory
//! while the disk works, and readers of several partitions keep the device's queue full.
//!
//! One window per partition: the file bytes the last disk read returned, plus at most one read
//! in flight for the bytes right after them. A reader elsewhere in the log (another consumer, a
//! seek) reads directly and moves the window. Windows and reads in flight draw from a per-shard
//! budget (`memory.read_ahead_bytes_per_shard`); when it is spent, reads are not read ahead.
//! Bytes below a segment's logical size never change, so a window stays valid as long as its
//! file is still the segment's file (compaction and retention replace or remove it).

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};

use bytes::Bytes;
use glommio::io::DmaFile;

use super::batch::{BatchHeader, HEADER_BYTES};
use crate::metrics::ReadServed;

thread_local! {
    /// Bytes held by this shard's windows and reads in flight.
    static IN_USE: Cell<usize> = const { Cell::new(0) };
    /// The shard's cap on them (`memory.read_ahead_bytes_per_shard`).
    static LIMIT: Cell<usize> = const { Cell::new(256 << 20) };
    /// The most one partition reads ahead (`memory.read_ahead_bytes_per_partition`).
    static PER_PARTITION: Cell<usize> = const { Cell::new(8 << 20) };
    /// Windows alive on this shard: the partitions being read from disk.
    static WINDOWS: Cell<usize> = const { Cell::new(0) };
}

/// Sets this shard's read-ahead budget and the most one partition reads ahead (0 disables).
pub fn configure(per_shard: usize, per_partition: usize) {
    LIMIT.with(|l| l.set(per_shard));
    PER_PARTITION.with(|p| p.set(per_partition));
}

/// Bytes this shard holds for read-ahead now (metrics and tests).
pub fn bytes_in_use() -> usize {
    IN_USE.with(|u| u.get())
}

/// A share of the shard's read-ahead budget, given back on drop.
struct Charge(usize);

impl Charge {
    fn try_take(n: usize) -> Option<Charge> {
        IN_USE.with(|u| {
            if u.get() + n > LIMIT.with(|l| l.get()) {
                return None;
            }
            u.set(u.get() + n);
            Some(Charge(n))
        })
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        IN_USE.with(|u| u.set(u.get().saturating_sub(self.0)));
    }
}

/// Files are held weakly: a segment that retention deletes is closed (and its space freed) at
/// once, and a weak reference keeps its allocation, so the pointer is never another file's.
struct Window {
    file: Weak<DmaFile>,
    /// File position of `data[0]`.
    start: u64,
    /// Where the whole batches in `data` end: the next extent is read from here.
    whole_end: u64,
    /// A slice of one DMA read buffer: no copy.
    data: Bytes,
    /// The whole buffer's share of the budget, held until the window goes.
    _charge: Charge,
    _live: Live,
}

/// Counts a window while it lives: the shard's budget is shared among the partitions being
/// read from disk now.
struct Live;

impl Live {
    fn new() -> Live {
        WINDOWS.with(|n| n.set(n.get() + 1));
        Live
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        WINDOWS.with(|n| n.set(n.get().saturating_sub(1)));
    }
}

/// An extent read ahead: reading, or read and waiting for the reader.
struct Extent {
    file: Weak<DmaFile>,
    start: u64,
    state: Ahead,
    charge: Option<Charge>,
}

enum Ahead {
    Reading(glommio::task::JoinHandle<Result<Bytes, String>>),
    /// What was read, and where its whole batches end (the next extent starts there).
    Read(Bytes, u64),
    /// Taken by the reader.
    Gone,
}

/// Extents read ahead of the window at most: while the reader is served from the window, the
/// next extent waits read and the one after it is being read, so the disk keeps working ahead
/// of a reader that catches up in bursts (as all partitions of one fetch do).
const DEPTH: usize = 2;

/// Readers of one partition followed at once: a few consumers (say, two groups) catching up at
/// different places each keep their own window and extents, instead of moving one back and
/// forth (each read then going to the disk itself).
const STREAMS: usize = 4;

/// A partition's read-ahead: one `Stream` per reader being followed, the most recently used
/// last.
#[derive(Default)]
pub struct ReadAhead {
    streams: RefCell<Vec<Rc<Stream>>>,
    pub stats: Rc<Stats>,
}

/// What the partition's reads found (metrics and tests).
#[derive(Default)]
pub struct Stats {
    /// Reads served from a window alone.
    pub hits: Cell<u64>,
    /// Reads that waited for (or found finished) the extent read ahead for them.
    pub ahead_used: Cell<u64>,
    /// Reads that went to the disk themselves.
    pub direct: Cell<u64>,
}

impl ReadAhead {
    /// The stream of the reader that asks for `offset`, at `pos` in `file` by the index: the
    /// one whose last fetch stopped right before `offset`, else one whose window or next
    /// extent holds `pos`, else a new one (the least recently used goes when there are
    /// `STREAMS`).
    pub fn pick(&self, file: &Rc<DmaFile>, offset: u64, pos: u64) -> Rc<Stream> {
        let mut streams = self.streams.borrow_mut();
        let i = streams
            .iter()
            .position(|s| s.resume_at(file, offset).is_some())
            .or_else(|| streams.iter().position(|s| s.holds(file, pos)));
        let s = match i {
            Some(i) => streams.remove(i),
            None => {
                if streams.len() >= STREAMS {
                    streams.remove(0).clear();
                }
                Rc::new(Stream {
                    stats: self.stats.clone(),
                    ..Default::default()
                })
            }
        };
        streams.push(s.clone());
        s
    }

    /// Forgets every window and cancels every read ahead (the log was truncated or replaced).
    pub fn clear(&self) {
        for s in self.streams.borrow_mut().drain(..) {
            s.clear();
        }
    }

    /// Gives back what readers that stopped (no read for `idle`) hold.
    pub fn drop_if_idle(&self, idle: std::time::Duration) {
        self.streams.borrow_mut().retain(|s| {
            s.drop_if_idle(idle);
            s.last_read.get().is_some()
        });
    }

    /// Extents read or being read ahead, of all streams (tests).
    pub fn extents_ahead(&self) -> usize {
        self.streams
            .borrow()
            .iter()
            .map(|s| s.extents_ahead())
            .sum()
    }

    /// Extents read ahead and finished, of all streams (tests).
    pub fn extents_read(&self) -> usize {
        self.streams.borrow().iter().map(|s| s.extents_read()).sum()
    }

    /// Readers followed now (tests).
    pub fn streams(&self) -> usize {
        self.streams.borrow().len()
    }
}

/// One reader's window and the extents read ahead for it.
#[derive(Default)]
pub struct Stream {
    stats: Rc<Stats>,
    window: RefCell<Option<Window>>,
    ahead: RefCell<std::collections::VecDeque<Extent>>,
    /// Reads in a row that found their bytes read ahead: the reader keeps up sequentially.
    streak: Cell<u32>,
    /// Where the last fetch stopped serving: the window keeps only what lies past it.
    served_to: RefCell<Option<(Weak<DmaFile>, u64)>>,
    /// The same place and the offset the reader asks for next: a sequential reader resumes
    /// there rather than at the index's entry before it, which would miss the window.
    resume: RefCell<Option<(Weak<DmaFile>, u64, u64)>>,
    /// When the last read came, while anything may be held for the reader.
    last_read: Cell<Option<std::time::Instant>>,
    /// What the last read asked for and the segment's size then: an extent that lands
    /// between fetches starts the next one with them.
    asked: Cell<(usize, u64)>,
}

/// A DMA read of `len` bytes at `pos`, as `Bytes` that own the read buffer (no copy).
async fn read_dma(file: &DmaFile, pos: u64, len: usize) -> Result<Bytes, String> {
    super::dma_bytes::reclaim();
    let rr = file.read_at(pos, len).await.map_err(|e| e.to_string())?;
    crate::metrics::dma_read(rr.len());
    Ok(super::dma_bytes::from_read(rr))
}

/// The length of the whole batches at the start of `data` (stored batches, one after another).
fn whole_batches(data: &[u8]) -> usize {
    let mut at = 0usize;
    while at + HEADER_BYTES <= data.len() {
        let total = BatchHeader::new(&data[at..]).total_bytes();
        if total < HEADER_BYTES || total > data.len() - at {
            break;
        }
        at += total;
    }
    at
}

impl Stream {
    /// Whether this stream's window, or the next extent read ahead, holds `pos` of `file`.
    fn holds(&self, file: &Rc<DmaFile>, pos: u64) -> bool {
        let f = Rc::downgrade(file);
        let in_window = self.window.borrow().as_ref().is_some_and(|w| {
            Weak::ptr_eq(&w.file, &f) && w.start <= pos && pos < w.start + w.data.len() as u64
        });
        in_window
            || self
                .ahead
                .borrow()
                .front()
                .is_some_and(|e| Weak::ptr_eq(&e.file, &f) && e.start == pos)
    }

    /// Notes that a fetch served `file` up to position `end`, where the batches from
    /// `next_offset` on begin.
    pub fn served(&self, file: &Rc<DmaFile>, end: u64, next_offset: u64) {
        *self.served_to.borrow_mut() = Some((Rc::downgrade(file), end));
        *self.resume.borrow_mut() = Some((Rc::downgrade(file), end, next_offset));
    }

    /// Gives back what a reader that stopped (no read for `idle`) holds: its window and the
    /// extents read ahead for it, so that readers gone elsewhere do not hold the shard's budget.
    pub fn drop_if_idle(&self, idle: std::time::Duration) {
        if self.last_read.get().is_some_and(|t| t.elapsed() >= idle) {
            self.clear();
            self.last_read.set(None);
        }
    }

    /// Extents read or being read ahead of the window (tests).
    pub fn extents_ahead(&self) -> usize {
        self.ahead.borrow().len()
    }

    /// Where in `file` the batches from `offset` on begin, if the last fetch stopped there.
    pub fn resume_at(&self, file: &Rc<DmaFile>, offset: u64) -> Option<u64> {
        match &*self.resume.borrow() {
            Some((f, pos, next)) if *next == offset && Weak::ptr_eq(f, &Rc::downgrade(file)) => {
                Some(*pos)
            }
            _ => None,
        }
    }

    /// Drops what the window holds before the point the last fetch served to. A reader that has
    /// caught up, or stopped, keeps no window unless whole batches are left in it, or the next
    /// extent is on its way (the partial batch at the end of this one is read again with it).
    pub fn trim(&self) {
        let Some((file, end)) = self.served_to.borrow_mut().take() else {
            return;
        };
        let mut w = self.window.borrow_mut();
        let Some(win) = w.as_mut() else {
            return;
        };
        if !Weak::ptr_eq(&win.file, &file) || end < win.start {
            return;
        }
        let skip = ((end - win.start) as usize).min(win.data.len());
        let rest = win.data.slice(skip..);
        if rest.is_empty() || (win.whole_end <= end && self.ahead.borrow().is_empty()) {
            *w = None;
            return;
        }
        win.data = rest;
        win.start = end;
        win.whole_end = win.whole_end.max(end);
    }

    /// Forgets the window and cancels the read ahead (the log was truncated or replaced).
    pub fn clear(&self) {
        self.resume.borrow_mut().take();
        self.window.borrow_mut().take();
        self.ahead.borrow_mut().clear();
    }

    /// Bytes of `file` from `pos`, a batch's start: at least `want` (fewer only at `size`, the
    /// segment's logical end), or fewer that end with a whole batch, or more when they were
    /// read ahead. Each answer is a slice of one DMA read buffer: nothing is copied. Starts
    /// reading the next extent before it returns.
    pub async fn read(
        self: &Rc<Self>,
        file: &Rc<DmaFile>,
        pos: u64,
        want: usize,
        size: u64,
    ) -> Result<Bytes, String> {
        let want = want.min(size.saturating_sub(pos) as usize);
        self.last_read.set(Some(std::time::Instant::now()));
        self.asked.set((want, size));
        // What the window already holds from `pos`: all that is wanted, or the whole batches
        // before the extent read ahead (a response takes both as two slices, not one copy).
        let held = {
            let w = self.window.borrow();
            match &*w {
                Some(w)
                    if Weak::ptr_eq(&w.file, &Rc::downgrade(file))
                        && w.start <= pos
                        && pos < w.start + w.data.len() as u64 =>
                {
                    let have = w.data.slice((pos - w.start) as usize..);
                    let whole = w.whole_end.saturating_sub(pos) as usize;
                    if have.len() >= want {
                        Some(have)
                    } else if whole > 0 {
                        Some(have.slice(..whole))
                    } else {
                        None
                    }
                }
                _ => None,
            }
        };
        if let Some(have) = held {
            self.stats.hits.set(self.stats.hits.get() + 1);
            crate::metrics::read_ahead_served(ReadServed::Window);
            self.read_ahead(file, want, size);
            return Ok(have);
        }
        // The extent read ahead from here.
        let front = self.ahead.borrow_mut().pop_front();
        if let Some(mut e) = front {
            if Weak::ptr_eq(&e.file, &Rc::downgrade(file)) && e.start == pos {
                let mut waited = false;
                let (data, whole) = match std::mem::replace(&mut e.state, Ahead::Gone) {
                    Ahead::Read(data, whole_end) => (Some(data), (whole_end - e.start) as usize),
                    // Failed or cancelled: the reader reads that place itself, below (and
                    // sees the error, if it is the disk's).
                    Ahead::Reading(task) => {
                        waited = true;
                        let data = task.await.and_then(Result::ok);
                        let whole = data.as_ref().map_or(0, |d| whole_batches(d));
                        (data, whole)
                    }
                    Ahead::Gone => (None, 0),
                };
                if let Some(data) = data.filter(|d| d.len() >= want || whole > 0) {
                    self.stats.ahead_used.set(self.stats.ahead_used.get() + 1);
                    crate::metrics::read_ahead_served(if waited {
                        ReadServed::Waited
                    } else {
                        ReadServed::ReadAhead
                    });
                    self.streak.set(self.streak.get() + 1);
                    self.install(file, pos, data.clone(), whole, e.charge.take());
                    self.read_ahead(file, want, size);
                    return Ok(data);
                }
            }
            // Read ahead for another place (or too short): dropped, which cancels the reads.
            self.ahead.borrow_mut().clear();
        }
        // Nothing usable was read ahead: read it now.
        self.stats.direct.set(self.stats.direct.get() + 1);
        crate::metrics::read_ahead_served(ReadServed::Disk);
        self.streak.set(0);
        let data = read_dma(file, pos, want).await?;
        let charge = Charge::try_take(data.len());
        if charge.is_some() {
            self.install(file, pos, data.clone(), whole_batches(&data), charge);
            self.read_ahead(file, want, size);
        } else {
            self.window.borrow_mut().take();
        }
        Ok(data)
    }

    /// Makes `data` (file bytes from `pos`, one read buffer) the window.
    fn install(
        &self,
        file: &Rc<DmaFile>,
        pos: u64,
        data: Bytes,
        whole: usize,
        charge: Option<Charge>,
    ) {
        // The old window gives its share back first.
        self.window.borrow_mut().take();
        let Some(charge) = charge else {
            return;
        };
        *self.window.borrow_mut() = Some(Window {
            file: Rc::downgrade(file),
            start: pos,
            whole_end: pos + whole as u64,
            data,
            _charge: charge,
            _live: Live::new(),
        });
    }

    /// Notes the extents whose reads have finished (without waiting for any): the one after
    /// the last of them can start.
    fn note_finished(&self) {
        let mut ahead = self.ahead.borrow_mut();
        for (i, e) in ahead.iter_mut().enumerate() {
            let Ahead::Reading(task) = &mut e.state else {
                continue;
            };
            match futures::FutureExt::now_or_never(&mut *task) {
                None => break,
                Some(Some(Ok(data))) => {
                    let whole_end = e.start + whole_batches(&data) as u64;
                    e.state = Ahead::Read(data, whole_end);
                }
                // Failed or cancelled: the reader reads that place itself.
                Some(_) => {
                    ahead.truncate(i);
                    break;
                }
            }
        }
    }

    /// Extents read ahead and finished (tests).
    pub fn extents_read(&self) -> usize {
        self.note_finished();
        self.ahead
            .borrow()
            .iter()
            .filter(|e| matches!(e.state, Ahead::Read(..)))
            .count()
    }

    /// An extent read ahead from `start` of `file` has been read: it is ready for the reader,
    /// and the one after it starts now rather than at the reader's next fetch (readers of
    /// many partitions fetch in lockstep, and their extents land together between fetches:
    /// waiting for the fetch would leave the disk idle until then).
    fn landed(self: &Rc<Self>, file: &Rc<DmaFile>, start: u64, data: &Bytes) {
        let f = Rc::downgrade(file);
        let found = {
            let mut ahead = self.ahead.borrow_mut();
            let e = ahead.iter_mut().find(|e| {
                e.start == start
                    && Weak::ptr_eq(&e.file, &f)
                    && matches!(e.state, Ahead::Reading(_))
            });
            match e {
                Some(e) => {
                    // Replacing the handle of the task running this only lets it go.
                    e.state = Ahead::Read(data.clone(), start + whole_batches(data) as u64);
                    true
                }
                None => false,
            }
        };
        if found && self.last_read.get().is_some() {
            let (want, size) = self.asked.get();
            self.read_ahead(file, want, size);
        }
    }

    /// Keeps up to `DEPTH` extents read ahead of the window: each starts where the whole
    /// batches of the one before end, so one is started once the one before is read.
    fn read_ahead(self: &Rc<Self>, file: &Rc<DmaFile>, want: usize, size: u64) {
        let per_partition = PER_PARTITION.with(|p| p.get());
        if per_partition == 0 {
            self.clear();
            return;
        }
        self.note_finished();
        let mut ahead = self.ahead.borrow_mut();
        while ahead.len() < DEPTH {
            let (from, need) = {
                // The place after the last extent's (or the window's) whole batches, and the
                // batch begun there, which the next extent holds whole.
                let (start, data, whole_end) = match ahead.back() {
                    Some(Extent {
                        start,
                        state: Ahead::Read(data, whole_end),
                        ..
                    }) => (*start, data, *whole_end),
                    Some(_) => return,
                    None => match &*self.window.borrow() {
                        Some(w) => (w.start, &w.data.clone(), w.whole_end),
                        None => return,
                    },
                };
                // Without a whole batch (one batch larger than it), the reader reads that
                // batch whole next: nothing to read ahead of it yet.
                if whole_end <= start {
                    return;
                }
                let at = (whole_end - start) as usize;
                let need = if data.len() >= at + HEADER_BYTES {
                    BatchHeader::new(&data[at..]).total_bytes()
                } else {
                    0
                };
                (whole_end, need)
            };
            if from >= size {
                return;
            }
            // Twice what the reader asks for per fetch, doubling while it keeps being served
            // from what was read ahead, within the partition's limit.
            let len = (want.max(64 << 10) * 2)
                .saturating_mul(1 << self.streak.get().min(4))
                .min(per_partition)
                .min((size - from) as usize)
                // Readers of many partitions share the shard's budget (a window and its
                // extents each, and some slack): more readers read ahead in smaller extents,
                // rather than the first ones taking it all.
                .min(LIMIT.with(|l| l.get()) / ((DEPTH + 2) * WINDOWS.with(|n| n.get()).max(1)));
            if len < (64 << 10).min((size - from) as usize) {
                return;
            }
            let left = (size - from) as usize;
            let whole = buffer_holding(need).min(left);
            if whole > per_partition {
                // A batch larger than a partition reads ahead: read when it is asked for.
                return;
            }
            let len = buffer_sized(len, left).max(whole);
            let Some(charge) = Charge::try_take(len) else {
                return;
            };
            let f = file.clone();
            let stream = Rc::downgrade(self);
            let task = glommio::spawn_local(async move {
                let r = read_dma(&f, from, len).await;
                if let (Ok(data), Some(s)) = (&r, stream.upgrade()) {
                    s.landed(&f, from, data);
                }
                r
            })
            .detach();
            ahead.push_back(Extent {
                file: Rc::downgrade(file),
                start: from,
                state: Ahead::Reading(task),
                charge: Some(charge),
            });
        }
    }
}

/// An extent length for which the read buffer (rounded out to whole 4 KiB blocks) is a power
/// of two: extents of a few sizes only, so freed read buffers are reused by the next reads
/// instead of fresh pages being faulted in for each (see `alloc`). The last extent of a
/// segment is read to its end.
fn buffer_sized(len: usize, left: usize) -> usize {
    if len >= left {
        return left;
    }
    let block = 4096;
    // The largest power of two that `len` and a block's skew fill.
    let class = 1usize << (usize::BITS - 1 - (len + block).leading_zeros());
    (class.max(2 * block) - block).min(left)
}

/// The smallest extent length of those `buffer_sized` gives that holds `need` bytes.
fn buffer_holding(need: usize) -> usize {
    (need + 4096).next_power_of_two() - 4096
}

impl Drop for Extent {
    fn drop(&mut self) {
        // Nobody will use it: stop the read (a no-op once it has finished).
        if let Ahead::Reading(t) = &self.state {
            t.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{buffer_holding, buffer_sized};

    #[test]
    fn extents_come_in_few_buffer_sizes() {
        for len in [64 << 10, 100_000, 1 << 20, 3 << 20, (16 << 20) / 3, 8 << 20] {
            let l = buffer_sized(len, usize::MAX);
            assert!(l <= len && l * 2 + 8192 > len, "{len} -> {l}");
            // From any start within a block, the buffer fits the same power of two.
            let class = (l + 4096).next_power_of_two();
            for skew in [0, 1, 4095] {
                let buffer = (l + skew).div_ceil(4096) * 4096;
                assert!(
                    buffer <= class && buffer > class / 2,
                    "{len} -> {l} + {skew}: {buffer}"
                );
            }
        }
        assert_eq!(buffer_sized(5 << 20, 3 << 20), 3 << 20, "the segment's end");
        for need in [1, 4096, 999_875, 1 << 20, (1 << 20) - 4096] {
            let l = buffer_holding(need);
            assert!(
                l >= need && l == buffer_sized(l, usize::MAX),
                "{need} -> {l}"
            );
        }
    }
}

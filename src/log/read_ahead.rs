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

use bytes::{BufMut, Bytes, BytesMut};
use glommio::io::DmaFile;

thread_local! {
    /// Bytes held by this shard's windows and reads in flight.
    static IN_USE: Cell<usize> = const { Cell::new(0) };
    /// The shard's cap on them (`memory.read_ahead_bytes_per_shard`).
    static LIMIT: Cell<usize> = const { Cell::new(256 << 20) };
    /// The most one partition reads ahead (`memory.read_ahead_bytes_per_partition`).
    static PER_PARTITION: Cell<usize> = const { Cell::new(8 << 20) };
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
    data: Bytes,
    _charge: Charge,
}

struct InFlight {
    file: Weak<DmaFile>,
    start: u64,
    /// Taken by the reader that waits for it.
    task: Option<glommio::task::JoinHandle<Result<Bytes, String>>>,
    _charge: Charge,
}

#[derive(Default)]
pub struct ReadAhead {
    window: RefCell<Option<Window>>,
    in_flight: RefCell<Option<InFlight>>,
    /// Reads served from the window alone (metrics and tests).
    pub hits: Cell<u64>,
    /// Reads that waited for (or found finished) the extent read ahead for them.
    pub ahead_used: Cell<u64>,
    /// Reads in a row that found their bytes read ahead: the reader keeps up sequentially.
    streak: Cell<u32>,
    /// Where the last fetch stopped serving: the window keeps only what lies past it.
    served_to: RefCell<Option<(Weak<DmaFile>, u64)>>,
}

/// A window remainder at most this large is copied out, so that the (larger) buffer it was cut
/// from is freed once the responses holding it are written.
const COPY_REMAINDER_BYTES: usize = 256 << 10;

/// A DMA read of `len` bytes at `pos`, as `Bytes` (one copy out of the DMA buffer).
async fn read_bytes(file: &DmaFile, pos: u64, len: usize) -> Result<Bytes, String> {
    let rr = file.read_at(pos, len).await.map_err(|e| e.to_string())?;
    crate::metrics::dma_read(rr.len());
    Ok(Bytes::copy_from_slice(&rr))
}

impl ReadAhead {
    /// Notes that a fetch served `file` up to position `end`.
    pub fn served(&self, file: &Rc<DmaFile>, end: u64) {
        *self.served_to.borrow_mut() = Some((Rc::downgrade(file), end));
    }

    /// Drops what the window holds before the point the last fetch served to: a reader that
    /// has caught up, or stopped, leaves no more than a partial batch behind.
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
        if rest.is_empty() {
            *w = None;
            return;
        }
        let rest = if rest.len() <= COPY_REMAINDER_BYTES {
            Bytes::copy_from_slice(&rest)
        } else {
            rest
        };
        // The shorter window takes a smaller charge (released first, so it always fits).
        let n = rest.len();
        let file = w.take().map(|o| o.file).unwrap_or_default();
        *w = Charge::try_take(n).map(|c| Window {
            file,
            start: end,
            data: rest,
            _charge: c,
        });
    }

    /// Forgets the window and cancels the read ahead (the log was truncated or replaced).
    pub fn clear(&self) {
        self.window.borrow_mut().take();
        self.in_flight.borrow_mut().take();
    }

    /// Bytes of `file` from `pos`: at least `want` (fewer only at `size`, the segment's logical
    /// end), possibly more when they were read ahead. Starts reading the next extent before
    /// it returns.
    pub async fn read(
        &self,
        file: &Rc<DmaFile>,
        pos: u64,
        want: usize,
        size: u64,
    ) -> Result<Bytes, String> {
        let want = want.min(size.saturating_sub(pos) as usize);
        // What the window already holds from `pos`.
        let mut have = {
            let w = self.window.borrow();
            match &*w {
                Some(w)
                    if Weak::ptr_eq(&w.file, &Rc::downgrade(file))
                        && w.start <= pos
                        && pos < w.start + w.data.len() as u64 =>
                {
                    w.data.slice((pos - w.start) as usize..)
                }
                _ => Bytes::new(),
            }
        };
        if have.len() < want {
            let next = pos + have.len() as u64;
            let ahead = self.in_flight.borrow_mut().take();
            let mut more = None;
            let mut read_ahead_used = false;
            if let Some(mut f) = ahead {
                if Weak::ptr_eq(&f.file, &Rc::downgrade(file)) && f.start == next {
                    if let Some(task) = f.task.take() {
                        more = Some(task.await.unwrap_or_else(|| Err("read cancelled".into()))?);
                        read_ahead_used = true;
                        self.ahead_used.set(self.ahead_used.get() + 1);
                    }
                }
                // A read ahead for another place is dropped, which cancels it.
            }
            if more.is_none() || have.len() + more.as_ref().map_or(0, |m| m.len()) < want {
                // Nothing usable was read ahead: read what is missing now.
                let at = next + more.as_ref().map_or(0, |m| m.len() as u64);
                let missing = want - have.len() - more.as_ref().map_or(0, |m| m.len());
                let direct = read_bytes(file, at, missing).await?;
                more = Some(match more {
                    Some(m) => join(&m, &direct),
                    None => direct,
                });
            }
            let more = more.unwrap_or_default();
            have = if have.is_empty() {
                more
            } else {
                // Only the unread tail of the window (under one batch) is copied along.
                join(&have, &more)
            };
            self.streak.set(if read_ahead_used {
                self.streak.get() + 1
            } else {
                0
            });
        } else {
            self.hits.set(self.hits.get() + 1);
        }
        self.install(file, pos, have.clone(), want, size);
        Ok(have)
    }

    /// Makes `data` (file bytes from `pos`) the window and reads the next extent ahead.
    fn install(&self, file: &Rc<DmaFile>, pos: u64, data: Bytes, want: usize, size: u64) {
        let per_partition = PER_PARTITION.with(|p| p.get());
        if per_partition == 0 {
            self.clear();
            return;
        }
        let end = pos + data.len() as u64;
        // The old window gives its share back first; without budget the data is still
        // served, just not kept.
        self.window.borrow_mut().take();
        *self.window.borrow_mut() = Charge::try_take(data.len()).map(|c| Window {
            file: Rc::downgrade(file),
            start: pos,
            data,
            _charge: c,
        });
        if end >= size || self.in_flight.borrow().is_some() {
            return;
        }
        // Twice what the reader asks for per fetch, doubling while it keeps being served from
        // what was read ahead, within the partition's limit.
        let len = (want.max(64 << 10) * 2)
            .saturating_mul(1 << self.streak.get().min(4))
            .min(per_partition)
            .min((size - end) as usize);
        let Some(charge) = Charge::try_take(len) else {
            return;
        };
        let f = file.clone();
        let task = glommio::spawn_local(async move { read_bytes(&f, end, len).await }).detach();
        *self.in_flight.borrow_mut() = Some(InFlight {
            file: Rc::downgrade(file),
            start: end,
            task: Some(task),
            _charge: charge,
        });
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Nobody will use it: stop the read (a no-op once it has finished).
        if let Some(t) = &self.task {
            t.cancel();
        }
    }
}

fn join(a: &[u8], b: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(a.len() + b.len());
    out.put_slice(a);
    out.put_slice(b);
    out.freeze()
}

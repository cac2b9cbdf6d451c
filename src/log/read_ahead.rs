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
    data: Bytes,
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

struct InFlight {
    file: Weak<DmaFile>,
    start: u64,
    /// Taken by the reader that waits for it: the extent, after `Extent::room` free bytes.
    task: Option<glommio::task::JoinHandle<Result<Extent, String>>>,
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

/// An extent read ahead, copied out of the DMA buffer behind `room` free bytes: the window's
/// unread tail (the start of a batch the last fetch could not take whole) is put there, so
/// the reader gets one contiguous buffer without the extent being copied again.
struct Extent {
    buf: BytesMut,
    room: usize,
}

/// The room left before an extent of `len` bytes: enough for a partial batch of the usual
/// sizes, a small share of the extent.
fn room_for(len: usize) -> usize {
    (len / 8).min(1 << 20)
}

async fn read_extent(file: &DmaFile, pos: u64, len: usize) -> Result<Extent, String> {
    let rr = file.read_at(pos, len).await.map_err(|e| e.to_string())?;
    crate::metrics::dma_read(rr.len());
    let room = room_for(len);
    let mut buf = BytesMut::with_capacity(room + rr.len());
    buf.resize(room, 0);
    buf.put_slice(&rr);
    Ok(Extent { buf, room })
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
            _live: Live::new(),
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
            let mut extent = None;
            let mut read_ahead_used = false;
            if let Some(mut f) = ahead {
                if Weak::ptr_eq(&f.file, &Rc::downgrade(file)) && f.start == next {
                    if let Some(task) = f.task.take() {
                        extent = Some(task.await.unwrap_or_else(|| Err("read cancelled".into()))?);
                        read_ahead_used = true;
                        self.ahead_used.set(self.ahead_used.get() + 1);
                    }
                }
                // A read ahead for another place is dropped, which cancels it.
            }
            // `have` then `more`: the bytes from `pos` on, contiguous.
            let mut more = Bytes::new();
            if let Some(Extent { mut buf, room }) = extent {
                if have.len() <= room {
                    // The window's tail goes in front of the extent: no copy of the extent.
                    let from = room - have.len();
                    buf[from..room].copy_from_slice(&have);
                    more = buf.freeze().slice(from..);
                    have = Bytes::new();
                } else {
                    more = buf.freeze().slice(room..);
                }
            }
            if !read_ahead_used || have.len() + more.len() < want {
                // Nothing usable was read ahead: read what is missing now.
                let at = pos + (have.len() + more.len()) as u64;
                let missing = want - have.len() - more.len();
                let direct = read_bytes(file, at, missing).await?;
                more = if more.is_empty() {
                    direct
                } else {
                    join(&more, &direct)
                };
            }
            have = if have.is_empty() {
                more
            } else {
                // Only a tail too large for the extent's room is copied along.
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
            _live: Live::new(),
        });
        if end >= size || self.in_flight.borrow().is_some() {
            return;
        }
        // Twice what the reader asks for per fetch, doubling while it keeps being served from
        // what was read ahead, within the partition's limit.
        let len = (want.max(64 << 10) * 2)
            .saturating_mul(1 << self.streak.get().min(4))
            .min(per_partition)
            .min((size - end) as usize)
            // Readers of many partitions share the shard's budget (a window and an extent
            // each, and some slack): more readers read ahead in smaller extents, rather than
            // the first ones taking it all.
            .min(LIMIT.with(|l| l.get()) / (3 * WINDOWS.with(|n| n.get()).max(1)));
        if len < (64 << 10).min((size - end) as usize) {
            return;
        }
        let Some(charge) = Charge::try_take(len + room_for(len)) else {
            return;
        };
        let f = file.clone();
        let task = glommio::spawn_local(async move { read_extent(&f, end, len).await }).detach();
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

//! A DMA read buffer served as `Bytes`, without a copy.
//!
//! glommio's `ReadResult` keeps its buffer alive through an `Rc` of the shard that read it. Its
//! bytes never change while it lives, so any thread may read them, but the `Rc` may only be
//! touched (cloned, dropped) on that shard. A response can be written, and dropped, on another
//! shard (the connection's), so a buffer let go of elsewhere is parked in its shard's return
//! queue, and dropped there at that shard's next disk read or housekeeping pass.

use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use glommio::io::ReadResult;

/// A shard's return queue. Leaked once per shard thread, so it outlives every buffer pointing
/// at it (and a buffer is never dropped on the wrong thread by the queue's own drop).
struct Home {
    parked: Mutex<Vec<Parked>>,
    /// Buffers parked: the shard checks this before taking the lock.
    count: AtomicUsize,
    /// The address ranges of this shard's read buffers alive now (see `is_read_buffer`).
    live: Mutex<Vec<(usize, usize)>>,
}

impl Home {
    fn live(&self) -> std::sync::MutexGuard<'_, Vec<(usize, usize)>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A buffer on its way back to its shard; only ever dropped there.
struct Parked(#[allow(dead_code)] ReadResult);

// SAFETY: a parked `ReadResult` is only moved through the queue, never used, and is dropped by
// `reclaim` on the thread that created it.
unsafe impl Send for Parked {}

/// Whether `b` lies within a DMA read buffer this shard read that is alive and served as
/// `Bytes`: bytes that were not copied after the disk (benches and tests).
pub fn is_read_buffer(b: &[u8]) -> bool {
    let (a, z) = (b.as_ptr() as usize, b.as_ptr() as usize + b.len());
    HOME.with(|h| h.live().iter().any(|&(s, n)| s <= a && z <= s + n))
}

thread_local! {
    static HOME: &'static Home = Box::leak(Box::new(Home {
        parked: Mutex::new(Vec::new()),
        count: AtomicUsize::new(0),
        live: Mutex::new(Vec::new()),
    }));
}

struct Owned {
    read: ManuallyDrop<ReadResult>,
    home: &'static Home,
}

// SAFETY: other threads only read the bytes (`as_ref`: a pointer and a length that never
// change); the `Rc` inside is never cloned, and `Drop` hands it back to its own thread.
unsafe impl Send for Owned {}
unsafe impl Sync for Owned {}

impl AsRef<[u8]> for Owned {
    fn as_ref(&self) -> &[u8] {
        &self.read
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        let at = self.read.as_ptr() as usize;
        {
            let mut l = self.home.live();
            if let Some(i) = l.iter().position(|&(s, _)| s == at) {
                l.swap_remove(i);
            }
        }
        // SAFETY: taken once, here; `read` is not used again.
        let read = unsafe { ManuallyDrop::take(&mut self.read) };
        let at_home = HOME
            .try_with(|h| std::ptr::eq(*h, self.home))
            .unwrap_or(false);
        if at_home {
            drop(read);
        } else {
            let mut q = self.home.parked.lock().unwrap_or_else(|e| e.into_inner());
            q.push(Parked(read));
            self.home.count.store(q.len(), Ordering::Release);
        }
    }
}

/// The bytes of a DMA read, owning its buffer: no copy.
pub fn from_read(read: ReadResult) -> Bytes {
    if read.is_empty() {
        return Bytes::new();
    }
    let home = HOME.with(|h| *h);
    home.live().push((read.as_ptr() as usize, read.len()));
    Bytes::from_owner(Owned {
        read: ManuallyDrop::new(read),
        home,
    })
}

/// Drops the buffers this shard read that other shards have finished with.
pub fn reclaim() {
    let _ = HOME.try_with(|h| {
        if h.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let parked = {
            let mut q = h.parked.lock().unwrap_or_else(|e| e.into_inner());
            h.count.store(0, Ordering::Release);
            std::mem::take(&mut *q)
        };
        drop(parked);
    });
}

/// Buffers parked for this shard, waiting for `reclaim` (tests).
pub fn parked() -> usize {
    HOME.with(|h| h.count.load(Ordering::Acquire))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer read on one shard and dropped on another goes back to the first, and is freed
    /// there; its bytes read the same on both.
    #[test]
    fn a_buffer_dropped_elsewhere_is_freed_at_home() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let want: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &want).unwrap();
        let (to_other, from_home) = std::sync::mpsc::channel::<Bytes>();
        let (back, done) = std::sync::mpsc::channel::<()>();
        let home = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(move || async move {
                let f = glommio::io::DmaFile::open(&path).await.unwrap();
                let b = from_read(f.read_at(100, 2 * 4096).await.unwrap());
                assert_eq!(&b[..], &want[100..100 + 2 * 4096]);
                assert!(is_read_buffer(&b[5..50]));
                assert!(!is_read_buffer(&want[..]));
                let piece = b.slice(10..20);
                drop(b);
                to_other.send(piece).unwrap();
                done.recv().unwrap();
                assert_eq!(parked(), 1, "the buffer came back to be freed here");
                assert_eq!(HOME.with(|h| h.live().len()), 0, "no longer alive");
                reclaim();
                assert_eq!(parked(), 0);
                f.close().await.unwrap();
            })
            .unwrap();
        let piece = from_home.recv().unwrap();
        let expect: Vec<u8> = (110..120).map(|i| (i % 251) as u8).collect();
        assert_eq!(&piece[..], &expect[..], "read on another thread");
        assert!(!is_read_buffer(&piece), "read by another thread");
        drop(piece);
        back.send(()).unwrap();
        home.join().unwrap();
    }
}

//! The storage layer under the log: the operations that decide what survives a power cut
//! (fdatasync of segments, durable small files, directory syncs, unlinks) and the fault hooks
//! around segment writes.
//!
//! In production this is the plain file system. The calls that may block (directory fsync,
//! unlink, rename, small-file writes) run on glommio's blocking thread pool when called from a
//! shard, so a slow disk never stalls every partition of a core. Segment data itself goes
//! through io_uring (`DmaFile`) in `log/mod.rs`, which calls `fault` before each write and
//! fdatasync and `synced` after each successful fdatasync.
//!
//! A test replaces the disk's durability with [`sim::SimDisk`], installed on its thread: it
//! remembers the content of each file as of its last successful sync and each directory's
//! entries as of its last directory sync, and at a simulated power cut rewrites the real files to
//! what a disk that honours flushes (and nothing more) could hold: unsynced writes dropped or
//! torn at sector granularity, unsynced directory entries gone. It also injects EIO/ENOSPC on
//! chosen writes and syncs. Every hook is a no-op (one thread-local read) when no simulation is
//! installed.

use std::cell::RefCell;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

thread_local! {
    static SIM: RefCell<Option<Rc<sim::SimDisk>>> = const { RefCell::new(None) };
}

fn with_sim<R>(f: impl FnOnce(&sim::SimDisk) -> R) -> Option<R> {
    SIM.with(|s| s.borrow().as_ref().map(|d| f(d)))
}

/// The kind of operation a fault can be injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// A DMA write of segment data.
    Write,
    /// An fdatasync of a segment.
    Sync,
}

/// Called before a segment write or fdatasync: the simulated disk may fail it.
pub fn fault(op: Op, path: &Path) -> io::Result<()> {
    with_sim(|d| d.fault(op, path)).unwrap_or(Ok(()))
}

/// Called after a successful fdatasync of `path`: its current content is durable.
pub fn synced(path: &Path) {
    with_sim(|d| d.note_synced(path));
}

/// True while a simulated disk decides durability: the real flushes are then skipped (the
/// model, not the device, says what survives), which keeps thousands of cuts fast.
fn simulated() -> bool {
    with_sim(|_| ()).is_some()
}

thread_local! {
    /// Bounds the fdatasyncs this shard runs at once (`io.syncs_in_flight`).
    static SYNC_LANES: std::cell::RefCell<Rc<glommio::sync::Semaphore>> =
        std::cell::RefCell::new(Rc::new(glommio::sync::Semaphore::new(1)));
}

/// Sets how many fdatasyncs this shard runs at once. A device flush slows every write issued
/// while it runs, and one flush already makes everything written before it durable, so
/// concurrent syncs of many partitions cost write throughput and buy no durability.
pub fn set_syncs_in_flight(n: usize) {
    SYNC_LANES.with(|l| *l.borrow_mut() = Rc::new(glommio::sync::Semaphore::new(n.max(1) as u64)));
}

/// fdatasync of a segment through io_uring, with the fault hook before and the durability note
/// after. The caller decides what a failure means (the log fences the partition).
pub async fn fdatasync(file: &glommio::io::DmaFile, path: &Path) -> io::Result<()> {
    fault(Op::Sync, path)?;
    match with_sim(|d| d.sync_delay_us.get()) {
        None => {
            let lanes = SYNC_LANES.with(|l| l.borrow().clone());
            // The semaphore is never closed, so the permit is always granted.
            let _lane = lanes.acquire_permit(1).await;
            let started = std::time::Instant::now();
            file.fdatasync()
                .await
                .map_err(|e| io::Error::other(e.to_string()))?;
            crate::metrics::fsync_done(started);
        }
        // A simulated flush takes time too, so that crashes land between a write and its sync.
        Some(us) if us > 0 => glommio::timer::sleep(std::time::Duration::from_micros(us)).await,
        Some(_) => {}
    }
    synced(path);
    Ok(())
}

/// Runs `f` on the shard's blocking thread pool. Every async caller runs on a glommio executor;
/// startup and recovery use the `_blocking` variants instead.
/// Under a simulated disk the call runs inline, so that its hooks see the simulation.
pub async fn off_reactor<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    if with_sim(|_| ()).is_some() {
        return f();
    }
    glommio::executor().spawn_blocking(f).await
}

/// fsync of a directory, so that entries created, renamed or removed in it survive a crash.
pub fn sync_dir_blocking(dir: &Path) -> io::Result<()> {
    if !simulated() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    with_sim(|d| d.note_dir_synced(dir));
    Ok(())
}

/// `sync_dir_blocking` off the reactor.
pub async fn sync_dir(dir: &Path) -> io::Result<()> {
    if !simulated() {
        let owned = dir.to_path_buf();
        off_reactor(move || std::fs::File::open(&owned)?.sync_all()).await?;
    }
    with_sim(|d| d.note_dir_synced(dir));
    Ok(())
}

/// fsync of a regular file by path (after `set_len` or a buffered write).
pub fn sync_file_blocking(path: &Path) -> io::Result<()> {
    if !simulated() {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)?
            .sync_all()?;
    }
    synced(path);
    Ok(())
}

/// Creates `dir` (and its parents) and makes its entry durable in its parent.
pub fn create_dir_durably_blocking(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    if let Some(parent) = dir.parent() {
        sync_dir_blocking(parent)?;
    }
    sync_dir_blocking(dir)
}

/// Replaces `path` with `bytes` atomically and durably: write a temporary file, fsync it,
/// rename it over `path`, fsync the directory. A crash leaves the old or the new content.
pub fn write_file_durably_blocking(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    sync_file_blocking(&tmp)?;
    std::fs::rename(&tmp, path)?;
    sync_dir_blocking(dir)
}

/// `write_file_durably_blocking` with its blocking calls off the reactor.
pub async fn write_file_durably(path: &Path, bytes: Vec<u8>) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let (t1, t2, p2) = (tmp.clone(), tmp.clone(), path.to_path_buf());
    let real = !simulated();
    off_reactor(move || -> io::Result<()> {
        std::fs::write(&t1, &bytes)?;
        if real {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&t1)?
                .sync_all()?;
        }
        Ok(())
    })
    .await?;
    synced(&tmp);
    off_reactor(move || std::fs::rename(&t2, &p2)).await?;
    sync_dir(&dir).await
}

/// Removes files off the reactor; a file already gone is not an error. The caller syncs the
/// directory when the removal must be durable.
pub async fn remove_files(paths: Vec<PathBuf>) -> io::Result<()> {
    off_reactor(move || {
        for p in &paths {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
    .await
}

/// Removes a directory tree off the reactor (topic deletion).
pub async fn remove_dir_all(dir: PathBuf) -> io::Result<()> {
    off_reactor(move || match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    })
    .await
}

pub mod sim {
    //! A power-loss model of a disk that honours flushes, for tests (see the module above).

    use std::cell::{Cell, RefCell};
    use std::collections::{BTreeMap, HashMap};
    use std::io;
    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};
    use std::rc::Rc;

    use super::Op;

    /// The sector size a torn write is cut at.
    pub const SECTOR_BYTES: usize = 512;

    /// A small deterministic PRNG (xorshift64*), so that a seed replays a run exactly.
    #[derive(Debug, Clone)]
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
        }
        pub fn next_u64(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        /// Uniform in [0, n) (n > 0).
        pub fn below(&mut self, n: u64) -> u64 {
            self.next_u64() % n.max(1)
        }
        pub fn chance(&mut self, one_in: u64) -> bool {
            self.below(one_in) == 0
        }
    }

    /// An injected failure: the `nth` (0-based) operation of kind `op` after installation fails
    /// with `errno`.
    #[derive(Debug, Clone, Copy)]
    pub struct Fault {
        pub op: Op,
        pub nth: u64,
        pub errno: i32,
    }

    #[derive(Default)]
    pub struct SimDisk {
        /// Only paths under this directory are simulated.
        root: PathBuf,
        /// Content of each inode as of its last successful sync.
        durable_files: RefCell<HashMap<u64, Vec<u8>>>,
        /// Entries (name → inode, or None for a subdirectory) of each tracked directory as of
        /// its last sync.
        durable_dirs: RefCell<BTreeMap<PathBuf, BTreeMap<String, Option<u64>>>>,
        faults: RefCell<Vec<Fault>>,
        /// Files whose fdatasync failed: (content on disk, content in the page cache) at the
        /// failure. Linux marks the dirty pages clean without writing them, so a later
        /// successful sync does not write them either (PostgreSQL's "fsyncgate").
        poisoned: RefCell<HashMap<u64, (Vec<u8>, Vec<u8>)>>,
        writes_seen: Cell<u64>,
        syncs_seen: Cell<u64>,
        /// Faults that fired, for the test's bookkeeping.
        pub faults_fired: Cell<u64>,
        /// How long a simulated fdatasync takes.
        pub sync_delay_us: Cell<u64>,
    }

    fn listing(dir: &Path) -> io::Result<BTreeMap<String, Option<u64>>> {
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let md = e.metadata()?;
            let name = e.file_name().to_string_lossy().into_owned();
            out.insert(name, if md.is_dir() { None } else { Some(md.ino()) });
        }
        Ok(out)
    }

    /// A file's content as the device has it. Segments are written with O_DIRECT, and a
    /// buffered read racing such a write can leave stale pages in the page cache; the model
    /// reads with O_DIRECT too (which first writes back any dirty pages of buffered writers),
    /// so that a snapshot is what was written, not an old cached copy.
    fn read_coherent(path: &Path) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        const ALIGN: usize = 4096;
        let f = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => f,
            // File systems without O_DIRECT (tmpfs) have only the page cache anyway.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return std::fs::read(path),
            Err(e) => return Err(e),
        };
        let len = f.metadata()?.len() as usize;
        let cap = len.div_ceil(ALIGN).max(1) * ALIGN;
        let layout = std::alloc::Layout::from_size_align(cap, ALIGN)
            .map_err(|e| io::Error::other(e.to_string()))?;
        // SAFETY: the layout has a non-zero size; the buffer is freed below on every path.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::other("out of memory"));
        }
        // SAFETY: `ptr` points to `cap` initialised (zeroed) bytes owned here.
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr, cap) };
        let mut got = 0usize;
        let r = loop {
            if got >= len {
                break Ok(());
            }
            match f.read_at(&mut buf[got..], got as u64) {
                Ok(0) => break Ok(()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
            // O_DIRECT reads stop short only at the end of the file.
            if !got.is_multiple_of(ALIGN) {
                break Ok(());
            }
        };
        let out = buf[..got.min(len)].to_vec();
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(ptr, layout) };
        r.map(|_| out)
    }

    impl SimDisk {
        /// Installs a simulated disk over `root` on this thread (replacing any other);
        /// everything currently under `root` counts as durable.
        pub fn install(root: &Path) -> io::Result<Rc<SimDisk>> {
            let d = Rc::new(SimDisk {
                root: root.to_path_buf(),
                ..SimDisk::default()
            });
            d.snapshot_all()?;
            super::SIM.with(|s| *s.borrow_mut() = Some(d.clone()));
            Ok(d)
        }

        /// Removes the simulated disk from this thread.
        pub fn uninstall() {
            super::SIM.with(|s| *s.borrow_mut() = None);
        }

        /// Failures to inject, counted from now.
        pub fn set_faults(&self, faults: Vec<Fault>) {
            self.writes_seen.set(0);
            self.syncs_seen.set(0);
            *self.faults.borrow_mut() = faults;
        }

        fn covers(&self, path: &Path) -> bool {
            path.starts_with(&self.root)
        }

        /// Everything under the root (directories recursively) becomes the durable state.
        fn snapshot_all(&self) -> io::Result<()> {
            self.durable_dirs.borrow_mut().clear();
            self.durable_files.borrow_mut().clear();
            let mut stack = vec![self.root.clone()];
            // Bounded by the tree: each directory is visited once.
            while let Some(dir) = stack.pop() {
                let l = listing(&dir)?;
                for (name, ino) in &l {
                    let p = dir.join(name);
                    match ino {
                        None => stack.push(p),
                        Some(ino) => {
                            let bytes = read_coherent(&p)?;
                            self.durable_files.borrow_mut().insert(*ino, bytes);
                        }
                    }
                }
                self.durable_dirs.borrow_mut().insert(dir, l);
            }
            Ok(())
        }

        pub(super) fn fault(&self, op: Op, path: &Path) -> io::Result<()> {
            if !self.covers(path) {
                return Ok(());
            }
            let counter = match op {
                Op::Write => &self.writes_seen,
                Op::Sync => &self.syncs_seen,
            };
            let n = counter.get();
            counter.set(n + 1);
            let hit = self
                .faults
                .borrow()
                .iter()
                .find(|f| f.op == op && f.nth == n)
                .copied();
            match hit {
                Some(f) => {
                    self.faults_fired.set(self.faults_fired.get() + 1);
                    if op == Op::Sync {
                        if let (Ok(md), Ok(now)) = (std::fs::metadata(path), read_coherent(path)) {
                            let on_disk = self
                                .durable_files
                                .borrow()
                                .get(&md.ino())
                                .cloned()
                                .unwrap_or_default();
                            self.poisoned.borrow_mut().insert(md.ino(), (on_disk, now));
                        }
                    }
                    Err(io::Error::from_raw_os_error(f.errno))
                }
                None => Ok(()),
            }
        }

        pub(super) fn note_synced(&self, path: &Path) {
            if !self.covers(path) {
                return;
            }
            if let (Ok(md), Ok(mut bytes)) = (std::fs::metadata(path), read_coherent(path)) {
                if let Some((on_disk, at_failure)) = self.poisoned.borrow_mut().remove(&md.ino()) {
                    // Sectors left as they were at the failed sync were never written.
                    for (i, chunk) in bytes.chunks_mut(SECTOR_BYTES).enumerate() {
                        let at = i * SECTOR_BYTES;
                        let end = at + chunk.len();
                        if at_failure.get(at..end) == Some(&*chunk) {
                            for (j, b) in chunk.iter_mut().enumerate() {
                                *b = on_disk.get(at + j).copied().unwrap_or(0);
                            }
                        }
                    }
                }
                self.durable_files.borrow_mut().insert(md.ino(), bytes);
            }
        }

        pub(super) fn note_dir_synced(&self, dir: &Path) {
            if !self.covers(dir) {
                return;
            }
            if let Ok(l) = listing(dir) {
                // A directory synced for the first time is tracked from now on; its own entry
                // in its parent is durable only if the parent was synced after it was created.
                self.durable_dirs.borrow_mut().insert(dir.to_path_buf(), l);
            }
        }

        /// The power cut: writes into `image` (a new, empty directory) what the root would hold
        /// after power returns. Unsynced directory entries are gone; a file's content is its
        /// last synced content with each differing sector of what was written since either
        /// kept or lost, and its length anywhere between. The root itself is left as it is
        /// (tasks of the "dead" node may still touch it); the next run starts from `image`.
        pub fn power_cut(&self, image: &Path, rng: &mut Rng) -> io::Result<()> {
            let dirs = self.durable_dirs.borrow().clone();
            let mut current_by_ino: HashMap<u64, Vec<u8>> = HashMap::new();
            for dir in dirs.keys() {
                if let Ok(l) = listing(dir) {
                    for (name, ino) in l {
                        if let Some(ino) = ino {
                            if let Ok(b) = read_coherent(&dir.join(&name)) {
                                current_by_ino.insert(ino, b);
                            }
                        }
                    }
                }
            }
            // Parents before children (BTreeMap order); a directory survives only if its entry
            // is durable in its surviving parent.
            let mut surviving: Vec<PathBuf> = vec![self.root.clone()];
            std::fs::create_dir_all(image)?;
            for (dir, entries) in &dirs {
                if !surviving.iter().any(|d| d == dir) {
                    continue;
                }
                let rel = dir.strip_prefix(&self.root).unwrap_or(Path::new(""));
                let out_dir = image.join(rel);
                std::fs::create_dir_all(&out_dir)?;
                for (name, ino) in entries {
                    match ino {
                        None => {
                            std::fs::create_dir_all(out_dir.join(name))?;
                            surviving.push(dir.join(name));
                        }
                        Some(ino) => {
                            let synced = self.durable_files.borrow().get(ino).cloned();
                            let bytes = torn(
                                synced.as_deref().unwrap_or(&[]),
                                current_by_ino.get(ino).map(|c| &c[..]),
                                rng,
                            );
                            std::fs::write(out_dir.join(name), bytes)?;
                        }
                    }
                }
            }
            Ok(())
        }
    }

    impl SimDisk {
        /// A process crash (kill -9) with no power loss: `image` (a new, empty directory) gets
        /// what the page cache holds now, while what is durable stays what it was. Returns the
        /// simulated disk over `image`, installed on this thread; a later power cut still drops
        /// everything that was never synced, whoever read it in between.
        pub fn process_crash(&self, image: &Path) -> io::Result<Rc<SimDisk>> {
            let next = Rc::new(SimDisk {
                root: image.to_path_buf(),
                ..SimDisk::default()
            });
            let dirs = self.durable_dirs.borrow().clone();
            // Synthetic inode numbers for durable files that no longer exist by name.
            let mut ghost = u64::MAX;
            let mut stack = vec![self.root.clone()];
            // Bounded by the tree: each directory is visited once.
            while let Some(dir) = stack.pop() {
                let rel = dir.strip_prefix(&self.root).unwrap_or(Path::new(""));
                let out_dir = image.join(rel);
                std::fs::create_dir_all(&out_dir)?;
                let now = listing(&dir)?;
                let mut new_inos: HashMap<String, u64> = HashMap::new();
                for (name, ino) in &now {
                    match ino {
                        None => stack.push(dir.join(name)),
                        Some(_) => {
                            let out = out_dir.join(name);
                            std::fs::write(&out, read_coherent(&dir.join(name))?)?;
                            new_inos.insert(name.clone(), std::fs::metadata(&out)?.ino());
                        }
                    }
                }
                if let Some(durable) = dirs.get(&dir) {
                    let mut entries = BTreeMap::new();
                    for (name, old_ino) in durable {
                        let Some(old_ino) = old_ino else {
                            entries.insert(name.clone(), None);
                            continue;
                        };
                        let ino = match new_inos.get(name) {
                            // Same name, same file only if it is still the same inode.
                            Some(i) if now.get(name) == Some(&Some(*old_ino)) => *i,
                            _ => {
                                ghost -= 1;
                                ghost
                            }
                        };
                        if let Some(c) = self.durable_files.borrow().get(old_ino) {
                            next.durable_files.borrow_mut().insert(ino, c.clone());
                        }
                        entries.insert(name.clone(), Some(ino));
                    }
                    next.durable_dirs.borrow_mut().insert(out_dir, entries);
                }
                // Files renamed or created since the last directory sync keep their synced
                // content under their new inode, should a later sync make their entry durable.
                for (name, ino) in &now {
                    if let (Some(old), Some(new)) = (ino, new_inos.get(name)) {
                        if let Some(c) = self.durable_files.borrow().get(old) {
                            next.durable_files
                                .borrow_mut()
                                .entry(*new)
                                .or_insert_with(|| c.clone());
                        }
                    }
                }
            }
            super::SIM.with(|s| *s.borrow_mut() = Some(next.clone()));
            Ok(next)
        }
    }

    /// What a file may hold after a power cut, given its content at the last sync and its
    /// content now (None: unknown, e.g. unlinked).
    pub fn torn(synced: &[u8], current: Option<&[u8]>, rng: &mut Rng) -> Vec<u8> {
        let Some(current) = current else {
            return synced.to_vec();
        };
        if synced == current {
            return synced.to_vec();
        }
        let (lo, hi) = (
            synced.len().min(current.len()),
            synced.len().max(current.len()),
        );
        let len = match rng.below(3) {
            0 => synced.len(),
            1 => current.len(),
            _ => lo + rng.below((hi - lo) as u64 + 1) as usize,
        };
        let keep_all_new = rng.chance(3);
        let drop_all_new = !keep_all_new && rng.chance(2);
        let mut out = vec![0u8; len];
        for (i, chunk) in out.chunks_mut(SECTOR_BYTES).enumerate() {
            let at = i * SECTOR_BYTES;
            let take_new = if keep_all_new {
                true
            } else if drop_all_new {
                false
            } else {
                rng.chance(2)
            };
            let src = if take_new { current } else { synced };
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = src.get(at + j).copied().unwrap_or(0);
            }
        }
        out
    }
}

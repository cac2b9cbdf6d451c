//! Storage for the quorum's Raft log: what raft-rs reads ([`raft::Storage`]) plus the writes
//! the node makes while handling a Ready ([`QuorumStorage`]).
//!
//! Durability contract: writes land in a working copy that raft-rs reads at once; only
//! [`QuorumStorage::sync`] makes them survive a crash. The node calls `sync` after appending
//! entries and the hard state and before it sends a vote or an append acknowledgement, which is
//! the whole of raft-rs's persistence rule.
//!
//! [`MemStorage`] keeps the synced copy in a [`MemDisk`] the simulator holds on to: a crash
//! drops the node (and its working copy) and a restart opens the same disk again.

use std::cell::RefCell;
use std::rc::Rc;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

/// Writes a Raft node makes to its storage. Each returns an I/O error to the node, which stops.
pub trait QuorumStorage: raft::Storage {
    /// Appends `entries`, first dropping any stored entry at or after `entries[0].index`.
    fn append(&mut self, entries: &[Entry]) -> std::io::Result<()>;
    fn set_hard_state(&mut self, hs: &HardState) -> std::io::Result<()>;
    /// Records the commit index alone (a LightReady carries no full hard state).
    fn set_commit(&mut self, commit: u64) -> std::io::Result<()>;
    /// Replaces the log with a snapshot received from the leader.
    fn install_snapshot(&mut self, snap: &Snapshot) -> std::io::Result<()>;
    /// Keeps `snap` (of the local image) and drops the entries it covers.
    fn compact(&mut self, snap: Snapshot) -> std::io::Result<()>;
    /// Makes every write so far durable.
    fn sync(&mut self) -> std::io::Result<()>;
    /// The last snapshot kept (index 0 when none).
    fn last_snapshot(&self) -> &Snapshot;
}

/// A log, hard state and snapshot in memory: the unit a [`MemDisk`] keeps.
#[derive(Debug, Clone, Default)]
pub struct LogState {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    /// Index 0 when there is none; entries follow it without a gap.
    pub snapshot: Snapshot,
    pub entries: Vec<Entry>,
}

impl LogState {
    /// A fresh member of a static quorum: voters and learners known from configuration.
    pub fn new(voters: &[u64], learners: &[u64]) -> Self {
        let mut conf_state = ConfState::default();
        conf_state.set_voters(voters.to_vec());
        conf_state.set_learners(learners.to_vec());
        let mut snapshot = Snapshot::default();
        snapshot.mut_metadata().set_conf_state(conf_state.clone());
        LogState {
            conf_state,
            snapshot,
            ..LogState::default()
        }
    }

    pub fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    pub fn first_index(&self) -> u64 {
        self.snapshot_index() + 1
    }

    pub fn last_index(&self) -> u64 {
        self.snapshot_index() + self.entries.len() as u64
    }

    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        // raft-rs never appends below its commit index, and we never compact past it.
        assert!(
            first.index > self.snapshot_index(),
            "append at {} below the snapshot at {}",
            first.index,
            self.snapshot_index()
        );
        assert!(
            first.index <= self.last_index() + 1,
            "append at {} leaves a gap after {}",
            first.index,
            self.last_index()
        );
        self.entries
            .truncate((first.index - self.first_index()) as usize);
        self.entries.extend_from_slice(entries);
    }

    pub fn install_snapshot(&mut self, snap: &Snapshot) {
        let meta = snap.get_metadata();
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.conf_state = meta.get_conf_state().clone();
        self.snapshot = snap.clone();
        self.entries.clear();
    }

    pub fn compact(&mut self, snap: Snapshot) {
        let index = snap.get_metadata().index;
        if index <= self.snapshot_index() {
            return;
        }
        assert!(index <= self.last_index(), "compact past the log end");
        let drop = (index - self.snapshot_index()) as usize;
        self.entries.drain(..drop);
        self.snapshot = snap;
    }

    pub(crate) fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snapshot_index() {
            return Ok(self.snapshot.get_metadata().term);
        }
        if idx < self.snapshot_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first_index()) as usize].term)
    }

    pub(crate) fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let lo = (low - self.first_index()) as usize;
        let hi = (high - self.first_index()) as usize;
        let mut out = self.entries[lo..hi].to_vec();
        raft::util::limit_size(&mut out, max_size);
        Ok(out)
    }

    pub(crate) fn raft_state(&self) -> RaftState {
        RaftState {
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
        }
    }

    pub(crate) fn snapshot_at_least(&self, request_index: u64) -> raft::Result<Snapshot> {
        if self.snapshot_index() < request_index {
            // Compaction makes a newer one soon; raft-rs asks again.
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

/// The part of a simulated node's storage that survives a crash.
#[derive(Debug, Clone, Default)]
pub struct MemDisk(Rc<RefCell<LogState>>);

impl MemDisk {
    pub fn new(state: LogState) -> Self {
        MemDisk(Rc::new(RefCell::new(state)))
    }
    /// What a restart would find.
    pub fn synced(&self) -> LogState {
        self.0.borrow().clone()
    }
}

/// In-memory storage for the simulator and tests: a working copy over a [`MemDisk`].
#[derive(Debug)]
pub struct MemStorage {
    working: LogState,
    disk: MemDisk,
}

impl MemStorage {
    /// Opens what `disk` holds, as a restarted process would.
    pub fn open(disk: &MemDisk) -> Self {
        MemStorage {
            working: disk.synced(),
            disk: disk.clone(),
        }
    }
    pub fn state(&self) -> &LogState {
        &self.working
    }
}

/// raft-rs reads every storage through its in-memory [`LogState`]; this writes that delegation
/// once for each storage type (a blanket impl of a foreign trait is not allowed).
macro_rules! read_through_log_state {
    ($ty:ty, $field:ident) => {
        impl raft::Storage for $ty {
            fn initial_state(&self) -> raft::Result<RaftState> {
                Ok(self.$field.raft_state())
            }
            fn entries(
                &self,
                low: u64,
                high: u64,
                max_size: impl Into<Option<u64>>,
                _context: GetEntriesContext,
            ) -> raft::Result<Vec<Entry>> {
                self.$field.entries(low, high, max_size.into())
            }
            fn term(&self, idx: u64) -> raft::Result<u64> {
                self.$field.term(idx)
            }
            fn first_index(&self) -> raft::Result<u64> {
                Ok(self.$field.first_index())
            }
            fn last_index(&self) -> raft::Result<u64> {
                Ok(self.$field.last_index())
            }
            fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
                self.$field.snapshot_at_least(request_index)
            }
        }
    };
}
pub(crate) use read_through_log_state;

read_through_log_state!(MemStorage, working);

impl QuorumStorage for MemStorage {
    fn append(&mut self, entries: &[Entry]) -> std::io::Result<()> {
        self.working.append(entries);
        Ok(())
    }
    fn set_hard_state(&mut self, hs: &HardState) -> std::io::Result<()> {
        self.working.hard_state = hs.clone();
        Ok(())
    }
    fn set_commit(&mut self, commit: u64) -> std::io::Result<()> {
        self.working.hard_state.commit = commit;
        Ok(())
    }
    fn install_snapshot(&mut self, snap: &Snapshot) -> std::io::Result<()> {
        self.working.install_snapshot(snap);
        Ok(())
    }
    fn compact(&mut self, snap: Snapshot) -> std::io::Result<()> {
        self.working.compact(snap);
        Ok(())
    }
    fn sync(&mut self) -> std::io::Result<()> {
        *self.disk.0.borrow_mut() = self.working.clone();
        Ok(())
    }
    fn last_snapshot(&self) -> &Snapshot {
        &self.working.snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Entry::default()
        }
    }

    #[test]
    fn append_truncates_conflicts_compact_keeps_term_and_only_sync_survives() {
        let disk = MemDisk::new(LogState::new(&[1, 2, 3], &[4]));
        let mut s = MemStorage::open(&disk);
        s.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]).unwrap();
        s.append(&[entry(3, 2), entry(4, 2)]).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 4));
        assert_eq!(s.term(3).unwrap(), 2);
        s.sync().unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 2;
        snap.mut_metadata().term = 1;
        s.compact(snap).unwrap();
        assert_eq!(s.first_index().unwrap(), 3);
        assert_eq!(s.term(2).unwrap(), 1);
        assert!(s.term(1).is_err());
        assert!(s
            .entries(2, 4, None, GetEntriesContext::empty(false))
            .is_err());
        assert_eq!(
            s.entries(3, 5, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            2
        );
        assert!(s.snapshot(3, 2).is_err());
        assert_eq!(s.snapshot(2, 2).unwrap().get_metadata().index, 2);
        // Unsynced: a restart sees the log before compaction.
        let reopened = MemStorage::open(&disk);
        assert_eq!(reopened.first_index().unwrap(), 1);
        assert_eq!(reopened.last_index().unwrap(), 4);
        let st = reopened.initial_state().unwrap();
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(st.conf_state.learners, vec![4]);
    }
}

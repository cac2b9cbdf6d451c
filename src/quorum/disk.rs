//! The quorum's Raft log on disk: [`DiskStorage`], a [`QuorumStorage`] that fsyncs.
//!
//! Two files in the node's quorum directory:
//! - `raft.log`: frames appended in write order, `len:u32be crc32c:u32be kind:u8 body`, where
//!   the CRC covers `kind` and `body`, kind 1 is a log entry and kind 2 a hard state (both
//!   raft-rs's protobuf encoding). Replaying the frames in order rebuilds the log exactly as
//!   it was written: a later entry at an index replaces the suffix from there, a later hard
//!   state replaces the earlier one.
//! - `raft.snapshot`: `crc32c:u32be` and the snapshot (metadata and image), replaced whole.
//!
//! Crash safety. Frames are buffered and written by [`QuorumStorage::sync`], which ends with
//! fdatasync: what raft-rs was told is persisted is on disk. Replay stops at the first frame
//! that is short or fails its CRC — the torn tail of a write that was never synced, since
//! every synced frame lies before it — and the file is cut there. Compaction and an installed
//! snapshot first replace the snapshot file (temporary file, fsync, rename, fsync of the
//! directory), then rewrite the log the same way with what follows the snapshot. A crash
//! between the two leaves a new snapshot beside the old log, whose entries at or below the
//! snapshot are skipped on replay, and whose commit index is raised to the snapshot's (a
//! snapshot holds only committed entries; raft-rs refuses to start with applied > commit).
//!
//! Memory: the whole log after the snapshot is kept in memory ([`LogState`]) for raft-rs to
//! read; compaction bounds it (`QuorumConfig::snapshot_entries_max`). A frame is at most
//! [`FRAME_BYTES_MAX`].
//!
//! Blocking std I/O: the metadata log is small and rare next to partition data; the glommio
//! shell runs it on the controller shard (or a blocking pool) as it sees fit.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState};

use super::storage::{read_through_log_state, LogState, QuorumStorage};

/// Largest frame accepted on replay (an entry is one controller decision).
pub const FRAME_BYTES_MAX: u32 = 64 << 20;
const KIND_ENTRY: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const LOG_FILE: &str = "raft.log";
const SNAPSHOT_FILE: &str = "raft.snapshot";

pub struct DiskStorage {
    dir: PathBuf,
    state: LogState,
    log: File,
    /// Frames written since the last sync, not yet in the file.
    pending: Vec<u8>,
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn encode_pb(m: &impl protobuf::Message) -> io::Result<Vec<u8>> {
    m.write_to_bytes()
        .map_err(|e| invalid(format!("encode: {e}")))
}

fn push_frame(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    let mut crc = crc32c::crc32c(&[kind]);
    crc = crc32c::crc32c_append(crc, body);
    out.extend_from_slice(&(body.len() as u32 + 1).to_be_bytes());
    out.extend_from_slice(&crc.to_be_bytes());
    out.push(kind);
    out.extend_from_slice(body);
}

/// Splits `buf` into valid frames; returns them and the length of the valid prefix.
fn read_frames(buf: &[u8]) -> (Vec<(u8, &[u8])>, usize) {
    let mut frames = Vec::new();
    let mut at = 0;
    while buf.len() - at >= 9 {
        let len = u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        let crc = u32::from_be_bytes([buf[at + 4], buf[at + 5], buf[at + 6], buf[at + 7]]);
        if len == 0 || len > FRAME_BYTES_MAX || (buf.len() - at - 8) < len as usize {
            break;
        }
        let payload = &buf[at + 8..at + 8 + len as usize];
        if crc32c::crc32c(payload) != crc {
            break;
        }
        frames.push((payload[0], &payload[1..]));
        at += 8 + len as usize;
    }
    (frames, at)
}

/// Writes `bytes` to `dir/name` so that a crash leaves either the old file or the new one.
fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

impl DiskStorage {
    /// Opens (or creates) the quorum directory `dir` of a member of the static quorum
    /// `voters` + `learners`, replaying what was synced there.
    pub fn open(dir: &Path, voters: &[u64], learners: &[u64]) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut state = LogState::new(voters, learners);
        match std::fs::read(dir.join(SNAPSHOT_FILE)) {
            Ok(bytes) => {
                let snap = decode_snapshot_file(&bytes)?;
                state.install_snapshot(&snap);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let path = dir.join(LOG_FILE);
        let mut log = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        let mut buf = Vec::new();
        log.read_to_end(&mut buf)?;
        let (frames, valid) = read_frames(&buf);
        for (kind, body) in frames {
            replay(&mut state, kind, body)
                .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        }
        if valid < buf.len() {
            tracing::warn!(
                path = %path.display(),
                kept_bytes = valid,
                dropped_bytes = buf.len() - valid,
                "metadata log: torn tail cut"
            );
            log.set_len(valid as u64)?;
            log.sync_all()?;
        }
        let snap = state.snapshot.get_metadata();
        let (snap_index, snap_term) = (snap.index, snap.term);
        state.hard_state.commit = state.hard_state.commit.max(snap_index);
        state.hard_state.term = state.hard_state.term.max(snap_term);
        Ok(DiskStorage {
            dir: dir.to_path_buf(),
            state,
            log,
            pending: Vec::new(),
        })
    }

    pub fn state(&self) -> &LogState {
        &self.state
    }

    /// Persists the snapshot, then a log holding the hard state and the entries after it.
    fn rewrite(&mut self) -> io::Result<()> {
        let snap = encode_pb(&self.state.snapshot)?;
        let mut file = crc32c::crc32c(&snap).to_be_bytes().to_vec();
        file.extend_from_slice(&snap);
        replace_file(&self.dir, SNAPSHOT_FILE, &file)?;
        let mut log = Vec::new();
        push_frame(
            &mut log,
            KIND_HARD_STATE,
            &encode_pb(&self.state.hard_state)?,
        );
        for e in &self.state.entries {
            push_frame(&mut log, KIND_ENTRY, &encode_pb(e)?);
        }
        replace_file(&self.dir, LOG_FILE, &log)?;
        self.log = OpenOptions::new()
            .append(true)
            .open(self.dir.join(LOG_FILE))?;
        // Everything pending is in the rewritten log already.
        self.pending.clear();
        Ok(())
    }
}

fn decode_snapshot_file(bytes: &[u8]) -> io::Result<Snapshot> {
    if bytes.len() < 4 {
        return Err(invalid("raft.snapshot truncated".into()));
    }
    let crc = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if crc32c::crc32c(&bytes[4..]) != crc {
        // Written whole and renamed into place: a bad CRC is damage, not a torn write.
        return Err(invalid("raft.snapshot fails its CRC".into()));
    }
    Snapshot::parse_from_bytes(&bytes[4..]).map_err(|e| invalid(format!("raft.snapshot: {e}")))
}

fn replay(state: &mut LogState, kind: u8, body: &[u8]) -> Result<(), String> {
    match kind {
        KIND_ENTRY => {
            let e = Entry::parse_from_bytes(body).map_err(|e| e.to_string())?;
            if e.index <= state.snapshot_index() {
                // Written before a snapshot that covers it.
                return Ok(());
            }
            if e.index > state.last_index() + 1 {
                return Err(format!(
                    "entry {} after {} leaves a gap",
                    e.index,
                    state.last_index()
                ));
            }
            state.append(&[e]);
        }
        KIND_HARD_STATE => {
            state.hard_state = HardState::parse_from_bytes(body).map_err(|e| e.to_string())?;
        }
        k => return Err(format!("unknown frame kind {k}")),
    }
    Ok(())
}

read_through_log_state!(DiskStorage, state);

impl QuorumStorage for DiskStorage {
    fn append(&mut self, entries: &[Entry]) -> io::Result<()> {
        for e in entries {
            push_frame(&mut self.pending, KIND_ENTRY, &encode_pb(e)?);
        }
        self.state.append(entries);
        Ok(())
    }
    fn set_hard_state(&mut self, hs: &HardState) -> io::Result<()> {
        push_frame(&mut self.pending, KIND_HARD_STATE, &encode_pb(hs)?);
        self.state.hard_state = hs.clone();
        Ok(())
    }
    fn set_commit(&mut self, commit: u64) -> io::Result<()> {
        let mut hs = self.state.hard_state.clone();
        hs.commit = commit;
        self.set_hard_state(&hs)
    }
    fn install_snapshot(&mut self, snap: &Snapshot) -> io::Result<()> {
        self.state.install_snapshot(snap);
        self.rewrite()
    }
    fn compact(&mut self, snap: Snapshot) -> io::Result<()> {
        self.state.compact(snap);
        self.rewrite()
    }
    fn sync(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.log.write_all(&self.pending)?;
        self.pending.clear();
        self.log.sync_data()
    }
    fn last_snapshot(&self) -> &Snapshot {
        &self.state.snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Entry::default()
        }
    }

    fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
        HardState {
            term,
            vote,
            commit,
            ..HardState::default()
        }
    }

    #[test]
    fn synced_writes_survive_reopen_unsynced_and_torn_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(dir.path(), &[1, 2, 3], &[4]).unwrap();
        s.append(&[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")])
            .unwrap();
        s.set_hard_state(&hard_state(1, 2, 1)).unwrap();
        s.sync().unwrap();
        // A new leader overwrites 3; then more that is never synced.
        s.append(&[entry(3, 2, b"C")]).unwrap();
        s.set_hard_state(&hard_state(2, 3, 2)).unwrap();
        s.sync().unwrap();
        s.append(&[entry(4, 2, b"d")]).unwrap();
        s.set_commit(3).unwrap();
        drop(s);

        let s = DiskStorage::open(dir.path(), &[1, 2, 3], &[4]).unwrap();
        assert_eq!(s.last_index().unwrap(), 3);
        let got = s
            .entries(1, 4, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got[2], entry(3, 2, b"C"));
        let st = s.initial_state().unwrap();
        assert_eq!(st.hard_state, hard_state(2, 3, 2));
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        drop(s);

        // A torn frame at the end (a write cut by power loss) is cut off, the rest kept.
        let path = dir.path().join(LOG_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let good = bytes.len();
        let mut torn = Vec::new();
        push_frame(
            &mut torn,
            KIND_ENTRY,
            &encode_pb(&entry(4, 2, b"dddd")).unwrap(),
        );
        bytes.extend_from_slice(&torn[..torn.len() - 2]);
        std::fs::write(&path, &bytes).unwrap();
        let mut s = DiskStorage::open(dir.path(), &[1, 2, 3], &[4]).unwrap();
        assert_eq!(s.last_index().unwrap(), 3);
        assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, good);
        // And the log goes on after the cut.
        s.append(&[entry(4, 2, b"d")]).unwrap();
        s.sync().unwrap();
        drop(s);
        let s = DiskStorage::open(dir.path(), &[1, 2, 3], &[4]).unwrap();
        assert_eq!(s.last_index().unwrap(), 4);
    }

    #[test]
    fn compaction_and_installed_snapshots_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(dir.path(), &[1], &[]).unwrap();
        let ents: Vec<Entry> = (1..=10).map(|i| entry(i, 1, b"x")).collect();
        s.append(&ents).unwrap();
        s.set_hard_state(&hard_state(1, 1, 8)).unwrap();
        s.sync().unwrap();
        let mut snap = Snapshot::default();
        snap.set_data(b"image at 6".to_vec().into());
        snap.mut_metadata().index = 6;
        snap.mut_metadata().term = 1;
        snap.mut_metadata()
            .set_conf_state(s.initial_state().unwrap().conf_state);
        s.compact(snap.clone()).unwrap();
        drop(s);
        let s = DiskStorage::open(dir.path(), &[1], &[]).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (7, 10));
        assert_eq!(s.term(6).unwrap(), 1);
        assert_eq!(s.last_snapshot().get_data(), b"image at 6");
        assert_eq!(s.initial_state().unwrap().hard_state.commit, 8);
        drop(s);

        // A crash between the snapshot file and the log rewrite: old log, new snapshot.
        let old_log = std::fs::read(dir.path().join(LOG_FILE)).unwrap();
        let mut s = DiskStorage::open(dir.path(), &[1], &[]).unwrap();
        snap.mut_metadata().index = 20;
        snap.mut_metadata().term = 3;
        s.install_snapshot(&snap).unwrap();
        drop(s);
        std::fs::write(dir.path().join(LOG_FILE), old_log).unwrap();
        let s = DiskStorage::open(dir.path(), &[1], &[]).unwrap();
        assert_eq!(
            (s.first_index().unwrap(), s.last_index().unwrap()),
            (21, 20)
        );
        let hs = s.initial_state().unwrap().hard_state;
        assert_eq!((hs.commit, hs.term), (20, 3));
    }

    #[test]
    fn damaged_snapshot_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SNAPSHOT_FILE), b"\0\0\0\0garbage").unwrap();
        assert!(DiskStorage::open(dir.path(), &[1], &[]).is_err());
    }
}

//! One member of the controller quorum: raft-rs's `RawNode` over a [`QuorumStorage`], applying
//! committed entries into the [`MetadataImage`]. Sans-IO: the shell calls [`QuorumNode::tick`]
//! on a timer, [`QuorumNode::step`] for each message from a peer, [`QuorumNode::handle_ready`]
//! after either, and sends the messages it returns. No clock, no socket, no thread.
//!
//! `handle_ready` follows raft-rs's order to the letter, because each step guards a promise:
//! 1. a leader's messages go out at once (its own append may overlap them, thesis §10.2.1);
//! 2. a snapshot from the leader replaces the image and the log;
//! 3. committed entries are applied (raft-rs hands out only entries already persisted here);
//! 4. new entries and the hard state are written and *synced*;
//! 5. only then the persisted messages (votes, append acknowledgements) go out: a vote or an
//!    acknowledgement sent before its fsync can be forgotten by a crash, letting one node vote
//!    twice in a term or a leader count a replica that lost the entry;
//! 6. `advance`, and the light ready's commit index, messages and entries likewise.
//!
//! Past [`QuorumConfig::snapshot_entries_max`] applied entries the log is compacted into a
//! snapshot of the image, which is also what a lagging follower receives.

use bytes::Bytes;
use raft::eraftpb::{Entry, EntryType, Message, Snapshot};
use raft::{GetEntriesContext, RawNode, StateRole, NO_LIMIT};

use super::image::{MetadataImage, SnapshotError};
use super::record::{encode_batch, MetadataRecord};
use super::storage::QuorumStorage;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumConfig {
    /// Raft id of this node (non-zero); Fjord uses the node id.
    pub node_id: u64,
    /// Ticks a follower waits for a leader before it may campaign (raft-rs `election_tick`).
    pub election_tick: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_tick: usize,
    /// This node's own election timeout, in ticks, at least `election_tick`. raft-rs draws the
    /// timeout at random from `[min, max)`; we pass `[t, t + 1)`, so the draw is fixed and a
    /// seeded simulation replays exactly. Give each voter a different value.
    pub election_timeout_ticks: usize,
    /// Compact the log into a snapshot once this many applied entries follow the last one.
    pub snapshot_entries_max: u64,
    pub max_size_per_msg: u64,
    pub max_inflight_msgs: usize,
}

impl QuorumConfig {
    /// Defaults for a 100 ms tick: heartbeats every 200 ms, elections after 1–2 s.
    pub fn new(node_id: u64) -> Self {
        QuorumConfig {
            node_id,
            election_tick: 10,
            heartbeat_tick: 2,
            election_timeout_ticks: 10 + (node_id as usize % 10),
            snapshot_entries_max: 1024,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
        }
    }

    fn raft_config(&self, applied: u64) -> raft::Config {
        let min = self.election_timeout_ticks.max(self.election_tick);
        raft::Config {
            id: self.node_id,
            election_tick: self.election_tick,
            heartbeat_tick: self.heartbeat_tick,
            min_election_tick: min,
            max_election_tick: min + 1,
            applied,
            max_size_per_msg: self.max_size_per_msg,
            max_inflight_msgs: self.max_inflight_msgs,
            // As TiKV runs it: a leader cut off from a majority steps down, and a node
            // rejoining after a partition cannot force a new term on a healthy quorum.
            check_quorum: true,
            pre_vote: true,
            ..raft::Config::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QuorumError {
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("metadata log storage: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("snapshot image stands at (index, term) {image:?}, its Raft metadata at {raft:?}")]
    SnapshotMisplaced { image: (u64, u64), raft: (u64, u64) },
}

#[derive(Debug, thiserror::Error)]
pub enum ProposeError<E> {
    /// Only the active controller writes; `leader_id` is whom to ask instead, if known.
    #[error("not the active controller (leader {leader_id:?})")]
    NotLeader { leader_id: Option<u64> },
    /// The controller rules refused the request.
    #[error("{0}")]
    Rejected(E),
    /// raft-rs dropped the proposal (e.g. a leadership transfer is under way): retry.
    #[error("proposal dropped: {0}")]
    Dropped(raft::Error),
    #[error(transparent)]
    Quorum(#[from] QuorumError),
}

/// Where a proposal went: it is committed when the image reaches `index` with an entry of
/// `term` there (another term at that index means it was lost with a leadership change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proposal {
    Appended {
        index: u64,
        term: u64,
    },
    /// The rules had nothing to change.
    Nothing,
}

/// What the image went through in one `handle_ready`, in order: for a shell that publishes
/// deltas and for the simulator's checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Snapshot { index: u64, term: u64 },
    Entry { index: u64, term: u64, data: Bytes },
}

#[derive(Debug, Default)]
pub struct ReadyOutput {
    pub messages: Vec<Message>,
    pub applied: Vec<Applied>,
}

/// Counters for the shell's metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NodeStats {
    pub entries_applied: u64,
    /// Records every node skipped alike because they did not fit the image.
    pub records_skipped: u64,
    pub entries_undecodable: u64,
    pub snapshots_installed: u64,
    pub snapshots_taken: u64,
}

pub struct QuorumNode<S: QuorumStorage> {
    config: QuorumConfig,
    raw: RawNode<S>,
    image: MetadataImage,
    /// The leader image and the log position (index, term) it stands at. An (index, term)
    /// names one log prefix (Raft's log matching), so the cache is valid exactly while the
    /// log ends there; proposals move it along instead of rebuilding it per request.
    leader_cache: Option<(u64, u64, MetadataImage)>,
    stats: NodeStats,
}

impl<S: QuorumStorage> QuorumNode<S> {
    /// Opens a node on what its storage holds: the image from the last snapshot, the entries
    /// after it re-applied as raft-rs hands them out as committed.
    pub fn open(config: QuorumConfig, storage: S) -> Result<Self, QuorumError> {
        let snap = storage.last_snapshot();
        let image = if snap.get_metadata().index == 0 {
            MetadataImage::default()
        } else {
            MetadataImage::decode_snapshot(snap.get_data())?
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&config.raft_config(image.applied_index), storage, &logger)?;
        Ok(QuorumNode {
            config,
            raw,
            image,
            leader_cache: None,
            stats: NodeStats::default(),
        })
    }

    pub fn id(&self) -> u64 {
        self.config.node_id
    }
    /// The committed image.
    pub fn image(&self) -> &MetadataImage {
        &self.image
    }
    pub fn stats(&self) -> NodeStats {
        self.stats
    }
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }
    pub fn leader_id(&self) -> Option<u64> {
        Some(self.raw.raft.leader_id).filter(|id| *id != raft::INVALID_ID)
    }
    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }
    pub fn last_index(&self) -> u64 {
        self.raw.raft.raft_log.last_index()
    }
    /// A leader's view of each voter: (raft id, highest log index known to match ours).
    /// Empty on a follower, which does not track the others.
    pub fn progress(&self) -> Vec<(u64, u64)> {
        if !self.is_leader() {
            return Vec::new();
        }
        let mut out: Vec<(u64, u64)> = self
            .raw
            .raft
            .prs()
            .iter()
            .map(|(id, p)| (*id, p.matched))
            .collect();
        out.sort_unstable();
        out
    }
    pub fn storage(&self) -> &S {
        self.raw.store()
    }

    /// One clock tick (the shell's timer period, e.g. 100 ms).
    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// A message from a peer. Messages raft-rs refuses (from an unknown peer, a local kind)
    /// are dropped: a peer cannot stop us by sending them.
    pub fn step(&mut self, msg: Message) {
        let _ = self.raw.step(msg);
    }

    /// Tells raft-rs whether a snapshot it sent to `to` arrived: until told, it sends that
    /// follower nothing more. The transport reports a failure when it could not deliver one.
    pub fn report_snapshot(&mut self, to: u64, status: raft::SnapshotStatus) {
        self.raw.report_snapshot(to, status);
    }

    /// The transport could not reach `to`: raft-rs probes it again instead of streaming.
    pub fn report_unreachable(&mut self, to: u64) {
        self.raw.report_unreachable(to);
    }

    /// The image the next proposal will meet when it commits: the committed image plus every
    /// entry this leader has appended after it. Raft commits a leader's log in order, so rules
    /// judged on this image see exactly the state their records will be applied to.
    pub fn leader_image(&mut self) -> Result<&MetadataImage, QuorumError> {
        let last = self.last_index();
        let last_term = self.raw.raft.raft_log.term(last)?;
        let fresh = matches!(&self.leader_cache, Some((i, t, _)) if (*i, *t) == (last, last_term));
        if !fresh {
            let mut img = self.image.clone();
            let tail = self.raw.raft.raft_log.entries(
                img.applied_index + 1,
                NO_LIMIT,
                GetEntriesContext::empty(false),
            )?;
            for e in tail {
                apply_entry(&mut img, &e, &mut NodeStats::default());
            }
            self.leader_cache = Some((last, last_term, img));
        }
        let (_, _, img) = self.leader_cache.as_ref().expect("filled above");
        Ok(img)
    }

    /// Proposes the records `decide` returns, judged on [`QuorumNode::leader_image`] and given
    /// the log index they will get (a broker epoch is that index). Only the leader proposes.
    pub fn propose_with<E>(
        &mut self,
        decide: impl FnOnce(&MetadataImage, u64) -> Result<Vec<MetadataRecord>, E>,
    ) -> Result<Proposal, ProposeError<E>> {
        if !self.is_leader() {
            return Err(ProposeError::NotLeader {
                leader_id: self.leader_id(),
            });
        }
        let index = self.last_index() + 1;
        let records = decide(self.leader_image()?, index).map_err(ProposeError::Rejected)?;
        if records.is_empty() {
            return Ok(Proposal::Nothing);
        }
        let data = encode_batch(&records);
        self.raw
            .propose(Vec::new(), data.clone())
            .map_err(ProposeError::Dropped)?;
        // The leader appends at once; anything else would make the broker epoch a lie.
        assert_eq!(
            self.last_index(),
            index,
            "proposal not appended where expected"
        );
        let term = self.term();
        if let Some((i, t, img)) = self.leader_cache.as_mut() {
            // Through the same path as the committed apply, so both images agree.
            let _ = img.apply_entry(index, term, &data);
            (*i, *t) = (index, term);
        }
        Ok(Proposal::Appended { index, term })
    }

    /// Handles everything raft-rs has ready; returns the messages to send (in order) and what
    /// was applied. Storage errors stop the node: the shell must not go on without a disk.
    pub fn handle_ready(&mut self) -> Result<ReadyOutput, QuorumError> {
        let mut out = ReadyOutput::default();
        if !self.raw.has_ready() {
            return Ok(out);
        }
        let mut rd = self.raw.ready();
        out.messages.extend(rd.take_messages());
        if !rd.snapshot().is_empty() {
            self.install_snapshot(rd.snapshot().clone(), &mut out)?;
        }
        self.apply_committed(rd.take_committed_entries(), &mut out);
        let store = self.raw.mut_store();
        store.append(rd.entries())?;
        if let Some(hs) = rd.hs() {
            store.set_hard_state(hs)?;
        }
        store.sync()?;
        out.messages.extend(rd.take_persisted_messages());
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            // Not synced on its own: a lost commit index is learnt again from the leader, and
            // the entries it covers are durable already.
            self.raw.mut_store().set_commit(commit)?;
        }
        out.messages.extend(light.take_messages());
        self.apply_committed(light.take_committed_entries(), &mut out);
        self.raw.advance_apply();
        self.maybe_compact()?;
        Ok(out)
    }

    fn install_snapshot(
        &mut self,
        snap: Snapshot,
        out: &mut ReadyOutput,
    ) -> Result<(), QuorumError> {
        let image = MetadataImage::decode_snapshot(snap.get_data())?;
        let meta = snap.get_metadata();
        if (image.applied_index, image.applied_term) != (meta.index, meta.term) {
            return Err(QuorumError::SnapshotMisplaced {
                image: (image.applied_index, image.applied_term),
                raft: (meta.index, meta.term),
            });
        }
        self.raw.mut_store().install_snapshot(&snap)?;
        out.applied.push(Applied::Snapshot {
            index: meta.index,
            term: meta.term,
        });
        self.image = image;
        self.stats.snapshots_installed += 1;
        Ok(())
    }

    fn apply_committed(&mut self, entries: Vec<Entry>, out: &mut ReadyOutput) {
        for e in entries {
            assert_eq!(
                e.index,
                self.image.applied_index + 1,
                "committed entries must apply in order without a gap"
            );
            apply_entry(&mut self.image, &e, &mut self.stats);
            self.stats.entries_applied += 1;
            out.applied.push(Applied::Entry {
                index: e.index,
                term: e.term,
                data: e.data.clone(),
            });
        }
    }

    fn maybe_compact(&mut self) -> Result<(), QuorumError> {
        let kept = self.raw.store().last_snapshot().get_metadata().index;
        if self.image.applied_index < kept + self.config.snapshot_entries_max {
            return Ok(());
        }
        let mut snap = Snapshot::default();
        snap.set_data(self.image.encode_snapshot().into());
        let meta = snap.mut_metadata();
        meta.index = self.image.applied_index;
        meta.term = self.image.applied_term;
        meta.set_conf_state(self.raw.raft.prs().conf().to_conf_state());
        self.raw.mut_store().compact(snap)?;
        self.stats.snapshots_taken += 1;
        Ok(())
    }
}

/// Applies one committed Raft entry to `img`. Entries that are not metadata (a configuration
/// change, which a static quorum never proposes) only move the image's position.
fn apply_entry(img: &mut MetadataImage, e: &Entry, stats: &mut NodeStats) {
    if e.get_entry_type() != EntryType::EntryNormal {
        img.applied_index = e.index;
        img.applied_term = e.term;
        return;
    }
    match img.apply_entry(e.index, e.term, &e.data) {
        Ok(skipped) => stats.records_skipped += skipped.len() as u64,
        Err(_) => stats.entries_undecodable += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::super::controller::{Controller, ControllerConfig, RegisterRequest};
    use super::super::disk::DiskStorage;
    use super::super::storage::{LogState, MemDisk, MemStorage};
    use super::*;
    use uuid::Uuid;

    /// A single voter elects itself, commits registrations, compacts, and after a restart on
    /// what `open` finds has the same brokers.
    fn single_voter_round<S: QuorumStorage>(open: impl Fn() -> S) {
        let mut config = QuorumConfig::new(1);
        config.snapshot_entries_max = 4;
        let mut node = QuorumNode::open(config.clone(), open()).unwrap();
        let refused: Result<_, ProposeError<()>> = node.propose_with(|_, _| Ok(vec![]));
        assert!(matches!(
            refused,
            Err(ProposeError::NotLeader { leader_id: None })
        ));
        for _ in 0..config.election_timeout_ticks + 1 {
            node.tick();
            node.handle_ready().unwrap();
        }
        assert!(node.is_leader());
        let mut ctl = Controller::new(ControllerConfig::default());
        for id in 1..=10 {
            let req = RegisterRequest {
                broker_id: id,
                incarnation_id: Uuid::from_u128(id as u128),
                directory_id: Uuid::from_u128(id as u128),
                cluster_id: None,
                listeners: vec![],
                rack: None,
            };
            let p = node
                .propose_with(|img, index| ctl.register(img, &req, index as i64, 0))
                .unwrap();
            let Proposal::Appended { index, .. } = p else {
                panic!("nothing proposed")
            };
            node.handle_ready().unwrap();
            assert_eq!(node.image().applied_index, index);
            assert_eq!(node.image().brokers[&id].broker_epoch, index as i64);
        }
        assert!(node.stats().snapshots_taken >= 2);
        // A restart recovers the same image from snapshot + log.
        let image = node.image().clone();
        drop(node);
        let mut node = QuorumNode::open(config.clone(), open()).unwrap();
        for _ in 0..config.election_timeout_ticks + 1 {
            node.tick();
            node.handle_ready().unwrap();
        }
        assert!(node.is_leader());
        // The new leader's empty entry follows what was there.
        assert_eq!(node.image().applied_index, image.applied_index + 1);
        assert_eq!(node.image().brokers, image.brokers);
    }

    #[test]
    fn single_voter_in_memory() {
        let disk = MemDisk::new(LogState::new(&[1], &[]));
        single_voter_round(|| MemStorage::open(&disk));
    }

    #[test]
    fn single_voter_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        single_voter_round(|| DiskStorage::open(dir.path(), &[1], &[]).unwrap());
    }
}

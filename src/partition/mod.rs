//! One partition replica on its owning shard: the log, the high watermark, the idempotent
//! producer checks and the wake-ups of fetches waiting for data.
//!
//! A partition with one replica (or on a one-node cluster): the high watermark is the synced
//! end of its log. A replicated partition (`Replication`, Kafka's ISR rules): its leader's
//! high watermark is the lowest synced end over itself and the in-sync followers (each
//! follower reports its synced end as the offset it fetches next); a follower's is the
//! leader's, capped at its own synced end. acks=all waits for the high watermark.

pub mod rules;

use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use futures::channel::oneshot;

use crate::cluster::topic_config::EffectiveConfig;
use crate::log::batch::{validate_payload, BatchError, BatchInfo};
use crate::log::epochs::EpochEnd;
use crate::log::{EpochStamp, LogError, LogSettings, ProducerBatch, SharedLog};
use crate::notify::{Notified, Notify};
use crate::server::errors as ec;

thread_local! {
    /// The shard's "a watched partition has new data" signal (see `Partition::watch_data`).
    static WATCHED_DATA: Notify = Notify::new();
}

/// Entries the change journal keeps; a reader further behind than this starts over.
const JOURNAL_MAX: usize = 4096;

/// The shard's recent changes of what a consumer sees of a partition (high watermark, log
/// start offset), in order: an incremental fetch session whose partitions were all at their end
/// asks what changed since, instead of looking at each of its partitions again. Bounded: the
/// last `JOURNAL_MAX` changes.
#[derive(Default)]
struct Journal {
    seq: std::cell::Cell<u64>,
    recent: std::cell::RefCell<std::collections::VecDeque<(u64, (Arc<str>, i32))>>,
    changed: Notify,
}

thread_local! {
    static JOURNAL: Journal = Journal::default();
}

/// The shard's change count so far (see `changes_since`).
pub fn journal_seq() -> u64 {
    JOURNAL.with(|j| j.seq.get())
}

/// The partitions of this shard whose high watermark or log start offset changed after change
/// `seq`, and the change count now; None when the journal no longer reaches back that far.
pub fn changes_since(seq: u64) -> Option<(u64, Vec<(Arc<str>, i32)>)> {
    JOURNAL.with(|j| {
        let now = j.seq.get();
        if now == seq {
            return Some((now, Vec::new()));
        }
        let recent = j.recent.borrow();
        let oldest = recent.front().map_or(now + 1, |(s, _)| *s);
        if seq + 1 < oldest || seq > now {
            return None;
        }
        let keys = recent
            .iter()
            .skip((seq + 1 - oldest) as usize)
            .map(|(_, k)| k.clone())
            .collect();
        Some((now, keys))
    })
}

/// Completes at the next change journaled on this shard after this call.
pub fn journal_changed() -> Notified {
    JOURNAL.with(|j| j.changed.notified())
}

/// A partition removed from this shard (its topic deleted): what waits on the journal sees it.
pub fn journal_gone(topic: &Arc<str>, index: i32) {
    journal(topic, index);
}

fn journal(topic: &Arc<str>, index: i32) {
    JOURNAL.with(|j| {
        let seq = j.seq.get() + 1;
        j.seq.set(seq);
        let mut recent = j.recent.borrow_mut();
        if recent.len() >= JOURNAL_MAX {
            recent.pop_front();
        }
        recent.push_back((seq, (topic.clone(), index)));
        drop(recent);
        j.changed.notify_waiters();
    })
}

/// Completes when a partition of this shard that some fetch watches next gets readable data
/// (not before the call). The waiter then checks its own partitions: the signal is shared.
pub fn watched_data_changed() -> Notified {
    WATCHED_DATA.with(Notify::notified)
}

/// A fetch long-poll's watch on one partition (`Partition::watch_data`).
pub struct DataWatch(PartitionRef);

impl DataWatch {
    pub fn partition(&self) -> &PartitionRef {
        &self.0
    }
}

impl Drop for DataWatch {
    fn drop(&mut self) {
        let n = &self.0.data_watchers;
        n.set(n.get().saturating_sub(1));
    }
}

pub struct Partition {
    pub topic: Arc<str>,
    pub index: i32,
    pub log: SharedLog,
    /// Fetch long-polls over a few partitions wait on this; an entry lives only as long as
    /// its fetch waits.
    data_ready: Notify,
    /// Fetch long-polls over many partitions watching this one (`watch_data`): while any
    /// does, new data fires the shard's `WATCHED_DATA` signal.
    data_watchers: std::cell::Cell<u32>,
    syncer_running: std::cell::Cell<bool>,
    /// What consumers may read (tuning `log.visibility`).
    visibility: Visibility,
    repl: std::cell::RefCell<Replication>,
    /// Woken when the high watermark of a replicated partition moves (acks=all waits).
    hw_moved: Notify,
    /// Woken when batches are written (before their sync): followers' long polls.
    written: Notify,
}

/// A replicated partition's state on this replica: its role, the in-sync followers (from the
/// metadata image) and, on the leader, what each follower has.
#[derive(Debug, Default)]
pub struct Replication {
    /// More than one replica: the high watermark follows the ISR.
    pub replicated: bool,
    /// The replication factor.
    pub replicas: usize,
    pub leader: bool,
    /// The partition's leader as the image says (-1: none).
    pub leader_id: i32,
    /// The partition's leader epoch as the image says (0 on a single node): what this
    /// replica stamps in the batches it appends as leader, and what fetches are checked
    /// against (KIP-320).
    pub leader_epoch: i32,
    /// The in-sync replicas other than the leader (leader's view).
    pub isr_followers: Vec<i32>,
    /// Followers the leader asked the controller to add to the ISR, not yet in the image: they
    /// count for the high watermark already (KIP-497), so none joins without what it covers.
    pub pending_isr_adds: Vec<i32>,
    /// Per follower: its synced log end, as its last fetch said.
    pub follower_end: std::collections::HashMap<i32, u64>,
    /// Per follower: the leader's end when it answered the follower's last fetch, and when the
    /// follower last caught up with that (fetched from at least the previous answer's end:
    /// Kafka's rule for staying in, or joining, the ISR).
    pub follower_seen: std::collections::HashMap<i32, (u64, std::time::Instant)>,
    /// Per follower: its log start offset, as its last fetch said (the low watermark).
    pub follower_log_start: std::collections::HashMap<i32, u64>,
    /// The high watermark (monotonic on the leader; the leader's, capped, on a follower).
    pub hw: u64,
    /// On a follower: the leader's high watermark from its last answer, uncapped.
    pub leader_hw_seen: u64,
    /// Roles were set once from the image.
    pub initialized: bool,
    /// A follower must cut its log back to this before it fetches: the leader said where
    /// their logs diverge (KIP-279), or that its fetch offset is past the leader's log.
    /// With `true`: empty the log and start at the offset (behind the leader's log start).
    pub truncate_to: Option<(u64, bool)>,
    /// The high watermark last persisted, and when.
    pub hw_saved: (u64, Option<std::time::Instant>),
    /// replica.lag.time.max.ms: an in-sync follower that has not caught up for this long
    /// no longer counts towards min.insync.replicas, even before the controller (which may be
    /// unreachable) takes it out of the ISR.
    pub lag_max: std::time::Duration,
}

/// What the high watermark of a single replica is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    /// The synced end: nothing a power cut can take back is ever served.
    Synced,
    /// The written end, as Kafka with one replica: faster where flushes are slow, but a power
    /// cut can take back records that consumers have read.
    Written,
}

/// A produce whose batches are queued: offsets assigned, write pending.
pub struct Queued {
    pub base_offset: u64,
    end_offset: u64,
    log_append_time_ms: i64,
    /// None for a duplicate of an already stored batch.
    written: Option<oneshot::Receiver<Result<(), String>>>,
}

#[derive(Debug, Clone, Copy)]
pub struct Appended {
    pub base_offset: i64,
    /// One past the last offset appended.
    pub end_offset: u64,
    pub log_append_time_ms: i64,
    pub log_start_offset: i64,
}

/// The leader epoch of every partition of a single node (no controller ever elects another).
pub const LEADER_EPOCH: i32 = 0;

fn log_error_code(e: &LogError) -> i16 {
    match e {
        LogError::OffsetOutOfRange { .. } => ec::OFFSET_OUT_OF_RANGE,
        LogError::Io { .. } => ec::KAFKA_STORAGE_ERROR,
    }
}

impl Partition {
    pub async fn open(
        topic: Arc<str>,
        index: i32,
        dir: std::path::PathBuf,
        visibility: Visibility,
    ) -> Result<Partition, LogError> {
        let saved_hw = crate::log::recovery::read_high_watermark(&dir).unwrap_or(0);
        Ok(Partition {
            topic,
            index,
            log: SharedLog::open(dir).await?,
            data_ready: Notify::new(),
            data_watchers: std::cell::Cell::new(0),
            syncer_running: std::cell::Cell::new(false),
            visibility,
            repl: std::cell::RefCell::new(Replication {
                hw: saved_hw,
                hw_saved: (saved_hw, None),
                lag_max: std::time::Duration::from_secs(30),
                ..Replication::default()
            }),
            hw_moved: Notify::new(),
            written: Notify::new(),
        })
    }

    /// The role and ISR from the metadata image. `isr_followers` are the in-sync replicas
    /// other than the leader; `replicas` the replication factor. A replica that starts to
    /// follow keeps its log: where it differs from the new leader's is found by comparing
    /// leader epochs on its first fetch (KIP-101/279), never by cutting to the high
    /// watermark, which could drop records an acks=all producer was told are safe.
    pub fn set_replication(
        &self,
        replicas: usize,
        leader_id: i32,
        leader_epoch: i32,
        me: i32,
        isr_followers: Vec<i32>,
    ) {
        {
            let mut r = self.repl.borrow_mut();
            let leader = leader_id == me;
            let became_leader = leader && !r.leader;
            if leader_id != r.leader_id || leader_epoch != r.leader_epoch {
                // A cut decided under another leader says nothing about this one.
                r.truncate_to = None;
            }
            r.initialized = true;
            r.leader_id = leader_id;
            r.leader_epoch = leader_epoch;
            if became_leader {
                // Positions from an earlier reign say nothing about what followers hold now.
                r.follower_end.clear();
                r.follower_seen.clear();
                r.follower_log_start.clear();
            }
            r.replicated = replicas > 1;
            r.replicas = replicas;
            r.leader = leader;
            let now = std::time::Instant::now();
            for f in &isr_followers {
                // A member (new, or of a new leader) gets a full lag allowance from now.
                if became_leader || !r.isr_followers.contains(f) {
                    let end = r.follower_seen.get(f).map_or(0, |s| s.0);
                    r.follower_seen.insert(*f, (end, now));
                }
            }
            if r.isr_followers != isr_followers || became_leader {
                r.pending_isr_adds.clear();
            }
            r.isr_followers = isr_followers;
            if became_leader {
                // A new leader starts from what it knew as a follower (Kafka's rule: its high
                // watermark may start lower than its predecessor's, never higher than its own
                // synced end).
                r.hw = r.hw.min(self.durable_end());
            }
        }
        self.recompute_hw();
        // A role change may move what consumers see (a partition no longer replicated serves
        // up to its own end): sessions look at it again.
        journal(&self.topic, self.index);
    }

    pub fn replication(&self) -> std::cell::Ref<'_, Replication> {
        self.repl.borrow()
    }

    /// The leader epoch this replica knows for the partition.
    pub fn leader_epoch(&self) -> i32 {
        self.repl.borrow().leader_epoch
    }

    /// KIP-320: a request that names the leader epoch it expects (-1: none) is refused when
    /// it is older than this replica's (FENCED_LEADER_EPOCH: the client's metadata is stale)
    /// or newer (UNKNOWN_LEADER_EPOCH: this replica has not seen that election yet).
    pub fn check_current_epoch(&self, current: i32) -> Result<(), i16> {
        rules::check_epoch(self.leader_epoch(), current).map_err(|m| match m {
            rules::EpochMismatch::Fenced => ec::FENCED_LEADER_EPOCH,
            rules::EpochMismatch::Unknown => ec::UNKNOWN_LEADER_EPOCH,
        })
    }

    /// Where epoch `requested` ends in this log (OffsetForLeaderEpoch); a leader owns its
    /// current epoch from its log end on even before writing in it.
    pub fn end_offset_for_epoch(&self, requested: i32) -> Option<EpochEnd> {
        let leading = {
            let r = self.repl.borrow();
            (r.leader || !r.replicated).then_some(r.leader_epoch)
        };
        self.log.end_offset_for_epoch(requested, leading)
    }

    /// On the leader, for a follower's fetch from `fetch_offset` whose last batch has epoch
    /// `last_fetched_epoch` (Fetch v12+): the epoch and end offset to send back as
    /// DivergingEpoch when the follower's log cannot be a prefix of this one, as Kafka does.
    /// (An epoch this log cannot place, newer than any it knows, is fenced by the current
    /// epoch check before this is asked.)
    pub fn diverging(&self, last_fetched_epoch: i32, fetch_offset: i64) -> Option<EpochEnd> {
        let leading = {
            let r = self.repl.borrow();
            (r.leader || !r.replicated).then_some(r.leader_epoch)
        };
        self.log.with_epochs(|cache, end| {
            rules::diverging(cache, end, leading, last_fetched_epoch, fetch_offset)
        })
    }

    /// On a follower: the leader answered DivergingEpoch (`epoch`, `end_offset`). Decides
    /// where to cut this log (Kafka's rule, KIP-279): to the lower of the leader's end of that
    /// epoch and this log's own end of it; when this log does not know the epoch, to the end
    /// of its largest epoch below it, and the next fetch compares again.
    pub fn truncate_for_divergence(&self, epoch: i32, end_offset: u64) {
        let (own_end, to) = self.log.with_epochs(|cache, own_end| {
            (
                own_end,
                rules::truncation_point(cache, own_end, epoch, end_offset),
            )
        });
        tracing::info!(
            "replica of {}-{} diverges from its leader at epoch {epoch} (leader's end {end_offset}): cutting from {own_end} to {to}",
            self.topic,
            self.index
        );
        self.repl.borrow_mut().truncate_to = Some((to, false));
    }

    /// On a follower: where to cut the log before fetching, once.
    pub fn take_truncation(&self) -> Option<(u64, bool)> {
        self.repl.borrow_mut().truncate_to.take()
    }

    /// On a follower: the leader's log starts past ours; empty it and start there.
    pub fn start_over_at(&self, leader_log_start: u64) {
        self.repl.borrow_mut().truncate_to = Some((leader_log_start, true));
    }

    /// On a follower: the leader said our fetch offset is past its log; cut back to what is
    /// surely shared (the lower of its high watermark and ours).
    pub fn truncate_later(&self, leader_hw: u64) {
        let mut r = self.repl.borrow_mut();
        let to = leader_hw.min(r.hw);
        r.truncate_to = Some((to, false));
    }

    /// A replica reopened after a truncation to `end`: a follower at that high watermark.
    pub fn truncated(&self, end: u64, replicas: usize) {
        let mut r = self.repl.borrow_mut();
        r.initialized = true;
        r.leader = false;
        r.replicated = replicas > 1;
        r.replicas = replicas;
        r.hw = r.hw.min(end);
        r.truncate_to = None;
    }

    /// The high watermark to persist now, if it moved and the last write is old enough.
    pub fn hw_to_save(&self, every: std::time::Duration) -> Option<u64> {
        let r = self.repl.borrow();
        if !r.replicated || !r.initialized || r.hw == r.hw_saved.0 {
            return None;
        }
        match r.hw_saved.1 {
            Some(at) if at.elapsed() < every => None,
            _ => Some(r.hw),
        }
    }

    pub fn hw_saved(&self, hw: u64) {
        self.repl.borrow_mut().hw_saved = (hw, Some(std::time::Instant::now()));
    }

    /// What this replica holds on stable storage (or has written, under `Visibility::Written`).
    pub fn durable_end(&self) -> u64 {
        match self.visibility {
            Visibility::Synced => self.log.synced_end(),
            Visibility::Written => self.log.log_end_offset(),
        }
    }

    /// On the leader: a follower fetched from `offset`, so it holds (synced) everything below.
    pub fn follower_fetched(&self, follower: i32, offset: u64, log_start: i64) {
        {
            let mut r = self.repl.borrow_mut();
            if !r.leader {
                return;
            }
            r.follower_end.insert(follower, offset);
            if log_start >= 0 {
                r.follower_log_start.insert(follower, log_start as u64);
            }
            let end = self.durable_end();
            let now = std::time::Instant::now();
            let seen = r.follower_seen.get(&follower).copied();
            let caught_up_at = if rules::caught_up(seen.map(|s| s.0), offset, end) {
                now
            } else {
                seen.map_or(now - std::time::Duration::from_secs(3600), |s| s.1)
            };
            r.follower_seen.insert(follower, (end, caught_up_at));
        }
        self.recompute_hw();
    }

    /// On a follower: how far its durable end is behind the leader's high watermark it last
    /// heard of (DescribeLogDirs' offset lag); 0 on a leader.
    pub fn replica_lag(&self) -> u64 {
        let r = self.repl.borrow();
        if r.leader || !r.replicated {
            return 0;
        }
        r.leader_hw_seen.saturating_sub(self.durable_end())
    }

    /// On the leader: whether follower `f` holds `offset` already (its last fetch came from
    /// past it), for KIP-392's choice of a read replica.
    pub fn follower_holds(&self, f: i32, offset: u64) -> bool {
        let r = self.repl.borrow();
        r.leader && r.follower_end.get(&f).is_some_and(|end| *end > offset)
    }

    /// On the leader: the lowest log start offset over itself and the followers on `live`
    /// nodes (Kafka's low watermark, what DeleteRecords answers with); a follower not heard
    /// from under this leader counts as 0.
    pub fn low_watermark(&self, live: &[i32]) -> u64 {
        let own = self.log.log_start_offset();
        let r = self.repl.borrow();
        if !r.replicated {
            return own;
        }
        live.iter()
            .map(|f| r.follower_log_start.get(f).copied().unwrap_or(0))
            .fold(own, u64::min)
    }

    /// On a follower: the leader's log start moved past ours (retention, DeleteRecords): ours
    /// follows, up to our own end.
    pub async fn follow_log_start(&self, leader_log_start: i64) {
        let own = self.log.log_start_offset();
        if leader_log_start <= own as i64 || self.replication().leader {
            return;
        }
        let to = (leader_log_start as u64).min(self.log.log_end_offset());
        if to > own {
            let moved = self.log.delete_records_before(to).await;
            self.log_start_moved();
            if let Err(e) = moved {
                tracing::warn!(
                    "replica of {}-{}: cannot follow the leader's log start {leader_log_start}: {e}",
                    self.topic,
                    self.index
                );
            }
        }
    }

    /// On the leader: the ISR it wants, by Kafka's rules, if that differs from the current
    /// one: an in-sync follower that has not caught up for `lag_max` leaves; a follower that
    /// has reached the high watermark (and caught up recently) joins.
    pub fn wanted_isr(
        &self,
        me: i32,
        replicas: &[i32],
        lag_max: std::time::Duration,
    ) -> Option<Vec<i32>> {
        let mut r = self.repl.borrow_mut();
        if !r.leader || !r.replicated {
            return None;
        }
        let now = std::time::Instant::now();
        let mut isr = vec![me];
        for f in replicas.iter().copied().filter(|f| *f != me) {
            let ago = r
                .follower_seen
                .get(&f)
                .map(|(_, at)| now.duration_since(*at));
            let member = r.isr_followers.contains(&f);
            if rules::in_wanted_isr(member, ago, r.follower_end.get(&f).copied(), r.hw, lag_max) {
                isr.push(f);
            }
        }
        // Those about to join count for the high watermark from now on.
        let adds: Vec<i32> = isr[1..]
            .iter()
            .copied()
            .filter(|f| !r.isr_followers.contains(f))
            .collect();
        r.pending_isr_adds = adds;
        let mut current = vec![me];
        current.extend(r.isr_followers.iter().copied());
        let mut a = isr.clone();
        a.sort_unstable();
        current.sort_unstable();
        (a != current).then_some(isr)
    }

    /// On a follower: the leader's high watermark from its fetch response.
    pub fn leader_hw(&self, hw: u64) {
        {
            let mut r = self.repl.borrow_mut();
            if r.leader {
                return;
            }
            r.leader_hw_seen = r.leader_hw_seen.max(hw);
            let capped = rules::follower_high_watermark(hw, self.durable_end());
            if capped <= r.hw {
                return;
            }
            r.hw = capped;
        }
        self.hw_moved.notify_waiters();
        self.wake_fetchers();
    }

    /// The leader's rule: the lowest synced end over itself and the in-sync followers.
    fn recompute_hw(&self) {
        let moved = {
            let mut r = self.repl.borrow_mut();
            if !r.replicated || !r.leader {
                return;
            }
            let ends: Vec<Option<u64>> = r
                .isr_followers
                .iter()
                .chain(r.pending_isr_adds.iter())
                .map(|f| r.follower_end.get(f).copied())
                .collect();
            let hw = rules::leader_high_watermark(self.durable_end(), &ends);
            if hw > r.hw {
                r.hw = hw;
                true
            } else {
                false
            }
        };
        if moved {
            self.hw_moved.notify_waiters();
            self.wake_fetchers();
        }
    }

    pub fn set_lag_max(&self, lag_max: std::time::Duration) {
        self.repl.borrow_mut().lag_max = lag_max;
    }

    /// The in-sync replicas that count for min.insync.replicas: the leader and the ISR's
    /// followers that caught up within replica.lag.time.max.ms. The ISR itself shrinks only
    /// through the controller; without a controller quorum it cannot, yet a leader whose
    /// followers are gone must still refuse acks=all writes instead of letting them wait.
    fn live_isr(r: &Replication) -> usize {
        let now = std::time::Instant::now();
        let ago: Vec<Option<std::time::Duration>> = r
            .isr_followers
            .iter()
            .map(|f| {
                r.follower_seen
                    .get(f)
                    .map(|(_, at)| now.duration_since(*at))
            })
            .collect();
        rules::live_isr(&ago, r.lag_max)
    }

    /// Refuses an acks=all produce before it is appended when the ISR (counting only members
    /// that keep up) is smaller than min(min.insync.replicas, replication factor) (Kafka:
    /// NOT_ENOUGH_REPLICAS).
    pub fn check_min_isr(&self, min_insync: usize) -> Result<(), (i16, String)> {
        let r = self.repl.borrow();
        if !r.replicated {
            return Ok(());
        }
        let isr = Self::live_isr(&r);
        let need = min_insync.min(r.replicas);
        if isr < need {
            return Err((
                ec::NOT_ENOUGH_REPLICAS,
                format!("{isr} in-sync replicas, min.insync.replicas needs {need}"),
            ));
        }
        Ok(())
    }

    /// acks=all on a replicated partition: waits until the high watermark covers `end` (every
    /// in-sync replica has it synced), or the deadline. If the ISR shrinks below what
    /// min.insync.replicas needs meanwhile, NOT_ENOUGH_REPLICAS_AFTER_APPEND (the records stay).
    pub async fn wait_replicated(
        &self,
        end: u64,
        min_insync: usize,
        deadline: std::time::Instant,
    ) -> Result<(), (i16, String)> {
        // Bounded by the deadline: every pass waits for a move of the high watermark.
        loop {
            let moved = self.hw_moved.notified();
            {
                let r = self.repl.borrow();
                if !r.replicated || r.hw >= end {
                    return Ok(());
                }
                if !r.leader {
                    return Err((ec::NOT_LEADER_OR_FOLLOWER, "leadership moved".into()));
                }
                if Self::live_isr(&r) < min_insync.min(r.replicas) {
                    return Err((
                        ec::NOT_ENOUGH_REPLICAS_AFTER_APPEND,
                        "the ISR shrank below min.insync.replicas".into(),
                    ));
                }
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err((
                    ec::REQUEST_TIMED_OUT,
                    "in-sync replicas did not confirm in time".into(),
                ));
            }
            let timer = glommio::timer::sleep(left.min(std::time::Duration::from_millis(500)));
            futures::pin_mut!(timer);
            futures::pin_mut!(moved);
            let _ = futures::future::select(moved, timer).await;
        }
    }

    /// What consumers may read: by default the synced end, so that nothing a power cut can
    /// take back is ever served (single replica: the high watermark is the durable log end).
    pub fn high_watermark(&self) -> i64 {
        let own = self.durable_end();
        let r = self.repl.borrow();
        if r.replicated {
            return r.hw.min(own) as i64;
        }
        own as i64
    }

    /// No write or sync of this partition is running (tests and shutdown wait for it).
    pub fn is_idle(&self) -> bool {
        !self.log.flushing.get() && !self.syncer_running.get() && !self.log.removing.get()
    }

    /// Completes when batches are next written (a follower's fetch long-poll).
    pub fn wait_for_written(&self) -> Notified {
        self.written.notified()
    }

    /// Completes at the next append (fetch long-poll). Dropping it (the fetch timed out or
    /// ended) removes its registration, so idle partitions accumulate nothing.
    pub fn wait_for_data(&self) -> Notified {
        self.data_ready.notified()
    }

    /// Marks this partition as watched by a fetch long-poll until the guard is dropped: while
    /// it is, new readable data fires `watched_data_changed`. A watch is a counter, not a
    /// registration: a long-poll over thousands of partitions costs one increment each and
    /// one waiter on the shard, and a watch that ends leaves nothing behind.
    pub fn watch_data(self: &Rc<Self>) -> DataWatch {
        self.data_watchers.set(self.data_watchers.get() + 1);
        DataWatch(self.clone())
    }

    /// Fetch long-polls waiting on this partition (for tests and metrics).
    pub fn data_waiters(&self) -> usize {
        self.data_ready.waiters() + self.data_watchers.get() as usize
    }

    /// The log start offset moved (retention, DeleteRecords, a follower following its leader):
    /// consumers' incremental fetch sessions must look at the partition again.
    pub fn log_start_moved(&self) {
        journal(&self.topic, self.index);
    }

    fn wake_fetchers(&self) {
        journal(&self.topic, self.index);
        self.data_ready.notify_waiters();
        if self.data_watchers.get() > 0 {
            WATCHED_DATA.with(Notify::notify_waiters);
        }
    }

    /// Validates and appends one partition's records; waits for fdatasync when acks=all.
    pub async fn produce(
        self: &Rc<Self>,
        records: Bytes,
        acks: i16,
        cfg: &EffectiveConfig,
        cache_bytes_max: usize,
    ) -> Result<Appended, (i16, String)> {
        if acks == -1 {
            self.check_min_isr(cfg.min_insync_replicas)?;
        }
        let q = self.enqueue(records, cfg, cache_bytes_max)?;
        let a = self.complete(q, acks == -1, 0).await?;
        if acks == -1 {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            self.wait_replicated(a.end_offset, cfg.min_insync_replicas, deadline)
                .await?;
        }
        Ok(a)
    }

    /// First half of a produce, with no waiting: validates, checks producer sequences, assigns
    /// offsets and queues the batches for the partition's writer. Requests queued in order get
    /// offsets in that order.
    pub fn enqueue(
        self: &Rc<Self>,
        records: Bytes,
        cfg: &EffectiveConfig,
        cache_bytes_max: usize,
    ) -> Result<Queued, (i16, String)> {
        let mut infos: Vec<BatchInfo> = Vec::new();
        if let Err(e) = validate_payload(&records, cfg.max_message_bytes, &mut infos) {
            let code = match e {
                BatchError::CorruptCrc => ec::CORRUPT_MESSAGE,
                BatchError::TooLarge(_) => ec::MESSAGE_TOO_LARGE,
                BatchError::UnsupportedMagic(_) => ec::UNSUPPORTED_FOR_MESSAGE_FORMAT,
                BatchError::Truncated | BatchError::Malformed(_) => ec::CORRUPT_MESSAGE,
            };
            tracing::warn!("rejected produce to {}-{}: {e}", self.topic, self.index);
            return Err((code, e.to_string()));
        }
        if infos.iter().any(|i| i.is_transactional || i.is_control) {
            return Err((
                ec::UNSUPPORTED_VERSION,
                "transactions are not supported yet".into(),
            ));
        }
        if let Some(reason) = self.log.fenced() {
            return Err((ec::KAFKA_STORAGE_ERROR, reason));
        }
        {
            // The image may already name this node leader while this replica has not taken
            // the role (and its epoch) yet: nothing is stamped with a stale epoch.
            let r = self.repl.borrow();
            if r.initialized && !r.leader {
                return Err((
                    ec::NOT_LEADER_OR_FOLLOWER,
                    "this replica is not the leader (yet)".into(),
                ));
            }
        }
        if let Some(dup) = self.check_sequences(&infos)? {
            // The original may still be queued or unsynced: the duplicate is answered only
            // once the original would be (written, and synced when the ack needs it).
            let end = dup.last_offset + 1;
            return Ok(Queued {
                base_offset: dup.base_offset,
                end_offset: end,
                log_append_time_ms: -1,
                written: Some(self.log.wait_written(end)),
            });
        }
        let lat = if cfg.log_append_time {
            Some(crate::log::now_ms() as i64)
        } else {
            None
        };
        let epoch = self.repl.borrow().leader_epoch;
        let (base, end) = self
            .log
            .enqueue(&records, &infos, EpochStamp::Leader(epoch), lat);
        self.record_producers(base, &infos);
        let written = self.log.wait_written(end);
        self.kick_writer(log_settings(cfg, cache_bytes_max));
        Ok(Queued {
            base_offset: base,
            end_offset: end,
            log_append_time_ms: lat.unwrap_or(-1),
            written: Some(written),
        })
    }

    /// Idempotent producers' sequence state of appended batches (leader and followers alike,
    /// so that sequence checks survive a change of leader).
    fn record_producers(&self, base: u64, infos: &[BatchInfo]) {
        let mut log = self.log.inner.borrow_mut();
        let mut next = base;
        for i in infos {
            if i.producer_id >= 0 {
                log.producers.entry(i.producer_id).or_default().record(
                    i.producer_epoch,
                    ProducerBatch {
                        first_seq: i.base_sequence,
                        last_seq: i.last_sequence,
                        base_offset: next,
                        last_offset: next + i.last_offset_delta as u64,
                    },
                );
            }
            next += i.last_offset_delta as u64 + 1;
        }
    }

    /// On a follower: appends batches fetched from the leader, with the offsets the leader
    /// gave them, and returns once they are written and synced (a follower reports only what
    /// it has on disk). The first batch must start at this replica's log end.
    pub async fn append_replicated(
        self: &Rc<Self>,
        records: Bytes,
        cfg: &EffectiveConfig,
        cache_bytes_max: usize,
    ) -> Result<u64, (i16, String)> {
        let mut infos: Vec<BatchInfo> = Vec::new();
        // The leader accepted these batches; only their integrity is checked again here.
        validate_payload(&records, usize::MAX >> 1, &mut infos)
            .map_err(|e| (ec::CORRUPT_MESSAGE, e.to_string()))?;
        if infos.is_empty() {
            return Ok(self.log.log_end_offset());
        }
        if let Some(reason) = self.log.fenced() {
            return Err((ec::KAFKA_STORAGE_ERROR, reason));
        }
        if self.repl.borrow().leader {
            return Err((
                ec::NOT_LEADER_OR_FOLLOWER,
                "this replica leads now: it takes no data from another".into(),
            ));
        }
        let next = self.log.log_end_offset();
        if self.log.flushing.get() {
            return Err((ec::OFFSET_OUT_OF_RANGE, "a write is still running".into()));
        }
        // Only batches that continue this log, in the leader's offsets (gaps included) and in
        // epochs between this log's last and the current leader's, are appended.
        let (latest, current) = (self.log.latest_epoch(), self.leader_epoch());
        let mut expect = next;
        let mut take = 0usize;
        let mut min_epoch = latest;
        for info in &infos {
            let at = info.pos;
            let base = u64::from_be_bytes(records[at..at + 8].try_into().unwrap_or([0; 8]));
            // A gap is a compacted leader's (offsets are never reused): it is kept as is.
            if base < expect || info.leader_epoch < min_epoch || info.leader_epoch > current {
                break;
            }
            min_epoch = info.leader_epoch;
            expect = base + info.last_offset_delta as u64 + 1;
            take += 1;
        }
        if take == 0 {
            let first = u64::from_be_bytes(records[..8].try_into().unwrap_or([0; 8]));
            return Err((
                ec::OFFSET_OUT_OF_RANGE,
                format!(
                    "fetched batch at {first} (epoch {}), log ends at {next} (epoch {latest}, leader epoch {current})",
                    infos[0].leader_epoch
                ),
            ));
        }
        let (records, infos) = if take < infos.len() {
            let upto = infos[take].pos;
            infos.truncate(take);
            (records.slice(..upto), infos)
        } else {
            (records, infos)
        };
        let (_, end) = self.log.enqueue(&records, &infos, EpochStamp::AsSent, None);
        for info in &infos {
            let at = info.pos;
            let base = u64::from_be_bytes(records[at..at + 8].try_into().unwrap_or([0; 8]));
            self.record_producers(base, std::slice::from_ref(info));
        }
        let written = self.log.wait_written(end);
        self.kick_writer(log_settings(cfg, cache_bytes_max));
        match written.await {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => return Err((ec::KAFKA_STORAGE_ERROR, msg)),
            Err(_) => return Err((ec::KAFKA_STORAGE_ERROR, "write abandoned".into())),
        }
        self.log
            .sync_to(end)
            .await
            .map_err(|e| (ec::KAFKA_STORAGE_ERROR, e.to_string()))?;
        // The synced end moved: a consumer long-poll may now read (the syncer, finding nothing
        // left to sync, would not say so).
        self.wake_fetchers();
        Ok(end)
    }

    /// Second half of a produce: waits for the write, then for fdatasync when `sync` (acks=all,
    /// or the fsync policy says every write), after an optional group-commit window.
    pub async fn complete(
        &self,
        q: Queued,
        sync: bool,
        commit_window_us: u64,
    ) -> Result<Appended, (i16, String)> {
        let log_start_offset = self.log.log_start_offset() as i64;
        let Some(written) = q.written else {
            return Ok(Appended {
                base_offset: q.base_offset as i64,
                end_offset: q.end_offset,
                log_append_time_ms: -1,
                log_start_offset,
            });
        };
        match written.await {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => return Err((ec::KAFKA_STORAGE_ERROR, msg)),
            Err(_) => return Err((ec::KAFKA_STORAGE_ERROR, "write abandoned".into())),
        }
        if sync {
            if commit_window_us > 0 && !self.log.is_syncing() {
                glommio::timer::sleep(std::time::Duration::from_micros(commit_window_us)).await;
            }
            self.log.sync_to(q.end_offset).await.map_err(|e| {
                tracing::error!("fdatasync of {}-{} failed: {e}", self.topic, self.index);
                (ec::KAFKA_STORAGE_ERROR, e.to_string())
            })?;
            self.recompute_hw();
            if !self.replication().replicated {
                // The synced end is the high watermark (a replicated one moves by
                // `recompute_hw`).
                self.wake_fetchers();
            }
        }
        Ok(Appended {
            base_offset: q.base_offset as i64,
            end_offset: q.end_offset,
            log_append_time_ms: q.log_append_time_ms,
            log_start_offset,
        })
    }

    /// Starts the partition's writer task unless it runs: it writes queued batches, one DMA
    /// write per round, until nothing is queued. Appends that arrive during a write go together
    /// in the next one (group write).
    fn kick_writer(self: &Rc<Self>, settings: LogSettings) {
        if self.log.flushing.get() {
            return;
        }
        self.log.flushing.set(true);
        let me = self.clone();
        glommio::spawn_local(async move {
            // Bounded by the queue: each round writes everything queued so far.
            loop {
                match me.log.flush_round(&settings).await {
                    Ok(true) if me.visibility == Visibility::Written => {
                        me.written.notify_waiters();
                        me.recompute_hw();
                        me.wake_fetchers()
                    }
                    Ok(true) => {
                        me.written.notify_waiters();
                        me.kick_syncer(settings.visibility_sync_delay_us)
                    }
                    Ok(false) => break,
                    Err(e) => tracing::error!("write to {}-{} failed: {e}", me.topic, me.index),
                }
            }
            me.log.flushing.set(false);
        })
        .detach();
    }

    /// Starts the partition's background syncer unless it runs: it fdatasyncs what was written
    /// (sharing each sync with acks=all producers waiting for the same one) and wakes the
    /// fetches waiting for the high watermark to move, until the synced end catches up.
    fn kick_syncer(self: &Rc<Self>, delay_us: u64) {
        if self.syncer_running.get() {
            return;
        }
        self.syncer_running.set(true);
        let me = self.clone();
        glommio::spawn_local(async move {
            // Bounded by the writes: each pass syncs everything written before it started.
            loop {
                if me.log.synced_end() >= me.log.log_end_offset() {
                    break;
                }
                if delay_us > 0 && !me.log.is_syncing() {
                    glommio::timer::sleep(std::time::Duration::from_micros(delay_us)).await;
                }
                let end = me.log.log_end_offset();
                if let Err(e) = me.log.sync_to(end).await {
                    tracing::error!("fdatasync of {}-{} failed: {e}", me.topic, me.index);
                    break;
                }
                me.recompute_hw();
                me.wake_fetchers();
            }
            me.syncer_running.set(false);
        })
        .detach();
    }

    /// Returns Some(base offset) for a duplicate of a recent batch, an error for a sequence
    /// gap or a fenced epoch, None when the batches are new.
    fn check_sequences(&self, infos: &[BatchInfo]) -> Result<Option<ProducerBatch>, (i16, String)> {
        let log = self.log.inner.borrow();
        for i in infos {
            if i.producer_id < 0 {
                continue;
            }
            let Some(e) = log.producers.get(&i.producer_id) else {
                if i.base_sequence != 0 {
                    return Err((
                        ec::OUT_OF_ORDER_SEQUENCE_NUMBER,
                        format!(
                            "unknown producer {} with sequence {}",
                            i.producer_id, i.base_sequence
                        ),
                    ));
                }
                continue;
            };
            if i.producer_epoch < e.epoch {
                return Err((
                    ec::INVALID_PRODUCER_EPOCH,
                    format!(
                        "producer epoch {} is fenced by {}",
                        i.producer_epoch, e.epoch
                    ),
                ));
            }
            if i.producer_epoch > e.epoch {
                if i.base_sequence != 0 {
                    return Err((
                        ec::OUT_OF_ORDER_SEQUENCE_NUMBER,
                        "new epoch must start at sequence 0".into(),
                    ));
                }
                continue;
            }
            if let Some(b) = e
                .batches
                .iter()
                .find(|b| b.first_seq == i.base_sequence && b.last_seq == i.last_sequence)
            {
                if infos.len() == 1 {
                    return Ok(Some(*b));
                }
            }
            let last = e.batches.back().map(|b| b.last_seq).unwrap_or(-1);
            let expected = if last == i32::MAX { 0 } else { last + 1 };
            if i.base_sequence != expected {
                return Err((
                    ec::OUT_OF_ORDER_SEQUENCE_NUMBER,
                    format!("expected sequence {expected}, got {}", i.base_sequence),
                ));
            }
        }
        Ok(None)
    }

    /// For a follower's fetch: stored batches from `offset` up to what this replica has
    /// written, synced or not (as Kafka's leader serves its followers up to its log end): the
    /// follower's write and sync then run while the leader's own sync does. Nothing is
    /// acknowledged before the leader's sync too (the high watermark counts the leader's
    /// synced end), and a follower that got what a power cut then took from the leader holds
    /// an unacknowledged tail that the leader epochs cut (KIP-101).
    pub async fn read_for_follower(
        &self,
        offset: i64,
        max_bytes: usize,
    ) -> Result<Vec<Bytes>, i16> {
        if offset < 0 {
            return Err(ec::OFFSET_OUT_OF_RANGE);
        }
        let upper = self.log.log_end_offset();
        if offset as u64 >= upper {
            return if offset as u64 > upper {
                Err(ec::OFFSET_OUT_OF_RANGE)
            } else {
                Ok(Vec::new())
            };
        }
        self.log
            .read_chunks(offset as u64, max_bytes, upper)
            .await
            .map_err(|e| log_error_code(&e))
    }

    /// Stored batches from `offset`, as chunks to be written out without copying.
    pub async fn read(&self, offset: i64, max_bytes: usize) -> Result<Vec<Bytes>, i16> {
        if offset < 0 {
            return Err(ec::OFFSET_OUT_OF_RANGE);
        }
        let hwm = self.high_watermark() as u64;
        self.log
            .read_chunks(offset as u64, max_bytes, hwm)
            .await
            .map_err(|e| log_error_code(&e))
    }
}

pub type PartitionRef = Rc<Partition>;

fn log_settings(cfg: &EffectiveConfig, cache_bytes_max: usize) -> LogSettings {
    LogSettings {
        segment_bytes: cfg.segment_bytes,
        segment_ms: cfg.segment_ms,
        retention_ms: cfg.retention_ms,
        retention_bytes: cfg.retention_bytes,
        cache_bytes_max,
        visibility_sync_delay_us: cfg.visibility_sync_delay_us,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The journal hands out what changed after a count, in order, and says when it no longer
    /// reaches back that far (the reader must then look at everything).
    #[test]
    fn the_change_journal_answers_since_a_count_or_admits_it_cannot() {
        let t: Arc<str> = Arc::from("j");
        let start = journal_seq();
        assert_eq!(changes_since(start), Some((start, Vec::new())));
        journal(&t, 1);
        journal(&t, 2);
        let (now, keys) = changes_since(start).unwrap();
        assert_eq!(now, start + 2);
        assert_eq!(keys, vec![(t.clone(), 1), (t.clone(), 2)]);
        assert_eq!(changes_since(start + 1).unwrap().1, vec![(t.clone(), 2)]);
        for i in 0..JOURNAL_MAX as i32 {
            journal(&t, i);
        }
        assert_eq!(changes_since(start), None, "overwritten: cannot tell");
        let (_, keys) = changes_since(journal_seq() - 3).unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(
            changes_since(journal_seq() + 1),
            None,
            "a count from elsewhere"
        );
    }
}

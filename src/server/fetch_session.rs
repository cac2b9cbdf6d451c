//! Incremental fetch sessions (KIP-227): a client that fetches many partitions names them once;
//! later fetches send only what changed (new partitions, new positions, forgotten ones) and get
//! back only partitions with something new (records, an error, a moved high watermark or log
//! start offset).
//!
//! Each shard keeps its own cache of sessions, keyed by session id, for the connections it
//! serves; a client whose connection lands on another shard gets FETCH_SESSION_ID_NOT_FOUND and
//! starts a new session, as clients do after any session error. The cache holds at most
//! `memory.fetch_session_cache_slots` sessions (Kafka's max.incremental.fetch.session.cache.slots);
//! when it is full, a new session takes the slot of the least recently used one idle for
//! `EVICTABLE_AFTER`, else the client is answered without a session (session id 0) and keeps
//! fetching in full, as Kafka does.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// A session unused this long may be evicted for a new one (Kafka's 2 minutes).
pub const EVICTABLE_AFTER: Duration = Duration::from_secs(120);

/// The session epoch that asks for a new session (full fetch).
pub const INITIAL_EPOCH: i32 = 0;
/// The session epoch of a sessionless fetch, or of one that closes its session.
pub const FINAL_EPOCH: i32 = -1;

/// What the session remembers of one partition: the client's position, and what the client
/// was last told, so that unchanged partitions can be left out.
#[derive(Debug, Clone, PartialEq)]
pub struct Cached {
    pub topic_id: uuid::Uuid,
    pub fetch_offset: i64,
    pub max_bytes: i32,
    pub high_watermark: i64,
    pub log_start_offset: i64,
}

/// (topic name, partition).
pub type Key = (std::sync::Arc<str>, i32);

/// What an incremental fetch of a session needs to look at, as of its last answer: every
/// partition but `pending` was at its end then (nothing to read, nothing new to tell), so only
/// `pending` and what the shards journaled a change of since `marks` may have news.
#[derive(Debug, Clone)]
pub struct Settled {
    /// The metadata image then (leadership and topics unchanged while it is current); weak,
    /// so that an abandoned session pins no image.
    pub image: std::sync::Weak<crate::cluster::metadata::MetadataImage>,
    /// Per shard holding session partitions: its change journal's count then
    /// (`partition::changes_since`).
    pub marks: Vec<(usize, u64)>,
    /// Partitions that were not at their end (records to read, an error).
    pub pending: Vec<Key>,
}

impl PartialEq for Settled {
    fn eq(&self, other: &Settled) -> bool {
        std::sync::Weak::ptr_eq(&self.image, &other.image)
            && self.marks == other.marks
            && self.pending == other.pending
    }
}

#[derive(Debug)]
struct Session {
    /// The epoch the next fetch must carry.
    next_epoch: i32,
    partitions: BTreeMap<Key, Cached>,
    last_used: Instant,
    settled: Option<Settled>,
}

#[derive(Default)]
pub struct Cache {
    sessions: HashMap<i32, Session>,
    next_id: i32,
}

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
}

/// Runs `f` on this shard's session cache.
pub fn with<R>(f: impl FnOnce(&mut Cache) -> R) -> R {
    CACHE.with(|c| f(&mut c.borrow_mut()))
}

/// How a fetch relates to the sessions.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// A full fetch without a session (old versions, epoch -1, or a closed session).
    Sessionless,
    /// A full fetch that opens a new session once answered.
    Open,
    /// An incremental fetch of session `id`: these partitions at these positions.
    Incremental {
        id: i32,
        partitions: Vec<(Key, Cached)>,
    },
    /// An incremental fetch of a settled session: only the partitions the request named and
    /// those changed since `settled` need a look (`partitions_of`).
    Settled {
        id: i32,
        named: Vec<Key>,
        settled: Settled,
    },
    /// A session error, answered with this code and nothing else.
    Error(i16),
}

/// One partition named in a fetch request.
pub struct Named {
    pub key: Key,
    pub topic_id: uuid::Uuid,
    pub fetch_offset: i64,
    pub max_bytes: i32,
}

fn next_epoch(e: i32) -> i32 {
    if e == i32::MAX {
        1
    } else {
        e + 1
    }
}

impl Cache {
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Decides how to answer a fetch with this session id and epoch, and applies its changes
    /// (partitions named, partitions forgotten) to an incremental session.
    pub fn plan(
        &mut self,
        session_id: i32,
        epoch: i32,
        named: Vec<Named>,
        forgotten: Vec<Key>,
        now: Instant,
    ) -> Plan {
        if epoch == FINAL_EPOCH || epoch == INITIAL_EPOCH {
            if session_id != 0 {
                self.sessions.remove(&session_id);
            }
            return if epoch == INITIAL_EPOCH {
                Plan::Open
            } else {
                Plan::Sessionless
            };
        }
        let Some(s) = self.sessions.get_mut(&session_id) else {
            return Plan::Error(super::errors::FETCH_SESSION_ID_NOT_FOUND);
        };
        if epoch != s.next_epoch {
            return Plan::Error(super::errors::INVALID_FETCH_SESSION_EPOCH);
        }
        s.next_epoch = next_epoch(epoch);
        s.last_used = now;
        let named_keys: Vec<Key> = if s.settled.is_some() {
            named.iter().map(|n| n.key.clone()).collect()
        } else {
            Vec::new()
        };
        for n in named {
            match s.partitions.get_mut(&n.key) {
                Some(c) => {
                    c.fetch_offset = n.fetch_offset;
                    c.max_bytes = n.max_bytes;
                    c.topic_id = n.topic_id;
                }
                None => {
                    s.partitions.insert(
                        n.key,
                        Cached {
                            topic_id: n.topic_id,
                            fetch_offset: n.fetch_offset,
                            max_bytes: n.max_bytes,
                            // Unknown to the client: the first answer always includes it.
                            high_watermark: i64::MIN,
                            log_start_offset: i64::MIN,
                        },
                    );
                }
            }
        }
        for k in forgotten {
            s.partitions.remove(&k);
        }
        if let Some(settled) = s.settled.take() {
            return Plan::Settled {
                id: session_id,
                named: named_keys,
                settled,
            };
        }
        Plan::Incremental {
            id: session_id,
            partitions: s
                .partitions
                .iter()
                .map(|(k, c)| (k.clone(), c.clone()))
                .collect(),
        }
    }

    /// Opens a session holding `partitions` (as just answered in full); returns its id, or 0
    /// when there is no slot for it.
    pub fn open(&mut self, partitions: BTreeMap<Key, Cached>, slots: usize, now: Instant) -> i32 {
        if slots == 0 {
            return 0;
        }
        if self.sessions.len() >= slots {
            let victim = self
                .sessions
                .iter()
                .filter(|(_, s)| now.saturating_duration_since(s.last_used) >= EVICTABLE_AFTER)
                .min_by_key(|(_, s)| s.last_used)
                .map(|(id, _)| *id);
            match victim {
                Some(id) => {
                    self.sessions.remove(&id);
                }
                None => return 0,
            }
        }
        let id = self.fresh_id();
        self.sessions.insert(
            id,
            Session {
                next_epoch: 1,
                partitions,
                last_used: now,
                settled: None,
            },
        );
        id
    }

    /// Whether session `id` holds partition `key`.
    pub fn holds(&self, id: i32, key: &Key) -> bool {
        self.sessions
            .get(&id)
            .is_some_and(|s| s.partitions.contains_key(key))
    }

    /// Session `id`'s partitions: those of `keys` it holds, or all of them (None).
    pub fn partitions_of(&self, id: i32, keys: Option<&[Key]>) -> Vec<(Key, Cached)> {
        let Some(s) = self.sessions.get(&id) else {
            return Vec::new();
        };
        match keys {
            None => s
                .partitions
                .iter()
                .map(|(k, c)| (k.clone(), c.clone()))
                .collect(),
            Some(keys) => keys
                .iter()
                .filter_map(|k| s.partitions.get(k).map(|c| (k.clone(), c.clone())))
                .collect(),
        }
    }

    /// Marks session `id` settled as of `settled` (all its partitions at their end), or not.
    pub fn settle(&mut self, id: i32, settled: Option<Settled>) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.settled = settled;
        }
    }

    /// Records what the client was told of each partition in an answer of session `id`.
    pub fn answered(&mut self, id: i32, told: &[(Key, i64, i64)]) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        for (k, hw, start) in told {
            if let Some(c) = s.partitions.get_mut(k) {
                c.high_watermark = *hw;
                c.log_start_offset = *start;
            }
        }
    }

    /// A positive id not in use; ids are not reused soon after a session ends.
    fn fresh_id(&mut self) -> i32 {
        if self.next_id == 0 {
            // Different shards and restarts start in different places.
            self.next_id = (std::process::id() as i32
                ^ (Instant::now().elapsed().as_nanos() as i32))
                .wrapping_mul(2_654_435)
                & 0x3fff_ffff;
        }
        loop {
            self.next_id = if self.next_id >= i32::MAX - 1 {
                1
            } else {
                self.next_id + 1
            };
            if !self.sessions.contains_key(&self.next_id) {
                return self.next_id;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::errors as ec;

    fn named(p: i32, offset: i64) -> Named {
        Named {
            key: ("t".into(), p),
            topic_id: uuid::Uuid::nil(),
            fetch_offset: offset,
            max_bytes: 1 << 20,
        }
    }

    fn cached(offset: i64) -> Cached {
        Cached {
            topic_id: uuid::Uuid::nil(),
            fetch_offset: offset,
            max_bytes: 1 << 20,
            high_watermark: 10,
            log_start_offset: 0,
        }
    }

    #[test]
    fn session_lifecycle_and_errors() {
        let mut c = Cache::default();
        let now = Instant::now();
        assert_eq!(c.plan(0, -1, vec![], vec![], now), Plan::Sessionless);
        assert_eq!(c.plan(0, 0, vec![], vec![], now), Plan::Open);
        let parts: BTreeMap<Key, Cached> =
            [(("t".into(), 0), cached(0)), (("t".into(), 1), cached(5))].into();
        let id = c.open(parts, 10, now);
        assert!(id > 0);
        // Unknown session, wrong epoch.
        assert_eq!(
            c.plan(id + 1, 1, vec![], vec![], now),
            Plan::Error(ec::FETCH_SESSION_ID_NOT_FOUND)
        );
        assert_eq!(
            c.plan(id, 2, vec![], vec![], now),
            Plan::Error(ec::INVALID_FETCH_SESSION_EPOCH)
        );
        // Epoch 1: move partition 0, add 2, forget 1.
        let Plan::Incremental { partitions, .. } = c.plan(
            id,
            1,
            vec![named(0, 7), named(2, 0)],
            vec![("t".into(), 1)],
            now,
        ) else {
            panic!("incremental");
        };
        let got: Vec<(i32, i64)> = partitions
            .iter()
            .map(|(k, c)| (k.1, c.fetch_offset))
            .collect();
        assert_eq!(got, vec![(0, 7), (2, 0)]);
        // The same epoch again is refused; the next one is accepted.
        assert_eq!(
            c.plan(id, 1, vec![], vec![], now),
            Plan::Error(ec::INVALID_FETCH_SESSION_EPOCH)
        );
        assert!(matches!(
            c.plan(id, 2, vec![], vec![], now),
            Plan::Incremental { .. }
        ));
        // Epoch -1 closes it.
        assert_eq!(c.plan(id, -1, vec![], vec![], now), Plan::Sessionless);
        assert_eq!(
            c.plan(id, 3, vec![], vec![], now),
            Plan::Error(ec::FETCH_SESSION_ID_NOT_FOUND)
        );
        assert!(c.is_empty());
    }

    #[test]
    fn full_cache_evicts_only_idle_sessions() {
        let mut c = Cache::default();
        let t0 = Instant::now();
        let a = c.open(BTreeMap::new(), 2, t0);
        let b = c.open(BTreeMap::new(), 2, t0 + Duration::from_secs(1));
        assert!(a > 0 && b > 0 && a != b);
        // Full, nobody idle long enough: no session.
        assert_eq!(c.open(BTreeMap::new(), 2, t0 + Duration::from_secs(2)), 0);
        // Later the least recently used one goes.
        let later = t0 + EVICTABLE_AFTER + Duration::from_secs(1);
        let n = c.open(BTreeMap::new(), 2, later);
        assert!(n > 0);
        assert_eq!(c.len(), 2);
        assert_eq!(
            c.plan(a, 1, vec![], vec![], later),
            Plan::Error(ec::FETCH_SESSION_ID_NOT_FOUND)
        );
        assert!(matches!(
            c.plan(b, 1, vec![], vec![], later),
            Plan::Incremental { .. }
        ));
        // No slots at all: never a session.
        assert_eq!(Cache::default().open(BTreeMap::new(), 0, t0), 0);
    }
}

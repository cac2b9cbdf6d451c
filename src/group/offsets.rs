//! Committed offsets of the groups one coordinator shard serves. Sans-IO, like the group
//! state machines: no clock (time is passed in), no I/O.
//!
//! The shell checks a commit against the group's state machine, stores it in
//! `__consumer_offsets`, and only then hands it in here ([`CommittedOffsets::stored`]), so
//! OffsetFetch never reports an offset that a coordinator taking over would not know. When the
//! shell loads a partition it replays its records ([`CommittedOffsets::replay`]).
//!
//! Offsets of a group nobody consumes with expire (Kafka's `offsets.retention.minutes`, KIP-211
//! rules): once the group has been empty for the retention period, or, for a group that never
//! had members, once the commit is that old. [`CommittedOffsets::expire`] returns them for the
//! shell to tombstone, so the offsets of groups that are gone do not accumulate for ever.

use std::collections::{BTreeMap, HashMap};

use super::records::OffsetValue;

/// One committed offset as OffsetFetch reports it (offset -1: nothing committed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedPartition {
    pub partition: i32,
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: String,
}

impl CommittedPartition {
    fn of(partition: i32, v: Option<&OffsetValue>) -> CommittedPartition {
        match v {
            Some(v) => CommittedPartition {
                partition,
                offset: v.offset,
                leader_epoch: v.leader_epoch,
                metadata: v.metadata.clone(),
            },
            None => CommittedPartition {
                partition,
                offset: -1,
                leader_epoch: -1,
                metadata: String::new(),
            },
        }
    }
}

/// A topic's committed offsets, in the order asked (or topic order when all were asked for).
pub type CommittedTopic = (String, Vec<CommittedPartition>);

/// What the group state machines say about a group, for expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// It has members: its offsets stay.
    Active,
    /// Empty since this time (ms since the epoch).
    EmptySince(u64),
    /// No group state at all (a group that only commits, such as an admin's).
    Unknown,
}

/// (topic, partition) → committed offset, per group.
#[derive(Debug, Default)]
pub struct CommittedOffsets {
    groups: HashMap<String, BTreeMap<(String, i32), OffsetValue>>,
}

impl CommittedOffsets {
    /// A record read back from `__consumer_offsets` at load: a value or a tombstone.
    pub fn replay(&mut self, group: String, topic: String, partition: i32, v: Option<OffsetValue>) {
        match v {
            Some(v) => {
                self.groups
                    .entry(group)
                    .or_default()
                    .insert((topic, partition), v);
            }
            None => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.remove(&(topic, partition));
                    if g.is_empty() {
                        self.groups.remove(&group);
                    }
                }
            }
        }
    }

    /// An OffsetCommit the shell has stored: OffsetFetch reports it from now on.
    pub fn stored(&mut self, group: &str, commits: Vec<(String, i32, OffsetValue)>) {
        if commits.is_empty() {
            return;
        }
        let g = self.groups.entry(group.to_owned()).or_default();
        for (t, p, v) in commits {
            g.insert((t, p), v);
        }
    }

    /// Every group with committed offsets.
    pub fn groups(&self) -> impl Iterator<Item = &str> {
        self.groups.keys().map(String::as_str)
    }

    pub fn has_offsets(&self, group: &str) -> bool {
        self.groups.contains_key(group)
    }

    /// OffsetFetch: the committed offsets of `topics` (None: every committed partition).
    pub fn fetch(
        &self,
        group: &str,
        topics: Option<Vec<(String, Vec<i32>)>>,
    ) -> Vec<CommittedTopic> {
        let committed = self.groups.get(group);
        let lookup = |t: &str, p: i32| committed.and_then(|c| c.get(&(t.to_string(), p)));
        match topics {
            Some(ts) => ts
                .into_iter()
                .map(|(t, ps)| {
                    let rows = ps
                        .into_iter()
                        .map(|p| CommittedPartition::of(p, lookup(&t, p)))
                        .collect();
                    (t, rows)
                })
                .collect(),
            None => {
                let mut out: Vec<CommittedTopic> = Vec::new();
                for ((t, p), v) in committed.into_iter().flatten() {
                    let row = CommittedPartition::of(*p, Some(v));
                    match out.last_mut() {
                        Some((lt, rows)) if lt == t => rows.push(row),
                        _ => out.push((t.clone(), vec![row])),
                    }
                }
                out
            }
        }
    }

    /// Removes every offset of `group` (DeleteGroups) and returns what to tombstone.
    pub fn remove_group(&mut self, group: &str) -> Vec<(String, i32)> {
        self.groups
            .remove(group)
            .map(|g| g.into_keys().collect())
            .unwrap_or_default()
    }

    /// Removes one offset (OffsetDelete); true if there was one to tombstone.
    pub fn remove(&mut self, group: &str, topic: &str, partition: i32) -> bool {
        let Some(g) = self.groups.get_mut(group) else {
            return false;
        };
        let removed = g.remove(&(topic.to_owned(), partition)).is_some();
        if g.is_empty() {
            self.groups.remove(group);
        }
        removed
    }

    /// The offsets that have outlived `retention_ms` (see the module comment), by group, each
    /// with its commit timestamp. Nothing is removed: the shell confirms each group with
    /// [`CommittedOffsets::remove_if_unchanged`] right before it writes the tombstones.
    pub fn expired(
        &self,
        now_ms: u64,
        retention_ms: u64,
        activity: impl Fn(&str) -> Activity,
    ) -> BTreeMap<String, Vec<(String, i32, i64)>> {
        let mut out: BTreeMap<String, Vec<(String, i32, i64)>> = BTreeMap::new();
        for (group, offsets) in &self.groups {
            let since = match activity(group) {
                Activity::Active => continue,
                Activity::EmptySince(t) => Some(t),
                Activity::Unknown => None,
            };
            for ((t, p), v) in offsets {
                let committed = u64::try_from(v.commit_timestamp_ms).unwrap_or(0);
                let base = since.unwrap_or(0).max(committed);
                if base.saturating_add(retention_ms) <= now_ms {
                    out.entry(group.clone()).or_default().push((
                        t.clone(),
                        *p,
                        v.commit_timestamp_ms,
                    ));
                }
            }
        }
        out
    }

    /// Removes an expired offset unless it was committed again since [`CommittedOffsets::expired`]
    /// saw it; true if removed (the shell then tombstones it).
    pub fn remove_if_unchanged(
        &mut self,
        group: &str,
        topic: &str,
        partition: i32,
        committed_at: i64,
    ) -> bool {
        let unchanged = self
            .groups
            .get(group)
            .and_then(|g| g.get(&(topic.to_owned(), partition)))
            .is_some_and(|v| v.commit_timestamp_ms == committed_at);
        unchanged && self.remove(group, topic, partition)
    }

    /// Forgets the groups `unload` selects (another node coordinates them now).
    pub fn unload(&mut self, mut unload: impl FnMut(&str) -> bool) {
        self.groups.retain(|g, _| !unload(g));
    }

    /// Up to `max` groups' committed offsets, for a metrics scrape.
    pub fn sample(&self, max: usize) -> Vec<(String, Vec<(String, i32, i64)>)> {
        self.groups
            .iter()
            .take(max)
            .map(|(g, c)| {
                let rows = c
                    .iter()
                    .map(|((t, p), v)| (t.clone(), *p, v.offset))
                    .collect();
                (g.clone(), rows)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(offset: i64, at: i64) -> OffsetValue {
        OffsetValue {
            offset,
            leader_epoch: -1,
            metadata: String::new(),
            commit_timestamp_ms: at,
        }
    }

    #[test]
    fn fetch_reports_what_was_stored_and_replayed() {
        let mut c = CommittedOffsets::default();
        c.replay("g".into(), "t".into(), 0, Some(v(5, 0)));
        c.replay("g".into(), "t".into(), 1, Some(v(6, 0)));
        c.replay("g".into(), "t".into(), 1, None);
        c.stored("g", vec![("u".into(), 3, v(9, 0))]);
        let all = c.fetch("g", None);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].0, "t");
        assert_eq!((all[0].1[0].partition, all[0].1[0].offset), (0, 5));
        assert_eq!((all[1].0.as_str(), all[1].1[0].offset), ("u", 9));
        let some = c.fetch("g", Some(vec![("t".into(), vec![1, 0])]));
        assert_eq!(some[0].1[0].offset, -1, "tombstoned");
        assert_eq!(some[0].1[1].offset, 5);
        assert!(c.fetch("other", None).is_empty());
        assert!(c.remove("g", "t", 0));
        assert!(!c.remove("g", "t", 0));
        assert_eq!(c.remove_group("g"), vec![("u".to_string(), 3)]);
        assert!(!c.has_offsets("g"));
    }

    #[test]
    fn offsets_expire_only_when_nobody_consumes() {
        const DAY: u64 = 86_400_000;
        let mut c = CommittedOffsets::default();
        for g in ["active", "empty", "simple"] {
            c.stored(g, vec![("t".into(), 0, v(1, 0))]);
        }
        c.stored("simple", vec![("t".into(), 1, v(1, (6 * DAY) as i64))]);
        let activity = |g: &str| match g {
            "active" => Activity::Active,
            "empty" => Activity::EmptySince(2 * DAY),
            _ => Activity::Unknown,
        };
        let expire = |c: &mut CommittedOffsets, now: u64| {
            let mut gone = Vec::new();
            for (g, offs) in c.expired(now, 7 * DAY, activity) {
                for (t, p, at) in offs {
                    if c.remove_if_unchanged(&g, &t, p, at) {
                        gone.push((g.clone(), t, p));
                    }
                }
            }
            gone
        };
        // Day 7: the commits of day 0 are a week old, but "empty" has been empty five days.
        let gone = expire(&mut c, 7 * DAY);
        assert_eq!(gone, vec![("simple".to_string(), "t".to_string(), 0)]);
        assert!(c.has_offsets("simple"), "its day-6 commit stays");
        // An offset committed again after it was found expired stays.
        let found = c.expired(9 * DAY, 7 * DAY, activity);
        assert_eq!(found["empty"], vec![("t".to_string(), 0, 0)]);
        c.stored("empty", vec![("t".into(), 0, v(2, (9 * DAY) as i64))]);
        assert!(!c.remove_if_unchanged("empty", "t", 0, 0));
        assert_eq!(c.fetch("empty", None)[0].1[0].offset, 2);
        c.remove_group("empty");
        let gone = expire(&mut c, 13 * DAY);
        assert_eq!(gone, vec![("simple".to_string(), "t".to_string(), 1)]);
        assert!(c.has_offsets("active"));
        assert!(!c.has_offsets("simple"));
    }
}

//! The leader-epoch cache of one replica's log (KIP-101): for every leader epoch that wrote
//! into the log, the first offset it wrote. Followers compare their last epoch with the
//! leader's cache to find where their logs diverge, and consumers validate their position with
//! it after a leader change (OffsetForLeaderEpoch, KIP-320).
//!
//! Recovery rebuilds it at every open from the batch headers it scans anyway (every batch
//! carries the epoch of the leader that appended it). Compaction can remove the first batches
//! of an epoch, or all of them, so the cache is also kept, as Kafka keeps it, in a
//! `leader-epoch-checkpoint` file written when a new epoch appears; recovery merges the two
//! (`merge`), the earliest start of each epoch winning.

/// Epoch → first offset, in increasing order of both.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EpochCache {
    entries: Vec<EpochStart>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochStart {
    pub epoch: i32,
    pub start_offset: u64,
}

/// The answer to "where does epoch E end": the largest epoch at or below E that this log
/// knows, and the offset where the next epoch starts (the log end for the latest one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochEnd {
    pub epoch: i32,
    pub end_offset: u64,
}

impl EpochCache {
    /// A batch of `epoch` was appended at `base`. Epochs only grow along a log; a batch from
    /// an older epoch than the latest (which a correct leader never sends) changes nothing.
    pub fn observe(&mut self, epoch: i32, base: u64) {
        if epoch < 0 {
            return;
        }
        match self.entries.last() {
            Some(last) if last.epoch >= epoch => {}
            _ => self.entries.push(EpochStart {
                epoch,
                start_offset: base,
            }),
        }
    }

    /// The epoch of the last batch in the log (-1 for none): a follower's LastFetchedEpoch.
    pub fn latest(&self) -> i32 {
        self.entries.last().map_or(-1, |e| e.epoch)
    }

    /// The epoch of the batch holding `offset` (-1 if the log knows none).
    pub fn epoch_at(&self, offset: u64) -> i32 {
        let i = self.entries.partition_point(|e| e.start_offset <= offset);
        if i == 0 {
            return -1;
        }
        self.entries[i - 1].epoch
    }

    /// Where `requested` ends in this log, which ends at `log_end`; `current` is the epoch
    /// this replica leads in, if it leads (it owns the offsets from the log end on, even
    /// before it wrote any). None when the log knows no epoch at or below the requested one
    /// and nothing after it either (Kafka's UNDEFINED_EPOCH answer).
    pub fn end_offset_for(
        &self,
        requested: i32,
        log_end: u64,
        current: Option<i32>,
    ) -> Option<EpochEnd> {
        if requested < 0 {
            return None;
        }
        let latest = self.latest();
        if requested == latest {
            return Some(EpochEnd {
                epoch: latest,
                end_offset: log_end,
            });
        }
        // Leading in an epoch newer than the last write: that epoch starts at the log end, as
        // if it had an entry there (Kafka writes one when the leader is elected).
        if let Some(c) = current.filter(|c| *c > latest) {
            if requested == c {
                return Some(EpochEnd {
                    epoch: c,
                    end_offset: log_end,
                });
            }
            if requested > latest && requested < c {
                return Some(EpochEnd {
                    epoch: if latest >= 0 { latest } else { requested },
                    end_offset: log_end,
                });
            }
        }
        // The first epoch after the requested one starts where the requested one ends.
        let higher = self.entries.partition_point(|e| e.epoch <= requested);
        let next = self.entries.get(higher)?;
        Some(match higher.checked_sub(1).map(|i| self.entries[i]) {
            Some(floor) => EpochEnd {
                epoch: floor.epoch,
                end_offset: next.start_offset,
            },
            // Older than anything this log knows: it ended where the log's first epoch starts.
            None => EpochEnd {
                epoch: requested,
                end_offset: next.start_offset,
            },
        })
    }

    /// The log was cut to end before `offset`: epochs that started at or after it are gone.
    pub fn truncate_from_end(&mut self, offset: u64) {
        let keep = self.entries.partition_point(|e| e.start_offset < offset);
        self.entries.truncate(keep);
    }

    /// The log now starts at `offset`: epochs wholly before it are forgotten, the one holding
    /// it starts there. Keeps the cache as small as the log's history of leaders.
    pub fn truncate_from_start(&mut self, offset: u64) {
        let holding = self.entries.partition_point(|e| e.start_offset <= offset);
        if holding > 1 {
            self.entries.drain(..holding - 1);
        }
        if let Some(first) = self.entries.first_mut() {
            first.start_offset = first.start_offset.max(offset);
        }
    }

    pub fn entries(&self) -> &[EpochStart] {
        &self.entries
    }

    /// The checkpointed cache and the one the batches gave, as one: each epoch starts at the
    /// earlier of the two (compaction only ever removes batches), and an entry that would
    /// start before an earlier epoch's start (a checkpoint left from before a crash) is
    /// dropped.
    pub fn merge(checkpointed: &[(i32, u64)], scanned: &EpochCache) -> EpochCache {
        let mut by_epoch: std::collections::BTreeMap<i32, u64> = std::collections::BTreeMap::new();
        let all = checkpointed
            .iter()
            .copied()
            .chain(scanned.entries.iter().map(|e| (e.epoch, e.start_offset)));
        for (epoch, start) in all.filter(|(e, _)| *e >= 0) {
            let s = by_epoch.entry(epoch).or_insert(start);
            *s = (*s).min(start);
        }
        let mut out = EpochCache::default();
        for (epoch, start) in by_epoch {
            if out.entries.last().is_none_or(|l| l.start_offset <= start) {
                out.entries.push(EpochStart {
                    epoch,
                    start_offset: start,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(es: &[(i32, u64)]) -> EpochCache {
        let mut c = EpochCache::default();
        for (e, s) in es {
            c.observe(*e, *s);
        }
        c
    }

    fn end(epoch: i32, end_offset: u64) -> Option<EpochEnd> {
        Some(EpochEnd { epoch, end_offset })
    }

    #[test]
    fn observing_keeps_the_first_offset_of_each_new_epoch_only() {
        let c = cache(&[(0, 0), (0, 5), (2, 10), (1, 12), (2, 15), (4, 20), (-1, 30)]);
        assert_eq!(
            c.entries(),
            &[
                EpochStart {
                    epoch: 0,
                    start_offset: 0
                },
                EpochStart {
                    epoch: 2,
                    start_offset: 10
                },
                EpochStart {
                    epoch: 4,
                    start_offset: 20
                },
            ]
        );
        assert_eq!(c.latest(), 4);
        assert_eq!(
            (c.epoch_at(0), c.epoch_at(9), c.epoch_at(10), c.epoch_at(99)),
            (0, 0, 2, 4)
        );
        assert_eq!(EpochCache::default().latest(), -1);
        assert_eq!(EpochCache::default().epoch_at(3), -1);
    }

    #[test]
    fn end_offsets_follow_kafkas_rules() {
        let c = cache(&[(1, 0), (3, 10), (5, 20)]);
        // The latest epoch ends at the log end.
        assert_eq!(c.end_offset_for(5, 27, None), end(5, 27));
        // A known epoch ends where the next starts.
        assert_eq!(c.end_offset_for(3, 27, None), end(3, 20));
        // An epoch this log never saw: the largest below it, ending where the next starts.
        assert_eq!(c.end_offset_for(4, 27, None), end(3, 20));
        assert_eq!(c.end_offset_for(2, 27, None), end(1, 10));
        // Older than everything: the requested epoch, ending at the first start.
        assert_eq!(c.end_offset_for(0, 27, None), end(0, 0));
        // Newer than everything and not led here: unknown.
        assert_eq!(c.end_offset_for(6, 27, None), None);
        assert_eq!(c.end_offset_for(-1, 27, None), None);
        assert_eq!(EpochCache::default().end_offset_for(0, 0, None), None);
    }

    #[test]
    fn a_leader_owns_its_current_epoch_before_writing_in_it() {
        let c = cache(&[(1, 0), (3, 10)]);
        // Leading in epoch 7 with nothing written in it yet: 7 ends at the log end, and so
        // does 3 (the last that wrote), and the epochs between (which wrote nothing here).
        assert_eq!(c.end_offset_for(7, 15, Some(7)), end(7, 15));
        assert_eq!(c.end_offset_for(3, 15, Some(7)), end(3, 15));
        assert_eq!(c.end_offset_for(5, 15, Some(7)), end(3, 15));
        assert_eq!(c.end_offset_for(8, 15, Some(7)), None);
        assert_eq!(c.end_offset_for(1, 15, Some(7)), end(1, 10));
        // An empty log led in epoch 2.
        let e = EpochCache::default();
        assert_eq!(e.end_offset_for(2, 0, Some(2)), end(2, 0));
        assert_eq!(e.end_offset_for(1, 0, Some(2)), end(1, 0));
        // Once the leader wrote, its epoch is the latest and `current` adds nothing.
        let c = cache(&[(1, 0), (7, 15)]);
        assert_eq!(c.end_offset_for(3, 20, Some(7)), end(1, 15));
        assert_eq!(c.end_offset_for(7, 20, Some(7)), end(7, 20));
    }

    #[test]
    fn a_checkpoint_restores_what_compaction_removed() {
        // Compaction removed epoch 3 entirely and the first batches of epoch 5.
        let scanned = cache(&[(1, 0), (5, 130)]);
        let merged = EpochCache::merge(&[(1, 0), (3, 100), (5, 120)], &scanned);
        assert_eq!(merged.end_offset_for(1, 200, None), end(1, 100));
        assert_eq!(merged.end_offset_for(3, 200, None), end(3, 120));
        // An epoch written after the checkpoint comes from the scan; a contradicting entry
        // (starting before an earlier epoch's start) is dropped.
        let merged = EpochCache::merge(&[(1, 0), (4, 50)], &cache(&[(1, 0), (3, 60), (6, 90)]));
        assert_eq!(
            merged.entries().iter().map(|e| e.epoch).collect::<Vec<_>>(),
            vec![1, 3, 6]
        );
        assert_eq!(EpochCache::merge(&[], &scanned), scanned);
    }

    #[test]
    fn truncation_drops_epochs_from_either_end() {
        let mut c = cache(&[(1, 0), (3, 10), (5, 20)]);
        c.truncate_from_end(21);
        assert_eq!(c.latest(), 5);
        c.truncate_from_end(20);
        assert_eq!(c.latest(), 3);
        c.observe(6, 20);
        c.truncate_from_start(12);
        assert_eq!(
            c.entries(),
            &[
                EpochStart {
                    epoch: 3,
                    start_offset: 12
                },
                EpochStart {
                    epoch: 6,
                    start_offset: 20
                },
            ]
        );
        c.truncate_from_start(20);
        assert_eq!(c.entries().len(), 1);
        assert_eq!(c.end_offset_for(3, 25, None), end(3, 20));
        c.truncate_from_end(0);
        assert_eq!(c.latest(), -1);
    }
}

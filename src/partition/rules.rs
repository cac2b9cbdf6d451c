//! The replication rules of a partition replica as pure functions of its state: what the
//! broker runs (`Partition`, `server::replication`) and what the seeded replica simulation
//! (`tests/replica_sim.rs`) runs, so that the rules proven there are the ones in service.

use std::time::Duration;

use crate::log::epochs::{EpochCache, EpochEnd};

/// The leader's high watermark: the lowest durable end over itself and the followers that
/// count, which are the ISR's followers and those whose joining the ISR is pending (KIP-497's
/// "maximal" ISR: a follower about to join must already hold everything below the high
/// watermark, or it could be elected without it). A follower that has not fetched yet under
/// this leader (`None`) holds nothing it knows of.
pub fn leader_high_watermark(own_durable_end: u64, follower_ends: &[Option<u64>]) -> u64 {
    follower_ends
        .iter()
        .fold(own_durable_end, |hw, e| hw.min(e.unwrap_or(0)))
}

/// A follower's high watermark: the leader's, never past what it holds durably.
pub fn follower_high_watermark(leader_hw: u64, own_durable_end: u64) -> u64 {
    leader_hw.min(own_durable_end)
}

/// Why a request naming a leader epoch (KIP-320) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochMismatch {
    /// The request's epoch is older: the client's metadata is stale (FENCED_LEADER_EPOCH).
    Fenced,
    /// The request's epoch is newer than this replica knows (UNKNOWN_LEADER_EPOCH).
    Unknown,
}

/// KIP-320: `current` is the epoch the request expects (-1: any), `mine` the replica's.
pub fn check_epoch(mine: i32, current: i32) -> Result<(), EpochMismatch> {
    if current < 0 || current == mine {
        Ok(())
    } else if current < mine {
        Err(EpochMismatch::Fenced)
    } else {
        Err(EpochMismatch::Unknown)
    }
}

/// On the leader, for a follower fetching from `fetch_offset` whose last batch has epoch
/// `last_fetched_epoch` (-1: none): the DivergingEpoch to answer instead of data when the
/// follower's log cannot be a prefix of this one (its epoch ended earlier here, or its log runs
/// past that epoch's end), as Kafka's leader does. `leading` is the epoch this replica leads in.
pub fn diverging(
    cache: &EpochCache,
    log_end: u64,
    leading: Option<i32>,
    last_fetched_epoch: i32,
    fetch_offset: i64,
) -> Option<EpochEnd> {
    if last_fetched_epoch < 0 {
        return None;
    }
    cache
        .end_offset_for(last_fetched_epoch, log_end, leading)
        .filter(|e| e.epoch < last_fetched_epoch || (e.end_offset as i64) < fetch_offset)
}

/// On a follower whose leader answered DivergingEpoch (`epoch`, `leader_end`): where to cut
/// its log, which ends at `own_end` (KIP-279): at the lower of the leader's end of that epoch
/// and its own end of it; when it does not know that epoch, at the end of its largest epoch
/// below it (the next fetch then compares again).
pub fn truncation_point(cache: &EpochCache, own_end: u64, epoch: i32, leader_end: u64) -> u64 {
    match cache.end_offset_for(epoch, own_end, None) {
        Some(mine) if mine.epoch == epoch => mine.end_offset.min(leader_end).min(own_end),
        Some(mine) => mine.end_offset.min(own_end),
        None => leader_end.min(own_end),
    }
}

/// On the leader, after a follower fetched from `fetch_offset`: whether it has caught up, by
/// Kafka's rule: it fetched from at least where the leader's log ended when it answered the
/// follower's previous fetch (`end_at_last_answer`), or, at its first fetch, from the
/// leader's current end.
pub fn caught_up(end_at_last_answer: Option<u64>, fetch_offset: u64, leader_end: u64) -> bool {
    match end_at_last_answer {
        Some(prev) => fetch_offset >= prev,
        None => fetch_offset >= leader_end,
    }
}

/// Whether a follower belongs in the ISR the leader asks for: a member stays while it caught
/// up within `lag_max`; another joins once it caught up recently and holds everything below
/// the high watermark.
pub fn in_wanted_isr(
    member: bool,
    caught_up_ago: Option<Duration>,
    end: Option<u64>,
    hw: u64,
    lag_max: Duration,
) -> bool {
    let recent = caught_up_ago.is_some_and(|ago| ago <= lag_max);
    if member {
        recent
    } else {
        recent && end.is_some_and(|e| e >= hw)
    }
}

/// The in-sync replicas that count for min.insync.replicas: the leader, and the ISR's
/// followers that caught up within `lag_max` (or have no record yet under this leader).
pub fn live_isr(caught_up_ago: &[Option<Duration>], lag_max: Duration) -> usize {
    1 + caught_up_ago
        .iter()
        .filter(|ago| ago.is_none_or(|a| a <= lag_max))
        .count()
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

    #[test]
    fn a_deposed_leaders_tail_is_found_and_cut() {
        // Shared: 0..100 in epoch 1. The old leader wrote 100..150 in epoch 2 that nobody
        // fetched; the new leader (epoch 3) wrote 100..120.
        let old = cache(&[(1, 0), (2, 100)]);
        let new = cache(&[(1, 0), (3, 100)]);
        let d = diverging(&new, 120, Some(3), old.latest(), 150).expect("diverges");
        assert_eq!((d.epoch, d.end_offset), (1, 100));
        assert_eq!(truncation_point(&old, 150, d.epoch, d.end_offset), 100);
        // After the cut it fetches on from 100 with epoch 1: no divergence any more.
        let mut old = old;
        old.truncate_from_end(100);
        assert_eq!(diverging(&new, 120, Some(3), old.latest(), 100), None);
        // A follower that is merely behind in the leader's epoch does not diverge.
        assert_eq!(diverging(&new, 120, Some(3), 3, 110), None);
        // A follower past the leader's end in the same epoch cuts back to it.
        let d = diverging(&new, 120, Some(3), 3, 130).expect("past the end");
        assert_eq!((d.epoch, d.end_offset), (3, 120));
    }

    #[test]
    fn a_follower_unaware_of_the_leaders_epoch_cuts_to_its_own_earlier_epoch() {
        // The follower has epochs 1 and 4; the leader answers with epoch 3 (which the
        // follower never saw) ending at 80: the follower cuts to the end of its epoch 1, 50.
        let f = cache(&[(1, 0), (4, 50)]);
        assert_eq!(truncation_point(&f, 90, 3, 80), 50);
        // Knowing the epoch: the lower of both ends.
        let f = cache(&[(1, 0), (3, 50)]);
        assert_eq!(truncation_point(&f, 90, 3, 80), 80);
        assert_eq!(truncation_point(&f, 70, 3, 80), 70);
    }

    #[test]
    fn the_high_watermark_waits_for_every_counted_follower() {
        assert_eq!(leader_high_watermark(10, &[Some(7), Some(9)]), 7);
        assert_eq!(leader_high_watermark(10, &[None]), 0);
        assert_eq!(leader_high_watermark(10, &[]), 10);
        assert_eq!(follower_high_watermark(10, 6), 6);
        assert_eq!(check_epoch(3, -1), Ok(()));
        assert_eq!(check_epoch(3, 2), Err(EpochMismatch::Fenced));
        assert_eq!(check_epoch(3, 4), Err(EpochMismatch::Unknown));
        let s = Duration::from_secs;
        assert!(in_wanted_isr(true, Some(s(1)), Some(0), 10, s(30)));
        assert!(!in_wanted_isr(true, Some(s(31)), Some(10), 10, s(30)));
        assert!(!in_wanted_isr(false, Some(s(1)), Some(9), 10, s(30)));
        assert!(in_wanted_isr(false, Some(s(1)), Some(10), 10, s(30)));
        assert_eq!(live_isr(&[Some(s(1)), Some(s(40)), None], s(30)), 3);
        assert!(caught_up(Some(5), 5, 9) && !caught_up(Some(6), 5, 9));
        assert!(caught_up(None, 9, 9) && !caught_up(None, 8, 9));
    }
}

//! A shard's memory budget for request traffic: request frames being read or handled (which
//! includes the produce data they carry until it is queued in the log) and responses not yet
//! written to their socket. Single-threaded, like everything a shard owns.
//!
//! Two ways to draw from it:
//! - `acquire` waits until the bytes fit. Only a connection's reader calls it, before reading a
//!   frame, while it holds nothing else from the budget: so a spent budget stops the shard
//!   reading its sockets (back-pressure through TCP) and can never deadlock, because whoever
//!   holds budget is handling or writing a request, never waiting for more budget.
//! - `charge` never waits and may overdraw: for memory that already exists (a response that has
//!   been assembled). The overdraft delays the next `acquire`s until it is written.
//!
//! A frame larger than the whole budget (it cannot be: the tuning file requires
//! `request_bytes_max <= inflight_bytes_per_shard`) would still be admitted once nothing else is
//! charged, so that no request can wait forever.

use std::cell::Cell;
use std::rc::Rc;

use crate::notify::Notify;

pub struct MemoryBudget {
    limit_bytes: usize,
    used_bytes: Cell<usize>,
    freed: Notify,
}

/// Bytes drawn from a budget, given back when dropped.
pub struct Charge {
    budget: Rc<MemoryBudget>,
    bytes: usize,
}

impl MemoryBudget {
    pub fn new(limit_bytes: usize) -> Rc<MemoryBudget> {
        Rc::new(MemoryBudget {
            limit_bytes,
            used_bytes: Cell::new(0),
            freed: Notify::new(),
        })
    }

    pub fn limit_bytes(&self) -> usize {
        self.limit_bytes
    }

    pub fn used_bytes(&self) -> usize {
        self.used_bytes.get()
    }

    fn fits(&self, bytes: usize) -> bool {
        let used = self.used_bytes.get();
        used == 0 || used.saturating_add(bytes) <= self.limit_bytes
    }

    /// Waits until `bytes` fit in the budget, then draws them.
    pub async fn acquire(self: &Rc<Self>, bytes: usize) -> Charge {
        // Bounded by the holders: every wake-up follows a release.
        loop {
            if self.fits(bytes) {
                return self.charge(bytes);
            }
            // Registered before the next release can happen (no await in between).
            self.freed.notified().await;
        }
    }

    /// Draws `bytes` at once, even past the limit.
    pub fn charge(self: &Rc<Self>, bytes: usize) -> Charge {
        self.used_bytes.set(self.used_bytes.get() + bytes);
        Charge {
            budget: self.clone(),
            bytes,
        }
    }
}

impl Charge {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let b = &self.budget;
        b.used_bytes.set(b.used_bytes.get() - self.bytes);
        if self.bytes > 0 {
            b.freed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn acquire_waits_for_a_release_and_charge_overdraws() {
        let b = MemoryBudget::new(100);
        let a = b.acquire(60).now_or_never().expect("fits");
        let mut second = Box::pin(b.acquire(60));
        assert!(
            second.as_mut().now_or_never().is_none(),
            "60 + 60 > 100 waits"
        );
        drop(a);
        let c = second.now_or_never().expect("released");
        assert_eq!(b.used_bytes(), 60);
        let over = b.charge(500);
        assert_eq!(b.used_bytes(), 560);
        assert!(Box::pin(b.acquire(1)).now_or_never().is_none());
        drop(over);
        drop(c);
        assert_eq!(b.used_bytes(), 0);
        let big = b
            .acquire(1000)
            .now_or_never()
            .expect("alone, a large frame passes");
        assert_eq!(big.bytes(), 1000);
    }
}

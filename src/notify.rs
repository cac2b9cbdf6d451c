//! A shard-local "something changed" signal that many tasks may wait on (fetch long-polls on a
//! partition, connections waiting for memory). Single-threaded: no atomics, no locks.
//!
//! Memory bound, by construction: a waiter's entry lives exactly as long as its `Notified`
//! future. It is registered on first poll, replaced (not added) on later polls and removed when
//! the future completes or is dropped, so a wait that times out or is cancelled leaves nothing
//! behind. The registry holds at most one entry per live, pending waiter.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
struct Inner {
    /// Bumped by every `notify_waiters`; a waiter is done once it differs from what it saw.
    generation: Cell<u64>,
    next_key: Cell<u64>,
    wakers: RefCell<HashMap<u64, Waker>>,
}

#[derive(Default, Clone)]
pub struct Notify {
    inner: Rc<Inner>,
}

impl Notify {
    pub fn new() -> Notify {
        Notify::default()
    }

    /// A future that completes at the next `notify_waiters` after this call (not before it:
    /// a notification that happened earlier is not seen).
    pub fn notified(&self) -> Notified {
        Notified {
            inner: self.inner.clone(),
            generation: self.inner.generation.get(),
            key: None,
        }
    }

    /// Wakes every current waiter.
    pub fn notify_waiters(&self) {
        let g = self.inner.generation.get().wrapping_add(1);
        self.inner.generation.set(g);
        // Taken out first: a woken task may register again while we iterate.
        let wakers = std::mem::take(&mut *self.inner.wakers.borrow_mut());
        for (_, w) in wakers {
            w.wake();
        }
    }

    /// Waiters currently registered (for tests and metrics).
    pub fn waiters(&self) -> usize {
        self.inner.wakers.borrow().len()
    }
}

pub struct Notified {
    inner: Rc<Inner>,
    generation: u64,
    key: Option<u64>,
}

impl Future for Notified {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.inner.generation.get() != self.generation {
            if let Some(k) = self.key.take() {
                self.inner.wakers.borrow_mut().remove(&k);
            }
            return Poll::Ready(());
        }
        let key = match self.key {
            Some(k) => k,
            None => {
                let k = self.inner.next_key.get();
                self.inner.next_key.set(k.wrapping_add(1));
                self.key = Some(k);
                k
            }
        };
        let mut wakers = self.inner.wakers.borrow_mut();
        match wakers.get_mut(&key) {
            Some(w) if w.will_wake(cx.waker()) => {}
            Some(w) => *w = cx.waker().clone(),
            None => {
                wakers.insert(key, cx.waker().clone());
            }
        }
        Poll::Pending
    }
}

impl Drop for Notified {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.inner.wakers.borrow_mut().remove(&k);
        }
    }
}

/// Waits until one of `wakers` completes or `deadline` passes (at once if it has passed): the
/// end of a long-poll that any of several partitions or shards may cut short. The output of
/// the waker that completed, or None at the deadline.
pub async fn first_or_deadline<F>(wakers: Vec<F>, deadline: std::time::Instant) -> Option<F::Output>
where
    F: Future + Unpin,
{
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    let timer = glommio::timer::sleep(left);
    futures::pin_mut!(timer);
    if wakers.is_empty() {
        timer.await;
        return None;
    }
    match futures::future::select(futures::future::select_all(wakers), timer).await {
        futures::future::Either::Left(((out, _, _), _)) => Some(out),
        futures::future::Either::Right(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker;

    fn poll(n: &mut Notified) -> Poll<()> {
        let w = noop_waker();
        let mut cx = Context::from_waker(&w);
        Pin::new(n).poll(&mut cx)
    }

    #[test]
    fn a_dropped_or_finished_wait_leaves_no_entry() {
        let n = Notify::new();
        for _ in 0..10_000 {
            let mut w = n.notified();
            assert!(poll(&mut w).is_pending());
            assert!(
                poll(&mut w).is_pending(),
                "a second poll replaces, not adds"
            );
            assert_eq!(n.waiters(), 1);
            drop(w);
        }
        assert_eq!(n.waiters(), 0, "timed-out waits leave nothing behind");
        let mut a = n.notified();
        let mut b = n.notified();
        assert!(poll(&mut a).is_pending());
        assert!(poll(&mut b).is_pending());
        n.notify_waiters();
        assert_eq!(n.waiters(), 0);
        assert!(poll(&mut a).is_ready());
        assert!(poll(&mut b).is_ready());
    }

    #[test]
    fn a_notification_before_the_first_poll_counts() {
        let n = Notify::new();
        let mut w = n.notified();
        n.notify_waiters();
        assert!(poll(&mut w).is_ready());
        let mut later = n.notified();
        assert!(
            poll(&mut later).is_pending(),
            "an earlier notification is not seen"
        );
    }
}

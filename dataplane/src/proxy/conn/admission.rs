//! Admission at 18001: handshakes in flight (TLS started, peer not yet
//! authenticated, preamble not read) are bounded per executor, in total and
//! per source address, so a flood from one address cannot take the slots
//! other peers need. A connection over a bound waits for a slot (no task
//! polls: it sleeps on a semaphore); the caller bounds the wait (the inbound
//! side gives it what is left of the handshake timeout, and sheds it after,
//! counted as [`Reason::Shed`](crate::proxy::reason::Reason::Shed)). So a pod that
//! opens a burst of connections is served, a little later, while a flood only
//! ever holds its own share. A [`Ticket`] holds the slot until dropped.
use std::{cell::RefCell, collections::HashMap, net::IpAddr, rc::Rc};

use glommio::sync::{Semaphore, StaticPermit};

/// Unauthenticated connections one executor holds at most.
pub const MAX_IN_FLIGHT: u64 = 1024;
/// Of those, from one source address at most. A node's data plane connects
/// from each of its pods' own addresses; a handshake takes about a
/// millisecond of CPU, so a quarter of the slots drains quickly even for a
/// pod warming a large connection pool.
pub const MAX_IN_FLIGHT_PER_SOURCE: u64 = 256;

/// One executor's count of unauthenticated connections.
#[derive(Debug)]
pub struct Admission {
    total: Rc<Semaphore>,
    by_source: RefCell<HashMap<IpAddr, Rc<Semaphore>>>,
    max: u64,
    per_source: u64,
}

impl Default for Admission {
    fn default() -> Self {
        Self::with_bounds(MAX_IN_FLIGHT, MAX_IN_FLIGHT_PER_SOURCE)
    }
}

impl Admission {
    /// With other bounds (tests).
    pub fn with_bounds(max: u64, per_source: u64) -> Self {
        Self { total: Rc::new(Semaphore::new(max)), by_source: RefCell::new(HashMap::new()), max, per_source }
    }

    /// A slot for a new connection from `source`, once one is free. Dropping
    /// the future gives up waiting (the source's entry is cleaned up with
    /// the last ticket or waiter).
    pub async fn admit(self: &Rc<Self>, source: IpAddr) -> Ticket {
        let per_source = self.per_source;
        let src =
            self.by_source.borrow_mut().entry(source).or_insert_with(|| Rc::new(Semaphore::new(per_source))).clone();
        // The waiter holds the only other reference, so whether the wait
        // ends or is abandoned, its drop can tell when the entry is idle.
        let waiter = Waiter { admission: self, source, src: Some(src) };
        let permits = async {
            let mine = waiter.src.as_ref()?.acquire_static_permit(1).await.ok()?;
            let all = self.total.acquire_static_permit(1).await.ok()?;
            Some((mine, all))
        }
        .await;
        drop(waiter);
        // The semaphores are never closed, so the permits always come.
        Ticket { admission: self.clone(), source, permits }
    }

    /// Unauthenticated connections held now.
    pub fn in_flight(&self) -> u64 {
        self.max - self.total.available()
    }

    /// Drops the source's entry once nothing holds or waits for it (the
    /// map's own reference is then the only one).
    fn forget_if_idle(&self, source: IpAddr) {
        let mut by_source = self.by_source.borrow_mut();
        if let Some(sem) = by_source.get(&source) {
            if Rc::strong_count(sem) == 1 && sem.available() == self.per_source {
                by_source.remove(&source);
            }
        }
    }
}

/// Cleans the source's entry up if the wait is abandoned.
struct Waiter<'a> {
    admission: &'a Admission,
    source: IpAddr,
    src: Option<Rc<Semaphore>>,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        drop(self.src.take());
        self.admission.forget_if_idle(self.source);
    }
}

/// A slot held until dropped.
#[derive(Debug)]
pub struct Ticket {
    admission: Rc<Admission>,
    source: IpAddr,
    permits: Option<(StaticPermit, StaticPermit)>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        drop(self.permits.take());
        self.admission.forget_if_idle(self.source);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::proxy::relay::within;

    #[test]
    fn a_source_waits_for_its_own_slots_and_others_are_not_held_up() {
        glommio::LocalExecutorBuilder::default().make().expect("executor").run(async {
            let a = Rc::new(Admission::with_bounds(3, 2));
            let (x, y): (IpAddr, IpAddr) = ("10.0.0.1".parse().expect("ip"), "10.0.0.2".parse().expect("ip"));
            let short = Duration::from_millis(20);
            let t1 = a.admit(x).await;
            let _t2 = a.admit(x).await;
            assert!(within(short, a.admit(x)).await.is_none(), "x is at its bound and nothing frees up");
            let _t3 = within(short, a.admit(y)).await.expect("y is not held up by x");
            // A third from x waits, and gets in once x's first slot frees up.
            let waiting = glommio::spawn_local({
                let a = a.clone();
                async move { within(Duration::from_secs(5), a.admit(x)).await }
            });
            glommio::timer::sleep(Duration::from_millis(10)).await;
            drop(t1);
            let _t4 = waiting.await.expect("the waiting connection took the freed slot");
            assert!(within(short, a.admit(y)).await.is_none(), "the total bound holds too");
            assert_eq!(a.in_flight(), 3);
        });
    }

    #[test]
    fn sources_are_forgotten_when_idle() {
        glommio::LocalExecutorBuilder::default().make().expect("executor").run(async {
            let a = Rc::new(Admission::with_bounds(8, 1));
            let x: IpAddr = "10.0.0.1".parse().expect("ip");
            let t = a.admit(x).await;
            assert_eq!(a.by_source.borrow().len(), 1);
            assert!(within(Duration::from_millis(10), a.admit(x)).await.is_none(), "an abandoned wait");
            assert_eq!(a.by_source.borrow().len(), 1, "still held by the ticket");
            drop(t);
            assert!(a.by_source.borrow().is_empty(), "no entry kept per address ever seen");
        });
    }
}

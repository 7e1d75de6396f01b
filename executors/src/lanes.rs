//! Lanes: which instructions may run together.
//!
//! - [`Lane::Fast`]: short, latency-bound work (`GET_NODE_STATUS`, `VIP_ASSIGN`,
//!   `VIP_RELEASE`). It has its own [`FAST_SLOTS`] slots and never waits behind pool work.
//!   (`CANCEL` is faster still: the dispatcher handles it on arrival, with no slot at all.)
//! - [`Lane::Pool`]: everything else that may run side by side; takes one of the shared pool's
//!   `max_concurrency` slots.
//! - [`Lane::Exclusive`]: a pool slot **and** the lock of a named [`Resource`]. Two
//!   instructions on the same resource never overlap. [`Resource::Node`] is the lock of work
//!   that must run alone: it is taken only when no resource lock is held, and while it is held no
//!   other resource lock is taken. Fast and plain pool work are not locked out by `node` (status
//!   keeps answering during an upgrade).
//!
//! Queued instructions start in acceptance order, except that one which cannot start yet (no
//! slot of its lane, or its lock is taken) does not hold back the ones behind it, unless they
//! want a lock that conflicts with its own: a waiting `node` is not starved by later resource
//! work. Queue and busy rules are the dispatcher's; the deadline keeps counting while queued.

use std::collections::BTreeMap;
use std::fmt;

/// Slots of the fast lane. Fast work is short and async (it holds the runtime thread for
/// microseconds), so many may be in flight; the bound matters when the journal syncs fast
/// types too (`journal_sync = "always"`): an instruction holds its slot while its `started`
/// record waits for the group commit, so one sync starts at most this many.
pub const FAST_SLOTS: usize = 32;

/// A named resource that exclusive work locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    /// The WireGuard interface `wg0`.
    Wg0,
    /// dnsmasq's configuration and service.
    Dnsmasq,
    /// HAProxy's configuration and service.
    Haproxy,
    /// The local etcd member.
    Etcd,
    /// The package manager (apt's lock).
    Packages,
    /// The whole node: excludes every other resource lock.
    Node,
}

impl Resource {
    /// The resource's name (as in logs and docs).
    pub fn name(self) -> &'static str {
        match self {
            Resource::Wg0 => "wg0",
            Resource::Dnsmasq => "dnsmasq",
            Resource::Haproxy => "haproxy",
            Resource::Etcd => "etcd",
            Resource::Packages => "packages",
            Resource::Node => "node",
        }
    }

    /// Whether holding `self` forbids taking `other`.
    pub fn conflicts(self, other: Resource) -> bool {
        self == other || self == Resource::Node || other == Resource::Node
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where an instruction type runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// The fast lane.
    Fast,
    /// The shared pool.
    Pool,
    /// The shared pool and a resource lock.
    Exclusive(Resource),
}

impl fmt::Display for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lane::Fast => f.write_str("fast"),
            Lane::Pool => f.write_str("pool"),
            Lane::Exclusive(r) => write!(f, "exclusive:{r}"),
        }
    }
}

/// What runs now, by lane (the dispatcher's bookkeeping; pure, no I/O).
#[derive(Debug, Clone)]
pub struct Lanes {
    pool_slots: usize,
    fast: usize,
    pool: usize,
    locks: BTreeMap<Resource, usize>,
}

impl Lanes {
    /// Nothing running; the shared pool has `pool_slots` slots.
    pub fn new(pool_slots: usize) -> Self {
        Lanes {
            pool_slots: pool_slots.max(1),
            fast: 0,
            pool: 0,
            locks: BTreeMap::new(),
        }
    }

    /// Whether `lane` could start now, given the lanes of the instructions queued before it
    /// (`ahead`, which are still waiting).
    pub fn can_start<'a>(&self, lane: Lane, ahead: impl IntoIterator<Item = &'a Lane>) -> bool {
        match lane {
            Lane::Fast => self.fast < FAST_SLOTS,
            Lane::Pool => self.pool < self.pool_slots,
            Lane::Exclusive(r) => {
                self.pool < self.pool_slots
                    && !self.locks.keys().any(|held| held.conflicts(r))
                    && !ahead
                        .into_iter()
                        .any(|l| matches!(l, Lane::Exclusive(w) if w.conflicts(r)))
            }
        }
    }

    /// Record that an instruction of `lane` started (after [`Lanes::can_start`]).
    pub fn take(&mut self, lane: Lane) {
        match lane {
            Lane::Fast => self.fast += 1,
            Lane::Pool => self.pool += 1,
            Lane::Exclusive(r) => {
                self.pool += 1;
                *self.locks.entry(r).or_default() += 1;
            }
        }
    }

    /// Record that an instruction of `lane` ended.
    pub fn release(&mut self, lane: Lane) {
        match lane {
            Lane::Fast => self.fast = self.fast.saturating_sub(1),
            Lane::Pool => self.pool = self.pool.saturating_sub(1),
            Lane::Exclusive(r) => {
                self.pool = self.pool.saturating_sub(1);
                if let Some(n) = self.locks.get_mut(&r) {
                    *n -= 1;
                    if *n == 0 {
                        self.locks.remove(&r);
                    }
                }
            }
        }
    }

    /// Resource locks held now.
    pub fn held(&self) -> Vec<Resource> {
        self.locks.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WG: Lane = Lane::Exclusive(Resource::Wg0);
    const DNS: Lane = Lane::Exclusive(Resource::Dnsmasq);
    const NODE: Lane = Lane::Exclusive(Resource::Node);

    #[test]
    fn fast_lane_ignores_a_full_pool() {
        let mut l = Lanes::new(1);
        l.take(Lane::Pool);
        assert!(!l.can_start(Lane::Pool, []));
        assert!(l.can_start(Lane::Fast, [&Lane::Pool]));
        for _ in 0..FAST_SLOTS {
            l.take(Lane::Fast);
        }
        assert!(!l.can_start(Lane::Fast, []));
        l.release(Lane::Fast);
        assert!(l.can_start(Lane::Fast, []));
    }

    #[test]
    fn a_resource_is_held_by_one_at_a_time_and_node_by_itself() {
        let mut l = Lanes::new(8);
        l.take(WG);
        assert!(!l.can_start(WG, []));
        assert!(l.can_start(DNS, []));
        assert!(!l.can_start(NODE, []));
        assert!(l.can_start(Lane::Pool, []));
        l.release(WG);
        assert!(l.can_start(NODE, []));
        l.take(NODE);
        assert!(!l.can_start(WG, []));
        assert!(!l.can_start(DNS, []));
        assert!(l.can_start(Lane::Pool, []));
        assert!(l.can_start(Lane::Fast, []));
        l.release(NODE);
        assert!(l.held().is_empty());
    }

    #[test]
    fn waiting_node_work_is_not_overtaken_by_later_resource_work() {
        let mut l = Lanes::new(8);
        l.take(WG);
        // node waits for wg0; a later dnsmasq must not slip past it, a later plain one may.
        assert!(!l.can_start(DNS, [&NODE]));
        assert!(l.can_start(Lane::Pool, [&NODE]));
        assert!(l.can_start(DNS, [&WG]));
    }
}

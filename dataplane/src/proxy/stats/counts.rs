//! The data path's counters as arrays indexed by enums: a counter is a
//! variant, and where it shows in `/metrics` is a row of its own, so that
//! merging two snapshots and rendering one are loops that cannot forget a
//! counter (a named field once went unexported that way).
use std::ops::{Index, IndexMut};

/// A counter kept for each [`super::Direction`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowCount {
    /// Connections accepted.
    Accepted,
    /// Connections that ended normally (both directions saw EOF).
    Completed,
    /// Connections that ended otherwise (refused, reset, timed out).
    Failed,
    /// Bytes from downstream to upstream.
    BytesUp,
    /// Bytes from upstream to downstream.
    BytesDown,
    /// Accepts that failed (EMFILE and the like).
    AcceptErrors,
    /// TLS handshakes that resumed an earlier session (no certificates
    /// exchanged, no signatures).
    Resumed,
}

/// A counter of the executor as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    /// Log lines left out by the limiter.
    LogsSuppressed,
    /// Inbound connections delivered from the pod's own address because
    /// the transparent socket was refused.
    ClientAddressFallbacks,
    /// Outbound connections between two pods served here that skipped the
    /// tunnel (`--same-node-fast-path`).
    SameNode,
    /// Of those, the ones the kernel carried (spliced socket to socket).
    Spliced,
    /// Of those, the ones relayed in user space because the kernel did not
    /// take the pair.
    SpliceFallbacks,
    /// Directions of spliced connections the kernel handed back to user
    /// space (bytes piled up: a receiver slower than its sender).
    SplicePaused,
    /// Control messages found by the executor's timed look, not by the
    /// wake-up their sender gave it.
    MissedWakeups,
}

/// Where a counter shows in `/metrics`: its family (without the
/// `dataplane_` prefix and `_total` suffix), the family's help, and the
/// label that tells it apart from the family's other counters, if any
/// (per-direction counters carry `direction` as well).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shown {
    /// The family's name.
    pub family: &'static str,
    /// The family's help text.
    pub help: &'static str,
    /// The label (name, value) of this counter within the family.
    pub label: Option<(&'static str, &'static str)>,
}

const fn shown(family: &'static str, help: &'static str, label: Option<(&'static str, &'static str)>) -> Option<Shown> {
    Some(Shown { family, help, label })
}

impl FlowCount {
    /// Every counter, in index order.
    pub const ALL: [FlowCount; 7] = [
        FlowCount::Accepted,
        FlowCount::Completed,
        FlowCount::Failed,
        FlowCount::BytesUp,
        FlowCount::BytesDown,
        FlowCount::AcceptErrors,
        FlowCount::Resumed,
    ];

    /// Its key in the JSON dump, if it is there.
    pub fn json_key(self) -> Option<&'static str> {
        match self {
            FlowCount::Accepted => Some("accepted"),
            FlowCount::Completed => Some("completed"),
            FlowCount::Failed => Some("failed"),
            FlowCount::BytesUp => Some("bytes_to_upstream"),
            FlowCount::BytesDown => Some("bytes_to_downstream"),
            FlowCount::Resumed => Some("tls_resumed"),
            FlowCount::AcceptErrors => None,
        }
    }

    /// Where it shows in `/metrics` (`None`: failures show by reason
    /// instead, from [`super::Snapshot::failures`]).
    pub fn shown(self) -> Option<Shown> {
        const BYTES: &str = "Bytes relayed";
        match self {
            FlowCount::Accepted => shown("connections_accepted", "Connections accepted", None),
            FlowCount::Completed => {
                shown("connections_completed", "Connections that ended with both directions closed normally", None)
            }
            FlowCount::Failed => None,
            FlowCount::BytesUp => shown("bytes", BYTES, Some(("flow", "to_upstream"))),
            FlowCount::BytesDown => shown("bytes", BYTES, Some(("flow", "to_downstream"))),
            FlowCount::AcceptErrors => {
                shown("accept_errors", "Failed accepts (EMFILE and the like); the executor backs off after each", None)
            }
            FlowCount::Resumed => shown(
                "tls_resumed_handshakes",
                "TLS handshakes that resumed an earlier session (outbound: as client; inbound: as server)",
                None,
            ),
        }
    }
}

impl Count {
    /// Every counter, in index order.
    pub const ALL: [Count; 7] = [
        Count::LogsSuppressed,
        Count::ClientAddressFallbacks,
        Count::SameNode,
        Count::Spliced,
        Count::SpliceFallbacks,
        Count::SplicePaused,
        Count::MissedWakeups,
    ];

    /// Where it shows in `/metrics` (`None`: in a family the admin side
    /// completes with figures of its own, in `ops/admin/metrics.rs`).
    pub fn shown(self) -> Option<Shown> {
        const SPLICED: &str = "Same-node fast-path connections by who carried their bytes: the kernel (spliced socket to socket) or this process (the kernel did not take the pair: a full map, a client that had closed already)";
        match self {
            Count::LogsSuppressed => shown(
                "log_lines_suppressed",
                "Refusal and accept-error log lines left out because the same kind came too often (each kind is logged at most a few times a second, with a count)",
                None,
            ),
            Count::ClientAddressFallbacks => None,
            Count::SameNode => shown(
                "same_node_connections",
                "Outbound connections between two pods this data plane serves that skipped the tunnel (--same-node-fast-path)",
                None,
            ),
            Count::Spliced => shown("same_node_spliced_connections", SPLICED, Some(("how", "kernel"))),
            Count::SpliceFallbacks => shown("same_node_spliced_connections", SPLICED, Some(("how", "user_space"))),
            Count::SplicePaused => shown(
                "same_node_splice_paused",
                "Directions of spliced connections the kernel handed back to this process because bytes piled up (a receiver slower than its sender, 4 MiB not yet acknowledged): relayed in user space from then on",
                None,
            ),
            Count::MissedWakeups => shown(
                "executor_missed_wakeups",
                "Control messages (enrol a namespace, new certificates, tables) an executor found by its timed look at its channel because the wake-up their sender gave it never ran: each is a lost wake-up, taken 250 ms late",
                None,
            ),
        }
    }
}

/// `N` counters, indexed by an enum (the `Index` implementations below).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counters<const N: usize>([u64; N]);

impl<const N: usize> Default for Counters<N> {
    fn default() -> Self {
        Self([0; N])
    }
}

impl<const N: usize> Counters<N> {
    /// Adds `other`'s counts into these.
    pub fn merge(&mut self, other: &Self) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine += theirs;
        }
    }
}

/// The counters of one direction.
pub type Flow = Counters<{ FlowCount::ALL.len() }>;

/// The counters of the executor as a whole.
pub type Counts = Counters<{ Count::ALL.len() }>;

impl Flow {
    /// Connections open now.
    pub fn active(&self) -> u64 {
        self[FlowCount::Accepted].saturating_sub(self[FlowCount::Completed] + self[FlowCount::Failed])
    }
}

impl Index<FlowCount> for Flow {
    type Output = u64;
    fn index(&self, c: FlowCount) -> &u64 {
        &self.0[c as usize]
    }
}

impl IndexMut<FlowCount> for Flow {
    fn index_mut(&mut self, c: FlowCount) -> &mut u64 {
        &mut self.0[c as usize]
    }
}

impl Index<Count> for Counts {
    type Output = u64;
    fn index(&self, c: Count) -> &u64 {
        &self.0[c as usize]
    }
}

impl IndexMut<Count> for Counts {
    fn index_mut(&mut self, c: Count) -> &mut u64 {
        &mut self.0[c as usize]
    }
}

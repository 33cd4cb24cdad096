//! Where a namespace stands: a pure function of its addresses, the model
//! and the certificates held.
use std::net::IpAddr;

use super::State;
use crate::cluster::model::{Mode, Model};

/// Where a namespace stands, from its addresses (as read inside it), the
/// model, and whether a certificate exists for an address; with what its
/// workload asks of the data plane.
pub(super) fn decide(addresses: &[IpAddr], model: Option<&Model>, has_cert: impl Fn(IpAddr) -> bool) -> Decision {
    let mut d = Decision { state: State::Served, skip_outbound: Vec::new(), client_address: true };
    let Some(first) = addresses.first() else { return d.now(State::WaitingForAddress) };
    if let Some(model) = model {
        let mut owner = None;
        for a in addresses {
            match model.local_with(*a) {
                Err(why) => return d.now(State::Conflict(why)),
                Ok(Some(w)) => owner = owner.or(Some(w)),
                Ok(None) => {}
            }
        }
        let Some(w) = owner else { return d.now(State::Unclaimed(*first)) };
        match &w.mode {
            Mode::Outside(why) => return d.now(State::Passed(why.label())),
            Mode::Meshed { skip_outbound, .. } => d.skip_outbound.clone_from(skip_outbound),
        }
        d.client_address = w.client_address;
        // A dual-stack pod whose second address the CNI has not added yet:
        // serving it now would leave that family without listeners.
        if !w.addresses.iter().all(|a| addresses.contains(a)) {
            return d.now(State::WaitingForAddress);
        }
    }
    match addresses.iter().find(|a| !has_cert(**a)) {
        Some(missing) => d.now(State::WaitingForCertificate(*missing)),
        None => d,
    }
}

/// What [`decide`] found: the namespace's state, the destination ports its
/// connects go direct to, and whether its application sees clients'
/// addresses (both from the workload that owns it; none without a model).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Decision {
    pub(super) state: State,
    pub(super) skip_outbound: Vec<u16>,
    pub(super) client_address: bool,
}

impl Decision {
    pub(super) fn now(self, state: State) -> Self {
        Self { state, ..self }
    }
}

//! The cluster's changes carried out: what a model update changed, written
//! to `connect4` and sent to the executors, and the pods' certificates
//! minted again when a local pod changed.
use std::sync::Arc;

use tracing::{error, info, warn};

use super::Control;
use crate::{
    cluster::model::{self, Effects, Model},
    proxy::executor,
};
use dataplane_common::maps::MeshedDst;

impl Control {
    /// Takes the cluster's changes (the first: the whole model); returns
    /// whether a local workload changed (enrolment must look again).
    pub(super) fn update(&mut self, changes: Vec<model::Change>) -> bool {
        let first = self.model.is_none();
        let fx = self.model.get_or_insert_with(Model::default).apply(changes);
        self.take_effects(fx, first)
    }

    /// Takes a reloaded workloads file: what differs from the model in
    /// service is applied. Returns whether a local workload changed.
    pub(super) fn reload_model(&mut self, loaded: Model) -> bool {
        let first = self.model.is_none();
        let (workloads, services) = loaded.into_parts();
        let fx = self.model.get_or_insert_with(Model::default).replace(workloads, services);
        self.take_effects(fx, first)
    }

    /// Carries what a model update changed to `connect4` and the executors,
    /// and lets certificates look again when a local pod changed. Only what
    /// changed is written: the cost of an update does not grow with the
    /// cluster. Returns whether a local workload changed.
    pub(super) fn take_effects(&mut self, fx: Effects, first: bool) -> bool {
        // Executors learn a pod's identity before `connect4` sends them its
        // connections.
        if !fx.identities.is_empty() {
            let changes: Arc<[_]> = fx.identities.iter().map(|(a, id)| (*a, id.clone())).collect();
            for s in &self.executors {
                let _ = s.tx.send(executor::ToExecutor::Workloads(changes.clone()));
            }
        }
        if first {
            self.forget_what_went_meanwhile();
        }
        self.write_meshed(&fx);
        self.write_services(&fx, first);
        let Some(model) = self.model.as_ref() else { return false };
        // Every pod change in the cluster lands here: the first model is
        // worth a line, the rest only at debug.
        if first {
            let (destinations, local) = (model.meshed_destinations().len(), model.local_counts());
            info!(destinations, ?local, "model of the workloads in");
        } else {
            tracing::debug!(destinations = fx.meshed.len(), local = fx.local, "model of the workloads updated");
        }
        if first || fx.policies || fx.local {
            self.sync_policies();
        }
        if let (true, Some(socket), Some(model)) = (first || fx.namespaces, &self.cfg.cni_socket, self.model.as_ref()) {
            if let Err(e) = crate::control::cni::write_namespaces(socket, model.meshed_namespaces()) {
                error!(socket = %socket.display(), error = %e, "could not write the meshed namespaces for the CNI plugin");
            }
        }
        if first || fx.local {
            self.refresh_certificates();
        }
        if first {
            // The first model is the largest transient of a run (the whole
            // cluster as one update, and the model's maps rebuilt once):
            // what it freed goes back to the kernel.
            crate::node::sys::release_free_memory();
        }
        fx.local
    }

    /// Adopted maps (strict mode) hold what the previous instance wrote:
    /// pods and ClusterIPs deleted while no agent ran go with the first
    /// model.
    fn forget_what_went_meanwhile(&mut self) {
        let (Some(model), Some(capture)) = (self.model.as_ref(), self.capture.as_mut()) else { return };
        let want = model.meshed_destinations();
        let table = model.service_table();
        let gone =
            (capture.keep_meshed(|a| want.contains_key(&a)), capture.keep_service_vips(|v| table.get(v).is_some()));
        match gone {
            (Ok(0), Ok(0)) => {}
            (Ok(pods), Ok(vips)) => info!(pods, vips, "forgot destinations that went while no data plane ran"),
            (Err(e), _) | (_, Err(e)) => warn!(error = %e, "could not sweep the adopted destinations"),
        }
    }

    /// The meshed destinations that changed, to `connect4`: added before
    /// removed, so a pod moving between addresses is never missed.
    fn write_meshed(&mut self, fx: &Effects) {
        let Some(capture) = self.capture.as_mut() else { return };
        let mut failed = 0;
        for (addr, ports) in &fx.meshed {
            if let Some(ports) = ports {
                failed += usize::from(capture.set_meshed(*addr, Some(MeshedDst::new(ports))).is_err());
            }
        }
        for addr in fx.meshed.iter().filter(|(_, p)| p.is_none()).map(|(a, _)| a) {
            let _ = capture.set_meshed(*addr, None);
        }
        if failed > 0 {
            error!(failed, "meshed destinations not written (map full?): connects to them go direct");
        }
    }

    /// The Service table to the executors, then the ClusterIPs that changed
    /// to `connect4`: executors learn a ClusterIP before `connect4` starts
    /// capturing it.
    fn write_services(&mut self, fx: &Effects, first: bool) {
        let Some(model) = self.model.as_ref() else { return };
        if fx.services || first {
            let table = model.service_table().clone();
            for s in &self.executors {
                let _ = s.tx.send(executor::ToExecutor::Services(table.clone()));
            }
            tracing::debug!(service_ports = table.len(), "services updated");
        }
        let Some(capture) = self.capture.as_mut() else { return };
        let mut failed = 0;
        for (vip, held) in &fx.vips {
            failed += usize::from(capture.set_service_vip(*vip, *held).is_err() && held.is_some());
        }
        if failed > 0 {
            error!(failed, "Service ClusterIPs not written (map full?): connects to them go around the mesh");
        }
    }

    /// The authorization policies of this node's pods, to the executors
    /// when they changed.
    fn sync_policies(&mut self) {
        let Some(model) = self.model.as_ref() else { return };
        let table = model.policy_table();
        if *self.policies != table {
            self.policies = Arc::new(table);
            for s in &self.executors {
                let _ = s.tx.send(executor::ToExecutor::Policies(self.policies.clone()));
            }
            tracing::debug!(pods = self.policies.len(), "authorization policies updated");
        }
    }

    /// A node CA from the cluster: every pod is re-minted with it.
    pub(super) fn set_node_ca(&mut self, ca: Arc<crate::identity::pki::NodeCa>) {
        if let Some(m) = self.minter.as_mut() {
            m.set_ca(ca);
        }
        self.refresh_certificates();
    }

    /// Mints what is missing or due, and hands a changed identity to the
    /// executors (new handshakes use it; those in flight finish with theirs).
    pub(super) fn refresh_certificates(&mut self) {
        let Some(minter) = self.minter.as_mut() else { return };
        let Some(id) = minter.refresh(self.model.as_ref(), &self.cfg.identity) else { return };
        let id = Arc::new(id);
        tracing::debug!(identities = ?id.addresses().collect::<Vec<_>>(), "pod certificates minted");
        self.cfg.identity = id.clone();
        for s in &self.executors {
            let _ = s.tx.send(executor::ToExecutor::Identity(id.clone()));
        }
    }
}

//! A local pod's sandbox, as the CNI plugin reported it at ADD, merged into
//! the pod's workload: the API's object with the sandbox's addresses and
//! namespace file, known before the kubelet reports them.
use std::{net::IpAddr, path::PathBuf, sync::Arc};

use super::{Effects, Model};
use crate::cluster::model::{Mode, ObjectRef, Outside, Workload};

/// A pod's sandbox on this node as the CNI plugin reported it at ADD: its
/// namespace file and its addresses, known before the kubelet reports them
/// to the API. The pod's workload carries them from then on; a pod the API
/// has not shown yet is known by its namespace's membership alone (outside
/// the mesh when the namespace is not opted in; otherwise unknown until the
/// API shows it, since its own labels may opt it out).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    /// The runtime's id of the sandbox.
    pub container_id: String,
    /// Its network namespace file.
    pub netns: PathBuf,
    /// Its addresses (none: as the API says).
    pub addresses: Vec<IpAddr>,
}

impl Model {
    /// The workload for a pod the API reports (or no longer does): with its
    /// sandbox's addresses if it has one.
    pub(super) fn api_reported(&mut self, key: &ObjectRef, new: Option<Arc<Workload>>) -> Option<Arc<Workload>> {
        if !self.sandboxes.contains_key(key) {
            return new;
        }
        match new {
            Some(w) => self.api_of_sandboxed.insert(key.clone(), w),
            None => self.api_of_sandboxed.remove(key),
        };
        self.with_sandbox(key)
    }

    /// Takes a sandbox (or its end); returns the pod's workload now.
    pub(super) fn set_sandbox(&mut self, key: &ObjectRef, sandbox: Option<Sandbox>) -> Option<Arc<Workload>> {
        match sandbox {
            Some(sb) => {
                if !self.sandboxes.contains_key(key) {
                    if let Some(w) = self.workloads.get(key) {
                        self.api_of_sandboxed.insert(key.clone(), w.clone());
                    }
                }
                self.sandboxes.insert(key.clone(), sb);
                self.with_sandbox(key)
            }
            None => {
                self.sandboxes.remove(key);
                self.api_of_sandboxed.remove(key)
            }
        }
    }

    /// Takes a namespace's membership; returns the workloads of sandboxes
    /// the API has not shown yet, which are known by their namespace alone.
    pub(super) fn set_namespace(
        &mut self,
        name: String,
        opted_in: Option<bool>,
        effects: &mut Effects,
    ) -> Vec<(ObjectRef, Option<Arc<Workload>>)> {
        let before = match opted_in {
            Some(o) => self.namespaces.insert(name.clone(), o),
            None => self.namespaces.remove(&name),
        };
        if before == opted_in {
            return Vec::new();
        }
        effects.namespaces = true;
        let unknown: Vec<ObjectRef> = self
            .sandboxes
            .keys()
            .filter(|k| *k.namespace == *name && !self.api_of_sandboxed.contains_key(*k))
            .cloned()
            .collect();
        unknown.into_iter().map(|k| (k.clone(), self.with_sandbox(&k))).collect()
    }

    /// A sandboxed pod's workload: the API's with the sandbox's addresses
    /// and namespace file; or, before the API shows the pod, one outside the
    /// mesh if its namespace is not opted in (none otherwise: undecided).
    fn with_sandbox(&self, key: &ObjectRef) -> Option<Arc<Workload>> {
        let sb = self.sandboxes.get(key)?;
        let mut w = match self.api_of_sandboxed.get(key) {
            Some(w) => Workload::clone(w),
            None if self.namespaces.get(&*key.namespace) == Some(&false) => Workload {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                service_account: "default".into(),
                addresses: Vec::new(),
                local: true,
                netns: None,
                client_address: true,
                mode: Mode::Outside(Outside::NotOptedIn),
                labels: std::collections::BTreeMap::new(),
                strict: false,
            },
            None => return None,
        };
        if !sb.addresses.is_empty() {
            w.addresses.clone_from(&sb.addresses);
        }
        w.netns = Some(sb.netns.clone());
        w.local = true;
        Some(Arc::new(w))
    }
}

//! Taking the data plane off a node, leaving nothing behind: the CNI
//! plugin's entry, binary and files ([`crate::control::cni::install::uninstall`]),
//! strict mode's pins ([`crate::node::ebpf::unpin_all`]: the capture programs are
//! detached once no agent holds them), and the return path in every pod
//! namespace ([`crate::control::return_path::remove`]).
//!
//! When: deleting the DaemonSet takes it off each node by itself. Each of
//! its containers, told to stop, asks the API whether its DaemonSet is gone
//! or marked for deletion ([`daemonset_fate`], as istio-cni does); only then
//! does it remove its part (the `cni-install` container the CNI files, the
//! agent, after draining, its pins and return paths). A rolling update, a
//! restart, a node shutting down: the DaemonSet is still there, everything
//! stays, and new pods of meshed namespaces wait for the next agent (fail
//! closed). If the API cannot say, everything stays too, and the log says
//! how to remove it by hand (`dataplane uninstall`).
use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::Api;

use dataplane_pki::api::Access;

use crate::node::netns::Netns;

/// How long a stopping container waits for the API's answer.
pub const ASK_WITHIN: Duration = Duration::from_secs(5);

/// What becomes of this node's installation as a container stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// The DaemonSet is gone or being deleted: take everything off.
    Removed(&'static str),
    /// The DaemonSet stays (an update, a restart): keep everything.
    Staying,
    /// The API could not say: keep everything (why).
    Unknown(String),
}

/// Asks the API (within `within`) whether the DaemonSet `namespace/name`
/// is gone or marked for deletion.
pub fn daemonset_fate(access: &Access, namespace: &str, name: &str, within: Duration) -> Fate {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return Fate::Unknown(format!("starting a runtime: {e}")),
    };
    rt.block_on(async {
        let ask = async {
            let client = crate::cluster::source::kube::client(access).await.map_err(|e| format!("{e:#}"))?;
            let api: Api<DaemonSet> = Api::namespaced(client, namespace);
            api.get_opt(name).await.map_err(|e| format!("reading daemonset {namespace}/{name}: {e}"))
        };
        match tokio::time::timeout(within, ask).await {
            Err(_) => Fate::Unknown(format!("no answer from the API within {within:?}")),
            Ok(Err(why)) => Fate::Unknown(why),
            Ok(Ok(None)) => Fate::Removed("the DaemonSet is gone"),
            Ok(Ok(Some(ds))) if ds.metadata.deletion_timestamp.is_some() => {
                Fate::Removed("the DaemonSet is being deleted")
            }
            Ok(Ok(Some(_))) => Fate::Staying,
        }
    })
}

/// What removing the return paths found.
#[derive(Debug, Default)]
pub struct Swept {
    /// Namespaces looked at.
    pub looked: usize,
    /// Namespaces that held our rules (now removed).
    pub cleaned: Vec<PathBuf>,
    /// Namespaces where removing failed, and why.
    pub failed: Vec<(PathBuf, String)>,
}

/// Removes the return path from every namespace file in `dir`, a few at a
/// time (each is a handful of `nft` and `ip` runs).
pub fn sweep_return_paths(dir: &Path) -> std::io::Result<Swept> {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)?.flatten().map(|e| e.path()).collect();
    let next = Mutex::new(files.iter().cloned());
    let results = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let next = &next;
                s.spawn(move || {
                    let mut out = Vec::new();
                    // The lock is held only while taking the next file.
                    let take = || next.lock().ok().and_then(|mut it| it.next());
                    while let Some(path) = take() {
                        let result = Netns::open(&path)
                            .map_err(|e| format!("opening: {e}"))
                            .and_then(|ns| crate::control::return_path::remove(&ns).map_err(|e| e.to_string()));
                        out.push((path, result));
                    }
                    out
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect::<Vec<_>>()
    });
    let mut swept = Swept { looked: files.len(), ..Swept::default() };
    for (path, result) in results {
        match result {
            Ok(true) => swept.cleaned.push(path),
            Ok(false) => {}
            Err(e) => swept.failed.push((path, e)),
        }
    }
    Ok(swept)
}

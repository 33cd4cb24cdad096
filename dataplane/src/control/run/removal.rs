//! Taking the agent's part off the node when its DaemonSet is deleted (see
//! [`crate::control::uninstall`]): asked while the drain runs, done after it.
use std::thread;

use tracing::{error, info, warn};

use crate::{
    config::{Config, Source},
    control::uninstall::Fate,
};

/// How long the removal waits for return paths still being set up.
const FLUSH_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Starts asking the API, while the drain runs, whether the DaemonSet is
/// being deleted (`--daemonset`).
pub(super) fn ask_fate(cfg: &Config) -> Option<thread::JoinHandle<Fate>> {
    let ((ns, name), Some(Source::Kube { access, .. })) = (cfg.daemonset.clone()?, cfg.source.clone()) else {
        return None;
    };
    let ask =
        move || crate::control::uninstall::daemonset_fate(&access, &ns, &name, crate::control::uninstall::ASK_WITHIN);
    thread::Builder::new().name("fate".into()).spawn(ask).ok()
}

/// After the drain: if the DaemonSet is being deleted, takes the agent's
/// part off the node (the pins, so that nothing refuses once we exit; the
/// return path in every pod namespace). The CNI files are the
/// `cni-install` container's part.
pub(super) fn take_off(
    fate: Fate,
    pin_dir: &std::path::Path,
    netns_dir: Option<std::path::PathBuf>,
    return_paths: &crate::control::return_path::Installer,
) {
    match fate {
        Fate::Staying => info!("the DaemonSet stays (an update or a restart): pins and return paths stay"),
        Fate::Unknown(why) => warn!(
            why,
            "could not tell whether the DaemonSet is being deleted: pins and return paths stay \
             (if it is, run `dataplane uninstall` on this node)"
        ),
        Fate::Removed(why) => {
            info!(why, "taking the data plane off the node");
            match crate::node::ebpf::unpin_all(pin_dir) {
                Ok(removed) => {
                    info!(removed = removed.len(), pin_dir = %pin_dir.display(), "unpinned: capture detached")
                }
                Err(e) => error!(error = %e, "could not remove the pins: run `dataplane uninstall` on this node"),
            }
            let Some(dir) = netns_dir else { return };
            // A pod enrolled just before the drain may still have its return
            // path or strict table queued: set up after the sweep, it would
            // stay behind.
            if !return_paths.flush(FLUSH_WITHIN) {
                warn!(within = ?FLUSH_WITHIN, "return paths still being set up: some may stay behind");
            }
            match crate::control::uninstall::sweep_return_paths(&dir) {
                Ok(swept) => {
                    info!(namespaces = swept.looked, cleaned = swept.cleaned.len(), "return paths removed");
                    for (path, why) in swept.failed {
                        error!(netns = %path.display(), why, "could not remove the return path");
                    }
                }
                Err(e) => error!(dir = %dir.display(), error = %e, "could not list the namespaces"),
            }
        }
    }
}

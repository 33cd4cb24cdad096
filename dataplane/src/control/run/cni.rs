//! The control thread's side of the CNI plugin (`--cni-socket`): a
//! sandbox handed over at ADD becomes its pod's (addresses and namespace
//! file, before the API shows them), and the plugin's answer waits until
//! the pod is decided: served (listeners open on every executor and
//! `connect4` told), passed (outside the mesh), or refused after
//! [`CNI_DECIDE_WITHIN`] (the runtime retries the sandbox).
//!
//! The sandboxes are kept beside the socket (`<socket>.sandboxes`): an
//! agent that restarts knows its pods' addresses again before the kubelet
//! has reported them, and those it still serves are not left unclaimed
//! meanwhile. Those whose namespace file is gone (after a reboot: the
//! runtime pins them on a tmpfs) are dropped as they are read.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use dataplane_common::cni::{sandboxes_file, Command as CniCommand, Response};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::Control;
use crate::{
    cluster::model::{self, ObjectRef},
    control::enroll::State,
};

/// How long a sandbox the CNI plugin handed over may wait for its decision
/// (the pod's object from the API, its listeners, its certificate) before
/// it is refused and the runtime retries it.
const CNI_DECIDE_WITHIN: Duration = Duration::from_secs(30);

/// A sandbox the CNI plugin waits on.
#[derive(Debug)]
pub(super) struct Wait {
    pod: ObjectRef,
    container_id: String,
    /// Its namespace file's inode (the registry's entry for it).
    ino: u64,
    reply: crossbeam_channel::Sender<Response>,
    since: Instant,
}

/// A sandbox as kept on disk, with its pod.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    namespace: String,
    name: String,
    #[serde(flatten)]
    sandbox: model::Sandbox,
}

impl Control {
    /// Takes back the sandboxes a previous agent kept whose namespace is
    /// still there (after the first model is in).
    pub(super) fn restore_sandboxes(&mut self) {
        let Some(socket) = self.cfg.cni_socket.clone() else { return };
        let path = sandboxes_file(&socket);
        let saved: Vec<Saved> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(file = %path.display(), error = %e, "kept sandboxes unreadable: the API will tell their addresses");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        let changes: Vec<model::Change> = saved
            .into_iter()
            .filter(|s| s.sandbox.netns.exists())
            .map(|s| {
                model::Change::Sandbox(
                    ObjectRef { namespace: s.namespace.into(), name: s.name.into() },
                    Some(Box::new(s.sandbox)),
                )
            })
            .collect();
        if !changes.is_empty() {
            info!(sandboxes = changes.len(), "sandboxes taken back from the previous agent");
            self.update(changes);
        }
        self.save_sandboxes();
    }

    /// Writes the sandboxes down (whole: a temporary file renamed over).
    fn save_sandboxes(&self) {
        let (Some(socket), Some(model)) = (&self.cfg.cni_socket, &self.model) else { return };
        let saved: Vec<Saved> = model
            .sandboxes()
            .map(|(pod, s)| Saved {
                namespace: pod.namespace.to_string(),
                name: pod.name.to_string(),
                sandbox: s.clone(),
            })
            .collect();
        let path = sandboxes_file(socket);
        let written = serde_json::to_vec(&saved)
            .map_err(std::io::Error::other)
            .and_then(|b| crate::control::cni::write_whole(&path, &b, 0o600));
        if let Err(e) = written {
            error!(file = %path.display(), error = %e, "could not keep the sandboxes: a restarted agent learns their addresses from the API");
        }
    }

    /// A sandbox from the CNI plugin: ADD makes it the pod's (its addresses
    /// and namespace file, before the API shows them) and waits for the
    /// decision; DEL forgets it.
    pub(super) fn cni(&mut self, ask: crate::control::cni::Ask) {
        let req = ask.request;
        let pod = ObjectRef::new(&req.namespace, &req.name);
        match req.command {
            CniCommand::Del => {
                // Only the sandbox the model holds: a late DEL of an earlier
                // sandbox leaves its successor alone.
                let current = self.model.as_ref().and_then(|m| m.sandbox(&pod));
                if current.is_some_and(|s| s.container_id == req.container_id) {
                    if self.update(vec![model::Change::Sandbox(pod.clone(), None)]) {
                        self.scan_namespaces();
                    }
                    self.save_sandboxes();
                }
                info!(%pod, container = req.container_id, "CNI DEL");
                // The runtime gave up on a sandbox still waiting.
                let (gone, waiting) =
                    std::mem::take(&mut self.cni_waiting).into_iter().partition(|w| w.container_id == req.container_id);
                self.cni_waiting = waiting;
                for w in gone {
                    let why = "the sandbox was deleted before it was decided".to_string();
                    self.cni_answered(&w.pod, w.since, Response::Refused { why }, &w.reply);
                }
                let _ = ask.reply.send(Response::Passed { why: "deleted".into() });
            }
            CniCommand::Add => {
                let since = Instant::now();
                let netns = seen_here(&req.netns, self.cfg.netns_dir.as_deref());
                let ino = match std::fs::metadata(&netns) {
                    Ok(m) => std::os::unix::fs::MetadataExt::ino(&m),
                    Err(e) => {
                        let why = format!("{} (here {}): {e}", req.netns.display(), netns.display());
                        self.cni_answered(&pod, since, Response::Refused { why }, &ask.reply);
                        return;
                    }
                };
                let sandbox = model::Sandbox {
                    container_id: req.container_id.clone(),
                    netns: netns.clone(),
                    addresses: req.addresses.clone(),
                };
                info!(%pod, container = req.container_id, netns = %req.netns.display(), addresses = ?req.addresses, "CNI ADD");
                self.cni_waiting.push(Wait {
                    pod: pod.clone(),
                    container_id: req.container_id,
                    ino,
                    reply: ask.reply,
                    since,
                });
                // Only this sandbox's namespace is looked at now; the
                // next scan (at most RELOAD_POLL away) looks at the others,
                // whose address may be this pod's too.
                if self.update(vec![model::Change::Sandbox(pod, Some(Box::new(sandbox)))]) {
                    self.look_at(&netns);
                }
                self.save_sandboxes();
                self.answer_cni();
            }
        }
    }

    /// Answers the sandboxes that are decided (served: listeners open on
    /// every executor and `connect4` told; or passed), and refuses those
    /// that waited too long.
    pub(super) fn answer_cni(&mut self) {
        for w in std::mem::take(&mut self.cni_waiting) {
            let decided = self.cni_decision(&w);
            match decided {
                Some(r) => self.cni_answered(&w.pod, w.since, r, &w.reply),
                None if w.since.elapsed() >= CNI_DECIDE_WITHIN => {
                    let why = match (self.model.as_ref().and_then(|m| m.workload(&w.pod)), &self.registry) {
                        (None, _) => format!("the Kubernetes API has not shown pod {} yet", w.pod),
                        (Some(_), Some(r)) => match r.state_of(w.ino) {
                            Some((state, _)) => format!("its network namespace is {}", state.label()),
                            None => "its network namespace is not found".into(),
                        },
                        (Some(_), None) => "no --netns-dir".into(),
                    };
                    let why = format!("not decided within {}s: {why}", CNI_DECIDE_WITHIN.as_secs());
                    self.cni_answered(&w.pod, w.since, Response::Refused { why }, &w.reply);
                }
                None => self.cni_waiting.push(w),
            }
        }
    }

    /// The answer for a sandbox, once there is one.
    fn cni_decision(&self, w: &Wait) -> Option<Response> {
        // Not shown by the API yet, in a namespace that is opted in (or not
        // known): its own labels may still opt it out.
        self.model.as_ref()?.workload(&w.pod)?;
        let (state, opening) = self.registry.as_ref()?.state_of(w.ino)?;
        match state {
            State::Served if !opening => Some(Response::Served),
            State::Passed(why) => Some(Response::Passed { why: why.to_string() }),
            State::Conflict(why) => Some(Response::Refused { why: why.clone() }),
            _ => None,
        }
    }

    fn cni_answered(
        &mut self,
        pod: &ObjectRef,
        since: Instant,
        r: Response,
        reply: &crossbeam_channel::Sender<Response>,
    ) {
        let took = since.elapsed();
        let _ = self.cni_figures.decision.record(took.as_micros().max(1) as u64);
        let verdict = match &r {
            Response::Served => "served",
            Response::Passed { .. } => "passed",
            Response::Refused { why } => {
                warn!(%pod, why, "CNI ADD refused: the runtime will retry the sandbox");
                "refused"
            }
        };
        *self.cni_figures.answered.entry(verdict).or_default() += 1;
        info!(%pod, verdict, ?took, "CNI ADD answered");
        let _ = reply.send(r);
    }
}

/// Where the agent sees a namespace file the plugin named by its path on
/// the node: the same path if the agent sees it there, else the file of
/// that name in `--netns-dir` (the DaemonSet mounts the node's
/// /var/run/netns elsewhere).
fn seen_here(on_node: &Path, netns_dir: Option<&Path>) -> PathBuf {
    match (on_node.exists(), netns_dir, on_node.file_name()) {
        (false, Some(dir), Some(name)) if dir.join(name).exists() => dir.join(name),
        _ => on_node.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_named_by_its_node_path_is_found_in_the_mounted_directory() {
        let dir = std::env::temp_dir().join(format!("dp-seen-here-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("cni-1234"), b"").expect("file");
        let on_node = Path::new("/nonexistent/var/run/netns/cni-1234");
        assert_eq!(seen_here(on_node, Some(&dir)), dir.join("cni-1234"), "mounted elsewhere");
        assert_eq!(seen_here(&dir.join("cni-1234"), None), dir.join("cni-1234"), "the same path");
        assert_eq!(seen_here(Path::new("/nonexistent/x"), Some(&dir)), Path::new("/nonexistent/x"), "not there either");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

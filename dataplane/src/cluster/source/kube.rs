//! The model from the Kubernetes API: kube-rs watchers of Pods (every node's:
//! meshed pods elsewhere are the destinations we tunnel to; this node's are
//! the ones we enrol), Namespaces (their opt-in label), Services and
//! EndpointSlices (ClusterIPs and their endpoints), on a
//! single-threaded tokio runtime of their own thread. Executors never see
//! it; the control thread receives the model's changes
//! ([`model::Change`]): each event becomes the changes of the objects it
//! touched (a pod; a Namespace's pods, when its label flips; a Service,
//! when it or one of its EndpointSlices changes), never a whole model.
//!
//! kube-rs's watcher lists, then watches from the list's resourceVersion with
//! bookmarks; a dropped connection or an API server restart resumes the
//! watch, and `410 Gone` (history compacted) relists. The first list is
//! applied whole when it completes; a relist object by object as it comes
//! (only what differs is sent on), and what it did not show (gone while the
//! watch was down) goes at its end, so no pod is lost or kept. Pods are read
//! into a slim type (`kube/slim.rs`). Errors back off exponentially and are
//! counted per resource ([`Counters`]). Nothing is published until both
//! resources have been listed once: the control thread does not capture or
//! enrol on half a picture.
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use crossbeam_channel::Sender;
use futures_util::{stream, Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service as K8sService},
    discovery::v1::EndpointSlice,
};
use kube::{api::DynamicObject, runtime::watcher, Api, Client, ResourceExt};
use tracing::{info, warn};

use crate::cluster::model::{self};

pub use dataplane_pki::api::{client, Access};

/// The model's changes from one batch of watch events, and when the batch's
/// first event reached the agent (the start of its update's latency).
#[derive(Debug)]
pub struct Batch {
    /// When the first event of the batch arrived.
    pub received: std::time::Instant,
    /// What the events changed.
    pub changes: Vec<model::Change>,
}

/// Watch errors (each followed by a retry, relist or resumed watch), per
/// resource, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Pods watch.
    pub pods: AtomicU64,
    /// Namespaces watch.
    pub namespaces: AtomicU64,
    /// Services and EndpointSlices watches.
    pub services: AtomicU64,
    /// AuthorizationPolicies watch.
    pub policies: AtomicU64,
}

mod slim;
mod state;
mod views;

use state::{Change, State};
use views::authorization_policies;

/// Starts the watchers on a thread of their own; every model that differs
/// from the last goes to `tx`. With `node_ca`, the same runtime also requests
/// this node's CA ([`super::nodeca`]). The thread ends when the receivers
/// are gone (each task notices at its next result).
pub fn start(
    access: Access,
    node: String,
    tx: Sender<Batch>,
    node_ca: Option<(super::nodeca::Spec, Sender<Arc<crate::identity::pki::NodeCa>>)>,
) -> anyhow::Result<(Arc<Counters>, Arc<super::nodeca::Counters>)> {
    let counters = Arc::new(Counters::default());
    let ca_counters = Arc::new(super::nodeca::Counters::default());
    let (c, cc) = (counters.clone(), ca_counters.clone());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // The client is built here, so a bad kubeconfig fails start-up with its
    // reason instead of a retry loop.
    let client = rt.block_on(client(&access))?;
    info!(?access, node, "watching the Kubernetes API");
    thread::Builder::new().name("kube".into()).spawn(move || {
        rt.block_on(async move {
            let requests = async {
                if let Some((spec, ca_tx)) = node_ca {
                    super::nodeca::run(client.clone(), spec, ca_tx, cc).await;
                }
            };
            futures_util::future::join(watch(client.clone(), node, tx, c), requests).await;
        })
    })?;
    Ok((counters, ca_counters))
}

/// A watch whose failures are retried after a back-off (exponential from
/// 0.8 s to 30 s, jittered, as kube-rs's default), except `410 Gone`: an
/// expected answer after an API server restart or a compaction, for which
/// the watcher relists within [`RELIST_SPREAD`] (a back-off there only
/// delays every pod created meanwhile; the spread keeps every agent of a
/// large cluster, whose watches all expired with the same restart, from
/// listing in the same instant).
fn retried<K: Send + 'static>(
    events: impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
) -> impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send {
    let start = (Box::pin(events), watcher::DefaultBackoff::default(), None);
    stream::unfold(start, |(mut events, mut backoff, wait)| async move {
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
        let item = events.next().await?;
        let wait = wait_after(&item, &mut backoff);
        Some((item, (events, backoff, wait)))
    })
}

/// How long to wait before polling a watch again after `item`.
fn wait_after<T>(item: &watcher::Result<T>, backoff: &mut impl kube::runtime::utils::Backoff) -> Option<Duration> {
    match item {
        Ok(_) => {
            backoff.reset();
            None
        }
        Err(watcher::Error::WatchError(status)) if status.code == 410 => Some(RELIST_SPREAD.mul_f64(random_fraction())),
        Err(_) => backoff.next(),
    }
}

/// How far apart the agents' relists after a `410 Gone` are spread.
pub const RELIST_SPREAD: Duration = Duration::from_secs(1);

/// A number in [0, 1) that differs between processes and calls (std's
/// randomly keyed hasher: no dependency for a jitter).
fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new().build_hasher().finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// The node's zone label, for Services' zone hints; read once (a node's
/// zone does not change while it runs). `None` if it has none or cannot be
/// read: zone hints are then not followed, as kube-proxy does.
async fn zone_of(client: &Client, node: &str) -> Option<String> {
    let nodes: Api<Node> = Api::all(client.clone());
    let read = tokio::time::timeout(Duration::from_secs(10), nodes.get_opt(node)).await;
    match read {
        Ok(Ok(Some(n))) => {
            let zone = n.labels().get(ZONE_LABEL).cloned();
            info!(node, zone = zone.as_deref().unwrap_or("none"), "this node's zone (for Services' zone hints)");
            zone
        }
        Ok(Ok(None)) => None,
        Ok(Err(e)) => {
            warn!(node, error = %e, "cannot read this node's zone: Services' zone hints are not followed");
            None
        }
        Err(_) => {
            warn!(node, "no answer for this node's zone within 10 s: Services' zone hints are not followed");
            None
        }
    }
}

/// The well-known zone label.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

async fn watch(client: Client, node: String, tx: Sender<Batch>, counters: Arc<Counters>) {
    let pods = retried(watcher(Api::<slim::SlimPod>::all(client.clone()), watcher::Config::default()))
        .map(|r| r.map(|e| Change::Pod(Box::new(e))).map_err(|e| ("pods", e)));
    let namespaces = retried(watcher(Api::<Namespace>::all(client.clone()), watcher::Config::default()))
        .map(|r| r.map(|e| Change::Namespace(Box::new(e))).map_err(|e| ("namespaces", e)));
    let services = retried(watcher(Api::<K8sService>::all(client.clone()), watcher::Config::default()))
        .map(|r| r.map(|e| Change::Service(Box::new(e))).map_err(|e| ("services", e)));
    let slices = retried(watcher(Api::<EndpointSlice>::all(client.clone()), watcher::Config::default()))
        .map(|r| r.map(|e| Change::Slice(Box::new(e))).map_err(|e| ("endpointslices", e)));
    // A cluster without the resource (no Istio, our CRD not applied) has no
    // policies: said once, then the watch stops asking.
    let policies = retried(watcher(
        Api::<DynamicObject>::all_with(client.clone(), &authorization_policies()),
        watcher::Config::default(),
    ))
    .map(|r| match r {
        Ok(e) => Ok(Change::Policy(Box::new(e))),
        Err(watcher::Error::InitialListFailed(kube::Error::Api(s))) if s.is_not_found() => Ok(Change::NoPolicies),
        // Not ours to read (RBAC without the rule deployment.yaml grants):
        // none can be applied, and pods must not wait for them forever.
        Err(watcher::Error::InitialListFailed(kube::Error::Api(s))) if s.code == 403 => {
            tracing::error!("AuthorizationPolicies cannot be read (forbidden): none is applied; grant list and watch on authorizationpolicies.security.istio.io");
            Ok(Change::NoPolicies)
        }
        Err(e) => Err(("authorizationpolicies", e)),
    })
    .scan(false, |said, r| {
        // "None" once per stretch of 404s (the watch asks again after its
        // back-off); a CRD applied later brings its policies in as usual.
        let none = matches!(r, Ok(Change::NoPolicies));
        let again = none && *said;
        *said = none;
        futures_util::future::ready(Some((!again).then_some(r)))
    })
    .filter_map(futures_util::future::ready);
    let mut changes = std::pin::pin!(stream::select(
        stream::select(stream::select(pods, namespaces), stream::select(services, slices)),
        policies
    ));
    let zone = zone_of(&client, &node).await;
    let mut state = State { node, zone, ..State::default() };
    while let Some(first) = changes.next().await {
        let received = std::time::Instant::now();
        // Take every change already waiting before publishing: a relist of
        // thousands of pods goes out as one update.
        let mut batch = vec![first];
        while let Some(Some(more)) = futures_util::FutureExt::now_or_never(changes.next()) {
            batch.push(more);
        }
        let was_published = state.published;
        let mut update = Vec::new();
        for item in batch {
            match item {
                Ok(change) => update.extend(state.apply(change)),
                Err((resource, e)) => {
                    let counter = match resource {
                        "pods" => &counters.pods,
                        "namespaces" => &counters.namespaces,
                        "authorizationpolicies" => &counters.policies,
                        _ => &counters.services,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    warn!(resource, error = %e, "Kubernetes watch interrupted; resuming (relisting if needed)");
                }
            }
        }
        // The first update goes out even if the cluster is empty: it says
        // that every list is in.
        if (!update.is_empty() || state.published != was_published)
            && tx.send(Batch { received, changes: update }).is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests;

//! `dataplane issuer`: signs node CAs for the node agents, and nothing else.
//!
//! It holds the cluster CA key (a Secret only it mounts), watches
//! CertificateSigningRequests, and for each pending one with our signer name
//! looks up the node it names and applies [`pki::decide`]: approved and
//! signed ([`pki::sign_node_ca`]), or denied with the reason in the
//! `Denied` condition. It keeps no state but the CA: a request approved but
//! not yet signed when it stopped is signed by the next instance, and one
//! already answered is never touched again.
mod args;

pub use args::{IssuerArgs, SettingsError};

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use base64::Engine;
use futures_util::StreamExt;
use k8s_openapi::api::{certificates::v1::CertificateSigningRequest, core::v1::Node};
use kube::{
    api::{Patch, PatchParams},
    runtime::{watcher, WatchStreamExt},
    Api, Client, ResourceExt,
};
use rcgen::{Issuer, KeyPair};
use tracing::{error, info, warn};

use dataplane_pki::{self as pki, api::Access};

/// `dataplane issuer`'s settings.
#[derive(Debug)]
pub struct Settings {
    /// How to reach the API server.
    pub access: Access,
    /// Where the cluster root is kept.
    pub root: RootFrom,
    /// What it will sign.
    pub policy: pki::Policy,
}

/// Where the cluster root (`ca.crt`, `ca.key`) is kept.
#[derive(Debug, Clone)]
pub enum RootFrom {
    /// A directory (`dataplane ca init` makes one).
    Dir(PathBuf),
    /// A Secret (namespace, name), made on first start if there is none,
    /// and the ConfigMap (namespace, name) the root is published in as the
    /// agents' trust bundle (`ca.crt`).
    Cluster {
        /// The Secret only the issuer may read.
        secret: (String, String),
        /// The trust bundle every agent mounts.
        bundle: (String, String),
    },
}

/// Runs until killed.
pub fn run(settings: Settings) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let client = dataplane_pki::api::client(&settings.access).await?;
        let (cert, key) = match &settings.root {
            RootFrom::Dir(dir) => {
                let read = |name: &str| {
                    let path = dir.join(name);
                    std::fs::read_to_string(&path).with_context(|| format!("--ca-dir: {}", path.display()))
                };
                (read("ca.crt")?, read("ca.key")?)
            }
            RootFrom::Cluster { secret, bundle } => {
                let root = cluster_root(&client, secret).await?;
                publish(&client, bundle, &root.0).await?;
                root
            }
        };
        let key = KeyPair::from_pem(&key).context("the root key does not parse")?;
        let root = Issuer::from_ca_cert_pem(&cert, key).context("the root certificate does not match its key")?;
        info!(signer = pki::SIGNER, agent = settings.policy.agent, max_lifetime = ?settings.policy.max_lifetime, "issuer watching CertificateSigningRequests");
        let csrs: Api<CertificateSigningRequest> = Api::all(client.clone());
        let nodes: Api<Node> = Api::all(client);
        let mut events = std::pin::pin!(watcher(csrs.clone(), watcher::Config::default()).default_backoff());
        while let Some(ev) = events.next().await {
            let csr = match ev {
                Ok(watcher::Event::Apply(c) | watcher::Event::InitApply(c)) => c,
                Ok(_) => continue,
                Err(e) => {
                    warn!(error = %e, "CSR watch interrupted; resuming");
                    continue;
                }
            };
            if let Err(e) = handle(&csrs, &nodes, &root, &settings.policy, &csr).await {
                // Left pending: the next event for it (or a restart) retries.
                error!(csr = csr.name_any(), error = %e, "could not answer a CSR");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        anyhow::Ok(())
    })
}

/// The root kept in `secret`, made (once, whoever wins the race) if absent.
async fn cluster_root(client: &Client, (ns, name): &(String, String)) -> anyhow::Result<(String, String)> {
    use k8s_openapi::{api::core::v1::Secret, ByteString};
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let read = |s: Secret| -> anyhow::Result<(String, String)> {
        let data = s.data.unwrap_or_default();
        let field = |k: &str| {
            data.get(k)
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .with_context(|| format!("Secret {ns}/{name} has no {k}"))
        };
        Ok((field("ca.crt")?, field("ca.key")?))
    };
    if let Some(s) = secrets.get_opt(name).await? {
        info!(secret = format!("{ns}/{name}"), "using the cluster root kept in the Secret");
        return read(s);
    }
    let (cert, key) = pki::ca::root()?;
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/name": "dataplane"}},
        "type": "Opaque",
    }))?;
    let secret = Secret {
        data: Some(
            [
                ("ca.crt".to_string(), ByteString(cert.clone().into_bytes())),
                ("ca.key".to_string(), ByteString(key.clone().into_bytes())),
            ]
            .into(),
        ),
        ..secret
    };
    match secrets.create(&kube::api::PostParams::default(), &secret).await {
        Ok(_) => {
            info!(secret = format!("{ns}/{name}"), "made a new cluster root and kept it in the Secret");
            Ok((cert, key))
        }
        // Another issuer made one first: use that.
        Err(kube::Error::Api(e)) if e.code == 409 => read(secrets.get(name).await?),
        Err(e) => Err(e.into()),
    }
}

/// Makes sure the trust bundle holds `cert` (beside any other root already
/// there: during a root rotation it holds two).
async fn publish(client: &Client, (ns, name): &(String, String), cert: &str) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    match maps.get_opt(name).await? {
        Some(m) => {
            let current = m.data.unwrap_or_default().get("ca.crt").cloned().unwrap_or_default();
            if !current.contains(cert.trim()) {
                let merged = format!(
                    "{}{cert}",
                    if current.is_empty() { String::new() } else { format!("{}\n", current.trim_end()) }
                );
                let patch = serde_json::json!({"data": {"ca.crt": merged}});
                maps.patch(name, &PatchParams::default(), &Patch::Merge(patch)).await?;
                info!(configmap = format!("{ns}/{name}"), "added the root to the trust bundle");
            }
        }
        None => {
            let m: ConfigMap = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/name": "dataplane"}},
                "data": {"ca.crt": cert},
            }))?;
            maps.create(&kube::api::PostParams::default(), &m).await?;
            info!(configmap = format!("{ns}/{name}"), "published the trust bundle");
        }
    }
    Ok(())
}

/// Where a request stands, from its status.
fn answered(csr: &CertificateSigningRequest) -> (bool, bool) {
    let status = csr.status.as_ref();
    let conds = status.and_then(|s| s.conditions.as_ref()).cloned().unwrap_or_default();
    let is = |t: &str| conds.iter().any(|c| c.type_ == t && c.status == "True");
    let signed = status.and_then(|s| s.certificate.as_ref()).is_some_and(|c| !c.0.is_empty());
    (is("Approved") && !signed, is("Denied") || is("Failed") || signed)
}

async fn handle(
    csrs: &Api<CertificateSigningRequest>,
    nodes: &Api<Node>,
    root: &Issuer<'_, KeyPair>,
    policy: &pki::Policy,
    csr: &CertificateSigningRequest,
) -> anyhow::Result<()> {
    if csr.spec.signer_name != pki::SIGNER || answered(csr).1 {
        return Ok(());
    }
    // The event may be older than the request: our own approval comes back
    // as an event while we sign, and a certificate once issued cannot be
    // replaced (the API server answers 422). So act on the request as it is
    // now.
    let name = csr.name_any();
    let Some(csr) = csrs.get_opt(&name).await? else { return Ok(()) };
    let csr = &csr;
    let (approved_unsigned, done) = answered(csr);
    if done {
        return Ok(());
    }
    let req = request_of(csr);
    // The node the request names, looked up only if the rest holds.
    let named = pki::named_node(&req.pem).ok();
    let node = match &named {
        Some(n) => nodes.get_opt(n).await?.map(|n| pki::Node {
            name: n.name_any(),
            pod_cidrs: n.spec.and_then(|s| s.pod_cidrs.or(s.pod_cidr.map(|c| vec![c]))).unwrap_or_default(),
        }),
        None => None,
    };
    match pki::decide(&req, node.as_ref(), policy) {
        Ok(grant) => {
            if !approved_unsigned {
                condition(csrs, &name, "Approved", "NodeAgentOfThisNode", &format!("node CA for {}", grant.node))
                    .await?;
            }
            let pem = pki::sign_node_ca(&req.pem, &grant, root)?;
            let patch =
                serde_json::json!({"status": {"certificate": base64::engine::general_purpose::STANDARD.encode(pem)}});
            csrs.patch_status(&name, &PatchParams::default(), &Patch::Merge(patch)).await?;
            info!(csr = name, node = grant.node, cidrs = ?grant.cidrs, lifetime = ?grant.lifetime, "signed a node CA");
        }
        Err(why) => {
            condition(csrs, &name, "Denied", "NotANodeAgentRequest", &why).await?;
            warn!(csr = name, requester = req.username, reason = why, "denied a CSR");
        }
    }
    Ok(())
}

async fn condition(
    csrs: &Api<CertificateSigningRequest>,
    name: &str,
    kind: &str,
    reason: &str,
    message: &str,
) -> anyhow::Result<()> {
    let patch = serde_json::json!({"status": {"conditions": [{
        "type": kind, "status": "True", "reason": reason, "message": message,
        "lastUpdateTime": k8s_now(),
    }]}});
    csrs.patch_approval(name, &PatchParams::default(), &Patch::Merge(patch)).await?;
    Ok(())
}

fn k8s_now() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

fn request_of(csr: &CertificateSigningRequest) -> pki::Request {
    let spec = &csr.spec;
    pki::Request {
        signer: spec.signer_name.clone(),
        username: spec.username.clone().unwrap_or_default(),
        token_node: spec.extra.as_ref().and_then(|e| e.get(pki::NODE_CLAIM)).and_then(|v| v.first().cloned()),
        usages: spec.usages.clone().unwrap_or_default(),
        pem: String::from_utf8_lossy(&spec.request.0).into_owned(),
        expiration_seconds: spec.expiration_seconds,
        requested_cidrs: csr.annotations().get(pki::CIDRS_ANNOTATION).cloned(),
    }
}

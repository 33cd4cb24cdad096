//! `dataplane issuer`: signs node CAs for the node agents, and nothing else.
//!
//! It holds the cluster CA key (a Secret only it mounts), watches
//! CertificateSigningRequests, and for each pending one with our signer name
//! looks up the node it names and applies [`pki::decide`]: approved and
//! signed ([`pki::sign_node_ca`]), or denied with the reason in the
//! `Denied` condition. It keeps no state but the CA: a request approved but
//! not yet signed when it stopped is signed by the next instance, and one
//! already answered is never touched again.
use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use base64::Engine;
use futures_util::StreamExt;
use k8s_openapi::api::{certificates::v1::CertificateSigningRequest, core::v1::Node};
use kube::{
    api::{Patch, PatchParams},
    runtime::{watcher, WatchStreamExt},
    Api, ResourceExt,
};
use rcgen::{Issuer, KeyPair};
use tracing::{error, info, warn};

use crate::{pki, source::kube::Access};

/// `dataplane issuer`'s settings.
#[derive(Debug)]
pub struct Settings {
    /// How to reach the API server.
    pub access: Access,
    /// `ca.crt` and `ca.key` of the cluster root.
    pub ca_dir: PathBuf,
    /// What it will sign.
    pub policy: pki::Policy,
}

/// Runs until killed.
pub fn run(settings: Settings) -> anyhow::Result<()> {
    let read = |name: &str| {
        let path = settings.ca_dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("--ca-dir: {}", path.display()))
    };
    let key = KeyPair::from_pem(&read("ca.key")?).context("--ca-dir: ca.key")?;
    let root = Issuer::from_ca_cert_pem(&read("ca.crt")?, key).context("--ca-dir: ca.crt does not match ca.key")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let client = crate::source::kube::client(&settings.access).await?;
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
    if csr.spec.signer_name != pki::SIGNER {
        return Ok(());
    }
    let (approved_unsigned, done) = answered(csr);
    if done {
        return Ok(());
    }
    let name = csr.name_any();
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

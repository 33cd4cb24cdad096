//! The node agent's side of certificate issuance: a node key made here, a
//! CertificateSigningRequest for [`pki::SIGNER`] created through the API,
//! waited on until the issuer signs (or denies) it, and renewed at two
//! thirds of its life, or after a failure with backoff (1 s doubling to a
//! minute). Runs on the Kubernetes thread's runtime; each node CA goes to the
//! control thread, which mints the pods' certificates with it.
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use base64::Engine;
use crossbeam_channel::Sender;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::{api::PostParams, Api, Client};
use tracing::{info, warn};

use crate::identity::pki::{self, KeyType, NodeCa};

/// How the agent asks.
#[derive(Debug, Clone)]
pub struct Spec {
    /// This node.
    pub node: String,
    /// Lifetime asked for (the issuer may grant less).
    pub lifetime: Duration,
    /// The pods' key type.
    pub leaf_key: KeyType,
}

/// Node CA requests, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Node CAs received.
    pub issued: AtomicU64,
    /// Requests that failed (denied, timed out, API errors).
    pub failed: AtomicU64,
}

/// How long one request may wait for the issuer.
const WAIT: Duration = Duration::from_secs(60);

/// Requests node CAs for ever; ends when the control thread is gone.
pub async fn run(client: Client, spec: Spec, tx: Sender<Arc<NodeCa>>, counters: Arc<Counters>) {
    let api: Api<CertificateSigningRequest> = Api::all(client);
    let mut backoff = Duration::from_secs(1);
    loop {
        match request(&api, &spec).await {
            Ok(ca) => {
                counters.issued.fetch_add(1, Ordering::Relaxed);
                backoff = Duration::from_secs(1);
                let left = ca.not_after().duration_since(SystemTime::now()).unwrap_or_default();
                info!(node = spec.node, valid_for = ?left, "node CA issued");
                if tx.send(Arc::new(ca)).is_err() {
                    return;
                }
                tokio::time::sleep(left * 2 / 3).await;
            }
            Err(e) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                warn!(node = spec.node, error = %e, retry_in = ?backoff, "node CA request failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

async fn request(api: &Api<CertificateSigningRequest>, spec: &Spec) -> anyhow::Result<NodeCa> {
    let (key, pem) = pki::node_request(&spec.node)?;
    let millis = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis();
    let name = format!("dataplane-{}-{millis}", spec.node);
    let csr: CertificateSigningRequest = serde_json::from_value(serde_json::json!({
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "dataplane"}},
        "spec": {
            "request": base64::engine::general_purpose::STANDARD.encode(pem),
            "signerName": pki::SIGNER,
            "usages": ["cert sign", "digital signature"],
            "expirationSeconds": spec.lifetime.as_secs().clamp(600, i32::MAX as u64),
        }
    }))?;
    api.create(&PostParams::default(), &csr).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut pause = Duration::from_millis(50);
    loop {
        let got = api.get(&name).await?;
        let status = got.status.unwrap_or_default();
        if let Some(cert) = status.certificate {
            let pem = String::from_utf8(cert.0)?;
            return Ok(NodeCa::new(key, &pem, spec.leaf_key)?);
        }
        for c in status.conditions.unwrap_or_default() {
            if (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True" {
                anyhow::bail!(
                    "{} {}: {}",
                    c.type_.to_lowercase(),
                    c.reason.unwrap_or_default(),
                    c.message.unwrap_or_default()
                );
            }
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("CSR {name}: no answer from the issuer within {WAIT:?}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

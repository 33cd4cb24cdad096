//! How the agent and the issuer reach the API server, and name its objects.
use std::path::PathBuf;

use anyhow::Context;
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    Client,
};

/// Where the client finds the API server.
#[derive(Debug, Clone)]
pub enum Access {
    /// The ServiceAccount token and `KUBERNETES_SERVICE_*` of a pod.
    InCluster,
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
}

impl Access {
    /// From the `--kube` and `--kubeconfig` flags (which exclude each
    /// other): `None` when neither is given.
    pub fn from_flags(kube: bool, kubeconfig: Option<&std::path::Path>) -> Option<Self> {
        match (kube, kubeconfig) {
            (true, _) => Some(Self::InCluster),
            (false, Some(path)) => Some(Self::Kubeconfig(path.to_path_buf())),
            (false, None) => None,
        }
    }
}

/// A client for the API server `access` names.
pub async fn client(access: &Access) -> anyhow::Result<Client> {
    let config = match access {
        Access::InCluster => kube::Config::incluster().context("in-cluster Kubernetes configuration")?,
        Access::Kubeconfig(path) => {
            let kc = Kubeconfig::read_from(path).with_context(|| format!("--kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// A `NAMESPACE/NAME` flag's value.
pub fn parse_ns_name(s: &str) -> Result<(String, String), String> {
    s.split_once('/')
        .filter(|(a, b)| !a.is_empty() && !b.is_empty() && !b.contains('/'))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .ok_or_else(|| format!("{s:?}: expected NAMESPACE/NAME"))
}

//! `dataplane issuer`'s flags, checked into its [`Settings`].
use std::{path::PathBuf, time::Duration};

use clap::Args;
use dataplane_pki::{
    self as pki,
    api::{parse_ns_name, Access},
};

use crate::{RootFrom, Settings};

/// A flag's value the issuer cannot use.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A NAMESPACE/NAME flag is not one.
    #[error("{0:?}: expected NAMESPACE/NAME")]
    NotNamespaceName(String),
    /// `--max-lifetime` below a second.
    #[error("--max-lifetime 0s: must be longer than zero")]
    ZeroLifetime,
}

/// `dataplane issuer`.
#[derive(Debug, Clone, Args)]
pub struct IssuerArgs {
    /// Use the pod's in-cluster configuration.
    #[arg(long, env = "DATAPLANE_KUBE")]
    pub kube: bool,
    /// Use this kubeconfig file instead.
    #[arg(
        long,
        env = "DATAPLANE_KUBECONFIG",
        value_name = "FILE",
        conflicts_with = "kube",
        required_unless_present = "kube"
    )]
    pub kubeconfig: Option<PathBuf>,
    /// The cluster root from a directory (ca.crt, ca.key), instead of
    /// --ca-secret.
    #[arg(long, env = "DATAPLANE_CA_DIR", value_name = "DIR", conflicts_with = "ca_secret")]
    pub ca_dir: Option<PathBuf>,
    /// The Secret (NAMESPACE/NAME) that keeps the cluster root, made on the
    /// first start if absent; only the issuer may read it.
    #[arg(long, env = "DATAPLANE_CA_SECRET", value_name = "NS/NAME", default_value = "dataplane-system/dataplane-ca")]
    pub ca_secret: String,
    /// The ConfigMap (NAMESPACE/NAME) the root is published in (key
    /// ca.crt): the agents' --trust-bundle.
    #[arg(
        long,
        env = "DATAPLANE_TRUST_BUNDLE_CONFIGMAP",
        value_name = "NS/NAME",
        default_value = "dataplane-system/dataplane-trust-bundle"
    )]
    pub trust_bundle_configmap: String,
    /// The node agents' ServiceAccount (NAMESPACE/NAME): only its requests
    /// are signed.
    #[arg(
        long,
        env = "DATAPLANE_AGENT_SERVICE_ACCOUNT",
        value_name = "NS/NAME",
        default_value = "dataplane-system/dataplane"
    )]
    pub agent_service_account: String,
    /// Longest node CA lifetime granted.
    #[arg(long, env = "DATAPLANE_MAX_LIFETIME", value_name = "DURATION", default_value = "24h",
          value_parser = humantime::parse_duration)]
    pub max_lifetime: Duration,
    /// Check the flags and values, print the settings, and exit (0 if
    /// valid); nothing is contacted.
    #[arg(long)]
    pub check_config: bool,
}

impl IssuerArgs {
    /// The issuer's settings.
    pub fn settings(&self) -> Result<Settings, SettingsError> {
        let pair = |s: &str| parse_ns_name(s).map_err(|_| SettingsError::NotNamespaceName(s.to_string()));
        let (ns, name) = pair(&self.agent_service_account)?;
        let root = match &self.ca_dir {
            Some(dir) => RootFrom::Dir(dir.clone()),
            None => RootFrom::Cluster { secret: pair(&self.ca_secret)?, bundle: pair(&self.trust_bundle_configmap)? },
        };
        if self.max_lifetime < Duration::from_secs(1) {
            return Err(SettingsError::ZeroLifetime);
        }
        // clap requires one of --kube and --kubeconfig.
        let access = Access::from_flags(self.kube, self.kubeconfig.as_deref()).unwrap_or(Access::InCluster);
        Ok(Settings {
            access,
            root,
            policy: pki::Policy {
                agent: format!("system:serviceaccount:{ns}:{name}"),
                max_lifetime: self.max_lifetime,
            },
        })
    }
}

//! Pod certificates minted on the node (`--node-ca`), held in memory only.
//!
//! The control thread owns one [`Minter`]: given the node CA (from the
//! cluster) and the model, it keeps a certificate for every local meshed pod
//! that has an address, re-minted when its addresses change, when a new node
//! CA arrives, and at two thirds of its life; pods that leave the mesh lose
//! theirs. Each change yields a new [`Identity`] for the executors, so new
//! handshakes use new certificates and handshakes in flight finish with the
//! old ones: a renewal fails no handshake.
use std::{collections::BTreeMap, net::IpAddr, path::Path, sync::Arc, time::SystemTime};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{info, warn};

use crate::{cluster::model::Model, config::Minting, identity::pki, identity::reload, identity::Identity};

#[derive(Debug)]
struct Minted {
    ips: Vec<IpAddr>,
    spiffe: String,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    issued: SystemTime,
    not_after: SystemTime,
    /// The node CA generation it was minted with.
    generation: u64,
}

/// Mints and renews the local pods' certificates.
#[derive(Debug)]
pub struct Minter {
    spec: Minting,
    resumption: bool,
    roots: Vec<CertificateDer<'static>>,
    bundle: reload::Watch,
    ca: Option<Arc<pki::NodeCa>>,
    generation: u64,
    pods: BTreeMap<(Arc<str>, Arc<str>), Minted>,
    /// Mint times (µs) and failures, for the closing figures and logs.
    minted: u64,
    failures: u64,
}

impl Minter {
    /// A minter trusting the bundle it reads now.
    pub fn new(spec: Minting, resumption: bool) -> Result<Self, crate::identity::Error> {
        let roots = crate::identity::read_bundle(&spec.bundle)?;
        let dir = spec.bundle.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let bundle = reload::Watch::new(dir);
        Ok(Self {
            spec,
            resumption,
            roots,
            bundle,
            ca: None,
            generation: 0,
            pods: BTreeMap::new(),
            minted: 0,
            failures: 0,
        })
    }

    /// Whether a node CA is in hand.
    pub fn has_ca(&self) -> bool {
        self.ca.is_some()
    }

    /// Certificates minted, and mint failures, so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.minted, self.failures)
    }

    /// A new node CA: every pod is re-minted with it.
    pub fn set_ca(&mut self, ca: Arc<pki::NodeCa>) {
        self.ca = Some(ca);
        self.generation += 1;
    }

    /// Brings the certificates in line with `model` (and renews the old);
    /// returns the identity to serve with when anything changed.
    pub fn refresh(&mut self, model: Option<&Model>, current: &Identity) -> Option<Identity> {
        let mut changed = false;
        if self.bundle.changed() {
            match crate::identity::read_bundle(&self.spec.bundle) {
                Ok(roots) if roots != self.roots => {
                    info!(bundle = %self.spec.bundle.display(), roots = roots.len(), "trust bundle reloaded");
                    self.roots = roots;
                    changed = true;
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "trust bundle refused: the previous one stays in service"),
            }
        }
        let Some(ca) = self.ca.clone() else { return changed.then(|| self.identity(current)).flatten() };
        let mut want = BTreeMap::new();
        for w in model.into_iter().flat_map(Model::local) {
            if w.meshed() && !w.addresses.is_empty() {
                let spiffe = pki::spiffe_id(&self.spec.trust_domain, &w.namespace, &w.service_account);
                want.insert((w.namespace.clone(), w.name.clone()), (w.addresses.clone(), spiffe));
            }
        }
        let before = self.pods.len();
        self.pods.retain(|k, _| want.contains_key(k));
        changed |= self.pods.len() != before;
        let now = SystemTime::now();
        for (key, (ips, spiffe)) in want {
            let due = match self.pods.get(&key) {
                None => true,
                Some(m) => {
                    let life = m.not_after.duration_since(m.issued).unwrap_or_default();
                    m.ips != ips
                        || m.spiffe != spiffe
                        || m.generation != self.generation
                        || now >= m.issued + life * 2 / 3
                }
            };
            if !due {
                continue;
            }
            match ca.mint(&ips, &spiffe, self.spec.pod_lifetime) {
                Ok((chain, pkey, not_after)) => {
                    self.minted += 1;
                    self.pods.insert(
                        key,
                        Minted { ips, spiffe, chain, key: pkey, issued: now, not_after, generation: self.generation },
                    );
                    changed = true;
                }
                Err(e) => {
                    self.failures += 1;
                    warn!(pod = format!("{}/{}", key.0, key.1), error = %e, "could not mint a pod certificate");
                }
            }
        }
        if changed {
            self.identity(current)
        } else {
            None
        }
    }

    /// When the next certificate is due for renewal.
    pub fn next_renewal(&self) -> Option<SystemTime> {
        self.pods.values().map(|m| m.issued + m.not_after.duration_since(m.issued).unwrap_or_default() * 2 / 3).min()
    }

    /// The identity of every pod minted for, keeping `current`'s
    /// configurations (and TLS sessions) of the certificates that did not
    /// change.
    fn identity(&self, current: &Identity) -> Option<Identity> {
        let pods: Vec<_> = self.pods.values().map(|m| (m.ips.clone(), m.chain.clone(), m.key.clone_key())).collect();
        match Identity::minted(self.roots.clone(), &self.spec.bundle, &pods, self.resumption, Some(current)) {
            Ok(id) => Some(id),
            Err(e) => {
                warn!(error = %e, "the minted certificates do not load: keeping the previous ones");
                None
            }
        }
    }
}

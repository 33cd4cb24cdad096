//! Identities and the TLS configurations built from them.
//!
//! The data plane loads a directory (`ca.crt`, and `<ip>.crt` + `<ip>.key`
//! per address it serves) and derives, for every address, the TLS 1.3 client
//! and server configurations:
//!
//! - outbound: present the certificate of the upstream socket's own source
//!   address; require the server's certificate to chain to the CA and be
//!   valid for the original destination IP (IP SAN);
//! - inbound: present the certificate of the address the peer connected to;
//!   require a client certificate from the CA, then check it is valid for the
//!   client's source address ([`check_peer_ip`]).
//!
//! ALPN carries the tunnel version ([`preamble::ALPN`]).
//!
//! Below it: pod certificates minted from the node CA ([`mint`]) and
//! watching a certificate directory ([`reload`]). The certificate formats
//! the agent and the issuer agree on ([`pki`]) and the demo and test CAs
//! ([`ca`]) are the `dataplane-pki` crate's, which the issuer shares
//! without linking the agent.
pub mod mint;
pub mod reload;

pub use dataplane_pki::{self as pki, ca};

use std::{collections::HashMap, fs, net::IpAddr, path::Path, path::PathBuf, sync::Arc};

use dataplane_common::preamble;
use rustls::{
    crypto::CryptoProvider,
    server::{danger::ClientCertVerifier, WebPkiClientVerifier},
    ClientConfig, RootCertStore, ServerConfig,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};

/// What is wrong with the certificate directory, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or parsed.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the material.
    #[error("{what}: {source}")]
    Tls {
        /// Which certificate or config.
        what: String,
        /// Cause.
        #[source]
        source: rustls::Error,
    },
    /// No certificate for an address we must speak for.
    #[error("no certificate for {0} (expected {0}.crt and {0}.key in the certificate directory)")]
    NoCert(IpAddr),
}

/// The TLS configurations for one address, built and checked at load time
/// and shared by every executor, so that a session resumes whichever
/// executors its connections land on:
///
/// - the server side issues stateless tickets (sealed with a key of this
///   address's own, rotated by rustls), which every executor can open;
/// - the client side keeps the tickets it received in one store for this
///   address.
///
/// Both live as long as the certificates they were built from: a reload
/// builds them anew, and with `--node-ca` a new [`Identity`] keeps those of
/// the addresses whose chain (and trust bundle) did not change
/// ([`Identity::minted`]), so a pod coming or going elsewhere on the node
/// does not cost the others their sessions, and another pod at the same
/// address (a new certificate) starts with none. No session outlives the
/// certificates it was authenticated with.
#[derive(Debug)]
struct Configs {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    chain: Vec<CertificateDer<'static>>,
}

/// Servers whose tickets the client side keeps, per address (rustls's default).
const SESSIONS: usize = 256;

/// Everything loaded from one certificate directory. Immutable: a reload
/// builds a new one.
#[derive(Debug)]
pub struct Identity {
    /// The certificate directory, or `None` for certificates minted in
    /// memory ([`Identity::minted`]).
    dir: Option<PathBuf>,
    by_ip: HashMap<IpAddr, Configs>,
    resumption: bool,
    /// The trust bundle it was minted under (empty when loaded from a
    /// directory).
    roots: Vec<CertificateDer<'static>>,
}

fn file_err(path: &Path, reason: impl ToString) -> Error {
    Error::File { path: path.into(), reason: reason.to_string() }
}

fn tls_err(what: impl Into<String>) -> impl FnOnce(rustls::Error) -> Error {
    let what = what.into();
    move |source| Error::Tls { what, source }
}

/// aws-lc-rs with AES-128-GCM/SHA-256 preferred: both ends are ours, and
/// against AES-256-GCM/SHA-384 it made full handshakes cheaper (SHA-384 was
/// 8% of the data plane's CPU in a connection-rate profile) and bulk faster.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384];
    Arc::new(p)
}

fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if chain.is_empty() {
        return Err(file_err(path, "no certificate in the file"));
    }
    Ok(chain)
}

impl Identity {
    /// Loads `dir` with TLS session resumption on.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        Self::load_with(dir, true)
    }

    /// Loads `dir`. Every `<ip>.crt` needs its `<ip>.key`; a pair that does
    /// not load is an error here (at start-up nothing is served yet). With
    /// `resumption` off, every handshake is a full one (no session cache, no
    /// tickets).
    pub fn load_with(dir: &Path, resumption: bool) -> Result<Self, Error> {
        let ca_path = dir.join("ca.crt");
        let (roots, verifier) = trust(load_chain(&ca_path)?, &ca_path)?;
        let provider = provider();

        let mut by_ip = HashMap::new();
        let entries = fs::read_dir(dir).map_err(|e| file_err(dir, e))?;
        for entry in entries {
            let path = entry.map_err(|e| file_err(dir, e))?.path();
            let Some(ip) = ip_of_cert_file(&path) else { continue };
            let chain = load_chain(&path)?;
            let key_path = path.with_extension("key");
            let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| file_err(&key_path, e))?;
            let configs = build(ip, chain, key, &roots, &verifier, &provider, resumption)?;
            by_ip.insert(ip, configs);
        }
        Ok(Self { dir: Some(dir.into()), by_ip, resumption, roots: Vec::new() })
    }

    /// Certificates minted in memory: `roots` (the trust bundle, read from
    /// `bundle`) and, per pod, its addresses, chain and key. Nothing is
    /// written anywhere. The configurations (and so the TLS sessions) of
    /// `previous` are kept for every address whose chain is the same, under
    /// the same roots.
    pub fn minted(
        roots: Vec<CertificateDer<'static>>,
        bundle: &Path,
        pods: &[(Vec<IpAddr>, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)],
        resumption: bool,
        previous: Option<&Identity>,
    ) -> Result<Self, Error> {
        let kept = previous.filter(|p| p.dir.is_none() && p.roots == roots && p.resumption == resumption);
        let (store, verifier) = trust(roots.clone(), bundle)?;
        let provider = provider();
        let mut by_ip = HashMap::new();
        for (ips, chain, key) in pods {
            for ip in ips {
                let configs = match kept.and_then(|p| p.by_ip.get(ip)).filter(|c| c.chain == *chain) {
                    Some(c) => Configs { client: c.client.clone(), server: c.server.clone(), chain: c.chain.clone() },
                    None => build(*ip, chain.clone(), key.clone_key(), &store, &verifier, &provider, resumption)?,
                };
                by_ip.insert(*ip, configs);
            }
        }
        Ok(Self { dir: None, by_ip, resumption, roots })
    }

    /// The directory it was loaded from (`None`: minted in memory).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Whether TLS sessions may be resumed.
    pub fn resumption(&self) -> bool {
        self.resumption
    }

    /// Whether we hold a certificate for `ip`.
    pub fn holds(&self, ip: IpAddr) -> bool {
        self.by_ip.contains_key(&ip)
    }

    /// Addresses we hold a certificate for.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.by_ip.keys().copied()
    }

    /// The client configuration for a tunnel leaving from `src`.
    pub fn client_config(&self, src: IpAddr) -> Result<Arc<ClientConfig>, Error> {
        Ok(self.by_ip.get(&src).ok_or(Error::NoCert(src))?.client.clone())
    }

    /// The server configuration for a tunnel that arrived at `local`.
    pub fn server_config(&self, local: IpAddr) -> Result<Arc<ServerConfig>, Error> {
        Ok(self.by_ip.get(&local).ok_or(Error::NoCert(local))?.server.clone())
    }
}

/// Reads a trust bundle: one or more root certificates in PEM (two during a
/// root rotation).
pub fn read_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    load_chain(path)
}

/// The roots and the client-certificate verifier over them.
fn trust(
    certs: Vec<CertificateDer<'static>>,
    from: &Path,
) -> Result<(Arc<RootCertStore>, Arc<dyn ClientCertVerifier>), Error> {
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(tls_err(format!("CA certificate {}", from.display())))?;
    }
    let roots = Arc::new(roots);
    let verifier: Arc<dyn ClientCertVerifier> = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| file_err(from, e))?;
    Ok((roots, verifier))
}

/// `10.0.0.1.crt` → 10.0.0.1; anything else (ca.crt, keys) → None.
fn ip_of_cert_file(path: &Path) -> Option<IpAddr> {
    (path.extension()? == "crt").then_some(())?;
    path.file_stem()?.to_str()?.parse().ok()
}

fn build(
    ip: IpAddr,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: &Arc<RootCertStore>,
    verifier: &Arc<dyn ClientCertVerifier>,
    provider: &Arc<CryptoProvider>,
    resumption: bool,
) -> Result<Configs, Error> {
    let tls13 = &[&rustls::version::TLS13];
    let mut client = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(tls13)
        .map_err(tls_err("TLS 1.3 client"))?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(chain.clone(), key.clone_key())
        .map_err(tls_err(format!("client certificate {ip}")))?;
    client.alpn_protocols = vec![preamble::ALPN.to_vec()];
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(tls13)
        .map_err(tls_err("TLS 1.3 server"))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain.clone(), key)
        .map_err(tls_err(format!("server certificate {ip}")))?;
    server.alpn_protocols = vec![preamble::ALPN.to_vec()];
    // TLS 1.3 only: with a ticketer no session is stored on the server side.
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    if resumption {
        client.resumption = rustls::client::Resumption::in_memory_sessions(SESSIONS);
        server.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(tls_err(format!("ticket key {ip}")))?;
    } else {
        client.resumption = rustls::client::Resumption::disabled();
        server.send_tls13_tickets = 0;
    }
    Ok(Configs { client: Arc::new(client), server: Arc::new(server), chain })
}

/// Why a verified peer certificate is still not accepted.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The handshake finished without a client certificate.
    #[error("no peer certificate")]
    Missing,
    /// The certificate does not parse as an end-entity certificate.
    #[error("peer certificate unreadable: {0}")]
    Unreadable(webpki::Error),
    /// Valid, but not for the address the peer connects from.
    #[error("peer certificate is not valid for its source address {0}: {1}")]
    WrongIp(IpAddr, webpki::Error),
    /// Valid for its address, but with no (or more than one, or a
    /// malformed) SPIFFE ID.
    #[error("peer certificate carries no well-formed SPIFFE ID")]
    NoIdentity,
    /// Its SPIFFE ID is not the identity the API shows for the pod at its
    /// address (another service account, namespace or trust domain).
    #[error("peer certificate says {said}, the pod at {ip} is {expected}")]
    NotTheWorkload {
        /// The address.
        ip: IpAddr,
        /// What the certificate says.
        said: String,
        /// What the API shows.
        expected: String,
    },
    /// No meshed pod is known at its address (not within the wait).
    #[error("no meshed pod is known at {0}")]
    UnknownWorkload(IpAddr),
}

/// Checks that the (already chain-verified) end-entity certificate is valid
/// for `ip`: the client must be who its source address says.
pub fn check_peer_ip(certs: Option<&[CertificateDer<'_>]>, ip: IpAddr) -> Result<(), PeerError> {
    let leaf = certs.and_then(|c| c.first()).ok_or(PeerError::Missing)?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(PeerError::Unreadable)?;
    ee.verify_is_valid_for_subject_name(&ServerName::IpAddress(ip.into())).map_err(|e| PeerError::WrongIp(ip, e))
}

/// The peer's SPIFFE ID, checked to be well-formed (authorization by
/// identity comes later; today it names the peer in logs).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<String, PeerError> {
    let leaf = certs.and_then(|c| c.first()).ok_or(PeerError::Missing)?;
    crate::identity::pki::spiffe_of(leaf).ok_or(PeerError::NoIdentity)
}

#[cfg(test)]
mod tests;

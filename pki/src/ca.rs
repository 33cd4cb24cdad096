//! `dataplane ca`: mints a cluster CA and pod certificates for demos and
//! tests, in the layout the data plane loads (`ca.crt`, `<ip>.crt`,
//! `<ip>.key`; the CA key stays in `ca.key` next to them).
//!
//! A pod certificate carries the pod's IP as an IP SAN (what the peers check)
//! and a SPIFFE URI SAN (`spiffe://TRUST_DOMAIN/ip/<ip>`), ECDSA P-256.
use std::{
    fs,
    io::Write,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use time::{Duration, OffsetDateTime};

/// Default trust domain of the SPIFFE IDs.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// What went wrong minting, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// rcgen refused.
    #[error("{what}: {source}")]
    Cert {
        /// What was being made.
        what: String,
        /// Cause.
        #[source]
        source: rcgen::Error,
    },
    /// `ca init` would overwrite an existing CA.
    #[error("{}: a CA already exists there (remove it first to make a new one)", .0.display())]
    Exists(PathBuf),
}

fn cert_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> Error {
    let what = what.into();
    move |source| Error::Cert { what, source }
}

fn read(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| Error::Io { path: path.into(), source })
}

/// Writes `contents` to `path` atomically (temp file + rename), with `mode`.
fn write(path: &Path, contents: &str, mode: u32) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let io = |source| Error::Io { path: path.into(), source };
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

/// Validity window of minted certificates: from `not_before_days` ago (or in
/// the future when negative) for `days`.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    /// Start, in days before now.
    pub not_before_days: i64,
    /// Length in days.
    pub days: i64,
}

impl Default for Validity {
    fn default() -> Self {
        Self { not_before_days: 1, days: 365 }
    }
}

impl Validity {
    fn apply(self, p: &mut CertificateParams) {
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::days(self.not_before_days);
        p.not_after = p.not_before + Duration::days(self.days);
    }
}

/// `ca init`: a new CA in `dir/ca.crt` + `dir/ca.key`.
pub fn init(dir: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.into(), source })?;
    let crt = dir.join("ca.crt");
    if crt.exists() {
        return Err(Error::Exists(crt));
    }
    let (cert, key) = root()?;
    write(&dir.join("ca.key"), &key, 0o600)?;
    write(&crt, &cert, 0o644)
}

/// A new cluster root: certificate and key, PEM, valid ten years.
pub fn root() -> Result<(String, String), Error> {
    let key = KeyPair::generate().map_err(cert_err("generating the CA key"))?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("CA parameters"))?;
    p.distinguished_name.push(DnType::CommonName, "dataplane cluster CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Validity { not_before_days: 1, days: 3650 }.apply(&mut p);
    let cert = p.self_signed(&key).map_err(cert_err("signing the CA"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// `ca issue`: a certificate for `ip`, signed by the CA in `dir`, written to
/// `dir/<ip>.crt` + `dir/<ip>.key` (replacing any there, atomically).
pub fn issue(dir: &Path, ip: IpAddr, validity: Validity) -> Result<(), Error> {
    let ca_key = KeyPair::from_pem(&read(&dir.join("ca.key"))?).map_err(cert_err("reading ca.key"))?;
    let issuer = Issuer::from_ca_cert_pem(&read(&dir.join("ca.crt"))?, ca_key).map_err(cert_err("reading ca.crt"))?;
    let (cert, key) = leaf(ip, &issuer, validity)?;
    write(&dir.join(format!("{ip}.key")), &key, 0o600)?;
    write(&dir.join(format!("{ip}.crt")), &cert, 0o644)
}

/// The SPIFFE ID of a certificate minted here for `ip`
/// (`spiffe://TRUST_DOMAIN/ip/<ip>`). SPIFFE path segments allow no ':': an
/// IPv6 address is written with '-' instead (fd00::1 is ip/fd00--1).
pub fn ip_spiffe_id(ip: IpAddr) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ip/{}", ip.to_string().replace(':', "-"))
}

/// A leaf certificate and key (PEM) for `ip`, signed by `issuer`.
pub fn leaf(ip: IpAddr, issuer: &Issuer<'_, KeyPair>, validity: Validity) -> Result<(String, String), Error> {
    let key = KeyPair::generate().map_err(cert_err(format!("generating the key for {ip}")))?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("leaf parameters"))?;
    p.distinguished_name.push(DnType::CommonName, ip.to_string());
    let spiffe = ip_spiffe_id(ip);
    p.subject_alt_names =
        vec![SanType::IpAddress(ip), SanType::URI(spiffe.try_into().map_err(cert_err(format!("SPIFFE ID for {ip}")))?)];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    validity.apply(&mut p);
    let cert = p.signed_by(&key, issuer).map_err(cert_err(format!("signing the certificate for {ip}")))?;
    Ok((cert.pem(), key.serialize_pem()))
}

//! Certificates issued inside the cluster, with no control plane on the
//! connection path:
//!
//! - the node agent makes a key that never leaves the node and asks, through
//!   a CertificateSigningRequest for [`SIGNER`], for a **node CA**;
//! - the issuer ([`decide`], a pure function, then [`sign_node_ca`]) signs it
//!   only for the node the requester's pod-bound token names: `CA:true`, path
//!   length 0, name-constrained (RFC 5280 iPAddress permitted subtrees) to that
//!   node's `spec.podCIDRs`, short-lived;
//! - the agent mints each meshed pod's certificate in memory with it
//!   ([`NodeCa::mint`]): the pod's IPs as IP SANs, its SPIFFE ID
//!   (`spiffe://TRUST_DOMAIN/ns/NS/sa/SA`) as URI SAN.
//!
//! Peers trust the cluster root only; rustls-webpki enforces the name
//! constraints while it builds the chain, so a node CA for node A's pod CIDR
//! that mints a certificate for an address of node B is refused.
//!
//! The crate is what the agent and the issuer share, so the issuer does not
//! link the agent: these formats, the cluster root and demo CAs ([`ca`]),
//! and how either reaches the API server ([`api`]).
pub mod api;
pub mod ca;

use std::{net::IpAddr, time::SystemTime};

use ipnet::IpNet;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CidrSubnet, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, SanType, SignatureAlgorithm,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

/// Our `signerName`: the issuer signs nothing else, and nothing else signs
/// these.
pub const SIGNER: &str = "dataplane.dev/node-ca";
/// The CSR annotation by which an agent may ask for narrower constraints
/// than its node's whole pod CIDRs (comma-separated CIDRs).
pub const CIDRS_ANNOTATION: &str = "dataplane.dev/pod-cidrs";
/// The pod-bound ServiceAccount token's claim, recorded by the API server in
/// the CSR's `spec.extra`: the node the requesting pod runs on.
pub const NODE_CLAIM: &str = "authentication.kubernetes.io/node-name";
/// Slack on each side of a certificate's validity, for clocks that differ.
const SKEW: time::Duration = time::Duration::minutes(5);

/// What went wrong with a certificate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// rcgen refused.
    #[error("{what}: {source}")]
    Cert {
        /// What was being made or read.
        what: &'static str,
        /// Cause.
        #[source]
        source: rcgen::Error,
    },
    /// A certificate we were given is not what we asked for.
    #[error("{0}")]
    Invalid(String),
}

fn cert_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> Error {
    move |source| Error::Cert { what, source }
}

/// Leaf key types; both verify in rustls. Ed25519 is the default: minting
/// and a full mutual handshake each cost about 15% less CPU than with P-256
/// (`cargo bench -p bench --bench pki`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyType {
    /// ECDSA over P-256 with SHA-256.
    P256,
    /// Ed25519.
    Ed25519,
}

impl KeyType {
    fn alg(self) -> &'static SignatureAlgorithm {
        match self {
            KeyType::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

/// A node agent's request: its new key (kept) and the PKCS#10 request
/// (sent), naming the node in its common name.
pub fn node_request(node: &str) -> Result<(KeyPair, String), Error> {
    let key = KeyPair::generate().map_err(cert_err("generating the node key"))?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("request parameters"))?;
    p.distinguished_name.push(DnType::CommonName, node_ca_name(node));
    let csr = p.serialize_request(&key).map_err(cert_err("serializing the request"))?;
    Ok((key, csr.pem().map_err(cert_err("encoding the request"))?))
}

const NODE_CA_PREFIX: &str = "dataplane node CA ";

fn node_ca_name(node: &str) -> String {
    format!("{NODE_CA_PREFIX}{node}")
}

/// The node a request's common name names; `Err` says why none.
pub fn named_node(pem: &str) -> Result<String, String> {
    let parsed = CertificateSigningRequestParams::from_pem(pem)
        .map_err(|e| format!("the request does not parse or carries extensions we do not accept: {e}"))?;
    let cn = match parsed.params.distinguished_name.get(&DnType::CommonName) {
        Some(rcgen::DnValue::Utf8String(s)) => s.clone(),
        Some(rcgen::DnValue::PrintableString(s)) => s.as_str().to_string(),
        _ => String::new(),
    };
    cn.strip_prefix(NODE_CA_PREFIX)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .ok_or_else(|| format!("the request's common name {cn:?} names no node"))
}

/// What the issuer knows of a CertificateSigningRequest (from its spec,
/// filled in by the API server from the requester's credentials).
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// `spec.signerName`.
    pub signer: String,
    /// `spec.username`: who created it.
    pub username: String,
    /// `spec.extra[NODE_CLAIM]`: the node of the requester's pod-bound token.
    pub token_node: Option<String>,
    /// `spec.usages`.
    pub usages: Vec<String>,
    /// `spec.request`, PEM.
    pub pem: String,
    /// `spec.expirationSeconds`.
    pub expiration_seconds: Option<i32>,
    /// The CIDRs asked for ([`CIDRS_ANNOTATION`]), if any.
    pub requested_cidrs: Option<String>,
}

/// What the issuer knows of the node a request names.
#[derive(Debug, Clone)]
pub struct Node {
    /// Its name.
    pub name: String,
    /// `spec.podCIDRs`.
    pub pod_cidrs: Vec<String>,
}

/// The issuer's rules.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `system:serviceaccount:NAMESPACE:NAME` of the DaemonSet.
    pub agent: String,
    /// Longest node CA lifetime granted.
    pub max_lifetime: std::time::Duration,
}

/// A request the issuer will sign: for this node, with these constraints,
/// for this long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The node.
    pub node: String,
    /// The permitted subtrees.
    pub cidrs: Vec<IpNet>,
    /// The lifetime.
    pub lifetime: std::time::Duration,
}

/// The issuer's decision on a request naming `node` (looked up by the name in
/// the request's common name; `None`: no such node). `Err` is the reason,
/// written into the CSR's `Denied` condition.
pub fn decide(req: &Request, node: Option<&Node>, policy: &Policy) -> Result<Grant, String> {
    if req.signer != SIGNER {
        return Err(format!("signer {} is not ours", req.signer));
    }
    if req.username != policy.agent {
        return Err(format!("requested by {}, not by the node agent ({})", req.username, policy.agent));
    }
    let Some(token_node) = req.token_node.as_deref() else {
        return Err(format!("the requester's token names no node ({NODE_CLAIM}): a pod-bound token is required"));
    };
    let named = named_node(&req.pem)?;
    let named = named.as_str();
    if named != token_node {
        return Err(format!("the request is for node {named} but its requester runs on node {token_node}"));
    }
    for usage in ["cert sign", "digital signature"] {
        if !req.usages.iter().any(|u| u == usage) {
            return Err(format!("usages must include {usage:?}"));
        }
    }
    let Some(node) = node else { return Err(format!("no node {named}")) };
    let node_cidrs: Vec<IpNet> = node.pod_cidrs.iter().filter_map(|c| c.parse().ok()).collect();
    if node_cidrs.is_empty() {
        return Err(format!(
            "node {named} has no spec.podCIDRs: a node CA without constraints would speak for every pod"
        ));
    }
    let cidrs = match req.requested_cidrs.as_deref() {
        None => node_cidrs.clone(),
        Some(list) => {
            let mut asked = Vec::new();
            for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let net: IpNet = part.parse().map_err(|_| format!("{CIDRS_ANNOTATION}: {part:?} is not a CIDR"))?;
                if !node_cidrs.iter().any(|n| n.contains(&net)) {
                    return Err(format!("{net} is wider than (or outside) node {named}'s pod CIDRs"));
                }
                asked.push(net);
            }
            if asked.is_empty() {
                return Err(format!("{CIDRS_ANNOTATION} names no CIDR"));
            }
            asked
        }
    };
    let asked = req.expiration_seconds.and_then(|s| u64::try_from(s).ok()).map(std::time::Duration::from_secs);
    let lifetime = asked.unwrap_or(policy.max_lifetime).min(policy.max_lifetime);
    if lifetime.is_zero() {
        return Err("a lifetime of zero".into());
    }
    Ok(Grant { node: named.to_string(), cidrs, lifetime })
}

/// Signs a granted request: a CA for exactly the granted subtrees, path
/// length 0, for the granted lifetime. Whatever else the request asked for
/// is ignored: the issuer sets every extension itself.
pub fn sign_node_ca(pem: &str, grant: &Grant, root: &Issuer<'_, KeyPair>) -> Result<String, Error> {
    let mut csr = CertificateSigningRequestParams::from_pem(pem).map_err(cert_err("reading the request"))?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("node CA parameters"))?;
    p.distinguished_name.push(DnType::CommonName, node_ca_name(&grant.node));
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    p.name_constraints = Some(NameConstraints {
        permitted_subtrees: grant
            .cidrs
            .iter()
            .map(|n| GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(n.network(), n.prefix_len())))
            .collect(),
        excluded_subtrees: Vec::new(),
    });
    p.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    p.not_before = now - SKEW;
    p.not_after = now + time::Duration::try_from(grant.lifetime).map_err(|e| Error::Invalid(e.to_string()))?;
    csr.params = p;
    Ok(csr.signed_by(root).map_err(cert_err("signing the node CA"))?.pem())
}

/// This node's CA: its key (made here, never sent anywhere) and the
/// certificate the issuer signed for it.
#[derive(Debug)]
pub struct NodeCa {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    not_after: SystemTime,
    leaf_key: KeyType,
}

impl NodeCa {
    /// Takes the certificate the issuer returned for `key`: it must be a CA
    /// for that very key.
    pub fn new(key: KeyPair, cert_pem: &str, leaf_key: KeyType) -> Result<Self, Error> {
        use rustls_pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| Error::Invalid(format!("the issued certificate does not parse: {e}")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| Error::Invalid(format!("the issued certificate does not parse: {e}")))?;
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err(Error::Invalid("the issued certificate is not for our key".into()));
        }
        if !parsed.is_ca() {
            return Err(Error::Invalid("the issued certificate is not a CA".into()));
        }
        let not_after = SystemTime::UNIX_EPOCH
            + std::time::Duration::from_secs(u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0));
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(cert_err("reading the issued certificate"))?;
        Ok(Self { issuer, der: der.into_owned(), not_after, leaf_key })
    }

    /// Its certificate (sent after each pod's, so peers can build the chain).
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// When it expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// A pod certificate and key, in memory: `ips` as IP SANs, `spiffe` as
    /// URI SAN, valid for `lifetime` (never past the node CA's own end).
    pub fn mint(
        &self,
        ips: &[IpAddr],
        spiffe: &str,
        lifetime: std::time::Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, SystemTime), Error> {
        let key = KeyPair::generate_for(self.leaf_key.alg()).map_err(cert_err("generating a pod key"))?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("pod parameters"))?;
        let mut sans: Vec<SanType> = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        sans.push(SanType::URI(spiffe.to_string().try_into().map_err(cert_err("the SPIFFE ID"))?));
        p.subject_alt_names = sans;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        let ca_end = OffsetDateTime::from(self.not_after);
        p.not_before = now - SKEW;
        p.not_after =
            (now + time::Duration::try_from(lifetime).map_err(|e| Error::Invalid(e.to_string()))?).min(ca_end);
        let not_after = SystemTime::from(p.not_after);
        let cert = p.signed_by(&key, &self.issuer).map_err(cert_err("signing a pod certificate"))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone(), self.der.clone()], key, not_after))
    }
}

/// `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/{}", spiffe_path(namespace, service_account))
}

/// A workload's SPIFFE path: `ns/NAMESPACE/sa/SERVICE_ACCOUNT`.
pub fn spiffe_path(namespace: &str, service_account: &str) -> String {
    format!("ns/{namespace}/sa/{service_account}")
}

/// The SPIFFE ID a certificate carries, if it carries exactly one well-formed
/// one (`spiffe://DOMAIN/PATH`, no query, fragment, port or user).
pub fn spiffe_of(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let (Some(uri), None) = (uris.next(), uris.next()) else { return None };
    well_formed_spiffe(uri).then(|| uri.to_string())
}

fn well_formed_spiffe(uri: &str) -> bool {
    let Some(rest) = uri.strip_prefix("spiffe://") else { return false };
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    let domain_ok = !domain.is_empty()
        && domain.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'));
    let path_ok = !path.is_empty()
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        });
    domain_ok && path_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> (Issuer<'static, KeyPair>, CertificateDer<'static>) {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(DnType::CommonName, "test root");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let cert = p.self_signed(&key).expect("root");
        let der = cert.der().clone();
        (Issuer::new(p, key), der)
    }

    fn policy() -> Policy {
        Policy {
            agent: "system:serviceaccount:dataplane-system:dataplane".into(),
            max_lifetime: std::time::Duration::from_secs(86400),
        }
    }

    fn request(node: &str, token_node: Option<&str>) -> Request {
        let (_, pem) = node_request(node).expect("request");
        Request {
            signer: SIGNER.into(),
            username: policy().agent,
            token_node: token_node.map(str::to_string),
            usages: vec!["cert sign".into(), "digital signature".into()],
            pem,
            expiration_seconds: Some(3600),
            requested_cidrs: None,
        }
    }

    fn node_a() -> Node {
        Node { name: "node-a".into(), pod_cidrs: vec!["10.1.0.0/24".into()] }
    }

    #[test]
    fn the_agent_of_the_node_gets_its_cidrs_for_the_time_asked() {
        let g = decide(&request("node-a", Some("node-a")), Some(&node_a()), &policy()).expect("granted");
        assert_eq!(
            g,
            Grant {
                node: "node-a".into(),
                cidrs: vec!["10.1.0.0/24".parse().expect("net")],
                lifetime: std::time::Duration::from_secs(3600)
            }
        );
        // Longer than the policy allows: capped.
        let mut long = request("node-a", Some("node-a"));
        long.expiration_seconds = Some(10 * 86400);
        assert_eq!(decide(&long, Some(&node_a()), &policy()).expect("granted").lifetime, policy().max_lifetime);
        // Narrower constraints asked for: granted as asked.
        let mut narrow = request("node-a", Some("node-a"));
        narrow.requested_cidrs = Some("10.1.0.0/25".into());
        assert_eq!(
            decide(&narrow, Some(&node_a()), &policy()).expect("granted").cidrs,
            vec!["10.1.0.0/25".parse::<IpNet>().expect("net")]
        );
    }

    #[test]
    fn every_rule_denies_with_its_reason() {
        let p = policy();
        let deny = |r: &Request, n: Option<&Node>| decide(r, n, &p).expect_err("denied");
        let mut other_signer = request("node-a", Some("node-a"));
        other_signer.signer = "kubernetes.io/kube-apiserver-client".into();
        assert!(deny(&other_signer, Some(&node_a())).contains("not ours"));
        let mut other_sa = request("node-a", Some("node-a"));
        other_sa.username = "system:serviceaccount:shop:web".into();
        assert!(deny(&other_sa, Some(&node_a())).contains("not by the node agent"));
        assert!(deny(&request("node-a", None), Some(&node_a())).contains("pod-bound token"));
        let other_node = deny(&request("node-a", Some("node-b")), Some(&node_a()));
        assert!(other_node.contains("for node node-a but its requester runs on node node-b"), "{other_node}");
        let mut usages = request("node-a", Some("node-a"));
        usages.usages = vec!["digital signature".into()];
        assert!(deny(&usages, Some(&node_a())).contains("cert sign"));
        assert!(deny(&request("node-a", Some("node-a")), None).contains("no node node-a"));
        let bare = Node { name: "node-a".into(), pod_cidrs: vec![] };
        assert!(deny(&request("node-a", Some("node-a")), Some(&bare)).contains("no spec.podCIDRs"));
        let mut wide = request("node-a", Some("node-a"));
        wide.requested_cidrs = Some("10.0.0.0/8".into());
        assert!(deny(&wide, Some(&node_a())).contains("wider than"));
        let mut garbage = request("node-a", Some("node-a"));
        garbage.pem = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into();
        assert!(deny(&garbage, Some(&node_a())).contains("does not parse"));
    }

    /// Mints a certificate for `ips` with `ca` and checks it as a peer
    /// would: the chain up to `root_der` (name constraints included), and
    /// every address named.
    fn mint_and_verify(ca: &NodeCa, root_der: &CertificateDer<'_>, spiffe: &str, ips: &[&str]) -> Result<(), String> {
        let ips: Vec<IpAddr> = ips.iter().map(|ip| ip.parse().expect("ip")).collect();
        let (chain, _, _) = ca.mint(&ips, spiffe, std::time::Duration::from_secs(600)).expect("minted");
        let anchors = [webpki::anchor_from_trusted_cert(root_der).expect("anchor")];
        let ee = webpki::EndEntityCert::try_from(&chain[0]).expect("leaf");
        let now = rustls_pki_types::UnixTime::now();
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &chain[1..],
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| format!("{e:?}"))?;
        for ip in ips {
            ee.verify_is_valid_for_subject_name(&rustls_pki_types::ServerName::IpAddress(ip.into()))
                .map_err(|e| format!("{ip}: {e:?}"))?;
        }
        Ok(())
    }

    #[test]
    fn a_node_ca_mints_pods_in_its_cidr_and_webpki_refuses_others() {
        let (root, root_der) = root();
        let (key, pem) = node_request("node-a").expect("request");
        let grant = decide(&request("node-a", Some("node-a")), Some(&node_a()), &policy()).expect("granted");
        let signed = sign_node_ca(&pem, &grant, &root).expect("signed");
        let ca = NodeCa::new(key, &signed, KeyType::P256).expect("node CA");
        let spiffe = spiffe_id("cluster.local", "shop", "web");
        let verify = |ip: &str| mint_and_verify(&ca, &root_der, &spiffe, &[ip]);
        assert_eq!(verify("10.1.0.7"), Ok(()));
        let outside = verify("10.2.0.7").expect_err("outside the node's CIDR");
        assert!(outside.contains("NameConstraint"), "{outside}");
        let (chain, _, _) =
            ca.mint(&["10.1.0.7".parse().expect("ip")], &spiffe, std::time::Duration::from_secs(600)).expect("minted");
        assert_eq!(spiffe_of(&chain[0]).as_deref(), Some(spiffe.as_str()));
        // The issued certificate must be for our own key.
        let (other_key, _) = node_request("node-a").expect("request");
        assert!(NodeCa::new(other_key, &signed, KeyType::P256).is_err());
    }

    #[test]
    fn a_dual_stack_node_ca_mints_both_families_in_its_cidrs_only() {
        let (root, root_der) = root();
        let (key, pem) = node_request("node-a").expect("request");
        let node = Node { name: "node-a".into(), pod_cidrs: vec!["10.1.0.0/24".into(), "fd00:1::/64".into()] };
        let grant = decide(&request("node-a", Some("node-a")), Some(&node), &policy()).expect("granted");
        assert_eq!(grant.cidrs.len(), 2, "both families' CIDRs: {grant:?}");
        let signed = sign_node_ca(&pem, &grant, &root).expect("signed");
        let ca = NodeCa::new(key, &signed, KeyType::P256).expect("node CA");
        let spiffe = spiffe_id("cluster.local", "shop", "web");
        let verify = |ips: &[&str]| mint_and_verify(&ca, &root_der, &spiffe, ips);
        assert_eq!(verify(&["10.1.0.7", "fd00:1::7"]), Ok(()));
        assert_eq!(verify(&["fd00:1::7"]), Ok(()));
        let outside = verify(&["10.1.0.7", "fd00:2::7"]).expect_err("an IPv6 address outside the node's CIDR");
        assert!(outside.contains("NameConstraint"), "{outside}");
    }

    #[test]
    fn spiffe_ids_are_checked_for_form() {
        assert!(well_formed_spiffe("spiffe://cluster.local/ns/shop/sa/web"));
        for bad in [
            "http://cluster.local/ns/a",
            "spiffe://",
            "spiffe://Cluster/ns",
            "spiffe://td/",
            "spiffe://td/a//b",
            "spiffe://td/a/../b",
            "spiffe://td/a?b",
        ] {
            assert!(!well_formed_spiffe(bad), "{bad}");
        }
    }
}

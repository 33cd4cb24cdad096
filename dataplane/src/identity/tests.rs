//! Unit tests of [`super`].
use super::*;
use crate::identity::ca;

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dp-identity-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    d
}

/// A pod coming or going rebuilds the node's Identity; the other pods
/// keep their configurations, so their TLS sessions stay resumable. A
/// new certificate at an address, or a new trust bundle, starts clean.
#[test]
fn a_new_minted_identity_keeps_what_did_not_change() {
    use std::time::Duration;

    use crate::identity::pki;
    /// Removed even when an assertion fails.
    struct Gone(PathBuf);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let d = temp_dir("keep");
    fs::create_dir_all(&d).expect("dir");
    let _gone = Gone(d.clone());
    let (root_pem, root_key) = ca::root().expect("root");
    let key = rcgen::KeyPair::from_pem(&root_key).expect("key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&root_pem, key).expect("issuer");
    let bundle = d.join("ca.crt");
    fs::write(&bundle, &root_pem).expect("bundle");
    let roots = read_bundle(&bundle).expect("roots");
    let (node_key, csr) = pki::node_request("node-a").expect("request");
    let grant = pki::Grant {
        node: "node-a".into(),
        cidrs: vec!["10.1.0.0/24".parse().expect("net")],
        lifetime: Duration::from_secs(3600),
    };
    let signed = pki::sign_node_ca(&csr, &grant, &issuer).expect("signed");
    let node = pki::NodeCa::new(node_key, &signed, pki::KeyType::Ed25519).expect("node CA");
    let (a, b, c): (IpAddr, IpAddr, IpAddr) =
        ("10.1.0.1".parse().expect("ip"), "10.1.0.2".parse().expect("ip"), "10.1.0.3".parse().expect("ip"));
    let spiffe = pki::spiffe_id("cluster.local", "shop", "web");
    let pod = |ip: IpAddr| {
        let (chain, key, _) = node.mint(&[ip], &spiffe, Duration::from_secs(600)).expect("mint");
        (vec![ip], chain, key)
    };
    let pa = pod(a);
    let again = |p: &(Vec<IpAddr>, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)| {
        (p.0.clone(), p.1.clone(), p.2.clone_key())
    };
    let first = Identity::minted(roots.clone(), &bundle, &[again(&pa), pod(b)], true, None).expect("first");
    // Pod c arrives and pod b gets a new certificate: a keeps its own.
    let second =
        Identity::minted(roots.clone(), &bundle, &[again(&pa), pod(b), pod(c)], true, Some(&first)).expect("second");
    let same = |x: &Identity, y: &Identity, ip: IpAddr| {
        let (cx, cy) = (x.client_config(ip).expect("client"), y.client_config(ip).expect("client"));
        let (sx, sy) = (x.server_config(ip).expect("server"), y.server_config(ip).expect("server"));
        Arc::ptr_eq(&cx, &cy) && Arc::ptr_eq(&sx, &sy)
    };
    assert!(same(&first, &second, a), "an unchanged certificate keeps its sessions");
    assert!(!same(&first, &second, b), "a new certificate at an address starts clean");
    assert!(second.holds(c));
    // Another trust bundle: everything is built anew.
    let (other_root, _) = ca::root().expect("root");
    fs::write(&bundle, format!("{root_pem}{other_root}")).expect("bundle");
    let two_roots = read_bundle(&bundle).expect("roots");
    let third = Identity::minted(two_roots, &bundle, &[again(&pa)], true, Some(&second)).expect("third");
    assert!(!same(&second, &third, a), "a new bundle starts clean");
}

#[test]
fn minted_certificates_load_and_check_ips() {
    let d = temp_dir("mint");
    ca::init(&d).expect("ca init");
    let ip: IpAddr = "10.1.0.7".parse().expect("ip");
    ca::issue(&d, ip, ca::Validity::default()).expect("issue");
    let id = Identity::load(&d).expect("load");
    assert_eq!(id.addresses().collect::<Vec<_>>(), [ip]);
    id.client_config(ip).expect("client config");
    id.server_config(ip).expect("server config");
    assert!(matches!(id.client_config("10.1.0.8".parse().expect("ip")), Err(Error::NoCert(_))));

    let pem = fs::read(d.join("10.1.0.7.crt")).expect("crt");
    let der = CertificateDer::from_pem_slice(&pem).expect("pem");
    check_peer_ip(Some(std::slice::from_ref(&der)), ip).expect("valid for its own IP");
    assert!(matches!(
        check_peer_ip(Some(std::slice::from_ref(&der)), "10.1.0.8".parse().expect("ip")),
        Err(PeerError::WrongIp(..))
    ));
    assert!(matches!(check_peer_ip(None, ip), Err(PeerError::Missing)));
    assert_eq!(peer_identity(Some(std::slice::from_ref(&der))).ok(), Some(format!("spiffe://cluster.local/ip/{ip}")));
    // Right CA, right address, no SPIFFE ID: not accepted as a peer.
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.subject_alt_names = vec![rcgen::SanType::IpAddress(ip)];
    let bare = p.self_signed(&key).expect("cert");
    assert!(matches!(peer_identity(Some(&[bare.der().clone()])), Err(PeerError::NoIdentity)));
    assert!(matches!(ca::init(&d), Err(ca::Error::Exists(_))), "init never overwrites a CA");
    fs::remove_dir_all(&d).expect("cleanup");
}

#[test]
fn a_missing_ca_names_the_file() {
    let d = temp_dir("noca");
    fs::create_dir_all(&d).expect("mkdir");
    let err = Identity::load(&d).expect_err("no ca.crt").to_string();
    assert!(err.contains("ca.crt"), "{err}");
    fs::remove_dir_all(&d).expect("cleanup");
}

#[test]
fn cert_file_names() {
    assert_eq!(ip_of_cert_file(Path::new("/x/10.0.0.1.crt")), Some("10.0.0.1".parse().expect("ip")));
    assert_eq!(ip_of_cert_file(Path::new("/x/ca.crt")), None);
    assert_eq!(ip_of_cert_file(Path::new("/x/10.0.0.1.key")), None);
}

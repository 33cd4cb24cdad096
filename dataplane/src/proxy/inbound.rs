//! The inbound side (0.0.0.0:18001 in every enrolled namespace).
//!
//! TLS 1.3 server handshake presenting the certificate of the address the
//! peer connected to, requiring a client certificate from the cluster CA that
//! is valid for the client's source address; then the preamble, which must
//! name this very address (the inbound side only ever delivers to its own
//! pod: it is not an open relay) and a port that is not ours; then a connect
//! to the application from the same namespace, and the relay.
//!
//! The handshake and the whole preamble share one deadline,
//! `--handshake-timeout`: a peer cannot stretch it by dripping bytes.
//!
//! Every refusal is logged with its reason and nothing is forwarded.
use std::{
    cell::Cell,
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use dataplane_common::{preamble, INBOUND_PORT, OUTBOUND_PORT};
use futures_lite::io::AsyncWriteExt;
use futures_rustls::TlsAcceptor;
use glommio::net::TcpStream;
use rustls::HandshakeKind;

use crate::{
    identity,
    node::netns::Netns,
    node::sys,
    proxy::addrs::{ClientAddr, LocalAddr, OrigDstAddr},
    proxy::conn::{ExecutorCtx, Record},
    proxy::reason::Reason,
    proxy::relay,
    proxy::route::Refused,
    proxy::stats::Blame,
};

/// The first bytes of a TLS handshake must arrive within this (or the
/// handshake timeout, if shorter): a connection that says nothing is let go
/// long before one that is merely slow to finish.
pub const FIRST_BYTES: Duration = Duration::from_secs(2);

/// Where the deadline found an inbound tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the first byte of the handshake.
    FirstBytes,
    /// Waiting for a handshake slot ([`Admission`](crate::proxy::conn::Admission)).
    Queued,
    /// In the TLS handshake.
    Handshake,
    /// Handshake done, waiting to learn the pod at the client's address.
    Identity,
    /// Handshake done, preamble not complete.
    Preamble,
}

/// Why an inbound tunnel was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// We hold no certificate for the address the peer connected to.
    #[error(transparent)]
    NoCert(#[from] identity::Error),
    /// The TLS handshake failed (no or untrusted client certificate, TLS 1.2,
    /// not TLS at all...).
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    /// The handshake and the preamble did not finish within the handshake
    /// timeout.
    #[error("timed out {}", match .0 {
        Phase::FirstBytes => "before the first byte of a TLS handshake",
        Phase::Queued => "waiting for a handshake slot (too many handshakes in flight, from this address or in all)",
        Phase::Handshake => "in the TLS handshake",
        Phase::Identity => "waiting to learn which pod holds the client's address",
        Phase::Preamble => "in the preamble",
    })]
    Timeout(Phase),
    /// The client did not negotiate our tunnel protocol.
    #[error("ALPN is not {}", String::from_utf8_lossy(preamble::ALPN))]
    Alpn,
    /// The client certificate is not valid for the client's address.
    #[error(transparent)]
    Peer(#[from] identity::PeerError),
    /// The preamble is malformed, truncated, or the stream failed inside it.
    #[error(transparent)]
    Preamble(#[from] preamble::ReadError),
    /// The preamble names somewhere other than this pod.
    #[error("preamble names {dst}, but this tunnel only delivers to {}", local.ip())]
    Elsewhere {
        /// What the preamble asked for.
        dst: OrigDstAddr,
        /// Where the tunnel was reached.
        local: LocalAddr,
    },
}

impl Refusal {
    /// Who is to blame, and why.
    pub fn reason(&self) -> (Blame, Reason) {
        use preamble::{Error as P, ReadError as R};
        let reason = match self {
            Refusal::NoCert(_) => return (Blame::Ours, Reason::NoCertificate),
            Refusal::Handshake(e) => Reason::of(e),
            Refusal::Timeout(Phase::FirstBytes) => Reason::FirstBytesTimeout,
            Refusal::Timeout(Phase::Queued) => Reason::Shed,
            Refusal::Timeout(Phase::Handshake) => Reason::HandshakeTimeout,
            Refusal::Timeout(Phase::Identity) => Reason::UnknownWorkload,
            Refusal::Timeout(Phase::Preamble) => Reason::PreambleTimeout,
            Refusal::Alpn => Reason::NoAlpn,
            Refusal::Peer(identity::PeerError::Missing) => Reason::NoClientCertificate,
            Refusal::Peer(identity::PeerError::Unreadable(_)) => Reason::BadCertificate,
            Refusal::Peer(identity::PeerError::WrongIp(..)) => Reason::ClientIpMismatch,
            Refusal::Peer(identity::PeerError::NoIdentity) => Reason::BadIdentity,
            Refusal::Peer(identity::PeerError::NotTheWorkload { .. }) => Reason::IdentityMismatch,
            Refusal::Peer(identity::PeerError::UnknownWorkload(_)) => Reason::UnknownWorkload,
            Refusal::Preamble(R::Invalid(P::Version(_))) => Reason::PreambleVersion,
            Refusal::Preamble(R::Invalid(P::TooLong(_))) => Reason::PreambleTooLong,
            Refusal::Preamble(R::Invalid(_)) => Reason::BadPreamble,
            Refusal::Preamble(R::Truncated(_) | R::Io(_)) => Reason::PreambleTruncated,
            Refusal::Elsewhere { .. } => Reason::NotThisPod,
        };
        (Blame::Downstream, reason)
    }
}

/// Serves one tunnel, start to finish, on this executor (`rec` was opened
/// when it was accepted).
pub async fn serve(executor: Rc<ExecutorCtx>, netns: Arc<Netns>, conn: TcpStream, mut rec: Record) {
    let (Ok(peer), Ok(local)) = (conn.peer_addr(), conn.local_addr()) else {
        return rec.refuse(Blame::Downstream, Reason::Gone, &"the peer left before we looked at it");
    };
    let (client, local) = (ClientAddr(peer), LocalAddr(local));
    rec.client(client);
    let Accepted { mut tls, dst, early, peer } = match accept(&executor, &mut rec, conn, client, local).await {
        Ok(t) => t,
        // Dropping the stream closes it: the peer gets the TLS alert, if
        // any, then EOF. Nothing was forwarded.
        Err(why) => {
            let (blame, reason) = why.reason();
            return rec.refuse(blame, reason, &why);
        }
    };
    rec.dst(dst.0);
    // Who may talk to whom: decided before the application hears a thing.
    let principal = peer.strip_prefix("spiffe://").unwrap_or(&peer);
    let conn = crate::cluster::policy::Conn { principal, source: client.ip(), dst: dst.0 };
    if let Err(denied) = executor.authorize(&conn) {
        return rec.refuse(Blame::Downstream, Reason::PolicyDenied, &denied);
    }
    // Decided again if the policies change while it is open.
    let (_admitted, revoked) = executor.admitted(&conn);
    // From the client's own address: the certificate proved it.
    let mut app = match executor.connect_app(&netns, dst.0, client.0) {
        Ok(fd) => sys::glommio_stream(fd),
        Err(e) => {
            let why = format!("the socket to the application: {e}");
            return rec.reset(tls.get_ref().0, Refused::new(Blame::Ours, Reason::Socket, why));
        }
    };
    // Client bytes that arrived with the preamble go first.
    if !early.is_empty() {
        if let Err(e) = app.write_all(&early).await {
            let failed = relay::RelayError {
                end: relay::End::Io { side: relay::Side::Upstream, source: e },
                bytes: relay::Bytes::default(),
            };
            return rec.relayed(0, Err(failed), tls.get_ref().0, &app);
        }
    }
    let result = relay::relay_until(&mut tls, &mut app, executor.limits.idle, revoked).await;
    rec.relayed(early.len() as u64, result, tls.get_ref().0, &app);
}

type Tls = futures_rustls::server::TlsStream<TcpStream>;

/// Handshake, identity and preamble checks, together within the handshake
/// timeout. Returns the stream, the destination, and any client bytes read
/// past the preamble.
async fn accept(
    executor: &ExecutorCtx,
    rec: &mut Record,
    conn: TcpStream,
    client: ClientAddr,
    local: LocalAddr,
) -> Result<Accepted, Refusal> {
    let config = executor.server_config(local.ip())?;
    let phase = Cell::new(Phase::FirstBytes);
    let steps = async {
        match relay::within(FIRST_BYTES.min(executor.limits.handshake), conn.peek(&mut [0u8; 1])).await {
            None => return Err(Refusal::Timeout(Phase::FirstBytes)),
            Some(Ok(0)) => return Err(Refusal::Handshake(std::io::ErrorKind::UnexpectedEof.into())),
            Some(Err(e)) => return Err(Refusal::Handshake(e.into())),
            Some(Ok(_)) => phase.set(Phase::Queued),
        }
        // A handshake slot, held until the peer is authenticated and the
        // preamble read (or the deadline drops it). Silent connections never
        // get this far, so they never hold one.
        let ticket = executor.admission.admit(client.ip()).await;
        phase.set(Phase::Handshake);
        let started = Instant::now();
        let mut tls = TlsAcceptor::from(config).accept(conn).await.map_err(Refusal::Handshake)?;
        let (_, session) = tls.get_ref();
        rec.handshake(started.elapsed(), session.handshake_kind() == Some(HandshakeKind::Resumed));
        if session.alpn_protocol() != Some(preamble::ALPN) {
            return Err(Refusal::Alpn);
        }
        identity::check_peer_ip(session.peer_certificates(), client.ip())?;
        let id = identity::peer_identity(session.peer_certificates())?;
        // The identity the API shows for the pod at the client's address,
        // not any the client's node chose (within the same deadline: a pod
        // just made elsewhere may be known here a moment after it connects).
        phase.set(Phase::Identity);
        executor.check_workload(client.ip(), &id).await?;
        rec.peer(id.clone());
        phase.set(Phase::Preamble);
        let prefaced = preamble::read(&mut tls).await?;
        drop(ticket);
        Ok((tls, prefaced, id))
    };
    let (tls, prefaced, id) =
        relay::within(executor.limits.handshake, steps).await.ok_or(Refusal::Timeout(phase.get()))??;
    let dst = OrigDstAddr(prefaced.preamble.dst);
    if dst.ip() != local.ip() || dst.port() == INBOUND_PORT || dst.port() == OUTBOUND_PORT {
        return Err(Refusal::Elsewhere { dst, local });
    }
    Ok(Accepted { tls, dst, early: prefaced.early, peer: id })
}

/// A tunnel through the checks: the stream, where it goes, the client's
/// bytes read past the preamble, and the client's SPIFFE ID.
struct Accepted {
    tls: Tls,
    dst: OrigDstAddr,
    early: Vec<u8>,
    peer: String,
}

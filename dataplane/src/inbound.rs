//! The inbound side (0.0.0.0:18001 in every enrolled namespace).
//!
//! TLS 1.3 server handshake presenting the certificate of the address the
//! peer connected to, requiring a client certificate from the cluster CA that
//! is valid for the client's source address; then the preamble, which must
//! name this very address (the inbound side only ever delivers to its own
//! pod: it is not an open relay) and a port that is not ours; then a connect
//! to the application from the same namespace, and the relay.
//!
//! Every refusal is logged with its reason and nothing is forwarded.
use std::{net::SocketAddr, rc::Rc, sync::Arc, time::Instant};

use dataplane_common::{preamble, INBOUND_PORT, OUTBOUND_PORT};
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use futures_rustls::TlsAcceptor;
use glommio::net::TcpStream;
use tracing::{debug, warn};

use crate::{
    identity,
    netns::Netns,
    relay::{self, Side},
    shard::ShardCtx,
    socket,
    stats::{classify, Blame, Direction},
    sys,
};

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
    /// The handshake or the preamble did not arrive in time.
    #[error("timed out waiting for the {0}")]
    Timeout(&'static str),
    /// The client did not negotiate our tunnel protocol.
    #[error("ALPN is not {}", String::from_utf8_lossy(preamble::ALPN))]
    Alpn,
    /// The client certificate is not valid for the client's address.
    #[error(transparent)]
    Peer(#[from] identity::PeerError),
    /// The preamble is malformed.
    #[error("preamble: {0}")]
    Preamble(#[from] preamble::Error),
    /// The stream ended or failed inside the preamble.
    #[error("preamble: {0}")]
    PreambleIo(std::io::Error),
    /// The preamble names somewhere other than this pod.
    #[error("preamble names {dst}, but this tunnel only delivers to {local}")]
    Elsewhere {
        /// What the preamble asked for.
        dst: SocketAddr,
        /// Where the tunnel was reached.
        local: std::net::IpAddr,
    },
}

impl Refusal {
    /// A short, stable label for metrics, and who is to blame.
    pub fn label(&self) -> (Blame, &'static str) {
        match self {
            Refusal::NoCert(_) => (Blame::Ours, "no_certificate"),
            Refusal::Handshake(e) => (Blame::Downstream, classify(e)),
            Refusal::Timeout(what) if what.starts_with("TLS") => (Blame::Downstream, "handshake_timeout"),
            Refusal::Timeout(_) => (Blame::Downstream, "preamble_timeout"),
            Refusal::Alpn => (Blame::Downstream, "no_alpn"),
            Refusal::Peer(identity::PeerError::Missing) => (Blame::Downstream, "no_client_certificate"),
            Refusal::Peer(identity::PeerError::Unreadable(_)) => (Blame::Downstream, "bad_certificate"),
            Refusal::Peer(identity::PeerError::WrongIp(..)) => (Blame::Downstream, "client_ip_mismatch"),
            Refusal::Preamble(preamble::Error::Version(_)) => (Blame::Downstream, "preamble_version"),
            Refusal::Preamble(preamble::Error::TooLong(_)) => (Blame::Downstream, "preamble_too_long"),
            Refusal::Preamble(_) => (Blame::Downstream, "bad_preamble"),
            Refusal::PreambleIo(_) => (Blame::Downstream, "preamble_truncated"),
            Refusal::Elsewhere { .. } => (Blame::Downstream, "not_this_pod"),
        }
    }
}

/// Serves one tunnel, start to finish, on this executor.
pub async fn serve(shard: Rc<ShardCtx>, netns: Arc<Netns>, conn: TcpStream) {
    let started = Instant::now();
    shard.with_stats(|s| s.inbound.accepted += 1);
    let (Ok(peer), Ok(local)) = (conn.peer_addr(), conn.local_addr()) else {
        shard.with_stats(|s| s.fail(Direction::Inbound, Blame::Downstream, "gone"));
        return;
    };
    let (mut tls, dst, early) = match accept(&shard, conn, peer, local).await {
        Ok(t) => t,
        Err(why) => {
            // Dropping the stream closes it: the peer gets the TLS alert, if
            // any, then EOF. Nothing was forwarded.
            let (blame, label) = why.label();
            shard.with_stats(|s| s.fail(Direction::Inbound, blame, label));
            warn!(%peer, %local, netns = %netns.name(), side = %blame, reason = label, error = %why, "inbound refused");
            return;
        }
    };
    let upstream = netns.run(|| socket::upstream(dst, shard.bypass_mark));
    let mut app = match upstream {
        Ok(Ok(fd)) => sys::glommio_stream(fd),
        Ok(Err(e)) | Err(e) => {
            warn!(%peer, %dst, side = %Blame::Ours, error = %e, "could not make the socket to the application");
            shard.with_stats(|s| s.fail(Direction::Inbound, Blame::Ours, "socket"));
            socket::reset_on_close(tls.get_ref().0);
            return;
        }
    };
    // Client bytes that arrived with the preamble go first.
    if !early.is_empty() {
        if let Err(e) = app.write_all(&early).await {
            debug!(%peer, %dst, side = %Side::Upstream, error = %e, "inbound ended early");
            shard.with_stats(|s| s.fail(Direction::Inbound, Blame::Upstream, classify(&e)));
            socket::reset_on_close(tls.get_ref().0);
            return;
        }
    }
    let result = relay::relay(&mut tls, &mut app, shard.timeouts.idle).await;
    let (bytes, end) = match result {
        Ok(bytes) => (bytes, None),
        Err(e) => (e.bytes, Some(e.end)),
    };
    let duration_us = started.elapsed().as_micros() as u64;
    shard.with_stats(|s| {
        s.inbound.bytes_up += bytes.sent + early.len() as u64;
        s.inbound.bytes_down += bytes.received;
    });
    match end {
        None => {
            shard.with_stats(|s| s.inbound.completed += 1);
            debug!(%peer, %dst, sent = bytes.sent + early.len() as u64, received = bytes.received, duration_us,
                   "inbound closed");
        }
        Some(end) => {
            let (blame, reason) = match &end {
                relay::End::Io { side, source } => (Blame::from(*side), classify(source)),
                relay::End::Idle(_) => (Blame::Ours, "idle_timeout"),
            };
            shard.with_stats(|s| s.fail(Direction::Inbound, blame, reason));
            debug!(%peer, %dst, side = %blame, error = %end, sent = bytes.sent, received = bytes.received, duration_us,
                   "inbound ended early");
            match end {
                relay::End::Io { side: Side::Upstream, .. } => socket::reset_on_close(tls.get_ref().0),
                relay::End::Io { side: Side::Downstream, .. } => socket::reset_on_close(&app),
                relay::End::Idle(_) => {
                    socket::reset_on_close(&app);
                    socket::reset_on_close(tls.get_ref().0);
                }
            }
        }
    }
}

type Tls = futures_rustls::server::TlsStream<TcpStream>;

/// Handshake, identity and preamble checks. Returns the stream, the
/// destination, and any client bytes read past the preamble.
async fn accept(
    shard: &ShardCtx,
    conn: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<(Tls, SocketAddr, Vec<u8>), Refusal> {
    let config = shard.identity().server_config(local.ip())?;
    let limit = shard.timeouts.handshake;
    let mut tls = relay::within(limit, TlsAcceptor::from(config).accept(conn))
        .await
        .ok_or(Refusal::Timeout("TLS handshake"))?
        .map_err(Refusal::Handshake)?;
    let (_, session) = tls.get_ref();
    if session.alpn_protocol() != Some(preamble::ALPN) {
        return Err(Refusal::Alpn);
    }
    identity::check_peer_ip(session.peer_certificates(), peer.ip())?;

    let mut buf = vec![0u8; preamble::MAX_LEN];
    let mut filled = 0;
    let (p, len) = loop {
        match preamble::decode(&buf[..filled])? {
            preamble::Decoded::Complete { preamble, len } => break (preamble, len),
            preamble::Decoded::NeedMore(_) => {}
        }
        let n = relay::within(limit, tls.read(&mut buf[filled..]))
            .await
            .ok_or(Refusal::Timeout("preamble"))?
            .map_err(Refusal::PreambleIo)?;
        if n == 0 {
            return Err(Refusal::PreambleIo(std::io::ErrorKind::UnexpectedEof.into()));
        }
        filled += n;
    };
    let dst = p.dst;
    if dst.ip() != local.ip() || dst.port() == INBOUND_PORT || dst.port() == OUTBOUND_PORT {
        return Err(Refusal::Elsewhere { dst, local: local.ip() });
    }
    buf.truncate(filled);
    buf.drain(..len);
    Ok((tls, dst, buf))
}

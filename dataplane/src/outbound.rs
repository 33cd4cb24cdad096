//! The outbound side (127.0.0.1:18000 in every enrolled namespace).
//!
//! A captured connection arrives; we ask the kernel where it was going
//! (`SO_ORIGINAL_DST`, answered by our `cgroup/getsockopt` program), connect at
//! once to `<original ip>:18001` from a socket made in the client's own
//! namespace (never waiting for client bytes, so servers that speak first
//! work), run the TLS 1.3 client handshake presenting the certificate of that
//! socket's source address and requiring the server's to be valid for the
//! original IP, send the preamble, and relay.
//!
//! A connection whose original destination is unknown, or that cannot be
//! tunnelled, is refused with a reset, never sent anywhere else. Every
//! connection is counted and timed on this executor.
use std::{
    net::{IpAddr, SocketAddr},
    rc::Rc,
    sync::Arc,
    time::Instant,
};

use dataplane_common::{preamble, INBOUND_PORT};
use futures_lite::io::AsyncWriteExt;
use futures_rustls::TlsConnector;
use glommio::net::TcpStream;
use rustls_pki_types::ServerName;
use tracing::{debug, warn};

use crate::{
    netns::Netns,
    relay::{self, Side},
    shard::ShardCtx,
    socket,
    stats::{classify, Blame, Direction, Hist},
    sys,
};

type Tls = futures_rustls::client::TlsStream<TcpStream>;

/// Serves one captured connection, start to finish, on this executor.
pub async fn serve(shard: Rc<ShardCtx>, netns: Arc<Netns>, mut downstream: TcpStream) {
    let started = Instant::now();
    shard.with_stats(|s| s.outbound.accepted += 1);
    let client = downstream.peer_addr().ok();
    let orig = match sys::original_dst(sys::borrow_fd(&downstream)) {
        Ok(orig) => SocketAddr::V4(orig),
        Err(e) => {
            warn!(?client, netns = %netns.name(), side = %Blame::Downstream, error = %e,
                  "outbound refused: no original destination (not captured by us)");
            shard.with_stats(|s| s.fail(Direction::Outbound, Blame::Downstream, "no_original_destination"));
            socket::reset_on_close(&downstream);
            return;
        }
    };
    let mut tls = match open_tunnel(&shard, &netns, orig).await {
        Ok(tls) => tls,
        Err((blame, reason, why)) => {
            warn!(?client, %orig, side = %blame, %reason, error = %why, "outbound refused");
            shard.with_stats(|s| s.fail(Direction::Outbound, blame, reason));
            socket::reset_on_close(&downstream);
            return;
        }
    };
    shard.with_stats(|s| s.record(Hist::TunnelConnect, started.elapsed()));

    let result = relay::relay(&mut downstream, &mut tls, shard.timeouts.idle).await;
    let lifetime = started.elapsed();
    let (bytes, end) = match result {
        Ok(bytes) => (bytes, None),
        Err(e) => (e.bytes, Some(e.end)),
    };
    shard.with_stats(|s| {
        s.outbound.bytes_up += bytes.sent;
        s.outbound.bytes_down += bytes.received;
        s.record(Hist::Lifetime, lifetime);
        if let Some(first) = bytes.first_received {
            s.record(Hist::FirstByte, first - started);
        }
    });
    let duration_us = lifetime.as_micros() as u64;
    match end {
        None => {
            shard.with_stats(|s| s.outbound.completed += 1);
            debug!(?client, %orig, sent = bytes.sent, received = bytes.received, duration_us, "outbound closed");
        }
        Some(end) => {
            let (blame, reason) = match &end {
                relay::End::Io { side, source } => (Blame::from(*side), classify(source)),
                relay::End::Idle(_) => (Blame::Ours, "idle_timeout"),
            };
            shard.with_stats(|s| s.fail(Direction::Outbound, blame, reason));
            debug!(?client, %orig, side = %blame, error = %end, sent = bytes.sent, received = bytes.received,
                   duration_us, "outbound ended early");
            // Make the failure visible on the side that did not fail.
            match end {
                relay::End::Io { side: Side::Upstream, .. } => socket::reset_on_close(&downstream),
                relay::End::Io { side: Side::Downstream, .. } => socket::reset_on_close(tls.get_ref().0),
                relay::End::Idle(_) => {
                    socket::reset_on_close(&downstream);
                    socket::reset_on_close(tls.get_ref().0);
                }
            }
        }
    }
}

type Refused = (Blame, &'static str, String);

/// Connects to `<orig ip>:18001` from `netns`, runs the mutual-TLS handshake
/// and sends the preamble.
async fn open_tunnel(shard: &ShardCtx, netns: &Netns, orig: SocketAddr) -> Result<Tls, Refused> {
    let tunnel = SocketAddr::new(orig.ip(), INBOUND_PORT);
    let fd = match netns.run(|| socket::upstream(tunnel, shard.bypass_mark)) {
        Ok(Ok(fd)) => fd,
        Ok(Err(e)) | Err(e) => return Err((Blame::Ours, "socket", format!("connecting to {tunnel}: {e}"))),
    };
    // The source address is chosen at connect(): it names our identity.
    let src: IpAddr = socket2::SockRef::from(&fd)
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.ip())
        .ok_or_else(|| (Blame::Ours, "socket", "upstream socket has no local address".to_string()))?;
    let config = shard.identity().client_config(src).map_err(|e| (Blame::Ours, "no_certificate", e.to_string()))?;
    let handshake_started = Instant::now();
    let connect = TlsConnector::from(config).connect(ServerName::IpAddress(orig.ip().into()), sys::glommio_stream(fd));
    let mut tls = match relay::within(shard.timeouts.handshake, connect).await {
        Some(Ok(tls)) => tls,
        Some(Err(e)) => {
            return Err((Blame::Upstream, classify(&e), format!("TLS handshake with {tunnel} (from {src}): {e}")))
        }
        None => return Err((Blame::Upstream, "handshake_timeout", format!("TLS handshake with {tunnel} timed out"))),
    };
    shard.with_stats(|s| s.record(Hist::TlsHandshake, handshake_started.elapsed()));

    let mut buf = Vec::with_capacity(preamble::MAX_LEN);
    preamble::encode(&preamble::Preamble { dst: orig }, &mut buf);
    let sent = async {
        tls.write_all(&buf).await?;
        tls.flush().await
    };
    match sent.await {
        Ok(()) => Ok(tls),
        Err(e) => Err((Blame::Upstream, classify(&e), format!("sending the preamble to {tunnel}: {e}"))),
    }
}

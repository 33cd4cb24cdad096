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
//! tunnelled, is refused with a reset, never sent anywhere else.
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
    socket, sys,
};

/// Serves one captured connection, start to finish, on this executor.
pub async fn serve(shard: Rc<ShardCtx>, netns: Arc<Netns>, mut downstream: TcpStream) {
    let started = Instant::now();
    let client = downstream.peer_addr().ok();
    let orig = match sys::original_dst(sys::borrow_fd(&downstream)) {
        Ok(orig) => SocketAddr::V4(orig),
        Err(e) => {
            warn!(?client, netns = %netns.name(), error = %e, "refused: no original destination (not captured by us)");
            socket::reset_on_close(&downstream);
            return;
        }
    };
    let refuse = |side: Side, why: &dyn std::fmt::Display| {
        warn!(?client, %orig, %side, error = %why, "refused");
        socket::reset_on_close(&downstream);
    };

    let tunnel = SocketAddr::new(orig.ip(), INBOUND_PORT);
    let fd = match netns.run(|| socket::upstream(tunnel, shard.bypass_mark)) {
        Ok(Ok(fd)) => fd,
        Ok(Err(e)) | Err(e) => return refuse(Side::Upstream, &format_args!("connecting to {tunnel}: {e}")),
    };
    // The source address is chosen at connect(): it names our identity.
    let src: IpAddr = match socket2::SockRef::from(&fd).local_addr().ok().and_then(|a| a.as_socket()) {
        Some(a) => a.ip(),
        None => return refuse(Side::Upstream, &"upstream socket has no local address"),
    };
    let config = match shard.identity().client_config(src) {
        Ok(c) => c,
        Err(e) => return refuse(Side::Upstream, &e),
    };
    let upstream = sys::glommio_stream(fd);
    let connect_started = Instant::now();
    let connector = TlsConnector::from(config);
    let handshake =
        relay::within(shard.timeouts.handshake, connector.connect(ServerName::IpAddress(orig.ip().into()), upstream));
    let mut tls = match handshake.await {
        Some(Ok(tls)) => tls,
        Some(Err(e)) => return refuse(Side::Upstream, &format_args!("TLS handshake with {tunnel}: {e}")),
        None => return refuse(Side::Upstream, &format_args!("TLS handshake with {tunnel} timed out")),
    };
    let handshake_us = connect_started.elapsed().as_micros() as u64;

    let mut buf = Vec::with_capacity(preamble::MAX_LEN);
    preamble::encode(&preamble::Preamble { dst: orig }, &mut buf);
    if let Err(e) = tls.write_all(&buf).await {
        return refuse(Side::Upstream, &format_args!("sending the preamble: {e}"));
    }
    if let Err(e) = tls.flush().await {
        return refuse(Side::Upstream, &format_args!("sending the preamble: {e}"));
    }

    match relay::relay(&mut downstream, &mut tls, shard.timeouts.idle).await {
        Ok(bytes) => debug!(?client, %orig, %src, sent = bytes.sent, received = bytes.received, handshake_us,
                            duration_us = started.elapsed().as_micros() as u64, "outbound closed"),
        Err(e) => {
            debug!(?client, %orig, %src, error = %e.end, sent = e.bytes.sent, received = e.bytes.received,
                   handshake_us, duration_us = started.elapsed().as_micros() as u64, "outbound ended early");
            // Make the failure visible on the side that did not fail.
            match e.end {
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

//! The outbound side (127.0.0.1:18000 in every enrolled namespace): a captured
//! connection arrives, we ask the kernel where it was going
//! (`SO_ORIGINAL_DST`, answered by our `cgroup/getsockopt` program), open the
//! upstream connection from the same namespace, and relay.
//!
//! A connection whose original destination is unknown is refused (reset),
//! never sent anywhere else.
use std::{net::SocketAddr, rc::Rc, sync::Arc, time::Instant};

use glommio::net::TcpStream;
use tracing::{debug, warn};

use crate::{netns::Netns, relay, socket, sys};

/// What every outbound connection on one executor needs.
#[derive(Debug)]
pub struct Outbound {
    /// The namespace whose listener accepted it.
    pub netns: Arc<Netns>,
    /// SO_MARK for our upstream sockets.
    pub bypass_mark: u32,
}

/// Serves one captured connection, start to finish, on this executor.
pub async fn serve(ctx: Rc<Outbound>, mut downstream: TcpStream) {
    let started = Instant::now();
    let client = downstream.peer_addr().ok();
    let orig = match sys::original_dst(sys::borrow_fd(&downstream)) {
        Ok(orig) => orig,
        Err(e) => {
            warn!(?client, netns = %ctx.netns.name(), error = %e, "refusing connection: no original destination (not captured by us?)");
            socket::reset_on_close(&downstream);
            return;
        }
    };
    let upstream = ctx.netns.run(|| socket::upstream(SocketAddr::V4(orig), ctx.bypass_mark));
    let mut upstream = match upstream {
        Ok(Ok(fd)) => sys::glommio_stream(fd),
        Ok(Err(e)) | Err(e) => {
            warn!(?client, %orig, side = %relay::Side::Upstream, error = %e, "upstream connect failed");
            socket::reset_on_close(&downstream);
            return;
        }
    };
    match relay::relay(&mut downstream, &mut upstream).await {
        Ok(bytes) => debug!(?client, %orig, sent = bytes.sent, received = bytes.received,
                            duration_us = started.elapsed().as_micros() as u64, "connection closed"),
        Err(e) => {
            debug!(?client, %orig, side = %e.side, error = %e.source, sent = e.bytes.sent, received = e.bytes.received,
                   "connection failed");
            // Make the failure visible on the side that did not fail.
            match e.side {
                relay::Side::Downstream => socket::reset_on_close(&upstream),
                relay::Side::Upstream => socket::reset_on_close(&downstream),
            }
        }
    }
}

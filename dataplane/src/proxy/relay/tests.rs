//! Unit tests of [`super`].
use futures_lite::{future, io::AsyncReadExt};

use super::*;

/// Runs `f` on a glommio executor of its own (the relay's timers are
/// glommio's); no root, no sockets.
fn on_executor<T: Send + 'static>(f: impl std::future::Future<Output = T> + 'static) -> T {
    glommio::LocalExecutorBuilder::default().make().expect("a glommio executor").run(f)
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// client <-> [a | relay | b] <-> server: the client sends `up` then
/// half-closes; the server reads to EOF, answers `down`, closes.
async fn exchange(cap: usize, up: Vec<u8>, down: Vec<u8>) -> (Result<Bytes, RelayError>, Vec<u8>, Vec<u8>) {
    let (mut client, mut a) = duplex::pair(cap);
    let (mut b, mut server) = duplex::pair(cap);
    let relayed = relay(&mut a, &mut b, Duration::from_secs(5));
    let client_side = async {
        client.write_all(&up).await.expect("client writes");
        client.close().await.expect("client half-closes");
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("client reads");
        got
    };
    let server_side = async {
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("server reads to EOF");
        server.write_all(&down).await.expect("server answers after the client's EOF");
        server.close().await.expect("server closes");
        got
    };
    let ((result, at_client), at_server) = future::zip(future::zip(relayed, client_side), server_side).await;
    (result, at_server, at_client)
}

#[test]
fn every_byte_arrives_once_in_order_with_half_close() {
    // Capacities below, at and above a TLS record, none a divisor of
    // the sizes: partial writes and the spill buffer are exercised.
    for cap in [1000, MAX_BUF, 3 * MAX_BUF + 7] {
        let (up, down) = (pattern(200_003, 1), pattern(77_777, 2));
        let (result, at_server, at_client) = on_executor(exchange(cap, up.clone(), down.clone()));
        let bytes = result.unwrap_or_else(|e| panic!("cap {cap}: {e}"));
        assert!(at_server == up, "cap {cap}: the server got exactly the client's bytes");
        assert!(at_client == down, "cap {cap}: the client got exactly the server's bytes");
        assert_eq!((bytes.sent, bytes.received), (up.len() as u64, down.len() as u64), "cap {cap}");
        assert!(bytes.first_received.is_some());
    }
}

#[test]
fn watches_due_within_one_step_wake_together() {
    let long_sleep = Duration::from_millis(25);
    let attempt = || {
        on_executor(async move {
            // Onto a point of the grid first: both sleeps below are then
            // due before the next one, unless this wake-up came more than
            // half a step late (a loaded machine: hence three attempts).
            sleep_on_grid(Duration::ZERO).await;
            let start = Instant::now();
            let short = glommio::spawn_local(async {
                sleep_on_grid(Duration::from_millis(1)).await;
                Instant::now()
            });
            let long = glommio::spawn_local(async move {
                sleep_on_grid(long_sleep).await;
                Instant::now()
            });
            (start, short.await, long.await)
        })
    };
    let mut together = 0;
    for _ in 0..3 {
        let (start, short, long) = attempt();
        assert!(long - start >= long_sleep, "woke before it was due: {:?}", long - start);
        assert!(long - start <= long_sleep + GRID + Duration::from_millis(100), "late: {:?}", long - start);
        // One timer pass woke both.
        let apart = if long > short { long - short } else { short - long };
        together += usize::from(apart < Duration::from_millis(2));
    }
    assert!(together > 0, "the two sleeps never woke together");
}

#[test]
fn silence_ends_at_the_idle_timeout() {
    let end = on_executor(async {
        let (_client, mut a) = duplex::pair(64);
        let (mut b, _server) = duplex::pair(64);
        let started = Instant::now();
        let e = relay(&mut a, &mut b, Duration::from_millis(50)).await.expect_err("idle");
        (e, started.elapsed())
    });
    assert!(matches!(end.0.end, End::Idle(_)), "{:?}", end.0);
    assert!(end.1 >= Duration::from_millis(50) && end.1 < Duration::from_secs(2), "{:?}", end.1);
}

#[test]
fn a_reset_says_which_side_failed_and_keeps_the_count() {
    let e = on_executor(async {
        let (mut client, mut a) = duplex::pair(1 << 16);
        let (mut b, server) = duplex::pair(1 << 16);
        client.write_all(b"hello").await.expect("write");
        let relayed = relay(&mut a, &mut b, Duration::from_secs(5));
        let fail = async {
            glommio::timer::sleep(Duration::from_millis(20)).await;
            server.reset();
        };
        future::zip(relayed, fail).await.0.expect_err("reset")
    });
    assert!(matches!(e.end, End::Io { side: Side::Upstream, .. }), "{e:?}");
    assert_eq!(e.bytes.sent, 5, "what was relayed before the reset is counted");
}

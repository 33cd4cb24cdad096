//! The yardstick a user would otherwise reach for: a haproxy pair doing what
//! two data planes do, each beside its pod (in loopback mode both in the one
//! namespace). The client-side
//! haproxy takes plaintext and opens mutual TLS 1.3 (AES-128-GCM, the data
//! plane's ALPN, the same CA and certificate) to the server-side haproxy,
//! which checks the client certificate and forwards plaintext to the server.
//! Both are separate processes (two "nodes"), each with haproxy's default
//! threads, so their CPU can be read as the data plane's is.
use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

/// One proxied route: plaintext in at `front`, mutual TLS across `tls`,
/// plaintext out to `server`.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// Where the load generator connects.
    pub front: SocketAddr,
    /// The TLS hop between the two haproxies.
    pub tls: SocketAddr,
    /// The real server.
    pub server: SocketAddr,
}

/// Where each side runs and who it is: the network namespace (a path) and the
/// IP whose certificate (`<ip>.crt`, `<ip>.key` in the certificate
/// directory) it presents.
#[derive(Debug, Clone)]
pub struct Side {
    /// Network namespace file.
    pub netns: PathBuf,
    /// Certificate to present.
    pub ip: String,
    /// CPUs to run on (a `taskset` list), where the shape gives its sides
    /// CPUs of their own.
    pub cpus: Option<String>,
}

/// The two haproxy processes; stopped and cleaned up on drop.
#[derive(Debug)]
pub struct Pair {
    client: Child,
    server: Child,
    dir: PathBuf,
}

/// TLS 1.3 with the suite the data plane prefers.
const TLS: &str = "ssl-min-ver TLSv1.3 ciphersuites TLS_AES_128_GCM_SHA256 alpn dataplane-tunnel/1";

impl Pair {
    /// Starts the client side and the server side with the CA and their
    /// certificates from `certs`; with `resumption` off, every connection is
    /// a full mutual handshake (`no-ssl-reuse`).
    pub fn start(
        client: &Side,
        server: &Side,
        certs: &Path,
        routes: &[Route],
        resumption: bool,
    ) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("dpbench-haproxy-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        // haproxy wants the certificate and its key in one file.
        let pem = |ip: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(format!("{ip}.pem"));
            let mut both = fs::read(certs.join(format!("{ip}.crt"))).context("the bench's certificate")?;
            both.extend(fs::read(certs.join(format!("{ip}.key"))).context("the bench's key")?);
            fs::write(&path, both)?;
            Ok(path)
        };
        let (client_pem, server_pem) = (pem(&client.ip)?, pem(&server.ip)?);
        let ca = certs.join("ca.crt");
        // No maxconn: haproxy derives it from the open-file limit it has.
        let global = "global\n\
                      defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n";
        let (mut client_cfg, mut server_cfg) = (global.to_string(), global.to_string());
        for (i, r) in routes.iter().enumerate() {
            client_cfg.push_str(&format!(
                "frontend f{i}\n  bind {front}\n  default_backend b{i}\n\
                 backend b{i}\n  server s {tls} ssl verify required ca-file {ca} crt {pem} {TLS}{reuse}\n",
                front = r.front,
                tls = r.tls,
                ca = ca.display(),
                pem = client_pem.display(),
                reuse = if resumption { "" } else { " no-ssl-reuse" },
            ));
            server_cfg.push_str(&format!(
                "frontend f{i}\n  bind {tls} ssl crt {pem} ca-file {ca} verify required {TLS}\n  default_backend b{i}\n\
                 backend b{i}\n  server s {server}\n",
                tls = r.tls,
                server = r.server,
                ca = ca.display(),
                pem = server_pem.display(),
            ));
        }
        let spawn = |name: &str, side: &Side, cfg: &str| -> anyhow::Result<Child> {
            let path = dir.join(format!("{name}.cfg"));
            fs::write(&path, cfg)?;
            let pin = side.cpus.as_deref().map(|c| ["taskset", "-c", c]);
            Command::new("nsenter")
                .arg(format!("--net={}", side.netns.display()))
                .args(pin.iter().flatten())
                .args(["haproxy", "-db", "-q", "-f"])
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting haproxy (apt-get install haproxy, or scripts/deps)")
        };
        let pair =
            Self { server: spawn("server", server, &server_cfg)?, client: spawn("client", client, &client_cfg)?, dir };
        // Ready once every front port accepts (from the client's namespace).
        let deadline = Instant::now() + Duration::from_secs(10);
        for r in routes {
            loop {
                let probe = Command::new("nsenter")
                    .arg(format!("--net={}", client.netns.display()))
                    .args(["bash", "-c", &format!("exec 3<>/dev/tcp/{}/{}", r.front.ip(), r.front.port())])
                    .stderr(Stdio::null())
                    .status();
                if probe.is_ok_and(|s| s.success()) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("haproxy did not listen on {} within 10 s", r.front);
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(pair)
    }

    /// Both processes' PIDs (the one process holds all of haproxy's threads).
    pub fn pids(&self) -> Vec<u32> {
        vec![self.client.id(), self.server.id()]
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for c in [&mut self.client, &mut self.server] {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// CPU time of a set of processes.
pub fn cpu_of(pids: &[u32]) -> Duration {
    pids.iter().filter_map(|&p| testworld::cpu_time(p)).sum()
}

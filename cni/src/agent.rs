//! The way to the node agent: its unix socket (one request, one answer,
//! JSON lines), and the list of meshed namespaces it keeps beside it.
use std::{
    io::{self, BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use dataplane_common::cni::{namespaces_file, Request, Response, MAX_LINE};

/// How long the agent may take to decide: opening listeners on every
/// executor takes milliseconds; minting a certificate or a model that has
/// not seen the pod yet can take longer. The runtime's own timeout for ADD
/// is minutes.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// The agent, seen from the plugin.
pub(crate) trait Agent {
    /// Asks the agent at `socket`; `Err` if it cannot be reached or does
    /// not answer.
    fn ask(&mut self, socket: &Path, req: &Request) -> io::Result<Response>;
    /// The namespaces in the mesh as the agent last wrote them (`None`: no
    /// such file: no agent ever ran here).
    fn meshed_namespaces(&mut self, socket: &Path) -> io::Result<Option<Vec<String>>>;
}

/// The real agent, over its socket.
#[derive(Debug, Default)]
pub(crate) struct Socket;

impl Agent for Socket {
    fn ask(&mut self, socket: &Path, req: &Request) -> io::Result<Response> {
        let mut s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        s.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        let mut line = serde_json::to_vec(req).map_err(io::Error::other)?;
        line.push(b'\n');
        s.write_all(&line)?;
        let mut answer = Vec::new();
        BufReader::new(s.take(MAX_LINE as u64)).read_until(b'\n', &mut answer)?;
        serde_json::from_slice(&answer).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the agent's answer {:?}: {e}", String::from_utf8_lossy(&answer)),
            )
        })
    }

    fn meshed_namespaces(&mut self, socket: &Path) -> io::Result<Option<Vec<String>>> {
        let path: PathBuf = namespaces_file(socket);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

//! The node agent's side of the CNI plugin (`--cni-socket`): a unix socket
//! on the host where `dataplane-cni` hands over each new pod sandbox
//! ([`dataplane_common::cni`] has the protocol). A thread accepts; each
//! connection gets a thread of its own that reads the request, hands it to
//! the control thread as an [`Ask`], and writes the answer when the control
//! thread has decided (or refuses when it has not within
//! [`ANSWER_WITHIN`]). The control thread never blocks on a plugin.
//!
//! Beside the socket the agent keeps the list of namespaces opted into the
//! mesh ([`write_namespaces`]), which the plugin reads when the agent cannot
//! be reached: a pod of those namespaces then fails closed. [`install`] puts
//! the plugin on a node and takes it off.
use std::{
    fs,
    io::{self, BufRead, BufReader, Read, Write},
    os::unix::{
        fs::PermissionsExt,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use crossbeam_channel::{Receiver, Sender};
use dataplane_common::cni::{namespaces_file, Request, Response, MAX_LINE};
use tracing::{debug, warn};

pub mod install;

/// How long a plugin waits for the control thread's decision before the
/// agent refuses for it (the plugin itself waits a minute; the runtime
/// retries a refused sandbox).
pub const ANSWER_WITHIN: Duration = Duration::from_secs(45);

/// A plugin's request, waiting for the control thread's answer.
#[derive(Debug)]
pub struct Ask {
    /// What the runtime told the plugin.
    pub request: Request,
    /// Where the answer goes (once).
    pub reply: Sender<Response>,
}

/// Listens on `path` (replacing a stale socket file, creating its
/// directory, owner-only) and sends every well-formed request to `tx`.
pub fn serve(path: &Path, tx: Sender<Ask>) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    thread::Builder::new().name("cni".into()).spawn(move || {
        for conn in listener.incoming() {
            match conn {
                Ok(conn) => {
                    let tx = tx.clone();
                    if let Err(e) = thread::Builder::new().name("cni-request".into()).spawn(move || answer(conn, &tx)) {
                        warn!(error = %e, "CNI request: no thread to answer it on");
                    }
                }
                Err(e) => {
                    warn!(error = %e, "CNI socket: accept failed");
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    })?;
    Ok(())
}

/// Reads one request, waits for the control thread's answer, writes it.
fn answer(conn: UnixStream, tx: &Sender<Ask>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = Vec::new();
    let read = BufReader::new((&conn).take(MAX_LINE as u64)).read_until(b'\n', &mut line);
    let response = match read.map_err(|e| e.to_string()).and_then(|_| {
        serde_json::from_slice::<Request>(&line).map_err(|e| format!("a request that does not parse: {e}"))
    }) {
        Ok(request) => {
            debug!(?request, "CNI request");
            let (reply, answer) = crossbeam_channel::bounded(1);
            match tx.send(Ask { request, reply }) {
                Ok(()) => wait(&answer),
                Err(_) => Response::Refused { why: "the agent is stopping".into() },
            }
        }
        Err(why) => {
            warn!(why, "CNI plugin request refused");
            Response::Refused { why }
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    let _ = (&conn).write_all(&out);
}

fn wait(answer: &Receiver<Response>) -> Response {
    answer.recv_timeout(ANSWER_WITHIN).unwrap_or_else(|_| Response::Refused {
        why: format!("the agent did not decide within {}s", ANSWER_WITHIN.as_secs()),
    })
}

/// Writes the namespaces opted into the mesh beside the socket (replaced
/// whole, so the plugin never reads half a list).
pub fn write_namespaces<'a>(socket: &Path, namespaces: impl Iterator<Item = &'a str>) -> io::Result<()> {
    let list: Vec<&str> = namespaces.collect();
    write_whole(&namespaces_file(socket), &serde_json::to_vec(&list).map_err(io::Error::other)?, 0o644)
}

/// Writes `bytes` to `path` whole, with `mode`: a temporary file beside it,
/// renamed over, so a runtime or a plugin never reads half a file.
pub fn write_whole(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".dataplane-tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, bytes)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane_common::cni::Command;

    #[test]
    fn a_request_reaches_the_control_side_and_its_answer_the_plugin() {
        let dir = std::env::temp_dir().join(format!("dp-cni-unit-{}", std::process::id()));
        let socket = dir.join("sub/cni.sock");
        let (tx, rx) = crossbeam_channel::unbounded();
        serve(&socket, tx).expect("serving");
        let mode = fs::metadata(&socket).expect("socket").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "owner only");
        let control = thread::spawn(move || {
            let ask: Ask = rx.recv().expect("a request");
            assert_eq!((ask.request.command, ask.request.name.as_str()), (Command::Add, "web-1"));
            ask.reply.send(Response::Passed { why: "namespace_not_opted_in".into() }).expect("sent");
        });
        let ask = |line: &str| {
            let mut s = UnixStream::connect(&socket).expect("connects");
            s.write_all(line.as_bytes()).expect("writes");
            let mut out = String::new();
            BufReader::new(s).read_line(&mut out).expect("reads");
            serde_json::from_str::<Response>(&out).expect("an answer")
        };
        let req = r#"{"command":"ADD","containerId":"c","netns":"/n","namespace":"shop","name":"web-1"}"#;
        assert_eq!(ask(&format!("{req}\n")), Response::Passed { why: "namespace_not_opted_in".into() });
        control.join().expect("control side");
        let Response::Refused { why } = ask("garbage\n") else { panic!("garbage is refused") };
        assert!(why.contains("does not parse"), "{why}");
        write_namespaces(&socket, ["shop", "web"].into_iter()).expect("written");
        let list: Vec<String> =
            serde_json::from_slice(&fs::read(namespaces_file(&socket)).expect("file")).expect("a list");
        assert_eq!(list, ["shop", "web"]);
        let _ = fs::remove_dir_all(&dir);
    }
}

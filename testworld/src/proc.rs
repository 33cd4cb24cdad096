//! Child processes, killed on drop, their output collected line by line.
use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use crate::run;

/// A child process killed on drop, its output collected line by line.
#[derive(Debug)]
pub struct Proc {
    /// The child.
    pub child: Child,
    /// What it is, for messages.
    pub what: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `cmd`, or fails the test.
    pub fn spawn(cmd: Command, what: &str) -> Self {
        Self::try_spawn(cmd, what).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts `cmd` with its stdout and stderr collected (echoed with
    /// `DP_TEST_VERBOSE` set).
    pub fn try_spawn(mut cmd: Command, what: &str) -> anyhow::Result<Self> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| anyhow::anyhow!("starting {what}: {e}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let streams: [Option<Box<dyn std::io::Read + Send>>; 2] = [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ];
        for stream in streams.into_iter().flatten() {
            let lines = lines.clone();
            let tag = what.to_string();
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("DP_TEST_VERBOSE").is_some() {
                        eprintln!("[{tag}] {line}");
                    }
                    lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(line);
                }
            });
        }
        Ok(Self { child, what: what.to_string(), lines })
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line it printed so far.
    pub fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Waits until a line containing `needle` appears, or fails the test.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) {
        if let Err(e) = self.try_wait_for(needle, timeout) {
            panic!("{e}");
        }
    }

    /// Waits until a line containing `needle` appears; the line.
    pub fn try_wait_for(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.output().into_iter().find(|l| l.contains(needle)) {
                return Ok(l);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                thread::sleep(Duration::from_millis(50)); // let the readers drain
                anyhow::bail!(
                    "{} exited ({status}) before printing {needle:?}:\n{}",
                    self.what,
                    self.output().join("\n")
                );
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "{} did not print {needle:?} within {timeout:?}:\n{}",
                    self.what,
                    self.output().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// `kill -SIG pid`.
    pub fn signal(&self, sig: &str) {
        run(Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]));
    }

    /// Waits for exit, killing it (and failing the test) after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap_or_else(|e| panic!("waiting for {}: {e}", self.what)) {
                thread::sleep(Duration::from_millis(50));
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{} did not exit within {timeout:?}:\n{}", self.what, self.output().join("\n"));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// How many connections a `peers.py` server accepted.
    pub fn accepted(&self) -> usize {
        self.output().iter().filter(|l| l.starts_with("accepted ")).count()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

//! A certificate directory minted with the data plane's own `dataplane ca`.
use std::{fs, path::PathBuf, process::Command};

use crate::{dataplane_binary, run, sh, unique};

/// A CA and a certificate per IP; removed on drop.
#[derive(Debug)]
pub struct Certs {
    /// The directory.
    pub dir: PathBuf,
    binary: PathBuf,
}

impl Certs {
    /// `$TMPDIR/dptest-certs-<unique>` with a certificate for each of `ips`.
    pub fn new(test: &str, ips: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("dptest-certs-{}", unique(test, "c")));
        Self::create(&dataplane_binary(), dir, ips).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A CA in `dir` (emptied first) and a certificate for each of `ips`,
    /// minted by `binary ca`.
    pub fn create(binary: &std::path::Path, dir: PathBuf, ips: &[&str]) -> anyhow::Result<Self> {
        let _ = fs::remove_dir_all(&dir);
        let certs = Self { dir, binary: binary.to_path_buf() };
        certs.try_ca(&["init"])?;
        // A few at a time: a node's worth of pods is hundreds.
        let per = ips.len().div_ceil(4).max(1);
        std::thread::scope(|s| {
            let issuing: Vec<_> = ips
                .chunks(per)
                .map(|chunk| {
                    let certs = &certs;
                    s.spawn(move || chunk.iter().try_for_each(|ip| certs.try_ca(&["issue", "--ip", ip])))
                })
                .collect();
            issuing.into_iter().try_for_each(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a thread panicked"))))
        })?;
        Ok(certs)
    }

    fn try_ca(&self, args: &[&str]) -> anyhow::Result<()> {
        sh(Command::new(&self.binary).arg("ca").args(args).arg("--dir").arg(&self.dir))
    }

    /// `dataplane ca ARGS --dir DIR`.
    pub fn ca(&self, args: &[&str]) {
        run(Command::new(&self.binary).arg("ca").args(args).arg("--dir").arg(&self.dir));
    }

    /// Issues (or re-issues) the certificate for `ip`.
    pub fn issue(&self, ip: &str, extra: &[&str]) {
        let mut args = vec!["issue", "--ip", ip];
        args.extend_from_slice(extra);
        self.ca(&args);
    }

    /// The directory, as a string for command lines.
    pub fn path(&self) -> String {
        self.dir.display().to_string()
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

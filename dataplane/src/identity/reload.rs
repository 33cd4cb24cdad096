//! Watching the certificate directory for changes.
//!
//! Polling a fingerprint (name, size, mtime and inode of every entry, links
//! followed) is simple and catches every way the files change, including the
//! way Kubernetes updates a mounted Secret: new files in a fresh `..2026_..`
//! directory, then an atomic rename of the `..data` symlink. inotify would
//! need to re-arm on each of those hops. The control thread polls four times a
//! second, well inside the one-second promise.
use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// What the directory looked like.
pub type Fingerprint = Vec<(String, u64, i64, i64, u64)>;

/// The fingerprint of `dir` now (an unreadable directory gives an empty one).
pub fn fingerprint(dir: &Path) -> Fingerprint {
    let mut fp: Fingerprint = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let m = fs::metadata(e.path()).ok()?; // follows symlinks such as ..data
            Some((name, m.len(), m.mtime(), m.mtime_nsec(), m.ino()))
        })
        .collect();
    fp.sort();
    fp
}

/// Tracks one directory.
#[derive(Debug)]
pub struct Watch {
    dir: PathBuf,
    last: Fingerprint,
}

impl Watch {
    /// Starts from the directory as it is now (already loaded).
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf(), last: fingerprint(dir) }
    }

    /// Whether the directory changed since the last call that said so.
    pub fn changed(&mut self) -> bool {
        let now = fingerprint(&self.dir);
        if now == self.last {
            return false;
        }
        self.last = now;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_a_symlink_flip() {
        let d = std::env::temp_dir().join(format!("dp-reload-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("v1")).expect("mkdir");
        fs::create_dir_all(d.join("v2")).expect("mkdir");
        fs::write(d.join("v1/a.crt"), "one").expect("write");
        fs::write(d.join("v2/a.crt"), "two!").expect("write");
        std::os::unix::fs::symlink("v1", d.join("..data")).expect("symlink");
        std::os::unix::fs::symlink("..data/a.crt", d.join("a.crt")).expect("symlink");
        let mut w = Watch::new(&d);
        assert!(!w.changed());
        std::os::unix::fs::symlink("v2", d.join("..data.tmp")).expect("symlink");
        fs::rename(d.join("..data.tmp"), d.join("..data")).expect("atomic flip");
        assert!(w.changed(), "the flip is seen");
        assert!(!w.changed(), "and only once");
        fs::remove_dir_all(&d).expect("cleanup");
    }
}

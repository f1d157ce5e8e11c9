//! An input file re-read at every poll and parsed only when it changed: the cluster-state file
//! and the policy file.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::input::InputError;

fn digest(text: &str) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// An input file looked at on every [`Watched::poll`] and parsed by `parse` when it changed.
/// Its metadata (inode, size, modification and change times, of the file a symlink leads to)
/// is compared first, so that an unchanged file of megabytes is not read at every poll; when it
/// differs, the contents are hashed and compared, so a rewrite with the same text is not a
/// change. Following the symlink also follows Kubernetes ConfigMap mounts, which swap one.
///
/// File times are coarse (the kernel stamps them from a clock that advances once per tick), so
/// an edit in place that keeps the size and lands in the same tick as the previous one would
/// keep the metadata: the metadata is trusted only for a file last modified more than
/// [`SETTLED`] before it was read. Any later edit then has a later time.
#[derive(Debug)]
pub struct Watched<T> {
    path: PathBuf,
    /// The metadata when the text was last read, if the file had settled then.
    last_meta: Option<Meta>,
    /// A hash of the last text read (not the text: a cluster-state file can be megabytes).
    last_text: Option<u64>,
    parse: fn(&Path, &str) -> Result<T, InputError>,
}

/// See [`Watched`].
const SETTLED: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Meta {
    /// Whether the file was last modified more than [`SETTLED`] ago.
    fn settled(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        now - self.mtime_ns.max(self.ctime_ns) > SETTLED.as_nanos() as i128
    }

    fn of(path: &Path) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

impl<T> Watched<T> {
    #[must_use]
    pub fn with_parser(path: PathBuf, parse: fn(&Path, &str) -> Result<T, InputError>) -> Self {
        Self {
            path,
            last_meta: None,
            last_text: None,
            parse,
        }
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `None` when the file is unchanged since the last call; otherwise the new state or why
    /// it was rejected. A rejected text is remembered too, so an error is reported once per
    /// edit rather than once per poll.
    pub fn poll(&mut self) -> Option<Result<T, InputError>> {
        let meta = Meta::of(&self.path);
        if meta.is_some() && meta == self.last_meta {
            return None;
        }
        self.last_meta = meta.filter(Meta::settled);
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) => {
                let marker = format!("\0unreadable: {e}");
                if self.last_text == Some(digest(&marker)) {
                    return None;
                }
                self.last_text = Some(digest(&marker));
                return Some(Err(InputError::file(
                    &self.path,
                    format!("cannot read: {e}"),
                )));
            }
        };
        let hash = digest(&text);
        if self.last_text == Some(hash) {
            return None;
        }
        let result = (self.parse)(&self.path, &text);
        self.last_text = Some(hash);
        Some(result)
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::inputs::{ClusterState, cluster_file::tests::GOOD};

    type FileSource = Watched<ClusterState>;

    fn source(path: PathBuf) -> FileSource {
        Watched::with_parser(path, ClusterState::parse)
    }

    #[test]
    fn file_source_reports_changes_once_and_keeps_errors_distinct() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let mut src = source(path.clone());
        assert!(src.poll().unwrap().is_ok());
        assert!(src.poll().is_none());
        std::fs::write(&path, "trust_domain: [").unwrap();
        assert!(src.poll().unwrap().is_err());
        assert!(src.poll().is_none(), "the same bad text is reported once");
        std::fs::write(&path, GOOD.replace("198.18.2.3", "198.18.2.4")).unwrap();
        assert_eq!(
            src.poll().unwrap().unwrap().workloads[2].addresses[0],
            "198.18.2.4".parse::<IpAddr>().unwrap()
        );
    }
}

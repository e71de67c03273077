//! Membership providers: who the cluster members are (name + addresses) and
//! so how many members are expected. Failure detection is the heartbeats'
//! job; a provider only says who should be there.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use parking_lot::Mutex;

use crate::error::{Error, Result};

/// A member as configured.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MemberSpec {
    /// Stable name.
    pub name: String,
    /// Client (gRPC) address.
    pub grpc: String,
    /// Peer address.
    pub peer: String,
}

impl MemberSpec {
    /// Parses `NAME=GRPC_ADDR/PEER_ADDR`.
    pub fn parse(s: &str) -> Result<MemberSpec> {
        let bad =
            || Error::InvalidArgument(format!("member {s:?}: expected NAME=GRPC_ADDR/PEER_ADDR"));
        let (name, addrs) = s.trim().split_once('=').ok_or_else(bad)?;
        let (grpc, peer) = addrs.split_once('/').ok_or_else(bad)?;
        if name.is_empty() || grpc.is_empty() || peer.is_empty() {
            return Err(bad());
        }
        Ok(MemberSpec {
            name: name.to_string(),
            grpc: grpc.to_string(),
            peer: peer.to_string(),
        })
    }

    /// Parses a list separated by commas, semicolons, whitespace or newlines
    /// (`#` starts a comment line).
    pub fn parse_list(s: &str) -> Result<Vec<MemberSpec>> {
        let mut out: Vec<MemberSpec> = Vec::new();
        for line in s.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
            for item in line.split([',', ';', ' ', '\t']).filter(|i| !i.is_empty()) {
                let m = MemberSpec::parse(item)?;
                if out.iter().any(|o| o.name == m.name) {
                    return Err(Error::InvalidArgument(format!(
                        "member {} listed twice",
                        m.name
                    )));
                }
                out.push(m);
            }
        }
        Ok(out)
    }
}

/// Supplies the current member list (the `ClusterNodesProvider` of the seed).
pub trait MembersProvider: Send + Sync + std::fmt::Debug {
    /// The members that should be in the cluster now; its length is the
    /// expected cluster size.
    /// Shared, so the hot path (quorum and lease checks on every write)
    /// does not copy it.
    fn members(&self) -> Arc<Vec<MemberSpec>>;

    /// Members whose process is known to be gone since the last call (their
    /// pod was deleted or replaced); the cluster stops counting their
    /// current incarnation as alive without waiting for the heartbeat
    /// timeout.
    fn take_gone(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A fixed list.
#[derive(Debug)]
pub struct StaticProvider(pub Arc<Vec<MemberSpec>>);

impl MembersProvider for StaticProvider {
    fn members(&self) -> Arc<Vec<MemberSpec>> {
        self.0.clone()
    }
}

/// How often a [`FileProvider`] looks at its file's modification time.
const FILE_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// A file of member specs, re-read whenever its modification time changes;
/// a file that fails to parse keeps the last good list (and logs why).
#[derive(Debug)]
pub struct FileProvider {
    path: PathBuf,
    /// (file modification time, list, when the time was last looked at).
    cache: Mutex<(Option<SystemTime>, Arc<Vec<MemberSpec>>, Instant)>,
}

impl FileProvider {
    /// Reads `path` once (it must parse).
    pub fn new(path: PathBuf) -> Result<Self> {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::InvalidArgument(format!("members file {}: {e}", path.display())))?;
        let list = MemberSpec::parse_list(&text)?;
        let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        Ok(FileProvider {
            path,
            cache: Mutex::new((mtime, Arc::new(list), Instant::now())),
        })
    }
}

impl MembersProvider for FileProvider {
    fn members(&self) -> Arc<Vec<MemberSpec>> {
        let mut cache = self.cache.lock();
        if cache.2.elapsed() < FILE_CHECK_EVERY {
            return cache.1.clone();
        }
        cache.2 = Instant::now();
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if mtime.is_some() && mtime != cache.0 {
            match std::fs::read_to_string(&self.path)
                .map_err(|e| Error::InvalidArgument(e.to_string()))
                .and_then(|t| MemberSpec::parse_list(&t))
            {
                Ok(list) => {
                    tracing::info!(members = list.len(), "members file reloaded");
                    *cache = (mtime, Arc::new(list), Instant::now());
                }
                Err(e) => tracing::warn!(error = %e, "members file ignored"),
            }
        }
        cache.1.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_rejects_junk() {
        let l =
            MemberSpec::parse_list("# c\nn1=127.0.0.1:7100/127.0.0.1:7200, n2=h:1/h:2\nn3=a:1/b:2")
                .expect("list");
        assert_eq!(l.len(), 3);
        assert_eq!(l[1].peer, "h:2");
        assert!(MemberSpec::parse("n1=127.0.0.1:7100").is_err());
        assert!(MemberSpec::parse_list("a=x/y,a=z/w").is_err());
    }

    #[test]
    fn file_provider_reloads_on_change() {
        let dir = std::env::temp_dir().join(format!("dc-members-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("members");
        std::fs::write(&path, "a=x:1/x:2").expect("write");
        let p = FileProvider::new(path.clone()).expect("provider");
        assert_eq!(p.members().len(), 1);
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, "a=x:1/x:2\nb=y:1/y:2").expect("write");
        let f = std::fs::File::options()
            .append(true)
            .open(&path)
            .expect("open");
        f.set_modified(SystemTime::now() + std::time::Duration::from_secs(5))
            .expect("mtime");
        // The file is looked at every FILE_CHECK_EVERY at most.
        std::thread::sleep(FILE_CHECK_EVERY + std::time::Duration::from_millis(10));
        assert_eq!(p.members().len(), 2);
        std::fs::write(&path, "garbage").expect("write");
        f.set_modified(SystemTime::now() + std::time::Duration::from_secs(10))
            .expect("mtime");
        std::thread::sleep(FILE_CHECK_EVERY + std::time::Duration::from_millis(10));
        assert_eq!(p.members().len(), 2, "bad file keeps the last good list");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

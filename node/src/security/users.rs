//! Users and their grants, from a JSON file (mounted from a Secret) that is
//! re-read when it changes, so adding or revoking a user needs no restart.
//!
//! ```json
//! {"users": [
//!   {"name": "web", "token_sha256": "<hex sha256 of the token>",
//!    "grants": [{"collections": "sessions*", "roles": ["read", "write"]}]},
//!   {"name": "ops", "cert_name": "ops.clients.example",
//!    "grants": [{"collections": "*", "roles": ["read", "write", "admin"]}]}
//! ]}
//! ```
//!
//! A user authenticates with a bearer token (only its SHA-256 is stored) or
//! with a client certificate whose DNS name is `cert_name`. Roles: `read`
//! (get, get_many, keys, size, exists), `write` (put, delete, batch writes,
//! locks), `admin` (create, delete and clear collections, force-unlock).
//! Locks are granted as the collection `__locks__`; the default collection
//! is `__default__`. A pattern is a collection name where `*` matches any run
//! of characters.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The pseudo-collection lock operations are authorized against.
pub const LOCKS_COLLECTION: &str = "__locks__";

/// What a grant allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// get, get_many, keys, size, exists.
    Read,
    /// put, delete, batch writes, locks.
    Write,
    /// create/delete/clear collections, force-unlock.
    Admin,
}

impl Role {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    users: Vec<UserSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserSpec {
    name: String,
    #[serde(default)]
    token_sha256: Option<String>,
    #[serde(default)]
    cert_name: Option<String>,
    #[serde(default)]
    grants: Vec<GrantSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantSpec {
    collections: String,
    roles: Vec<Role>,
}

/// An authenticated user.
#[derive(Debug, PartialEq, Eq)]
pub struct User {
    /// Name (in logs and denials).
    pub name: String,
    grants: Vec<(String, Vec<Role>)>,
}

/// Whether `name` matches `pattern` (`*`: any run of characters).
pub fn matches(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

impl User {
    /// Whether this user holds `role` on `collection`.
    pub fn allows(&self, collection: &str, role: Role) -> bool {
        self.grants
            .iter()
            .any(|(pattern, roles)| roles.contains(&role) && matches(pattern, collection))
    }

    /// Refuses (NOT_AUTHORIZED, naming the missing grant) unless allowed.
    pub fn require(&self, collection: &str, role: Role) -> Result<()> {
        if self.allows(collection, role) {
            Ok(())
        } else {
            Err(Error::NotAuthorized(format!(
                "user {:?} lacks the {} grant on collection {collection:?}",
                self.name,
                role.as_str()
            )))
        }
    }

    /// Whether this user holds any grant on `collection` (to list it).
    pub fn sees(&self, collection: &str) -> bool {
        self.grants.iter().any(|(p, _)| matches(p, collection))
    }
}

/// The users of one version of the file.
#[derive(Debug, Default)]
struct Directory {
    by_token: HashMap<[u8; 32], Arc<User>>,
    by_cert: HashMap<String, Arc<User>>,
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn parse(text: &str, path: &Path) -> Result<Directory> {
    let bad = |why: String| Error::InvalidArgument(format!("users file {}: {why}", path.display()));
    let spec: FileSpec = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let mut dir = Directory::default();
    for u in spec.users {
        if u.token_sha256.is_none() && u.cert_name.is_none() {
            return Err(bad(format!(
                "user {:?} has neither token_sha256 nor cert_name",
                u.name
            )));
        }
        let user = Arc::new(User {
            name: u.name.clone(),
            grants: u
                .grants
                .into_iter()
                .map(|g| (g.collections, g.roles))
                .collect(),
        });
        if let Some(t) = &u.token_sha256 {
            let hash = parse_hex32(t).ok_or_else(|| {
                bad(format!(
                    "user {:?}: token_sha256 is not 64 hex digits",
                    u.name
                ))
            })?;
            if dir.by_token.insert(hash, user.clone()).is_some() {
                return Err(bad(format!("user {:?}: a token used twice", u.name)));
            }
        }
        if let Some(c) = &u.cert_name
            && dir.by_cert.insert(c.clone(), user).is_some()
        {
            return Err(bad(format!("cert_name {c:?} given twice")));
        }
    }
    Ok(dir)
}

/// The SHA-256 of a token, as the users file stores it (hex).
pub fn token_sha256(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Authentication and authorization for the client port.
#[derive(Debug)]
pub struct Users {
    path: PathBuf,
    current: RwLock<Arc<Directory>>,
    seen: Mutex<Option<SystemTime>>,
}

impl Users {
    /// Loads the users file (an error names the file and what is wrong).
    pub fn load(path: PathBuf) -> Result<Arc<Users>> {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::InvalidArgument(format!("users file {}: {e}", path.display())))?;
        let dir = parse(&text, &path)?;
        let seen = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        tracing::info!(
            file = %path.display(),
            tokens = dir.by_token.len(),
            certificates = dir.by_cert.len(),
            "users loaded"
        );
        Ok(Arc::new(Users {
            path,
            current: RwLock::new(Arc::new(dir)),
            seen: Mutex::new(seen),
        }))
    }

    /// Re-reads the file if it changed; a version that does not parse is
    /// refused (logged) and the current users kept. True when reloaded.
    pub fn reload_if_changed(&self) -> bool {
        let now = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut seen = self.seen.lock();
        if *seen == now {
            return false;
        }
        *seen = now;
        match std::fs::read_to_string(&self.path)
            .map_err(|e| Error::InvalidArgument(e.to_string()))
            .and_then(|t| parse(&t, &self.path))
        {
            Ok(dir) => {
                *self.current.write() = Arc::new(dir);
                tracing::info!(file = %self.path.display(), "users reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "users file changed but does not parse; keeping the current users");
                false
            }
        }
    }

    /// The user a bearer token or a client certificate name identifies.
    pub fn authenticate(&self, token: Option<&str>, cert_names: &[String]) -> Result<Arc<User>> {
        let dir = self.current.read().clone();
        if let Some(t) = token {
            let hash: [u8; 32] = Sha256::digest(t.as_bytes()).into();
            return dir
                .by_token
                .get(&hash)
                .cloned()
                .ok_or_else(|| Error::Unauthenticated("invalid token".into()));
        }
        cert_names
            .iter()
            .find_map(|n| dir.by_cert.get(n).cloned())
            .ok_or_else(|| {
                Error::Unauthenticated(if cert_names.is_empty() {
                    "no credential: send `authorization: Bearer <token>` or a client certificate"
                        .into()
                } else {
                    format!("no user for the client certificate {cert_names:?}")
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_globs() {
        assert!(matches("*", "anything"));
        assert!(matches("sessions*", "sessions-eu"));
        assert!(!matches("sessions*", "user-sessions"));
        assert!(matches("*-cache", "pages-cache"));
        assert!(matches("a*b*c", "a-x-b-y-c"));
        assert!(!matches("a*b*c", "a-x-c"));
        assert!(matches("exact", "exact"));
        assert!(!matches("exact", "exactly"));
        assert!(
            !matches("ab*ba", "aba"),
            "prefix and suffix must not overlap"
        );
    }

    #[test]
    fn tokens_and_certificates_name_users_with_their_grants() {
        let token_hash = token_sha256("s3cret");
        let text = format!(
            r#"{{"users": [
                {{"name": "web", "token_sha256": "{token_hash}",
                  "grants": [{{"collections": "sessions*", "roles": ["read", "write"]}}]}},
                {{"name": "ops", "cert_name": "ops.example",
                  "grants": [{{"collections": "*", "roles": ["admin"]}}]}}
            ]}}"#
        );
        let dir = std::env::temp_dir().join(format!("dc-users-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("users.json");
        std::fs::write(&path, text).expect("write");
        let users = Users::load(path.clone()).expect("load");
        let web = users.authenticate(Some("s3cret"), &[]).expect("token");
        assert_eq!(web.name, "web");
        assert!(web.allows("sessions-eu", Role::Write));
        assert!(!web.allows("sessions-eu", Role::Admin));
        assert!(!web.allows("billing", Role::Read));
        let denied = web.require("billing", Role::Read).expect_err("no grant");
        assert!(denied.to_string().contains("read"), "{denied}");
        assert!(matches!(
            users.authenticate(Some("wrong"), &[]),
            Err(Error::Unauthenticated(_))
        ));
        assert!(matches!(
            users.authenticate(None, &[]),
            Err(Error::Unauthenticated(_))
        ));
        let ops = users
            .authenticate(None, &["other".into(), "ops.example".into()])
            .expect("cert");
        assert!(ops.allows("billing", Role::Admin));
        // Revoking the web user takes effect on reload; a broken file is refused.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(
            &path,
            r#"{"users": [{"name": "ops", "cert_name": "ops.example", "grants": []}]}"#,
        )
        .expect("write");
        filetime_bump(&path, 2).expect("mtime");
        assert!(users.reload_if_changed());
        assert!(users.authenticate(Some("s3cret"), &[]).is_err());
        std::fs::write(&path, "{not json").expect("write");
        filetime_bump(&path, 4).expect("mtime");
        assert!(!users.reload_if_changed());
        assert!(users.authenticate(None, &["ops.example".into()]).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Moves the file's mtime forward (coarse file-system clocks).
    fn filetime_bump(path: &Path, secs: u64) -> std::io::Result<()> {
        let f = std::fs::File::options().append(true).open(path)?;
        let later = SystemTime::now() + std::time::Duration::from_secs(secs);
        f.set_modified(later)
    }
}

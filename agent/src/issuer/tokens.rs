//! Join tokens of the bootstrap attestor: `portcullis issuer enroll --node NAME` makes one,
//! an agent trades it once for its node SVID.
//!
//! A token is `pcj1.<id>.<secret>`. Enrolling writes `tokens/<id>` in the state directory
//! (mode 0600): the node it is bound to, when it expires, and the SHA-256 of the secret (the
//! secret itself is printed once and kept nowhere). Trading it renames `tokens/<id>` to
//! `used/<id>`. A rename is atomic: of several replicas that share the state directory and
//! receive the same token at once, exactly one rename succeeds, and every other one — or any
//! later replay — finds the token used. Replicas must therefore share the directory (one host,
//! or a shared filesystem with atomic rename).

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ring::rand::SecureRandom as _;
use serde::{Deserialize, Serialize};

use super::protocol::{Code, Refusal};

const PREFIX: &str = "pcj1";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    node: String,
    expires_unix: u64,
    secret_sha256: String,
}

pub struct Tokens {
    dir: PathBuf,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn digest(secret: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
}

/// A token id: 32 hexadecimal digits.
fn valid_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Tokens {
    /// The token store in `dir` (created, mode 0700, if missing).
    pub fn open(dir: &Path) -> io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt as _;
        for sub in ["tokens", "used"] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir.join(sub))
                .map_err(|e| {
                    io::Error::new(e.kind(), format!("{}: {e}", dir.join(sub).display()))
                })?;
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Makes a token for `node`, valid for `ttl`; returns its text (shown once).
    pub fn enroll(&self, node: &str, ttl: Duration) -> io::Result<String> {
        let rng = ring::rand::SystemRandom::new();
        let mut id = [0u8; 16];
        let mut secret = [0u8; 32];
        rng.fill(&mut id)
            .and_then(|()| rng.fill(&mut secret))
            .map_err(|_| io::Error::other("no randomness"))?;
        let (id, secret) = (hex(&id), hex(&secret));
        let record = Record {
            node: node.to_owned(),
            expires_unix: now_unix().saturating_add(ttl.as_secs()),
            secret_sha256: digest(&secret),
        };
        let text = serde_json::to_vec(&record).map_err(io::Error::other)?;
        let path = self.dir.join("tokens").join(&id);
        crate::identity::ca::write_file(&path, &text, 0o600, true)
            .map_err(|e| io::Error::other(e.to_string()))?;
        self.prune();
        Ok(format!("{PREFIX}.{id}.{secret}"))
    }

    /// Trades `token` for the right to a node SVID for `node`: at most once, ever.
    pub fn redeem(&self, token: &str, node: &str) -> Result<(), Refusal> {
        let unknown = || Refusal::new(Code::TokenUnknown, "not a join token this issuer made");
        let mut parts = token.trim().splitn(3, '.');
        let (Some(PREFIX), Some(id), Some(secret)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(unknown());
        };
        if !valid_id(id) {
            return Err(unknown());
        }
        let path = self.dir.join("tokens").join(id);
        let used = self.dir.join("used").join(id);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(if used.exists() {
                    Refusal::new(Code::TokenUsed, format!("join token {id} was already used"))
                } else {
                    unknown()
                });
            }
            Err(e) => {
                return Err(Refusal::new(
                    Code::Internal,
                    format!("{}: {e}", path.display()),
                ));
            }
        };
        let record: Record = serde_json::from_slice(&text)
            .map_err(|e| Refusal::new(Code::Internal, format!("{}: {e}", path.display())))?;
        // The stored digest says nothing of the secret: comparing digests leaks nothing useful.
        if digest(secret) != record.secret_sha256 {
            return Err(unknown());
        }
        if record.node != node {
            return Err(Refusal::new(
                Code::TokenNode,
                format!(
                    "join token {id} is bound to node `{}`, not `{node}`",
                    record.node
                ),
            ));
        }
        if now_unix() > record.expires_unix {
            return Err(Refusal::new(
                Code::TokenExpired,
                format!("join token {id} expired"),
            ));
        }
        match fs::rename(&path, &used) {
            Ok(()) => Ok(()),
            // Another replica traded it between our read and our rename.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Refusal::new(
                Code::TokenUsed,
                format!("join token {id} was already used"),
            )),
            Err(e) => Err(Refusal::new(
                Code::Internal,
                format!("{}: {e}", path.display()),
            )),
        }
    }

    /// Removes records of tokens that expired more than a day ago (a replay of one is
    /// refused as unknown instead of used).
    fn prune(&self) {
        let limit = now_unix().saturating_sub(86_400);
        for sub in ["tokens", "used"] {
            let Ok(entries) = fs::read_dir(self.dir.join(sub)) else {
                continue;
            };
            for e in entries.flatten() {
                let stale = fs::read(e.path())
                    .ok()
                    .and_then(|t| serde_json::from_slice::<Record>(&t).ok())
                    .is_some_and(|r| r.expires_unix < limit);
                if stale {
                    // Another replica may have removed it already.
                    let _gone = fs::remove_file(e.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_traded_once_for_its_own_node_only() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens::open(dir.path()).unwrap();
        let t = tokens.enroll("node-1", Duration::from_secs(60)).unwrap();
        assert_eq!(
            tokens.redeem(&t, "node-2").unwrap_err().code,
            Code::TokenNode
        );
        tokens.redeem(&t, "node-1").unwrap();
        assert_eq!(
            tokens.redeem(&t, "node-1").unwrap_err().code,
            Code::TokenUsed,
            "a replay"
        );
        // A second replica sharing the directory sees the same.
        let other = Tokens::open(dir.path()).unwrap();
        assert_eq!(
            other.redeem(&t, "node-1").unwrap_err().code,
            Code::TokenUsed
        );
        let forged = format!("{}0", &t[..t.len() - 1]);
        let t2 = tokens.enroll("node-1", Duration::from_secs(60)).unwrap();
        let forged2 = format!(
            "{}{}",
            &t2[..t2.len() - 1],
            if t2.ends_with('0') { '1' } else { '0' }
        );
        assert_eq!(
            tokens.redeem(&forged2, "node-1").unwrap_err().code,
            Code::TokenUnknown
        );
        assert!(matches!(
            tokens.redeem(&forged, "node-1").unwrap_err().code,
            Code::TokenUnknown | Code::TokenUsed
        ));
        assert_eq!(
            tokens.redeem("garbage", "node-1").unwrap_err().code,
            Code::TokenUnknown
        );
        assert_eq!(
            tokens
                .redeem("pcj1.../../etc.x", "node-1")
                .unwrap_err()
                .code,
            Code::TokenUnknown
        );
        // The secret is nowhere on disk.
        let secret = t.rsplit('.').next().unwrap();
        for sub in ["tokens", "used"] {
            for e in fs::read_dir(dir.path().join(sub)).unwrap() {
                let text = fs::read_to_string(e.unwrap().path()).unwrap();
                assert!(!text.contains(secret));
            }
        }
    }

    #[test]
    fn an_expired_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens::open(dir.path()).unwrap();
        let t = tokens.enroll("n", Duration::from_secs(0)).unwrap();
        // Expiry has one-second resolution.
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(tokens.redeem(&t, "n").unwrap_err().code, Code::TokenExpired);
    }

    #[test]
    fn of_two_replicas_trading_one_token_at_once_exactly_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens::open(dir.path()).unwrap();
        for _ in 0..20 {
            let t = tokens.enroll("n", Duration::from_secs(60)).unwrap();
            let wins: usize = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|_| {
                        let (t, d) = (t.clone(), dir.path().to_owned());
                        s.spawn(move || Tokens::open(&d).unwrap().redeem(&t, "n").is_ok())
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| usize::from(h.join().unwrap()))
                    .sum()
            });
            assert_eq!(wins, 1);
        }
    }
}

//! The local admin API: one JSON request per line on a Unix socket, one JSON answer per line.
//! Only root (or the agent's own user) may use it: the socket is created 0600 in a 0700
//! directory, and every connection's peer credentials are checked as well.

use std::{
    io::{self, BufRead, BufReader, Write},
    os::unix::{
        fs::{DirBuilderExt, PermissionsExt},
        net::UnixStream as StdUnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader as AsyncBufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use crate::status::Status;

/// Largest request accepted, in bytes.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Writes an auth entry by hand (debugging, tests): the pair's new connections are
    /// admitted for `ttl_secs`.
    AuthAllow {
        local: String,
        remote: String,
        remote_node: String,
        ttl_secs: u64,
    },
    /// Removes an auth entry and cuts the pair's established flows.
    AuthRevoke {
        local: String,
        remote: String,
        remote_node: String,
    },
    /// From `portcullis-cni` ADD: read the claim of `container_id` now, and say whether its pod
    /// is enforced.
    CniAdd {
        container_id: String,
    },
    /// From `portcullis-cni` DEL: the claim of `container_id` is gone; release its interface.
    CniDel {
        container_id: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Box<Status>),
    Allowed {
        expires_in_secs: u64,
    },
    Revoked {
        entry_removed: bool,
        flows_cut: usize,
    },
    /// Whether a claimed pod is enforced by the agent's programs, and if not, why.
    Enrollment {
        enforced: bool,
        detail: String,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("admin socket {path}: another agent is already serving it")]
    InUse { path: PathBuf },
    #[error("admin socket {path}: bad answer: {source}")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// A request and where its answer goes.
pub type Call = (Request, oneshot::Sender<Response>);

/// Fails when a live agent serves `path`: two agents must not share one.
pub fn ensure_free(path: &Path) -> Result<(), AdminError> {
    if path.exists() && StdUnixStream::connect(path).is_ok() {
        return Err(AdminError::InUse {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// Binds the socket, replacing a stale one but never one a live agent serves. The socket
/// appears only once the agent enforces: its existence is the readiness signal.
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let io = |source| AdminError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
    }
    ensure_free(path)?;
    if path.exists() {
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Serves connections, forwarding each request to the agent's core.
pub async fn serve(listener: UnixListener, core: mpsc::Sender<Call>) {
    // SAFETY: no preconditions.
    let me = unsafe { libc::geteuid() };
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let allowed = stream.peer_cred().map(|c| c.uid() == 0 || c.uid() == me);
        if !matches!(allowed, Ok(true)) {
            tracing::warn!(peer = ?stream.peer_cred().ok(), "admin connection refused: not root");
            continue;
        }
        let core = core.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, core).await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

async fn serve_one(stream: UnixStream, core: mpsc::Sender<Call>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = AsyncBufReader::new(read.take(MAX_REQUEST as u64)).lines();
    while let Some(line) = lines.next_line().await? {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let (tx, rx) = oneshot::channel();
                if core.send((req, tx)).await.is_err() {
                    Response::Error {
                        message: "the agent is shutting down".into(),
                    }
                } else {
                    rx.await.unwrap_or(Response::Error {
                        message: "the agent dropped the request".into(),
                    })
                }
            }
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
        out.push(b'\n');
        write.write_all(&out).await?;
    }
    Ok(())
}

/// Client side: one request, one answer.
pub fn call(path: &Path, request: &Request) -> Result<Response, AdminError> {
    call_with_timeout(path, request, Duration::from_secs(30))
}

/// [`call`], waiting at most `timeout` for the answer.
pub fn call_with_timeout(
    path: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Response, AdminError> {
    let io = |source| AdminError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = StdUnixStream::connect(path).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(request).map_err(|e| io(io::Error::other(e)))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|source| AdminError::Decode {
        path: path.to_owned(),
        source,
    })
}

//! A stand-in for the Kubernetes API server that speaks its real list/watch wire format over
//! HTTP/1.1, for testing the agent's Kubernetes watcher where no API server can run:
//!
//! - `GET /api/v1/pods`, `/api/v1/nodes`, `/api/v1/namespaces/{ns}/configmaps` (with
//!   `fieldSelector=metadata.name=…`): a `PodList`/`NodeList`/`ConfigMapList` whose
//!   `metadata.resourceVersion` is the current version;
//! - the same with `watch=true&resourceVersion=N`: a chunked stream of watch events (`ADDED`,
//!   `MODIFIED`, `DELETED` with the object, `BOOKMARK` every second when
//!   `allowWatchBookmarks=true`), ended after `timeoutSeconds`; a `resourceVersion` older than
//!   the last [`FakeApi::expire`] gets what a real API server sends after compaction: an
//!   `ERROR` event carrying a `Status` with code 410 (reason `Expired`).
//!
//! Objects are JSON values as a real server would return them (the test writes real Pod and
//! Node manifests); the server stamps `metadata.resourceVersion` and `metadata.uid`.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    Node,
    ConfigMap,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Pod => "Pod",
            Self::Node => "Node",
            Self::ConfigMap => "ConfigMap",
        }
    }
}

type Key = (Kind, String, String);

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// (resource version, kind, event type, object).
    events: Vec<(u64, Kind, &'static str, Value)>,
    /// Watches from a version below this are answered with 410 Gone.
    compacted_before: u64,
    /// Bumped by `expire`: open watches end with 410.
    epoch: u64,
    /// Request lines served, for the test to inspect.
    requests: Vec<String>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

/// The running server; stopped on drop.
pub struct FakeApi {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
    accept: Option<thread::JoinHandle<()>>,
}

impl FakeApi {
    /// Serves on `listener` (bound by the caller, possibly inside a node's network namespace).
    pub fn serve(listener: TcpListener) -> Result<Self> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 100,
                ..State::default()
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let accept = thread::spawn(move || {
            while !s.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let s = s.clone();
                        thread::spawn(move || {
                            let _ = handle(&s, conn);
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Self {
            shared,
            addr,
            accept: Some(accept),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates or replaces an object (ADDED or MODIFIED).
    pub fn apply(&self, kind: Kind, mut obj: Value) {
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("object without metadata.name")
            .to_owned();
        let mut st = self.shared.state.lock().expect("fake API state");
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        obj["metadata"]["uid"] = json!(format!("uid-{}-{ns}-{name}", kind.name()));
        obj["apiVersion"] = json!("v1");
        obj["kind"] = json!(kind.name());
        let key = (kind, ns, name);
        let kind_of_event = if st.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.objects.insert(key, obj.clone());
        st.events.push((rv, kind, kind_of_event, obj));
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Deletes an object (DELETED).
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut st = self.shared.state.lock().expect("fake API state");
        let Some(mut obj) = st
            .objects
            .remove(&(kind, namespace.to_owned(), name.to_owned()))
        else {
            return;
        };
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.events.push((rv, kind, "DELETED", obj));
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Compacts history: every open watch ends with 410 Gone, and so does any watch resumed
    /// from a version up to now, forcing clients to list again.
    pub fn expire(&self) {
        let mut st = self.shared.state.lock().expect("fake API state");
        st.compacted_before = st.rv + 1;
        st.epoch += 1;
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Request lines served so far.
    pub fn requests(&self) -> Vec<String> {
        self.shared
            .state
            .lock()
            .expect("fake API state")
            .requests
            .clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.changed.notify_all();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

struct Request {
    kind: Kind,
    namespace: Option<String>,
    query: BTreeMap<String, String>,
}

fn parse_target(target: &str) -> Option<Request> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_owned(), decode(v))
        })
        .collect();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (kind, namespace) = match parts.as_slice() {
        ["api", "v1", "pods"] => (Kind::Pod, None),
        ["api", "v1", "nodes"] => (Kind::Node, None),
        ["api", "v1", "namespaces", ns, "configmaps"] => (Kind::ConfigMap, Some((*ns).to_owned())),
        ["api", "v1", "namespaces", ns, "pods"] => (Kind::Pod, Some((*ns).to_owned())),
        _ => return None,
    };
    Some(Request {
        kind,
        namespace,
        query,
    })
}

/// Percent-decoding of a query value.
fn decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&v[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Request {
    fn selects(&self, kind: Kind, obj: &Value) -> bool {
        if kind != self.kind {
            return false;
        }
        if let Some(ns) = &self.namespace
            && obj["metadata"]["namespace"].as_str() != Some(ns.as_str())
        {
            return false;
        }
        if let Some(sel) = self.query.get("fieldSelector") {
            for term in sel.split(',').filter(|t| !t.is_empty()) {
                if let Some(name) = term.strip_prefix("metadata.name=")
                    && obj["metadata"]["name"].as_str() != Some(name)
                {
                    return false;
                }
            }
        }
        true
    }
}

fn handle(shared: &Shared, conn: TcpStream) -> Result<()> {
    conn.set_nonblocking(false)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let request_line = line.trim_end().to_owned();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    shared
        .state
        .lock()
        .expect("fake API state")
        .requests
        .push(request_line.clone());
    let mut conn = conn;
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let Some(req) = (method == "GET").then(|| parse_target(target)).flatten() else {
        let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                          "message": format!("not served: {request_line}"), "reason": "NotFound", "code": 404})
        .to_string();
        write!(
            conn,
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(());
    };
    let watch = matches!(
        req.query.get("watch").map(String::as_str),
        Some("true" | "1")
    );
    if watch {
        serve_watch(shared, &mut conn, &req)
    } else {
        serve_list(shared, &mut conn, &req)
    }
}

fn serve_list(shared: &Shared, conn: &mut TcpStream, req: &Request) -> Result<()> {
    let st = shared.state.lock().expect("fake API state");
    let items: Vec<&Value> = st
        .objects
        .iter()
        .filter(|((k, _, _), v)| req.selects(*k, v))
        .map(|(_, v)| v)
        .collect();
    let body = json!({
        "apiVersion": "v1",
        "kind": format!("{}List", req.kind.name()),
        "metadata": {"resourceVersion": st.rv.to_string()},
        "items": items,
    })
    .to_string();
    drop(st);
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

fn chunk(conn: &mut TcpStream, v: &Value) -> std::io::Result<()> {
    let line = format!("{v}\n");
    write!(conn, "{:x}\r\n{line}\r\n", line.len())?;
    conn.flush()
}

fn serve_watch(shared: &Shared, conn: &mut TcpStream, req: &Request) -> Result<()> {
    let mut from: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(30u64)
        .min(30);
    let bookmarks = req.query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}});
    let start = Instant::now();
    let mut last_bookmark = Instant::now();
    let mut st = shared.state.lock().expect("fake API state");
    if from < st.compacted_before && from != 0 {
        drop(st);
        chunk(conn, &gone)?;
        write!(conn, "0\r\n\r\n")?;
        return Ok(());
    }
    if from == 0 {
        from = st.rv;
    }
    let epoch = st.epoch;
    loop {
        if shared.stop.load(Ordering::Relaxed) || start.elapsed() >= Duration::from_secs(timeout) {
            break;
        }
        if st.epoch != epoch {
            drop(st);
            chunk(conn, &gone)?;
            write!(conn, "0\r\n\r\n")?;
            return Ok(());
        }
        let pending: Vec<Value> = st
            .events
            .iter()
            .filter(|(rv, k, _, obj)| *rv > from && req.selects(*k, obj))
            .map(|(_, _, t, obj)| json!({"type": t, "object": obj}))
            .collect();
        let head = st.rv;
        drop(st);
        for ev in &pending {
            chunk(conn, ev)?;
        }
        from = head;
        if bookmarks && last_bookmark.elapsed() >= Duration::from_secs(1) {
            chunk(
                conn,
                &json!({"type": "BOOKMARK", "object": {"kind": req.kind.name(), "apiVersion": "v1",
                        "metadata": {"resourceVersion": head.to_string()}}}),
            )?;
            last_bookmark = Instant::now();
        }
        st = shared.state.lock().expect("fake API state");
        if st.rv == head && st.epoch == epoch {
            st = shared
                .changed
                .wait_timeout(st, Duration::from_millis(200))
                .expect("fake API state")
                .0;
        }
    }
    drop(st);
    write!(conn, "0\r\n\r\n")?;
    Ok(())
}

/// Binds `addr` inside network namespace `netns` (from a thread that enters it, so the test
/// process itself stays where it is) and serves the fake API there.
pub fn serve_in_netns(netns: &str, addr: SocketAddr) -> Result<FakeApi> {
    let fd = crate::netns::open(netns)?;
    let listener = thread::spawn(move || -> Result<TcpListener> {
        crate::netns::setns(&fd).context("entering the namespace")?;
        TcpListener::bind(addr).with_context(|| format!("binding {addr}"))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the binding thread panicked"))??;
    FakeApi::serve(listener)
}

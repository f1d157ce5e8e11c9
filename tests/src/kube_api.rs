//! A stand-in for the Kubernetes API server that speaks its real list/watch wire format over
//! HTTP/1.1, for testing the agent's Kubernetes watcher where no API server can run:
//!
//! - `GET /api/v1/pods`, `/api/v1/nodes`, `/api/v1/namespaces/{ns}/configmaps`, and of the
//!   custom resources (group `portcullis.dev`, version `v1alpha1`)
//!   `/apis/portcullis.dev/v1alpha1/portcullispolicies` (every namespace's),
//!   `/apis/portcullis.dev/v1alpha1/namespaces/{ns}/portcullispolicies` and
//!   `/apis/portcullis.dev/v1alpha1/portcullisclusterpolicies` (with
//!   `fieldSelector=metadata.name=…`): a `PodList`/`NodeList`/`ConfigMapList`/
//!   `PortcullisPolicyList`/`PortcullisClusterPolicyList` of the kind's `apiVersion` (`v1`, or
//!   `portcullis.dev/v1alpha1`) whose `metadata.resourceVersion` is the current version;
//! - with `limit=N`, the list in pages, as the API server pages a list for a client that asks:
//!   each page carries at most N items and, but for the last, an opaque `continue` token and
//!   `remainingItemCount`; every page of one list shows the same snapshot, taken at the first
//!   page, with that page's `resourceVersion`. A `continue` token whose snapshot is older than
//!   the last [`FakeApi::expire`] gets `410 Gone` (reason `Expired`), as after an etcd
//!   compaction, and the client must list again from the start;
//! - the same with `watch=true&resourceVersion=N`: a chunked stream of watch events (`ADDED`,
//!   `MODIFIED`, `DELETED` with the object, `BOOKMARK` every second when
//!   `allowWatchBookmarks=true`, an object of the list's kind and `apiVersion` carrying only
//!   `metadata.resourceVersion`), ended after `timeoutSeconds`; a `resourceVersion` older than
//!   the last [`FakeApi::expire`] gets what a real API server sends after compaction: an
//!   `ERROR` event carrying a `Status` with code 410 (reason `Expired`);
//! - `GET /api/v1/namespaces/{ns}/pods/{name}` (and `/api/v1/nodes/{name}`,
//!   `/api/v1/namespaces/{ns}/configmaps/{name}`,
//!   `/apis/portcullis.dev/v1alpha1/namespaces/{ns}/portcullispolicies/{name}`,
//!   `/apis/portcullis.dev/v1alpha1/portcullisclusterpolicies/{name}`): the one object, or `404`
//!   with a `Status` of reason `NotFound` whose `details.kind` is the resource (and
//!   `details.group` the group, for a custom one, whose message then names it
//!   `portcullispolicies.portcullis.dev "name" not found`), as a client reading a bound pod's
//!   `spec.nodeName` gets it;
//! - `PUT /apis/portcullis.dev/v1alpha1/namespaces/{ns}/portcullispolicies/{name}/status` (and
//!   `/apis/portcullis.dev/v1alpha1/portcullisclusterpolicies/{name}/status`): a write of the
//!   status subresource, the whole object as the body (as kube-rs's `Api::replace_status`
//!   sends it), answered as the API server answers one for a custom resource. A body that is
//!   not a JSON object, names another `apiVersion` or `kind`, or whose `metadata.name` is not
//!   the path's (or whose `metadata.namespace` is another) gets `400` (reason `BadRequest`); an
//!   object the server does not hold, `404` (reason `NotFound`); a body whose
//!   `metadata.resourceVersion` (or `metadata.uid`) is set and is not the stored one, `409
//!   Conflict` (reason `Conflict`, `Operation cannot be fulfilled on
//!   portcullispolicies.portcullis.dev "name": the object has been modified; please apply your
//!   changes to the latest version and try again`, `details` naming `name`, `group` and the
//!   resource as `kind`). Otherwise only the stored `status` is replaced by the body's (removed,
//!   if the body has none): `spec`, `metadata` and `metadata.generation` stay, the object gets
//!   a new `resourceVersion` and a `MODIFIED` event, and the answer is `200 OK` with the object
//!   as stored. A write that changes nothing is `200 OK` with no new version and no event, as
//!   the API server skips a write of what is already stored;
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews`: `201 Created` with the `TokenReview`
//!   echoed back and its `status` filled in as the API server's service-account token
//!   authenticator fills it, for the tokens the test registered with [`FakeApi::add_token`] (see
//!   there for what each answer looks like); a body that is not a `TokenReview` gets `400` with a
//!   `Status` of reason `BadRequest`.
//!
//! Objects are JSON values as a real server would return them (the test writes real Pod and
//! Node manifests, or [`realistic_pod`] ones); the server stamps `metadata.resourceVersion`,
//! `metadata.uid`, `apiVersion` and `kind`, and treats a custom resource written with
//! [`FakeApi::apply`] as the API server treats one written through its main resource while the
//! status subresource is on (see [`FakeApi::apply_all`]): `metadata.generation` (1 on creation,
//! one more on each change of `spec`), a `metadata.creationTimestamp`, and no `status` but
//! what a status write put there. Any other method or path gets `404`.
//!
//! Each object is serialized once, when it is written: lists and watch events are assembled
//! from those bytes, so serving 100,000 objects costs copying them, not encoding them again per
//! request.

use std::{
    collections::{BTreeMap, VecDeque},
    io::{BufRead, BufReader, BufWriter, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
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
    /// `PortcullisPolicy` (`portcullis.dev/v1alpha1`, namespaced), a custom resource with the
    /// status subresource.
    Policy,
    /// `PortcullisClusterPolicy` (`portcullis.dev/v1alpha1`, cluster-scoped), a custom resource
    /// with the status subresource.
    ClusterPolicy,
}

/// The API group of the custom resources.
pub const POLICY_GROUP: &str = "portcullis.dev";

/// The `apiVersion` of the custom resources.
pub const POLICY_API_VERSION: &str = "portcullis.dev/v1alpha1";

impl Kind {
    /// The kind, as objects name it in their `kind` (and lists, with `List` appended).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Pod => "Pod",
            Self::Node => "Node",
            Self::ConfigMap => "ConfigMap",
            Self::Policy => "PortcullisPolicy",
            Self::ClusterPolicy => "PortcullisClusterPolicy",
        }
    }

    /// The resource, as the API server names it in paths and in a `NotFound` status.
    #[must_use]
    pub fn resource(self) -> &'static str {
        match self {
            Self::Pod => "pods",
            Self::Node => "nodes",
            Self::ConfigMap => "configmaps",
            Self::Policy => "portcullispolicies",
            Self::ClusterPolicy => "portcullisclusterpolicies",
        }
    }

    /// The `apiVersion` of its objects, lists and bookmarks.
    #[must_use]
    pub fn api_version(self) -> &'static str {
        match self {
            Self::Pod | Self::Node | Self::ConfigMap => "v1",
            Self::Policy | Self::ClusterPolicy => POLICY_API_VERSION,
        }
    }

    /// The API group: empty for the core group.
    fn group(self) -> &'static str {
        match self {
            Self::Pod | Self::Node | Self::ConfigMap => "",
            Self::Policy | Self::ClusterPolicy => POLICY_GROUP,
        }
    }

    /// The resource as the API server's errors name it: `pods`, but
    /// `portcullispolicies.portcullis.dev` for one of a group.
    fn qualified_resource(self) -> String {
        match self.group() {
            "" => self.resource().to_owned(),
            group => format!("{}.{group}", self.resource()),
        }
    }

    /// A custom resource, served with the status subresource: writes to the main resource
    /// leave `status` alone and count `metadata.generation`, writes to `/status` change only
    /// `status`.
    fn has_status_subresource(self) -> bool {
        matches!(self, Self::Policy | Self::ClusterPolicy)
    }

    /// Objects of a namespace, not of the cluster.
    fn namespaced(self) -> bool {
        matches!(self, Self::Pod | Self::ConfigMap | Self::Policy)
    }
}

/// The `metadata.uid` the server stamps on an object it is given, for a test to put in the
/// [`TokenFacts`] of a token bound to that object (a real token carries the bound pod's uid, and
/// an issuer compares the two).
#[must_use]
pub fn object_uid(kind: Kind, namespace: &str, name: &str) -> String {
    format!("uid-{}-{namespace}-{name}", kind.name())
}

/// What the API server knows of a service-account token it issued: who it names, for whom it
/// was minted (its `aud` claim), and the objects it is bound to. `TokenReview` answers with
/// these.
#[derive(Debug, Clone, Default)]
pub struct TokenFacts {
    pub namespace: String,
    pub service_account: String,
    /// The token's `aud` claim. Empty is a legacy (Secret) token, which the API server takes
    /// as minted for itself, [`API_AUDIENCE`].
    pub audiences: Vec<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    /// Reported only by API servers from 1.30 on (`ServiceAccountTokenPodNodeInfo`): `None`
    /// is an older cluster, whose reviews lack the node and leave a client to read the bound
    /// pod's `spec.nodeName`.
    pub node_name: Option<String>,
    pub node_uid: Option<String>,
}

/// The audience the API server identifies as (its `--api-audiences`, which default to the
/// service-account issuer; this is kubeadm's). A `TokenReview` without `spec.audiences` is
/// checked against it, so a token minted for another audience fails such a review: a client
/// that forgets its own audience is refused, not handed every pod's API token as valid.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// The path of the `TokenReview` collection (cluster-scoped: there is no namespaced one).
const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// The largest request body served, the API server's default (`--max-request-body-bytes`
/// unset): larger gets 413, as there.
const MAX_BODY: usize = 3 * 1024 * 1024;

/// A registered token: its facts and the `jti` claim it would carry, which reviews report as
/// its credential id.
struct Token {
    facts: TokenFacts,
    jti: String,
}

/// (kind, namespace, name): the order lists are served in, as the API server serves them in
/// key order.
type Key = (Kind, String, String);

/// A watch event, with its object already serialized.
struct Event {
    rv: u64,
    key: Key,
    kind_of_event: &'static str,
    object: Arc<str>,
}

/// The items of one list at the resource version of its first page, kept while its client
/// pages through it.
struct Snapshot {
    rv: u64,
    items: Arc<Vec<Arc<str>>>,
}

/// Lists paged through at once, at most (the oldest is forgotten beyond: its token then gets
/// 410, as an expired one does).
const MAX_SNAPSHOTS: usize = 64;

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Arc<str>>,
    /// In resource-version order.
    events: VecDeque<Event>,
    /// Watches from a version below this are answered with 410 Gone.
    compacted_before: u64,
    /// Bumped by `expire`: open watches end with 410.
    epoch: u64,
    snapshots: BTreeMap<u64, Snapshot>,
    next_snapshot: u64,
    /// Request lines served, for the test to inspect.
    requests: Vec<String>,
    /// Service-account tokens `TokenReview` knows, by token.
    tokens: BTreeMap<String, Token>,
    /// Tokens registered so far, numbering their `jti`s.
    tokens_issued: u64,
    /// The token of each review answered, in order, for the test to count.
    reviewed: Vec<String>,
    /// Writes to a `/status` subresource answered `200 OK`.
    status_writes: usize,
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
    /// One accepting thread per listener.
    accept: Vec<thread::JoinHandle<()>>,
}

/// Accepts on `listener` until `shared.stop`, one thread per connection.
fn accept_loop(shared: Arc<Shared>, listener: TcpListener) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        while !shared.stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, _)) => {
                    let s = shared.clone();
                    thread::spawn(move || {
                        let _ = handle(&s, conn);
                    });
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    })
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
        let accept = vec![accept_loop(shared.clone(), listener)];
        Ok(Self {
            shared,
            addr,
            accept,
        })
    }

    /// Serves the same objects on another listener too (one in another network namespace, so
    /// that clients on both sides see one API server); returns its address.
    pub fn also_serve(&mut self, listener: TcpListener) -> Result<SocketAddr> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        self.accept.push(accept_loop(self.shared.clone(), listener));
        Ok(addr)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().expect("fake API state")
    }

    /// Creates or replaces an object (ADDED or MODIFIED).
    pub fn apply(&self, kind: Kind, obj: Value) {
        self.apply_all(kind, std::iter::once(obj));
    }

    /// Creates or replaces many objects, each one event, under one lock.
    ///
    /// An object of a kind with the status subresource ([`Kind::Policy`],
    /// [`Kind::ClusterPolicy`]) is written as `kubectl apply` writes it through the main
    /// resource, and the API server treats it as it treats a custom resource's: created, it
    /// gets `metadata.generation` 1 and a `metadata.creationTimestamp` (now, unless given) and
    /// loses any `status`; replaced, it keeps the stored `status` (any given is dropped) and
    /// `creationTimestamp`, and its `generation` goes up by one only if something but its
    /// metadata (in practice, its `spec`) changed. A replacement identical to what is stored
    /// is no write, as on the API server: no new resource version, no event. A cluster-scoped
    /// one loses any `metadata.namespace`.
    pub fn apply_all(&self, kind: Kind, objs: impl IntoIterator<Item = Value>) {
        let mut st = self.lock();
        for mut obj in objs {
            if kind.has_status_subresource()
                && !kind.namespaced()
                && let Some(meta) = obj["metadata"].as_object_mut()
            {
                meta.remove("namespace");
            }
            let ns = obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            let name = obj["metadata"]["name"]
                .as_str()
                .expect("object without metadata.name")
                .to_owned();
            let key = (kind, ns, name);
            if kind.has_status_subresource() {
                let old: Option<Value> = st
                    .objects
                    .get(&key)
                    .map(|o| serde_json::from_str(o).expect("stored JSON"));
                obj["metadata"]["uid"] = json!(object_uid(kind, &key.1, &key.2));
                obj["apiVersion"] = json!(kind.api_version());
                obj["kind"] = json!(kind.name());
                match &old {
                    None => prepare_create(&mut obj),
                    Some(old) => {
                        prepare_update(&mut obj, old);
                        obj["metadata"]["resourceVersion"] =
                            old["metadata"]["resourceVersion"].clone();
                        if obj == *old {
                            continue;
                        }
                    }
                }
            }
            st.rv += 1;
            let rv = st.rv;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            obj["metadata"]["uid"] = json!(object_uid(kind, &key.1, &key.2));
            obj["apiVersion"] = json!(kind.api_version());
            obj["kind"] = json!(kind.name());
            let object: Arc<str> = obj.to_string().into();
            let kind_of_event = if st.objects.insert(key.clone(), object.clone()).is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            };
            st.events.push_back(Event {
                rv,
                key,
                kind_of_event,
                object,
            });
        }
        drop(st);
        self.shared.changed.notify_all();
    }

    /// The object the server holds, as it serves it: for a test to read back what a client
    /// wrote to its status.
    #[must_use]
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let key = (kind, namespace.to_owned(), name.to_owned());
        self.lock()
            .objects
            .get(&key)
            .map(|o| serde_json::from_str(o).expect("stored JSON"))
    }

    /// Deletes an object (DELETED).
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut st = self.lock();
        let key = (kind, namespace.to_owned(), name.to_owned());
        let Some(object) = st.objects.remove(&key) else {
            return;
        };
        st.rv += 1;
        let rv = st.rv;
        let mut obj: Value = serde_json::from_str(&object).expect("stored JSON");
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.events.push_back(Event {
            rv,
            key,
            kind_of_event: "DELETED",
            object: obj.to_string().into(),
        });
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Compacts history: every open watch ends with 410 Gone, and so does any watch resumed
    /// from a version up to now and any `continue` token of a list taken before now, forcing
    /// clients to list again.
    pub fn expire(&self) {
        let mut st = self.lock();
        st.compacted_before = st.rv + 1;
        st.epoch += 1;
        let before = st.compacted_before;
        st.snapshots.retain(|_, s| s.rv >= before);
        while st.events.front().is_some_and(|e| e.rv < before) {
            st.events.pop_front();
        }
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Request lines served so far (every method, status writes among them).
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// How many writes to a `/status` subresource were answered `200 OK` (one that changed
    /// nothing among them; those refused are not counted, but [`FakeApi::requests`] lists
    /// them).
    pub fn status_writes(&self) -> usize {
        self.lock().status_writes
    }

    /// How many objects of `kind` the server holds.
    pub fn count(&self, kind: Kind) -> usize {
        self.lock()
            .objects
            .keys()
            .filter(|(k, _, _)| *k == kind)
            .count()
    }

    /// Registers a service-account token (replacing what was registered under it), which a
    /// `TokenReview` then answers as the API server answers a token it issued:
    ///
    /// - a token not registered: `status: {"user": {}, "error": "[invalid bearer token, …]"}`
    ///   (no `authenticated`: the API server omits it when false);
    /// - a registered one none of whose audiences is among the review's `spec.audiences`
    ///   ([`API_AUDIENCE`] when the review names none): the same, with the error
    ///   `[invalid bearer token, token audiences ["a"] is invalid for the target audiences ["b"]]`;
    /// - otherwise `status: {"authenticated": true, "audiences": [the token's audiences that
    ///   were asked for], "user": {"username": "system:serviceaccount:<ns>:<sa>", "uid": …,
    ///   "groups": [...], "extra": {...}}}`, `extra` holding `authentication.kubernetes.io/`
    ///   `pod-name`, `pod-uid`, `node-name` and `node-uid` for those of `facts` that are set,
    ///   and always `credential-id` (`JTI=…`, unique to this registration).
    pub fn add_token(&self, token: &str, facts: TokenFacts) {
        let mut st = self.lock();
        st.tokens_issued += 1;
        let n = st.tokens_issued;
        // Shaped as the API server's jti, a random UUID.
        let jti = format!("7c0e5a2d-{:04x}-4b1f-8d3e-{n:012x}", n % 65_536);
        st.tokens.insert(token.to_owned(), Token { facts, jti });
    }

    /// Forgets a token, so reviews of it fail as of one never issued: what a test of a revoked
    /// token (its pod deleted, its service account recreated) needs, since the server does not
    /// tie tokens to the objects it holds.
    pub fn remove_token(&self, token: &str) {
        self.lock().tokens.remove(token);
    }

    /// How many `TokenReview`s were answered (bodies refused with 400 are not counted).
    pub fn reviews(&self) -> usize {
        self.lock().reviewed.len()
    }

    /// The token of each `TokenReview` answered, in order.
    pub fn reviewed_tokens(&self) -> Vec<String> {
        self.lock().reviewed.clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.changed.notify_all();
        for t in self.accept.drain(..) {
            let _ = t.join();
        }
    }
}

/// What the API server does to a custom resource created through its main resource
/// (`PrepareForCreate` of its strategy, with the status subresource on, and the system fields):
/// no `status`, `generation` 1, a creation time.
fn prepare_create(obj: &mut Value) {
    if let Some(o) = obj.as_object_mut() {
        o.remove("status");
    }
    obj["metadata"]["generation"] = json!(1);
    if obj["metadata"]["creationTimestamp"].is_null() {
        obj["metadata"]["creationTimestamp"] = json!(rfc3339(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        ));
    }
}

/// What the API server does to a custom resource that replaces `old` through its main resource
/// (`PrepareForUpdate` of its strategy, with the status subresource on, and `BeforeUpdate`):
/// the stored `status` stays (or stays absent), `generation` is the stored one, one more if
/// anything but metadata changed, and `creationTimestamp` is the stored one.
fn prepare_update(obj: &mut Value, old: &Value) {
    if let Some(o) = obj.as_object_mut() {
        match old.get("status") {
            Some(status) => {
                o.insert("status".to_owned(), status.clone());
            }
            None => {
                o.remove("status");
            }
        }
    }
    let but_metadata = |v: &Value| -> serde_json::Map<String, Value> {
        v.as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.as_str() != "metadata")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
    let changed = but_metadata(obj) != but_metadata(old);
    obj["metadata"]["generation"] = json!(generation + i64::from(changed));
    if !old["metadata"]["creationTimestamp"].is_null() {
        obj["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
    }
}

/// `secs` after the epoch in RFC 3339, as the API server writes a `metav1.Time`:
/// `2026-12-02T00:00:00Z`.
fn rfc3339(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm), counting eras from 0000-03-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

struct Request {
    kind: Kind,
    namespace: Option<String>,
    query: BTreeMap<String, String>,
}

/// What a request asks for.
enum Route {
    /// A list or a watch.
    Collection(Request),
    /// One object.
    Object(Key),
    TokenReview,
    /// A write of an object's status subresource.
    Status(Key),
}

fn route(method: &str, target: &str) -> Option<Route> {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let key = |kind, ns: &str, name: &str| (kind, ns.to_owned(), name.to_owned());
    match method {
        "POST" if path.trim_end_matches('/') == TOKEN_REVIEWS => Some(Route::TokenReview),
        "GET" => {
            let one = |kind, ns: &str, name: &str| Some(Route::Object(key(kind, ns, name)));
            match parts.as_slice() {
                ["api", "v1", "nodes", name] => one(Kind::Node, "", name),
                ["api", "v1", "namespaces", ns, "pods", name] => one(Kind::Pod, ns, name),
                ["api", "v1", "namespaces", ns, "configmaps", name] => {
                    one(Kind::ConfigMap, ns, name)
                }
                [
                    "apis",
                    "portcullis.dev",
                    "v1alpha1",
                    "namespaces",
                    ns,
                    "portcullispolicies",
                    name,
                ] => one(Kind::Policy, ns, name),
                [
                    "apis",
                    "portcullis.dev",
                    "v1alpha1",
                    "portcullisclusterpolicies",
                    name,
                ] => one(Kind::ClusterPolicy, "", name),
                _ => parse_target(target).map(Route::Collection),
            }
        }
        "PUT" => match parts.as_slice() {
            [
                "apis",
                "portcullis.dev",
                "v1alpha1",
                "namespaces",
                ns,
                "portcullispolicies",
                name,
                "status",
            ] => Some(Route::Status(key(Kind::Policy, ns, name))),
            [
                "apis",
                "portcullis.dev",
                "v1alpha1",
                "portcullisclusterpolicies",
                name,
                "status",
            ] => Some(Route::Status(key(Kind::ClusterPolicy, "", name))),
            _ => None,
        },
        _ => None,
    }
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
        ["apis", "portcullis.dev", "v1alpha1", "portcullispolicies"] => (Kind::Policy, None),
        [
            "apis",
            "portcullis.dev",
            "v1alpha1",
            "namespaces",
            ns,
            "portcullispolicies",
        ] => (Kind::Policy, Some((*ns).to_owned())),
        [
            "apis",
            "portcullis.dev",
            "v1alpha1",
            "portcullisclusterpolicies",
        ] => (Kind::ClusterPolicy, None),
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
    fn selects(&self, (kind, ns, name): &Key) -> bool {
        if *kind != self.kind {
            return false;
        }
        if let Some(want) = &self.namespace
            && want != ns
        {
            return false;
        }
        if let Some(sel) = self.query.get("fieldSelector") {
            for term in sel.split(',').filter(|t| !t.is_empty()) {
                if let Some(want) = term.strip_prefix("metadata.name=")
                    && want != name
                {
                    return false;
                }
            }
        }
        true
    }
}

/// What a request's headers say of its body.
#[derive(Default)]
struct Framing {
    content_length: Option<usize>,
    chunked: bool,
    /// `Expect: 100-continue`: the client (curl, for a body over 1 KiB, as a review of a real
    /// token is) waits for a go-ahead before sending the body.
    expect_continue: bool,
}

fn handle(shared: &Shared, conn: TcpStream) -> Result<()> {
    conn.set_nonblocking(false)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let request_line = line.trim_end().to_owned();
    let mut framing = Framing::default();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        let Some((name, value)) = h.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => framing.content_length = value.parse().ok(),
            "transfer-encoding" => framing.chunked = value.eq_ignore_ascii_case("chunked"),
            "expect" => framing.expect_continue = value.eq_ignore_ascii_case("100-continue"),
            _ => {}
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
    let Some(route) = route(method, target) else {
        let body = status_body(404, "NotFound", &format!("not served: {request_line}"));
        return respond(&mut conn, "404 Not Found", &[body.as_bytes()]);
    };
    match route {
        Route::Collection(req) => {
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
        Route::Object(key) => serve_object(shared, &mut conn, &key),
        Route::TokenReview => {
            let Some(body) = read_body(&mut reader, &mut conn, &framing)? else {
                return respond_too_large(&mut conn);
            };
            serve_token_review(shared, &mut conn, &body)
        }
        Route::Status(key) => {
            let Some(body) = read_body(&mut reader, &mut conn, &framing)? else {
                return respond_too_large(&mut conn);
            };
            serve_status_write(shared, &mut conn, &key, &body)
        }
    }
}

/// The API server's answer to a body over [`MAX_BODY`].
fn respond_too_large(conn: &mut TcpStream) -> Result<()> {
    let body = status_body(
        413,
        "RequestEntityTooLarge",
        &format!("Request entity too large: limit is {MAX_BODY}"),
    );
    respond(conn, "413 Request Entity Too Large", &[body.as_bytes()])
}

/// The request's body, by `Content-Length` or in chunks; `None` past [`MAX_BODY`].
fn read_body(
    reader: &mut BufReader<TcpStream>,
    conn: &mut TcpStream,
    framing: &Framing,
) -> Result<Option<Vec<u8>>> {
    if framing.content_length.is_some_and(|n| n > MAX_BODY) {
        return Ok(None);
    }
    if framing.expect_continue && (framing.chunked || framing.content_length.is_some()) {
        conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let mut body = Vec::new();
    if framing.chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            // A size may carry extensions after `;`, which mean nothing here.
            let hex = size.split(';').next().unwrap_or("").trim();
            let n = usize::from_str_radix(hex, 16)
                .with_context(|| format!("chunk size {:?}", size.trim_end()))?;
            if n == 0 {
                // Trailers, up to the empty line.
                loop {
                    let mut t = String::new();
                    if reader.read_line(&mut t)? == 0 || t.trim_end().is_empty() {
                        return Ok(Some(body));
                    }
                }
            }
            if body.len() + n > MAX_BODY {
                return Ok(None);
            }
            let start = body.len();
            body.resize(start + n, 0);
            std::io::Read::read_exact(reader, &mut body[start..])?;
            let mut crlf = String::new();
            reader.read_line(&mut crlf)?;
        }
    }
    if let Some(n) = framing.content_length {
        body.resize(n, 0);
        std::io::Read::read_exact(reader, &mut body)?;
    }
    Ok(Some(body))
}

fn serve_object(shared: &Shared, conn: &mut TcpStream, key: &Key) -> Result<()> {
    let object = shared
        .state
        .lock()
        .expect("fake API state")
        .objects
        .get(key)
        .cloned();
    if let Some(object) = object {
        return respond(conn, "200 OK", &[object.as_bytes()]);
    }
    let (kind, _, name) = key;
    let body = not_found(*kind, name);
    respond(conn, "404 Not Found", &[body.as_bytes()])
}

/// The `Status` of reason `NotFound` the API server answers for an object it does not hold.
fn not_found(kind: Kind, name: &str) -> String {
    let mut details = json!({"name": name, "kind": kind.resource()});
    if !kind.group().is_empty() {
        details["group"] = json!(kind.group());
    }
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{} \"{name}\" not found", kind.qualified_resource()),
        "reason": "NotFound", "details": details, "code": 404})
    .to_string()
}

/// Why the API server refuses a write from a client that read an older version
/// (`OptimisticLockErrorMsg`).
const OPTIMISTIC_LOCK: &str =
    "the object has been modified; please apply your changes to the latest version and try again";

/// The `Status` of reason `Conflict` the API server answers for a write whose precondition
/// (`resourceVersion`, `uid`) the stored object does not meet.
fn conflict(kind: Kind, name: &str, why: &str) -> String {
    let mut details = json!({"name": name, "kind": kind.resource()});
    if !kind.group().is_empty() {
        details["group"] = json!(kind.group());
    }
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("Operation cannot be fulfilled on {} \"{name}\": {why}",
            kind.qualified_resource()),
        "reason": "Conflict", "details": details, "code": 409})
    .to_string()
}

/// Answers a write of `key`'s status subresource as the API server does for a custom resource:
/// checks the body (see [`parse_status_write`]), then, with the stored object, its `uid` and
/// `resourceVersion` when given, and replaces the stored `status` with the body's (or removes
/// it, if the body has none), leaving the rest of the object alone. `200 OK` with the object
/// as stored; a write that changes nothing makes no new version and no event.
fn serve_status_write(shared: &Shared, conn: &mut TcpStream, key: &Key, body: &[u8]) -> Result<()> {
    let (kind, namespace, name) = key;
    let given = match parse_status_write(*kind, namespace, name, body) {
        Ok(given) => given,
        Err(message) => {
            let body = status_body(400, "BadRequest", &message);
            return respond(conn, "400 Bad Request", &[body.as_bytes()]);
        }
    };
    let mut st = shared.state.lock().expect("fake API state");
    let Some(stored) = st.objects.get(key).cloned() else {
        drop(st);
        return respond(conn, "404 Not Found", &[not_found(*kind, name).as_bytes()]);
    };
    let old: Value = serde_json::from_str(&stored).expect("stored JSON");
    let meta = &given["metadata"];
    let refusal = match (meta["uid"].as_str(), meta["resourceVersion"].as_str()) {
        (Some(uid), _) if !uid.is_empty() && old["metadata"]["uid"] != uid => Some(format!(
            "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
            old["metadata"]["uid"].as_str().unwrap_or_default()
        )),
        (_, Some(rv)) if !rv.is_empty() && old["metadata"]["resourceVersion"] != rv => {
            Some(OPTIMISTIC_LOCK.to_owned())
        }
        _ => None,
    };
    if let Some(why) = refusal {
        drop(st);
        let body = conflict(*kind, name, &why);
        return respond(conn, "409 Conflict", &[body.as_bytes()]);
    }
    st.status_writes += 1;
    let mut obj = old.clone();
    if let Some(o) = obj.as_object_mut() {
        match given.get("status") {
            Some(status) => {
                o.insert("status".to_owned(), status.clone());
            }
            None => {
                o.remove("status");
            }
        }
    }
    if obj == old {
        drop(st);
        return respond(conn, "200 OK", &[stored.as_bytes()]);
    }
    st.rv += 1;
    let rv = st.rv;
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    let object: Arc<str> = obj.to_string().into();
    st.objects.insert(key.clone(), object.clone());
    st.events.push_back(Event {
        rv,
        key: key.clone(),
        kind_of_event: "MODIFIED",
        object: object.clone(),
    });
    drop(st);
    shared.changed.notify_all();
    respond(conn, "200 OK", &[object.as_bytes()])
}

/// The body of a status write, checked as the API server's update handler checks one before it
/// reads the stored object, each failure a message for a `400`: JSON of an object, whose
/// `apiVersion` and `kind`, when present, are the endpoint's, whose `metadata.name` is the
/// path's, and whose `metadata.namespace`, when present, is the path's (ignored for a
/// cluster-scoped kind).
fn parse_status_write(
    kind: Kind,
    namespace: &str,
    name: &str,
    body: &[u8],
) -> Result<Value, String> {
    let obj: Value = serde_json::from_slice(body)
        .map_err(|e| format!("couldn't get version/kind; json parse error: {e}"))?;
    if !obj.is_object() {
        return Err("couldn't get version/kind; json parse error: not an object".to_owned());
    }
    if let Some(v) = obj.get("apiVersion")
        && v != kind.api_version()
    {
        return Err(format!(
            "the API version in the data ({}) does not match the expected API version ({})",
            v.as_str().unwrap_or_default(),
            kind.api_version()
        ));
    }
    if let Some(k) = obj.get("kind")
        && k != kind.name()
    {
        return Err(format!(
            "the kind in the data ({}) does not match the expected kind ({})",
            k.as_str().unwrap_or_default(),
            kind.name()
        ));
    }
    let meta = match obj.get("metadata") {
        None | Some(Value::Null) => &json!({}),
        Some(m @ Value::Object(_)) => m,
        Some(_) => {
            return Err(
                "json: cannot unmarshal into Go struct field .metadata of type v1.ObjectMeta"
                    .to_owned(),
            );
        }
    };
    for field in ["name", "namespace", "uid", "resourceVersion"] {
        if !matches!(meta.get(field), None | Some(Value::Null | Value::String(_))) {
            return Err(format!(
                "json: cannot unmarshal into Go struct field ObjectMeta.metadata.{field} of type string"
            ));
        }
    }
    if kind.namespaced() {
        let given = meta["namespace"].as_str().unwrap_or_default();
        if !given.is_empty() && given != namespace {
            return Err(
                "the namespace of the provided object does not match the namespace sent on the request"
                    .to_owned(),
            );
        }
    }
    let given = meta["name"].as_str().unwrap_or_default();
    if given != name {
        return Err(format!(
            "the name of the object ({given}) does not match the name on the URL ({name})"
        ));
    }
    Ok(obj)
}

/// Answers a `TokenReview` as the API server does: the object echoed back (its `spec` as the
/// server decoded it: `token` and `audiences`, nothing else) with `status` filled in, and
/// `201 Created`, since a review is created (though never stored).
fn serve_token_review(shared: &Shared, conn: &mut TcpStream, body: &[u8]) -> Result<()> {
    let (token, audiences, metadata) = match parse_token_review(body) {
        Ok(review) => review,
        Err(message) => {
            let body = status_body(400, "BadRequest", &message);
            return respond(conn, "400 Bad Request", &[body.as_bytes()]);
        }
    };
    let status = {
        let mut st = shared.state.lock().expect("fake API state");
        st.reviewed.push(token.clone());
        review_status(st.tokens.get(&token), &audiences)
    };
    let mut spec = json!({"token": token});
    if !audiences.is_empty() {
        spec["audiences"] = json!(audiences);
    }
    let answer = json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
        "metadata": metadata, "spec": spec, "status": status})
    .to_string();
    respond(conn, "201 Created", &[answer.as_bytes()])
}

/// A review's token, `spec.audiences` and `metadata`, or the message of the API server's 400.
fn parse_token_review(body: &[u8]) -> Result<(String, Vec<String>, Value), String> {
    let review: Value = serde_json::from_slice(body)
        .map_err(|e| format!("couldn't get version/kind; json parse error: {e}"))?;
    if !review.is_object() {
        return Err("couldn't get version/kind; json parse error: not an object".to_owned());
    }
    // Absent, they are the endpoint's, as the API server defaults them; present, they must be.
    if let Some(v) = review.get("apiVersion")
        && v != "authentication.k8s.io/v1"
    {
        return Err(format!(
            "the API version in the data ({}) does not match the expected API version (authentication.k8s.io/v1)",
            v.as_str().unwrap_or_default()
        ));
    }
    if let Some(k) = review.get("kind")
        && k != "TokenReview"
    {
        return Err(format!(
            "the kind in the data ({}) does not match the expected kind (TokenReview)",
            k.as_str().unwrap_or_default()
        ));
    }
    let spec = &review["spec"];
    let token = match &spec["token"] {
        Value::Null => String::new(),
        Value::String(t) => t.clone(),
        _ => return Err(
            "json: cannot unmarshal into Go struct field TokenReviewSpec.spec.token of type string"
                .to_owned(),
        ),
    };
    if token.is_empty() {
        return Err("token is required for TokenReview in authentication".to_owned());
    }
    let audiences = match &spec["audiences"] {
        Value::Null => Vec::new(),
        Value::Array(a) => a
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or("json: cannot unmarshal into Go struct field TokenReviewSpec.spec.audiences of type string")?,
        _ => return Err("json: cannot unmarshal into Go struct field TokenReviewSpec.spec.audiences of type []string".to_owned()),
    };
    let mut metadata = match review.get("metadata") {
        Some(m @ Value::Object(_)) => m.clone(),
        _ => json!({}),
    };
    // A `metav1.Time` that is zero still encodes, as null.
    if metadata.get("creationTimestamp").is_none() {
        metadata["creationTimestamp"] = Value::Null;
    }
    Ok((token, audiences, metadata))
}

/// The `status` of a review of `token` (`None`: not one the server issued) for the target
/// `audiences`, as the service-account authenticator reports it. A failed review has no
/// `authenticated` (false is omitted on the wire) and an empty `user`.
fn review_status(token: Option<&Token>, audiences: &[String]) -> Value {
    let Some(Token { facts, jti }) = token else {
        // What a token not signed by the cluster's key gets.
        return json!({"user": {},
            "error": "[invalid bearer token, go-jose/go-jose: error in cryptographic primitive]"});
    };
    let api = [API_AUDIENCE.to_owned()];
    let target = if audiences.is_empty() {
        &api[..]
    } else {
        audiences
    };
    let minted_for = if facts.audiences.is_empty() {
        &api[..]
    } else {
        &facts.audiences[..]
    };
    // In the token's order, as the API server intersects.
    let granted: Vec<&String> = minted_for.iter().filter(|a| target.contains(a)).collect();
    if granted.is_empty() {
        return json!({"user": {}, "error": format!(
            "[invalid bearer token, token audiences {} is invalid for the target audiences {}]",
            go_quoted(minted_for),
            go_quoted(target)
        )});
    }
    let ns = &facts.namespace;
    let mut extra = serde_json::Map::new();
    for (key, fact) in [
        ("pod-name", &facts.pod_name),
        ("pod-uid", &facts.pod_uid),
        ("node-name", &facts.node_name),
        ("node-uid", &facts.node_uid),
    ] {
        if let Some(v) = fact {
            extra.insert(format!("authentication.kubernetes.io/{key}"), json!([v]));
        }
    }
    extra.insert(
        "authentication.kubernetes.io/credential-id".to_owned(),
        json!([format!("JTI={jti}")]),
    );
    json!({
        "authenticated": true,
        "audiences": granted,
        "user": {
            "username": format!("system:serviceaccount:{ns}:{}", facts.service_account),
            "uid": format!("uid-ServiceAccount-{ns}-{}", facts.service_account),
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"),
                       "system:authenticated"],
            "extra": extra,
        }
    })
}

/// Strings as Go's `%q` prints a `[]string`, which the API server's audience error uses:
/// `["a" "b"]`.
fn go_quoted(strings: &[String]) -> String {
    let quoted: Vec<String> = strings.iter().map(|s| json!(s).to_string()).collect();
    format!("[{}]", quoted.join(" "))
}

/// A `Status` object, as the API server answers a failed request.
fn status_body(code: u16, reason: &str, message: &str) -> String {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
    .to_string()
}

/// A complete response whose body is `parts`, written without joining them first.
fn respond(conn: &mut TcpStream, status: &str, parts: &[&[u8]]) -> Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut w = BufWriter::with_capacity(1 << 16, conn);
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    )?;
    for p in parts {
        w.write_all(p)?;
    }
    w.flush()?;
    Ok(())
}

/// A `continue` token: opaque to clients, like the API server's (base64 of a small JSON
/// document there; hex here).
fn continue_token(snapshot: u64, rv: u64, offset: usize) -> String {
    json!({"v": "meta.k8s.io/v1", "rv": rv, "snapshot": snapshot, "offset": offset})
        .to_string()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn parse_continue(token: &str) -> Option<(u64, usize)> {
    let bytes: Vec<u8> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect::<Option<_>>()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    Some((
        v["snapshot"].as_u64()?,
        usize::try_from(v["offset"].as_u64()?).ok()?,
    ))
}

fn serve_list(shared: &Shared, conn: &mut TcpStream, req: &Request) -> Result<()> {
    let limit: Option<usize> = req
        .query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0);
    let mut st = shared.state.lock().expect("fake API state");
    let (snapshot, rv, items, offset) = match req.query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let Some((id, offset)) = parse_continue(token) else {
                drop(st);
                let body = status_body(400, "BadRequest", "invalid continue token");
                return respond(conn, "400 Bad Request", &[body.as_bytes()]);
            };
            match st.snapshots.get(&id) {
                Some(s) if s.rv >= st.compacted_before => (id, s.rv, s.items.clone(), offset),
                _ => {
                    drop(st);
                    let body = status_body(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    );
                    return respond(conn, "410 Gone", &[body.as_bytes()]);
                }
            }
        }
        None => {
            let items: Arc<Vec<Arc<str>>> = Arc::new(
                st.objects
                    .iter()
                    .filter(|(k, _)| req.selects(k))
                    .map(|(_, v)| v.clone())
                    .collect(),
            );
            let id = st.next_snapshot;
            st.next_snapshot += 1;
            (id, st.rv, items, 0)
        }
    };
    let end = limit.map_or(items.len(), |l| (offset + l).min(items.len()));
    let more = end < items.len();
    if more {
        st.snapshots.insert(
            snapshot,
            Snapshot {
                rv,
                items: items.clone(),
            },
        );
        while st.snapshots.len() > MAX_SNAPSHOTS {
            st.snapshots.pop_first();
        }
    } else {
        st.snapshots.remove(&snapshot);
    }
    drop(st);
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if more {
        meta["continue"] = json!(continue_token(snapshot, rv, end));
        meta["remainingItemCount"] = json!(items.len() - end);
    }
    let head = format!(
        "{{\"apiVersion\":\"{}\",\"kind\":\"{}List\",\"metadata\":{meta},\"items\":[",
        req.kind.api_version(),
        req.kind.name()
    );
    let page = &items[offset.min(end)..end];
    let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * page.len() + 2);
    parts.push(head.as_bytes());
    for (i, item) in page.iter().enumerate() {
        if i > 0 {
            parts.push(b",");
        }
        parts.push(item.as_bytes());
    }
    parts.push(b"]}");
    respond(conn, "200 OK", &parts)
}

fn chunk(w: &mut impl Write, parts: &[&[u8]]) -> std::io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum::<usize>() + 1;
    write!(w, "{len:x}\r\n")?;
    for p in parts {
        w.write_all(p)?;
    }
    w.write_all(b"\n\r\n")
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
    let mut w = BufWriter::with_capacity(1 << 16, conn);
    write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    w.flush()?;
    let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}})
    .to_string();
    let start = Instant::now();
    let mut last_bookmark = Instant::now();
    let mut st = shared.state.lock().expect("fake API state");
    if from < st.compacted_before && from != 0 {
        drop(st);
        chunk(&mut w, &[gone.as_bytes()])?;
        write!(w, "0\r\n\r\n")?;
        w.flush()?;
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
            chunk(&mut w, &[gone.as_bytes()])?;
            write!(w, "0\r\n\r\n")?;
            w.flush()?;
            return Ok(());
        }
        let first = st.events.partition_point(|e| e.rv <= from);
        let pending: Vec<(&'static str, Arc<str>)> = st
            .events
            .range(first..)
            .filter(|e| req.selects(&e.key))
            .map(|e| (e.kind_of_event, e.object.clone()))
            .collect();
        let head = st.rv;
        drop(st);
        for (t, obj) in &pending {
            chunk(
                &mut w,
                &[
                    b"{\"type\":\"",
                    t.as_bytes(),
                    b"\",\"object\":",
                    obj.as_bytes(),
                    b"}",
                ],
            )?;
        }
        from = head;
        if bookmarks && last_bookmark.elapsed() >= Duration::from_secs(1) {
            let bookmark =
                json!({"type": "BOOKMARK", "object": {"kind": req.kind.name(), "apiVersion": req.kind.api_version(),
                    "metadata": {"resourceVersion": head.to_string()}}})
                .to_string();
            chunk(&mut w, &[bookmark.as_bytes()])?;
            last_bookmark = Instant::now();
        }
        w.flush()?;
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
    write!(w, "0\r\n\r\n")?;
    w.flush()?;
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

/// A Node as a kubelet registers it: addresses, pod CIDRs (the first also as `podCIDR`),
/// capacity, conditions and node info.
pub fn realistic_node(name: &str, ip: IpAddr, pod_cidrs: &[&str]) -> Value {
    let pod_cidr = pod_cidrs.first().copied().unwrap_or_default();
    json!({
        "metadata": {
            "name": name,
            "labels": {
                "beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux", "node.kubernetes.io/instance-type": "m6i.xlarge",
                "topology.kubernetes.io/region": "eu-west-1", "topology.kubernetes.io/zone": "eu-west-1a"
            },
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true"
            },
            "creationTimestamp": "2026-11-01T08:00:00Z"
        },
        "spec": {"podCIDR": pod_cidr, "podCIDRs": pod_cidrs, "providerID": format!("aws:///eu-west-1a/i-{name}")},
        "status": {
            "addresses": [{"type": "InternalIP", "address": ip.to_string()},
                          {"type": "Hostname", "address": name}],
            "allocatable": {"cpu": "3920m", "ephemeral-storage": "95551679124", "memory": "15225564Ki", "pods": "110"},
            "capacity": {"cpu": "4", "ephemeral-storage": "103609152Ki", "memory": "16318684Ki", "pods": "110"},
            "conditions": [
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory",
                 "lastHeartbeatTime": "2026-11-23T10:00:00Z", "lastTransitionTime": "2026-11-01T08:00:00Z",
                 "message": "kubelet has sufficient memory available"},
                {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "lastHeartbeatTime": "2026-11-23T10:00:00Z", "lastTransitionTime": "2026-11-01T08:01:00Z",
                 "message": "kubelet is posting ready status"}
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"architecture": "amd64", "bootID": "3f0c1f5e-2b6e-4c63-9a55-0f0a1b2c3d4e",
                         "containerRuntimeVersion": "containerd://1.7.22", "kernelVersion": "6.18.0",
                         "kubeProxyVersion": "v1.33.2", "kubeletVersion": "v1.33.2",
                         "machineID": "ec2a1b2c3d4e5f60718293a4b5c6d7e8", "operatingSystem": "linux",
                         "osImage": "Debian GNU/Linux 12 (bookworm)", "systemUUID": "ec2a1b2c-3d4e-5f60-7182-93a4b5c6d7e8"}
        }
    })
}

/// A Pod as the API server returns it for a Deployment's replica: labels, annotations, owner
/// reference, managed fields of three managers, a container with environment, resources,
/// probes and volume mounts, volumes, tolerations, and a full status — about 4 KB of JSON, the
/// size of pods on real clusters. `i` varies the names and hashes.
pub fn realistic_pod(
    name: &str,
    namespace: &str,
    node: &str,
    service_account: &str,
    ips: &[IpAddr],
    i: usize,
) -> Value {
    let app = service_account;
    let hash = format!(
        "{:010x}",
        (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 24
    );
    let uid = format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        i,
        i % 65_536,
        i % 4096,
        i % 4096,
        i
    );
    let ips_json: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
    let first_ip = ips.first().map(ToString::to_string).unwrap_or_default();
    json!({
        "metadata": {
            "name": name,
            "generateName": format!("{app}-{hash}-"),
            "namespace": namespace,
            "creationTimestamp": "2026-11-23T09:30:00Z",
            "labels": {"app": app, "app.kubernetes.io/name": app, "app.kubernetes.io/part-of": "shop",
                       "pod-template-hash": hash, "version": "v1"},
            "annotations": {
                "kubectl.kubernetes.io/restartedAt": "2026-11-20T12:00:00Z",
                "prometheus.io/port": "9090", "prometheus.io/scrape": "true"
            },
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-{hash}"),
                                 "uid": uid, "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                 "time": "2026-11-23T09:30:00Z", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}, "f:pod-template-hash": {}, "f:version": {}},
                                             "f:ownerReferences": {".": {}, "k:{\"uid\":\"0\"}": {}}},
                              "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {".": {}, "f:env": {".": {}, "k:{\"name\":\"LOG_LEVEL\"}": {".": {}, "f:name": {}, "f:value": {}}},
                                                                                  "f:image": {}, "f:imagePullPolicy": {}, "f:livenessProbe": {}, "f:name": {},
                                                                                  "f:ports": {}, "f:readinessProbe": {}, "f:resources": {}, "f:volumeMounts": {}}},
                                         "f:dnsPolicy": {}, "f:enableServiceLinks": {}, "f:restartPolicy": {}, "f:schedulerName": {},
                                         "f:securityContext": {}, "f:serviceAccount": {}, "f:serviceAccountName": {},
                                         "f:terminationGracePeriodSeconds": {}, "f:volumes": {}}}},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": "2026-11-23T09:30:05Z",
                 "fieldsType": "FieldsV1", "subresource": "status",
                 "fieldsV1": {"f:status": {"f:conditions": {"k:{\"type\":\"ContainersReady\"}": {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}},
                                                            "k:{\"type\":\"Initialized\"}": {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}},
                                                            "k:{\"type\":\"Ready\"}": {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}}},
                                           "f:containerStatuses": {}, "f:hostIP": {}, "f:hostIPs": {}, "f:phase": {}, "f:podIP": {},
                                           "f:podIPs": {".": {}, "k:{\"ip\":\"0\"}": {".": {}, "f:ip": {}}}, "f:startTime": {}}}},
                {"manager": "kubectl-rollout", "operation": "Update", "apiVersion": "v1", "time": "2026-11-20T12:00:00Z",
                 "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/restartedAt": {}}}}}
            ]
        },
        "spec": {
            "containers": [{
                "name": "app",
                "image": format!("registry.invalid/shop/{app}:1.42.{}", i % 7),
                "imagePullPolicy": "IfNotPresent",
                "args": ["--listen=:8080", "--metrics=:9090"],
                "env": [{"name": "LOG_LEVEL", "value": "info"},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}],
                "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"},
                          {"containerPort": 9090, "name": "metrics", "protocol": "TCP"}],
                "resources": {"limits": {"cpu": "500m", "memory": "256Mi"}, "requests": {"cpu": "100m", "memory": "128Mi"}},
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"},
                                  "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"},
                                   "periodSeconds": 5, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                "volumeMounts": [{"mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "name": format!("kube-api-access-{hash}"), "readOnly": true}]
            }],
            "dnsPolicy": "ClusterFirst", "enableServiceLinks": true, "nodeName": node,
            "preemptionPolicy": "PreemptLowerPriority", "priority": 0, "restartPolicy": "Always",
            "schedulerName": "default-scheduler", "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "serviceAccount": service_account, "serviceAccountName": service_account,
            "terminationGracePeriodSeconds": 30,
            "tolerations": [{"effect": "NoExecute", "key": "node.kubernetes.io/not-ready", "operator": "Exists", "tolerationSeconds": 300},
                            {"effect": "NoExecute", "key": "node.kubernetes.io/unreachable", "operator": "Exists", "tolerationSeconds": 300}],
            "volumes": [{"name": format!("kube-api-access-{hash}"),
                         "projected": {"defaultMode": 420, "sources": [
                             {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                             {"configMap": {"items": [{"key": "ca.crt", "path": "ca.crt"}], "name": "kube-root-ca.crt"}},
                             {"downwardAPI": {"items": [{"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}, "path": "namespace"}]}}]}}]
        },
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "Initialized", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2026-11-23T09:30:01Z"},
                {"type": "Ready", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2026-11-23T09:30:05Z"},
                {"type": "ContainersReady", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2026-11-23T09:30:05Z"},
                {"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2026-11-23T09:30:00Z"}
            ],
            "containerStatuses": [{
                "name": "app", "ready": true, "restartCount": 0, "started": true,
                "image": format!("registry.invalid/shop/{app}:1.42.{}", i % 7),
                "imageID": format!("registry.invalid/shop/{app}@sha256:{hash}{hash}{hash}{hash}{hash}{hash}abcd"),
                "containerID": format!("containerd://{hash}{hash}{hash}{hash}{hash}{hash}0123"),
                "lastState": {}, "state": {"running": {"startedAt": "2026-11-23T09:30:03Z"}}
            }],
            "hostIP": "198.18.0.2", "hostIPs": [{"ip": "198.18.0.2"}],
            "podIP": first_ip, "podIPs": ips_json,
            "qosClass": "Burstable", "startTime": "2026-11-23T09:30:00Z"
        }
    })
}

/// The pod CIDRs that hold every [`scale_address`].
pub const SCALE_CIDRS: [&str; 2] = ["198.19.0.0/16", "fd00:19::/96"];

/// The address of the `i`-th of many pods: 198.19.0.0/16 holds the first 64,000, the rest go to
/// fd00:19::/96.
#[must_use]
pub fn scale_address(i: usize) -> IpAddr {
    if i < 64_000 {
        std::net::Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8).into()
    } else {
        std::net::Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, (i >> 16) as u16, i as u16).into()
    }
}

/// `n` realistic pods on `node` at [`scale_address`]es, in 20 namespaces and 100 service
/// accounts, for tests and benchmarks at the sizes users run. `i0` offsets their names and
/// addresses.
pub fn scale_pods(n: usize, node: &str, i0: usize) -> impl Iterator<Item = Value> + '_ {
    (i0..i0 + n).map(move |i| {
        realistic_pod(
            &format!("web-{i:06}"),
            &format!("shop-{}", i % 20),
            node,
            &format!("web-{}", i % 100),
            &[scale_address(i)],
            i,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(api: &FakeApi, target: &str) -> (u16, Value) {
        let mut c = TcpStream::connect(api.addr).expect("connect");
        write!(c, "GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        read_response(c)
    }

    fn read_response(mut c: TcpStream) -> (u16, Value) {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut c, &mut text).expect("read");
        let (head, body) = text.split_once("\r\n\r\n").expect("head");
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status code");
        (code, serde_json::from_str(body).expect("JSON body"))
    }

    fn post(api: &FakeApi, target: &str, body: &str) -> (u16, Value) {
        let mut c = TcpStream::connect(api.addr).expect("connect");
        write!(
            c,
            "POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        read_response(c)
    }

    fn put(api: &FakeApi, target: &str, body: &str) -> (u16, Value) {
        let mut c = TcpStream::connect(api.addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            c,
            "PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        read_response(c)
    }

    /// The events of a watch of `target` (which sets `timeoutSeconds`, bounding it), read to
    /// its end.
    fn watch_events(api: &FakeApi, target: &str) -> Vec<Value> {
        let mut c = TcpStream::connect(api.addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(c, "GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut c, &mut text).expect("read");
        let (head, body) = text.split_once("\r\n\r\n").expect("head");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        // Each chunk is one event and its newline; the chunk sizes are hex, never `{`.
        body.lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).expect("event JSON"))
            .collect()
    }

    const POLICIES: &str = "/apis/portcullis.dev/v1alpha1/portcullispolicies";
    const CLUSTER_POLICIES: &str = "/apis/portcullis.dev/v1alpha1/portcullisclusterpolicies";

    fn policy_path(ns: &str, name: &str) -> String {
        format!("/apis/portcullis.dev/v1alpha1/namespaces/{ns}/portcullispolicies/{name}")
    }

    fn policy(ns: &str, name: &str, spec: Value) -> Value {
        json!({"apiVersion": POLICY_API_VERSION, "kind": "PortcullisPolicy",
               "metadata": {"name": name, "namespace": ns, "labels": {"team": "shop"}},
               "spec": spec})
    }

    fn cluster_policy(name: &str, spec: Value) -> Value {
        json!({"apiVersion": POLICY_API_VERSION, "kind": "PortcullisClusterPolicy",
               "metadata": {"name": name}, "spec": spec})
    }

    /// A review of `token` for `audiences`, as a client posts it.
    fn review(api: &FakeApi, token: &str, audiences: &[&str]) -> (u16, Value) {
        let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                          "spec": {"token": token, "audiences": audiences}});
        post(api, TOKEN_REVIEWS, &body.to_string())
    }

    fn local_api() -> FakeApi {
        FakeApi::serve(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap()
    }

    /// A token of `web` in `shop`, bound to pod `web-1` on `node-2`.
    fn bound_token(audiences: &[&str]) -> TokenFacts {
        TokenFacts {
            namespace: "shop".into(),
            service_account: "web".into(),
            audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
            pod_name: Some("web-1".into()),
            pod_uid: Some(object_uid(Kind::Pod, "shop", "web-1")),
            node_name: Some("node-2".into()),
            node_uid: Some(object_uid(Kind::Node, "", "node-2")),
        }
    }

    fn pods(n: usize) -> Vec<Value> {
        (0..n)
            .map(|i| {
                realistic_pod(
                    &format!("p{i:05}"),
                    "shop",
                    "node-2",
                    "web",
                    &[IpAddr::from([
                        198,
                        19,
                        (i / 250) as u8,
                        (i % 250 + 1) as u8,
                    ])],
                    i,
                )
            })
            .collect()
    }

    #[test]
    fn a_realistic_pod_is_about_four_kilobytes_of_json() {
        let len = pods(1)[0].to_string().len();
        assert!((3_500..6_000).contains(&len), "{len} bytes");
    }

    /// Pages of one list show the snapshot of its first page, however the objects change
    /// meanwhile, and together they hold every object once.
    #[test]
    fn pages_follow_continue_tokens_over_one_snapshot() {
        let api = FakeApi::serve(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
        api.apply_all(Kind::Pod, pods(1_050));
        let (code, first) = get(&api, "/api/v1/pods?limit=500");
        assert_eq!(code, 200);
        assert_eq!(first["items"].as_array().unwrap().len(), 500);
        assert_eq!(first["metadata"]["remainingItemCount"], 550);
        let rv = first["metadata"]["resourceVersion"].clone();
        // Changes after the first page do not show in the later ones.
        api.delete(Kind::Pod, "shop", "p01049");
        let mut names = Vec::new();
        let mut page = first;
        loop {
            for item in page["items"].as_array().unwrap() {
                names.push(item["metadata"]["name"].as_str().unwrap().to_owned());
            }
            let Some(token) = page["metadata"]["continue"].as_str().map(str::to_owned) else {
                break;
            };
            let (code, next) = get(&api, &format!("/api/v1/pods?limit=500&continue={token}"));
            assert_eq!(code, 200, "{next}");
            assert_eq!(next["metadata"]["resourceVersion"], rv);
            page = next;
        }
        assert_eq!(names.len(), 1_050);
        names.dedup();
        assert_eq!(names.len(), 1_050, "an object was served twice");
        assert_eq!(names.last().map(String::as_str), Some("p01049"));
        // Without a limit, one page of the current objects.
        let (_, all) = get(&api, "/api/v1/pods");
        assert_eq!(all["items"].as_array().unwrap().len(), 1_049);
        assert!(all["metadata"]["continue"].is_null());
    }

    #[test]
    fn a_continue_token_older_than_a_compaction_is_gone() {
        let api = FakeApi::serve(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
        api.apply_all(Kind::Pod, pods(20));
        let (_, first) = get(&api, "/api/v1/pods?limit=5");
        let token = first["metadata"]["continue"].as_str().unwrap().to_owned();
        api.expire();
        let (code, gone) = get(&api, &format!("/api/v1/pods?limit=5&continue={token}"));
        assert_eq!(code, 410);
        assert_eq!(gone["reason"], "Expired");
        assert_eq!(gone["code"], 410);
    }

    #[test]
    fn a_token_review_of_a_bound_token_names_its_service_account_pod_and_node() {
        let api = local_api();
        api.add_token("tok-web", bound_token(&["spire-server", "vault"]));
        let (code, answer) = review(&api, "tok-web", &["other", "spire-server"]);
        assert_eq!(code, 201, "{answer}");
        assert_eq!(answer["kind"], "TokenReview");
        assert_eq!(answer["apiVersion"], "authentication.k8s.io/v1");
        assert_eq!(
            answer["spec"],
            json!({"token": "tok-web", "audiences": ["other", "spire-server"]})
        );
        let status = &answer["status"];
        assert_eq!(status["authenticated"], true);
        assert!(status.get("error").is_none(), "{status}");
        // Only what was asked for and the token was minted for.
        assert_eq!(status["audiences"], json!(["spire-server"]));
        let user = &status["user"];
        assert_eq!(user["username"], "system:serviceaccount:shop:web");
        assert_eq!(user["uid"], "uid-ServiceAccount-shop-web");
        assert_eq!(
            user["groups"],
            json!([
                "system:serviceaccounts",
                "system:serviceaccounts:shop",
                "system:authenticated"
            ])
        );
        let extra = user["extra"].as_object().unwrap();
        assert_eq!(
            extra["authentication.kubernetes.io/pod-name"],
            json!(["web-1"])
        );
        assert_eq!(
            extra["authentication.kubernetes.io/pod-uid"],
            json!(["uid-Pod-shop-web-1"])
        );
        assert_eq!(
            extra["authentication.kubernetes.io/node-name"],
            json!(["node-2"])
        );
        assert_eq!(
            extra["authentication.kubernetes.io/node-uid"],
            json!(["uid-Node--node-2"])
        );
        let id = extra["authentication.kubernetes.io/credential-id"][0]
            .as_str()
            .unwrap();
        assert!(id.starts_with("JTI="), "{id}");
        assert_eq!(extra.len(), 5, "{extra:?}");
        // Another registration is another credential.
        api.add_token("tok-web-2", bound_token(&["spire-server"]));
        let (_, again) = review(&api, "tok-web-2", &["spire-server"]);
        assert_ne!(
            again["status"]["user"]["extra"]["authentication.kubernetes.io/credential-id"][0],
            id
        );
        assert_eq!(api.reviews(), 2);
        assert_eq!(api.reviewed_tokens(), ["tok-web", "tok-web-2"]);
    }

    /// Before 1.30 a review names the pod but not its node.
    #[test]
    fn a_token_review_on_an_older_cluster_has_no_node() {
        let api = local_api();
        let facts = TokenFacts {
            node_name: None,
            node_uid: None,
            ..bound_token(&["spire-server"])
        };
        api.add_token("tok", facts);
        let (code, answer) = review(&api, "tok", &["spire-server"]);
        assert_eq!(code, 201);
        let extra = answer["status"]["user"]["extra"].as_object().unwrap();
        let mut keys: Vec<&str> = extra.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "authentication.kubernetes.io/credential-id",
                "authentication.kubernetes.io/pod-name",
                "authentication.kubernetes.io/pod-uid"
            ]
        );
    }

    #[test]
    fn a_token_review_of_an_unknown_or_removed_token_is_not_authenticated() {
        let api = local_api();
        let (code, answer) = review(&api, "forged", &["spire-server"]);
        assert_eq!(code, 201, "{answer}");
        let status = &answer["status"];
        // As on the wire from the API server: false is omitted, the user is empty.
        assert!(status.get("authenticated").is_none(), "{status}");
        assert_eq!(status["user"], json!({}));
        assert!(status.get("audiences").is_none(), "{status}");
        let error = status["error"].as_str().unwrap();
        assert!(error.starts_with("[invalid bearer token, "), "{error}");
        api.add_token("tok", bound_token(&["spire-server"]));
        assert_eq!(
            review(&api, "tok", &["spire-server"]).1["status"]["authenticated"],
            true
        );
        api.remove_token("tok");
        let (_, revoked) = review(&api, "tok", &["spire-server"]);
        assert!(
            revoked["status"].get("authenticated").is_none(),
            "{revoked}"
        );
        assert_eq!(api.reviews(), 3);
    }

    #[test]
    fn a_token_review_for_an_audience_the_token_lacks_fails_as_on_the_api_server() {
        let api = local_api();
        api.add_token("tok", bound_token(&["vault"]));
        let (code, answer) = review(&api, "tok", &["spire-server", "other"]);
        assert_eq!(code, 201);
        let status = &answer["status"];
        assert!(status.get("authenticated").is_none(), "{status}");
        assert_eq!(status["user"], json!({}));
        assert_eq!(
            status["error"],
            r#"[invalid bearer token, token audiences ["vault"] is invalid for the target audiences ["spire-server" "other"]]"#
        );
    }

    /// Without `spec.audiences` a review is for the API server's own audience: a token minted
    /// for another fails it; a legacy token (no audience) is taken as minted for the API server.
    #[test]
    fn a_token_review_without_audiences_is_for_the_api_server() {
        let api = local_api();
        api.add_token("tok", bound_token(&["spire-server"]));
        let (code, answer) = review(&api, "tok", &[]);
        assert_eq!(code, 201);
        assert!(answer["spec"].get("audiences").is_none(), "{answer}");
        assert_eq!(
            answer["status"]["error"],
            format!(
                r#"[invalid bearer token, token audiences ["spire-server"] is invalid for the target audiences ["{API_AUDIENCE}"]]"#
            )
        );
        api.add_token("legacy", bound_token(&[]));
        let (_, legacy) = review(&api, "legacy", &[]);
        assert_eq!(legacy["status"]["authenticated"], true, "{legacy}");
        assert_eq!(legacy["status"]["audiences"], json!([API_AUDIENCE]));
    }

    #[test]
    fn a_malformed_token_review_is_a_bad_request() {
        let api = local_api();
        api.add_token("tok", bound_token(&["spire-server"]));
        for body in [
            "{not json",
            "[]",
            r#"{"apiVersion": "v1", "kind": "TokenReview", "spec": {"token": "tok"}}"#,
            r#"{"apiVersion": "authentication.k8s.io/v1", "kind": "Pod", "spec": {"token": "tok"}}"#,
            r#"{"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {}}"#,
            r#"{"kind": "TokenReview", "spec": {"token": "tok", "audiences": "spire-server"}}"#,
        ] {
            let (code, status) = post(&api, TOKEN_REVIEWS, body);
            assert_eq!(code, 400, "{body}: {status}");
            assert_eq!(status["kind"], "Status");
            assert_eq!(status["status"], "Failure");
            assert_eq!(status["reason"], "BadRequest");
            assert_eq!(status["code"], 400);
            assert!(status["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        assert_eq!(api.reviews(), 0);
        // Without apiVersion and kind, the endpoint's are assumed, as by the API server.
        let (code, answer) = post(&api, TOKEN_REVIEWS, r#"{"spec": {"token": "tok"}}"#);
        assert_eq!(code, 201, "{answer}");
        assert_eq!(answer["kind"], "TokenReview");
        assert_eq!(api.reviews(), 1);
    }

    /// A body sent in chunks, after the go-ahead a client waiting on `Expect: 100-continue`
    /// needs.
    #[test]
    fn a_token_review_in_chunks_after_expect_continue_is_answered() {
        let api = local_api();
        api.add_token("tok", bound_token(&["spire-server"]));
        let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                          "spec": {"token": "tok", "audiences": ["spire-server"]}})
        .to_string();
        let mut c = TcpStream::connect(api.addr).expect("connect");
        write!(
            c,
            "POST {TOKEN_REVIEWS} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
        )
        .unwrap();
        let mut reader = BufReader::new(c.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, "HTTP/1.1 100 Continue\r\n");
        reader.read_line(&mut line).unwrap();
        let (a, b) = body.split_at(10);
        write!(
            c,
            "{:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        )
        .unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut reader, &mut text).unwrap();
        assert!(text.starts_with("HTTP/1.1 201 Created\r\n"), "{text}");
        let answer: Value = serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(answer["status"]["authenticated"], true, "{answer}");
    }

    #[test]
    fn a_pod_is_served_by_name_and_a_missing_one_is_not_found() {
        let api = local_api();
        api.apply_all(Kind::Pod, pods(3));
        let (code, pod) = get(&api, "/api/v1/namespaces/shop/pods/p00001");
        assert_eq!(code, 200, "{pod}");
        assert_eq!(pod["kind"], "Pod");
        assert_eq!(pod["apiVersion"], "v1");
        assert_eq!(pod["metadata"]["name"], "p00001");
        assert_eq!(
            pod["metadata"]["uid"],
            object_uid(Kind::Pod, "shop", "p00001")
        );
        assert_eq!(pod["spec"]["nodeName"], "node-2");
        for missing in [
            "/api/v1/namespaces/shop/pods/p00009",
            "/api/v1/namespaces/other/pods/p00001",
        ] {
            let (code, status) = get(&api, missing);
            assert_eq!(code, 404, "{missing}: {status}");
            assert_eq!(status["kind"], "Status");
            assert_eq!(status["reason"], "NotFound");
            assert_eq!(status["code"], 404);
            assert_eq!(status["details"]["kind"], "pods");
        }
        api.delete(Kind::Pod, "shop", "p00001");
        assert_eq!(get(&api, "/api/v1/namespaces/shop/pods/p00001").0, 404);
        // The namespace's list is still a list.
        let (_, list) = get(&api, "/api/v1/namespaces/shop/pods");
        assert_eq!(list["kind"], "PodList");
        assert_eq!(list["items"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn times_are_written_as_rfc_3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_825_599), "2000-02-29T11:59:59Z");
        assert_eq!(rfc3339(1_796_169_600), "2026-12-02T00:00:00Z");
        assert_eq!(rfc3339(4_107_542_400), "2100-03-01T00:00:00Z");
    }

    /// As the API server writes a custom resource with the status subresource through its main
    /// resource: generation 1 on creation, one more only when the spec changes, any status
    /// given dropped, the creation time kept.
    #[test]
    fn applying_a_policy_counts_generations_of_its_spec_and_drops_its_status() {
        let api = local_api();
        let mut given = policy("shop", "web", json!({"allow": ["api"]}));
        given["status"] = json!({"phase": "Forged"});
        api.apply(Kind::Policy, given.clone());
        let (code, created) = get(&api, &policy_path("shop", "web"));
        assert_eq!(code, 200, "{created}");
        assert_eq!(created["kind"], "PortcullisPolicy");
        assert_eq!(created["apiVersion"], "portcullis.dev/v1alpha1");
        assert_eq!(created["metadata"]["generation"], 1);
        assert_eq!(
            created["metadata"]["uid"],
            object_uid(Kind::Policy, "shop", "web")
        );
        let created_at = created["metadata"]["creationTimestamp"].as_str().unwrap();
        assert!(
            created_at.len() == 20
                && created_at.ends_with('Z')
                && created_at.as_bytes()[10] == b'T',
            "{created_at}"
        );
        assert!(created.get("status").is_none(), "{created}");
        assert_eq!(api.get(Kind::Policy, "shop", "web"), Some(created.clone()));

        // The same spec again: no change, so no new generation (nor version).
        api.apply(Kind::Policy, given.clone());
        let same = api.get(Kind::Policy, "shop", "web").unwrap();
        assert_eq!(same["metadata"]["generation"], 1);
        assert_eq!(
            same["metadata"]["resourceVersion"],
            created["metadata"]["resourceVersion"]
        );
        assert!(same.get("status").is_none(), "{same}");
        // A label is metadata: a new version, the same generation.
        let mut relabelled = given.clone();
        relabelled["metadata"]["labels"]["team"] = json!("payments");
        api.apply(Kind::Policy, relabelled.clone());
        let same = api.get(Kind::Policy, "shop", "web").unwrap();
        assert_eq!(same["metadata"]["generation"], 1);
        assert_eq!(same["metadata"]["labels"]["team"], "payments");
        assert_ne!(
            same["metadata"]["resourceVersion"],
            created["metadata"]["resourceVersion"]
        );

        // Another spec: generation 2, the creation time kept, still no status.
        let mut changed = relabelled;
        changed["spec"] = json!({"allow": ["api", "db"]});
        changed["metadata"]["creationTimestamp"] = json!("2020-01-01T00:00:00Z");
        changed["metadata"]["generation"] = json!(7);
        api.apply(Kind::Policy, changed);
        let (_, updated) = get(&api, &policy_path("shop", "web"));
        assert_eq!(updated["metadata"]["generation"], 2);
        assert_eq!(updated["spec"], json!({"allow": ["api", "db"]}));
        assert_eq!(updated["metadata"]["creationTimestamp"], created_at);
        assert!(updated.get("status").is_none(), "{updated}");

        // A cluster policy is the cluster's, whatever namespace it was given.
        let mut cp = cluster_policy("deny-all", json!({"deny": ["*"]}));
        cp["metadata"]["namespace"] = json!("shop");
        cp["metadata"]["creationTimestamp"] = json!("2026-12-02T00:00:00Z");
        api.apply(Kind::ClusterPolicy, cp);
        let (code, cp) = get(&api, &format!("{CLUSTER_POLICIES}/deny-all"));
        assert_eq!(code, 200, "{cp}");
        assert_eq!(cp["kind"], "PortcullisClusterPolicy");
        assert_eq!(cp["metadata"]["generation"], 1);
        assert_eq!(cp["metadata"]["creationTimestamp"], "2026-12-02T00:00:00Z");
        assert!(cp["metadata"].get("namespace").is_none(), "{cp}");
        // Pods are as before: what is applied is what is stored.
        let mut pod = pods(1).remove(0);
        pod["status"]["phase"] = json!("Pending");
        api.apply(Kind::Pod, pod);
        let (_, pod) = get(&api, "/api/v1/namespaces/shop/pods/p00000");
        assert_eq!(pod["status"]["phase"], "Pending");
        assert!(pod["metadata"].get("generation").is_none(), "{pod}");
    }

    /// A status write with the current version replaces the status and nothing else, and is
    /// seen by a watch as a modification.
    #[test]
    fn a_status_write_replaces_only_the_status_and_is_watched() {
        let api = local_api();
        api.apply(
            Kind::Policy,
            policy("shop", "web", json!({"allow": ["api"]})),
        );
        let before = api.get(Kind::Policy, "shop", "web").unwrap();
        let rv0 = before["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_owned();
        // As kube-rs sends it: the object read, with a status; what else it changed is ignored.
        let mut body = before.clone();
        body["status"] = json!({"observedGeneration": 1,
            "conditions": [{"type": "Enforced", "status": "True", "reason": "Loaded"}]});
        body["spec"] = json!({"allow": ["everything"]});
        body["metadata"]["labels"]["team"] = json!("intruder");
        let target = format!("{}/status", policy_path("shop", "web"));
        let (code, answer) = put(&api, &target, &body.to_string());
        assert_eq!(code, 200, "{answer}");
        assert_eq!(answer["status"], body["status"]);
        assert_eq!(answer["spec"], json!({"allow": ["api"]}));
        assert_eq!(answer["metadata"]["labels"]["team"], "shop");
        assert_eq!(answer["metadata"]["generation"], 1);
        assert_eq!(
            answer["metadata"]["creationTimestamp"],
            before["metadata"]["creationTimestamp"]
        );
        let rv1 = answer["metadata"]["resourceVersion"].as_str().unwrap();
        assert!(
            rv1.parse::<u64>().unwrap() > rv0.parse::<u64>().unwrap(),
            "{rv0} -> {rv1}"
        );
        assert_eq!(api.get(Kind::Policy, "shop", "web"), Some(answer.clone()));
        assert_eq!(api.status_writes(), 1);
        assert!(
            api.requests().contains(&format!("PUT {target} HTTP/1.1")),
            "{:?}",
            api.requests()
        );

        // A watch from before the write sees it.
        let events = watch_events(
            &api,
            &format!("{POLICIES}?watch=true&resourceVersion={rv0}&timeoutSeconds=1"),
        );
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["type"], "MODIFIED");
        assert_eq!(events[0]["object"], answer);

        // The same status again changes nothing: no new version.
        let (code, again) = put(&api, &target, &answer.to_string());
        assert_eq!(code, 200, "{again}");
        assert_eq!(again["metadata"]["resourceVersion"], rv1);
        assert_eq!(api.status_writes(), 2);

        // Applying the main resource keeps the status, whatever status it carries.
        let mut reapplied = policy("shop", "web", json!({"allow": ["api", "db"]}));
        reapplied["status"] = json!({});
        api.apply(Kind::Policy, reapplied);
        let after = api.get(Kind::Policy, "shop", "web").unwrap();
        assert_eq!(after["status"], body["status"]);
        assert_eq!(after["metadata"]["generation"], 2);

        // Without a resourceVersion the write is unconditional; without a status, it removes it.
        let (code, cleared) = put(
            &api,
            &target,
            &json!({"metadata": {"name": "web", "namespace": "shop"}}).to_string(),
        );
        assert_eq!(code, 200, "{cleared}");
        assert!(cleared.get("status").is_none(), "{cleared}");
        assert_eq!(cleared["spec"], json!({"allow": ["api", "db"]}));

        // And the same for a cluster policy.
        api.apply(Kind::ClusterPolicy, cluster_policy("deny-all", json!({})));
        let mut cp = api.get(Kind::ClusterPolicy, "", "deny-all").unwrap();
        cp["status"] = json!({"nodes": 3});
        let (code, cp) = put(
            &api,
            &format!("{CLUSTER_POLICIES}/deny-all/status"),
            &cp.to_string(),
        );
        assert_eq!(code, 200, "{cp}");
        assert_eq!(cp["kind"], "PortcullisClusterPolicy");
        assert_eq!(
            api.get(Kind::ClusterPolicy, "", "deny-all").unwrap()["status"],
            json!({"nodes": 3})
        );
        assert_eq!(api.status_writes(), 4);
    }

    #[test]
    fn a_stale_status_write_conflicts_and_one_of_a_missing_object_is_not_found() {
        let api = local_api();
        api.apply(
            Kind::Policy,
            policy("shop", "web", json!({"allow": ["api"]})),
        );
        let read = api.get(Kind::Policy, "shop", "web").unwrap();
        // Another writer got there first.
        api.apply(
            Kind::Policy,
            policy("shop", "web", json!({"allow": ["db"]})),
        );
        let mut stale = read.clone();
        stale["status"] = json!({"phase": "Enforced"});
        let target = format!("{}/status", policy_path("shop", "web"));
        let (code, status) = put(&api, &target, &stale.to_string());
        assert_eq!(code, 409, "{status}");
        assert_eq!(status["kind"], "Status");
        assert_eq!(status["status"], "Failure");
        assert_eq!(status["reason"], "Conflict");
        assert_eq!(status["code"], 409);
        assert_eq!(
            status["message"],
            "Operation cannot be fulfilled on portcullispolicies.portcullis.dev \"web\": the object has been modified; please apply your changes to the latest version and try again"
        );
        assert_eq!(
            status["details"],
            json!({"name": "web", "group": "portcullis.dev", "kind": "portcullispolicies"})
        );
        assert!(
            api.get(Kind::Policy, "shop", "web")
                .unwrap()
                .get("status")
                .is_none()
        );
        // Another object of the same name (another uid) conflicts too.
        let mut other = api.get(Kind::Policy, "shop", "web").unwrap();
        other["metadata"]["uid"] = json!("uid-of-a-deleted-one");
        let (code, status) = put(&api, &target, &other.to_string());
        assert_eq!(code, 409, "{status}");
        assert_eq!(status["reason"], "Conflict");

        // An object the server does not hold.
        let mut missing = stale.clone();
        missing["metadata"]["name"] = json!("gone");
        let (code, status) = put(
            &api,
            &format!("{}/status", policy_path("shop", "gone")),
            &missing.to_string(),
        );
        assert_eq!(code, 404, "{status}");
        assert_eq!(status["reason"], "NotFound");
        assert_eq!(
            status["message"],
            "portcullispolicies.portcullis.dev \"gone\" not found"
        );
        assert_eq!(
            status["details"],
            json!({"name": "gone", "group": "portcullis.dev", "kind": "portcullispolicies"})
        );
        let (code, status) = put(
            &api,
            &format!("{CLUSTER_POLICIES}/gone/status"),
            &cluster_policy("gone", json!({})).to_string(),
        );
        assert_eq!(code, 404, "{status}");
        assert_eq!(status["details"]["kind"], "portcullisclusterpolicies");
        let (code, status) = get(&api, &format!("{CLUSTER_POLICIES}/gone"));
        assert_eq!(code, 404, "{status}");
        assert_eq!(
            status["message"],
            "portcullisclusterpolicies.portcullis.dev \"gone\" not found"
        );

        // Bodies the API server refuses before looking.
        let current = api.get(Kind::Policy, "shop", "web").unwrap();
        let mut renamed = current.clone();
        renamed["metadata"]["name"] = json!("other");
        let mut moved = current.clone();
        moved["metadata"]["namespace"] = json!("bank");
        let mut unnamed = current.clone();
        unnamed["metadata"].as_object_mut().unwrap().remove("name");
        let mut wrong_kind = current.clone();
        wrong_kind["kind"] = json!("Pod");
        for body in [
            "{not json".to_owned(),
            "[]".to_owned(),
            renamed.to_string(),
            moved.to_string(),
            unnamed.to_string(),
            wrong_kind.to_string(),
        ] {
            let (code, status) = put(&api, &target, &body);
            assert_eq!(code, 400, "{body}: {status}");
            assert_eq!(status["reason"], "BadRequest");
            assert_eq!(status["code"], 400);
        }
        assert_eq!(api.status_writes(), 0);
        // Only the custom resources have a status subresource here, and only PUT writes it.
        let (code, _) = put(
            &api,
            "/api/v1/namespaces/shop/pods/p00000/status",
            &current.to_string(),
        );
        assert_eq!(code, 404);
        let (code, _) = post(&api, &target, &current.to_string());
        assert_eq!(code, 404);
        let (code, _) = put(&api, &policy_path("shop", "web"), &current.to_string());
        assert_eq!(code, 404);
        // With the current version, the write goes through.
        let mut fresh = current;
        fresh["status"] = json!({"phase": "Enforced"});
        let (code, written) = put(&api, &target, &fresh.to_string());
        assert_eq!(code, 200, "{written}");
        assert_eq!(written["status"]["phase"], "Enforced");
        assert_eq!(api.status_writes(), 1);
    }

    #[test]
    fn policies_are_listed_by_namespace_and_cluster_policies_for_the_cluster() {
        let api = local_api();
        api.apply_all(
            Kind::Policy,
            [
                policy("shop", "web", json!({})),
                policy("shop", "db", json!({})),
                policy("bank", "ledger", json!({})),
            ],
        );
        api.apply_all(
            Kind::ClusterPolicy,
            [
                cluster_policy("deny-all", json!({})),
                cluster_policy("allow-dns", json!({})),
            ],
        );
        api.apply(Kind::Pod, pods(1).remove(0));
        let names = |list: &Value| -> Vec<String> {
            list["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["metadata"]["name"].as_str().unwrap().to_owned())
                .collect()
        };
        let (code, all) = get(&api, POLICIES);
        assert_eq!(code, 200, "{all}");
        assert_eq!(all["kind"], "PortcullisPolicyList");
        assert_eq!(all["apiVersion"], "portcullis.dev/v1alpha1");
        assert_eq!(names(&all), ["ledger", "db", "web"]);
        for item in all["items"].as_array().unwrap() {
            assert_eq!(item["kind"], "PortcullisPolicy");
            assert_eq!(item["apiVersion"], "portcullis.dev/v1alpha1");
        }
        let (_, shop) = get(
            &api,
            "/apis/portcullis.dev/v1alpha1/namespaces/shop/portcullispolicies",
        );
        assert_eq!(shop["kind"], "PortcullisPolicyList");
        assert_eq!(names(&shop), ["db", "web"]);
        let (_, one) = get(
            &api,
            "/apis/portcullis.dev/v1alpha1/namespaces/shop/portcullispolicies?fieldSelector=metadata.name%3Dweb",
        );
        assert_eq!(names(&one), ["web"]);
        let (_, cluster) = get(&api, CLUSTER_POLICIES);
        assert_eq!(cluster["kind"], "PortcullisClusterPolicyList");
        assert_eq!(cluster["apiVersion"], "portcullis.dev/v1alpha1");
        assert_eq!(names(&cluster), ["allow-dns", "deny-all"]);
        let (_, page) = get(&api, &format!("{CLUSTER_POLICIES}?limit=1"));
        assert_eq!(names(&page), ["allow-dns"]);
        assert_eq!(page["metadata"]["remainingItemCount"], 1);
        // Core lists are as they were.
        let (_, pods) = get(&api, "/api/v1/pods");
        assert_eq!(pods["kind"], "PodList");
        assert_eq!(pods["apiVersion"], "v1");
        assert_eq!(names(&pods), ["p00000"]);
        // A cluster-scoped kind has no namespaced path.
        let (code, _) = get(
            &api,
            "/apis/portcullis.dev/v1alpha1/namespaces/shop/portcullisclusterpolicies",
        );
        assert_eq!(code, 404);

        // Deleted, an object leaves its lists and is not found; a watch sees it go, and its
        // bookmarks are of its kind.
        let rv = cluster["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_owned();
        api.delete(Kind::ClusterPolicy, "", "deny-all");
        assert_eq!(api.count(Kind::ClusterPolicy), 1);
        assert_eq!(get(&api, &format!("{CLUSTER_POLICIES}/deny-all")).0, 404);
        let events = watch_events(
            &api,
            &format!(
                "{CLUSTER_POLICIES}?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=2"
            ),
        );
        assert_eq!(events[0]["type"], "DELETED", "{events:?}");
        assert_eq!(events[0]["object"]["metadata"]["name"], "deny-all");
        let bookmark = events
            .iter()
            .find(|e| e["type"] == "BOOKMARK")
            .expect("a bookmark");
        assert_eq!(bookmark["object"]["kind"], "PortcullisClusterPolicy");
        assert_eq!(bookmark["object"]["apiVersion"], "portcullis.dev/v1alpha1");
    }
}

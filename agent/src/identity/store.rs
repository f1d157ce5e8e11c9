//! The SVID store: the local workloads' SVIDs and the trust bundle, kept current.
//!
//! Sources: `ca` (the agent holds a CA key and mints a short-lived SVID per local identity,
//! renewing at half life) and `files` (a directory per identity holding a certificate and key,
//! as written by cert-manager's csi-driver-spiffe — `tls.crt`/`tls.key` — or spiffe-helper —
//! `svid.pem`/`svid_key.pem`), re-read when they change. The trust bundle is a PEM file of one
//! or more CA certificates (several while a CA is rotated), re-read when it changes. One writer
//! (the agent's core) validates everything before it is published; until an identity has a
//! valid SVID, its handshakes fail closed.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::time::Instant;

use super::{SpiffeId, ca::Ca, svid};

/// A validated SVID with its key: plain data, no TLS types (the `tls` module turns it into a
/// rustls signing key).
#[derive(Debug, Clone)]
pub struct Svid {
    pub id: SpiffeId,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
    pub not_after: SystemTime,
    pub serial: String,
}

impl Svid {
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        info: svid::LeafInfo,
    ) -> Self {
        Self {
            id: info.id,
            chain,
            key: Arc::new(key),
            not_after: info.not_after,
            serial: info.serial,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Source {
    Ca {
        dir: PathBuf,
        ttl: Duration,
    },
    Files {
        dir: PathBuf,
    },
    /// SVIDs from the issuer, obtained by the task behind the handle.
    Issuer(crate::creds::issuer::IssuerHandle),
}

struct Held {
    svid: Svid,
    /// When to mint a new one (`ca` source): half the lifetime after issue.
    renew_at: Option<Instant>,
    /// The files it came from and their contents (`files` source).
    files: Option<(PathBuf, Vec<u8>)>,
}

pub struct Store {
    source: Source,
    ca: Option<Ca>,
    /// `ca.pem` and `ca.key` as last loaded: a change (CA rotation) reloads the CA and
    /// re-issues every SVID.
    ca_files: Vec<u8>,
    trust_domain: String,
    bundle_path: PathBuf,
    bundle_text: Vec<u8>,
    bundle: Option<Vec<CertificateDer<'static>>>,
    held: HashMap<SpiffeId, Held>,
    /// The issuer task's count of SVIDs signed, when the store last took them.
    issuer_seen: u64,
    /// This node's own identity (`spiffe://<td>/portcullis/node/<name>`): its SVID
    /// authenticates node sessions. Sources `ca` and `files` hold it like a workload's; the
    /// issuer attests the node for it.
    node: Option<SpiffeId>,
    /// Problems met at the last refresh, one line each (shown by `status`, logged once).
    pub problems: Vec<String>,
}

/// What changed at a refresh.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub bundle: bool,
    /// Identities whose SVID is new or was replaced.
    pub rotated: Vec<SpiffeId>,
    pub removed: Vec<SpiffeId>,
}

impl Changes {
    #[must_use]
    pub fn any(&self) -> bool {
        self.bundle || !self.rotated.is_empty() || !self.removed.is_empty()
    }
}

impl Store {
    pub fn new(source: Source, bundle_path: PathBuf, trust_domain: &str) -> Result<Self, String> {
        let (ca, ca_files) = match &source {
            Source::Ca { dir, .. } => {
                let (ca, files) = load_ca(dir, trust_domain)?;
                (Some(ca), files)
            }
            Source::Files { .. } | Source::Issuer(_) => (None, Vec::new()),
        };
        Ok(Self {
            source,
            ca,
            ca_files,
            trust_domain: trust_domain.to_owned(),
            bundle_path,
            bundle_text: Vec::new(),
            bundle: None,
            held: HashMap::new(),
            issuer_seen: 0,
            node: None,
            problems: Vec::new(),
        })
    }

    /// Holds the SVID of this node's identity `id` too, from now on.
    pub fn set_node(&mut self, id: SpiffeId) {
        self.node = Some(id);
    }

    /// This node's SVID, once there is one.
    #[must_use]
    pub fn node_svid(&self) -> Option<&Svid> {
        self.held.get(self.node.as_ref()?).map(|h| &h.svid)
    }

    /// The trust domain's CA certificates, once a valid bundle was read.
    #[must_use]
    pub fn bundle(&self) -> Option<&[CertificateDer<'static>]> {
        self.bundle.as_deref()
    }

    pub fn svids(&self) -> impl Iterator<Item = &Svid> {
        self.held.values().map(|h| &h.svid)
    }

    /// When the SVID of `id` will be replaced (`ca` source).
    #[must_use]
    pub fn renew_at(&self, id: &SpiffeId) -> Option<Instant> {
        self.held.get(id).and_then(|h| h.renew_at)
    }

    /// Brings the bundle and the SVIDs of `wanted` up to date.
    pub fn refresh(&mut self, wanted: &BTreeSet<SpiffeId>) -> Changes {
        let mut changes = Changes::default();
        self.problems.clear();
        self.refresh_bundle(&mut changes);
        let mut with_node = wanted.clone();
        with_node.extend(self.node.clone());
        match self.source.clone() {
            Source::Ca { ttl, .. } => self.refresh_from_ca(&with_node, ttl, &mut changes),
            Source::Files { dir } => self.refresh_from_files(&dir, &with_node, &mut changes),
            Source::Issuer(handle) => self.refresh_from_issuer(&handle, wanted, &mut changes),
        }
        let wanted = &with_node;
        let gone: Vec<SpiffeId> = self
            .held
            .keys()
            .filter(|id| !wanted.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            self.held.remove(&id);
            changes.removed.push(id);
        }
        changes
    }

    fn refresh_bundle(&mut self, changes: &mut Changes) {
        let text = match fs::read(&self.bundle_path) {
            Ok(t) => t,
            Err(e) => {
                self.problems.push(format!(
                    "trust bundle {}: {e}; keeping the last good one",
                    self.bundle_path.display()
                ));
                return;
            }
        };
        if text == self.bundle_text {
            return;
        }
        match parse_bundle(&self.bundle_path, &text, &self.trust_domain) {
            Ok(roots) => {
                self.bundle = Some(roots);
                self.bundle_text = text;
                changes.bundle = true;
            }
            Err(e) => self
                .problems
                .push(format!("{e}; keeping the last good bundle")),
        }
    }

    fn refresh_from_ca(
        &mut self,
        wanted: &BTreeSet<SpiffeId>,
        ttl: Duration,
        changes: &mut Changes,
    ) {
        if let Source::Ca { dir, .. } = &self.source
            && ca_files(dir).is_ok_and(|f| f != self.ca_files)
        {
            match load_ca(dir, &self.trust_domain) {
                Ok((ca, files)) => {
                    self.ca = Some(ca);
                    self.ca_files = files;
                    // Everything is re-issued by the new CA now.
                    self.held.clear();
                }
                Err(e) => self.problems.push(format!("{e}; keeping the last good CA")),
            }
        }
        let Some(ca) = &self.ca else { return };
        let now = Instant::now();
        for id in wanted {
            let due = self
                .held
                .get(id)
                .is_none_or(|h| h.renew_at.is_some_and(|at| now >= at));
            if !due {
                continue;
            }
            let issued = match ca.issue(id, ttl) {
                Ok(i) => i,
                Err(e) => {
                    self.problems.push(format!("issuing an SVID for {id}: {e}"));
                    continue;
                }
            };
            let info = match svid::check_chain(
                std::slice::from_ref(&issued.cert_der),
                &self.trust_domain,
                SystemTime::now(),
            ) {
                Ok(i) => i,
                Err(reason) => {
                    self.problems.push(format!(
                        "the SVID just issued for {id} is not valid: {reason}"
                    ));
                    continue;
                }
            };
            let svid = Svid::new(vec![issued.cert_der], issued.key_der, info);
            self.held.insert(
                id.clone(),
                Held {
                    svid,
                    renew_at: Some(now + ttl / 2),
                    files: None,
                },
            );
            changes.rotated.push(id.clone());
        }
    }

    fn refresh_from_issuer(
        &mut self,
        handle: &crate::creds::issuer::IssuerHandle,
        wanted: &BTreeSet<SpiffeId>,
        changes: &mut Changes,
    ) {
        handle.want(wanted);
        self.problems.extend(handle.problems());
        let now = SystemTime::now();
        let arrived = handle
            .svids_since(&mut self.issuer_seen)
            .unwrap_or_default();
        for (id, got) in arrived {
            if !wanted.contains(&id)
                || got.svid.not_after <= now
                || self
                    .held
                    .get(&id)
                    .is_some_and(|h| h.svid.serial == got.svid.serial)
            {
                continue;
            }
            self.held.insert(
                id.clone(),
                Held {
                    svid: got.svid,
                    renew_at: Some(got.renew_at),
                    files: None,
                },
            );
            changes.rotated.push(id);
        }
        if let (Some(node), Some(svid)) = (&self.node, handle.node_svid())
            && svid.not_after > now
            && self
                .held
                .get(node)
                .is_none_or(|h| h.svid.serial != svid.serial)
        {
            self.held.insert(
                node.clone(),
                Held {
                    svid,
                    renew_at: None,
                    files: None,
                },
            );
            changes.rotated.push(node.clone());
        }
        // An SVID that expired while the issuer was away is no use to a handshake.
        let expired: Vec<SpiffeId> = self
            .held
            .iter()
            .filter(|(_, h)| h.svid.not_after <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.held.remove(&id);
            changes.removed.push(id);
        }
    }

    /// A handshake needs `id`'s SVID now (issuer source: asked for before the others).
    pub fn urgent(&self, id: &SpiffeId) {
        if let Source::Issuer(handle) = &self.source {
            handle.urgent(id);
        }
    }

    /// The issuer task's handle (issuer source).
    #[must_use]
    pub fn issuer(&self) -> Option<&crate::creds::issuer::IssuerHandle> {
        match &self.source {
            Source::Issuer(h) => Some(h),
            _ => None,
        }
    }

    fn refresh_from_files(
        &mut self,
        dir: &Path,
        wanted: &BTreeSet<SpiffeId>,
        changes: &mut Changes,
    ) {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                self.problems
                    .push(format!("SVID directory {}: {e}", dir.display()));
                return;
            }
        };
        for entry in entries.flatten() {
            let sub = entry.path();
            let pair = [("tls.crt", "tls.key"), ("svid.pem", "svid_key.pem")]
                .into_iter()
                .map(|(c, k)| (sub.join(c), sub.join(k)))
                .find(|(c, _)| c.is_file());
            let Some((cert_path, key_path)) = pair else {
                continue;
            };
            let Ok(cert_pem) = fs::read(&cert_path) else {
                continue;
            };
            let key_pem = match super::ca::read_key(&key_path) {
                Ok(k) => k.into_bytes(),
                Err(e) => {
                    self.problems.push(e.to_string());
                    continue;
                }
            };
            let mut contents = cert_pem.clone();
            contents.extend_from_slice(&key_pem);
            // Unchanged since it was loaded.
            if self.held.values().any(|h| {
                h.files
                    .as_ref()
                    .is_some_and(|(p, c)| p == &sub && c == &contents)
            }) {
                continue;
            }
            match load_files(&cert_path, &cert_pem, &key_pem, &self.trust_domain) {
                Ok(svid) if wanted.contains(&svid.id) => {
                    changes.rotated.push(svid.id.clone());
                    self.held.insert(
                        svid.id.clone(),
                        Held {
                            svid,
                            renew_at: None,
                            files: Some((sub.clone(), contents)),
                        },
                    );
                }
                Ok(_) => {}
                Err(e) => self.problems.push(e),
            }
        }
    }
}

fn ca_files(dir: &Path) -> std::io::Result<Vec<u8>> {
    let mut files = fs::read(dir.join(super::ca::CA_CERT))?;
    files.extend(fs::read(dir.join(super::ca::CA_KEY))?);
    Ok(files)
}

fn load_ca(dir: &Path, trust_domain: &str) -> Result<(Ca, Vec<u8>), String> {
    let files = ca_files(dir).map_err(|e| format!("CA in {}: {e}", dir.display()))?;
    let ca = Ca::load(dir).map_err(|e| e.to_string())?;
    if ca.trust_domain() != trust_domain {
        return Err(format!(
            "the CA in {} serves trust domain `{}`, cluster state says `{trust_domain}`",
            dir.display(),
            ca.trust_domain()
        ));
    }
    Ok((ca, files))
}

fn parse_bundle(
    path: &Path,
    text: &[u8],
    td: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut roots = Vec::new();
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(text) {
        let cert = cert.map_err(|e| {
            format!(
                "trust bundle {}: certificate {}: {e}",
                path.display(),
                n + 1
            )
        })?;
        match svid::ca_info(&cert) {
            Ok(cert_td) if cert_td == td => {}
            Ok(other) => {
                return Err(format!(
                    "trust bundle {}: certificate {} is a CA for trust domain `{other}`, not `{td}`",
                    path.display(),
                    n + 1
                ));
            }
            Err(e) => {
                return Err(format!(
                    "trust bundle {}: certificate {}: {e}",
                    path.display(),
                    n + 1
                ));
            }
        }
        roots.push(cert);
        n += 1;
    }
    if n == 0 {
        return Err(format!(
            "trust bundle {} holds no certificate",
            path.display()
        ));
    }
    Ok(roots)
}

fn load_files(cert_path: &Path, cert_pem: &[u8], key_pem: &[u8], td: &str) -> Result<Svid, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert_path.display()))?;
    let info = svid::check_chain(&chain, td, SystemTime::now())
        .map_err(|r| format!("{}: {r}", cert_path.display()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("key next to {}: {e}", cert_path.display()))?;
    Ok(Svid::new(chain, key, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(ttl: Duration) -> (tempfile::TempDir, Store, SpiffeId) {
        let dir = tempfile::tempdir().unwrap();
        Ca::init("td", &dir.path().join("ca")).unwrap();
        let store = Store::new(
            Source::Ca {
                dir: dir.path().join("ca"),
                ttl,
            },
            dir.path().join("ca/ca.pem"),
            "td",
        )
        .unwrap();
        (
            dir,
            store,
            SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn ca_source_renews_at_half_life() {
        let (_dir, mut store, id) = setup(Duration::from_secs(3600));
        let wanted: BTreeSet<_> = [id.clone()].into();
        let first = store.refresh(&wanted);
        assert!(
            first.bundle && first.rotated == vec![id.clone()],
            "{first:?}"
        );
        let serial = store.svids().next().unwrap().serial.clone();
        tokio::time::advance(Duration::from_secs(29 * 60)).await;
        assert!(!store.refresh(&wanted).any(), "renewed before half life");
        tokio::time::advance(Duration::from_secs(2 * 60)).await;
        assert_eq!(
            store.refresh(&wanted).rotated,
            vec![id.clone()],
            "not renewed after half life"
        );
        assert_ne!(store.svids().next().unwrap().serial, serial);
        let none = BTreeSet::new();
        assert_eq!(store.refresh(&none).removed, vec![id]);
    }

    #[tokio::test]
    async fn a_bad_bundle_edit_keeps_the_last_good_one() {
        let (dir, mut store, id) = setup(Duration::from_secs(3600));
        let wanted: BTreeSet<_> = [id].into();
        store.refresh(&wanted);
        std::fs::write(dir.path().join("ca/ca.pem"), "garbage").unwrap();
        let c = store.refresh(&wanted);
        assert!(!c.bundle && store.bundle().is_some());
        assert!(
            store
                .problems
                .iter()
                .any(|p| p.contains("holds no certificate")),
            "{:?}",
            store.problems
        );
    }

    #[tokio::test]
    async fn files_source_reads_csi_driver_layout_and_reloads_changes() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init("td", &dir.path().join("ca")).unwrap();
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        let pod = dir.path().join("svids/pod-a");
        std::fs::create_dir_all(&pod).unwrap();
        let write = |ttl| {
            let issued = ca.issue(&id, Duration::from_secs(ttl)).unwrap();
            crate::identity::ca::write_file(
                &pod.join("tls.crt"),
                issued.cert_pem.as_bytes(),
                0o644,
                false,
            )
            .unwrap();
            crate::identity::ca::write_file(
                &pod.join("tls.key"),
                issued.key_pem.as_bytes(),
                0o600,
                false,
            )
            .unwrap();
        };
        write(3600);
        let mut store = Store::new(
            Source::Files {
                dir: dir.path().join("svids"),
            },
            dir.path().join("ca/ca.pem"),
            "td",
        )
        .unwrap();
        let wanted: BTreeSet<_> = [id.clone()].into();
        assert_eq!(store.refresh(&wanted).rotated, vec![id.clone()]);
        assert!(!store.refresh(&wanted).any());
        write(7200);
        assert_eq!(
            store.refresh(&wanted).rotated,
            vec![id],
            "a rewritten SVID is picked up"
        );
    }
}

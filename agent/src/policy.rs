//! The authorization policy: who may open connections to whom, on which ports, and how strictly
//! each namespace is enforced.
//!
//! In Kubernetes, the `PortcullisPolicy` and `PortcullisClusterPolicy` objects ([`crd`],
//! [`objects`]) merge into one [`Policy`]; elsewhere (and from the compatibility ConfigMap) it
//! is a YAML document:
//!
//! ```yaml
//! name: shop-policy            # named in every denial
//! mode: enforce                # enforce | audit | off
//! node_traffic: allow          # allow | deny: connections from the node itself (kubelet probes)
//! other_protocols: drop        # pass | drop: IP protocols other than TCP and UDP (ICMP echo…)
//! syn_mac: require             # require | audit | off: connection MACs on new TCP connections
//! cross_node_udp: allow        # allow | deny: new UDP flows from pods on other nodes
//! enroll:                      # optional; absent: every workload is enrolled
//!   namespaces: [shop]
//!   workloads: ["spiffe://cluster.local/ns/legacy/sa/batch"]
//! namespaces:                  # per-namespace overrides of the five settings above
//!   payments: { mode: audit }
//! rules:
//!   - name: web-to-api
//!     from: ["spiffe://cluster.local/ns/web/sa/*"]
//!     to: ["spiffe://cluster.local/ns/api/sa/api"]
//!     ports: [8080, "9000-9100", "53/udp"]
//! ```
//!
//! Semantics (least privilege per destination): a destination no rule's `to` selects accepts
//! any authenticated peer of the trust domain; a destination some rule selects accepts only the
//! sources, ports and protocols those rules allow. A pair is *authorized* when at least one
//! direction is allowed; both agents of a handshake evaluate it, and each writes into its auth
//! entry the ports the remote may open towards its own workload. A workload that is not
//! enrolled is in mode `off`.

use std::{collections::BTreeMap, fmt, path::Path};

use portcullis_common::{IPPROTO_TCP, IPPROTO_UDP, PortRange};
use serde::Serialize;

pub mod crd;
mod file;
pub mod manifest;
pub mod objects;

use crate::{
    identity::SpiffeId,
    input::{self, InputError},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
    Off,
}

impl Mode {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
            Self::Off => "off",
        }
    }
}

/// Connection MACs on new TCP connections to a workload: whether a SYN of a keyed pair must
/// carry a MAC its source node computed with the pair's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MacMode {
    /// Without a valid MAC, dropped (`drop_no_mac`, `drop_bad_mac`).
    #[default]
    Require,
    /// Admitted, and reported as a would-be drop.
    Audit,
    /// Not checked: admitted by the auth entry and the source address alone.
    Off,
}

impl MacMode {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Require => "require",
            Self::Audit => "audit",
            Self::Off => "off",
        }
    }
}

/// A source or destination selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// `*`: every identity.
    Any,
    /// One SPIFFE ID.
    Exact(String),
    /// `spiffe://td/ns/web/*`: every ID with one or more path segments after this prefix
    /// (stored with its trailing `/`).
    Prefix(String),
}

impl From<Pattern> for String {
    fn from(p: Pattern) -> Self {
        match p {
            Pattern::Any => "*".to_owned(),
            Pattern::Exact(s) => s,
            Pattern::Prefix(s) => format!("{s}*"),
        }
    }
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "*" {
            return Ok(Self::Any);
        }
        if let Some(prefix) = s.strip_suffix("/*") {
            // The prefix must itself be a valid SPIFFE ID (a trust domain alone is too).
            SpiffeId::parse(prefix)
                .or_else(|e| {
                    if prefix.matches('/').count() == 2 {
                        SpiffeId::parse(&format!("{prefix}/x"))
                    } else {
                        Err(e)
                    }
                })
                .map_err(|e| format!("`{s}`: {e}"))?;
            return Ok(Self::Prefix(format!("{prefix}/")));
        }
        if s.contains('*') {
            return Err(format!(
                "`{s}`: `*` may only be the whole pattern or its last path segment (`spiffe://td/ns/web/*`)"
            ));
        }
        SpiffeId::parse(s).map_err(|e| format!("`{s}`: {e}"))?;
        Ok(Self::Exact(s.to_owned()))
    }

    #[must_use]
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(s) => s == id.as_str(),
            Self::Prefix(p) => id.as_str().len() > p.len() && id.as_str().starts_with(p.as_str()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub from: Vec<Pattern>,
    pub to: Vec<Pattern>,
    /// `None`: every port of TCP and UDP.
    pub ports: Option<Vec<PortRange>>,
}

/// The settings of one namespace (or the defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub mode: Mode,
    /// Connections from this node's own addresses are admitted.
    pub node_traffic: bool,
    /// Protocols other than TCP and UDP pass.
    pub other_protocols: bool,
    pub syn_mac: MacMode,
    /// New UDP flows from pods on other nodes are admitted (UDP carries no MAC: they are
    /// admitted by source address).
    pub cross_node_udp: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            mode: Mode::Enforce,
            node_traffic: true,
            other_protocols: false,
            syn_mac: MacMode::Require,
            cross_node_udp: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Enroll {
    pub namespaces: Vec<String>,
    pub workloads: Vec<Pattern>,
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub defaults: Settings,
    pub namespaces: BTreeMap<String, Settings>,
    /// `None`: every workload is enrolled.
    pub enroll: Option<Enroll>,
    pub rules: Vec<Rule>,
}

impl Default for Policy {
    /// No policy file: every workload enrolled and enforced, any authenticated peer admitted.
    fn default() -> Self {
        Self {
            name: "default".to_owned(),
            defaults: Settings::default(),
            namespaces: BTreeMap::new(),
            enroll: None,
            rules: Vec::new(),
        }
    }
}

/// What one direction of a pair may open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Nothing.
    None,
    /// Every port (no rule selects the destination, or a selecting rule has no `ports`).
    All,
    /// These ranges, merged and sorted.
    Ports(Vec<PortRange>),
}

impl Grant {
    #[must_use]
    pub fn is_none(&self) -> bool {
        matches!(self, Self::None)
    }

    #[must_use]
    pub fn admits(&self, proto: u8, port: u16) -> bool {
        match self {
            Self::None => false,
            Self::All => true,
            Self::Ports(r) => r.iter().any(|r| r.admits(proto, port)),
        }
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::All => f.write_str("all ports"),
            Self::Ports(r) => {
                for (i, p) in r.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{}", port_range_str(p))?;
                }
                Ok(())
            }
        }
    }
}

#[must_use]
pub fn port_range_str(p: &PortRange) -> String {
    let ports = if p.first == p.last {
        p.first.to_string()
    } else {
        format!("{}-{}", p.first, p.last)
    };
    match p.proto {
        IPPROTO_TCP => format!("{ports}/tcp"),
        IPPROTO_UDP => format!("{ports}/udp"),
        _ => ports,
    }
}

/// The policy's verdict on a pair, seen from one node: `local` is our workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What the remote may open towards the local workload.
    pub inbound: Grant,
    /// What the local workload may open towards the remote.
    pub outbound: Grant,
}

impl Decision {
    #[must_use]
    pub fn authorized(&self) -> bool {
        !(self.inbound.is_none() && self.outbound.is_none())
    }
}

impl Policy {
    pub fn parse(file: &Path, text: &str) -> Result<Self, InputError> {
        Self::validate(file, input::parse(file, text)?)
    }

    /// Whether `id` in `namespace` is enrolled.
    #[must_use]
    pub fn enrolled(&self, namespace: &str, id: &SpiffeId) -> bool {
        self.enroll.as_ref().is_none_or(|e| {
            e.namespaces.iter().any(|n| n == namespace) || e.workloads.iter().any(|p| p.matches(id))
        })
    }

    /// The settings in force for a local workload: its namespace's, or the defaults; mode
    /// `off` when it is not enrolled.
    #[must_use]
    pub fn settings(&self, namespace: &str, id: &SpiffeId) -> Settings {
        let mut s = self
            .namespaces
            .get(namespace)
            .copied()
            .unwrap_or(self.defaults);
        if !self.enrolled(namespace, id) {
            s.mode = Mode::Off;
        }
        s
    }

    /// What `src` may open towards `dst`.
    #[must_use]
    pub fn grant(&self, src: &SpiffeId, dst: &SpiffeId) -> Grant {
        let mut selected = false;
        let mut ranges: Vec<PortRange> = Vec::new();
        for rule in &self.rules {
            if !rule.to.iter().any(|p| p.matches(dst)) {
                continue;
            }
            selected = true;
            if !rule.from.iter().any(|p| p.matches(src)) {
                continue;
            }
            match &rule.ports {
                None => return Grant::All,
                Some(p) => ranges.extend_from_slice(p),
            }
        }
        if !selected {
            return Grant::All;
        }
        if ranges.is_empty() {
            return Grant::None;
        }
        Grant::Ports(merge(ranges))
    }

    #[must_use]
    pub fn decide(&self, local: &SpiffeId, remote: &SpiffeId) -> Decision {
        Decision {
            inbound: self.grant(remote, local),
            outbound: self.grant(local, remote),
        }
    }

    /// Why `local` and `remote` may not talk, for the audit log.
    #[must_use]
    pub fn denial(&self, local: &SpiffeId, remote: &SpiffeId) -> String {
        let selecting = |dst: &SpiffeId| -> Vec<&str> {
            self.rules
                .iter()
                .filter(|r| r.to.iter().any(|p| p.matches(dst)))
                .map(|r| r.name.as_str())
                .collect()
        };
        format!(
            "not authorized by policy `{}`: no rule admits {remote} → {local} (rules selecting it: {}) or {local} → {remote} (rules selecting it: {})",
            self.name,
            selecting(local).join(", "),
            selecting(remote).join(", "),
        )
    }
}

/// Sorts ranges and merges those of one protocol that overlap or touch.
fn merge(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort_by_key(|r| (r.proto, r.first, r.last));
    let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        if let Some(last) = out.last_mut()
            && last.proto == r.proto
            && u32::from(r.first) <= u32::from(last.last) + 1
        {
            last.last = last.last.max(r.last);
            continue;
        }
        out.push(r);
    }
    // A range of both protocols covers the same range of one protocol.
    let both: Vec<PortRange> = out.iter().filter(|r| r.proto == 0).copied().collect();
    out.retain(|r| r.proto == 0 || !both.iter().any(|b| b.first <= r.first && r.last <= b.last));
    out
}

/// A Kubernetes namespace name: lowercase letters, digits and `-`, at most 63, neither first
/// nor last a `-`.
#[must_use]
pub fn valid_namespace(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A rule's port list, merged: refused when it is empty (it would admit nothing: leaving the
/// list out is how every port is said) or holds more distinct ranges than one auth entry.
pub(crate) fn rule_ports(ranges: Vec<PortRange>) -> Result<Vec<PortRange>, String> {
    if ranges.is_empty() {
        return Err(
            "an empty port list admits nothing; leave `ports` out to admit every port".to_owned(),
        );
    }
    let merged = merge(ranges);
    if merged.len() > portcullis_common::MAX_PORT_RANGES {
        return Err(format!(
            "{} distinct port ranges; at most {} fit one auth entry",
            merged.len(),
            portcullis_common::MAX_PORT_RANGES
        ));
    }
    Ok(merged)
}

/// `8080`, `9000-9100`, `53/udp`, `8000-8100/tcp`.
pub fn parse_ports(s: &str) -> Result<PortRange, String> {
    let (ports, proto) = match s.split_once('/') {
        Some((p, "tcp")) => (p, IPPROTO_TCP),
        Some((p, "udp")) => (p, IPPROTO_UDP),
        Some((_, other)) => {
            return Err(format!("`{s}`: protocol `{other}` is not `tcp` or `udp`"));
        }
        None => (s, 0),
    };
    let port = |p: &str| -> Result<u16, String> {
        match p.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(format!(
                "`{s}` is not a port (1-65535), a range `first-last`, optionally with `/tcp` or `/udp`"
            )),
            Ok(n) => Ok(n),
        }
    };
    let (first, last) = match ports.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => {
            let p = port(ports)?;
            (p, p)
        }
    };
    if first > last {
        return Err(format!("`{s}`: the range runs backwards"));
    }
    Ok(PortRange {
        first,
        last,
        proto,
        _pad: [0; 3],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "spiffe://cluster.local";

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(&format!("{TD}/{s}")).unwrap()
    }

    fn parse(text: &str) -> Result<Policy, InputError> {
        Policy::parse(Path::new("policy.yaml"), text)
    }

    const SHOP: &str = "\
name: shop
mode: enforce
namespaces:
  payments: { mode: audit, node_traffic: deny }
  legacy: { mode: off, other_protocols: pass }
rules:
  - name: web-to-api
    from: [\"spiffe://cluster.local/ns/web/*\"]
    to: [\"spiffe://cluster.local/ns/api/sa/api\"]
    ports: [8080, \"9000-9100\", \"53/udp\"]
  - name: batch-to-api
    from: [\"spiffe://cluster.local/ns/batch/sa/job\"]
    to: [\"spiffe://cluster.local/ns/api/sa/api\"]
    ports: [\"8081/tcp\"]
  - name: anyone-to-db-admin
    from: [\"*\"]
    to: [\"spiffe://cluster.local/ns/db/sa/admin\"]
";

    #[test]
    fn patterns_match_exact_prefix_and_any() {
        let cases: &[(&str, &str, bool)] = &[
            ("*", "ns/a/sa/b", true),
            ("spiffe://cluster.local/ns/a/sa/b", "ns/a/sa/b", true),
            ("spiffe://cluster.local/ns/a/sa/b", "ns/a/sa/bb", false),
            ("spiffe://cluster.local/ns/a/*", "ns/a/sa/b", true),
            ("spiffe://cluster.local/ns/a/*", "ns/ab/sa/b", false),
            ("spiffe://cluster.local/ns/a/sa/*", "ns/a/sa/x", true),
            ("spiffe://cluster.local/ns/a/sa/*", "ns/a", false),
            ("spiffe://cluster.local/*", "anything/at/all", true),
            ("spiffe://other.td/*", "ns/a/sa/b", false),
        ];
        for (pattern, ident, want) in cases {
            let p = Pattern::parse(pattern).unwrap();
            assert_eq!(p.matches(&id(ident)), *want, "{pattern} vs {ident}");
        }
        for bad in [
            "spiffe://cluster.local/ns/*/sa/x",
            "web",
            "spiffe://cluster.local/ns/a*",
            "spiffe://Bad/x",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn grants_follow_least_privilege_per_destination() {
        let p = parse(SHOP).unwrap();
        let api = id("ns/api/sa/api");
        let web = id("ns/web/sa/frontend");
        let job = id("ns/batch/sa/job");
        let other = id("ns/other/sa/x");
        let tcp = IPPROTO_TCP;
        let udp = IPPROTO_UDP;
        // (src, dst, proto, port, admitted)
        let cases: &[(&SpiffeId, &SpiffeId, u8, u16, bool)] = &[
            (&web, &api, tcp, 8080, true),
            (&web, &api, udp, 8080, true),
            (&web, &api, tcp, 9050, true),
            (&web, &api, tcp, 9101, false),
            (&web, &api, udp, 53, true),
            (&web, &api, tcp, 53, false),
            (&web, &api, tcp, 8081, false),
            (&job, &api, tcp, 8081, true),
            (&job, &api, udp, 8081, false),
            (&job, &api, tcp, 8080, false),
            (&other, &api, tcp, 8080, false),
            // No rule selects these destinations: any authenticated peer, any port.
            (&api, &web, tcp, 1, true),
            (&other, &job, udp, 65535, true),
            // A rule without ports: every port.
            (&other, &id("ns/db/sa/admin"), tcp, 5432, true),
        ];
        for (src, dst, proto, port, want) in cases {
            assert_eq!(
                p.grant(src, dst).admits(*proto, *port),
                *want,
                "{src} → {dst} {proto}/{port}"
            );
        }
        assert_eq!(p.grant(&other, &api), Grant::None);
        // The pair (api, other): api's side admits nothing inbound, but api may open
        // connections to other, so the pair is authorized in one direction.
        let d = p.decide(&api, &other);
        assert_eq!(d.inbound, Grant::None);
        assert_eq!(d.outbound, Grant::All);
        assert!(d.authorized());
        let p2 = parse(&format!("{SHOP}  - name: api-only-from-web\n    from: [\"spiffe://cluster.local/ns/web/*\"]\n    to: [\"spiffe://cluster.local/ns/other/*\"]\n")).unwrap();
        let d = p2.decide(&api, &other);
        assert!(!d.authorized());
        let why = p2.denial(&api, &other);
        assert!(
            why.contains("policy `shop`")
                && why.contains("web-to-api")
                && why.contains("api-only-from-web"),
            "{why}"
        );
    }

    #[test]
    fn ports_merge_and_render() {
        let p = parse(SHOP).unwrap();
        let g = p.grant(&id("ns/web/sa/a"), &id("ns/api/sa/api"));
        assert_eq!(g.to_string(), "8080,9000-9100,53/udp");
        let merged = merge(vec![
            parse_ports("10-20").unwrap(),
            parse_ports("21-30").unwrap(),
            parse_ports("15/tcp").unwrap(),
            parse_ports("40/udp").unwrap(),
            parse_ports("41/udp").unwrap(),
        ]);
        assert_eq!(
            merged.iter().map(port_range_str).collect::<Vec<_>>(),
            ["10-30", "40-41/udp"]
        );
        for bad in ["0", "70000", "20-10", "53/sctp", "http", "1-"] {
            assert!(parse_ports(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn modes_per_namespace_and_enrollment() {
        let p = parse(SHOP).unwrap();
        let s = |ns: &str| p.settings(ns, &id(&format!("ns/{ns}/sa/x")));
        assert_eq!(s("shop").mode, Mode::Enforce);
        assert!(s("shop").node_traffic && !s("shop").other_protocols);
        assert_eq!(s("payments").mode, Mode::Audit);
        assert!(!s("payments").node_traffic);
        assert_eq!(s("legacy").mode, Mode::Off);
        assert!(s("legacy").other_protocols);
        let p = parse(
            "mode: audit\nenroll:\n  namespaces: [shop]\n  workloads: [\"spiffe://cluster.local/ns/legacy/sa/batch\"]\nnamespaces:\n  shop: { mode: enforce }\n",
        )
        .unwrap();
        assert_eq!(p.settings("shop", &id("ns/shop/sa/a")).mode, Mode::Enforce);
        assert_eq!(
            p.settings("legacy", &id("ns/legacy/sa/batch")).mode,
            Mode::Audit
        );
        assert_eq!(
            p.settings("legacy", &id("ns/legacy/sa/web")).mode,
            Mode::Off
        );
        assert_eq!(p.settings("other", &id("ns/other/sa/a")).mode, Mode::Off);
        let d = Policy::default();
        assert_eq!(d.settings("x", &id("ns/x/sa/y")).mode, Mode::Enforce);
        assert_eq!(d.grant(&id("a"), &id("b")), Grant::All);
    }

    #[test]
    fn syn_macs_and_cross_node_udp_default_and_override_per_namespace() {
        let d = Policy::default().settings("x", &id("ns/x/sa/y"));
        assert_eq!((d.syn_mac, d.cross_node_udp), (MacMode::Require, true));
        let p = parse(
            "syn_mac: audit\nnamespaces:\n  db: { syn_mac: require, cross_node_udp: deny }\n  legacy: { syn_mac: off }\n",
        )
        .unwrap();
        let s = |ns: &str| p.settings(ns, &id(&format!("ns/{ns}/sa/x")));
        assert_eq!(
            (s("web").syn_mac, s("web").cross_node_udp),
            (MacMode::Audit, true)
        );
        assert_eq!(
            (s("db").syn_mac, s("db").cross_node_udp),
            (MacMode::Require, false)
        );
        assert_eq!(
            (s("legacy").syn_mac, s("legacy").mode),
            (MacMode::Off, Mode::Enforce)
        );
        let err = parse("namespaces:\n  db: { syn_mac: strict }\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("namespaces.db.syn_mac") && err.contains("`strict` is not `require`"),
            "{err}"
        );
        let err = parse("cross_node_udp: no\n").unwrap_err().to_string();
        assert!(
            err.contains("cross_node_udp") && err.contains("`no`"),
            "{err}"
        );
    }

    #[test]
    fn bad_edits_name_line_field_and_value() {
        let cases: &[(&str, &str, usize, &str, &str)] = &[
            (
                "mode: enforce",
                "mode: strict",
                2,
                "mode",
                "`strict` is not",
            ),
            (
                "{ mode: audit, node_traffic: deny }",
                "{ mode: audit, node_traffic: maybe }",
                4,
                "namespaces.payments.node_traffic",
                "maybe",
            ),
            (
                "ports: [8080,",
                "ports: [80800,",
                10,
                "rules[0].ports[0]",
                "80800",
            ),
            (
                "\"53/udp\"]",
                "\"53/sctp\"]",
                10,
                "rules[0].ports[2]",
                "sctp",
            ),
            (
                "to: [\"spiffe://cluster.local/ns/api/sa/api\"]\n    ports: [8080",
                "to: [\"spiffe://cluster.local/ns/*/sa/api\"]\n    ports: [8080",
                9,
                "rules[0].to[0]",
                "last path segment",
            ),
            (
                "name: batch-to-api",
                "name: web-to-api",
                11,
                "rules[1].name",
                "also rules[0]",
            ),
            (
                "  legacy: {",
                "  Legacy: {",
                5,
                "namespaces.Legacy",
                "not a namespace",
            ),
            (
                "name: shop\n",
                "name: shop\ncolour: red\n",
                2,
                "colour",
                "Unknown field",
            ),
        ];
        for (from, to, line, field, fragment) in cases {
            assert!(SHOP.contains(from), "{from}");
            let text = SHOP.replacen(from, to, 1);
            let e = parse(&text).unwrap_err();
            assert!(e.to_string().starts_with("policy.yaml:"), "{e}");
            assert!(
                e.field.as_deref().is_some_and(|f| f.starts_with(field)),
                "edit {to:?}: {e}"
            );
            assert!(e.to_string().contains(fragment), "edit {to:?}: {e}");
            assert_eq!(e.line, Some(*line), "edit {to:?}: {e}");
        }
        let too_many = "rules:\n  - from: [\"*\"]\n    to: [\"*\"]\n    ports: [1, 3, 5, 7, 9, 11, 13, 15, 17]\n";
        let e = parse(too_many).unwrap_err();
        assert!(e.to_string().contains("at most 8"), "{e}");
    }
}

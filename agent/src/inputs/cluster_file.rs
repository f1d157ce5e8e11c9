//! The cluster-state file (clusters without a Kubernetes API, the testbed): its format, and its
//! validation into a [`ClusterState`]. A bad edit is reported with file, line and field, and the
//! last good state stays.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
};

use marked_yaml::Spanned;
use serde::{Deserialize, Serialize};

pub use super::index::{Node, Workload};
use crate::{
    identity::{self, SpiffeId},
    input::{self, InputError, Text},
};

/// The file's layout. `S` is a string field: `Spanned<String>` as decoded from YAML with
/// positions, `String` from the fast JSON decoder.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, bound = "S: Text")]
struct File<S> {
    trust_domain: S,
    #[serde(default = "Vec::new")]
    nodes: Vec<NodeEntry<S>>,
    #[serde(default = "Vec::new")]
    workloads: Vec<WorkloadEntry<S>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, bound = "S: Text")]
struct NodeEntry<S> {
    name: S,
    address: S,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, bound = "S: Text")]
struct WorkloadEntry<S> {
    name: S,
    namespace: Option<S>,
    service_account: Option<S>,
    spiffe_id: Option<S>,
    node: S,
    addresses: Vec<S>,
}

/// A validated, self-consistent view of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ClusterState {
    pub trust_domain: String,
    pub nodes: BTreeMap<String, Node>,
    pub workloads: Vec<Workload>,
}

impl ClusterState {
    /// Parses and validates a cluster-state file. A JSON document (YAML's subset, what
    /// generators of large files emit) is first decoded by serde_json, an order of magnitude
    /// faster than the YAML loader; if that decode or the validation fails, the file is read
    /// again by the YAML loader so that the error names its line and column.
    pub fn parse(file: &Path, text: &str) -> Result<Self, InputError> {
        if text.trim_start().starts_with('{')
            && let Ok(state) = serde_json::from_str::<File<String>>(text)
                .map_err(drop)
                .and_then(|f| Self::validate(file, f).map_err(drop))
        {
            return Ok(state);
        }
        Self::validate(file, input::parse::<File<Spanned<String>>>(file, text)?)
    }

    /// Workloads scheduled on `node`.
    pub fn local_workloads<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads.iter().filter(move |w| *w.node == *node)
    }

    fn validate<S: Text>(path: &Path, f: File<S>) -> Result<Self, InputError> {
        let trust_domain = f.trust_domain.text();
        identity::validate_trust_domain(trust_domain).map_err(|e| {
            InputError::value(
                path,
                &f.trust_domain,
                "trust_domain",
                format!("`{trust_domain}`: {e}"),
            )
        })?;
        let mut nodes = BTreeMap::new();
        for (i, n) in f.nodes.iter().enumerate() {
            let field = |name: &str| format!("nodes[{i}].{name}");
            check_dns_name(path, &n.name, || field("name"))?;
            let address: SocketAddr = n.address.text().parse().map_err(|_| {
                InputError::value(
                    path,
                    &n.address,
                    field("address"),
                    format!(
                        "`{}` is not an address:port such as 198.18.0.1:4181 or [fd00::1]:4181",
                        n.address.text()
                    ),
                )
            })?;
            let node = Node {
                name: n.name.text().to_owned(),
                address,
            };
            if nodes.insert(node.name.clone(), node).is_some() {
                return Err(InputError::value(
                    path,
                    &n.name,
                    field("name"),
                    format!("node `{}` is listed twice", n.name.text()),
                ));
            }
        }
        let node_names: HashMap<&str, Arc<str>> = nodes
            .keys()
            .map(|n| (n.as_str(), Arc::from(n.as_str())))
            .collect();
        // Identities already made, shared by the pods of a service account.
        let mut identities: HashMap<(&str, &str), SpiffeId> = HashMap::new();
        // Indexes into `workloads`, so that a large file costs no string per entry here.
        let mut owners: HashMap<IpAddr, usize> = HashMap::with_capacity(f.workloads.len());
        let mut names: HashMap<(&str, &str), usize> = HashMap::with_capacity(f.workloads.len());
        let mut workloads = Vec::with_capacity(f.workloads.len());
        for (i, w) in f.workloads.iter().enumerate() {
            let field = |name: &str| format!("workloads[{i}].{name}");
            check_dns_name(path, &w.name, || field("name"))?;
            let namespace = match &w.namespace {
                Some(ns) => {
                    check_dns_name(path, ns, || field("namespace"))?;
                    ns.text()
                }
                None => "default",
            };
            if let Some(prev) = names.insert((namespace, w.name.text()), i) {
                return Err(InputError::value(
                    path,
                    &w.name,
                    field("name"),
                    format!(
                        "workload `{namespace}/{}` is also workloads[{prev}]",
                        w.name.text()
                    ),
                ));
            }
            let identity = match (&w.service_account, &w.spiffe_id) {
                (Some(sa), Some(_)) => {
                    return Err(InputError::value(
                        path,
                        sa,
                        field("service_account"),
                        "give service_account or spiffe_id, not both",
                    ));
                }
                (_, Some(id)) => {
                    let parsed = SpiffeId::parse(id.text()).map_err(|e| {
                        InputError::value(
                            path,
                            id,
                            field("spiffe_id"),
                            format!("`{}`: {e}", id.text()),
                        )
                    })?;
                    if parsed.trust_domain() != trust_domain {
                        return Err(InputError::value(
                            path,
                            id,
                            field("spiffe_id"),
                            format!("`{}` is not in trust domain `{trust_domain}`", id.text()),
                        ));
                    }
                    // The issuer's and the nodes' own identities: a workload holding one would
                    // be proven by a node SVID.
                    if crate::issuer::protocol::is_reserved(&parsed) {
                        return Err(InputError::value(
                            path,
                            id,
                            field("spiffe_id"),
                            format!(
                                "`{}` is reserved (`/portcullis/...` names the issuer and the nodes)",
                                id.text()
                            ),
                        ));
                    }
                    parsed
                }
                (Some(sa), None) => match identities.get(&(namespace, sa.text())) {
                    Some(id) => id.clone(),
                    None => {
                        check_dns_name(path, sa, || field("service_account"))?;
                        let id = SpiffeId::for_service_account(trust_domain, namespace, sa.text())
                            .map_err(|e| {
                                InputError::value(path, sa, field("service_account"), e)
                            })?;
                        identities.insert((namespace, sa.text()), id.clone());
                        id
                    }
                },
                (None, None) => SpiffeId::for_service_account(trust_domain, namespace, "default")
                    .map_err(|e| InputError::value(path, &w.name, field("name"), e))?,
            };
            let Some(node_name) = node_names.get(w.node.text()) else {
                return Err(InputError::value(
                    path,
                    &w.node,
                    field("node"),
                    format!("no node named `{}` in `nodes`", w.node.text()),
                ));
            };
            if w.addresses.is_empty() {
                return Err(InputError::value(
                    path,
                    &w.name,
                    field("addresses"),
                    "a workload needs at least one address",
                ));
            }
            let mut addresses = Vec::with_capacity(w.addresses.len());
            for (j, a) in w.addresses.iter().enumerate() {
                let f_addr = || field(&format!("addresses[{j}]"));
                let ip: IpAddr = a.text().parse().map_err(|_| {
                    InputError::value(
                        path,
                        a,
                        f_addr(),
                        format!("`{}` is not an IPv4 or IPv6 address", a.text()),
                    )
                })?;
                if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
                    return Err(InputError::value(
                        path,
                        a,
                        f_addr(),
                        format!("`{ip}` cannot be a pod address"),
                    ));
                }
                if let Some(owner) = owners.insert(ip, i) {
                    let owner = &f.workloads[owner];
                    return Err(InputError::value(
                        path,
                        a,
                        f_addr(),
                        format!(
                            "`{ip}` already belongs to workload `{}/{}`",
                            owner.namespace.as_ref().map_or("default", Text::text),
                            owner.name.text()
                        ),
                    ));
                }
                addresses.push(ip);
            }
            workloads.push(Workload {
                name: w.name.text().to_owned(),
                namespace: namespace.to_owned(),
                identity,
                node: node_name.clone(),
                addresses,
            });
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            nodes,
            workloads,
        })
    }
}

/// Kubernetes object names: lowercase alphanumerics, `-` and `.`, starting and ending with an
/// alphanumeric, at most 253 characters.
fn check_dns_name(
    path: &Path,
    v: &impl Text,
    field: impl FnOnce() -> String,
) -> Result<(), InputError> {
    let s = v.text();
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if s.is_empty()
        || s.len() > 253
        || !s.chars().all(ok_char)
        || !edge(s.chars().next())
        || !edge(s.chars().last())
    {
        return Err(InputError::value(
            path,
            v,
            field(),
            format!(
                "`{s}` is not a valid name (lowercase letters, digits, `-` and `.`, at most 253, starting and ending with a letter or digit)"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const GOOD: &str = "\
trust_domain: cluster.local
nodes:
  - name: node-1
    address: 198.18.0.1:4181
  - name: node-2
    address: \"[fd00:18::2]:4181\"
workloads:
  - name: client
    service_account: client-sa
    node: node-1
    addresses: [198.18.1.2, fd00:18:1::2]
  - name: server
    namespace: shop
    spiffe_id: spiffe://cluster.local/custom/server
    node: node-2
    addresses: [198.18.2.2]
  - name: plain
    node: node-2
    addresses: [198.18.2.3]
";

    fn parse(text: &str) -> Result<ClusterState, InputError> {
        ClusterState::parse(Path::new("cluster.yaml"), text)
    }

    #[test]
    fn parses_nodes_workloads_and_identities() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(
            c.nodes["node-2"].address,
            "[fd00:18::2]:4181".parse().unwrap()
        );
        assert_eq!(
            c.workloads[0].identity.as_str(),
            "spiffe://cluster.local/ns/default/sa/client-sa"
        );
        assert_eq!(c.workloads[0].addresses.len(), 2);
        assert_eq!(
            c.workloads[1].identity.as_str(),
            "spiffe://cluster.local/custom/server"
        );
        assert_eq!(
            c.workloads[2].identity.as_str(),
            "spiffe://cluster.local/ns/default/sa/default"
        );
        assert_eq!(c.local_workloads("node-2").count(), 2);
    }

    /// The JSON form decodes to the same state, and its defects are still reported with their
    /// line and field (found by the YAML loader once the fast decoder has failed).
    #[test]
    fn json_form_is_the_same_state_and_errors_keep_their_position() {
        let json = serde_json::to_string_pretty(&serde_json::json!({
            "trust_domain": "cluster.local",
            "nodes": [
                {"name": "node-1", "address": "198.18.0.1:4181"},
                {"name": "node-2", "address": "[fd00:18::2]:4181"},
            ],
            "workloads": [
                {"name": "client", "service_account": "client-sa", "node": "node-1",
                 "addresses": ["198.18.1.2", "fd00:18:1::2"]},
                {"name": "server", "namespace": "shop",
                 "spiffe_id": "spiffe://cluster.local/custom/server", "node": "node-2",
                 "addresses": ["198.18.2.2"]},
                {"name": "plain", "node": "node-2", "addresses": ["198.18.2.3"]},
            ],
        }))
        .unwrap();
        assert_eq!(parse(&json).unwrap(), parse(GOOD).unwrap());

        let bad = json.replacen("198.18.2.3", "198.18.2.999", 1);
        let line = 1 + bad[..bad.find("198.18.2.999").unwrap()]
            .matches('\n')
            .count();
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.line, Some(line), "{e}");
        assert_eq!(e.field.as_deref(), Some("workloads[2].addresses[0]"), "{e}");
        assert!(e.message.contains("198.18.2.999"), "{e}");

        let unknown = json.replacen("\"trust_domain\"", "\"trust_domian\"", 1);
        let e = parse(&unknown).unwrap_err();
        assert!(e.to_string().contains("trust_domian"), "{e}");
    }

    /// Each edit: (replace this, with that) → expected line, field, and a message fragment.
    #[test]
    fn bad_edits_name_line_field_and_value() {
        let cases: &[(&str, &str, usize, &str, &str)] = &[
            (
                "trust_domain: cluster.local",
                "trust_domain: Cluster",
                1,
                "trust_domain",
                "Cluster",
            ),
            (
                "address: 198.18.0.1:4181",
                "address: 198.18.0.1",
                4,
                "nodes[0].address",
                "198.18.0.1",
            ),
            (
                "- name: node-2",
                "- name: node-1",
                5,
                "nodes[1].name",
                "listed twice",
            ),
            (
                "node: node-1\n    addresses",
                "node: node-9\n    addresses",
                10,
                "workloads[0].node",
                "node-9",
            ),
            (
                "[198.18.1.2, fd00",
                "[198.18.1.999, fd00",
                11,
                "workloads[0].addresses[0]",
                "198.18.1.999",
            ),
            (
                "[198.18.2.3]",
                "[198.18.2.2]",
                19,
                "workloads[2].addresses[0]",
                "already belongs to workload `shop/server`",
            ),
            (
                "spiffe://cluster.local/custom/server",
                "spiffe://other.td/x",
                14,
                "workloads[1].spiffe_id",
                "not in trust domain",
            ),
            (
                "spiffe://cluster.local/custom/server",
                "spiffe://cluster.local/a//b",
                14,
                "workloads[1].spiffe_id",
                "empty segment",
            ),
            (
                "spiffe://cluster.local/custom/server",
                "spiffe://cluster.local/portcullis/node/node-2",
                14,
                "workloads[1].spiffe_id",
                "is reserved",
            ),
            (
                "service_account: client-sa",
                "service_account: Client",
                9,
                "workloads[0].service_account",
                "Client",
            ),
            (
                "name: plain",
                "name: plain\n    colour: red",
                18,
                "workloads[2].colour",
                "Unknown field `colour`",
            ),
        ];
        for (from, to, line, field, fragment) in cases {
            assert!(GOOD.contains(from), "{from}");
            let text = GOOD.replacen(from, to, 1);
            let e = parse(&text).unwrap_err();
            assert!(e.to_string().starts_with("cluster.yaml:"), "{e}");
            assert!(
                e.field.as_deref().is_some_and(|f| f.starts_with(field)),
                "edit {to:?}: {e}"
            );
            assert!(
                e.message.contains(fragment) || e.to_string().contains(fragment),
                "edit {to:?}: {e}"
            );
            assert_eq!(e.line, Some(*line), "edit {to:?}: {e}");
        }
    }
}

//! The policy as Kubernetes custom resources: a namespaced `PortcullisPolicy` (a namespace's
//! settings and the rules that select destinations in it) and a cluster-scoped
//! `PortcullisClusterPolicy` (defaults, enrollment, cluster-wide rules). Their
//! `openAPIV3Schema` is generated from these types (`portcullis crds` prints the definitions,
//! shipped as `deploy/crds.yaml`), and the doc comments are what `kubectl explain` shows.
//!
//! The schema catches what a schema can (types, enums, port numbers); what it cannot (a
//! pattern that is not a SPIFFE ID, an empty port range, more ranges than an auth entry holds,
//! a destination outside the object's namespace) the issuer checks ([`super::objects`]) and
//! writes to `status.conditions`. Agents apply only `status.acceptedSpec`, the last generation
//! the issuer accepted.

// Each `printcolumn(...)` of the derive names its `type_`; clippy takes the repeats for
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::{borrow::Cow, collections::BTreeMap, fmt::Debug};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{Api, Client, CustomResource, CustomResourceExt, Resource, api::ObjectMeta};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{
    MacMode, Mode,
    objects::{self, FieldError, Fragment, PolicyObjects},
};

/// The API group of both resources.
pub const GROUP: &str = "portcullis.dev";
/// Their version.
pub const VERSION: &str = "v1alpha1";

/// A namespace's authorization policy: who may open connections to the workloads of this
/// namespace, on which ports, and (in the object named `default` only) how strictly the
/// namespace is enforced. The issuer checks each generation and reports it in
/// `status.conditions` (type `Accepted`); agents enforce the last accepted generation.
#[derive(CustomResource, Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "PortcullisPolicy",
    plural = "portcullispolicies",
    namespaced,
    status = "PolicyStatus<PortcullisPolicySpec>",
    shortname = "pcp",
    category = "portcullis",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(
        name = "Mode",
        type_ = "string",
        json_path = ".status.acceptedSpec.mode",
        description = "The namespace's mode in force (set in the object named default; empty: the cluster's)"
    ),
    printcolumn(
        name = "Rules",
        type_ = "integer",
        json_path = ".status.rules",
        description = "Rules of the accepted generation"
    ),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status",
        description = "Whether the issuer accepted the current generation"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    doc = "A namespace's portcullis authorization policy: rules selecting destinations in this namespace, and, in the object named `default`, the namespace's enforcement settings."
)]
#[serde(rename_all = "camelCase")]
pub struct PortcullisPolicySpec {
    #[serde(flatten)]
    pub settings: SettingsSpec,
    /// Who may open connections to this namespace's workloads. A destination no rule selects
    /// accepts any authenticated peer of the trust domain; a destination some rule selects
    /// accepts only the sources, ports and protocols those rules allow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub rules: Vec<RuleSpec>,
}

/// The cluster's portcullis policy: defaults for every namespace, which workloads are
/// enrolled, and rules over the whole cluster. Settings and enrollment are read from the
/// object named `default`; other objects hold rules only. The issuer checks each generation
/// and reports it in `status.conditions` (type `Accepted`).
#[derive(CustomResource, Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "PortcullisClusterPolicy",
    plural = "portcullisclusterpolicies",
    status = "PolicyStatus<PortcullisClusterPolicySpec>",
    shortname = "pccp",
    category = "portcullis",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(
        name = "Mode",
        type_ = "string",
        json_path = ".status.acceptedSpec.mode",
        description = "The default mode in force (set in the object named default)"
    ),
    printcolumn(
        name = "Rules",
        type_ = "integer",
        json_path = ".status.rules",
        description = "Rules of the accepted generation"
    ),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status",
        description = "Whether the issuer accepted the current generation"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    doc = "The cluster's portcullis policy: defaults and enrollment (in the object named `default`) and cluster-wide rules."
)]
#[serde(rename_all = "camelCase")]
pub struct PortcullisClusterPolicySpec {
    #[serde(flatten)]
    pub settings: SettingsSpec,
    /// Which workloads are enforced at all. Absent: every workload. A workload not enrolled
    /// is in mode `disabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enroll: Option<EnrollSpec>,
    /// Rules over the whole cluster, for destinations in any namespace; they add to the
    /// namespaces' own rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub rules: Vec<RuleSpec>,
}

/// How strictly workloads are enforced. A field left out keeps the value of the level above
/// (the cluster's `default` object, then the built-in defaults).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SettingsSpec {
    /// `enforce` (drop what is not authenticated and authorized), `audit` (pass it and report
    /// it) or `disabled` (not enforced; the policy file's `off`). Built-in default: `enforce`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ModeSpec>,
    /// Connections from the node's own addresses (kubelet probes): `allow` or `deny`.
    /// Built-in default: `allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_traffic: Option<Allowance>,
    /// IP protocols other than TCP and UDP (ICMP echo…): `pass` or `drop`. Built-in default:
    /// `drop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_protocols: Option<Passage>,
    /// Connection MACs on new TCP connections: `require` (a SYN without a valid MAC from its
    /// source node is dropped), `audit` (admitted and reported) or `disabled` (admitted by source
    /// address; the policy file's `off`). Built-in default: `require`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syn_mac: Option<MacModeSpec>,
    /// New UDP flows from pods on other nodes (UDP carries no MAC: admitted by source
    /// address): `allow` or `deny`. Built-in default: `allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_node_udp: Option<Allowance>,
}

impl SettingsSpec {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

// The values are never `off`, `on`, `yes` or `no`: YAML 1.1 parsers (kubectl's among them) read
// those unquoted as booleans, which the schema would then refuse.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ModeSpec {
    Enforce,
    Audit,
    Disabled,
}

impl From<ModeSpec> for Mode {
    fn from(m: ModeSpec) -> Self {
        match m {
            ModeSpec::Enforce => Self::Enforce,
            ModeSpec::Audit => Self::Audit,
            ModeSpec::Disabled => Self::Off,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MacModeSpec {
    Require,
    Audit,
    Disabled,
}

impl From<MacModeSpec> for MacMode {
    fn from(m: MacModeSpec) -> Self {
        match m {
            MacModeSpec::Require => Self::Require,
            MacModeSpec::Audit => Self::Audit,
            MacModeSpec::Disabled => Self::Off,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Allowance {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Passage {
    Pass,
    Drop,
}

/// Which workloads are enrolled: those of these namespaces, and those these patterns match.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnrollSpec {
    /// Namespaces whose every workload is enrolled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024), inner(length(max = 63)))]
    pub namespaces: Vec<String>,
    /// SPIFFE IDs or patterns (`spiffe://td/ns/legacy/sa/batch`, `spiffe://td/ns/web/*`) of
    /// workloads enrolled wherever they run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024), inner(length(max = 2048)))]
    pub workloads: Vec<String>,
}

/// One allow rule: connections from `from` to `to` on `ports`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleSpec {
    /// Named in denials and in the audit log (`pcp shop/api#name`). Unique in the object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,
    /// Sources: SPIFFE IDs (`spiffe://cluster.local/ns/web/sa/frontend`), patterns ending in
    /// `/*` (`spiffe://cluster.local/ns/web/*`: every workload of namespace web), or `*` (any
    /// authenticated workload).
    #[schemars(length(min = 1, max = 64), inner(length(max = 2048)))]
    pub from: Vec<String>,
    /// Destinations, as `from`. In a PortcullisPolicy they must lie in the object's namespace,
    /// and `*` or leaving `to` out selects every workload of it; in a PortcullisClusterPolicy
    /// `to` is required.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 2048)))]
    pub to: Vec<String>,
    /// The ports `to` may be reached on. Absent: every port of TCP and UDP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub ports: Option<Vec<PortSpec>>,
}

/// A port or a range of ports, as in a NetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortSpec {
    /// The port, or the first of the range.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// The last port of the range (not below `port`). Absent: `port` alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<i32>,
    /// `TCP`, `UDP` or `ANY`. Absent: `ANY` (both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "ANY")]
    Any,
}

/// What the issuer found, and the generation the agents enforce. Written by the issuer only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus<S> {
    /// The generation the issuer last checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`: `True` when the generation `observedGeneration` is in force; `False` with
    /// the field and value at fault, while the agents keep `acceptedGeneration`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Rules of the accepted generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<i32>,
    /// The generation the agents enforce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_generation: Option<i64>,
    /// The spec of that generation, as the agents read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_spec: Option<S>,
}

impl<S> Default for PolicyStatus<S> {
    fn default() -> Self {
        Self {
            observed_generation: None,
            conditions: Vec::new(),
            rules: None,
            accepted_generation: None,
            accepted_spec: None,
        }
    }
}

fn spec_schema_of(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> serde_json::Value {
    let v = serde_json::to_value(crd).unwrap_or_default();
    v["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
}

/// A policy object's namespace (`None`: cluster-scoped) and name.
pub type ObjectKey = (Option<String>, String);

#[must_use]
pub fn key_of(meta: &ObjectMeta) -> ObjectKey {
    (
        meta.namespace.clone(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// What a policy object is called in the status, the logs and denials: `pcp shop/api`,
/// `pccp default` (kubectl's short names).
#[must_use]
pub fn label((ns, name): &ObjectKey) -> String {
    match ns {
        Some(ns) => format!("pcp {ns}/{name}"),
        None => format!("pccp {name}"),
    }
}

/// What the watchers, the agents' merge, the issuer's status writer and `check-policy` need of
/// either kind: one code path for both.
pub trait PolicyResource:
    Resource<DynamicType = ()>
    + CustomResourceExt
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    type Spec: Clone + PartialEq + Debug + Serialize + DeserializeOwned + Send + Sync;
    fn spec(&self) -> &Self::Spec;
    fn status(&self) -> Option<&PolicyStatus<Self::Spec>>;
    fn status_mut(&mut self) -> &mut Option<PolicyStatus<Self::Spec>>;
    /// The issuer's check of `spec` for the object `key` names.
    fn check(
        key: &ObjectKey,
        spec: &Self::Spec,
        trust_domain: &str,
    ) -> Result<Fragment, FieldError>;
    /// An API handle on the collection of the object `key` names.
    fn api(client: Client, key: &ObjectKey) -> Api<Self>;
    /// The generated OpenAPI schema of `spec`, made once.
    fn spec_schema() -> &'static serde_json::Value;
    /// The objects of this kind in the store.
    fn stored(objects: &PolicyObjects) -> &BTreeMap<ObjectKey, Decoded<Self>>;
    fn stored_mut(objects: &mut PolicyObjects) -> &mut BTreeMap<ObjectKey, Decoded<Self>>;
}

impl PolicyResource for PortcullisPolicy {
    fn spec_schema() -> &'static serde_json::Value {
        static SCHEMA: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
        SCHEMA.get_or_init(|| spec_schema_of(&Self::crd()))
    }
    type Spec = PortcullisPolicySpec;
    fn spec(&self) -> &Self::Spec {
        &self.spec
    }
    fn status(&self) -> Option<&PolicyStatus<Self::Spec>> {
        self.status.as_ref()
    }
    fn status_mut(&mut self) -> &mut Option<PolicyStatus<Self::Spec>> {
        &mut self.status
    }
    fn check(
        (ns, name): &ObjectKey,
        spec: &Self::Spec,
        trust_domain: &str,
    ) -> Result<Fragment, FieldError> {
        objects::check_namespaced(ns.as_deref().unwrap_or_default(), name, spec, trust_domain)
    }
    fn api(client: Client, (ns, _): &ObjectKey) -> Api<Self> {
        Api::namespaced(client, ns.as_deref().unwrap_or_default())
    }
    fn stored(objects: &PolicyObjects) -> &BTreeMap<ObjectKey, Decoded<Self>> {
        &objects.namespaced
    }
    fn stored_mut(objects: &mut PolicyObjects) -> &mut BTreeMap<ObjectKey, Decoded<Self>> {
        &mut objects.namespaced
    }
}

impl PolicyResource for PortcullisClusterPolicy {
    fn spec_schema() -> &'static serde_json::Value {
        static SCHEMA: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
        SCHEMA.get_or_init(|| spec_schema_of(&Self::crd()))
    }
    type Spec = PortcullisClusterPolicySpec;
    fn spec(&self) -> &Self::Spec {
        &self.spec
    }
    fn status(&self) -> Option<&PolicyStatus<Self::Spec>> {
        self.status.as_ref()
    }
    fn status_mut(&mut self) -> &mut Option<PolicyStatus<Self::Spec>> {
        &mut self.status
    }
    fn check(
        (_, name): &ObjectKey,
        spec: &Self::Spec,
        trust_domain: &str,
    ) -> Result<Fragment, FieldError> {
        objects::check_cluster(name, spec, trust_domain)
    }
    fn api(client: Client, _: &ObjectKey) -> Api<Self> {
        Api::all(client)
    }
    fn stored(objects: &PolicyObjects) -> &BTreeMap<ObjectKey, Decoded<Self>> {
        &objects.cluster
    }
    fn stored_mut(objects: &mut PolicyObjects) -> &mut BTreeMap<ObjectKey, Decoded<Self>> {
        &mut objects.cluster
    }
}

/// An object as a watcher delivers it: decoded, or, when this version cannot decode it (an
/// object of a newer definition), its metadata and why. One object that does not decode must
/// not stop the list of all the others.
#[derive(Debug, Clone)]
pub struct Decoded<K> {
    pub meta: ObjectMeta,
    pub object: Result<K, String>,
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Decoded<K> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        let meta = v
            .get("metadata")
            .map(|m| serde_json::from_value::<ObjectMeta>(m.clone()))
            .transpose()
            .map_err(serde::de::Error::custom)?
            .unwrap_or_default();
        let object = serde_json::from_value::<K>(v).map_err(|e| e.to_string());
        Ok(Self { meta, object })
    }
}

impl<K: Resource<DynamicType = ()>> Resource for Decoded<K> {
    type DynamicType = ();
    type Scope = K::Scope;
    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
    }
}

/// Both definitions, as YAML documents: what `deploy/crds.yaml` holds.
#[must_use]
pub fn definitions_yaml() -> String {
    let mut out = String::from(
        "# Generated from agent/src/policy/crd.rs by `portcullis crds`; do not edit.\n",
    );
    for crd in [PortcullisPolicy::crd(), PortcullisClusterPolicy::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd).expect("a CRD serializes"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped definitions are the generated ones.
    #[test]
    fn the_shipped_definitions_are_up_to_date() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds.yaml");
        let shipped = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            shipped == definitions_yaml(),
            "deploy/crds.yaml is out of date: regenerate it with `cargo run -p portcullis-agent -- crds > deploy/crds.yaml`"
        );
    }
}

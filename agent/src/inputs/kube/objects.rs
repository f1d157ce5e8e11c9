//! The Pod and Node objects as the agent keeps them: only the fields it uses. They are decoded
//! straight from the API server's JSON, so a Pod's managed fields, spec and status (about 4 KB
//! of JSON on a real cluster) are skipped by the decoder rather than held in memory.

use std::{borrow::Cow, collections::BTreeMap, fmt, net::IpAddr};

use k8s_openapi::{
    ClusterResourceScope, NamespaceResourceScope,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use serde::{Deserialize, Deserializer, de};

/// The annotation the kubelet puts on mirror pods (static pods shown in the API).
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodObject {
    /// Name, namespace, uid, resource version, creation and deletion times, and only the
    /// mirror annotation.
    pub meta: ObjectMeta,
    pub node: Option<String>,
    pub service_account: Option<String>,
    pub host_network: bool,
    pub phase: Option<String>,
    /// `status.podIPs`, or `status.podIP` when that is empty, as written (parsed later, so that
    /// a bad one can be reported).
    pub ips: Vec<String>,
}

impl PodObject {
    #[must_use]
    pub fn is_mirror(&self) -> bool {
        self.meta
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION))
    }

    #[must_use]
    pub fn created(&self) -> Option<&Time> {
        self.meta.creation_timestamp.as_ref()
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeObject {
    pub meta: ObjectMeta,
    /// `status.addresses` of type `InternalIP`.
    pub internal_ips: Vec<IpAddr>,
    /// Every address of `status.addresses` that is an IP (internal and external).
    pub all_ips: Vec<IpAddr>,
    /// `spec.podCIDRs` (or `spec.podCIDR`), as written.
    pub pod_cidrs: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct MetaWire {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    creation_timestamp: Option<Time>,
    deletion_timestamp: Option<Time>,
    #[serde(default, deserialize_with = "mirror_only")]
    annotations: Option<BTreeMap<String, String>>,
}

impl From<MetaWire> for ObjectMeta {
    fn from(m: MetaWire) -> Self {
        Self {
            name: m.name,
            namespace: m.namespace,
            uid: m.uid,
            resource_version: m.resource_version,
            creation_timestamp: m.creation_timestamp,
            deletion_timestamp: m.deletion_timestamp,
            annotations: m.annotations,
            ..Self::default()
        }
    }
}

/// Annotations, keeping only the mirror-pod marker: the rest can be large and is not used.
fn mirror_only<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct Visitor;
    impl<'de> de::Visitor<'de> for Visitor {
        type Value = Option<BTreeMap<String, String>>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map of annotations")
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }

        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut kept = BTreeMap::new();
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                if key == MIRROR_ANNOTATION {
                    kept.insert(key.into_owned(), map.next_value::<String>()?);
                } else {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
            Ok((!kept.is_empty()).then_some(kept))
        }
    }
    d.deserialize_option(Visitor)
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodSpecWire {
    node_name: Option<String>,
    service_account_name: Option<String>,
    host_network: Option<bool>,
}

#[derive(Deserialize)]
struct IpWire {
    ip: String,
}

#[derive(Deserialize, Default)]
struct PodStatusWire {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pod_ips: Option<Vec<IpWire>>,
}

#[derive(Deserialize)]
struct PodWire {
    #[serde(default)]
    metadata: MetaWire,
    #[serde(default)]
    spec: Option<PodSpecWire>,
    #[serde(default)]
    status: Option<PodStatusWire>,
}

impl<'de> Deserialize<'de> for PodObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = PodWire::deserialize(d)?;
        let spec = w.spec.unwrap_or_default();
        let status = w.status.unwrap_or_default();
        let mut ips: Vec<String> = status
            .pod_ips
            .unwrap_or_default()
            .into_iter()
            .map(|i| i.ip)
            .collect();
        if ips.is_empty()
            && let Some(ip) = status.pod_ip.filter(|i| !i.is_empty())
        {
            ips.push(ip);
        }
        Ok(Self {
            meta: w.metadata.into(),
            node: spec.node_name.filter(|n| !n.is_empty()),
            service_account: spec.service_account_name.filter(|s| !s.is_empty()),
            host_network: spec.host_network == Some(true),
            phase: status.phase,
            ips,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct NodeSpecWire {
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
    #[serde(rename = "podCIDRs")]
    pod_cidrs: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct NodeAddressWire {
    #[serde(rename = "type")]
    kind: String,
    address: String,
}

#[derive(Deserialize, Default)]
struct NodeStatusWire {
    addresses: Option<Vec<NodeAddressWire>>,
}

#[derive(Deserialize)]
struct NodeWire {
    #[serde(default)]
    metadata: MetaWire,
    #[serde(default)]
    spec: Option<NodeSpecWire>,
    #[serde(default)]
    status: Option<NodeStatusWire>,
}

impl<'de> Deserialize<'de> for NodeObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = NodeWire::deserialize(d)?;
        let spec = w.spec.unwrap_or_default();
        let mut pod_cidrs = spec.pod_cidrs.unwrap_or_default();
        if pod_cidrs.is_empty()
            && let Some(c) = spec.pod_cidr.filter(|c| !c.is_empty())
        {
            pod_cidrs.push(c);
        }
        let addresses = w.status.and_then(|s| s.addresses).unwrap_or_default();
        let ip = |a: &NodeAddressWire| a.address.parse::<IpAddr>().ok();
        Ok(Self {
            meta: w.metadata.into(),
            internal_ips: addresses
                .iter()
                .filter(|a| a.kind == "InternalIP")
                .filter_map(ip)
                .collect(),
            all_ips: addresses.iter().filter_map(ip).collect(),
            pod_cidrs,
        })
    }
}

macro_rules! resource {
    ($ty:ty, $kind:literal, $plural:literal, $scope:ty) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = $scope;

            fn kind((): &()) -> Cow<'_, str> {
                $kind.into()
            }

            fn group((): &()) -> Cow<'_, str> {
                "".into()
            }

            fn version((): &()) -> Cow<'_, str> {
                "v1".into()
            }

            fn plural((): &()) -> Cow<'_, str> {
                $plural.into()
            }

            fn meta(&self) -> &ObjectMeta {
                &self.meta
            }

            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.meta
            }
        }
    };
}

resource!(PodObject, "Pod", "pods", NamespaceResourceScope);
resource!(NodeObject, "Node", "nodes", ClusterResourceScope);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_keeps_only_what_is_used() {
        let pod: PodObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1", "resourceVersion": "7",
                         "creationTimestamp": "2026-11-23T09:30:00Z",
                         "labels": {"app": "web"},
                         "annotations": {"prometheus.io/port": "9090", "kubernetes.io/config.mirror": "abc"},
                         "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]},
            "spec": {"nodeName": "n1", "serviceAccountName": "web", "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "podIP": "198.18.1.2", "podIPs": [{"ip": "198.18.1.2"}, {"ip": "fd00:18:1::2"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        assert_eq!(pod.meta.name.as_deref(), Some("web"));
        assert_eq!(pod.meta.resource_version.as_deref(), Some("7"));
        assert!(pod.meta.labels.is_none() && pod.meta.managed_fields.is_none());
        assert!(pod.is_mirror());
        assert_eq!(pod.meta.annotations.as_ref().map(BTreeMap::len), Some(1));
        assert_eq!(pod.ips, ["198.18.1.2", "fd00:18:1::2"]);
        assert_eq!(pod.node.as_deref(), Some("n1"));
        // A bookmark-like object with no spec or status still decodes.
        let bare: PodObject =
            serde_json::from_value(serde_json::json!({"metadata": {"resourceVersion": "9"}}))
                .unwrap();
        assert!(bare.ips.is_empty() && !bare.host_network);
    }

    #[test]
    fn a_node_keeps_its_addresses_and_pod_cidrs() {
        let node: NodeObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1"},
            "spec": {"podCIDR": "198.18.1.0/24", "podCIDRs": ["198.18.1.0/24", "fd00:18:1::/64"]},
            "status": {"addresses": [{"type": "Hostname", "address": "n1"},
                                     {"type": "ExternalIP", "address": "198.19.0.1"},
                                     {"type": "InternalIP", "address": "198.18.0.1"}],
                       "images": [{"names": ["x"], "sizeBytes": 1}]}
        }))
        .unwrap();
        assert_eq!(node.internal_ips, ["198.18.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(node.all_ips.len(), 2);
        assert_eq!(node.pod_cidrs, ["198.18.1.0/24", "fd00:18:1::/64"]);
    }
}

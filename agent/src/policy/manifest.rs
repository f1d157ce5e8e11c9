//! `portcullis check-policy` of a manifest: each policy object of a `kubectl apply -f` input
//! checked as the API server would (strict field validation against the generated schema,
//! then decoding) and then as the issuer would ([`super::objects`]), naming the field at fault.

use super::{
    crd::{
        EnrollSpec, ObjectKey, PolicyResource, PortcullisClusterPolicy, PortcullisPolicy, RuleSpec,
        SettingsSpec, label,
    },
    objects::{FieldError, Fragment, SETTINGS_FIELDS},
};

/// One policy object of a manifest, checked as the API server (strict field validation) and
/// then the issuer would: `Err` names the field at fault.
#[derive(Debug)]
pub struct Checked {
    /// `pcp shop/api`, `pccp default`, or the document's position when it has no name.
    pub label: String,
    pub verdict: Result<Fragment, FieldError>,
}

/// Whether `text` (YAML, possibly several documents) holds Kubernetes objects rather than a
/// policy file: any document with a `kind`.
#[must_use]
pub fn is_manifest(text: &str) -> bool {
    use serde::Deserialize as _;
    for doc in serde_yaml::Deserializer::from_str(text) {
        // After a document that does not parse, the iterator yields that error again for
        // ever: stop at the first.
        match serde_json::Value::deserialize(doc) {
            Ok(v) if v.get("kind").is_some() => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

/// Checks every document of a manifest (`kubectl apply -f` input) that should be a policy
/// object, those without `metadata.namespace` as of `namespace` (`kubectl apply -n`); `Err`
/// if the text is not YAML.
pub fn check_manifest(
    text: &str,
    namespace: &str,
    trust_domain: &str,
) -> Result<Vec<Checked>, String> {
    use serde::Deserialize as _;
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v =
            serde_json::Value::deserialize(doc).map_err(|e| format!("document {}: {e}", i + 1))?;
        if v.is_null() {
            continue;
        }
        out.push(check_document(&v, i + 1, namespace, trust_domain));
    }
    Ok(out)
}

fn check_document(v: &serde_json::Value, n: usize, namespace: &str, trust_domain: &str) -> Checked {
    let name = v["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let kind = v["kind"].as_str().unwrap_or_default();
    let key = match kind {
        "PortcullisPolicy" => (
            Some(
                v["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or(namespace)
                    .to_owned(),
            ),
            name.clone(),
        ),
        _ => (None, name.clone()),
    };
    let label = if name.is_empty() {
        format!("document {n}")
    } else {
        label(&key)
    };
    let verdict = (|| {
        let want = format!("{}/{}", super::crd::GROUP, super::crd::VERSION);
        if v["apiVersion"] != want.as_str() {
            return Err(FieldError::new(
                "apiVersion",
                format!(
                    "`{}` is not `{want}`",
                    v["apiVersion"].as_str().unwrap_or_default()
                ),
            ));
        }
        if name.is_empty() {
            return Err(FieldError::new("metadata.name", "is required"));
        }
        match kind {
            "PortcullisPolicy" => check_as::<PortcullisPolicy>(v, &key, trust_domain),
            "PortcullisClusterPolicy" => check_as::<PortcullisClusterPolicy>(v, &key, trust_domain),
            other => Err(FieldError::new(
                "kind",
                format!("`{other}` is not `PortcullisPolicy` or `PortcullisClusterPolicy`"),
            )),
        }
    })();
    Checked { label, verdict }
}

/// Strict field validation against the generated schema, then decoding, then the issuer's
/// check.
fn check_as<K: PolicyResource>(
    v: &serde_json::Value,
    key: &ObjectKey,
    trust_domain: &str,
) -> Result<Fragment, FieldError> {
    if let Some(o) = v.as_object()
        && let Some(extra) = o
            .keys()
            .find(|k| !["apiVersion", "kind", "metadata", "spec", "status"].contains(&k.as_str()))
    {
        return Err(FieldError::new(extra, format!("unknown field `{extra}`")));
    }
    if let Some(field) = unknown_field(&v["spec"], K::spec_schema(), "spec") {
        let last = field.rsplit('.').next().unwrap_or(&field).to_owned();
        return Err(FieldError::new(field, format!("unknown field `{last}`")));
    }
    let o: K =
        serde_path_to_error::deserialize(v.clone()).map_err(|e| decode_failure(&v["spec"], e))?;
    K::check(key, o.spec(), trust_domain)
}

/// `prefix` followed by a decoder's path (`.` when it is empty, `[0].from`, `mode`).
fn join(prefix: &str, path: &serde_path_to_error::Path) -> String {
    let p = path.to_string();
    if p == "." || p.is_empty() {
        prefix.to_owned()
    } else if p.starts_with('[') {
        format!("{prefix}{p}")
    } else {
        format!("{prefix}.{p}")
    }
}

/// A spec that does not decode, with the field at fault. (The settings are flattened into the
/// spec, which hides the path inside the spec from the decoder: its parts are decoded alone to
/// find it.)
fn decode_failure(
    spec: &serde_json::Value,
    e: serde_path_to_error::Error<serde_json::Error>,
) -> FieldError {
    let mut field = e.path().to_string();
    let mut message = e.into_inner().to_string();
    if field == "spec"
        && let Some(o) = spec.as_object()
    {
        let settings: serde_json::Map<String, serde_json::Value> = o
            .iter()
            .filter(|(k, _)| SETTINGS_FIELDS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let part = |key: &str| o.get(key).cloned().unwrap_or(serde_json::Value::Null);
        let found = serde_path_to_error::deserialize::<_, SettingsSpec>(serde_json::Value::Object(
            settings,
        ))
        .err()
        .map(|e| ("spec", e))
        .or_else(|| {
            o.contains_key("rules")
                .then(|| serde_path_to_error::deserialize::<_, Vec<RuleSpec>>(part("rules")).err())
                .flatten()
                .map(|e| ("spec.rules", e))
        })
        .or_else(|| {
            o.contains_key("enroll")
                .then(|| serde_path_to_error::deserialize::<_, EnrollSpec>(part("enroll")).err())
                .flatten()
                .map(|e| ("spec.enroll", e))
        });
        if let Some((prefix, e)) = found {
            field = join(prefix, e.path());
            message = e.into_inner().to_string();
        }
    }
    FieldError::new(field, message)
}

/// The first field of `given` that `schema` (an OpenAPI schema) has no property for: what the
/// API server's strict field validation refuses.
fn unknown_field(
    given: &serde_json::Value,
    schema: &serde_json::Value,
    at: &str,
) -> Option<String> {
    match given {
        serde_json::Value::Object(g) => {
            let props = schema.get("properties")?.as_object()?;
            g.iter().find_map(|(k, gv)| {
                let path = format!("{at}.{k}");
                match props.get(k) {
                    None => Some(path),
                    Some(ps) => unknown_field(gv, ps, &path),
                }
            })
        }
        serde_json::Value::Array(a) => {
            let items = schema.get("items")?;
            a.iter()
                .enumerate()
                .find_map(|(i, v)| unknown_field(v, items, &format!("{at}[{i}]")))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "cluster.local";

    #[test]
    fn a_manifest_is_checked_object_by_object_and_an_unknown_field_is_named() {
        let text = "\
apiVersion: portcullis.dev/v1alpha1
kind: PortcullisPolicy
metadata: {name: api, namespace: shop}
spec:
  rules:
    - from: [\"spiffe://cluster.local/ns/web/*\"]
      ports: [{port: 8080, endPrt: 8090}]
---
apiVersion: portcullis.dev/v1alpha1
kind: PortcullisClusterPolicy
metadata: {name: default}
spec: {mode: strict}
---
apiVersion: portcullis.dev/v1alpha1
kind: PortcullisClusterPolicy
metadata: {name: default}
spec: {mode: audit, rules: [{from: [\"*\"], to: [\"*\"]}]}
";
        assert!(is_manifest(text));
        // What the fuzzer found: a document that does not parse used to spin for ever.
        assert!(!is_manifest(include_str!(
            "../../tests/data/unparsable-manifest.yaml"
        )));
        assert!(!is_manifest("mode: audit\nrules: []\n"));
        let checked = check_manifest(text, "default", TD).unwrap();
        assert_eq!(checked.len(), 3);
        assert_eq!(checked[0].label, "pcp shop/api");
        let e = checked[0].verdict.as_ref().unwrap_err();
        assert_eq!(e.field, "spec.rules[0].ports[0].endPrt", "{e}");
        let e = checked[1].verdict.as_ref().unwrap_err();
        assert!(e.message.contains("strict"), "{e}");
        assert_eq!(e.field, "spec.mode", "{e}");
        assert_eq!(checked[2].verdict.as_ref().unwrap().rules.len(), 1);
        let doc = |spec: &str| {
            format!(
                "apiVersion: portcullis.dev/v1alpha1\nkind: PortcullisPolicy\nmetadata: {{name: a}}\nspec: {spec}\n"
            )
        };
        let first = |spec: &str| check_manifest(&doc(spec), "shop", TD).unwrap().remove(0);
        let c = first("{rules: [{from: [\"*\"]}, {form: [\"*\"]}]}");
        assert_eq!(c.label, "pcp shop/a");
        let e = c.verdict.unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("spec.rules[1].form", "unknown field `form`")
        );
        // Empty, still unknown: the API server refuses it too.
        let e = first("{rulez: []}").verdict.unwrap_err();
        assert_eq!(e.field, "spec.rulez", "{e}");
        let e = first("{rules: [{to: [\"*\"]}]}").verdict.unwrap_err();
        assert_eq!(e.field, "spec.rules[0]", "{e}");
        assert!(e.message.contains("missing field `from`"), "{e}");
        let e = first("{rules: 5}").verdict.unwrap_err();
        assert_eq!(e.field, "spec.rules", "{e}");
        // Destinations are checked in the namespace `-n` names.
        assert!(
            first("{rules: [{from: [\"*\"], to: [\"spiffe://cluster.local/ns/shop/sa/api\"]}]}")
                .verdict
                .is_ok()
        );
    }
}

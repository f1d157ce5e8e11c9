//! The Kubernetes deployment in `deploy/`: every manifest validates against the Kubernetes API
//! schemas (kubernetes-validate, offline, strict), the kustomization lists them all, and the
//! agent configuration in the ConfigMap is one the agent accepts. No cluster or container
//! engine runs here: the DaemonSet itself is not exercised.

use std::{path::PathBuf, process::Command};

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn manifests() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("reading deploy/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml")
        })
        .collect();
    out.sort();
    out
}

fn validate(paths: &[PathBuf]) -> (bool, String) {
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .args(paths)
        .output()
        .expect("kubernetes-validate is missing: scripts/bootstrap.sh installs it (pip install kubernetes-validate)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && !text.contains("ERROR"), text)
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let files = manifests();
    assert!(
        files.len() >= 5,
        "expected the namespace, service account, RBAC, config maps and DaemonSet: {files:?}"
    );
    let (ok, text) = validate(&files);
    assert!(ok, "validation failed:\n{text}");
    for kind in [
        "namespace/",
        "serviceaccount/",
        "clusterrole/",
        "clusterrolebinding/",
        "role/",
        "rolebinding/",
        "configmap/",
        "daemonset/",
    ] {
        assert!(
            text.lines()
                .any(|l| l.contains("passed") && l.contains(kind)),
            "no {kind} validated:\n{text}"
        );
    }
}

#[test]
fn the_validator_rejects_a_broken_manifest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("daemonset.yaml");
    let text = std::fs::read_to_string(deploy_dir().join("daemonset.yaml"))
        .expect("reading the DaemonSet");
    std::fs::write(
        &broken,
        text.replacen(
            "hostNetwork: true",
            "hostNetwork: true\n      hostNetwrok: true",
            1,
        ),
    )
    .expect("writing");
    let (ok, out) = validate(&[broken]);
    assert!(!ok, "a misspelt field passed strict validation:\n{out}");
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let k = std::fs::read_to_string(deploy_dir().join("kustomization.yaml"))
        .expect("kustomization.yaml");
    for f in manifests() {
        let name = f.file_name().and_then(|n| n.to_str()).expect("file name");
        assert!(
            k.contains(&format!("- {name}")),
            "kustomization.yaml does not list {name}"
        );
    }
}

#[test]
fn the_config_map_holds_a_config_the_agent_accepts() {
    let bin =
        std::env::var_os("PORTCULLIS_BIN").expect("PORTCULLIS_BIN: run through `cargo xtask test`");
    let agent_yaml = config_map_key("portcullis-config", "agent.yaml");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.yaml");
    std::fs::write(&path, agent_yaml).expect("writing agent.yaml");
    let out = Command::new(bin)
        .args(["--node", "node-a", "--config"])
        .arg(&path)
        .arg("check-config")
        .output()
        .expect("portcullis");
    assert!(
        out.status.success(),
        "the agent rejects the shipped config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("check-config JSON");
    assert_eq!(effective["node"], "node-a");
    assert_eq!(
        effective["metrics_addr"], "127.0.0.1:9464",
        "the probes in daemonset.yaml expect port 9464"
    );
}

#[test]
fn the_shipped_policy_is_one_the_agent_accepts() {
    let bin =
        std::env::var_os("PORTCULLIS_BIN").expect("PORTCULLIS_BIN: run through `cargo xtask test`");
    let policy = config_map_key("portcullis-policy", "policy.yaml");
    let policy = policy.as_str();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, policy).expect("writing policy.yaml");
    let out = Command::new(&bin)
        .arg("check-policy")
        .arg(&path)
        .output()
        .expect("portcullis");
    assert!(
        out.status.success(),
        "the agent rejects the shipped policy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("mode audit"));
    // A bad edit names the file, line and field.
    std::fs::write(&path, policy.replace("mode: audit", "mode: strict")).expect("edit");
    let out = Command::new(&bin)
        .arg("check-policy")
        .arg(&path)
        .output()
        .expect("portcullis");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("policy.yaml:2") && err.contains("`mode`"),
        "{err}"
    );
}

use serde::Deserialize as _;

/// The value of `key` in the ConfigMap `name` of deploy/configmap.yaml.
fn config_map_key(name: &str, key: &str) -> String {
    let text =
        std::fs::read_to_string(deploy_dir().join("configmap.yaml")).expect("configmap.yaml");
    let doc: serde_yaml::Value = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).expect("YAML"))
        .find(|v| v["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("the {name} ConfigMap"));
    doc["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("data.{key} of {name}"))
        .to_owned()
}

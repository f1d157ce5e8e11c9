//! The Kubernetes deployment in `deploy/`: every manifest, the CustomResourceDefinitions
//! included, validates against the Kubernetes API schemas (kubernetes-validate, offline,
//! strict); the policy objects (`deploy/policy.yaml`, `deploy/examples/`), which it has no
//! schema for, validate against the definitions' generated schema as the API server would check
//! them (`tests/schema_check.py`, strict: a misspelt field or a bad enum value is refused) and
//! pass the issuer's checks (`portcullis check-policy`); the kustomization lists every manifest,
//! the definitions first; the agent and issuer configurations in the ConfigMaps are ones the
//! binaries accept, both reading the policy from the custom resources; and the manifests agree
//! with each other: only the issuer mounts the CA Secret, the agents prove their node with a
//! projected token for the issuer's audience at the path their config reads, the agents' role
//! only reads (pods, nodes, the policy objects), the issuer's role writes nothing but
//! TokenReviews and the policy objects' status, and the issuer survives a node drain. No
//! cluster or container engine runs here: the DaemonSet and the Deployment themselves are not
//! exercised.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde::Deserialize as _;
use serde_yaml::Value;

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

/// The policy examples, `deploy/examples/*.yaml`.
fn examples() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("examples"))
        .expect("reading deploy/examples/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
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
        files.len() >= 9,
        "expected the CRDs, namespace, service account, RBAC, config maps, trust bundle, DaemonSet, issuer and policy: {files:?}"
    );
    // Every file, policy.yaml too: kubernetes-validate has no schema for a custom resource, so
    // for each PortcullisPolicy and PortcullisClusterPolicy document it prints a WARN ("Couldn't
    // find schema for kind ...") and checks nothing, without failing. Those documents are
    // checked against the definitions' own schema by
    // `the_policy_objects_validate_against_the_generated_schema` instead. The definitions
    // themselves (CustomResourceDefinition, openAPIV3Schema included) it does check.
    let (ok, text) = validate(&files);
    assert!(ok, "validation failed:\n{text}");
    for kind in [
        "customresourcedefinition/",
        "namespace/",
        "serviceaccount/",
        "clusterrole/",
        "clusterrolebinding/",
        "configmap/",
        "daemonset/",
        "deployment/",
        "service/",
        "poddisruptionbudget/",
    ] {
        assert!(
            text.lines()
                .any(|l| l.contains("passed") && l.contains(kind)),
            "no {kind} validated:\n{text}"
        );
    }
    // A WARN is not a pass: every object but the custom resources was validated (a misspelt
    // apiVersion or kind would only be warned about).
    let custom: Vec<String> = objects()
        .iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .map(|o| str_of(&o["spec"]["names"]["kind"]).to_owned())
        .collect();
    for o in objects() {
        let kind = str_of(&o["kind"]);
        if custom.iter().any(|k| k == kind) {
            continue;
        }
        let resource = format!(
            "passed for resource {}/{} ",
            kind.to_lowercase(),
            str_of(&o["metadata"]["name"])
        );
        assert!(
            text.lines().any(|l| l.contains(&resource)),
            "{kind} {} was not validated:\n{text}",
            str_of(&o["metadata"]["name"])
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
    // In a definition too, up to the root of its openAPIV3Schema. (Not below it: the offline
    // schemas leave the nested JSONSchemaProps open, so `minItem: 1` deep in a property passes
    // here; the API server refuses it when the definition is applied.)
    let broken = dir.path().join("crds.yaml");
    let text = std::fs::read_to_string(deploy_dir().join("crds.yaml")).expect("reading the CRDs");
    let title = "\n        title: PortcullisPolicy\n";
    assert!(text.contains(title), "the CRDs changed: pick another field");
    std::fs::write(
        &broken,
        text.replacen(title, "\n        titel: PortcullisPolicy\n", 1),
    )
    .expect("writing");
    let (ok, out) = validate(&[broken]);
    assert!(
        !ok && out.contains("customresourcedefinition/portcullispolicies.portcullis.dev")
            && out.contains("titel"),
        "a misspelt field of a definition passed strict validation:\n{out}"
    );
}

/// Runs `tests/schema_check.py CRDS FILES…`: whether every document passed, and what it printed.
fn schema_check(crds: &Path, paths: &[PathBuf]) -> (bool, String) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schema_check.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(crds)
        .args(paths)
        .output()
        .expect("python3 is missing: install it (Debian: apt-get install python3 python3-pip)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) => (true, text),
        Some(1) => (false, text),
        Some(3) => panic!(
            "PyYAML or jsonschema is missing: scripts/bootstrap.sh installs them (python3 -m pip install pyyaml jsonschema):\n{text}"
        ),
        _ => panic!("schema_check.py could not run: {}\n{text}", out.status),
    }
}

/// Every document of a YAML file.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// The policy objects shipped (`deploy/policy.yaml`) and shown (`deploy/examples/`).
fn policy_files() -> Vec<PathBuf> {
    let mut files = vec![deploy_dir().join("policy.yaml")];
    files.extend(examples());
    files
}

#[test]
fn the_policy_objects_validate_against_the_generated_schema() {
    let files = policy_files();
    for want in [
        "allow-namespace.yaml",
        "least-privilege.yaml",
        "audit-rollout.yaml",
    ] {
        assert!(
            files.iter().any(|f| f.ends_with(want)),
            "deploy/examples/{want} is missing: {files:?}"
        );
    }
    let (ok, text) = schema_check(&deploy_dir().join("crds.yaml"), &files);
    assert!(ok, "schema validation failed:\n{text}");
    // One line per document, in order, each a pass.
    let mut lines = text.lines();
    for f in &files {
        let docs = documents(f);
        assert!(!docs.is_empty(), "{} holds no object", f.display());
        for d in docs {
            let kind = str_of(&d["kind"]);
            assert!(
                ["PortcullisPolicy", "PortcullisClusterPolicy"].contains(&kind),
                "{}: a {kind} among the policy objects",
                f.display()
            );
            let want = format!(
                "{}: {kind}/{} passed",
                f.display(),
                str_of(&d["metadata"]["name"])
            );
            assert_eq!(lines.next(), Some(want.as_str()), "\n{text}");
        }
    }
    assert_eq!(lines.next(), None, "\n{text}");
}

/// `file` from deploy/examples with `from` replaced by `to` (once), in a file of `dir`.
fn edited_example(dir: &Path, file: &str, from: &str, to: &str) -> PathBuf {
    let text = std::fs::read_to_string(deploy_dir().join("examples").join(file))
        .unwrap_or_else(|e| panic!("deploy/examples/{file}: {e}"));
    assert!(text.contains(from), "{file} has no `{from}`");
    let path = dir.join(file);
    std::fs::write(&path, text.replacen(from, to, 1)).expect("writing");
    path
}

#[test]
fn the_schema_check_rejects_a_misspelt_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let crds = deploy_dir().join("crds.yaml");
    for (from, to, field) in [
        ("      from:\n", "      form:\n", "spec.rules[0].form"),
        (
            "          protocol: TCP\n",
            "          protcol: TCP\n",
            "spec.rules[0].ports[0].protcol",
        ),
        (
            "  namespace: shop\n",
            "  namepsace: shop\n",
            "metadata.namepsace",
        ),
    ] {
        let path = edited_example(dir.path(), "least-privilege.yaml", from, to);
        let (ok, out) = schema_check(&crds, &[path]);
        assert!(!ok, "`{}` passed the schema check:\n{out}", to.trim());
        assert!(
            out.lines().any(|l| l.contains("PortcullisPolicy/api: ")
                && l.contains(&format!("{field}: unknown field"))),
            "the misspelt field {field} is not named:\n{out}"
        );
    }
}

#[test]
fn the_schema_check_rejects_a_bad_enum_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let crds = deploy_dir().join("crds.yaml");
    for (value, says) in [
        ("strict", "Unsupported value: \"strict\""),
        // YAML 1.1, as kubectl reads it: a boolean, not the string "off".
        ("off", "Invalid value: false: must be of type string"),
    ] {
        let path = edited_example(
            dir.path(),
            "audit-rollout.yaml",
            "\n  mode: audit\n",
            &format!("\n  mode: {value}\n"),
        );
        let (ok, out) = schema_check(&crds, &[path]);
        assert!(!ok, "`mode: {value}` passed the schema check:\n{out}");
        assert!(
            out.lines().any(|l| l.contains("PortcullisPolicy/default: ")
                && l.contains(&format!("spec.mode: {says}"))),
            "`mode: {value}` is not refused at spec.mode:\n{out}"
        );
    }
    // And a document of a kind the definitions do not define fails the file.
    let other = dir.path().join("other.yaml");
    std::fs::write(
        &other,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n",
    )
    .expect("writing");
    let (ok, out) = schema_check(&crds, &[other]);
    assert!(!ok && out.contains("unknown kind"), "{out}");
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let k: Value = serde_yaml::from_str(
        &std::fs::read_to_string(deploy_dir().join("kustomization.yaml"))
            .expect("kustomization.yaml"),
    )
    .expect("kustomization.yaml is YAML");
    let resources: Vec<&str> = seq(&k["resources"]).iter().map(str_of).collect();
    for f in manifests() {
        let name = f.file_name().and_then(|n| n.to_str()).expect("file name");
        assert!(
            resources.contains(&name),
            "kustomization.yaml does not list {name}: {resources:?}"
        );
    }
    for r in &resources {
        assert!(
            deploy_dir().join(r).is_file(),
            "kustomization.yaml lists missing {r}"
        );
    }
    assert_eq!(
        resources.first().copied(),
        Some("crds.yaml"),
        "the definitions come first"
    );
    // A `namespace:` would move every object kustomize does not know to be cluster-scoped into
    // it: the kube-system PortcullisPolicy, and the cluster-scoped PortcullisClusterPolicy.
    if let Some(ns) = k["namespace"].as_str() {
        for o in objects() {
            let kind = str_of(&o["kind"]);
            if [
                "Namespace",
                "ClusterRole",
                "ClusterRoleBinding",
                "CustomResourceDefinition",
            ]
            .contains(&kind)
            {
                continue;
            }
            assert_eq!(
                str_of(&o["metadata"]["namespace"]),
                ns,
                "kustomization.yaml's namespace: moves {kind} {}",
                str_of(&o["metadata"]["name"])
            );
        }
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
    // The policy is the custom resources, not a ConfigMap (the agent's role reads none).
    assert_eq!(
        effective["kubernetes"]["policy_resources"], true,
        "{effective:#}"
    );
    assert!(
        effective["kubernetes"]["policy_configmap"].is_null(),
        "{effective:#}"
    );
    assert!(effective["policy"].is_null(), "{effective:#}");
}

#[test]
fn the_shipped_policy_and_the_examples_pass_the_issuers_checks() {
    let bin =
        std::env::var_os("PORTCULLIS_BIN").expect("PORTCULLIS_BIN: run through `cargo xtask test`");
    // What the issuer would accept: every object of policy.yaml and of each example.
    for f in policy_files() {
        let out = Command::new(&bin)
            .arg("check-policy")
            .arg(&f)
            .output()
            .expect("portcullis");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "the issuer would refuse {}: {text}{}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            text.lines().filter(|l| l.contains(": accepted")).count(),
            documents(&f).len(),
            "{}: {text}",
            f.display()
        );
    }

    // The shipped settings: the cluster in audit, kube-system and the issuer's namespace off.
    let policy = documents(&deploy_dir().join("policy.yaml"));
    let find = |kind: &str, ns: Option<&str>| {
        policy
            .iter()
            .find(|o| {
                o["kind"] == kind
                    && o["metadata"]["name"] == "default"
                    && o["metadata"]["namespace"].as_str() == ns
            })
            .unwrap_or_else(|| panic!("no {kind} default in {ns:?}"))
    };
    let cluster = find("PortcullisClusterPolicy", None);
    assert_eq!(cluster["spec"]["mode"], "audit", "roll out in audit first");
    assert_eq!(cluster["spec"]["nodeTraffic"], "allow");
    assert_eq!(cluster["spec"]["otherProtocols"], "drop");
    let issuer = object("Deployment", "portcullis-issuer");
    let issuer_ns = str_of(&issuer["metadata"]["namespace"]);
    for ns in ["kube-system", issuer_ns] {
        assert_eq!(
            find("PortcullisPolicy", Some(ns))["spec"]["mode"],
            "disabled",
            "namespace {ns}"
        );
    }

    // A bad edit is refused, naming the object and the value.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("policy.yaml");
    let text = std::fs::read_to_string(deploy_dir().join("policy.yaml")).expect("policy.yaml");
    std::fs::write(
        &path,
        text.replacen("  mode: audit\n", "  mode: strict\n", 1),
    )
    .expect("edit");
    let out = Command::new(&bin)
        .arg("check-policy")
        .arg(&path)
        .output()
        .expect("portcullis");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.lines()
            .any(|l| l.contains("pccp default: refused") && l.contains("`strict`")),
        "{said}"
    );
}

#[test]
fn the_issuer_config_map_holds_a_config_the_issuer_accepts() {
    let bin =
        std::env::var_os("PORTCULLIS_BIN").expect("PORTCULLIS_BIN: run through `cargo xtask test`");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("issuer.yaml");
    std::fs::write(
        &path,
        config_map_key("portcullis-issuer-config", "issuer.yaml"),
    )
    .expect("writing issuer.yaml");
    let out = Command::new(bin)
        .args(["issuer", "check-config", "--config"])
        .arg(&path)
        .output()
        .expect("portcullis");
    assert!(
        out.status.success(),
        "the issuer rejects the shipped config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("issuer check-config JSON");
    assert_eq!(effective["attestor"]["kind"], "kubernetes", "{effective:#}");
    assert_eq!(effective["attestor"]["audience"], "portcullis-issuer");
    // The account whose tokens it accepts is the DaemonSet's.
    let ds = object("DaemonSet", "portcullis");
    let ds_pod = pod_spec(&ds).expect("the DaemonSet's pod");
    assert_eq!(
        effective["attestor"]["service_account"],
        serde_json::json!([
            str_of(&ds["metadata"]["namespace"]),
            str_of(&ds_pod["serviceAccountName"])
        ]),
        "attestor.service_account is not the agents' service account"
    );
    let agent: Value = serde_yaml::from_str(&config_map_key("portcullis-config", "agent.yaml"))
        .expect("agent.yaml");
    assert_eq!(
        effective["kubernetes"]["trust_domain"],
        str_of(&agent["kubernetes"]["trust_domain"]),
        "the issuer and the agents serve different trust domains"
    );
    // It watches the policy objects the agents read, and writes their status.
    assert_eq!(
        effective["kubernetes"]["policy_resources"], true,
        "the issuer does not watch the policy objects: {effective:#}"
    );
    assert_eq!(
        agent["kubernetes"]["policy_resources"], true,
        "the agents do not read the policy objects"
    );

    // The Deployment runs this config with the image's binary, on the ports it names.
    let dep = object("Deployment", "portcullis-issuer");
    let pod = pod_spec(&dep).expect("the Deployment's pod");
    let c = container(pod, "issuer");
    let command: Vec<&str> = seq(&c["command"]).iter().map(str_of).collect();
    assert_eq!(
        command.get(1..4),
        Some(&["issuer", "run", "--config"][..]),
        "{command:?}"
    );
    assert_eq!(
        command.first().copied(),
        Some(dockerfile_binary().as_str()),
        "the command is not the binary deploy/Dockerfile installs"
    );
    let config_path = Path::new(command.get(4).copied().unwrap_or_default());
    let config_mount = mount_of(c, "config").expect("the issuer mounts its config");
    assert_eq!(
        config_path,
        Path::new(str_of(&config_mount["mountPath"])).join("issuer.yaml"),
        "--config is not the mounted ConfigMap key"
    );
    let volume = volume(pod, "config");
    assert_eq!(volume["configMap"]["name"], "portcullis-issuer-config");

    let port = |addr: &serde_json::Value| {
        addr.as_str()
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .map(|a| u64::from(a.port()))
            .unwrap_or_else(|| panic!("{addr} is not an address"))
    };
    assert_eq!(
        container_port(c, "issuer"),
        Some(port(&effective["listen"])),
        "the `issuer` container port is not where it listens"
    );
    let metrics = port(&effective["metrics_addr"]);
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        assert_eq!(
            c[probe]["httpGet"]["port"].as_u64(),
            Some(metrics),
            "{probe} does not ask the metrics port"
        );
    }
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
}

#[test]
fn no_agent_mounts_a_secret_and_only_the_issuer_mounts_the_ca() {
    let ds = object("DaemonSet", "portcullis");
    let pod = pod_spec(&ds).expect("the DaemonSet's pod");
    let secret_volumes: Vec<&str> = seq(&pod["volumes"])
        .iter()
        .filter(|v| !secrets_of_volume(v).is_empty())
        .map(|v| str_of(&v["name"]))
        .collect();
    assert!(
        secret_volumes.is_empty(),
        "the DaemonSet has Secret volumes: {secret_volumes:?}"
    );
    for c in containers(pod) {
        for m in seq(&c["volumeMounts"]) {
            let name = str_of(&m["name"]);
            assert!(
                seq(&pod["volumes"]).iter().any(|v| v["name"] == name),
                "container {} mounts undeclared volume {name}",
                str_of(&c["name"])
            );
        }
        let env_secret = seq(&c["env"])
            .iter()
            .any(|e| !e["valueFrom"]["secretKeyRef"].is_null())
            || seq(&c["envFrom"]).iter().any(|e| !e["secretRef"].is_null());
        assert!(
            !env_secret,
            "container {} reads a Secret",
            str_of(&c["name"])
        );
    }

    let mut holders = Vec::new();
    for o in objects() {
        let Some(pod) = pod_spec(&o) else { continue };
        for v in seq(&pod["volumes"]) {
            if secrets_of_volume(v).contains(&"portcullis-ca") {
                holders.push(format!(
                    "{}/{}",
                    str_of(&o["kind"]),
                    str_of(&o["metadata"]["name"])
                ));
            }
        }
    }
    assert_eq!(
        holders,
        ["Deployment/portcullis-issuer"],
        "pods reading the CA Secret"
    );

    // The issuer mounts it read-only, owner-only, where its config looks for the CA.
    let dep = object("Deployment", "portcullis-issuer");
    let pod = pod_spec(&dep).expect("the Deployment's pod");
    let ca = seq(&pod["volumes"])
        .iter()
        .find(|v| v["secret"]["secretName"] == "portcullis-ca")
        .expect("the CA volume is a plain Secret volume");
    let mode = file_mode(&ca["secret"]["defaultMode"]).expect("the CA volume sets defaultMode");
    assert_eq!(
        mode & 0o077,
        0,
        "the issuer refuses a key group or others can read: {mode:o}"
    );
    assert!(
        pod["securityContext"]["fsGroup"].is_null(),
        "with fsGroup the kubelet adds group read to the key, and the issuer refuses it"
    );
    let issuer: Value =
        serde_yaml::from_str(&config_map_key("portcullis-issuer-config", "issuer.yaml"))
            .expect("issuer.yaml");
    let mounts: Vec<&Value> = containers(pod)
        .filter_map(|c| mount_of(c, str_of(&ca["name"])))
        .collect();
    assert_eq!(mounts.len(), 1, "one container mounts the CA");
    assert_eq!(mounts[0]["readOnly"], true);
    assert_eq!(
        mounts[0]["mountPath"], issuer["ca_dir"],
        "ca_dir is not the CA mount"
    );
}

#[test]
fn the_agents_prove_their_node_with_a_projected_token_for_the_issuer() {
    let agent: Value = serde_yaml::from_str(&config_map_key("portcullis-config", "agent.yaml"))
        .expect("agent.yaml");
    let identity = &agent["identity"];
    assert_eq!(identity["source"], "issuer");
    assert_eq!(identity["attestor"], "kubernetes");
    let token_file = Path::new(str_of(&identity["token_file"]));
    let issuer: Value =
        serde_yaml::from_str(&config_map_key("portcullis-issuer-config", "issuer.yaml"))
            .expect("issuer.yaml");
    let audience = str_of(&issuer["attestor"]["audience"]);
    assert_eq!(audience, "portcullis-issuer");

    let ds = object("DaemonSet", "portcullis");
    let pod = pod_spec(&ds).expect("the DaemonSet's pod");
    let agent_c = container(pod, "agent");
    let mut tokens = Vec::new();
    for v in seq(&pod["volumes"]) {
        for src in seq(&v["projected"]["sources"]) {
            let t = &src["serviceAccountToken"];
            if t.is_null() {
                continue;
            }
            let m = mount_of(agent_c, str_of(&v["name"]))
                .unwrap_or_else(|| panic!("the agent does not mount {}", str_of(&v["name"])));
            assert_eq!(m["readOnly"], true, "the token mount is writable");
            assert!(
                m["subPath"].is_null(),
                "a subPath mount never sees the renewed token"
            );
            tokens.push((
                str_of(&t["audience"]).to_owned(),
                Path::new(str_of(&m["mountPath"])).join(str_of(&t["path"])),
                t["expirationSeconds"].as_u64(),
            ));
        }
    }
    assert_eq!(tokens.len(), 1, "projected tokens: {tokens:?}");
    let (aud, path, ttl) = &tokens[0];
    assert_eq!(aud, audience, "the token is not for the issuer's audience");
    assert_eq!(
        path, token_file,
        "identity.token_file is not the projected token"
    );
    // The API server accepts 10 minutes to 2^32 seconds; an hour keeps a stolen token short.
    assert!(
        ttl.is_some_and(|t| (600..=3600).contains(&t)),
        "expirationSeconds {ttl:?}"
    );

    // The trust bundle is the CA certificate from its ConfigMap, updated in place.
    let bundle = Path::new(str_of(&identity["trust_bundle"]));
    let (dir, file) = (
        bundle.parent().expect("bundle dir"),
        bundle
            .file_name()
            .and_then(|f| f.to_str())
            .expect("bundle file"),
    );
    let m = seq(&agent_c["volumeMounts"])
        .iter()
        .find(|m| Path::new(str_of(&m["mountPath"])) == dir)
        .unwrap_or_else(|| panic!("nothing is mounted at {}", dir.display()));
    assert!(
        m["subPath"].is_null(),
        "a subPath mount never sees a bundle update"
    );
    let v = volume(pod, str_of(&m["name"]));
    assert_eq!(v["configMap"]["name"], "portcullis-trust-bundle");
    let text = config_map_key("portcullis-trust-bundle", file);
    assert!(
        !text.contains("PRIVATE KEY"),
        "the trust bundle holds a key"
    );
}

#[test]
fn the_agents_reach_the_issuer_through_its_service() {
    let agent: Value = serde_yaml::from_str(&config_map_key("portcullis-config", "agent.yaml"))
        .expect("agent.yaml");
    let issuer: Value =
        serde_yaml::from_str(&config_map_key("portcullis-issuer-config", "issuer.yaml"))
            .expect("issuer.yaml");
    let listen: u64 = str_of(&issuer["listen"])
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("listen port");
    let dep = object("Deployment", "portcullis-issuer");
    let pod = pod_spec(&dep).expect("the Deployment's pod");
    let labels = &dep["spec"]["template"]["metadata"]["labels"];
    let addresses = seq(&agent["identity"]["issuer"]);
    assert!(!addresses.is_empty(), "no issuer address");
    for a in addresses {
        let (host, port) = str_of(a).rsplit_once(':').expect("host:port");
        let port: u64 = port.parse().expect("port");
        let parts: Vec<&str> = host.split('.').collect();
        assert!(
            parts.len() >= 3 && parts[2] == "svc",
            "{host} is not a Service name (name.namespace.svc)"
        );
        let svc = object("Service", parts[0]);
        assert_eq!(svc["metadata"]["namespace"], parts[1], "{host}");
        assert!(
            matches(&svc["spec"]["selector"], labels),
            "{host} does not select the issuer"
        );
        let sp = seq(&svc["spec"]["ports"])
            .iter()
            .find(|p| p["port"].as_u64() == Some(port))
            .unwrap_or_else(|| panic!("{host} has no port {port}"));
        let target = match &sp["targetPort"] {
            Value::String(name) => container_port(container(pod, "issuer"), name),
            Value::Null => Some(port),
            v => v.as_u64(),
        };
        assert_eq!(
            target,
            Some(listen),
            "{host}:{port} does not reach the issuer's listen port"
        );
    }
}

#[test]
fn the_issuer_role_writes_token_reviews_and_policy_status_only() {
    let role = object("ClusterRole", "portcullis-issuer");
    let grants = rules(&role);
    // The writes: TokenReviews, and the policy objects' status (PUT on the status subresource:
    // verb update). Never a spec, never a create or delete of a policy object.
    let writes = [
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("portcullis.dev", "portcullispolicies/status", "update"),
        (
            "portcullis.dev",
            "portcullisclusterpolicies/status",
            "update",
        ),
    ];
    // The reads, cluster-wide: nothing but these.
    let read = [
        ("", "pods"),
        ("", "nodes"),
        ("portcullis.dev", "portcullispolicies"),
        ("portcullis.dev", "portcullisclusterpolicies"),
    ];
    for (group, resource, verb) in &grants {
        assert!(
            group != "*" && resource != "*" && verb != "*",
            "a wildcard in the issuer's role: {group}/{resource} {verb}"
        );
        let grant = (group.as_str(), resource.as_str(), verb.as_str());
        if ["get", "list", "watch"].contains(&verb.as_str()) {
            assert!(
                read.contains(&(grant.0, grant.1)),
                "the issuer's role reads {group}/{resource}"
            );
        } else {
            assert!(
                writes.contains(&grant),
                "the issuer's role writes more than TokenReviews and policy status: {grant:?}"
            );
        }
    }
    let reads = read
        .iter()
        .flat_map(|(g, r)| ["get", "list", "watch"].map(|v| (*g, *r, v)));
    for want in writes.into_iter().chain(reads) {
        assert!(
            grants.contains(&(want.0.to_owned(), want.1.to_owned(), want.2.to_owned())),
            "the issuer's role lacks {want:?}"
        );
    }
    assert!(
        !grants.iter().any(|(_, r, _)| r == "secrets"),
        "the issuer reads its key from the volume, not the API"
    );
    let binding = object("ClusterRoleBinding", "portcullis-issuer");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], "portcullis-issuer");
    let dep = object("Deployment", "portcullis-issuer");
    let subjects: Vec<(&str, &str, &str)> = seq(&binding["subjects"])
        .iter()
        .map(|s| {
            (
                str_of(&s["kind"]),
                str_of(&s["namespace"]),
                str_of(&s["name"]),
            )
        })
        .collect();
    assert_eq!(
        subjects,
        [(
            "ServiceAccount",
            str_of(&dep["metadata"]["namespace"]),
            str_of(&pod_spec(&dep).expect("pod")["serviceAccountName"])
        )],
        "the binding is not to the issuer's own account"
    );
    // No other binding hands the issuer's role (and its TokenReviews) to anyone else.
    for o in objects() {
        if ["RoleBinding", "ClusterRoleBinding"].contains(&str_of(&o["kind"]))
            && o["metadata"]["name"] != "portcullis-issuer"
        {
            assert_ne!(o["roleRef"]["name"], "portcullis-issuer", "{o:?}");
        }
    }
}

#[test]
fn the_agents_rbac_only_reads_pods_nodes_and_the_policy_objects() {
    // Cluster-wide reads of pods, nodes and the policy objects, and nothing else: no write, no
    // Secret, and no ConfigMap now that the policy is custom resources.
    let mut granted = Vec::new();
    for b in objects() {
        let scope = match str_of(&b["kind"]) {
            "ClusterRoleBinding" => "cluster",
            "RoleBinding" => "namespace",
            _ => continue,
        };
        let to_agents = seq(&b["subjects"]).iter().any(|s| {
            s["kind"] == "ServiceAccount"
                && s["name"] == "portcullis"
                && s["namespace"] == "portcullis"
        });
        if !to_agents {
            continue;
        }
        let role = object(str_of(&b["roleRef"]["kind"]), str_of(&b["roleRef"]["name"]));
        for (g, r, v) in rules(&role) {
            granted.push(format!("{scope} {g}/{r} {v}"));
        }
    }
    granted.sort();
    let mut want: Vec<String> = ["get", "list", "watch"]
        .iter()
        .flat_map(|v| {
            [
                format!("cluster /nodes {v}"),
                format!("cluster /pods {v}"),
                format!("cluster portcullis.dev/portcullispolicies {v}"),
                format!("cluster portcullis.dev/portcullisclusterpolicies {v}"),
            ]
        })
        .collect();
    want.sort();
    assert_eq!(granted, want);
    // What the agent reads from ConfigMaps it reads from volumes the kubelet mounts (which
    // needs no role): its config and the trust bundle; and it watches no policy ConfigMap.
    let ds = object("DaemonSet", "portcullis");
    let pod = pod_spec(&ds).expect("the DaemonSet's pod");
    let mounted: Vec<&str> = seq(&pod["volumes"])
        .iter()
        .filter_map(|v| v["configMap"]["name"].as_str())
        .collect();
    for cm in ["portcullis-config", "portcullis-trust-bundle"] {
        assert!(mounted.contains(&cm), "{cm} is not a volume: {mounted:?}");
    }
    let agent: Value = serde_yaml::from_str(&config_map_key("portcullis-config", "agent.yaml"))
        .expect("agent.yaml");
    assert!(
        agent["kubernetes"]["policy_configmap"].is_null(),
        "the agent watches a policy ConfigMap, and its role cannot read it"
    );
}

#[test]
fn the_issuer_runs_two_replicas_under_a_disruption_budget() {
    let dep = object("Deployment", "portcullis-issuer");
    let replicas = dep["spec"]["replicas"].as_u64().expect("spec.replicas");
    assert!(replicas >= 2, "{replicas} replica(s)");
    let labels = &dep["spec"]["template"]["metadata"]["labels"];
    assert!(
        selects(&dep["spec"]["selector"], labels),
        "the Deployment does not select its pods"
    );
    let pdbs: Vec<Value> = objects()
        .into_iter()
        .filter(|o| {
            o["kind"] == "PodDisruptionBudget"
                && o["metadata"]["namespace"] == dep["metadata"]["namespace"]
                && selects(&o["spec"]["selector"], labels)
        })
        .collect();
    assert_eq!(
        pdbs.len(),
        1,
        "PodDisruptionBudgets of the issuer: {pdbs:?}"
    );
    let min = pdbs[0]["spec"]["minAvailable"]
        .as_u64()
        .expect("minAvailable as a number");
    assert!(
        (1..replicas).contains(&min),
        "minAvailable {min} of {replicas}: keeps none up, or blocks every drain"
    );
    // The replicas prefer different nodes.
    let pod = pod_spec(&dep).expect("pod");
    let spread = seq(
        &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"],
    )
    .iter()
    .map(|w| &w["podAffinityTerm"])
    .chain(seq(
        &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"],
    ))
    .any(|t| t["topologyKey"] == "kubernetes.io/hostname" && selects(&t["labelSelector"], labels));
    assert!(spread, "no pod anti-affinity by hostname");
    // The DaemonSet's selector must not take the issuer's pods for its own, nor the reverse.
    let ds = object("DaemonSet", "portcullis");
    assert!(
        !selects(&ds["spec"]["selector"], labels),
        "the DaemonSet selects the issuer's pods"
    );
    assert!(
        !selects(
            &dep["spec"]["selector"],
            &ds["spec"]["template"]["metadata"]["labels"]
        ),
        "the issuer's Deployment selects the agents"
    );
}

/// Every object of every manifest in deploy/.
fn objects() -> Vec<Value> {
    manifests()
        .iter()
        .flat_map(|p| {
            let text =
                std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            serde_yaml::Deserializer::from_str(&text)
                .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
                .filter(|v| !v.is_null())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The object of `kind` named `name` in deploy/.
fn object(kind: &str, name: &str) -> Value {
    objects()
        .into_iter()
        .find(|v| v["kind"] == kind && v["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/"))
}

/// The value of `key` in the ConfigMap `name` in deploy/.
fn config_map_key(name: &str, key: &str) -> String {
    object("ConfigMap", name)["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("data.{key} of {name}"))
        .to_owned()
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map_or(&[], Vec::as_slice)
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// A file mode as Kubernetes reads it: YAML 1.1, where `0400` is octal (serde_yaml, YAML 1.2,
/// reads it as a string).
fn file_mode(v: &Value) -> Option<u32> {
    match v {
        Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        Value::String(s) => {
            let digits = s.strip_prefix("0o").or_else(|| s.strip_prefix('0'))?;
            u32::from_str_radix(digits, 8).ok()
        }
        _ => None,
    }
}

/// The pod spec of a workload (None for other kinds).
fn pod_spec(o: &Value) -> Option<&Value> {
    match o["kind"].as_str()? {
        "Pod" => Some(&o["spec"]),
        "DaemonSet" | "Deployment" | "StatefulSet" | "ReplicaSet" | "Job" => {
            Some(&o["spec"]["template"]["spec"])
        }
        "CronJob" => Some(&o["spec"]["jobTemplate"]["spec"]["template"]["spec"]),
        _ => None,
    }
}

fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    seq(&pod["containers"])
        .iter()
        .chain(seq(&pod["initContainers"]))
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    containers(pod)
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn volume<'a>(pod: &'a Value, name: &str) -> &'a Value {
    seq(&pod["volumes"])
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// Where container `c` mounts `volume`.
fn mount_of<'a>(c: &'a Value, volume: &str) -> Option<&'a Value> {
    seq(&c["volumeMounts"]).iter().find(|m| m["name"] == volume)
}

fn container_port(c: &Value, name: &str) -> Option<u64> {
    seq(&c["ports"])
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
}

/// The Secrets a volume reads, directly or through a projection.
fn secrets_of_volume(v: &Value) -> Vec<&str> {
    let mut out = Vec::new();
    if !v["secret"].is_null() {
        out.push(str_of(&v["secret"]["secretName"]));
    }
    for src in seq(&v["projected"]["sources"]) {
        if !src["secret"].is_null() {
            out.push(str_of(&src["secret"]["name"]));
        }
    }
    out
}

/// Whether every label of `map` is among `labels` (an empty map selects everything).
fn matches(map: &Value, labels: &Value) -> bool {
    map.as_mapping().is_none_or(|m| {
        m.iter()
            .all(|(k, v)| labels.as_mapping().and_then(|l| l.get(k)) == Some(v))
    })
}

/// Whether a label selector selects a pod labelled `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    assert!(
        selector["matchExpressions"].is_null(),
        "matchExpressions are not evaluated here"
    );
    matches(&selector["matchLabels"], labels)
}

/// `(apiGroup, resource, verb)` for every grant of a Role or ClusterRole.
fn rules(role: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for rule in seq(&role["rules"]) {
        assert!(
            rule["nonResourceURLs"].is_null(),
            "a non-resource rule in {}",
            str_of(&role["metadata"]["name"])
        );
        for g in seq(&rule["apiGroups"]) {
            for r in seq(&rule["resources"]) {
                for v in seq(&rule["verbs"]) {
                    out.push((
                        str_of(g).to_owned(),
                        str_of(r).to_owned(),
                        str_of(v).to_owned(),
                    ));
                }
            }
        }
    }
    out
}

/// The binary deploy/Dockerfile's ENTRYPOINT runs.
fn dockerfile_binary() -> String {
    let text = std::fs::read_to_string(deploy_dir().join("Dockerfile")).expect("deploy/Dockerfile");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("ENTRYPOINT"))
        .expect("an ENTRYPOINT");
    let argv: Vec<String> = serde_json::from_str(line.trim()).expect("ENTRYPOINT in exec form");
    argv.into_iter().next().expect("ENTRYPOINT names a binary")
}

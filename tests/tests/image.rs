//! The container image, built from this checkout (testbed::container, as `cargo xtask image`
//! builds it) and run on a testbed: the agent of one node and an issuer replica run from it,
//! as deploy/daemonset.yaml and deploy/issuer.yaml run them. Privileged: run as root, one at a
//! time (`cargo xtask test`). Without root, or without podman, these tests fail; they never
//! skip.
//!
//! The image holds the debug binaries next to `PORTCULLIS_BIN` (stripped of their DWARF
//! sections): the agent under test everywhere else, with no release build to wait for.
//! `PORTCULLIS_IMAGE_BINS` (comma-separated) replaces the list of binaries, by default
//! `portcullis,portcullis-cni`.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use testbed::{
    NodeSpec, Options, PodSpec, Spec, Testbed, cgroup, cmd,
    container::{self, Container, IMAGE_BINARIES, ImageBuild, ImageGuard},
    issuer,
    scenario::{Family, Scenario, eventually, ok},
};

const PORT: u16 = 8080;

fn root() {
    assert!(
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the image tests need root (podman, namespaces, eBPF); run them with `cargo xtask test` as root"
    );
}

/// The binaries the image is built from: `PORTCULLIS_BIN` and its siblings.
fn binaries() -> Vec<PathBuf> {
    let agent = PathBuf::from(
        std::env::var_os("PORTCULLIS_BIN")
            .filter(|p| !p.is_empty())
            .expect("set PORTCULLIS_BIN to the agent binary (target/debug/portcullis)"),
    );
    assert_eq!(
        agent.file_name().and_then(|n| n.to_str()),
        Some("portcullis"),
        "PORTCULLIS_BIN must name the `portcullis` binary: the image's path is its name"
    );
    let names: Vec<String> = match std::env::var("PORTCULLIS_IMAGE_BINS") {
        Ok(list) => list.split(',').map(|s| s.trim().to_owned()).collect(),
        Err(_) => IMAGE_BINARIES.iter().map(ToString::to_string).collect(),
    };
    let dir = agent.parent().expect("PORTCULLIS_BIN has a directory");
    names
        .iter()
        .map(|name| {
            let p = dir.join(name);
            assert!(
                p.is_file(),
                "{} does not exist: build it (cargo build -p portcullis-agent --bins), or name the binaries the image should hold in PORTCULLIS_IMAGE_BINS",
                p.display()
            );
            p
        })
        .collect()
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_path_buf()
}

/// Builds the image under a tag of this run's own, removed on drop.
fn build(work: &Path) -> ImageGuard {
    let t = Instant::now();
    let built = container::build_image(&ImageBuild {
        dockerfile: workspace_root().join("deploy/Dockerfile"),
        binaries: binaries(),
        tag: format!("localhost/portcullis:test-{}", container::unique_suffix()),
        work_dir: work.to_path_buf(),
        strip_debug: true,
        verbose: false,
    })
    .unwrap_or_else(|e| panic!("building the image: {e:#}"));
    eprintln!(
        "image outcome: {}",
        json!({
            "tag": built.tag,
            "size_bytes": built.size_bytes,
            "base": built.base,
            "base_created": built.base_created,
            "seconds": t.elapsed().as_secs_f64(),
        })
    );
    ImageGuard(built)
}

/// `podman run --rm` of `image` with `args` (after `--entrypoint`, if given).
fn run_once(image: &str, entrypoint: Option<&str>, args: &[&str]) -> (bool, String) {
    let mut c = container::podman();
    c.args(["run", "--rm"])
        .args(container::ulimit_args().expect("ulimits"));
    if let Some(e) = entrypoint {
        c.arg(format!("--entrypoint={e}"));
    }
    c.arg(image).args(args);
    let out = cmd::output(&mut c).expect("podman run");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_image_holds_the_binaries_and_the_libraries_they_link_and_nothing_else() {
    root();
    let work = tempfile::tempdir().expect("tempdir");
    let image = build(work.path());
    let tag = &image.0.tag;
    let bins = binaries();
    let libs = container::shared_libraries(&bins).expect("ldd");
    let mut expected: BTreeSet<PathBuf> = libs.iter().cloned().collect();
    for b in &bins {
        expected.insert(Path::new("/usr/bin").join(b.file_name().expect("name")));
    }
    let files: BTreeSet<PathBuf> = container::image_files(tag)
        .expect("listing the image")
        .into_iter()
        .collect();
    assert_eq!(files, expected, "the image holds other files than expected");

    // Each binary's libraries resolve inside the image, with its loader and nothing else.
    let loader = libs
        .iter()
        .find(|l| {
            l.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("ld-"))
        })
        .expect("a dynamic loader among the libraries");
    for b in &expected {
        if !b.starts_with("/usr/bin") {
            continue;
        }
        let (success, text) = run_once(
            tag,
            Some(&loader.to_string_lossy()),
            &["--list", &b.to_string_lossy()],
        );
        assert!(
            success && !text.contains("not found"),
            "{} does not load in the image: {text}",
            b.display()
        );
    }
    let (success, text) = run_once(tag, None, &["--version"]);
    assert!(
        success && text.contains("portcullis"),
        "the entrypoint does not run: {text}"
    );

    // The entrypoint and command the DaemonSet relies on.
    let config = cmd::run(container::podman().args([
        "image",
        "inspect",
        "--format",
        "{{json .Config}}",
        tag,
    ]))
    .expect("podman image inspect");
    let config: Value = serde_json::from_str(&config).expect("image config JSON");
    assert_eq!(
        config["Entrypoint"],
        json!(["/usr/bin/portcullis"]),
        "{config}"
    );
    assert_eq!(
        config["Cmd"],
        json!(["run", "--config", "/etc/portcullis/config/agent.yaml"]),
        "{config}"
    );
}

fn scenario(tb: &Testbed) -> Scenario<'_> {
    Scenario {
        tb,
        probe: PathBuf::from(env!("CARGO_BIN_EXE_probe")),
    }
}

/// `portcullis ARGS` inside the container: success and combined output.
fn exec(c: &Container, args: &[&str]) -> (bool, String) {
    let out = c.exec(args).expect("podman exec");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn exec_status(c: &Container) -> Value {
    let (success, text) = exec(c, &["portcullis", "status", "--output", "json"]);
    assert!(success, "portcullis status in the container failed: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("status JSON: {e}: {text}"))
}

/// Every drop counter of a status, summed.
fn drops(st: &Value) -> u64 {
    st["counters"].as_object().map_or(0, |o| {
        o.iter()
            .filter(|(k, _)| k.starts_with("drop_"))
            .map(|(_, v)| v.as_u64().unwrap_or(0))
            .sum()
    })
}

fn attached(st: &Value) -> Vec<String> {
    st["interfaces"]
        .as_array()
        .map(|is| {
            is.iter()
                .map(|i| i["attached"].as_str().unwrap_or("?").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// node-2's agent and the issuer run from the image; node-1's agent is the testbed's. The
/// issuer signs both nodes' SVIDs; the pair client → server authenticates across the nodes
/// and a pod without identity is dropped; `status` and `doctor` answer through `podman
/// exec`; and the agent's container stopped (SIGTERM) and started again adopts its pins while
/// a transfer runs through, unreset.
#[test]
fn the_agent_and_the_issuer_from_the_image_enforce_and_a_container_restart_adopts_the_pins() {
    root();
    let work = tempfile::tempdir().expect("tempdir");
    let image = build(work.path());
    let tag = image.0.tag.clone();
    let spec = Spec {
        nodes: vec![
            NodeSpec::new(
                "node-1",
                vec![
                    PodSpec::new("client"),
                    PodSpec::new("stranger").enroll(false),
                ],
            ),
            NodeSpec::new("node-2", vec![PodSpec::new("server")]),
        ],
    };
    let mut tb = Testbed::up(
        &spec,
        &Options {
            authenticate: true,
            issuer_replicas: 1,
            ..Options::default()
        },
    )
    .unwrap_or_else(|e| panic!("testbed up: {e:#}"));

    // The issuer of the image takes replica 0's place and address.
    let issuer_c = tb
        .run_issuer_container(0, &tag)
        .unwrap_or_else(|e| panic!("the issuer from the image: {e:#}"));
    // node-2's agent from the image, on a node whose pins are gone: it loads and attaches
    // everything itself.
    tb.stop_agent("node-2").expect("stopping node-2's agent");
    let (success, text) = scenario(&tb).portcullis("node-2", &["uninstall"]);
    assert!(success, "uninstall on node-2: {text}");
    let agent_c = tb
        .run_agent_container("node-2", &tag)
        .unwrap_or_else(|e| panic!("node-2's agent from the image: {e:#}"));
    // node-1's agent joins again, at the issuer of the image.
    tb.stop_agent("node-1").expect("stopping node-1's agent");
    tb.start_agent("node-1").expect("starting node-1's agent");
    let s = scenario(&tb);
    let ready = eventually(Duration::from_secs(20), || {
        ["node-1", "node-2"]
            .iter()
            .all(|n| s.status(n)["agent"]["ready"] == true)
    });
    assert!(
        ready,
        "not ready: node-1 {} / node-2 {}; node-2's container:\n{}",
        s.status("node-1")["agent"],
        s.status("node-2")["agent"],
        agent_c.log_tail(30)
    );
    let records = issuer::audit_records(&tb.issuer_container_audit_log(0));
    for node in ["node-1", "node-2"] {
        assert!(
            records
                .iter()
                .any(|r| r["op"] == "join" && r["node"] == node && r["result"] == "signed"),
            "{node} did not join at the issuer of the image: {records:#?}\n{}",
            issuer_c.log_tail(30)
        );
    }

    // status and doctor through podman exec, as `kubectl exec ds/portcullis -- …`.
    let st = exec_status(&agent_c);
    assert_eq!(st["agent"]["running"], true, "{st}");
    // The config file has no `node`: PORTCULLIS_NODE named it.
    assert_eq!(st["agent"]["node"], "node-2", "{st}");
    assert_eq!(
        st["agent"]["pid"], 1,
        "not the container's own process: {st}"
    );
    assert_eq!(st["agent"]["identity_source"], "issuer", "{st}");
    let fresh = attached(&st);
    assert!(
        !fresh.is_empty() && fresh.iter().all(|a| a == "new"),
        "the agent of the image did not attach the programs itself: {fresh:?}"
    );
    let (success, text) = exec(
        &agent_c,
        &[
            "portcullis",
            "doctor",
            "--config",
            "/etc/portcullis/config/agent.yaml",
            "--output",
            "json",
        ],
    );
    assert!(success, "doctor in the container failed: {text}");
    let checks: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let checks = checks.as_array().expect("doctor's checks");
    assert!(
        checks.iter().all(|c| c["verdict"] == "ok"),
        "doctor in the container: {checks:#?}"
    );
    let cg2 = cgroup::mount_point().expect("cgroup2 mount");
    assert!(
        checks.iter().any(|c| c["name"] == "cgroup_v2"
            && c["detail"]
                .as_str()
                .is_some_and(|d| d.contains(&*cg2.to_string_lossy()))),
        "doctor does not find the host's cgroup2 mount {}: {checks:#?}",
        cg2.display()
    );

    // Enforcement by the agent of the image.
    let _server = s.serve("server", PORT);
    for family in [Family::V4, Family::V6] {
        let target = s.addr("server", family);
        let r = s.connect("client", target, PORT, 5000);
        assert!(
            ok(&r),
            "{family:?}: the authenticated pair does not connect: {r}"
        );
        let before = drops(&s.status("node-2"));
        let r = s.connect("stranger", target, PORT, 1000);
        assert!(
            !ok(&r) && r["kind"] == "timeout",
            "{family:?}: a pod without identity got through, or was refused rather than dropped: {r}"
        );
        let after = drops(&s.status("node-2"));
        assert!(
            after > before,
            "{family:?}: the drop is not counted ({before} → {after})"
        );
    }

    // The container stopped and started again under a transfer paced over 8 s.
    let target = s.addr("server", Family::V4);
    let transfer = s.transfer("client", target, PORT, 8_000_000, 8, 5000);
    thread::sleep(Duration::from_secs(2));
    let flows = s.status("node-2")["flows"].as_array().map_or(0, Vec::len);
    assert!(flows >= 1, "the transfer's flow is not tracked");
    let t = Instant::now();
    agent_c
        .stop(Duration::from_secs(10))
        .expect("podman stop of the agent");
    let stop_s = t.elapsed().as_secs_f64();
    assert!(!agent_c.is_running(), "the agent's container still runs");
    let links = tb.node("node-2").bpffs_dir.join("links");
    assert!(
        std::fs::read_dir(&links).is_ok_and(|d| d.count() >= 2),
        "the pinned links went with the container"
    );
    // With no agent, the kernel still enforces.
    let during_auth = ok(&s.connect("client", target, PORT, 3000));
    let during_stranger = ok(&s.connect("stranger", target, PORT, 500));
    let t = Instant::now();
    tb.start_agent_container("node-2", &agent_c)
        .unwrap_or_else(|e| panic!("starting the agent's container again: {e:#}"));
    let start_s = t.elapsed().as_secs_f64();
    let result = transfer.finish();
    let s = scenario(&tb);
    let st = s.status("node-2");
    let outcome = json!({
        "stop_seconds": stop_s,
        "start_seconds": start_s,
        "transfer": result,
        "authenticated_while_stopped": during_auth,
        "stranger_while_stopped": during_stranger,
        "attached_after": attached(&st),
    });
    eprintln!("image restart outcome: {outcome}");
    assert!(
        ok(&result),
        "the transfer was reset across the restart: {outcome}"
    );
    assert!(
        during_auth,
        "the pair did not connect while the agent was stopped: {outcome}"
    );
    assert!(
        !during_stranger,
        "the stranger got through while the agent was stopped: {outcome}"
    );
    let adopted = attached(&st);
    assert!(
        !adopted.is_empty() && adopted.iter().all(|a| a == "adopted"),
        "the restarted agent did not adopt its pins: {outcome}"
    );
    assert!(
        ok(&s.connect("client", target, PORT, 3000)),
        "the pair does not connect after the restart"
    );
    assert!(
        !ok(&s.connect("stranger", target, PORT, 500)),
        "the stranger gets through after the restart"
    );
}

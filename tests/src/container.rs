//! The container image (deploy/Dockerfile) built with podman from binaries of this checkout,
//! and containers run from it on the testbed as Kubernetes would run them: the agent as
//! deploy/daemonset.yaml runs it, the issuer as deploy/issuer.yaml does. `cargo xtask image`
//! and the image tests share this code.
//!
//! Nothing can be pulled on the machines this runs on, so the runtime base is made locally: a
//! `FROM scratch` image holding exactly the shared libraries the binaries link (`ldd`) and the
//! dynamic loader, which is what `gcr.io/distroless/cc-debian12` provides them. It is imported
//! once and found again by a tag that is a hash of those files.
//!
//! podman runs with Debian's `runc`: its default runtime, crun, refuses a hybrid cgroup layout.
//! podman's default rlimits (2^20 open files and processes) exceed what the runtime may set, so
//! every container gets explicit ones ([`ulimit_args`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::testbed::Testbed;
use crate::{cmd, netns};

/// The runtime podman is told to use.
pub const RUNTIME: &str = "/usr/sbin/runc";
/// The binaries of the agent crate the image carries in /usr/bin.
pub const IMAGE_BINARIES: &[&str] = &["portcullis", "portcullis-cni"];
/// Repository of the local runtime bases; the tag is a hash of their files.
pub const BASE_REPOSITORY: &str = "localhost/portcullis-base";
/// The Dockerfile stage that takes prebuilt binaries from `bin/` in the build context.
pub const PREBUILT_TARGET: &str = "prebuilt";
/// What distroless sets, so that `kubectl exec … -- portcullis status` finds the binary.
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `podman --runtime runc`.
pub fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", RUNTIME]);
    c
}

/// `--ulimit` arguments for podman: the hard limits of this process, which the runtime may
/// set, where podman's defaults (1048576) exceed them on many machines. The process limit is
/// also capped at kernel.pid_max (no more processes can exist): podman was measured running
/// with RLIMIT_NPROC lowered to 32768, this machine's pid_max, under a hard limit of 96365,
/// and runc cannot give a container more than podman has.
pub fn ulimit_args() -> Result<Vec<String>> {
    let nofile = match hard_limit(libc::RLIMIT_NOFILE)? {
        None => read_number("/proc/sys/fs/nr_open")?,
        Some(n) => n,
    };
    let pid_max = read_number("/proc/sys/kernel/pid_max")?;
    let nproc = hard_limit(libc::RLIMIT_NPROC)?.map_or(pid_max, |n| n.min(pid_max));
    Ok(vec![
        "--ulimit".into(),
        format!("nofile={nofile}:{nofile}"),
        "--ulimit".into(),
        format!("nproc={nproc}:{nproc}"),
    ])
}

/// The hard limit of `resource`; `None` when unlimited.
fn hard_limit(resource: libc::__rlimit_resource_t) -> Result<Option<u64>> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(resource, &raw mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit");
    }
    Ok((lim.rlim_max != libc::RLIM_INFINITY).then_some(lim.rlim_max))
}

fn read_number(path: &str) -> Result<u64> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {path}"))?
        .trim()
        .parse()
        .with_context(|| format!("{path} is not a number"))
}

/// What to build: `binaries` (each named as it will be in /usr/bin) into `tag`, with the
/// Dockerfile's prebuilt stage, staging files under `work_dir`.
#[derive(Debug, Clone)]
pub struct ImageBuild {
    pub dockerfile: PathBuf,
    pub binaries: Vec<PathBuf>,
    pub tag: String,
    pub work_dir: PathBuf,
    /// Copy the binaries without their DWARF sections (`objcopy --strip-debug`): a debug build
    /// is a quarter of its size without them, and keeps its symbols for backtraces.
    pub strip_debug: bool,
    /// Let podman's output through (progress on a terminal) instead of keeping it for errors.
    pub verbose: bool,
}

/// What was built.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub tag: String,
    pub id: String,
    /// Uncompressed, as `podman images` shows it.
    pub size_bytes: u64,
    pub base: String,
    /// Whether the base had to be made (false: found by its tag).
    pub base_created: bool,
    pub base_time: Duration,
    pub build_time: Duration,
}

/// Builds the image: the base (unless its tag exists), the context (`bin/` with the binaries),
/// then `podman build --target prebuilt --build-arg BASE=<base>`. An image that held the tag
/// before is removed, unless a container still uses it.
pub fn build_image(b: &ImageBuild) -> Result<BuiltImage> {
    if b.binaries.is_empty() {
        bail!("no binaries to put in the image");
    }
    for bin in &b.binaries {
        if !bin.is_file() {
            bail!("{} does not exist (build it first)", bin.display());
        }
    }
    let started = Instant::now();
    let libs = shared_libraries(&b.binaries)?;
    let base = format!("{BASE_REPOSITORY}:{}", files_hash(&libs)?);
    let base_created = !image_exists(&base)?;
    if base_created {
        eprintln!(
            "image: making the base {base} from {} files: {}",
            libs.len(),
            libs.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
        import_base(&base, &libs, &b.work_dir.join("base"))?;
    } else {
        eprintln!("image: base {base} exists");
    }
    let base_time = started.elapsed();

    let started = Instant::now();
    let context = b.work_dir.join("context");
    stage_binaries(&context, &b.binaries, b.strip_debug)?;
    let previous = image_id(&b.tag)?;
    eprintln!(
        "image: podman build --target {PREBUILT_TARGET} -f {} -t {}",
        b.dockerfile.display(),
        b.tag
    );
    let mut c = podman();
    c.arg("build")
        // Layers would leave an untagged image per build behind.
        .arg("--layers=false")
        .args(ulimit_args()?)
        .args(["--target", PREBUILT_TARGET])
        .arg("--build-arg")
        .arg(format!("BASE={base}"))
        .arg("-f")
        .arg(&b.dockerfile)
        .args(["-t", &b.tag])
        .arg(&context);
    if b.verbose {
        let status = c
            .status()
            .with_context(|| format!("cannot start `{}`", cmd::describe(&c)))?;
        if !status.success() {
            bail!("`{}` failed ({status})", cmd::describe(&c));
        }
    } else {
        cmd::run(&mut c)?;
    }
    let build_time = started.elapsed();
    let id =
        image_id(&b.tag)?.with_context(|| format!("{} is not there after the build", b.tag))?;
    if let Some(old) = previous.filter(|old| *old != id) {
        let mut rm = podman();
        rm.args(["rmi", &old]);
        if let Err(e) = cmd::run(&mut rm) {
            eprintln!("image: the previous image of {} stays: {e:#}", b.tag);
        }
    }
    let size = cmd::run(podman().args(["image", "inspect", "--format", "{{.Size}}", &b.tag]))?;
    Ok(BuiltImage {
        tag: b.tag.clone(),
        id,
        size_bytes: size
            .trim()
            .parse()
            .with_context(|| format!("image size {size:?}"))?,
        base,
        base_created,
        base_time,
        build_time,
    })
}

/// The shared libraries `binaries` load, and the dynamic loader, as `ldd` names them (sorted,
/// once each). A library `ldd` cannot find is an error: the image would not start.
pub fn shared_libraries(binaries: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for bin in binaries {
        let mut c = Command::new("ldd");
        c.arg(bin);
        let out = cmd::output(&mut c)?;
        let text = String::from_utf8_lossy(&out.stdout);
        // A static binary needs no library ("not a dynamic executable" comes on stderr).
        if text.contains("statically linked")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            continue;
        }
        cmd::check(&c, &out)?;
        libs.extend(parse_ldd(&text).with_context(|| format!("ldd {}", bin.display()))?);
    }
    libs.sort();
    libs.dedup();
    Ok(libs)
}

/// The files in `ldd` output: "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" and the
/// loader, "/lib64/ld-linux-x86-64.so.2 (0x…)"; the vDSO ("linux-vdso.so.1 (0x…)") is none.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.ends_with("not found") {
            bail!("no {line}");
        }
        let path = line.split_once("=>").map_or(line, |(_, p)| p.trim());
        if let Some(path) = path
            .split_whitespace()
            .next()
            .filter(|p| p.starts_with('/'))
        {
            files.push(PathBuf::from(path));
        }
    }
    Ok(files)
}

/// A tag for a base made of `files`: FNV-1a (64 bits) over their paths and contents. Not a
/// security boundary, only a cache key: the same files give the same base.
fn files_hash(files: &[PathBuf]) -> Result<String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for f in files {
        let data = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
        eat(f.as_os_str().as_encoded_bytes());
        eat(&[0]);
        eat(&(data.len() as u64).to_le_bytes());
        eat(&data);
    }
    Ok(format!("{h:016x}"))
}

/// Writes a root filesystem of `files` (symlinks followed: each at the path the binaries ask
/// for) under `dir`, tars it and imports it as `tag`.
fn import_base(tag: &str, files: &[PathBuf], dir: &Path) -> Result<()> {
    let root = dir.join("rootfs");
    remove_dir_if_exists(dir)?;
    for f in files {
        let rel = f.strip_prefix("/").unwrap_or(f);
        let dest = root.join(rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::copy(f, &dest)
            .with_context(|| format!("cannot copy {} to {}", f.display(), dest.display()))?;
    }
    let tarball = dir.join("base.tar");
    cmd::run(
        Command::new("tar")
            .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
            .arg(&root)
            .arg("-cf")
            .arg(&tarball)
            .arg("."),
    )?;
    cmd::run(
        podman()
            .args(["import", "--change", &format!("ENV {PATH_ENV}")])
            .arg(&tarball)
            .arg(tag),
    )?;
    remove_dir_if_exists(dir)
}

/// Makes `context/bin/` hold exactly `binaries`.
fn stage_binaries(context: &Path, binaries: &[PathBuf], strip_debug: bool) -> Result<()> {
    remove_dir_if_exists(context)?;
    let bin_dir = context.join("bin");
    std::fs::create_dir_all(&bin_dir)
        .with_context(|| format!("cannot create {}", bin_dir.display()))?;
    for bin in binaries {
        let name = bin
            .file_name()
            .with_context(|| format!("{} has no file name", bin.display()))?;
        let dest = bin_dir.join(name);
        if strip_debug {
            cmd::run(
                Command::new("objcopy")
                    .arg("--strip-debug")
                    .arg(bin)
                    .arg(&dest),
            )?;
        } else {
            std::fs::copy(bin, &dest)
                .with_context(|| format!("cannot copy {} to {}", bin.display(), dest.display()))?;
        }
    }
    Ok(())
}

fn remove_dir_if_exists(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", dir.display())),
    }
}

pub fn image_exists(image: &str) -> Result<bool> {
    let mut c = podman();
    c.args(["image", "exists", image]);
    let out = cmd::output(&mut c)?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => cmd::check(&c, &out).map(|()| false),
    }
}

/// The id of `image`, if it exists.
pub fn image_id(image: &str) -> Result<Option<String>> {
    if !image_exists(image)? {
        return Ok(None);
    }
    let id = cmd::run(podman().args(["image", "inspect", "--format", "{{.Id}}", image]))?;
    Ok(Some(id.trim().to_owned()))
}

/// Every file and symlink of `image` (paths from its root, sorted), read from the image
/// mounted for the moment.
pub fn image_files(image: &str) -> Result<Vec<PathBuf>> {
    let root = PathBuf::from(
        cmd::run(podman().args(["image", "mount", image]))?
            .trim()
            .to_owned(),
    );
    let mut files = Vec::new();
    let walked = walk_files(&root, &root, &mut files);
    let unmounted = cmd::run(podman().args(["image", "unmount", image]));
    walked?;
    unmounted?;
    files.sort();
    Ok(files)
}

fn walk_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk_files(root, &path, out)?;
        } else {
            out.push(Path::new("/").join(path.strip_prefix(root)?));
        }
    }
    Ok(())
}

/// An image that is removed on drop (a test's own tag).
pub struct ImageGuard(pub BuiltImage);

impl Drop for ImageGuard {
    fn drop(&mut self) {
        let mut c = podman();
        c.args(["rmi", "--force", "--ignore", &self.0.tag]);
        if let Err(e) = cmd::run(&mut c) {
            eprintln!("image {}: removal: {e:#}", self.0.tag);
        }
    }
}

/// A bind mount into a container (`-v HOST:CONTAINER[:OPTIONS]`, recursive as podman's are).
#[derive(Debug, Clone)]
pub struct Mount {
    pub host: PathBuf,
    pub container: PathBuf,
    pub read_only: bool,
    /// `rshared` for Kubernetes' `mountPropagation: Bidirectional`.
    pub propagation: Option<&'static str>,
}

impl Mount {
    pub fn ro(host: impl Into<PathBuf>, container: impl Into<PathBuf>) -> Mount {
        Mount {
            host: host.into(),
            container: container.into(),
            read_only: true,
            propagation: None,
        }
    }

    pub fn rw(host: impl Into<PathBuf>, container: impl Into<PathBuf>) -> Mount {
        Mount {
            read_only: false,
            ..Mount::ro(host, container)
        }
    }

    /// The same path on both sides (a `hostPath` at its own place).
    pub fn same(path: impl Into<PathBuf>, read_only: bool) -> Mount {
        let p: PathBuf = path.into();
        Mount {
            read_only,
            ..Mount::ro(p.clone(), p)
        }
    }

    fn arg(&self) -> Result<String> {
        let (h, c) = (
            self.host.to_string_lossy(),
            self.container.to_string_lossy(),
        );
        if h.contains([':', ',']) || c.contains([':', ',']) {
            bail!("mount {h} → {c}: podman's -v cannot express a path with ':' or ','");
        }
        let mut options = Vec::new();
        if self.read_only {
            options.push("ro");
        }
        options.extend(self.propagation);
        Ok(if options.is_empty() {
            format!("{h}:{c}")
        } else {
            format!("{h}:{c}:{}", options.join(","))
        })
    }
}

/// How to run a container (the podman equivalents of a pod spec's fields).
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    pub name: String,
    pub image: String,
    /// `--network ns:/run/netns/<name>`: a network namespace of the testbed (`hostNetwork`
    /// on that node).
    pub netns: Option<String>,
    /// `securityContext.privileged: true`.
    pub privileged: bool,
    /// No capability at all and no privilege escalation (`capabilities.drop: [ALL]`,
    /// `allowPrivilegeEscalation: false`).
    pub no_capabilities: bool,
    /// `readOnlyRootFilesystem: true`.
    pub read_only: bool,
    /// `runAsUser:runAsGroup`.
    pub user: Option<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    /// Replace the image's CMD (`args:`); empty: the image's.
    pub args: Vec<String>,
    /// Run podman inside this process's mount namespace, so that host paths resolve there
    /// (the issuers' CA exists only in theirs).
    pub mount_ns_of: Option<i32>,
}

/// A container, removed (`podman rm --force`) on drop.
pub struct Container {
    name: String,
    mount_ns_of: Option<i32>,
}

impl Container {
    /// `podman run --detach` of `spec`.
    pub fn run(spec: &RunSpec) -> Result<Container> {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--detach".into(),
            "--name".into(),
            spec.name.clone(),
        ];
        args.extend(ulimit_args()?);
        if let Some(ns) = &spec.netns {
            args.push(format!("--network=ns:{}", netns::path(ns).display()));
        }
        if spec.privileged {
            args.push("--privileged".into());
        }
        if spec.no_capabilities {
            args.extend([
                "--cap-drop=all".into(),
                "--security-opt=no-new-privileges".into(),
            ]);
        }
        if spec.read_only {
            args.push("--read-only".into());
        }
        if let Some(user) = &spec.user {
            args.push(format!("--user={user}"));
        }
        for (k, v) in &spec.env {
            args.push(format!("--env={k}={v}"));
        }
        for m in &spec.mounts {
            args.push("--volume".into());
            args.push(m.arg()?);
        }
        args.push(spec.image.clone());
        args.extend(spec.args.iter().cloned());
        let container = Container {
            name: spec.name.clone(),
            mount_ns_of: spec.mount_ns_of,
        };
        let mut c = container.podman();
        c.args(&args);
        // Owned before it is started: a `run` that fails halfway may leave a created
        // container, which drop removes.
        cmd::run(&mut c)?;
        Ok(container)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// podman, in the mount namespace the container was created from.
    fn podman(&self) -> Command {
        match self.mount_ns_of {
            Some(pid) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--mount=/proc/{pid}/ns/mnt")).args([
                    "--",
                    "podman",
                    "--runtime",
                    RUNTIME,
                ]);
                c
            }
            None => podman(),
        }
    }

    /// `podman exec NAME ARGS…`, whatever its exit status.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        let mut c = self.podman();
        c.arg("exec").arg(&self.name).args(args);
        cmd::output(&mut c)
    }

    /// `podman stop`: SIGTERM (as the kubelet stops a container), SIGKILL after `grace`.
    pub fn stop(&self, grace: Duration) -> Result<()> {
        cmd::run(
            self.podman()
                .args(["stop", "--time", &grace.as_secs().to_string(), &self.name]),
        )
        .map(drop)
    }

    /// `podman start` of a stopped container (its process starts again, as after a restart
    /// of the pod's container by the kubelet).
    pub fn start(&self) -> Result<()> {
        cmd::run(self.podman().args(["start", &self.name])).map(drop)
    }

    pub fn is_running(&self) -> bool {
        let mut c = self.podman();
        c.args(["inspect", "--format", "{{.State.Running}}", &self.name]);
        cmd::run(&mut c).is_ok_and(|s| s.trim() == "true")
    }

    /// The last `lines` lines of its output (stdout and stderr).
    pub fn log_tail(&self, lines: usize) -> String {
        let mut c = self.podman();
        c.args(["logs", "--tail", &lines.to_string(), &self.name]);
        match cmd::output(&mut c) {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("(no logs: {e:#})"),
        }
    }

    /// Waits (bounded) until `ready` holds, failing early with its logs if the container stops.
    pub fn wait_until(
        &self,
        what: &str,
        limit: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if ready() {
                return Ok(());
            }
            if !self.is_running() {
                bail!(
                    "container {} stopped before {what}; its last lines:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "container {}: no {what} within {limit:?}; its last lines:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let mut c = self.podman();
        if self
            .mount_ns_of
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}/ns/mnt")).exists())
        {
            // The namespace is gone (and the container's mounts with it): remove the rest
            // from here.
            c = podman();
        }
        c.args(["rm", "--force", "--ignore", "--time", "5", &self.name]);
        if let Err(e) = cmd::run(&mut c) {
            eprintln!("container {}: removal: {e:#}", self.name);
        }
    }
}

/// Where the agent's admin socket is inside its container (deploy/configmap.yaml).
const CONTAINER_ADMIN_SOCKET: &str = "/run/portcullis/admin.sock";
/// The DaemonSet's config mount.
const AGENT_CONFIG_DIR: &str = "/etc/portcullis/config";
/// The issuer Deployment's config and CA mounts.
const ISSUER_CONFIG_DIR: &str = "/etc/portcullis-issuer/config";
const ISSUER_CA_DIR: &str = "/etc/portcullis-issuer/ca";

/// Containers on the testbed: a node's agent and an issuer replica, run from an image.
impl Testbed {
    /// The host directory mounted at /run/portcullis in node `node`'s agent container.
    pub fn agent_container_run_dir(&self, node: &str) -> PathBuf {
        self.info.state_dir.join(format!("{node}-run"))
    }

    fn agent_container_config_dir(&self, node: &str) -> PathBuf {
        self.info.state_dir.join(format!("{node}-config"))
    }

    /// Runs node `node`'s agent from `image` as deploy/daemonset.yaml runs it: privileged, in
    /// the node's network namespace (its host network), read-only root, the host's bpffs
    /// (`rshared`) and cgroup tree, /run/portcullis from the host, `PORTCULLIS_NODE` from
    /// the environment, the image's command, and the config file mounted in
    /// /etc/portcullis/config. That file is the node's testbed config without `node` (the
    /// ConfigMap has none) and with the admin socket at /run/portcullis/admin.sock; the
    /// node's own config names the socket's host path from then on, so that
    /// [`Testbed::portcullis`] keeps working. The testbed's state directory is mounted at its
    /// place, read-only: it stands for the API server, the ConfigMaps and the projected token
    /// (cluster state, policy, trust bundle, join token). The testbed's own agent of the node
    /// must be stopped. Waits until the admin socket exists.
    pub fn run_agent_container(&mut self, node: &str, image: &str) -> Result<Container> {
        if self.agent_running(node) {
            bail!("the testbed's agent of {node} runs: stop it first");
        }
        let run_dir = self.agent_container_run_dir(node);
        let config_dir = self.agent_container_config_dir(node);
        for d in [&run_dir, &config_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let host_socket = run_dir.join("admin.sock");
        let n = self.info.node(node)?.clone();
        let text = std::fs::read_to_string(&n.agent_config)
            .with_context(|| format!("cannot read {}", n.agent_config.display()))?;
        let mut config: serde_yaml::Mapping = serde_yaml::from_str(&text)
            .with_context(|| format!("invalid agent config {}", n.agent_config.display()))?;
        config.remove("node");
        config.insert("admin_socket".into(), CONTAINER_ADMIN_SOCKET.into());
        crate::cluster::write_atomic(
            &config_dir.join("agent.yaml"),
            serde_yaml::to_string(&config)?.as_bytes(),
        )?;
        self.write_agent_config(node, |c| c.admin_socket = host_socket.clone())?;
        if let Some(info) = self.info.nodes.iter_mut().find(|x| x.name == node) {
            info.admin_socket = host_socket;
        }
        self.info.save()?;
        crate::ensure_bpffs()?;
        let cg2 = crate::cgroup::mount_point()?;
        // The DaemonSet mounts /sys/fs/cgroup; on a hybrid host cgroup2 is below it.
        let cgroup_root = if cg2.starts_with("/sys/fs/cgroup") {
            PathBuf::from("/sys/fs/cgroup")
        } else {
            cg2
        };
        let spec = RunSpec {
            name: format!("{}-agent-{node}", self.info.prefix),
            image: image.to_owned(),
            netns: Some(n.netns.clone()),
            privileged: true,
            read_only: true,
            env: vec![
                ("PORTCULLIS_NODE".into(), node.to_owned()),
                ("RUST_BACKTRACE".into(), "1".into()),
            ],
            mounts: vec![
                Mount {
                    propagation: Some("rshared"),
                    ..Mount::same(crate::info::BPFFS_ROOT, false)
                },
                Mount::same(cgroup_root, true),
                Mount::rw(&run_dir, "/run/portcullis"),
                Mount::ro(&config_dir, AGENT_CONFIG_DIR),
                Mount::same(&self.info.state_dir, true),
            ],
            ..RunSpec::default()
        };
        self.prepare_agent_start(node)?;
        let container = Container::run(&spec)?;
        self.wait_agent_container(node, &container)?;
        Ok(container)
    }

    /// Starts node `node`'s stopped agent container again (a new join token first, as
    /// [`Testbed::start_agent`] writes one) and waits until its admin socket exists.
    pub fn start_agent_container(&self, node: &str, container: &Container) -> Result<()> {
        self.prepare_agent_start(node)?;
        container.start()?;
        self.wait_agent_container(node, container)
    }

    fn prepare_agent_start(&self, node: &str) -> Result<()> {
        if self.issuers() {
            let token = self.enroll(node)?;
            let path = self.join_token_path(node);
            std::fs::write(&path, format!("{token}\n"))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        // A socket left by the last run would look like readiness.
        let socket = self.agent_container_run_dir(node).join("admin.sock");
        match std::fs::remove_file(&socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove stale {}", socket.display()))
            }
            _ => Ok(()),
        }
    }

    fn wait_agent_container(&self, node: &str, container: &Container) -> Result<()> {
        let socket = self.agent_container_run_dir(node).join("admin.sock");
        container.wait_until(
            &format!("admin socket {}", socket.display()),
            self.opts.agent_ready_timeout,
            || socket.exists(),
        )
    }

    /// The audit log of issuer replica `k` run from an image.
    pub fn issuer_container_audit_log(&self, k: usize) -> PathBuf {
        self.issuer_dir()
            .join(format!("image{k}"))
            .join("audit")
            .join("audit.jsonl")
    }

    /// Replaces issuer replica `k` by a container of `image` at the same address, run as
    /// deploy/issuer.yaml runs it: no capability, no privilege escalation, uid 0, read-only
    /// root, config mounted in /etc/portcullis-issuer/config and the CA in
    /// /etc/portcullis-issuer/ca. podman runs inside the issuers' mount namespace, the only
    /// place where the CA key exists, so that the key never appears anywhere else. The
    /// replica's config is kept but for `ca_dir` and `audit_log` (a file of its own,
    /// [`Testbed::issuer_container_audit_log`]); the testbed's state directory is mounted
    /// read-only (cluster state) and the join-token state read-write. Waits until it listens.
    pub fn run_issuer_container(&mut self, k: usize, image: &str) -> Result<Container> {
        if !self.issuers() {
            bail!("the testbed runs no issuers (Options::issuer_replicas)");
        }
        self.kill_issuer(k)?;
        let dir = self.issuer_dir().join(format!("image{k}"));
        let config_dir = dir.join("config");
        let audit = self.issuer_container_audit_log(k);
        let audit_dir = audit.parent().context("audit log path")?.to_path_buf();
        for d in [&config_dir, &audit_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let source = self.issuer_config(k);
        let text = std::fs::read_to_string(&source)
            .with_context(|| format!("cannot read {}", source.display()))?;
        let mut config: serde_yaml::Mapping = serde_yaml::from_str(&text)
            .with_context(|| format!("invalid issuer config {}", source.display()))?;
        config.insert("ca_dir".into(), ISSUER_CA_DIR.into());
        config.insert(
            "audit_log".into(),
            audit.to_string_lossy().into_owned().into(),
        );
        let listen: std::net::SocketAddr = config
            .get("listen")
            .and_then(serde_yaml::Value::as_str)
            .with_context(|| format!("{} has no listen address", source.display()))?
            .parse()
            .with_context(|| format!("{}: listen", source.display()))?;
        crate::cluster::write_atomic(
            &config_dir.join("issuer.yaml"),
            serde_yaml::to_string(&config)?.as_bytes(),
        )?;
        let spec = RunSpec {
            name: format!("{}-issuer{k}", self.info.prefix),
            image: image.to_owned(),
            netns: Some(self.issuer_netns()),
            no_capabilities: true,
            read_only: true,
            user: Some("0:0".into()),
            mounts: vec![
                Mount::ro(self.issuer_ca_dir().join("ca"), ISSUER_CA_DIR),
                Mount::ro(&config_dir, ISSUER_CONFIG_DIR),
                Mount::same(&self.info.state_dir, true),
                Mount::same(self.issuer_dir().join("state"), false),
                Mount::same(&audit_dir, false),
            ],
            args: vec![
                "issuer".into(),
                "run".into(),
                "--config".into(),
                format!("{ISSUER_CONFIG_DIR}/issuer.yaml"),
            ],
            mount_ns_of: Some(self.issuer_keeper_pid()?),
            ..RunSpec::default()
        };
        let container = Container::run(&spec)?;
        let (ns, cg) = (self.issuer_netns(), self.info.cgroup_root.join("issuer"));
        let probe = format!("exec 3<>/dev/tcp/{}/{}", listen.ip(), listen.port());
        container.wait_until(
            &format!("listener on {listen}"),
            Duration::from_secs(20),
            || {
                crate::command_in(&ns, &cg, &["bash", "-c", &probe])
                    .and_then(|mut c| Ok(c.stderr(Stdio::null()).status()?))
                    .is_ok_and(|s| s.success())
            },
        )?;
        Ok(container)
    }
}

/// A name unique to this process and moment (for image tags): pid and nanoseconds, hex.
pub fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!("{:x}{nanos:08x}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_names_the_libraries_and_the_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd6d5f2000)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            parse_ldd(text).expect("parses"),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        let missing = "\tlibfoo.so.1 => not found\n";
        assert!(parse_ldd(missing).is_err());
    }

    #[test]
    fn mounts_are_podman_volume_arguments() {
        let m = Mount {
            propagation: Some("rshared"),
            ..Mount::same("/sys/fs/bpf", false)
        };
        assert_eq!(m.arg().expect("arg"), "/sys/fs/bpf:/sys/fs/bpf:rshared");
        assert_eq!(Mount::ro("/a", "/b").arg().expect("arg"), "/a:/b:ro");
        assert!(Mount::rw("/a:b", "/c").arg().is_err());
    }
}

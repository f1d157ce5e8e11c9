//! The SVID issuer in tests: a client that speaks its protocol with keys and requests the
//! test chooses (an honest agent's or an attacker's), a standalone issuer process on
//! loopback, and the testbed's issuer replicas.
//!
//! In the testbed, the CA exists only inside a mount namespace of the issuers' own: a tmpfs
//! mounted there, on a directory that stays empty everywhere else, holds `ca.key`. A keeper
//! process (`sleep`) holds that namespace; every replica enters it. The agents, in the root
//! mount namespace, have no path to the key at all.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};

use crate::{Testbed, cgroup, cmd, netns, process};

/// The port issuers listen on.
pub const ISSUER_PORT: u16 = 4182;
const ALPN: &[u8] = b"portcullis-issuer/1";

/// A certificate and its key, PEM.
#[derive(Clone, Debug)]
pub struct Credential {
    pub chain_pem: String,
    pub key_pem: String,
}

/// A fresh key and a CSR for `id`, after `edit` (to ask for more than an honest agent would).
pub fn csr(id: &str, edit: impl FnOnce(&mut CertificateParams)) -> (KeyPair, String) {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(id.try_into().expect("uri"))];
    edit(&mut p);
    let pem = p.serialize_request(&key).expect("csr").pem().expect("pem");
    (key, pem)
}

/// The test is the client and may be the attacker: it takes whatever server answers.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One connection to an issuer, presenting `cred` (or no certificate).
pub struct Session {
    stream: BufReader<StreamOwned<ClientConnection, TcpStream>>,
}

impl Session {
    pub fn open(addr: SocketAddr, cred: Option<&Credential>) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
        let mut config = match cred {
            Some(c) => {
                let chain: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(c.chain_pem.as_bytes())
                        .collect::<Result<_, _>>()?;
                let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes())?;
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN.to_vec()];
        let conn = ClientConnection::new(
            Arc::new(config),
            ServerName::try_from("issuer.portcullis.invalid")?,
        )?;
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to the issuer at {addr}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
        // As the agent's client does: a request is one write, never held back by Nagle.
        tcp.set_nodelay(true)?;
        Ok(Self {
            stream: BufReader::new(StreamOwned::new(conn, tcp)),
        })
    }

    /// Sends one request and returns the answer.
    pub fn ask(&mut self, req: &serde_json::Value) -> Result<serde_json::Value> {
        let mut line = serde_json::to_string(req)?;
        line.push('\n');
        self.stream.get_mut().write_all(line.as_bytes())?;
        self.stream.get_mut().flush()?;
        let mut answer = String::new();
        self.stream
            .read_line(&mut answer)
            .context("reading the issuer's answer")?;
        if answer.is_empty() {
            bail!("the issuer closed the connection");
        }
        Ok(serde_json::from_str(&answer)?)
    }
}

/// The refusal code of an answer, or `"signed"`.
pub fn outcome(answer: &serde_json::Value) -> String {
    match answer["result"].as_str() {
        Some("signed") => "signed".to_owned(),
        _ => answer["code"].as_str().unwrap_or("?").to_owned(),
    }
}

/// The credential an answer carries, with the key the CSR was made with.
pub fn credential(answer: &serde_json::Value, key: &KeyPair) -> Result<Credential> {
    let chain = answer["chain"]
        .as_str()
        .with_context(|| format!("no certificate in {answer}"))?;
    Ok(Credential {
        chain_pem: chain.to_owned(),
        key_pem: key.serialize_pem(),
    })
}

/// Trades a join token for a node SVID.
pub fn join(
    addr: SocketAddr,
    td: &str,
    node: &str,
    token: &str,
) -> Result<(serde_json::Value, KeyPair)> {
    let (key, csr) = csr(&format!("spiffe://{td}/portcullis/node/{node}"), |_| {});
    let answer = Session::open(addr, None)?.ask(&serde_json::json!({
        "op": "join", "node": node, "token": token, "csr": csr,
    }))?;
    Ok((answer, key))
}

/// Asks, as `cred`, for the SVID of `identity`.
pub fn sign(
    addr: SocketAddr,
    cred: Option<&Credential>,
    identity: &str,
) -> Result<serde_json::Value> {
    let (_key, csr) = csr(identity, |_| {});
    Session::open(addr, cred)?.ask(&serde_json::json!({
        "op": "sign", "identity": identity, "csr": csr,
    }))
}

/// Reads an audit log (JSON lines).
pub fn audit_records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits (bounded) until something accepts TCP connections at `addr`, from namespace `netns`
/// (`None`: this one).
fn wait_listening(
    addr: SocketAddr,
    child: &mut Child,
    log: &Path,
    netns: Option<(&str, &Path)>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = match netns {
            None => TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok(),
            Some((ns, cg)) => {
                let probe = format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port());
                crate::command_in(ns, cg, &["bash", "-c", &probe])?
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            }
        };
        if up {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the issuer exited ({status}) before listening on {addr}:\n{}",
                process::log_tail(log, 30)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the issuer did not listen on {addr} within 20 s:\n{}",
                process::log_tail(log, 30)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An issuer process on loopback, for tests that need no namespaces: killed on drop.
pub struct Standalone {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub audit: PathBuf,
    child: Option<Child>,
    bin: PathBuf,
}

impl Standalone {
    /// A bootstrap issuer over the cluster-state file `cluster_state`, with `extra` YAML
    /// lines appended to its configuration.
    pub fn bootstrap(bin: &Path, dir: &Path, cluster_state: &Path, extra: &str) -> Result<Self> {
        let body = format!(
            "cluster_state: {}\nattestor:\n  kind: bootstrap\n  state_dir: {}\n{extra}",
            cluster_state.display(),
            dir.join("state").display(),
        );
        Self::start(bin, dir, &body)
    }

    /// Creates a CA in `dir/ca` (trust domain `td`) if there is none, writes `issuer.yaml` in
    /// `dir` (listen, CA, audit log, then `body`: the source of cluster state, the attestor and
    /// anything else) and starts the issuer.
    pub fn start(bin: &Path, dir: &Path, body: &str) -> Result<Self> {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let audit = dir.join("audit.jsonl");
        let config = dir.join("issuer.yaml");
        std::fs::write(
            &config,
            format!(
                "listen: {addr}\nmetrics_addr: \"off\"\nca_dir: {}\naudit_log: {}\n{body}",
                dir.join("ca").display(),
                audit.display(),
            ),
        )?;
        let mut s = Self {
            addr,
            dir: dir.to_owned(),
            config,
            audit,
            child: None,
            bin: bin.to_owned(),
        };
        s.restart()?;
        Ok(s)
    }

    /// The CA's certificate (PEM), the agents' trust bundle.
    pub fn bundle(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.dir.join("ca/ca.pem"))?)
    }

    /// Makes the CA in `dir/ca` with `portcullis ca init`.
    pub fn make_ca(bin: &Path, dir: &Path, td: &str) -> Result<()> {
        let mut c = Command::new(bin);
        c.args(["ca", "init", "--trust-domain", td, "--out"])
            .arg(dir.join("ca"));
        cmd::run(&mut c).map(drop)
    }

    pub fn restart(&mut self) -> Result<()> {
        let log = self.dir.join("issuer.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut child = Command::new(&self.bin)
            .args(["issuer", "run", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting the issuer")?;
        wait_listening(self.addr, &mut child, &log, None)?;
        self.child = Some(child);
        Ok(())
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = process::terminate_child(&mut c, libc::SIGKILL, Duration::from_secs(5));
        }
    }

    /// `portcullis issuer enroll --node NODE`.
    pub fn enroll(&self, node: &str, ttl: Option<&str>) -> Result<String> {
        let mut c = Command::new(&self.bin);
        c.args(["issuer", "enroll", "--config"])
            .arg(&self.config)
            .args(["--node", node]);
        if let Some(t) = ttl {
            c.args(["--ttl", t]);
        }
        Ok(cmd::run(&mut c)?.trim().to_owned())
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The testbed's issuer replicas: all in netns `<prefix>-issuer`, replica `k` at
/// 198.18.0.(250 + k).
impl Testbed {
    pub fn issuer_netns(&self) -> String {
        format!("{}-issuer", self.info.prefix)
    }

    pub fn issuer_dir(&self) -> PathBuf {
        self.info.state_dir.join("issuer")
    }

    /// Where the CA lives inside the issuers' mount namespace (empty outside it).
    pub fn issuer_ca_dir(&self) -> PathBuf {
        self.issuer_dir().join("secret")
    }

    pub fn issuer_addr(k: usize) -> SocketAddr {
        SocketAddr::new(
            std::net::Ipv4Addr::new(198, 18, 0, 250 + u8::try_from(k).unwrap_or(0)).into(),
            ISSUER_PORT,
        )
    }

    pub fn issuer_audit_log(&self) -> PathBuf {
        self.issuer_dir().join("audit.jsonl")
    }

    pub(crate) fn issuer_config(&self, k: usize) -> PathBuf {
        self.issuer_dir().join(format!("issuer{k}.yaml"))
    }

    /// The keeper of the issuers' mount namespace.
    pub fn issuer_keeper_pid(&self) -> Result<i32> {
        let p = self.issuer_dir().join("keeper.pid");
        std::fs::read_to_string(&p)
            .with_context(|| format!("reading {}", p.display()))?
            .trim()
            .parse()
            .context("keeper pid")
    }

    /// Builds the issuers' namespace, the CA inside their private mount namespace, the trust
    /// bundle the agents get, and the replicas' configs; starts `replicas` replicas.
    pub(crate) fn setup_issuers(&mut self, replicas: usize) -> Result<()> {
        let dir = self.issuer_dir();
        let ca_mount = self.issuer_ca_dir();
        std::fs::create_dir_all(&ca_mount)?;
        std::fs::create_dir_all(dir.join("state"))?;
        let ns = self.issuer_netns();
        netns::add(&ns)?;
        let veth = format!("{}is", self.info.prefix);
        netns::check_ifname(&veth)?;
        let fabric = self.info.fabric_netns.clone();
        cmd::ip_in(
            &fabric,
            [
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        cmd::ip_in(
            &fabric,
            ["link", "set", &veth, "master", crate::testbed::BRIDGE, "up"],
        )?;
        for k in 0..replicas {
            let a = Self::issuer_addr(k);
            cmd::ip_in(
                &ns,
                ["addr", "add", &format!("{}/24", a.ip()), "dev", "eth0"],
            )?;
        }
        cmd::ip_in_str(&ns, "link set eth0 up")?;
        cmd::ip_in_str(&ns, "link set lo up")?;
        let cg = self.info.cgroup_root.join("issuer");
        cgroup::create(&cg)?;
        let bin = self.info.agent_bin.clone().context("no agent binary")?;
        let ready = dir.join("keeper.ready");
        let script = format!(
            "set -e; mount -t tmpfs -o mode=0700,size=1m portcullis-ca {m}; {bin} ca init --trust-domain {td} --out {m}/ca >/dev/null; cp {m}/ca/ca.pem {bundle}; echo $$ > {pid}; touch {ready}; exec sleep 1000000",
            m = ca_mount.display(),
            bin = bin.display(),
            td = self.info.trust_domain,
            bundle = self.bundle_path().display(),
            pid = dir.join("keeper.pid").display(),
            ready = ready.display(),
        );
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("keeper.log"))?);
        process::enter(&mut c, &ns, &cg, self.opts.detach_agents)?;
        let mut keeper = c
            .spawn()
            .context("starting the issuers' mount namespace keeper")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            if let Some(s) = keeper.try_wait()? {
                bail!(
                    "the CA keeper exited ({s}): {}",
                    process::log_tail(&dir.join("keeper.log"), 20)
                );
            }
            if Instant::now() > deadline {
                bail!("the CA keeper did not get ready within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.children.insert("issuer-keeper".into(), keeper);
        for k in 0..replicas {
            let ttl = self.opts.svid_ttl_secs.map_or_else(String::new, |t| {
                format!("svid_ttl_secs: {t}\nnode_svid_ttl_secs: {t}\n")
            });
            std::fs::write(
                self.issuer_config(k),
                format!(
                    "listen: {}\nmetrics_addr: 127.0.0.1:{}\nca_dir: {}/ca\ncluster_state: {}\naudit_log: {}\nlog_level: debug\n{ttl}attestor:\n  kind: bootstrap\n  state_dir: {}\n",
                    Self::issuer_addr(k),
                    9470 + k,
                    ca_mount.display(),
                    self.info.cluster_file.display(),
                    self.issuer_audit_log().display(),
                    dir.join("state").display(),
                ),
            )?;
            self.start_issuer(k)?;
        }
        Ok(())
    }

    /// A command run inside the issuers' mount and network namespaces and cgroup.
    fn issuer_command(&self, args: &[&str]) -> Result<Command> {
        let keeper = self.issuer_keeper_pid()?;
        let bin = self.info.agent_bin.clone().context("no agent binary")?;
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount=/proc/{keeper}/ns/mnt"))
            .arg("--")
            .arg(bin)
            .args(args);
        process::enter(
            &mut c,
            &self.issuer_netns(),
            &self.info.cgroup_root.join("issuer"),
            self.opts.detach_agents,
        )?;
        Ok(c)
    }

    pub fn start_issuer(&mut self, k: usize) -> Result<()> {
        let key = format!("issuer-{k}");
        if let Some(mut old) = self.children.remove(&key) {
            let _ = process::terminate_child(&mut old, libc::SIGKILL, Duration::from_secs(5));
        }
        let log = self.issuer_dir().join(format!("issuer{k}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let config = self.issuer_config(k);
        let mut c =
            self.issuer_command(&["issuer", "run", "--config", &config.to_string_lossy()])?;
        c.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        let mut child = c.spawn().context("starting an issuer")?;
        std::fs::write(
            self.info.state_dir.join(format!("issuer{k}.pid")),
            format!("{}\n", child.id()),
        )?;
        let cg = self.info.cgroup_root.join("issuer");
        wait_listening(
            Self::issuer_addr(k),
            &mut child,
            &log,
            Some((&self.issuer_netns(), &cg)),
        )?;
        self.children.insert(key, child);
        Ok(())
    }

    /// Kills issuer replica `k` (SIGKILL: nothing is flushed, as a crash).
    pub fn kill_issuer(&mut self, k: usize) -> Result<()> {
        if let Some(mut c) = self.children.remove(&format!("issuer-{k}")) {
            process::terminate_child(&mut c, libc::SIGKILL, Duration::from_secs(5))?;
        }
        Ok(())
    }

    /// Where node `node`'s agent reads its join token.
    pub fn join_token_path(&self, node: &str) -> PathBuf {
        self.info.state_dir.join(format!("{node}.token"))
    }

    /// `portcullis issuer enroll --node NODE`, inside the issuers' namespaces.
    pub fn enroll(&self, node: &str) -> Result<String> {
        let config = self.issuer_config(0);
        let mut c = self.issuer_command(&[
            "issuer",
            "enroll",
            "--config",
            &config.to_string_lossy(),
            "--node",
            node,
        ])?;
        let token = cmd::run(&mut c)?.trim().to_owned();
        Ok(token)
    }

    /// A fresh join token for `node`, written where its agent reads it (before each start:
    /// the node SVID lives in the agent's memory only, so a restarted agent joins again).
    pub(crate) fn write_join_token(&self, node: &str) -> Result<()> {
        let token = self.enroll(node)?;
        let path = self.join_token_path(node);
        std::fs::write(&path, format!("{token}\n"))
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn issuers(&self) -> bool {
        self.opts.issuer_replicas > 0 && self.opts.authenticate
    }
}

//! Helpers shared by the integration tests, the demo and the benchmarks: traffic with the
//! `probe` tool inside pods, and the agents' CLI (status, auth) on each node.

use std::{
    io::{BufRead, BufReader},
    net::IpAddr,
    path::PathBuf,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::Testbed;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// A testbed plus the `probe` binary to run in its pods.
pub struct Scenario<'a> {
    pub tb: &'a Testbed,
    pub probe: PathBuf,
}

/// A `probe serve` in a pod, killed on drop.
pub struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn sock(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

pub fn ok(v: &Value) -> bool {
    v["ok"].as_bool() == Some(true)
}

pub fn counter(s: &Value, name: &str) -> u64 {
    s["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {}", s["counters"]))
}

/// Polls `f` every 100 ms for up to `limit`.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(100));
    }
    false
}

impl Scenario<'_> {
    pub fn addr(&self, pod: &str, family: Family) -> IpAddr {
        let p = self.tb.pod(pod);
        match family {
            Family::V4 => IpAddr::V4(p.ipv4),
            Family::V6 => IpAddr::V6(p.ipv6),
        }
    }

    /// The SPIFFE ID cluster state gives a pod.
    pub fn identity(&self, pod: &str) -> String {
        let p = self.tb.pod(pod);
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.tb.info().trust_domain,
            p.namespace,
            p.service_account
        )
    }

    /// Starts `probe serve` on `port` in `pod` and waits until it listens.
    pub fn serve(&self, pod: &str, port: u16) -> Server {
        self.serve_mode(pod, "serve", port)
    }

    /// Starts `probe udp-serve` (an echo server) on `port` in `pod` and waits until it listens.
    pub fn udp_serve(&self, pod: &str, port: u16) -> Server {
        self.serve_mode(pod, "udp-serve", port)
    }

    fn serve_mode(&self, pod: &str, mode: &str, port: u16) -> Server {
        let mut child = self
            .tb
            .exec(
                pod,
                &[
                    self.probe.as_os_str(),
                    mode.as_ref(),
                    "--port".as_ref(),
                    port.to_string().as_ref(),
                    "--seconds".as_ref(),
                    "600".as_ref(),
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning probe serve");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("reading probe serve");
        assert!(
            line.contains("listening"),
            "probe serve did not start: {line:?}"
        );
        Server(child)
    }

    /// A `probe` command in `pod`, for running in the background.
    pub fn probe_cmd(&self, pod: &str, args: &[&str]) -> std::process::Command {
        let mut full: Vec<&std::ffi::OsStr> = vec![self.probe.as_os_str()];
        full.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
        let mut c = self.tb.exec(pod, &full);
        c.stdout(Stdio::piped()).stderr(Stdio::inherit());
        c
    }

    /// `probe ARGS` on node `node` itself (its network namespace, outside any pod), stdout
    /// piped like [`Scenario::probe_cmd`].
    pub fn probe_node_cmd(&self, node: &str, args: &[&str]) -> std::process::Command {
        let mut full: Vec<&std::ffi::OsStr> = vec![self.probe.as_os_str()];
        full.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
        let mut c = self.tb.exec_node(node, &full);
        c.stdout(Stdio::piped()).stderr(Stdio::inherit());
        c
    }

    /// Runs `probe ARGS` on node `node` itself and returns its last JSON line.
    pub fn probe_node(&self, node: &str, args: &[&str]) -> Value {
        let out = self
            .probe_node_cmd(node, args)
            .output()
            .expect("running probe on the node");
        last_json(&out.stdout)
    }

    /// Starts `probe send` in `pod`: `bytes` to `to:port`, paced over `seconds`, each I/O
    /// bounded by `timeout_ms`. [`Transfer::finish`] waits for its verdict.
    pub fn transfer(
        &self,
        pod: &str,
        to: IpAddr,
        port: u16,
        bytes: u64,
        seconds: u32,
        timeout_ms: u32,
    ) -> Transfer {
        let (to, bytes, seconds, timeout) = (
            sock(to, port),
            bytes.to_string(),
            seconds.to_string(),
            timeout_ms.to_string(),
        );
        let child = self
            .probe_cmd(
                pod,
                &[
                    "send",
                    "--to",
                    &to,
                    "--bytes",
                    &bytes,
                    "--seconds",
                    &seconds,
                    "--timeout-ms",
                    &timeout,
                ],
            )
            .spawn()
            .expect("spawning probe send");
        Transfer(child)
    }

    /// Runs `probe ARGS` in `pod` and returns its last JSON line.
    pub fn probe(&self, pod: &str, args: &[&str]) -> Value {
        let out = self.probe_cmd(pod, args).output().expect("running probe");
        last_json(&out.stdout)
    }

    pub fn connect(&self, from: &str, to: IpAddr, port: u16, timeout_ms: u32) -> Value {
        self.probe(
            from,
            &[
                "connect",
                "--to",
                &sock(to, port),
                "--timeout-ms",
                &timeout_ms.to_string(),
            ],
        )
    }

    /// `probe connect` run on node `node` itself (its network namespace, outside any pod),
    /// from address `from` of the node if given.
    pub fn connect_from_node(
        &self,
        node: &str,
        from: Option<IpAddr>,
        to: IpAddr,
        port: u16,
        timeout_ms: u32,
    ) -> Value {
        let (to, timeout, from) = (
            sock(to, port),
            timeout_ms.to_string(),
            from.map(|a| a.to_string()),
        );
        let mut args = vec!["connect", "--to", &to, "--timeout-ms", &timeout];
        if let Some(from) = &from {
            args.extend(["--from", from]);
        }
        self.probe_node(node, &args)
    }

    /// The agent CLI on `node`: success and combined output.
    pub fn portcullis(&self, node: &str, args: &[&str]) -> (bool, String) {
        let out = self
            .tb
            .portcullis(node, args)
            .output()
            .expect("running portcullis");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    pub fn status(&self, node: &str) -> Value {
        let (success, text) = self.portcullis(node, &["status", "--output", "json"]);
        assert!(success, "status on {node} failed: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("status JSON: {e}: {text}"))
    }

    /// Lets `remote_pod` connect to `local_pod`, through the agent on `local_pod`'s node.
    pub fn allow(&self, local_pod: &str, remote_pod: &str) -> String {
        self.auth("allow", local_pod, remote_pod, &["--ttl", "600"])
    }

    /// Removes the pair's entry and cuts its flows on `local_pod`'s node.
    pub fn revoke(&self, local_pod: &str, remote_pod: &str) -> String {
        self.auth("revoke", local_pod, remote_pod, &[])
    }

    fn auth(&self, verb: &str, local_pod: &str, remote_pod: &str, extra: &[&str]) -> String {
        let node = self.tb.pod(local_pod).node.clone();
        let remote_node = self.tb.pod(remote_pod).node.clone();
        let (local, remote) = (self.identity(local_pod), self.identity(remote_pod));
        let mut args = vec![
            "auth",
            verb,
            "--local",
            &local,
            "--remote",
            &remote,
            "--remote-node",
            &remote_node,
        ];
        args.extend_from_slice(extra);
        let (success, text) = self.portcullis(&node, &args);
        assert!(success, "auth {verb} failed: {text}");
        text
    }
}

/// A `probe send` under way.
pub struct Transfer(Child);

impl Transfer {
    /// Waits for the transfer to end and returns its JSON verdict.
    pub fn finish(self) -> Value {
        last_json(
            &self
                .0
                .wait_with_output()
                .expect("waiting for probe send")
                .stdout,
        )
    }
}

/// The last line of a probe's output, as JSON.
pub fn last_json(stdout: &[u8]) -> Value {
    let text = String::from_utf8_lossy(stdout);
    let last = text
        .lines()
        .last()
        .unwrap_or_else(|| panic!("probe printed nothing"));
    serde_json::from_str(last).unwrap_or_else(|e| panic!("probe output {last:?}: {e}"))
}

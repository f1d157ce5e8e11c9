//! A container runtime's side of CNI (spec 1.0), as containerd and CRI-O run it: each plugin
//! of a network configuration list in turn, in the node's network namespace, with the
//! `CNI_*` environment and the plugin's configuration (with `name`, `cniVersion`,
//! `runtimeConfig` and the previous plugin's result) on stdin; DEL in reverse order with the
//! cached result. The plugins are the real ones: the reference plugins from Debian's
//! `containernetworking-plugins`, and `portcullis-cni`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::process;

/// Where Debian installs the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
/// The spec version the testbed's lists declare.
pub const CNI_VERSION: &str = "1.0.0";
/// The bridge the `bridge` plugin makes on a node.
pub const BRIDGE: &str = "cni0";
/// How long `portcullis-cni` ADD waits for the agent to enroll a pod, in the testbed.
pub const ENROLL_TIMEOUT_MS: u64 = 3000;

/// How a node's pods are wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Wiring {
    /// The testbed's own veth, /32 routes and proxy ARP (no CNI, no `portcullis-cni`).
    #[default]
    Direct,
    /// The `ptp` plugin: a veth per pod, a /32 route to it (Calico's layout).
    Ptp,
    /// The `bridge` plugin: every pod's veth a port of bridge `cni0` (flannel's layout): the
    /// pods' addresses route through the bridge.
    Bridge,
}

impl Wiring {
    pub fn is_cni(self) -> bool {
        self != Wiring::Direct
    }
}

/// A plugin's error result (the spec's `code`, `msg`, `details`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PluginError {
    pub code: u32,
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

/// One invocation's arguments.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    pub command: &'a str,
    pub container_id: &'a str,
    /// `CNI_NETNS`: the pod's network namespace file.
    pub netns: &'a Path,
    pub ifname: &'a str,
    /// `CNI_ARGS`.
    pub args: &'a str,
}

impl<'a> Call<'a> {
    /// A call for a pod's `eth0`, as the kubelet makes them.
    pub fn for_pod(
        command: &'a str,
        container_id: &'a str,
        netns: &'a Path,
        args: &'a str,
    ) -> Self {
        Self {
            command,
            container_id,
            netns,
            ifname: "eth0",
            args,
        }
    }
}

/// Runs plugin binary `bin` once inside `node_netns` (in `cgroup`): its JSON answer, or its
/// error result. A plugin that prints no JSON error but fails is an `Err`.
pub fn exec_plugin(
    node_netns: &str,
    cgroup: &Path,
    bin: &Path,
    cni_path: &str,
    call: &Call<'_>,
    stdin: &Value,
) -> Result<std::result::Result<Option<Value>, PluginError>> {
    let mut cmd = std::process::Command::new(bin);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", call.command)
        .env("CNI_CONTAINERID", call.container_id)
        .env("CNI_NETNS", call.netns)
        .env("CNI_IFNAME", call.ifname)
        .env("CNI_ARGS", call.args)
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    process::enter(&mut cmd, node_netns, cgroup, false)?;
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run CNI plugin {}", bin.display()))?;
    let mut input = child.stdin.take().context("plugin stdin")?;
    let written = input.write_all(&serde_json::to_vec(stdin)?);
    drop(input);
    let out = child.wait_with_output().context("waiting for the plugin")?;
    // A plugin that needs no configuration may exit without reading it.
    match written {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(e).with_context(|| format!("writing to CNI plugin {}", bin.display()));
        }
        _ => {}
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        if stdout.trim().is_empty() {
            return Ok(Ok(None));
        }
        let v = serde_json::from_str(stdout.trim()).with_context(|| {
            format!(
                "{} {} printed no JSON: {stdout}{stderr}",
                bin.display(),
                call.command
            )
        })?;
        return Ok(Ok(Some(v)));
    }
    match serde_json::from_str::<PluginError>(stdout.trim()) {
        Ok(e) => Ok(Err(e)),
        Err(_) => bail!(
            "{} {} failed ({}) without a CNI error: {stdout}{stderr}",
            bin.display(),
            call.command,
            out.status
        ),
    }
}

/// A network configuration list and where its plugins are.
#[derive(Debug, Clone)]
pub struct NetworkList {
    pub list: Value,
    /// Directories searched for each plugin's `type`, in order (`CNI_PATH`).
    pub path: Vec<PathBuf>,
    /// Where results are cached for DEL and CHECK (as `/var/lib/cni/results`).
    pub cache_dir: PathBuf,
}

impl NetworkList {
    fn plugin_bin(&self, kind: &str) -> Result<PathBuf> {
        self.path
            .iter()
            .map(|d| d.join(kind))
            .find(|p| p.is_file())
            .with_context(|| format!("CNI plugin `{kind}` not found in {:?}", self.path))
    }

    fn cni_path(&self) -> String {
        self.path
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":")
    }

    fn plugins(&self) -> Result<Vec<Value>> {
        Ok(self.list["plugins"]
            .as_array()
            .context("network list without plugins")?
            .clone())
    }

    /// One plugin's stdin: its configuration with the list's `name` and `cniVersion`, the
    /// `runtimeConfig` of the capabilities it declares, and `prevResult`.
    fn stdin(plugin: &Value, list: &Value, runtime: &Value, prev: Option<&Value>) -> Value {
        let mut conf = plugin.clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        if let Some(caps) = plugin.get("capabilities").and_then(Value::as_object) {
            let mut rc = serde_json::Map::new();
            for (cap, on) in caps {
                if on.as_bool() == Some(true)
                    && let Some(v) = runtime.get(cap)
                {
                    rc.insert(cap.clone(), v.clone());
                }
            }
            if !rc.is_empty() {
                conf["runtimeConfig"] = Value::Object(rc);
            }
        }
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        conf
    }

    fn cache_path(&self, container_id: &str) -> PathBuf {
        self.cache_dir.join(format!("{container_id}.json"))
    }

    /// ADD through the whole list; caches and returns the final result. `runtime` holds the
    /// capability arguments (`ips`, …).
    pub fn add(
        &self,
        node_netns: &str,
        cgroup: &Path,
        call: &Call<'_>,
        runtime: &Value,
    ) -> Result<std::result::Result<Value, PluginError>> {
        let mut prev: Option<Value> = None;
        for plugin in self.plugins()? {
            let kind = plugin["type"].as_str().context("plugin without type")?;
            let stdin = Self::stdin(&plugin, &self.list, runtime, prev.as_ref());
            let bin = self.plugin_bin(kind)?;
            match exec_plugin(node_netns, cgroup, &bin, &self.cni_path(), call, &stdin)? {
                Ok(Some(result)) => prev = Some(result),
                Ok(None) => bail!("CNI plugin {kind} ADD printed no result"),
                Err(e) => return Ok(Err(e)),
            }
        }
        let result = prev.context("empty network list")?;
        std::fs::create_dir_all(&self.cache_dir)?;
        std::fs::write(
            self.cache_path(call.container_id),
            serde_json::to_vec(&result)?,
        )?;
        Ok(Ok(result))
    }

    /// DEL through the list in reverse order, with the cached result; removes the cache.
    pub fn del(
        &self,
        node_netns: &str,
        cgroup: &Path,
        call: &Call<'_>,
    ) -> Result<std::result::Result<(), PluginError>> {
        let cached = std::fs::read(self.cache_path(call.container_id))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
        for plugin in self.plugins()?.iter().rev() {
            let kind = plugin["type"].as_str().context("plugin without type")?;
            let stdin = Self::stdin(plugin, &self.list, &json!({}), cached.as_ref());
            let bin = self.plugin_bin(kind)?;
            if let Err(e) = exec_plugin(node_netns, cgroup, &bin, &self.cni_path(), call, &stdin)? {
                return Ok(Err(e));
            }
        }
        let _ = std::fs::remove_file(self.cache_path(call.container_id));
        Ok(Ok(()))
    }

    /// CHECK through the list, with the cached result.
    pub fn check(
        &self,
        node_netns: &str,
        cgroup: &Path,
        call: &Call<'_>,
    ) -> Result<std::result::Result<(), PluginError>> {
        let cached: Value = serde_json::from_slice(
            &std::fs::read(self.cache_path(call.container_id))
                .context("no cached result to CHECK against")?,
        )?;
        for plugin in self.plugins()? {
            let kind = plugin["type"].as_str().context("plugin without type")?;
            let stdin = Self::stdin(&plugin, &self.list, &json!({}), Some(&cached));
            let bin = self.plugin_bin(kind)?;
            if let Err(e) = exec_plugin(node_netns, cgroup, &bin, &self.cni_path(), call, &stdin)? {
                return Ok(Err(e));
            }
        }
        Ok(Ok(()))
    }
}

/// The host-side interface a result names: not in the sandbox, not the bridge.
pub fn host_interface(result: &Value, bridge: Option<&str>) -> Option<String> {
    result["interfaces"]
        .as_array()?
        .iter()
        .filter(|i| {
            i.get("sandbox")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        })
        .filter_map(|i| i["name"].as_str())
        .find(|n| Some(*n) != bridge)
        .map(str::to_owned)
}

//! Starting and stopping the per-node agents (`portcullis run --config <node>.yaml`).

use std::fs::OpenOptions;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::info::BPFFS_ROOT;
use crate::testbed::Testbed;
use crate::{cgroup, cmd, process};

/// Log lines quoted in errors about an agent.
const LOG_TAIL: usize = 40;

impl Testbed {
    /// Starts node `node`'s agent inside the node's netns and `<node>/agent` cgroup, stdout and
    /// stderr appended to `<node>.log`, and waits (bounded by `Options::agent_ready_timeout`)
    /// until its admin socket exists.
    pub fn start_agent(&mut self, node: &str) -> Result<()> {
        let n = self.info.node(node)?.clone();
        if self.agent_running(node) {
            bail!("the agent of {node} is already running");
        }
        let bin = self
            .info
            .agent_bin
            .clone()
            .context("no agent binary (Options::agent_bin / PORTCULLIS_BIN)")?;
        ensure_bpffs()?;
        if self.issuers() {
            self.write_join_token(node)?;
        }
        std::fs::create_dir_all(&n.bpffs_dir)
            .with_context(|| format!("cannot create {}", n.bpffs_dir.display()))?;
        // A socket file left by a killed agent would look like readiness.
        match std::fs::remove_file(&n.admin_socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).context(format!("cannot remove stale {}", n.admin_socket.display()));
            }
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log_file)
            .with_context(|| format!("cannot open {}", n.log_file.display()))?;
        let mut c = Command::new(&bin);
        c.arg("run").arg("--config").arg(&n.agent_config);
        if std::env::var_os("RUST_BACKTRACE").is_none() {
            // A panicking agent should say where, in the log the failing test quotes.
            c.env("RUST_BACKTRACE", "1");
        }
        c.stdin(Stdio::null())
            .stdout(log.try_clone().context("dup log fd")?)
            .stderr(log);
        process::enter(&mut c, &n.netns, &n.agent_cgroup, self.opts.detach_agents)?;
        let mut child = c
            .spawn()
            .with_context(|| format!("cannot start `{}`", cmd::describe(&c)))?;
        std::fs::write(&n.pid_file, format!("{}\n", child.id()))
            .with_context(|| format!("cannot write {}", n.pid_file.display()))?;

        let deadline = Instant::now() + self.opts.agent_ready_timeout;
        loop {
            if n.admin_socket.exists() {
                break;
            }
            if let Some(status) = child.try_wait().context("waitpid")? {
                bail!(
                    "the agent of {node} exited ({status}) before creating {}; last lines of {}:\n{}",
                    n.admin_socket.display(),
                    n.log_file.display(),
                    process::log_tail(&n.log_file, LOG_TAIL)
                );
            }
            if Instant::now() > deadline {
                let _ = process::terminate_child(&mut child, libc::SIGKILL, Duration::from_secs(5));
                bail!(
                    "the agent of {node} did not create {} within {:?}; last lines of {}:\n{}",
                    n.admin_socket.display(),
                    self.opts.agent_ready_timeout,
                    n.log_file.display(),
                    process::log_tail(&n.log_file, LOG_TAIL)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        self.children.insert(node.to_string(), child);
        Ok(())
    }

    /// Whether node `node`'s agent process is alive.
    pub fn agent_running(&mut self, node: &str) -> bool {
        if let Some(child) = self.children.get_mut(node) {
            if matches!(child.try_wait(), Ok(None)) {
                return true;
            }
            self.children.remove(node);
            return false;
        }
        self.info.agent_pid(node).is_some()
    }

    /// SIGKILLs node `node`'s agent (a crash, as far as the agent can tell) and waits for it.
    /// Its pins in bpffs stay, as they would after a real crash.
    pub fn kill_agent(&mut self, node: &str) -> Result<Option<ExitStatus>> {
        self.signal_agent(node, libc::SIGKILL)
    }

    /// The pid of node `node`'s agent, if one runs.
    pub fn agent_pid(&mut self, node: &str) -> Option<i32> {
        if !self.agent_running(node) {
            return None;
        }
        match self.children.get(node) {
            Some(child) => i32::try_from(child.id()).ok(),
            None => self.info.agent_pid(node),
        }
    }

    /// Freezes node `node`'s agent (SIGSTOP): a stalled agent, as far as the kernel can tell.
    /// [`Testbed::resume_agent`] thaws it; dropping the testbed kills it either way.
    pub fn pause_agent(&mut self, node: &str) -> Result<()> {
        let pid = self
            .agent_pid(node)
            .with_context(|| format!("no agent is running on {node}"))?;
        process::signal(pid, libc::SIGSTOP)
    }

    pub fn resume_agent(&mut self, node: &str) -> Result<()> {
        let pid = self
            .agent_pid(node)
            .with_context(|| format!("no agent is running on {node}"))?;
        process::signal(pid, libc::SIGCONT)
    }

    /// SIGTERMs node `node`'s agent (a graceful stop) and waits up to 15 s for it to exit,
    /// then SIGKILLs it. Returns the exit status when the agent is our child.
    pub fn stop_agent(&mut self, node: &str) -> Result<Option<ExitStatus>> {
        self.signal_agent(node, libc::SIGTERM)
    }

    fn signal_agent(&mut self, node: &str, sig: i32) -> Result<Option<ExitStatus>> {
        let n = self.info.node(node)?.clone();
        let grace = Duration::from_secs(15);
        let status = if let Some(mut child) = self.children.remove(node) {
            Some(process::terminate_child(&mut child, sig, grace)?)
        } else if let Some(pid) = self.info.agent_pid(node) {
            // Started by another process (an attached testbed): not our child, no status.
            process::terminate_pid(pid, sig, grace)?;
            None
        } else {
            bail!("no agent is running on {node}");
        };
        let _ = std::fs::remove_file(&n.pid_file);
        Ok(status)
    }

    /// The agent log of node `node` so far (empty if there is none).
    pub fn agent_log(&self, node: &str) -> String {
        self.info
            .node(node)
            .ok()
            .and_then(|n| std::fs::read_to_string(&n.log_file).ok())
            .unwrap_or_default()
    }
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there (many minimal machines lack it).
/// This changes the mount namespace only, never the root network namespace.
pub fn ensure_bpffs() -> Result<()> {
    let root = Path::new(BPFFS_ROOT);
    if cgroup::is_mounted(root, "bpf") {
        return Ok(());
    }
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS_ROOT]))
        .context("cannot mount bpffs")?;
    Ok(())
}

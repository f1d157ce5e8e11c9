//! `portcullis cni install` / `uninstall`: what the DaemonSet's init container runs to chain
//! `portcullis-cni` into the node's CNI configuration, and what removes it.

use std::{path::PathBuf, process::ExitCode};

use super::Target;
use crate::cni::{
    self,
    conf::DEFAULT_ENROLL_TIMEOUT_MS,
    install::{Entry, PLUGIN},
};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Copy the plugin into the host's CNI binary directory and chain it last in the network
    /// configuration list the runtime uses (the first `*.conflist` by name).
    Install(InstallArgs),
    /// Remove the plugin's entry from every list in the configuration directory, and the
    /// binary. Pods keep their programs until deleted; run `portcullis uninstall` for those.
    Uninstall(Dirs),
}

#[derive(Debug, clap::Args)]
pub struct Dirs {
    /// The host's CNI binary directory (as mounted).
    #[arg(long, default_value = "/opt/cni/bin")]
    bin_dir: PathBuf,
    /// The host's CNI configuration directory (as mounted).
    #[arg(long, default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    #[command(flatten)]
    dirs: Dirs,
    /// The plugin binary to copy.
    #[arg(long, default_value = "/usr/bin/portcullis-cni")]
    binary: PathBuf,
    /// How long ADD waits for the agent to enroll the pod (it stays in default-deny after).
    #[arg(long, default_value_t = DEFAULT_ENROLL_TIMEOUT_MS)]
    enroll_timeout_ms: u64,
    /// `default-deny` (the pod starts, unreachable until the agent enrolls it) or `fail` (ADD
    /// fails while the agent is down, and the runtime retries).
    #[arg(long, default_value = "default-deny", value_parser = ["default-deny", "fail"])]
    agent_unavailable: String,
}

pub fn execute(target: &Target, cmd: &Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Install(a) => {
            let state_dir = target.config.as_ref().map_or_else(
                || PathBuf::from(cni::DEFAULT_STATE_DIR),
                |c| c.cni_state_dir.clone(),
            );
            let entry = Entry {
                bpffs_dir: target.bpffs_dir.clone(),
                admin_socket: target.admin_socket.clone(),
                state_dir,
                enroll_timeout_ms: a.enroll_timeout_ms,
                agent_unavailable: a.agent_unavailable.clone(),
            };
            let list = cni::install::install(&a.binary, &a.dirs.bin_dir, &a.dirs.conf_dir, &entry)?;
            println!(
                "installed {} into {} and chained it last in {}",
                PLUGIN,
                a.dirs.bin_dir.display(),
                list.display()
            );
        }
        Command::Uninstall(d) => {
            let changed = cni::install::uninstall(&d.bin_dir, &d.conf_dir)?;
            println!(
                "removed {PLUGIN} from {} and from {} list(s) in {}",
                d.bin_dir.display(),
                changed.len(),
                d.conf_dir.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

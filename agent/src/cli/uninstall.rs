use std::process::ExitCode;

use anyhow::bail;

use super::Target;
use crate::{admin, datapath};

/// Remove enforcement from this node: detach the programs and delete every pin under the
/// agent's bpffs directory. Stop the agent first.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn execute(target: &Target, _args: &Args) -> anyhow::Result<ExitCode> {
    if admin::call(&target.admin_socket, &admin::Request::Status).is_ok() {
        bail!(
            "the agent is running (it answers on {}); stop it first, or it would re-attach",
            target.admin_socket.display()
        );
    }
    let removed = datapath::uninstall(&target.bpffs_dir)?;
    println!(
        "removed {} link(s) and {} map(s) under {}; enforcement is off on this node",
        removed.links,
        removed.maps,
        target.bpffs_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

use std::process::ExitCode;

use anyhow::bail;

use super::Target;
use crate::admin::{self, Request, Response};

/// Write or remove auth entries by hand, through the running agent (debugging and tests;
/// workload proofs write them in normal operation).
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Admit new connections from REMOTE (on REMOTE_NODE) to LOCAL for --ttl seconds.
    Allow {
        #[command(flatten)]
        pair: Pair,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Remove the pair's auth entry and cut its established connections.
    Revoke {
        #[command(flatten)]
        pair: Pair,
    },
}

/// An identity pair as the agent on LOCAL's node sees it.
#[derive(Debug, clap::Args)]
pub struct Pair {
    /// SPIFFE ID of the local workload.
    #[arg(long)]
    local: String,
    /// SPIFFE ID of the remote workload.
    #[arg(long)]
    remote: String,
    /// Node name of the remote workload.
    #[arg(long)]
    remote_node: String,
}

pub fn execute(target: &Target, cmd: &Command) -> anyhow::Result<ExitCode> {
    let req = match cmd {
        Command::Allow { pair, ttl } => Request::AuthAllow {
            local: pair.local.clone(),
            remote: pair.remote.clone(),
            remote_node: pair.remote_node.clone(),
            ttl_secs: *ttl,
        },
        Command::Revoke { pair } => Request::AuthRevoke {
            local: pair.local.clone(),
            remote: pair.remote.clone(),
            remote_node: pair.remote_node.clone(),
        },
    };
    match admin::call(&target.admin_socket, &req)? {
        Response::Allowed { expires_in_secs } => println!("allowed for {expires_in_secs}s"),
        Response::Revoked {
            entry_removed,
            flows_cut,
        } => {
            println!(
                "{} entry; {flows_cut} flow(s) cut",
                if entry_removed {
                    "removed the"
                } else {
                    "there was no"
                }
            );
        }
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    }
    Ok(ExitCode::SUCCESS)
}

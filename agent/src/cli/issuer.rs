use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;

use crate::issuer::config::IssuerConfig;

/// The SVID issuer: the only holder of the CA key.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Serve agents: sign node SVIDs for attested nodes and workload SVIDs for the workloads
    /// cluster state places on the asking node.
    Run {
        /// The issuer's configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate --config and print the effective configuration as JSON.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print a single-use join token for a node (bootstrap attestor).
    Enroll {
        #[arg(long)]
        config: PathBuf,
        /// The node the token is bound to (its name in cluster state).
        #[arg(long)]
        node: String,
        /// How long the token may wait to be used (default: attestor.token_ttl_secs).
        #[arg(long, value_parser = super::ca::parse_duration)]
        ttl: Option<Duration>,
    },
}

pub fn execute(cmd: &Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Run { config } => {
            let config = IssuerConfig::load(config)?;
            super::run::init_logging(&config.log_level, config.log_format)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(crate::issuer::serve(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => {
            let config = IssuerConfig::load(config)?;
            println!("{}", serde_json::to_string_pretty(&config)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Enroll { config, node, ttl } => {
            let config = IssuerConfig::load(config)?;
            println!("{}", crate::issuer::enroll(&config, node, *ttl)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

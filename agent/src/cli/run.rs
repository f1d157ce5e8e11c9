use std::process::ExitCode;

use anyhow::Context as _;

use crate::config::{Config, LogFormat};

/// Run the agent: load and attach the kernel programs, enforce cluster state, serve the admin
/// API. Exiting leaves enforcement in place; a restart adopts it without a gap.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn execute(cli: &super::Cli, _args: &Args) -> anyhow::Result<ExitCode> {
    let path = cli.config.as_deref().context("`run` needs --config FILE")?;
    let config = Config::load(path, cli.node.as_deref())?;
    init_logging(&config.log_level, config.log_format)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(crate::caps::WORKERS)
        .enable_all()
        // Capabilities are per thread: each runtime thread drops them as it wakes, once the
        // agent has asked (see `caps`).
        .on_thread_start(crate::caps::on_thread_wake)
        .on_thread_unpark(crate::caps::on_thread_wake)
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(crate::run::run(config))?;
    Ok(ExitCode::SUCCESS)
}

/// Logs to stderr at `level` (or env `PORTCULLIS_LOG`), as text or JSON lines.
pub fn init_logging(level: &str, format: LogFormat) -> anyhow::Result<()> {
    // The config's filter was checked when it was loaded; a bad PORTCULLIS_LOG is reported.
    let filter = match std::env::var("PORTCULLIS_LOG") {
        Ok(spec) => crate::config::log_filter(&spec)
            .with_context(|| format!("PORTCULLIS_LOG `{spec}` is not a level or filter"))?,
        Err(_) => {
            crate::config::log_filter(level).with_context(|| format!("log_level `{level}`"))?
        }
    };
    // Also installs the `log` bridge, through which the kernel programs' aya-log records arrive.
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    Ok(())
}

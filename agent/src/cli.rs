//! Command line: one file per verb under `cli/`, each with an `execute` returning
//! `anyhow::Result`. Doc comments are the `--help` text.

mod auth;
mod ca;
mod cni;
mod doctor;
mod issuer;
mod run;
mod status;
mod uninstall;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::config::{self, Config};

/// portcullis: mutual-TLS service authentication, enforced in the kernel.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// The agent's admin socket (for status, auth). Defaults to the one named by --config, else
    /// /run/portcullis/admin.sock.
    #[arg(long, global = true, env = "PORTCULLIS_ADMIN_SOCKET")]
    admin_socket: Option<PathBuf>,
    /// The agent's configuration file; other verbs read the admin socket and bpffs directory
    /// from it.
    #[arg(long, short, global = true, env = "PORTCULLIS_CONFIG")]
    config: Option<PathBuf>,
    /// This node's name, overriding the config file's `node` (a DaemonSet passes
    /// `spec.nodeName` this way).
    #[arg(long, global = true, env = "PORTCULLIS_NODE")]
    node: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Run(run::Args),
    Status(status::Args),
    #[command(subcommand)]
    Auth(auth::Command),
    #[command(subcommand)]
    Ca(ca::Command),
    #[command(subcommand)]
    Issuer(issuer::Command),
    /// Install or remove the `portcullis-cni` plugin on this node.
    #[command(subcommand)]
    Cni(cni::Command),
    Uninstall(uninstall::Args),
    Doctor(doctor::Args),
    /// Validate --config and print the effective configuration as JSON.
    CheckConfig,
    /// Print the CustomResourceDefinitions of PortcullisPolicy and PortcullisClusterPolicy
    /// (what `deploy/crds.yaml` holds).
    Crds,
    /// Validate a policy file, or a manifest of PortcullisPolicy and PortcullisClusterPolicy
    /// objects (as the API server and then the issuer would), and print what it says.
    CheckPolicy {
        /// The policy file (in Kubernetes, the `policy.yaml` key of the policy ConfigMap), or a
        /// manifest of policy objects.
        file: PathBuf,
        /// The trust domain the objects' SPIFFE IDs must be of (manifests only).
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// The namespace of objects that name none, as `kubectl apply -n` (manifests only).
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
    },
}

/// What the client verbs need to find the agent.
pub struct Target {
    pub admin_socket: PathBuf,
    pub bpffs_dir: PathBuf,
    pub config: Option<Config>,
}

impl Cli {
    fn target(&self) -> anyhow::Result<Target> {
        let config = self
            .config
            .as_deref()
            .map(|p| Config::load(p, self.node.as_deref()))
            .transpose()?;
        Ok(Target {
            admin_socket: self
                .admin_socket
                .clone()
                .or_else(|| config.as_ref().map(|c| c.admin_socket.clone()))
                .unwrap_or_else(|| PathBuf::from(config::DEFAULT_ADMIN_SOCKET)),
            bpffs_dir: config.as_ref().map_or_else(
                || PathBuf::from(config::DEFAULT_BPFFS_DIR),
                |c| c.bpffs_dir.clone(),
            ),
            config,
        })
    }
}

fn check_manifest(
    file: &std::path::Path,
    text: &str,
    trust_domain: &str,
    namespace: &str,
) -> anyhow::Result<ExitCode> {
    use crate::policy::manifest;
    let checked = manifest::check_manifest(text, namespace, trust_domain)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let mut failed = false;
    for c in &checked {
        match &c.verdict {
            Ok(f) => println!(
                "{}: {}: accepted, {} rules",
                file.display(),
                c.label,
                f.rules.len()
            ),
            Err(e) => {
                failed = true;
                println!("{}: {}: refused: {e}", file.display(), c.label);
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn check_policy(
    file: &std::path::Path,
    trust_domain: &str,
    namespace: &str,
) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", file.display()))?;
    if crate::policy::manifest::is_manifest(&text) {
        return check_manifest(file, &text, trust_domain, namespace);
    }
    let p = crate::policy::Policy::parse(file, &text)?;
    let mode = |s: &crate::policy::Settings| {
        format!(
            "mode {}, node traffic {}, other protocols {}, SYN MACs {}, cross-node UDP {}",
            s.mode.as_str(),
            if s.node_traffic { "allowed" } else { "denied" },
            if s.other_protocols { "pass" } else { "drop" },
            s.syn_mac.as_str(),
            if s.cross_node_udp {
                "allowed"
            } else {
                "denied"
            }
        )
    };
    println!("policy `{}`: {}", p.name, mode(&p.defaults));
    for (ns, s) in &p.namespaces {
        println!("  namespace {ns}: {}", mode(s));
    }
    match &p.enroll {
        None => println!("  enrolled: every workload"),
        Some(e) => println!(
            "  enrolled: namespaces [{}], workloads [{}]",
            e.namespaces.join(", "),
            e.workloads
                .iter()
                .map(|w| String::from(w.clone()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
    for r in &p.rules {
        let list = |ps: &[crate::policy::Pattern]| {
            ps.iter()
                .map(|w| String::from(w.clone()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let ports = r.ports.as_ref().map_or_else(
            || "every port".to_owned(),
            |ps| crate::policy::Grant::Ports(ps.clone()).to_string(),
        );
        println!(
            "  rule {}: [{}] → [{}] on {ports}",
            r.name,
            list(&r.from),
            list(&r.to)
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(args) => run::execute(&cli, args),
        Command::Status(args) => cli.target().and_then(|t| status::execute(&t, args)),
        Command::Auth(cmd) => cli.target().and_then(|t| auth::execute(&t, cmd)),
        Command::Ca(cmd) => ca::execute(cmd),
        Command::Issuer(cmd) => issuer::execute(cmd),
        Command::Cni(cmd) => cli.target().and_then(|t| cni::execute(&t, cmd)),
        Command::Doctor(args) => cli.target().and_then(|t| doctor::execute(&t, args)),
        Command::CheckConfig => cli.target().and_then(|t| {
            let config = t
                .config
                .ok_or_else(|| anyhow::anyhow!("check-config needs --config FILE"))?;
            println!("{}", serde_json::to_string_pretty(&config)?);
            Ok(ExitCode::SUCCESS)
        }),
        Command::Uninstall(args) => cli.target().and_then(|t| uninstall::execute(&t, args)),
        Command::CheckPolicy {
            file,
            trust_domain,
            namespace,
        } => check_policy(file, trust_domain, namespace),
        Command::Crds => {
            print!("{}", crate::policy::crd::definitions_yaml());
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            ExitCode::FAILURE
        }
    }
}

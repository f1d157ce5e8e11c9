use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::identity::{
    SpiffeId,
    ca::{self, Ca},
};

/// The built-in CA: create a root, issue SVIDs.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a root certificate and key (key file 0600) for a trust domain.
    Init {
        #[arg(long)]
        trust_domain: String,
        /// Directory for ca.pem and ca.key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue an SVID: writes svid.pem and svid.key (0600) into --out.
    Issue {
        /// The CA directory (ca.pem, ca.key).
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        spiffe_id: String,
        /// Lifetime, such as 3600s, 90m, 1h or 7d.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        #[arg(long)]
        out: PathBuf,
    },
}

/// `30s`, `90m`, `1h`, `7d`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 90s, 30m, 1h or 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use s, m, h or d)")),
    };
    if secs == 0 {
        return Err("a duration must be at least one second".into());
    }
    Ok(Duration::from_secs(secs))
}

pub fn execute(cmd: &Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Init { trust_domain, out } => {
            Ca::init(trust_domain, out)?;
            println!(
                "created a CA for trust domain {trust_domain}: {} (certificate), {} (key, 0600)",
                out.join(ca::CA_CERT).display(),
                out.join(ca::CA_KEY).display()
            );
        }
        Command::Issue {
            ca: dir,
            spiffe_id,
            ttl,
            out,
        } => {
            let id =
                SpiffeId::parse(spiffe_id).with_context(|| format!("--spiffe-id `{spiffe_id}`"))?;
            let ca = Ca::load(dir)?;
            let start = Instant::now();
            let issued = ca.issue_to(&id, *ttl, out)?;
            let took = start.elapsed();
            let not_after = time::OffsetDateTime::from(issued.not_after);
            println!(
                "issued {id}, valid until {not_after} ({:.1} ms): {}, {}",
                took.as_secs_f64() * 1000.0,
                out.join(ca::SVID_CERT).display(),
                out.join(ca::SVID_KEY).display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert!(parse_duration("1w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("0s").is_err());
    }
}

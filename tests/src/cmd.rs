//! Running external commands (iproute2 mostly) with errors that say what failed and why.

use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

/// Renders a command line for error messages and logs.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion (stdin closed, output captured) and fails unless it exits 0. The
/// error names the command and carries its stderr, because "exit status 2" alone is useless
/// when one of fifty `ip` invocations goes wrong.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    check(cmd, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` and returns its output whatever the exit status (only a failure to start is an
/// error).
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.output()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))
}

/// Turns a non-zero exit into an error naming the command and quoting its stderr.
pub fn check(cmd: &Command, out: &Output) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let detail = if stderr.trim().is_empty() {
        stdout.trim().to_string()
    } else {
        stderr.trim().to_string()
    };
    bail!("`{}` failed ({}): {}", describe(cmd), out.status, detail)
}

/// `ip ARGS…` in the root namespace (only ever used for `ip netns …`, which manages the named
/// namespaces themselves, not the root namespace's links).
pub fn ip<I, S>(args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(Command::new("ip").args(args))
}

/// `ip -n NETNS ARGS…`: a link/addr/route operation inside a named namespace.
pub fn ip_in<I, S>(netns: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(Command::new("ip").arg("-n").arg(netns).args(args))
}

/// Splits a whitespace-separated argument string; a convenience for the many fixed `ip`
/// command lines (none of which contain quoted arguments).
pub fn ip_in_str(netns: &str, args: &str) -> Result<String> {
    ip_in(netns, args.split_whitespace())
}

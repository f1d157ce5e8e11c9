//! Connection MACs: what the option in every SYN of a keyed pair costs (signed by the source
//! node's `pc_from_pod`, checked by the destination's `pc_to_pod`), on a two-node testbed whose
//! agents authenticate the pair themselves (client on node-1, server on node-2), with policy
//! `syn_mac: require` against `syn_mac: off` in the same run: rounds of both modes, a policy
//! edit before each, the order flipping from one round to the next; every round measures (2)
//! and (3), the first `reps` rounds also (1):
//!
//! 1. new connections per second (`probe cps`) from the client to the server;
//! 2. per SYN, in the kernel: `BPF_PROG_TEST_RUN` on the live programs (found through their
//!    pinned TCX links) with hand-made frames of the authenticated pair. `pc_to_pod` on a SYN
//!    carrying a valid MAC (made with the pair key of node-2's auth entry), checked under
//!    `require` and not under `off`. `pc_from_pod` signing a SYN against the same SYN with no
//!    room for the option (a 60-byte TCP header), which it passes unsigned: one run per call,
//!    since a signed SYN grows and a repeated run on the same packet would not sign again;
//! 3. `pc_to_pod` on an ACK of the flow the SYNs recorded, in both modes: it should not change.
//!
//! Each test run is checked against the node's own counters (`PC_COUNTERS`, before and after)
//! and the programs' return codes: every run must have ended as intended (`pass_authenticated`,
//! `pass_flow`, `pass_signed`, `pass_unsigned`), and fails the benchmark otherwise. In each
//! mode a SYN without the option and one with a corrupted MAC show that the check is really
//! made (`drop_no_mac`, `drop_bad_mac` under `require`; admitted under `off`), and the signed
//! SYN `pc_from_pod` returns is verified with node-1's pair key.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow, bail};
use portcullis_common::{
    AUTH_KEYED, AUTH_PREVIOUS_KEYS, AuthKey, AuthValue, Counter, EP_MAC_AUDIT, EP_MAC_REQUIRE,
    Endpoint, mac, map, program,
};
use serde_json::{Value, json};
use testbed::{
    Options, Testbed,
    bpfmap::{PinnedMap, PinnedProg, Plain as _, TC_ACT_SHOT, TCX_NEXT},
    packet,
    scenario::{Family, Scenario, eventually, ok, sock},
};

use super::{
    datapath::COUNT_PORT,
    frames::{self, Tcp4},
    table::{Section, Table},
    util::{median_of, num, percentile, spec, stats},
};

/// Goal: new connections per second with `require` at least this share of `off`'s.
pub const GOAL_CPS_RATIO: f64 = 0.95;
/// Goal: what the MAC adds to a SYN in each program, in nanoseconds.
pub const GOAL_SYN_NS: f64 = 150.0;
/// An established-flow packet costs the same in both modes: within the noise of the samples
/// (their interquartile range), at least this many nanoseconds.
const SAME_NS: f64 = 3.0;

/// The crafted segments' source port: below the ephemeral range, so that no real connection
/// of the testbed shares their flow entries.
const SPORT: u16 = 1023;
const ISN: u32 = 0x5eed_0001;
const POLL_MS: u64 = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Off,
    Require,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Require => "require",
        }
    }

    /// The policy every agent reads: enforcement, and connection MACs in this mode.
    fn policy(self) -> String {
        format!("name: mac-bench\nmode: enforce\nsyn_mac: {}\n", self.name())
    }

    /// Whether a local endpoint's flags show this mode.
    fn applied(self, flags: u32) -> bool {
        match self {
            Self::Require => flags & EP_MAC_REQUIRE != 0,
            Self::Off => flags & (EP_MAC_REQUIRE | EP_MAC_AUDIT) == 0,
        }
    }
}

/// How much to measure.
pub struct Plan {
    pub reps: u32,
    /// Seconds per connection-rate run.
    pub seconds: u32,
    /// Runs per `BPF_PROG_TEST_RUN` of `pc_to_pod`.
    pub repeat: u32,
    /// Rounds of test runs, each in both modes in alternating order (a policy edit before
    /// each); the first `reps` share the connection-rate runs' edits.
    pub rounds: u32,
    /// Calls (one run each) of `pc_from_pod` per round, mode and frame.
    pub calls: u32,
}

impl Plan {
    /// `--quick`: two repetitions (one of each order) of 1 s runs and 6 rounds of test runs;
    /// else what was asked, and 12 rounds.
    pub fn new(quick: bool, reps: u32, seconds: u32) -> Self {
        if quick {
            Self {
                reps: 2,
                seconds: 1,
                repeat: 100_000,
                rounds: 6,
                calls: 1_000,
            }
        } else {
            let reps = reps.max(1);
            Self {
                reps,
                seconds: seconds.max(1),
                repeat: 100_000,
                rounds: reps.max(12),
                calls: 2_000,
            }
        }
    }
}

/// One node's pinned maps and links.
struct Node {
    name: String,
    netns: String,
    links: PathBuf,
    endpoints: PinnedMap,
    auth: PinnedMap,
    counters: PinnedMap,
}

impl Node {
    fn open(tb: &Testbed, name: &str) -> Result<Self> {
        let n = tb.info().node(name)?;
        let maps = n.bpffs_dir.join("maps");
        let open =
            |m: &str| PinnedMap::open(&maps.join(m)).with_context(|| format!("{name}'s {m}"));
        Ok(Self {
            name: name.to_owned(),
            netns: n.netns.clone(),
            links: n.bpffs_dir.join("links"),
            endpoints: open(map::ENDPOINTS_V4)?,
            auth: open(map::AUTH)?,
            counters: open(map::COUNTERS)?,
        })
    }

    fn endpoint(&self, ip: Ipv4Addr) -> Result<Option<Endpoint>> {
        self.endpoints.get(&ip.octets())
    }

    /// Every counter, summed over CPUs, in [`Counter`] order.
    fn counters(&self) -> Result<Vec<u64>> {
        (0..Counter::COUNT)
            .map(|i| self.counters.per_cpu_sum(i))
            .collect()
    }
}

/// Counter increments between two readings.
fn delta(before: &[u64], after: &[u64]) -> Vec<u64> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| a.saturating_sub(*b))
        .collect()
}

/// The counters that moved, as `name +n`.
fn moved(d: &[u64]) -> String {
    let parts: Vec<String> = Counter::ALL
        .iter()
        .zip(d)
        .filter(|(_, n)| **n > 0)
        .map(|(c, n)| format!("{} +{n}", c.name()))
        .collect();
    if parts.is_empty() {
        "nothing".to_owned()
    } else {
        parts.join(", ")
    }
}

/// One pod's side of the pair: its host-side interface on its node and the pair's auth entry
/// there (local: the pod, remote: its peer).
struct Side {
    node: Node,
    ifindex: u32,
    key: AuthKey,
}

impl Side {
    fn new(node: Node, local: Ipv4Addr, remote: Ipv4Addr) -> Result<Self> {
        let l = node
            .endpoint(local)?
            .with_context(|| format!("{} has no endpoint for {local}", node.name))?;
        let r = node
            .endpoint(remote)?
            .with_context(|| format!("{} has no endpoint for {remote}", node.name))?;
        if l.ifindex == 0 {
            bail!("{}'s endpoint of {local} has no interface", node.name);
        }
        Ok(Self {
            ifindex: l.ifindex,
            key: AuthKey {
                local_identity: l.identity,
                remote_identity: r.identity,
                remote_node: r.node,
                kind: 0,
            },
            node,
        })
    }

    fn entry(&self) -> Result<Option<AuthValue>> {
        self.node.auth.get(self.key.bytes())
    }

    /// The keyed entry of the pair (an error if it is missing or not keyed).
    fn keyed(&self) -> Result<AuthValue> {
        let e = self
            .entry()?
            .with_context(|| format!("{} has no auth entry for the pair", self.node.name))?;
        if e.flags & AUTH_KEYED == 0 {
            bail!(
                "{}'s auth entry of the pair is not keyed (flags {:#x})",
                self.node.name,
                e.flags
            );
        }
        Ok(e)
    }

    /// The program attached to the pod's interface on `hook` (`to_pod`, `from_pod`), through
    /// its pinned link.
    fn prog(&self, hook: &str, name: &str) -> Result<PinnedProg> {
        let pin = self.node.links.join(format!("{}-{hook}", self.ifindex));
        let p = PinnedProg::from_link_pin(&pin)?;
        if p.name != name {
            bail!("the link {} holds {}, not {name}", pin.display(), p.name);
        }
        Ok(p)
    }

    /// Runs `prog` `repeat` times on `frame` as a packet of the pod's interface, and checks
    /// with the node's counters and the return code that every run ended as `want`. The
    /// kernel's average time per run, in ns.
    fn checked(
        &self,
        prog: &PinnedProg,
        what: &str,
        frame: &[u8],
        repeat: u32,
        want: Counter,
    ) -> Result<f64> {
        let before = self.node.counters()?;
        let r = in_netns(&self.node.netns, || {
            prog.test_run(frame, self.ifindex, repeat, 0)
        })?;
        let d = delta(&before, &self.node.counters()?);
        expect(prog, what, &d, r.retval, u64::from(repeat), want)?;
        Ok(f64::from(r.duration_ns))
    }

    /// `calls` calls of one run each: the interquartile mean of their times, in ns (each
    /// includes one reading of the kernel's clock), checked like [`Side::checked`].
    fn single_runs(
        &self,
        prog: &PinnedProg,
        what: &str,
        frame: &[u8],
        calls: u32,
        want: Counter,
    ) -> Result<f64> {
        let before = self.node.counters()?;
        let (times, retval) = in_netns(&self.node.netns, || {
            let mut times = Vec::with_capacity(calls as usize);
            let mut retval = TCX_NEXT;
            for _ in 0..calls {
                let r = prog.test_run(frame, self.ifindex, 1, 0)?;
                if r.retval != TCX_NEXT {
                    retval = r.retval;
                }
                times.push(f64::from(r.duration_ns));
            }
            Ok((times, retval))
        })?;
        let d = delta(&before, &self.node.counters()?);
        expect(prog, what, &d, retval, u64::from(calls), want)?;
        Ok(interquartile_mean(&times))
    }

    /// One run with the packet returned.
    fn output(&self, prog: &PinnedProg, frame: &[u8]) -> Result<(i32, Vec<u8>)> {
        let r = in_netns(&self.node.netns, || {
            prog.test_run(frame, self.ifindex, 1, 512)
        })?;
        Ok((r.retval, r.data_out))
    }
}

/// Fails unless `want` moved by `runs` and the return code is `want`'s. A little more is
/// tolerated (8 and 0.1 %): the counters are the node's, and the last packets of the
/// connections just measured can meet the same counter (a wrong path would count none).
fn expect(
    prog: &PinnedProg,
    what: &str,
    d: &[u64],
    retval: i32,
    runs: u64,
    want: Counter,
) -> Result<()> {
    let code = if want.is_drop() {
        TC_ACT_SHOT
    } else {
        // A pass hands the packet to the next program of the chain.
        TCX_NEXT
    };
    let n = d[want as usize];
    if !(runs..=runs + 8 + runs / 1000).contains(&n) || retval != code {
        bail!(
            "{} on {what}: {runs} run(s) should each have counted {} (return code {code}); the return code was {retval} and the counters moved: {}",
            prog.name,
            want.name(),
            moved(d)
        );
    }
    Ok(())
}

/// The mean of the middle half of a sample (robust to the runs an interrupt lengthened, with
/// a finer resolution than the median of whole nanoseconds).
fn interquartile_mean(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let mid = &s[s.len() / 4..s.len() - s.len() / 4];
    mid.iter().sum::<f64>() / mid.len().max(1) as f64
}

/// Runs `f` on a thread of its own inside network namespace `netns` (a test run looks the
/// context's interface index up in the caller's namespace).
fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let ns = testbed::netns::open(netns)?;
    thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns on a descriptor we own; it moves only this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("entering network namespace {netns}"));
            }
            f()
        })
        .join()
        .map_err(|_| anyhow!("the test-run thread panicked"))?
    })
}

/// `CLOCK_REALTIME` in the option's time units.
fn now_units() -> u32 {
    let ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    mac::time_units(ns as u64)
}

/// The frames of the pair, client → server.
struct Frames {
    /// A SYN as Linux sends it (40-byte TCP header), unsigned.
    syn: Tcp4,
}

impl Frames {
    fn new(client: Ipv4Addr, server: Ipv4Addr) -> Self {
        Self {
            syn: Tcp4 {
                src: client,
                dst: server,
                sport: SPORT,
                dport: COUNT_PORT,
                seq: ISN,
                ack: 0,
                flags: packet::TCP_SYN,
                options: frames::linux_syn_options(),
            },
        }
    }

    /// The SYN with a MAC option made now with `key`.
    fn signed(&self, key: &[u8; mac::KEY_LEN]) -> Vec<u8> {
        let opt = mac::option(key, &self.syn.mac_syn(now_units()));
        self.syn.with_options(&opt).frame()
    }

    /// The signed SYN with one bit of its MAC flipped.
    fn corrupted(&self, key: &[u8; mac::KEY_LEN]) -> Vec<u8> {
        let mut opt = mac::option(key, &self.syn.mac_syn(now_units()));
        opt[mac::OPTION_LEN - 1] ^= 1;
        self.syn.with_options(&opt).frame()
    }

    /// The SYN padded with NOPs to a 60-byte TCP header: no room for the option.
    fn full(&self) -> Vec<u8> {
        self.syn.with_options(&[1; 20]).frame()
    }

    /// An ACK of the flow the SYNs recorded.
    fn ack(&self) -> Vec<u8> {
        Tcp4 {
            seq: ISN.wrapping_add(1),
            ack: 0x0a0b_0c0d,
            flags: packet::TCP_ACK,
            options: frames::established_options(),
            ..self.syn.clone()
        }
        .frame()
    }
}

/// Checks the SYN `pc_from_pod` returned: 16 bytes longer, our option last, a MAC that
/// verifies with node-1's pair key (current or previous), a fresh stamp. Whether its
/// checksums are right, and which key signed it.
fn verify_signed(frames: &Frames, entry: &AuthValue, out: &[u8]) -> Result<(bool, &'static str)> {
    let seen = frames::parse(out).context("the SYN pc_from_pod returned")?;
    let unsigned = frames::parse(&frames.syn.frame())?;
    if seen.tcp_header_len != unsigned.tcp_header_len + mac::OPTION_LEN
        || seen.ip_total_len != unsigned.ip_total_len + mac::OPTION_LEN
    {
        bail!(
            "pc_from_pod returned a SYN with a {}-byte TCP header in a {}-byte packet (sent: {} in {}): not signed",
            seen.tcp_header_len,
            seen.ip_total_len,
            unsigned.tcp_header_len,
            unsigned.ip_total_len
        );
    }
    let (time, got) = seen
        .last_option
        .as_ref()
        .and_then(mac::parse)
        .context("the signed SYN does not end in a MAC option")?;
    if !mac::fresh(time, now_units()) {
        bail!("the signed SYN is stamped {time}, now is {}", now_units());
    }
    let syn = frames.syn.mac_syn(time);
    let key = if mac::mac(&entry.keys.sign, &syn) == got {
        "current"
    } else if entry.flags & AUTH_PREVIOUS_KEYS != 0
        && mac::mac(&entry.keys.sign_previous, &syn) == got
    {
        "previous"
    } else {
        bail!("the signed SYN's MAC does not verify with node-1's pair keys");
    };
    Ok((seen.ip_checksum_ok && seen.tcp_checksum_ok, key))
}

/// What the repetitions measured.
#[derive(Default)]
struct Measured {
    cps: BTreeMap<Mode, Vec<f64>>,
    /// SYNs node-1 signed per connection, per mode.
    signed_per_conn: BTreeMap<Mode, Vec<f64>>,
    to_pod_syn: BTreeMap<Mode, Vec<f64>>,
    /// The same, one run per call.
    to_pod_syn_single: BTreeMap<Mode, Vec<f64>>,
    to_pod_ack: BTreeMap<Mode, Vec<f64>>,
    from_pod_signed: Vec<f64>,
    from_pod_unsigned: Vec<f64>,
    checksums_ok: bool,
    previous_key_used: bool,
}

/// The world of the measurement.
struct World<'a> {
    s: Scenario<'a>,
    /// node-2: the server's side (`pc_to_pod` checks).
    dst: Side,
    /// node-1: the client's side (`pc_from_pod` signs).
    src: Side,
    frames: Frames,
    to_pod: PinnedProg,
    from_pod: PinnedProg,
}

impl World<'_> {
    /// Sets the policy and waits until node-2 enforces the mode on the server (and node-1 has
    /// had a poll to read it too).
    fn set_mode(&self, mode: Mode) -> Result<()> {
        self.s.tb.set_policy(&mode.policy())?;
        let server = self.s.tb.pod("server").ipv4;
        let applied = eventually(Duration::from_secs(15), || {
            self.dst
                .node
                .endpoint(server)
                .ok()
                .flatten()
                .is_some_and(|e| mode.applied(e.flags))
        });
        if !applied {
            bail!(
                "node-2 did not apply `syn_mac: {}` within 15 s",
                mode.name()
            );
        }
        thread::sleep(Duration::from_millis(2 * POLL_MS));
        Ok(())
    }

    /// One connection-rate run, checked with both nodes' counters: node-1 signed every SYN,
    /// node-2 admitted every connection through the auth entry and dropped none for its MAC.
    fn cps(&self, mode: Mode, seconds: u32, m: &mut Measured) -> Result<()> {
        let (b1, b2) = (self.src.node.counters()?, self.dst.node.counters()?);
        let target = sock(self.s.addr("server", Family::V4), COUNT_PORT);
        let r = self.s.probe(
            "client",
            &["cps", "--to", &target, "--seconds", &seconds.to_string()],
        );
        if !ok(&r) {
            bail!("probe cps ({}): {r}", mode.name());
        }
        let (d1, d2) = (
            delta(&b1, &self.src.node.counters()?),
            delta(&b2, &self.dst.node.counters()?),
        );
        let conns = r["connections"].as_u64().unwrap_or(0);
        let signed = d1[Counter::PassSigned as usize];
        if conns == 0 || signed < conns {
            bail!(
                "syn_mac {}: node-1 signed {signed} SYNs for {conns} connections (its counters: {})",
                mode.name(),
                moved(&d1)
            );
        }
        let admitted = d2[Counter::PassAuthenticated as usize];
        let mac_drops = d2[Counter::DropNoMac as usize] + d2[Counter::DropBadMac as usize];
        if admitted < conns || mac_drops > 0 {
            bail!(
                "syn_mac {}: node-2 admitted {admitted} of {conns} connections by the auth entry (its counters: {})",
                mode.name(),
                moved(&d2)
            );
        }
        m.cps
            .entry(mode)
            .or_default()
            .push(r["per_sec"].as_f64().unwrap_or(f64::NAN));
        #[expect(clippy::cast_precision_loss, reason = "a ratio")]
        m.signed_per_conn
            .entry(mode)
            .or_default()
            .push(signed as f64 / conns as f64);
        Ok(())
    }

    /// The MAC check is made in `require` and not in `off`: a SYN without the option and
    /// one with a corrupted MAC, once each.
    fn check_is_made(&self, mode: Mode, entry: &AuthValue) -> Result<()> {
        let (none, bad) = match mode {
            Mode::Require => (Counter::DropNoMac, Counter::DropBadMac),
            Mode::Off => (Counter::PassAuthenticated, Counter::PassAuthenticated),
        };
        let what = |w: &str| format!("a SYN {w} (syn_mac {})", mode.name());
        self.dst.checked(
            &self.to_pod,
            &what("without the option"),
            &self.frames.syn.frame(),
            1,
            none,
        )?;
        self.dst.checked(
            &self.to_pod,
            &what("with a corrupted MAC"),
            &self.frames.corrupted(&entry.keys.verify),
            1,
            bad,
        )?;
        Ok(())
    }

    /// One round of kernel measurements in `mode`.
    fn test_runs(&self, mode: Mode, plan: &Plan, m: &mut Measured) -> Result<()> {
        let entry = self.dst.keyed()?;
        self.check_is_made(mode, &entry)?;
        let (syn, ack) = (
            format!("a SYN with a valid MAC (syn_mac {})", mode.name()),
            format!("an ACK of a tracked flow (syn_mac {})", mode.name()),
        );
        // Made anew for each round: a fresh stamp, and the entry's key of now.
        let frame = self.frames.signed(&entry.keys.verify);
        let ns = self.dst.checked(
            &self.to_pod,
            &syn,
            &frame,
            plan.repeat,
            Counter::PassAuthenticated,
        )?;
        m.to_pod_syn.entry(mode).or_default().push(ns);
        // The same SYN timed like pc_from_pod's (one run per call): what that method adds.
        let ns = self.dst.single_runs(
            &self.to_pod,
            &syn,
            &frame,
            (plan.calls / 2).max(1),
            Counter::PassAuthenticated,
        )?;
        m.to_pod_syn_single.entry(mode).or_default().push(ns);
        let ns = self.dst.checked(
            &self.to_pod,
            &ack,
            &self.frames.ack(),
            plan.repeat,
            Counter::PassFlow,
        )?;
        m.to_pod_ack.entry(mode).or_default().push(ns);
        // Signing, on node-1: the returned SYN verified once, then timed against the SYN
        // with no room for the option, alternated.
        let src_entry = self.src.keyed()?;
        let (code, out) = self.src.output(&self.from_pod, &self.frames.syn.frame())?;
        if code != TCX_NEXT {
            bail!("pc_from_pod returned {code} for the client's SYN");
        }
        let (checksums, key) = verify_signed(&self.frames, &src_entry, &out)?;
        m.checksums_ok &= checksums;
        m.previous_key_used |= key == "previous";
        let (syn, full) = (self.frames.syn.frame(), self.frames.full());
        let half = (plan.calls / 2).max(1);
        for _ in 0..2 {
            m.from_pod_signed.push(self.src.single_runs(
                &self.from_pod,
                "the client's SYN",
                &syn,
                half,
                Counter::PassSigned,
            )?);
            m.from_pod_unsigned.push(self.src.single_runs(
                &self.from_pod,
                "the client's SYN with a 60-byte TCP header",
                &full,
                half,
                Counter::PassUnsigned,
            )?);
        }
        Ok(())
    }
}

/// Every round: both modes, in alternating order; the first `reps` rounds also measure the
/// connection rate.
fn measure(w: &World<'_>, plan: &Plan) -> Result<Measured> {
    let mut m = Measured {
        checksums_ok: true,
        ..Measured::default()
    };
    let rounds = plan.rounds.max(plan.reps);
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Mode::Require, Mode::Off]
        } else {
            [Mode::Off, Mode::Require]
        };
        for mode in order {
            eprint!(
                "\rconnection MACs: round {}/{rounds}, syn_mac {:<8}",
                round + 1,
                mode.name()
            );
            w.set_mode(mode)?;
            if round < plan.reps {
                w.cps(mode, plan.seconds, &mut m)?;
            }
            w.test_runs(mode, plan, &mut m)?;
        }
    }
    eprintln!();
    Ok(m)
}

/// The count server in the server pod (killed on drop), its output discarded: `probe serve`
/// prints a line per connection, and a pipe nobody reads would stop its threads.
struct Server(Child);

impl Server {
    fn start(s: &Scenario<'_>) -> Result<Self> {
        let port = COUNT_PORT.to_string();
        let child = s
            .probe_cmd("server", &["serve", "--port", &port, "--seconds", "3600"])
            .stdout(Stdio::null())
            .spawn()
            .context("starting probe serve")?;
        Ok(Self(child))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The testbed (agents authenticating the pair, policy `syn_mac: require` to start), the
/// server, the keyed entries on both nodes, the programs; then every repetition.
pub fn run(agent: &Path, probe: &Path, plan: &Plan, command: &str) -> Result<Section> {
    let started = Instant::now();
    eprintln!("connection MACs: syn_mac require against off…");
    let tb = Testbed::up(
        &spec(),
        &Options {
            agent_bin: Some(agent.to_owned()),
            authenticate: true,
            log_level: "warn".into(),
            policy: Some(Mode::Require.policy()),
            poll_interval_ms: Some(POLL_MS),
            ..Options::default()
        },
    )?;
    // The client closes first, so every connection leaves it a TIME_WAIT socket to the same
    // server port for 60 s; past some ten thousand of them, each connect() scans the port
    // range for a free port (milliseconds), and every run after the first would measure
    // that. Reusing TIME_WAIT ports (older than 1 s, by their time stamps) keeps the rate
    // the datapath's.
    testbed::netns::sysctl(
        &tb.pod("client").netns,
        &[("net.ipv4.tcp_tw_reuse".into(), "1".into())],
    )?;
    let s = Scenario {
        tb: &tb,
        probe: probe.to_owned(),
    };
    let _server = Server::start(&s)?;
    let authenticated = eventually(Duration::from_secs(20), || {
        ok(&s.connect("client", s.addr("server", Family::V4), COUNT_PORT, 500))
    });
    if !authenticated {
        bail!("the agents did not authenticate the pair within 20 s");
    }
    let (client, server) = (tb.pod("client").ipv4, tb.pod("server").ipv4);
    let dst = Side::new(Node::open(&tb, "node-2")?, server, client)?;
    let src = Side::new(Node::open(&tb, "node-1")?, client, server)?;
    let keyed = eventually(Duration::from_secs(20), || {
        dst.keyed().is_ok() && src.keyed().is_ok()
    });
    if !keyed {
        dst.keyed()
            .and(src.keyed())
            .context("waiting for keyed entries")?;
    }
    let (to_pod, from_pod) = (
        dst.prog("to_pod", program::TO_POD)?,
        src.prog("from_pod", program::FROM_POD)?,
    );
    let stats_on = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .is_ok_and(|v| v.trim() != "0");
    if stats_on {
        eprintln!("  note: kernel.bpf_stats_enabled is on: every run also pays for the statistics");
    }
    let w = World {
        frames: Frames::new(client, server),
        s,
        dst,
        src,
        to_pod,
        from_pod,
    };
    let same_keys = w.src.keyed()?.keys.sign == w.dst.keyed()?.keys.verify;
    let m = measure(&w, plan)?;
    Ok(render(
        plan,
        &m,
        command,
        started.elapsed().as_secs_f64(),
        stats_on,
        same_keys,
    ))
}

/// `median [min–max]` with `fmt`.
fn spread(v: &Value, fmt: fn(f64) -> String) -> String {
    let (lo, hi) = (num(&v["min"]), num(&v["max"]));
    if v["samples"].as_array().is_some_and(|a| a.len() > 1) {
        format!("{} [{}–{}]", fmt(median_of(v)), fmt(lo), fmt(hi))
    } else {
        fmt(median_of(v))
    }
}

fn yes(met: bool) -> &'static str {
    if met { "yes" } else { "**no**" }
}

/// The difference two modes may show and still be called equal: the larger interquartile
/// range of their samples, at least [`SAME_NS`].
fn same_within(v: &Value) -> f64 {
    let iqr = |mode: &str| {
        let xs: Vec<f64> = v[mode]["samples"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        percentile(&xs, 75.0) - percentile(&xs, 25.0)
    };
    iqr("off").max(iqr("require")).max(SAME_NS)
}

/// Whether the goals are met, from the section's JSON (also used by the report's goals).
pub fn judged(v: &Value) -> [(bool, String); 3] {
    let cps = num(&v["cps_ratio"]);
    let (check, sign) = (
        num(&v["to_pod_syn_ns"]["added"]),
        num(&v["from_pod_syn_ns"]["added"]),
    );
    let est = &v["to_pod_established_ns"];
    let (ack, ack_off) = (num(&est["added"]), median_of(&est["off"]));
    let noise = same_within(est);
    [
        (
            cps >= GOAL_CPS_RATIO,
            format!(
                "{cps:.3} ({:.0} against {:.0} conn/s)",
                median_of(&v["cps"]["require"]),
                median_of(&v["cps"]["off"])
            ),
        ),
        (
            check < GOAL_SYN_NS && sign < GOAL_SYN_NS,
            format!(
                "check {check:+.0} ns (pc_to_pod), signing {sign:+.0} ns (pc_from_pod): {:+.0} ns a connection",
                check + sign
            ),
        ),
        (
            ack.abs() <= noise,
            format!("{ack:+.0} ns ({ack_off:.0} ns with `off`; noise ±{noise:.0} ns)"),
        ),
    ]
}

/// `100,000`.
fn thousands(n: u32) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn render(
    plan: &Plan,
    m: &Measured,
    command: &str,
    elapsed_s: f64,
    stats_on: bool,
    same_keys: bool,
) -> Section {
    let by_mode = |x: &BTreeMap<Mode, Vec<f64>>| {
        json!({
            "off": stats(x.get(&Mode::Off).map_or(&[][..], Vec::as_slice)),
            "require": stats(x.get(&Mode::Require).map_or(&[][..], Vec::as_slice)),
        })
    };
    let with_added = |mut v: Value, base: &str, with: &str| {
        v["added"] = json!(median_of(&v[with]) - median_of(&v[base]));
        v["ratio"] = json!(median_of(&v[with]) / median_of(&v[base]));
        // Round by round (the samples are in round order): robust to a drift of the machine.
        let paired: Vec<f64> = v[with]["samples"]
            .as_array()
            .zip(v[base]["samples"].as_array())
            .map(|(w, b)| w.iter().zip(b).map(|(w, b)| num(w) - num(b)).collect())
            .unwrap_or_default();
        v["added_by_round"] = stats(&paired);
        v
    };
    let cps = by_mode(&m.cps);
    let cps_ratio = median_of(&cps["require"]) / median_of(&cps["off"]);
    let syn = with_added(by_mode(&m.to_pod_syn), "off", "require");
    let ack = with_added(by_mode(&m.to_pod_ack), "off", "require");
    let single = with_added(by_mode(&m.to_pod_syn_single), "off", "require");
    let sign = with_added(
        json!({"unsigned": stats(&m.from_pod_unsigned), "signed": stats(&m.from_pod_signed)}),
        "unsigned",
        "signed",
    );
    let v = json!({
        "command": command,
        "reps": plan.reps,
        "seconds": plan.seconds,
        "rounds": plan.rounds.max(plan.reps),
        "test_run_repeat": plan.repeat,
        "from_pod_calls": plan.calls,
        "cps": cps,
        "cps_ratio": cps_ratio,
        "cps_ratio_by_repetition": m.cps.get(&Mode::Require).zip(m.cps.get(&Mode::Off)).map(|(r, o)| r.iter().zip(o).map(|(r, o)| r / o).collect::<Vec<f64>>()),
        "elapsed_s": elapsed_s,
        "signed_syns_per_connection": by_mode(&m.signed_per_conn),
        "to_pod_syn_ns": syn,
        "to_pod_syn_single_run_ns": single,
        "to_pod_established_ns": ack,
        "from_pod_syn_ns": sign,
        "signed_syn_checksums_ok": m.checksums_ok,
        "signed_with_previous_key": m.previous_key_used,
        "pair_keys_agree": same_keys,
        "bpf_stats_enabled": stats_on,
    });
    let [g_cps, g_syn, g_ack] = judged(&v);
    let int = |x: f64| format!("{x:.0}");
    let ns = |x: f64| format!("{x:.0}");
    let mut t = Table::new([
        "connection MACs, client on node-1 → server on node-2",
        "baseline",
        "with MACs",
        "added",
        "ratio",
        "goal met",
    ]);
    t.row([
        format!(
            "new connections per second, {} s (conn/s): `syn_mac: off` / `require`",
            plan.seconds
        ),
        spread(&v["cps"]["off"], int),
        spread(&v["cps"]["require"], int),
        format!(
            "{:+.0}",
            median_of(&v["cps"]["require"]) - median_of(&v["cps"]["off"])
        ),
        format!("{cps_ratio:.3}"),
        format!("{} (≥ {GOAL_CPS_RATIO})", yes(g_cps.0)),
    ]);
    let row = |t: &mut Table, label: String, v: &Value, base: &str, with: &str, goal: String| {
        t.row([
            label,
            spread(&v[base], ns),
            spread(&v[with], ns),
            format!("{:+.0}", num(&v["added"])),
            format!("{:.3}", num(&v["ratio"])),
            goal,
        ]);
    };
    let check_ns = num(&v["to_pod_syn_ns"]["added"]);
    let sign_ns = num(&v["from_pod_syn_ns"]["added"]);
    row(
        &mut t,
        format!(
            "pc_to_pod on node-2, a SYN with a valid MAC (current key) (ns/run, test run × {}): `off` (not checked) / `require` (checked)",
            thousands(plan.repeat)
        ),
        &v["to_pod_syn_ns"],
        "off",
        "require",
        format!("{} (< {GOAL_SYN_NS:.0} ns)", yes(check_ns < GOAL_SYN_NS)),
    );
    row(
        &mut t,
        format!(
            "pc_to_pod on node-2, the same SYN timed like pc_from_pod below ({} calls of 1 run a sample): `off` / `require`",
            thousands((plan.calls / 2).max(1))
        ),
        &v["to_pod_syn_single_run_ns"],
        "off",
        "require",
        "– (the method's check)".to_owned(),
    );
    row(
        &mut t,
        format!(
            "pc_from_pod on node-1, the client's SYN (ns/run, calls of 1 run, each with its clock reads; a sample: the interquartile mean of {} calls): no room (60-byte TCP header), passed unsigned / signed (+16 bytes)",
            thousands((plan.calls / 2).max(1))
        ),
        &v["from_pod_syn_ns"],
        "unsigned",
        "signed",
        format!("{} (< {GOAL_SYN_NS:.0} ns)", yes(sign_ns < GOAL_SYN_NS)),
    );
    row(
        &mut t,
        format!(
            "pc_to_pod on node-2, an ACK of a tracked flow (ns/run, test run × {}): `off` / `require`",
            thousands(plan.repeat)
        ),
        &v["to_pod_established_ns"],
        "off",
        "require",
        format!(
            "{} (equal within ±{:.0} ns: the samples' interquartile range)",
            yes(g_ack.0),
            same_within(&v["to_pod_established_ns"])
        ),
    );
    let caption = format!(
        "Connection MACs, `{command}` ({elapsed_s:.0} s): client on node-1 → server on node-2, the pair authenticated by the agents; {} rounds, each with `syn_mac: off` and `require` in alternating order (a policy edit; enforcement on), a connection-rate run in each mode of the first {} (client pod: `net.ipv4.tcp_tw_reuse=1`); median [min–max]\n",
        plan.rounds.max(plan.reps),
        plan.reps
    );
    let mut notes = format!(
        "Per connection the MAC adds {:+.0} ns in the kernel: {}. node-1 signs in both modes ({:.2} SYNs signed per connection). The per-packet rows are `BPF_PROG_TEST_RUN` of the live programs (opened through their pinned TCX links) on crafted frames of the pair as packets of the pod's host-side interface; every run was checked by the node's counters (`pass_authenticated`, `pass_flow`, `pass_signed`, `pass_unsigned`: one per run) and return codes. In each mode a SYN without the option and one with a corrupted MAC were `drop_no_mac` and `drop_bad_mac` under `require` and admitted under `off`; the SYN `pc_from_pod` returned verified with node-1's pair key{}.",
        check_ns + sign_ns,
        g_syn.1,
        median_of(&v["signed_syns_per_connection"]["require"]),
        if m.checksums_ok {
            " and had valid IPv4 and TCP checksums"
        } else {
            " (its IPv4 or TCP checksum was **wrong**)"
        },
    );
    if stats_on {
        notes.push_str(" kernel.bpf_stats_enabled was on: every run includes its accounting.");
    }
    if !same_keys {
        notes.push_str(" node-1's signing key and node-2's verifying key differed at the start (a re-proof under way).");
    }
    notes.push('\n');
    Section::default()
        .md(caption)
        .md(t.finish())
        .md(notes)
        .json("connection_macs", v)
}

/// `--mac-only`: the table and the measurement's JSON.
pub fn only(agent: &Path, probe: &Path, plan: &Plan, command: &str) -> Result<i32> {
    let section = run(agent, probe, plan, command)?;
    println!("\n{}", section.md.join("\n"));
    let json: serde_json::Map<String, Value> = section
        .json
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    println!("{}", Value::Object(json));
    Ok(0)
}

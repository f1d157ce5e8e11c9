//! Coexistence with the CNI's own TCX programs on a pod's host-side interface. The CNI's
//! programs are stood in for by the test's own, assembled from raw instructions: each counts
//! the TCP segments of the test's port in an array map (those with SYN set apart) and returns
//! a fixed verdict. Those attached (on both hooks) before the agent starts return `TC_ACT_OK`,
//! which ends the chain: the agent's links go ahead of them, so a connection without an auth
//! entry is still dropped, and they see none of its SYNs. Those attached last after the agent
//! return `TCX_NEXT`: what our programs pass (`TCX_NEXT`) reaches them, what they drop does
//! not. Privileged: run as root, one at a time (`cargo xtask test`). Without root these tests
//! fail.

use std::{collections::HashMap, ffi::CString, path::PathBuf, time::Duration};

use serde_json::Value;
use testbed::{
    NodeSpec, Options, PodSpec, Spec, Testbed,
    bpfmap::{
        Insn, PinnedMap, PinnedProg, TC_ACT_OK, TCX_NEXT, TcxHook, TcxLink, TcxOrder, tcx_chain,
    },
    scenario::{Family, Scenario, counter, eventually, ok},
    session::in_netns,
};

const PORT: u16 = 8080;
const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

fn up(opts: &Options) -> Testbed {
    assert!(
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the TCX chain tests need root (they create namespaces and load eBPF); run them with `cargo xtask test` as root"
    );
    // `client` gets an auth entry for `server`, `other` never does.
    let spec = Spec {
        nodes: vec![
            NodeSpec::new(
                "node-1",
                vec![PodSpec::new("client"), PodSpec::new("other")],
            ),
            NodeSpec::new("node-2", vec![PodSpec::new("server")]),
        ],
    };
    Testbed::up(&spec, opts).unwrap_or_else(|e| panic!("testbed up: {e:#}"))
}

fn scenario(tb: &Testbed) -> Scenario<'_> {
    Scenario {
        tb,
        probe: PathBuf::from(env!("CARGO_BIN_EXE_probe")),
    }
}

/// The index of the server pod's host-side interface, in node-2's network namespace.
fn server_ifindex(tb: &Testbed) -> u32 {
    let veth = tb.pod("server").host_veth.clone();
    in_netns(&tb.node("node-2").netns, || {
        let name = CString::new(veth.as_str())?;
        // SAFETY: a NUL-terminated name that outlives the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        anyhow::ensure!(index != 0, "no interface {veth} in node-2");
        Ok(index)
    })
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The pin of node-2's link at `hook` (`to_pod`, `from_pod`) of interface `ifindex`.
fn our_pin(tb: &Testbed, ifindex: u32, hook: &str) -> PathBuf {
    tb.node("node-2")
        .bpffs_dir
        .join("links")
        .join(format!("{ifindex}-{hook}"))
}

/// The id of the program node-2's agent attached at `hook` of interface `ifindex`, once its
/// link is pinned.
fn our_prog(tb: &Testbed, ifindex: u32, hook: &str, name: &str) -> u32 {
    let pin = our_pin(tb, ifindex, hook);
    assert!(
        eventually(Duration::from_secs(10), || pin.exists()),
        "node-2's agent pinned no link at {}",
        pin.display()
    );
    let prog = PinnedProg::from_link_pin(&pin).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        prog.name,
        name,
        "the link at {} holds another program",
        pin.display()
    );
    prog.id
}

/// The programs at `hook` of node-2's interface `ifindex`, in the order they run.
fn chain(tb: &Testbed, ifindex: u32, hook: TcxHook) -> Vec<u32> {
    in_netns(&tb.node("node-2").netns, || tcx_chain(ifindex, hook))
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Attaches `prog` inside node-2's network namespace (where `ifindex` is).
fn attach(
    tb: &Testbed,
    prog: &PinnedProg,
    ifindex: u32,
    hook: TcxHook,
    order: TcxOrder,
) -> TcxLink {
    in_netns(&tb.node("node-2").netns, || {
        prog.attach_tcx(ifindex, hook, order)
    })
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Which port of a TCP segment a counting program matches.
#[derive(Clone, Copy)]
enum Port {
    /// The destination port (segments into the pod, at egress of its host-side interface).
    Dst,
    /// The source port (segments from the pod, at ingress).
    Src,
}

/// A CNI's program, stood in for: counts in `map` the TCP segments (IPv4 without options,
/// IPv6 without extension headers) whose `port` is [`PORT`] — slot 1 those with SYN set,
/// slot 0 the others — and returns `verdict` for every packet.
fn counting_prog(name: &str, map: &PinnedMap, port: Port, verdict: i32) -> PinnedProg {
    const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
    const LDX_H: u8 = 0x69; // BPF_LDX | BPF_MEM | BPF_H
    const LDX_B: u8 = 0x71; // BPF_LDX | BPF_MEM | BPF_B
    const STX_W: u8 = 0x63; // BPF_STX | BPF_MEM | BPF_W
    const ATOMIC_DW: u8 = 0xdb; // BPF_STX | BPF_ATOMIC | BPF_DW (imm BPF_ADD: 0)
    const MOV_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
    const MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
    const ADD_K: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
    const RSH_K: u8 = 0x77; // BPF_ALU64 | BPF_RSH | BPF_K
    const AND_K: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
    const JA: u8 = 0x05; // BPF_JMP | BPF_JA
    const JEQ_K: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
    const JGT_X: u8 = 0x2d; // BPF_JMP | BPF_JGT | BPF_X
    const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
    const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
    const MAP_LOOKUP_ELEM: i32 = 1;
    // struct __sk_buff: data, data_end.
    const DATA: i16 = 76;
    const DATA_END: i16 = 80;
    const ETH_HLEN: i16 = 14;
    // A 16-bit field in network order, as a native load reads it.
    let be16 = |v: u16| i32::from(u16::from_ne_bytes(v.to_be_bytes()));
    let port_at: i16 = match port {
        Port::Src => 0,
        Port::Dst => 2,
    };

    let mut a = Asm::default();
    a.op(MOV_X, 6, 1, 0, 0)
        .op(LDX_W, 2, 6, DATA, 0)
        .op(LDX_W, 3, 6, DATA_END, 0)
        .op(MOV_X, 4, 2, 0, 0)
        .op(ADD_K, 4, 0, 0, ETH_HLEN.into())
        .jump(JGT_X, 4, 3, 0, "out")
        .op(LDX_H, 5, 2, 12, 0)
        .jump(JEQ_K, 5, 0, be16(0x0800), "v4")
        .jump(JEQ_K, 5, 0, be16(0x86dd), "v6")
        .jump(JA, 0, 0, 0, "out");
    // Per family: where the TCP header starts and where the protocol (next header) byte is;
    // IPv4 also needs version/IHL 0x45 (no options) for the TCP header to start there.
    for (label, tcp, next_header) in [
        ("v4", ETH_HLEN + 20, ETH_HLEN + 9),
        ("v6", ETH_HLEN + 40, ETH_HLEN + 6),
    ] {
        a.label(label)
            .op(MOV_X, 4, 2, 0, 0)
            // Up to the TCP flags byte.
            .op(ADD_K, 4, 0, 0, (tcp + 14).into())
            .jump(JGT_X, 4, 3, 0, "out");
        if label == "v4" {
            a.op(LDX_B, 5, 2, ETH_HLEN, 0)
                .jump(JNE_K, 5, 0, 0x45, "out");
        }
        a.op(LDX_B, 5, 2, next_header, 0)
            .jump(JNE_K, 5, 0, 6, "out")
            .op(LDX_H, 5, 2, tcp + port_at, 0)
            .jump(JNE_K, 5, 0, be16(PORT), "out")
            .op(LDX_B, 5, 2, tcp + 13, 0)
            .jump(JA, 0, 0, 0, "count");
    }
    a.label("count")
        // The slot: the SYN bit (0x02) of the flags.
        .op(RSH_K, 5, 0, 0, 1)
        .op(AND_K, 5, 0, 0, 1)
        .op(STX_W, 10, 5, -4, 0);
    for insn in Insn::ld_map(1, map) {
        a.insn(insn);
    }
    a.op(MOV_X, 2, 10, 0, 0)
        .op(ADD_K, 2, 0, 0, -4)
        .op(CALL, 0, 0, 0, MAP_LOOKUP_ELEM)
        .jump(JEQ_K, 0, 0, 0, "out")
        .op(MOV_K, 1, 0, 0, 1)
        .op(ATOMIC_DW, 0, 1, 0, 0)
        .label("out")
        .op(MOV_K, 0, 0, 0, verdict)
        .op(EXIT, 0, 0, 0, 0);
    PinnedProg::load_sched_cls(name, &a.finish()).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Instructions with forward jumps to named labels.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    labels: HashMap<&'static str, usize>,
    jumps: Vec<(usize, &'static str)>,
}

impl Asm {
    fn insn(&mut self, insn: Insn) -> &mut Self {
        self.insns.push(insn);
        self
    }

    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) -> &mut Self {
        self.insn(Insn::new(code, dst, src, off, imm))
    }

    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: &'static str) -> &mut Self {
        self.jumps.push((self.insns.len(), to));
        self.op(code, dst, src, 0, imm)
    }

    fn label(&mut self, name: &'static str) -> &mut Self {
        assert!(
            self.labels.insert(name, self.insns.len()).is_none(),
            "label {name} twice"
        );
        self
    }

    fn finish(mut self) -> Vec<Insn> {
        for (at, to) in &self.jumps {
            let target = self.labels[to];
            assert!(target > *at, "jumps go forward (to {to})");
            self.insns[*at].off = i16::try_from(target - at - 1).expect("a short program");
        }
        self.insns
    }
}

/// A counting program's slots: (segments without SYN, segments with SYN).
fn counts(map: &PinnedMap) -> (u64, u64) {
    let read = |i| map.u64_at(i).unwrap_or_else(|e| panic!("{e:#}"));
    (read(0), read(1))
}

/// Counter `name` of `after` minus that of `before`.
fn delta(after: &Value, before: &Value, name: &str) -> u64 {
    counter(after, name)
        .checked_sub(counter(before, name))
        .unwrap_or_else(|| panic!("counter {name} went down"))
}

/// `other`, which has no auth entry, cannot connect to `server`: node-2 counts the drop, and
/// the programs after ours (`counted`, their maps) see none of its SYNs, nor any SYN-ACK.
/// Their other slot is not compared: the last segments of the previous connection (its
/// close) may still be on their way.
fn dropped_before(s: &Scenario<'_>, family: Family, counted: &[(&str, &PinnedMap)]) {
    let target = s.addr("server", family);
    let before = s.status("node-2");
    let seen: Vec<_> = counted.iter().map(|(_, m)| counts(m).1).collect();
    let r = s.connect("other", target, PORT, 1500);
    assert!(
        !ok(&r),
        "{family:?}: a connection without an auth entry got through: {r}"
    );
    assert_eq!(
        r["kind"], "timeout",
        "{family:?}: not dropped silently: {r}"
    );
    let after = s.status("node-2");
    let drops = delta(&after, &before, "drop_no_auth");
    assert!(
        drops >= 1,
        "{family:?}: node-2 did not count the dropped SYNs: {}",
        after["counters"]
    );
    for ((what, map), was) in counted.iter().zip(seen) {
        assert_eq!(
            counts(map).1,
            was,
            "{family:?}: {what} saw SYNs of a connection our program dropped ({drops} SYNs counted drop_no_auth)"
        );
    }
}

/// `client`, which has an auth entry, connects to `server`; each of `counted` sees exactly as
/// many SYNs as node-2 admitted (one), and the rest of the handshake.
fn passed_on(s: &Scenario<'_>, family: Family, counted: &[(&str, &PinnedMap)]) {
    let target = s.addr("server", family);
    let before = s.status("node-2");
    let seen: Vec<_> = counted.iter().map(|(_, m)| counts(m)).collect();
    let r = s.connect("client", target, PORT, 3000);
    assert!(
        ok(&r),
        "{family:?}: the authenticated pair could not connect: {r}"
    );
    let after = s.status("node-2");
    let admitted = delta(&after, &before, "pass_authenticated");
    assert_eq!(
        admitted, 1,
        "{family:?}: node-2 should have admitted one SYN: {}",
        after["counters"]
    );
    for ((what, map), (rest, syns)) in counted.iter().zip(seen) {
        // The SYN (or SYN-ACK) went through before connect() returned; the other segments of
        // the handshake and the close follow shortly.
        let reached = eventually(Duration::from_secs(3), || {
            let (r, n) = counts(map);
            n - syns == admitted && r > rest
        });
        assert!(
            reached,
            "{family:?}: {what} should have seen {admitted} SYN and later segments of the connection; it saw {:?} (before: {:?})",
            counts(map),
            (rest, syns)
        );
    }
}

/// Programs already on the interface when the agent attaches, on both hooks, returning
/// `TC_ACT_OK` (which ends the chain): the agent's links go ahead of them, so our drop still
/// happens and the dropped SYNs never reach them, while what we admit does. (Attached after
/// ours, as before, they would pass the SYN of a pair without an entry into the pod and its
/// SYN-ACK out.)
#[test]
fn programs_attached_before_the_agent_run_after_ours() {
    let mut tb = up(&Options::default());
    let ifindex = server_ifindex(&tb);
    // node-2 without portcullis (its links gone), as on a node where the agent is installed
    // after the CNI has set its pods up.
    our_prog(&tb, ifindex, "to_pod", "pc_to_pod");
    tb.stop_agent("node-2")
        .unwrap_or_else(|e| panic!("stopping the agent of node-2: {e:#}"));
    let (success, text) = scenario(&tb).portcullis("node-2", &["uninstall"]);
    assert!(success, "uninstall failed: {text}");
    let maps = [(); 2].map(|()| PinnedMap::new_array(2).unwrap_or_else(|e| panic!("{e:#}")));
    let progs = [
        counting_prog("cni_first_egres", &maps[0], Port::Dst, TC_ACT_OK),
        counting_prog("cni_first_ingre", &maps[1], Port::Src, TC_ACT_OK),
    ];
    let hooks = [TcxHook::Egress, TcxHook::Ingress];
    let mut links = Vec::new();
    for (prog, hook) in progs.iter().zip(hooks) {
        assert_eq!(
            chain(&tb, ifindex, hook),
            Vec::<u32>::new(),
            "the {hook:?} chain after uninstall"
        );
        links.push(attach(&tb, prog, ifindex, hook, TcxOrder::First));
    }
    tb.start_agent("node-2")
        .unwrap_or_else(|e| panic!("starting the agent of node-2: {e:#}"));
    let ours = [
        our_prog(&tb, ifindex, "to_pod", "pc_to_pod"),
        our_prog(&tb, ifindex, "from_pod", "pc_from_pod"),
    ];
    for ((prog, hook), ours) in progs.iter().zip(hooks).zip(ours) {
        assert_eq!(
            chain(&tb, ifindex, hook),
            vec![ours, prog.id],
            "at {hook:?}, our program must run ahead of the one that was there first"
        );
    }

    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    s.allow("server", "client");
    let counted = [
        ("the program that was at egress first", &maps[0]),
        ("the program that was at ingress first", &maps[1]),
    ];
    for family in FAMILIES {
        dropped_before(&s, family, &counted);
        passed_on(&s, family, &counted);
    }
    drop(links);
    for (hook, ours) in hooks.into_iter().zip(ours) {
        assert!(
            eventually(Duration::from_secs(3), || chain(&tb, ifindex, hook)
                == [ours]),
            "dropping the test's links should detach its programs: {hook:?} {:?}",
            chain(&tb, ifindex, hook)
        );
    }
}

/// Programs attached last after the agent, returning `TCX_NEXT`: on both hooks, what our
/// programs pass reaches them (the SYN into the pod, its SYN-ACK out), and nothing they drop.
#[test]
fn a_program_attached_after_ours_sees_what_we_pass_and_nothing_we_drop() {
    let tb = up(&Options::default());
    let ifindex = server_ifindex(&tb);
    let to_pod = our_prog(&tb, ifindex, "to_pod", "pc_to_pod");
    let from_pod = our_prog(&tb, ifindex, "from_pod", "pc_from_pod");
    let (into_map, out_map) = (
        PinnedMap::new_array(2).unwrap_or_else(|e| panic!("{e:#}")),
        PinnedMap::new_array(2).unwrap_or_else(|e| panic!("{e:#}")),
    );
    let into = counting_prog("cni_last_egress", &into_map, Port::Dst, TCX_NEXT);
    let out = counting_prog("cni_last_ingres", &out_map, Port::Src, TCX_NEXT);
    let _links = [
        attach(&tb, &into, ifindex, TcxHook::Egress, TcxOrder::Last),
        attach(&tb, &out, ifindex, TcxHook::Ingress, TcxOrder::Last),
    ];
    assert_eq!(
        chain(&tb, ifindex, TcxHook::Egress),
        vec![to_pod, into.id],
        "the egress chain"
    );
    assert_eq!(
        chain(&tb, ifindex, TcxHook::Ingress),
        vec![from_pod, out.id],
        "the ingress chain"
    );

    let s = scenario(&tb);
    let _server = s.serve("server", PORT);
    s.allow("server", "client");
    let counted = [
        ("the program after pc_to_pod", &into_map),
        ("the program after pc_from_pod", &out_map),
    ];
    for family in FAMILIES {
        dropped_before(&s, family, &counted);
        passed_on(&s, family, &counted);
    }
}

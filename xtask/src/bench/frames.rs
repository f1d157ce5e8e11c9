//! The connection-MAC benchmark's frames for `BPF_PROG_TEST_RUN`: TCP/IPv4 segments of the
//! pair as Linux sends them (built by [`testbed::packet`], checksums filled in), and the few
//! fields the benchmark reads back from a frame a program changed.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Result;
use portcullis_common::mac;
use testbed::packet;

/// The frames' destination Ethernet address (locally administered).
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// The frames' source Ethernet address (locally administered).
const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// The frames' IPv4 identification (the programs do not read it).
const IP_ID: u16 = 0x1234;
/// The frames' IPv4 TTL, one below a sender's 64 (the programs do not read it).
const IP_TTL: u8 = 63;

/// One TCP segment without payload, from `src:sport` to `dst:dport`.
#[derive(Clone, Debug)]
pub struct Tcp4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    /// `packet::TCP_*` bits.
    pub flags: u8,
    /// TCP options, a multiple of 4 bytes, at most 40.
    pub options: Vec<u8>,
}

/// The options of a SYN as Linux sends it: MSS 1460, SACK permitted, time stamps, NOP, window
/// scale 7 (20 bytes, a 40-byte TCP header).
pub fn linux_syn_options() -> Vec<u8> {
    vec![
        2, 4, 0x05, 0xb4, // MSS
        4, 2, // SACK permitted
        8, 10, 0x11, 0x22, 0x33, 0x44, 0, 0, 0, 0, // time stamps
        1, // NOP
        3, 3, 7, // window scale
    ]
}

/// The options of a later segment: NOP, NOP, time stamps (12 bytes).
pub fn established_options() -> Vec<u8> {
    vec![1, 1, 8, 10, 0x11, 0x22, 0x33, 0x55, 0x66, 0x77, 0x88, 0x99]
}

/// An IPv4 address in the 16-byte form of the maps and of [`mac::Syn`].
pub fn v4_16(a: Ipv4Addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&a.octets());
    out
}

impl Tcp4 {
    /// What the MAC of this SYN covers, stamped with `time`.
    pub fn mac_syn(&self, time: u32) -> mac::Syn {
        mac::Syn {
            family: portcullis_common::AF_INET,
            src: v4_16(self.src),
            dst: v4_16(self.dst),
            sport: self.sport,
            dport: self.dport,
            seq: self.seq,
            time,
        }
    }

    /// The same segment with `more` appended to its options.
    pub fn with_options(&self, more: &[u8]) -> Self {
        let mut t = self.clone();
        t.options.extend_from_slice(more);
        t
    }

    /// The Ethernet frame, with correct IPv4 and TCP checksums.
    pub fn frame(&self) -> Vec<u8> {
        let (src, dst) = (
            SocketAddr::from((self.src, self.sport)),
            SocketAddr::from((self.dst, self.dport)),
        );
        let tcp = packet::tcp_segment(src, dst, self.seq, self.ack, self.flags, &self.options);
        let mut ip = packet::ip_packet(src.ip(), dst.ip(), packet::IPPROTO_TCP, IP_ID, &tcp);
        ip[8] = IP_TTL;
        packet::fill_ipv4_checksum(&mut ip[..20]);
        packet::ip_frame(&DST_MAC, &SRC_MAC, &ip)
    }
}

/// What the benchmark reads back from a frame a program returned.
#[derive(Debug)]
pub struct Seen {
    pub ip_total_len: usize,
    pub tcp_header_len: usize,
    /// The last 16 bytes of the TCP header, where a signed SYN carries the MAC option.
    pub last_option: Option<[u8; mac::OPTION_LEN]>,
    pub ip_checksum_ok: bool,
    pub tcp_checksum_ok: bool,
}

/// Parses an Ethernet/IPv4/TCP frame.
pub fn parse(f: &[u8]) -> Result<Seen> {
    let p = packet::tcp4_in_frame(f)?;
    let options = p.options();
    Ok(Seen {
        ip_total_len: p.ip.len() + p.tcp.len(),
        tcp_header_len: p.header_len(),
        last_option: options
            .len()
            .checked_sub(mac::OPTION_LEN)
            .map(|at| options[at..].try_into().expect("16 bytes")),
        ip_checksum_ok: p.ip_checksum_ok(),
        tcp_checksum_ok: p.tcp_checksum_ok(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syn() -> Tcp4 {
        Tcp4 {
            src: Ipv4Addr::new(198, 18, 1, 2),
            dst: Ipv4Addr::new(198, 18, 2, 2),
            sport: 1023,
            dport: 8082,
            seq: 0x1234_5678,
            ack: 0,
            flags: packet::TCP_SYN,
            options: linux_syn_options(),
        }
    }

    #[test]
    fn frames_carry_valid_checksums_and_the_option_last() {
        let s = syn();
        let seen = parse(&s.frame()).expect("a frame");
        assert_eq!((seen.ip_total_len, seen.tcp_header_len), (60, 40));
        assert!(seen.ip_checksum_ok && seen.tcp_checksum_ok);
        let key = [9u8; 16];
        let opt = mac::option(&key, &s.mac_syn(77));
        let signed = parse(&s.with_options(&opt).frame()).expect("a frame");
        assert_eq!(signed.tcp_header_len, 56);
        assert!(signed.tcp_checksum_ok);
        assert_eq!(signed.last_option, Some(opt));
        assert_eq!(mac::parse(&opt), Some((77, mac::mac(&key, &s.mac_syn(77)))));
        let mut bad = s.frame();
        bad[40] ^= 1;
        assert!(!parse(&bad).expect("a frame").tcp_checksum_ok);
    }
}

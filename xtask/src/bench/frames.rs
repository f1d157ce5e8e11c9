//! Hand-made Ethernet/IPv4/TCP frames for `BPF_PROG_TEST_RUN`, with correct checksums, and
//! the few fields the connection-MAC benchmark reads back from a frame a program changed.

use std::net::Ipv4Addr;

use anyhow::{Result, bail};
use portcullis_common::mac;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const TCP_LEN: usize = 20;

/// One TCP segment without payload, from `src:sport` to `dst:dport`.
#[derive(Clone, Debug)]
pub struct Tcp4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
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

/// The one's-complement sum of `data` (16-bit big-endian words) added to `sum`, unfolded.
fn sum16(mut sum: u32, data: &[u8]) -> u32 {
    let (words, rest) = data.as_chunks::<2>();
    for c in words {
        sum += u32::from(u16::from_be_bytes(*c));
    }
    if let [last] = rest {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn pseudo(src: &[u8], dst: &[u8], tcp_len: usize) -> u32 {
    let mut s = sum16(0, src);
    s = sum16(s, dst);
    s + 6 + tcp_len as u32
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

    /// The Ethernet frame (locally administered MAC addresses), with correct IPv4 and TCP
    /// checksums.
    pub fn frame(&self) -> Vec<u8> {
        assert!(
            self.options.len().is_multiple_of(4) && self.options.len() <= 40,
            "TCP options of {} bytes",
            self.options.len()
        );
        let tcp_len = TCP_LEN + self.options.len();
        let total = IP_LEN + tcp_len;
        let mut f = Vec::with_capacity(ETH_LEN + total);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00]);
        let ip = ETH_LEN;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&(total as u16).to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34, 0x40, 0, 63, 6, 0, 0]);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        let ip_sum = !fold(sum16(0, &f[ip..ip + IP_LEN]));
        f[ip + 10..ip + 12].copy_from_slice(&ip_sum.to_be_bytes());
        let tcp = f.len();
        f.extend_from_slice(&self.sport.to_be_bytes());
        f.extend_from_slice(&self.dport.to_be_bytes());
        f.extend_from_slice(&self.seq.to_be_bytes());
        f.extend_from_slice(&self.ack.to_be_bytes());
        f.push(((tcp_len / 4) as u8) << 4);
        f.push(self.flags);
        f.extend_from_slice(&64_240u16.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0]);
        f.extend_from_slice(&self.options);
        let s = sum16(
            pseudo(&self.src.octets(), &self.dst.octets(), tcp_len),
            &f[tcp..],
        );
        f[tcp + 16..tcp + 18].copy_from_slice(&(!fold(s)).to_be_bytes());
        f
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
    if f.len() < ETH_LEN + IP_LEN + TCP_LEN || f[12..14] != [0x08, 0x00] {
        bail!("not an IPv4 frame ({} bytes)", f.len());
    }
    let ip = ETH_LEN;
    let ihl = usize::from(f[ip] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([f[ip + 2], f[ip + 3]]));
    if ihl < IP_LEN || f.len() < ip + total || total < ihl + TCP_LEN || f[ip + 9] != 6 {
        bail!("not a whole TCP/IPv4 packet (IHL {ihl}, total length {total})");
    }
    let tcp = ip + ihl;
    let doff = usize::from(f[tcp + 12] >> 4) * 4;
    if doff < TCP_LEN || tcp + doff > ip + total {
        bail!("a TCP header of {doff} bytes");
    }
    let last_option = (doff >= TCP_LEN + mac::OPTION_LEN).then(|| {
        let mut o = [0u8; mac::OPTION_LEN];
        o.copy_from_slice(&f[tcp + doff - mac::OPTION_LEN..tcp + doff]);
        o
    });
    let segment = &f[tcp..ip + total];
    Ok(Seen {
        ip_total_len: total,
        tcp_header_len: doff,
        last_option,
        ip_checksum_ok: fold(sum16(0, &f[ip..ip + ihl])) == 0xffff,
        tcp_checksum_ok: fold(sum16(
            pseudo(&f[ip + 12..ip + 16], &f[ip + 16..ip + 20], segment.len()),
            segment,
        )) == 0xffff,
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
            flags: SYN,
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

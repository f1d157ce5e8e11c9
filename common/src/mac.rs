//! Connection MACs: the TCP option a source node adds to each SYN an enrolled local pod sends
//! to a keyed peer, and the check the destination node makes before admitting it.
//!
//! The option (RFC 6994 experimental option, [`OPTION_LEN`] bytes, appended at the end of the
//! SYN's TCP header):
//!
//! ```text
//! kind 253 | length 16 | ExID 0x5043 ("PC", 2 bytes) | time (4 bytes, big-endian) | MAC (8 bytes)
//! ```
//!
//! `time` is `CLOCK_REALTIME` in units of 2^30 ns (about a second), truncated to 32 bits; the
//! verifier accepts it within [`WINDOW_UNITS`] of its own clock either way. The MAC is
//! SipHash-2-4, keyed with the pair's key for that direction, over [`message`]: both addresses,
//! both ports, the initial sequence number, the time and the family. A retransmitted SYN is
//! stamped and signed again by the source node.

/// Bytes of a pair key.
pub const KEY_LEN: usize = 16;
/// TCP option kind for experiments (RFC 6994).
pub const OPTION_KIND: u8 = 253;
/// Bytes of the option, a multiple of 4 so that the header stays aligned.
pub const OPTION_LEN: usize = 16;
/// The option's experiment identifier.
pub const EXID: u16 = 0x5043;
/// How far (in time units) the stamp may be from the verifier's clock: about ±30 s, for clock
/// differences between nodes; it also bounds how long a captured SYN can be replayed for the
/// same connection.
pub const WINDOW_UNITS: u32 = 28;
/// Time units per second is about 0.93: `realtime_ns >> TIME_SHIFT`.
pub const TIME_SHIFT: u32 = 30;
/// Longest TCP header.
pub const TCP_MAX_HEADER: usize = 60;

/// The time stamp for `realtime_ns`.
#[inline(always)]
#[must_use]
pub const fn time_units(realtime_ns: u64) -> u32 {
    (realtime_ns >> TIME_SHIFT) as u32
}

/// Whether `stamp` is within the window around `now` (both in time units, wrapping).
#[inline(always)]
#[must_use]
pub const fn fresh(stamp: u32, now: u32) -> bool {
    let d = now.wrapping_sub(stamp) as i32;
    -(WINDOW_UNITS as i32) <= d && d <= WINDOW_UNITS as i32
}

/// What a SYN's MAC covers. Addresses are the 16-byte form of the maps (IPv4: the address,
/// then zeros); ports and sequence number in host order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Syn {
    pub family: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub time: u32,
}

#[inline(always)]
fn word(b: &[u8; 16], half: usize) -> u64 {
    let o = half * 8;
    u64::from_le_bytes([
        b[o],
        b[o + 1],
        b[o + 2],
        b[o + 3],
        b[o + 4],
        b[o + 5],
        b[o + 6],
        b[o + 7],
    ])
}

/// The 48-byte message, as six little-endian words.
#[inline(always)]
#[must_use]
pub fn message(s: &Syn) -> [u64; 6] {
    [
        word(&s.src, 0),
        word(&s.src, 1),
        word(&s.dst, 0),
        word(&s.dst, 1),
        u64::from(s.sport) | u64::from(s.dport) << 16 | u64::from(s.seq) << 32,
        u64::from(s.time) | u64::from(s.family) << 32,
    ]
}

#[inline(always)]
fn round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

/// SipHash-2-4 of a message of whole little-endian words (`8 × N` bytes).
#[inline(always)]
#[must_use]
pub fn siphash24<const N: usize>(key: &[u8; KEY_LEN], words: &[u64; N]) -> u64 {
    let k0 = word(key, 0);
    let k1 = word(key, 1);
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    let mut i = 0;
    while i < N {
        v[3] ^= words[i];
        round(&mut v);
        round(&mut v);
        v[0] ^= words[i];
        i += 1;
    }
    let last = ((N as u64 * 8) & 0xff) << 56;
    v[3] ^= last;
    round(&mut v);
    round(&mut v);
    v[0] ^= last;
    v[2] ^= 0xff;
    round(&mut v);
    round(&mut v);
    round(&mut v);
    round(&mut v);
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// The MAC of a SYN under `key`.
#[inline(always)]
#[must_use]
pub fn mac(key: &[u8; KEY_LEN], syn: &Syn) -> u64 {
    siphash24(key, &message(syn))
}

/// The option bytes for a SYN under `key`.
#[inline(always)]
#[must_use]
pub fn option(key: &[u8; KEY_LEN], syn: &Syn) -> [u8; OPTION_LEN] {
    let t = syn.time.to_be_bytes();
    let m = mac(key, syn).to_le_bytes();
    let x = EXID.to_be_bytes();
    [
        OPTION_KIND,
        OPTION_LEN as u8,
        x[0],
        x[1],
        t[0],
        t[1],
        t[2],
        t[3],
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5],
        m[6],
        m[7],
    ]
}

/// The time stamp and MAC of an option, if `bytes` is one of ours.
#[inline(always)]
#[must_use]
pub fn parse(bytes: &[u8; OPTION_LEN]) -> Option<(u32, u64)> {
    let x = EXID.to_be_bytes();
    if bytes[0] != OPTION_KIND
        || bytes[1] != OPTION_LEN as u8
        || bytes[2] != x[0]
        || bytes[3] != x[1]
    {
        return None;
    }
    let time = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    let m = u64::from_le_bytes([
        bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14], bytes[15],
    ]);
    Some((time, m))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference vectors of the SipHash paper (key 00..0f, message 00..(n-1)) for 8 and 16
    /// bytes, and the standard library's SipHash-2-4 for the 48-byte messages SYNs use.
    #[test]
    fn siphash_matches_the_reference_and_the_standard_library() {
        extern crate std;
        use core::hash::Hasher;

        let key: [u8; 16] = core::array::from_fn(|i| i as u8);
        let w: [u64; 6] = core::array::from_fn(|w| {
            u64::from_le_bytes(core::array::from_fn(|b| (w * 8 + b) as u8))
        });
        assert_eq!(siphash24(&key, &[w[0]]), 0x93f5_f579_9a93_2462);
        assert_eq!(siphash24(&key, &[w[0], w[1]]), 0x3f2a_cc7f_57c2_9bdb);
        for seed in 0..64u8 {
            let key: [u8; 16] = core::array::from_fn(|i| seed.wrapping_mul(31) ^ i as u8);
            let bytes: [u8; 48] =
                core::array::from_fn(|i| seed.wrapping_add((i as u8).wrapping_mul(7)));
            let words: [u64; 6] = core::array::from_fn(|w| {
                u64::from_le_bytes(core::array::from_fn(|b| bytes[w * 8 + b]))
            });
            #[allow(deprecated)]
            let mut h = std::hash::SipHasher::new_with_keys(word(&key, 0), word(&key, 1));
            h.write(&bytes);
            assert_eq!(siphash24(&key, &words), h.finish(), "seed {seed}");
        }
    }

    fn syn() -> Syn {
        Syn {
            family: 4,
            src: [198, 18, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [198, 18, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sport: 40000,
            dport: 8080,
            seq: 0x1234_5678,
            time: 77,
        }
    }

    #[test]
    fn every_field_is_covered() {
        let key = [7u8; 16];
        let base = mac(&key, &syn());
        let changed = [
            Syn { family: 6, ..syn() },
            Syn {
                sport: 40001,
                ..syn()
            },
            Syn {
                dport: 8081,
                ..syn()
            },
            Syn {
                seq: 0x1234_5679,
                ..syn()
            },
            Syn { time: 78, ..syn() },
            Syn {
                src: [198, 18, 1, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                ..syn()
            },
            Syn {
                dst: [198, 18, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                ..syn()
            },
        ];
        for s in changed {
            assert_ne!(mac(&key, &s), base, "{s:?}");
        }
        assert_ne!(mac(&[8u8; 16], &syn()), base, "the key");
    }

    #[test]
    fn options_round_trip_and_foreign_options_are_not_ours() {
        let key = [7u8; 16];
        let o = option(&key, &syn());
        assert_eq!(parse(&o), Some((77, mac(&key, &syn()))));
        let mut other = o;
        other[3] ^= 1;
        assert_eq!(parse(&other), None, "another experiment's ExID");
        let mut short = o;
        short[1] = 12;
        assert_eq!(parse(&short), None);
    }

    #[test]
    fn the_window_is_symmetric_and_wraps() {
        assert!(fresh(100, 100));
        assert!(fresh(100, 100 + WINDOW_UNITS));
        assert!(fresh(100 + WINDOW_UNITS, 100));
        assert!(!fresh(100, 101 + WINDOW_UNITS));
        assert!(!fresh(101 + WINDOW_UNITS, 100));
        assert!(fresh(u32::MAX - 3, 5), "across the wrap");
        assert!(!fresh(0, 1 << 31));
    }
}

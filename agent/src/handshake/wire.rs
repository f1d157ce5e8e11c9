//! The messages of a node session (protocol version 2, `docs/PROTOCOL.md`): length-prefixed
//! frames of a version, a kind and a JSON body, sent only after both nodes authenticated the
//! session with their node SVIDs.

use std::net::IpAddr;

use bytes::{Buf, BufMut, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::reason::Reason;

/// Protocol version carried in every frame.
pub const VERSION: u8 = 2;
/// Largest frame body accepted, in bytes (a proof carries a chain of up to 4 certificates).
pub const MAX_FRAME: usize = 64 * 1024;

const KIND_PROVE: u8 = 1;
const KIND_PROVEN: u8 = 2;
const KIND_REFUSE: u8 = 3;
const KIND_REJECT: u8 = 4;
const KIND_READY: u8 = 5;

/// The initiator's half of a workload proof: "my workload at `initiator_addr` wants to be
/// authenticated with yours at `responder_addr`, which I expect to be `responder_id`".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prove {
    /// Chosen by the sender, unique among its proofs in this session.
    pub id: u64,
    /// 16 random bytes, hex.
    pub nonce: String,
    pub initiator_addr: IpAddr,
    pub responder_addr: IpAddr,
    pub responder_id: String,
    /// The initiator workload's SVID chain, leaf first, DER in hex.
    pub chain: Vec<String>,
    /// TLS `SignatureScheme` code of the signature.
    pub scheme: u16,
    /// The workload key's signature over the initiator transcript, hex.
    pub signature: String,
}

/// The responder's half, once it has checked the initiator's and written its entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proven {
    /// The `id` of the `Prove` it answers.
    pub id: u64,
    pub nonce: String,
    pub chain: Vec<String>,
    pub scheme: u16,
    /// The responder workload's signature over the responder transcript, hex.
    pub signature: String,
    /// Unix milliseconds until which the responder's entry admits the pair.
    pub expires_unix_ms: u64,
}

/// A `Prove` refused, with the reason (the answer instead of `Proven`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refuse {
    pub id: u64,
    pub reason: Reason,
}

/// A `Proven` the initiator did not accept: the responder removes the entry it wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reject {
    pub id: u64,
    pub reason: Reason,
}

/// The accepting agent's first frame: it has checked the opener's node SVID (in TLS 1.3 the
/// opener's handshake completes before the acceptor has judged its certificate, so the opener
/// sends nothing before this).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ready {
    /// The accepting node's name, as its node SVID says.
    pub node: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Prove(Prove),
    Proven(Proven),
    Refuse(Refuse),
    Reject(Reject),
    Ready(Ready),
}

impl Message {
    /// `u32` big-endian length of what follows, `u8` version, `u8` kind, JSON body.
    pub fn encode(&self) -> BytesMut {
        let (kind, body) = match self {
            Self::Prove(m) => (KIND_PROVE, serde_json::to_vec(m)),
            Self::Proven(m) => (KIND_PROVEN, serde_json::to_vec(m)),
            Self::Refuse(m) => (KIND_REFUSE, serde_json::to_vec(m)),
            Self::Reject(m) => (KIND_REJECT, serde_json::to_vec(m)),
            Self::Ready(m) => (KIND_READY, serde_json::to_vec(m)),
        };
        // Serializing these plain structs cannot fail.
        let body = body.unwrap_or_default();
        let mut buf = BytesMut::with_capacity(6 + body.len());
        buf.put_u32(u32::try_from(body.len() + 2).unwrap_or(u32::MAX));
        buf.put_u8(VERSION);
        buf.put_u8(kind);
        buf.put_slice(&body);
        buf
    }

    /// Decodes one frame's content (after the length prefix).
    pub fn decode(mut frame: &[u8]) -> Result<Self, Reason> {
        if frame.len() < 2 {
            return Err(Reason::Protocol);
        }
        let version = frame.get_u8();
        if version != VERSION {
            return Err(Reason::Version);
        }
        let kind = frame.get_u8();
        let bad = |_| Reason::Protocol;
        Ok(match kind {
            KIND_PROVE => Self::Prove(serde_json::from_slice(frame).map_err(bad)?),
            KIND_PROVEN => Self::Proven(serde_json::from_slice(frame).map_err(bad)?),
            KIND_REFUSE => Self::Refuse(serde_json::from_slice(frame).map_err(bad)?),
            KIND_REJECT => Self::Reject(serde_json::from_slice(frame).map_err(bad)?),
            KIND_READY => Self::Ready(serde_json::from_slice(frame).map_err(bad)?),
            _ => return Err(Reason::Protocol),
        })
    }
}

/// Writes messages and flushes once.
pub async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, msgs: &[Message]) -> std::io::Result<()> {
    for m in msgs {
        w.write_all(&m.encode()).await?;
    }
    w.flush().await
}

/// Reads one frame; a length outside `2..=MAX_FRAME` is refused before the body is read.
pub async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> Result<Message, Reason> {
    let len = r.read_u32().await.map_err(|_| Reason::SessionClosed)? as usize;
    if !(2..=MAX_FRAME).contains(&len) {
        return Err(Reason::Protocol);
    }
    let mut frame = vec![0; len];
    r.read_exact(&mut frame)
        .await
        .map_err(|_| Reason::SessionClosed)?;
    Message::decode(&frame)
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

pub fn unhex(s: &str) -> Result<Vec<u8>, Reason> {
    if !s.len().is_multiple_of(2) {
        return Err(Reason::Protocol);
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
                .ok_or(Reason::Protocol)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_frames_are_refused() {
        let prove = Message::Prove(Prove {
            id: 7,
            nonce: hex(&[1; 16]),
            initiator_addr: "198.18.1.2".parse().unwrap(),
            responder_addr: "fd00:18:2::2".parse().unwrap(),
            responder_id: "spiffe://td/ns/default/sa/b".into(),
            chain: vec![hex(b"der")],
            scheme: 0x0403,
            signature: hex(b"sig"),
        });
        for msg in [
            prove,
            Message::Proven(Proven {
                id: 7,
                nonce: hex(&[2; 16]),
                chain: vec![],
                scheme: 0x0403,
                signature: String::new(),
                expires_unix_ms: 42,
            }),
            Message::Refuse(Refuse {
                id: 7,
                reason: Reason::NotHosted,
            }),
            Message::Reject(Reject {
                id: 7,
                reason: Reason::BadSignature,
            }),
            Message::Ready(Ready {
                node: "node-2".into(),
            }),
        ] {
            let buf = msg.encode();
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            assert_eq!(len, buf.len() - 4);
            assert_eq!(Message::decode(&buf[4..]), Ok(msg));
        }
        assert_eq!(Message::decode(&[]), Err(Reason::Protocol));
        assert_eq!(
            Message::decode(&[1, KIND_REFUSE, b'{', b'}']),
            Err(Reason::Version),
            "a version 1 frame"
        );
        assert_eq!(
            Message::decode(&[VERSION, 9, b'{', b'}']),
            Err(Reason::Protocol)
        );
        assert_eq!(
            Message::decode(&[VERSION, KIND_REFUSE, b'x']),
            Err(Reason::Protocol)
        );
        let extra = br#"{"id":1,"reason":"busy","more":1}"#;
        let mut frame = vec![VERSION, KIND_REFUSE];
        frame.extend_from_slice(extra);
        assert_eq!(
            Message::decode(&frame),
            Err(Reason::Protocol),
            "unknown fields"
        );
    }

    #[test]
    fn hex_round_trips_and_refuses_junk() {
        assert_eq!(unhex(&hex(&[0, 1, 0xfe, 0xff])), Ok(vec![0, 1, 0xfe, 0xff]));
        assert_eq!(unhex("abc"), Err(Reason::Protocol));
        assert_eq!(unhex("zz"), Err(Reason::Protocol));
        assert_eq!(unhex("é1"), Err(Reason::Protocol));
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_before_reading_them() {
        let mut big = Vec::new();
        big.extend_from_slice(&u32::try_from(MAX_FRAME + 1).unwrap().to_be_bytes());
        assert_eq!(read_msg(&mut big.as_slice()).await, Err(Reason::Protocol));
        let tiny = 1u32.to_be_bytes();
        assert_eq!(read_msg(&mut tiny.as_slice()).await, Err(Reason::Protocol));
    }
}

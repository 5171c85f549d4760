//! What every benchmark message carries: who sent it, its sequence number
//! and when it was sent, as a fixed 40-character ASCII header, padded to the
//! requested message size.
//!
//! The header is plain text so any relay passes it unchanged, text-only
//! ones included. For the request/reply patterns the same header travels
//! inside a JSON object, in the field `"b"`:
//! `{"type":"request","b":"<header><padding>"}`.
//!
//! Times are nanoseconds since this process started ([`now_ns`]); senders
//! and receivers live in the same process, so latency is one subtraction.

use std::sync::OnceLock;
use std::time::Instant;

/// Length of the header.
pub const HEADER_LEN: usize = 40;
/// Smallest payload that holds a header inside the request JSON.
pub const MIN_JSON_SIZE: usize = HEADER_LEN + REQUEST_PREFIX.len() + 2;
const REQUEST_PREFIX: &[u8] = br#"{"type":"request","b":""#;
const FIELD: &[u8] = br#""b":""#;
const ORIGIN: &[u8] = br#""origin":""#;
const HEX: &[u8; 16] = b"0123456789abcdef";

/// Nanoseconds since the first call in this process.
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Whether a message belongs to the measurement or to the warm-up that
/// proves every receiver is subscribed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Measure,
    Warmup,
}

/// The decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub kind: Kind,
    /// Index of the sending client (< 2^28).
    pub source: u32,
    pub seq: u64,
    pub sent_ns: u64,
}

impl Stamp {
    /// Writes the 40-byte header.
    pub fn write(&self, out: &mut [u8; HEADER_LEN]) {
        out[0] = match self.kind {
            Kind::Measure => b'M',
            Kind::Warmup => b'W',
        };
        hex(u64::from(self.source), &mut out[1..8]);
        hex(self.seq, &mut out[8..24]);
        hex(self.sent_ns, &mut out[24..40]);
    }

    /// Reads a header from the start of `bytes`.
    pub fn read(bytes: &[u8]) -> Option<Self> {
        let header = bytes.get(..HEADER_LEN)?;
        let kind = match header[0] {
            b'M' => Kind::Measure,
            b'W' => Kind::Warmup,
            _ => return None,
        };
        Some(Self {
            kind,
            source: u32::try_from(unhex(&header[1..8])?).ok()?,
            seq: unhex(&header[8..24])?,
            sent_ns: unhex(&header[24..40])?,
        })
    }

    /// Reads the header of a plain message or of a request/reply JSON
    /// object (the value of its `"b"` field).
    pub fn find(payload: &[u8]) -> Option<Self> {
        if payload.first() == Some(&b'{') {
            let at = memchr::memmem::find(payload, FIELD)? + FIELD.len();
            Self::read(&payload[at..])
        } else {
            Self::read(payload)
        }
    }
}

fn hex(mut value: u64, out: &mut [u8]) {
    for slot in out.iter_mut().rev() {
        *slot = HEX[(value & 0xF) as usize];
        value >>= 4;
    }
}

fn unhex(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |acc, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some(acc << 4 | u64::from(v))
    })
}

/// Builds messages of one fixed size; the padding is written once. Or,
/// with [`Composer::snapshot`], a JSON document whose numbers change from
/// message to message.
#[derive(Clone, Debug)]
pub struct Composer {
    buf: Vec<u8>,
    /// Where the header goes in `buf`.
    at: usize,
    snapshot: Option<Snapshot>,
}

/// Services named in a snapshot, in order.
const SERVICES: [&str; 16] = [
    "api-gateway",
    "auth",
    "billing",
    "catalog",
    "checkout",
    "search",
    "recommendations",
    "inventory",
    "notifications",
    "payments",
    "shipping",
    "reviews",
    "media",
    "sessions",
    "analytics",
    "pricing",
];
const REGIONS: [&str; 4] = ["eu-west-1", "eu-central-1", "us-east-1", "ap-south-1"];

/// A monitoring dashboard's state, as a relay would push it: one entry
/// per service with request rate, latencies, error count, CPU and memory,
/// every number drawn afresh for each message.
#[derive(Clone, Debug)]
struct Snapshot {
    /// Largest document written.
    size: usize,
    rng: crate::rng::FastRng,
    seq: u64,
}

impl Snapshot {
    /// Writes the document for `stamp` into `buf` (the stamp in `"b"`).
    fn write(&mut self, stamp: &Stamp, buf: &mut Vec<u8>) {
        use std::io::Write as _;
        self.seq += 1;
        buf.clear();
        let mut header = [0u8; HEADER_LEN];
        stamp.write(&mut header);
        buf.extend_from_slice(br#"{"b":""#);
        buf.extend_from_slice(&header);
        let region = REGIONS[(self.rng.next_u32() % 4) as usize];
        let _ = write!(
            buf,
            r#"","type":"snapshot","seq":{},"region":"{region}","services":["#,
            self.seq
        );
        let mut entry = Vec::with_capacity(256);
        for (i, name) in SERVICES.iter().cycle().enumerate() {
            entry.clear();
            let r = &mut self.rng;
            let status = match r.next_u32() % 20 {
                0 => "degraded",
                1 => "down",
                _ => "ok",
            };
            let p50 = r.next_u32() % 5000;
            let _ = write!(
                entry,
                r#"{}{{"name":"{name}","instance":{},"status":"{status}","rps":{}.{},"p50_ms":{}.{:02},"p99_ms":{}.{:02},"errors":{},"cpu_pct":{}.{},"mem_mb":{}}}"#,
                if i == 0 { "" } else { "," },
                i / SERVICES.len() + 1,
                r.next_u32() % 20_000,
                r.next_u32() % 10,
                p50 / 100,
                p50 % 100,
                p50 / 100 + r.next_u32() % 400,
                r.next_u32() % 100,
                r.next_u32() % 50,
                r.next_u32() % 100,
                r.next_u32() % 10,
                256 + r.next_u32() % 3840,
            );
            if i > 0 && buf.len() + entry.len() + 2 > self.size {
                break;
            }
            buf.extend_from_slice(&entry);
        }
        buf.extend_from_slice(b"]}");
    }
}

impl Composer {
    /// Plain messages of exactly `size` bytes (at least the header).
    pub fn plain(size: usize) -> Self {
        Self {
            buf: vec![b'.'; size.max(HEADER_LEN)],
            at: 0,
            snapshot: None,
        }
    }

    /// JSON snapshots of at most `size` bytes (at least one service
    /// entry), with numbers drawn from a generator seeded with `seed`.
    pub fn snapshot(size: usize, seed: u64) -> Self {
        Self {
            buf: Vec::with_capacity(size + 256),
            at: 0,
            snapshot: Some(Snapshot {
                size,
                rng: crate::rng::FastRng::new(seed),
                seq: 0,
            }),
        }
    }

    /// Request objects of exactly `size` bytes (at least
    /// [`MIN_JSON_SIZE`]).
    pub fn request(size: usize) -> Self {
        let size = size.max(MIN_JSON_SIZE);
        let mut buf = Vec::with_capacity(size);
        buf.extend_from_slice(REQUEST_PREFIX);
        buf.resize(size - 2, b'.');
        buf.extend_from_slice(b"\"}");
        Self {
            buf,
            at: REQUEST_PREFIX.len(),
            snapshot: None,
        }
    }

    /// The message for this stamp; valid until the next call.
    pub fn compose(&mut self, stamp: &Stamp) -> &[u8] {
        if let Some(snapshot) = &mut self.snapshot {
            snapshot.write(stamp, &mut self.buf);
            return &self.buf;
        }
        let header: &mut [u8; HEADER_LEN] = (&mut self.buf[self.at..self.at + HEADER_LEN])
            .try_into()
            .expect("the buffer always holds a header");
        stamp.write(header);
        &self.buf
    }
}

/// Turns a request a responder received into its reply:
/// `{"type":"reply","origin":"<origin>","b":"<body>"}`, keeping the body.
/// Returns `None` for a frame without an origin or body.
pub fn reply_to(request: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let origin_at = memchr::memmem::find(request, ORIGIN)? + ORIGIN.len();
    let origin_len = memchr::memchr(b'"', &request[origin_at..])?;
    let body_at = memchr::memmem::find(request, FIELD)? + FIELD.len();
    let body_len = memchr::memchr(b'"', &request[body_at..])?;
    out.clear();
    out.extend_from_slice(br#"{"type":"reply","origin":""#);
    out.extend_from_slice(&request[origin_at..origin_at + origin_len]);
    out.extend_from_slice(br#"","b":""#);
    out.extend_from_slice(&request[body_at..body_at + body_len]);
    out.extend_from_slice(b"\"}");
    Some(())
}

/// Whether a request/reply frame is a reply (as opposed to a request).
pub fn is_reply(payload: &[u8]) -> bool {
    memchr::memmem::find(payload, br#""type":"reply""#).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(seq: u64) -> Stamp {
        Stamp {
            kind: Kind::Measure,
            source: 0x00AB_CDEF,
            seq,
            sent_ns: 123_456_789,
        }
    }

    #[test]
    fn plain_messages_round_trip_at_their_size() {
        let mut composer = Composer::plain(64);
        let message = composer.compose(&stamp(42)).to_vec();
        assert_eq!(message.len(), 64);
        assert_eq!(Stamp::find(&message), Some(stamp(42)));
        assert!(message.is_ascii());
    }

    #[test]
    fn requests_are_json_and_replies_keep_the_body() {
        let mut composer = Composer::request(100);
        let request = composer.compose(&stamp(7)).to_vec();
        assert_eq!(request.len(), 100);
        let value: serde_json::Value = serde_json::from_slice(&request).unwrap();
        assert_eq!(value["type"], "request");
        // The relay appends the origin, as WRS does.
        let mut stamped = request[..request.len() - 1].to_vec();
        stamped.extend_from_slice(br#","origin":"AB12-CD34"}"#);
        assert_eq!(Stamp::find(&stamped), Some(stamp(7)));
        assert!(!is_reply(&stamped));
        let mut reply = Vec::new();
        reply_to(&stamped, &mut reply).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(value["origin"], "AB12-CD34");
        assert!(is_reply(&reply));
        assert_eq!(Stamp::find(&reply), Some(stamp(7)));
    }

    #[test]
    fn snapshots_are_json_that_changes_and_carries_the_stamp() {
        let mut composer = Composer::snapshot(1536, 3);
        let first = composer.compose(&stamp(1)).to_vec();
        let second = composer.compose(&stamp(2)).to_vec();
        for (message, seq) in [(&first, 1), (&second, 2)] {
            assert!(
                message.len() <= 1536 && message.len() > 1200,
                "{}",
                message.len()
            );
            let value: serde_json::Value = serde_json::from_slice(message).unwrap();
            assert_eq!(value["type"], "snapshot");
            assert!(value["services"].as_array().unwrap().len() >= 8);
            assert_eq!(Stamp::find(message), Some(stamp(seq)));
        }
        // Same shape, other numbers.
        assert_ne!(first[HEADER_LEN + 8..], second[HEADER_LEN + 8..]);
        // Tiny sizes still give a document with one entry.
        let small = Composer::snapshot(10, 1).compose(&stamp(1)).to_vec();
        let value: serde_json::Value = serde_json::from_slice(&small).unwrap();
        assert_eq!(value["services"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn rejects_foreign_payloads() {
        assert_eq!(Stamp::find(b"hello"), None);
        assert_eq!(Stamp::find(&[b'M'; 40]), None);
        assert_eq!(Stamp::find(br#"{"type":"error"}"#), None);
    }
}

//! permessage-deflate (RFC 7692) without context takeover in either
//! direction: every message is compressed and inflated on its own, so an
//! idle connection holds no compressor or inflater, and a broadcast is
//! compressed once for all of its receivers.
//!
//! Negotiation accepts the first offer it can honour and always answers
//! with `server_no_context_takeover; client_no_context_takeover` (RFC 7692
//! §7.1.1.1 and §7.1.1.2 let a server add both to any offer). A
//! `server_max_window_bits` the client asks for is honoured from 9 to 15
//! and repeated in the answer; 8 cannot be produced by zlib's deflate, so
//! such an offer is declined. `client_max_window_bits` needs no answer: the
//! inflater's 32 KiB window takes any window the client uses.

use axum::http::HeaderValue;
use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension's token in `Sec-WebSocket-Extensions`.
const EXTENSION: &str = "permessage-deflate";
/// The largest LZ77 window, and the one used unless a client asks for less.
pub const MAX_WINDOW_BITS: u8 = 15;
/// The empty stored block a sync flush ends with; RFC 7692 §7.2.1 removes
/// it from each message and §7.2.2 appends it again before inflating.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// What a connection negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deflate {
    /// The LZ77 window the server compresses with (9–15).
    pub window_bits: u8,
}

impl Deflate {
    /// The `Sec-WebSocket-Extensions` answer for this negotiation (static,
    /// without an allocation, for the default window).
    pub fn response(self) -> HeaderValue {
        const ANSWER: &str =
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
        if self.window_bits >= MAX_WINDOW_BITS {
            return HeaderValue::from_static(ANSWER);
        }
        let answer = format!("{ANSWER}; server_max_window_bits={}", self.window_bits);
        HeaderValue::try_from(answer).unwrap_or(HeaderValue::from_static(ANSWER))
    }
}

/// Picks the first permessage-deflate offer of `headers` (every
/// `Sec-WebSocket-Extensions` value, in order) that can be accepted.
pub fn negotiate<'a>(headers: impl IntoIterator<Item = &'a [u8]>) -> Option<Deflate> {
    headers
        .into_iter()
        .filter_map(|value| std::str::from_utf8(value).ok())
        .flat_map(|value| value.split(','))
        .find_map(accept_offer)
}

/// One offer: `permessage-deflate` and its parameters, or `None` if it is
/// another extension or cannot be accepted (unknown or repeated
/// parameters, invalid values, a window of 8 bits).
fn accept_offer(offer: &str) -> Option<Deflate> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(EXTENSION) {
        return None;
    }
    let mut seen = Vec::new();
    let mut window_bits = MAX_WINDOW_BITS;
    for part in parts {
        let (name, value) = match part.split_once('=') {
            Some((name, value)) => (name.trim(), Some(unquote(value.trim())?)),
            None => (part, None),
        };
        let name = name.to_ascii_lowercase();
        if seen.contains(&name) {
            return None;
        }
        match (name.as_str(), value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            ("server_max_window_bits", Some(bits)) => {
                window_bits = window(bits)?;
                if window_bits < 9 {
                    return None;
                }
            }
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", Some(bits)) => {
                window(bits)?;
            }
            _ => return None,
        }
        seen.push(name);
    }
    Some(Deflate { window_bits })
}

/// A parameter value, without the quotes a quoted-string may carry.
fn unquote(value: &str) -> Option<&str> {
    match value.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"'),
        None => Some(value),
    }
}

/// A window size: 8–15 written as a plain decimal (RFC 7692 §7.1.2).
fn window(value: &str) -> Option<u8> {
    if value.is_empty() || value.len() > 2 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if value.starts_with('0') {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

/// Compresses one message on its own (a fresh LZ77 window), without the
/// sync flush's tail. Data that does not shrink grows by a few bytes
/// (stored blocks); it is compressed all the same, so that a receiver sees
/// one kind of frame for every message of at least the minimum size.
/// `None` only if the compressor fails.
pub fn compress(payload: &[u8], window_bits: u8) -> Option<Bytes> {
    let mut compressor = Compress::new_with_window_bits(Compression::default(), false, window_bits);
    // Stored blocks cost 5 bytes per 64 KiB; with the tail this always fits.
    let mut out = Vec::with_capacity(payload.len() + payload.len() / 16_000 + 64);
    let mut input = payload;
    loop {
        let before = compressor.total_in();
        let status = compressor
            .compress_vec(input, &mut out, FlushCompress::Sync)
            .ok()?;
        input = &input[(compressor.total_in() - before) as usize..];
        if input.is_empty() && out.len() < out.capacity() {
            break;
        }
        if status == Status::BufError || out.len() == out.capacity() {
            out.reserve(out.capacity().max(64));
        }
    }
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    }
    Some(Bytes::from(out))
}

/// Why a compressed message could not be inflated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the limit (only that much was inflated).
    TooLarge,
    /// It is not a valid deflate stream.
    Invalid,
}

/// Inflates one message on its own, never producing more than `max`
/// bytes: a decompression bomb costs at most the message limit.
///
/// # Errors
///
/// [`InflateError::TooLarge`] past `max`, [`InflateError::Invalid`] for
/// data that is not deflate.
pub fn inflate(compressed: &[u8], max: usize) -> Result<Bytes, InflateError> {
    let mut inflater = Decompress::new_with_window_bits(false, MAX_WINDOW_BITS);
    let limit = max.saturating_add(1);
    let mut out = Vec::with_capacity(compressed.len().saturating_mul(4).max(64).min(limit));
    for chunk in [compressed, &TAIL[..]] {
        let mut input = chunk;
        loop {
            if out.len() == out.capacity() {
                if out.len() > max {
                    return Err(InflateError::TooLarge);
                }
                let grow = out.capacity().max(64).min(limit - out.len());
                out.reserve_exact(grow);
            }
            let before = inflater.total_in();
            let status = inflater
                .decompress_vec(input, &mut out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Invalid)?;
            input = &input[(inflater.total_in() - before) as usize..];
            if out.len() > max {
                return Err(InflateError::TooLarge);
            }
            match status {
                Status::StreamEnd => break,
                // Everything taken and room left over: this chunk is done.
                _ if input.is_empty() && out.len() < out.capacity() => break,
                Status::BufError if !input.is_empty() && out.len() < out.capacity() => {
                    return Err(InflateError::Invalid);
                }
                _ => {}
            }
        }
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(value: &str) -> Option<Deflate> {
        negotiate([value.as_bytes()])
    }

    #[test]
    fn accepts_the_browsers_offer_without_context_takeover() {
        let deflate = offer("permessage-deflate; client_max_window_bits").unwrap();
        assert_eq!(deflate.window_bits, 15);
        assert_eq!(
            deflate.response(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        assert_eq!(offer("permessage-deflate"), Some(deflate));
        assert_eq!(offer("x-webkit-deflate-frame"), None);
    }

    #[test]
    fn honours_a_smaller_server_window_and_says_so() {
        let deflate = offer("permessage-deflate; server_max_window_bits=10").unwrap();
        assert_eq!(deflate.window_bits, 10);
        let answer = deflate.response();
        let answer = answer.to_str().unwrap();
        assert!(answer.ends_with("; server_max_window_bits=10"), "{answer}");
        assert_eq!(
            offer(r#"permessage-deflate; server_max_window_bits="12""#).map(|d| d.window_bits),
            Some(12)
        );
    }

    #[test]
    fn declines_what_it_cannot_honour_and_takes_the_next_offer() {
        for bad in [
            "permessage-deflate; server_max_window_bits=8",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=09",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; unknown_parameter",
        ] {
            assert_eq!(offer(bad), None, "{bad}");
        }
        let fallback = negotiate([
            b"permessage-deflate; server_max_window_bits=8, permessage-deflate; client_max_window_bits=9"
                .as_slice(),
        ]);
        assert_eq!(fallback, Some(Deflate { window_bits: 15 }));
        let second_header = negotiate([b"foo".as_slice(), b"permessage-deflate".as_slice()]);
        assert_eq!(second_header, Some(Deflate { window_bits: 15 }));
    }

    #[test]
    fn round_trips_without_the_tail() {
        let json = br#"{"player":"p1","x":12.5,"y":3.25,"inventory":["sword","shield","potion"]}"#
            .repeat(20);
        for bits in 9..=15 {
            let compressed = compress(&json, bits).unwrap();
            assert!(compressed.len() * 3 < json.len(), "{}", compressed.len());
            assert!(!compressed.ends_with(&TAIL));
            assert_eq!(inflate(&compressed, json.len()).unwrap(), &json[..]);
        }
        // Random bytes do not shrink: stored, a few bytes larger.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let noise: Vec<u8> = (0..2048)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect();
        let stored = compress(&noise, 15).unwrap();
        assert!(stored.len() <= noise.len() + 16, "{}", stored.len());
        assert_eq!(inflate(&stored, noise.len()).unwrap(), noise);
    }

    #[test]
    fn inflating_stops_at_the_limit() {
        let bomb = compress(&vec![0u8; 10 << 20], 15).unwrap();
        assert!(bomb.len() * 500 < 10 << 20, "{}", bomb.len());
        assert_eq!(inflate(&bomb, 1 << 20), Err(InflateError::TooLarge));
        assert_eq!(inflate(&bomb, 10 << 20).unwrap().len(), 10 << 20);
        assert_eq!(
            inflate(b"\xff\xff\xff\xff", 1000),
            Err(InflateError::Invalid)
        );
        // An empty message (RFC 7692 §7.2.3.6: a single 0x00).
        assert_eq!(inflate(&[0x00], 10).unwrap(), Bytes::new());
        // Limits below the first allocation.
        let small = compress(&[b'a'; 100], 15).unwrap();
        assert_eq!(inflate(&small, 1), Err(InflateError::TooLarge));
        assert_eq!(inflate(&small, 0), Err(InflateError::TooLarge));
        assert_eq!(inflate(&small, 100).unwrap(), &[b'a'; 100][..]);
    }
}

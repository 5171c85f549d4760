//! RFC 6455 framing, server side: decoding masked client frames into
//! messages and encoding unmasked server frames.
//!
//! Server frames are encoded once per message into a `Bytes` that every
//! receiver shares (server frames carry no mask, so the bytes are identical
//! for all of them). The decoder enforces the size limit from the frame
//! header, before any payload is buffered, and reassembles fragmented
//! messages within the same limit.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::deflate::{self, InflateError};

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// Close codes the service sends (RFC 6455 §7.4 and SPEC §5).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// One complete thing read from a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A complete text message; the payload is valid UTF-8.
    Text(Bytes),
    /// A complete binary message.
    Binary(Bytes),
    Ping(Bytes),
    Pong,
    /// The client's close frame: its status code, if it sent one.
    Close(Option<u16>),
}

/// A violation that ends the connection, with the close code it earns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("message too large: {size} bytes, the limit is {max}")]
    TooLarge { size: u64, max: usize },
    #[error("invalid UTF-8 in a text message")]
    InvalidUtf8,
    #[error("protocol error: {0}")]
    Violation(&'static str),
    #[error("a compressed message that is not valid deflate data")]
    InvalidDeflate,
}

impl ProtocolError {
    pub fn close_code(&self) -> u16 {
        match self {
            ProtocolError::TooLarge { .. } => close_code::TOO_BIG,
            ProtocolError::InvalidUtf8 => close_code::INVALID_PAYLOAD,
            ProtocolError::Violation(_) | ProtocolError::InvalidDeflate => {
                close_code::PROTOCOL_ERROR
            }
        }
    }
}

/// Incremental decoder for one connection's inbound byte stream.
#[derive(Debug)]
pub struct Decoder {
    max_message: usize,
    /// permessage-deflate was negotiated: RSV1 marks a compressed message.
    deflate: bool,
    /// A fragmented message being reassembled.
    fragment: Option<Fragment>,
    /// Bytes of an oversized frame's payload still to be discarded.
    skip: u64,
    /// Total size of the frame at the front of the buffer, once its header
    /// is known and the frame is incomplete.
    awaiting: usize,
}

impl Decoder {
    pub fn new(max_message: usize) -> Self {
        Self {
            max_message,
            deflate: false,
            fragment: None,
            skip: 0,
            awaiting: 0,
        }
    }

    /// Accepts compressed messages (RSV1 on a message's first frame),
    /// inflated with their size bounded by the message limit.
    pub fn with_deflate(mut self, deflate: bool) -> Self {
        self.deflate = deflate;
        self
    }

    /// How many bytes the buffer should be able to hold for the next read:
    /// the rest of a partly received frame, at least `min`. Never more than
    /// the largest allowed frame.
    pub fn wanted(&self, buffered: usize, min: usize) -> usize {
        self.awaiting.saturating_sub(buffered).max(min)
    }

    /// Decodes the next event from the front of `buf`, consuming its bytes.
    /// `Ok(None)` means more bytes are needed.
    ///
    /// # Errors
    ///
    /// A [`ProtocolError`] ends the connection. After `TooLarge` the decoder
    /// skips the oversized payload, so the caller can keep reading while it
    /// waits for the client's close frame.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, ProtocolError> {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(buf.len() as u64);
                buf.advance(n as usize);
                self.skip -= n;
                if self.skip > 0 {
                    return Ok(None);
                }
            }
            if buf.len() < 2 {
                return Ok(None);
            }
            let (b0, b1) = (buf[0], buf[1]);
            let fin = b0 & 0x80 != 0;
            let compressed = b0 & 0x40 != 0;
            if b0 & 0x30 != 0 || (compressed && !self.deflate) {
                return Err(ProtocolError::Violation(
                    "reserved bits set without an extension",
                ));
            }
            let opcode =
                OpCode::from_bits(b0 & 0x0F).ok_or(ProtocolError::Violation("unknown opcode"))?;
            if compressed && !matches!(opcode, OpCode::Text | OpCode::Binary) {
                return Err(ProtocolError::Violation(
                    "RSV1 set on a control or continuation frame",
                ));
            }
            if b1 & 0x80 == 0 {
                return Err(ProtocolError::Violation("client frames must be masked"));
            }
            let (len_bytes, header_len) = match b1 & 0x7F {
                126 => (2, 8),
                127 => (8, 14),
                _ => (0, 6),
            };
            if buf.len() < header_len {
                self.awaiting = header_len;
                return Ok(None);
            }
            let payload_len = match len_bytes {
                0 => u64::from(b1 & 0x7F),
                2 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
                _ => {
                    let len = u64::from_be_bytes(buf[2..10].try_into().unwrap_or([0xFF; 8]));
                    if len >> 63 != 0 {
                        return Err(ProtocolError::Violation("frame length has its top bit set"));
                    }
                    len
                }
            };
            if opcode.is_control() {
                if !fin {
                    return Err(ProtocolError::Violation("fragmented control frame"));
                }
                if payload_len > 125 {
                    return Err(ProtocolError::Violation(
                        "control frame longer than 125 bytes",
                    ));
                }
            } else {
                let so_far = match (&self.fragment, opcode) {
                    (Some(fragment), OpCode::Continuation) => fragment.data.len() as u64,
                    _ => 0,
                };
                let size = so_far.saturating_add(payload_len);
                if size > self.max_message as u64 {
                    buf.advance(header_len);
                    self.skip = payload_len;
                    self.fragment = None;
                    self.awaiting = 0;
                    return Err(ProtocolError::TooLarge {
                        size,
                        max: self.max_message,
                    });
                }
            }
            // The size limit bounds this (data) or it is at most 125 (control).
            let frame_len = header_len + payload_len as usize;
            if buf.len() < frame_len {
                self.awaiting = frame_len;
                return Ok(None);
            }
            self.awaiting = 0;
            let mask: [u8; 4] = [
                buf[header_len - 4],
                buf[header_len - 3],
                buf[header_len - 2],
                buf[header_len - 1],
            ];
            let mut payload = buf.split_to(frame_len);
            payload.advance(header_len);
            unmask(&mut payload, mask);

            match opcode {
                OpCode::Text | OpCode::Binary => {
                    if self.fragment.is_some() {
                        return Err(ProtocolError::Violation(
                            "new message before the fragmented one finished",
                        ));
                    }
                    let mut fragment = Fragment {
                        opcode,
                        compressed,
                        data: payload,
                        checked: 0,
                    };
                    if fin {
                        return self.complete(fragment).map(Some);
                    }
                    fragment.check_utf8()?;
                    self.fragment = Some(fragment);
                }
                OpCode::Continuation => {
                    let Some(mut fragment) = self.fragment.take() else {
                        return Err(ProtocolError::Violation("continuation without a message"));
                    };
                    fragment.data.extend_from_slice(&payload);
                    if fin {
                        return self.complete(fragment).map(Some);
                    }
                    fragment.check_utf8()?;
                    self.fragment = Some(fragment);
                }
                OpCode::Ping => return Ok(Some(Event::Ping(payload.freeze()))),
                OpCode::Pong => return Ok(Some(Event::Pong)),
                OpCode::Close => return parse_close(&payload).map(|code| Some(Event::Close(code))),
            }
        }
    }

    /// Finishes a data message: inflated if compressed (within the message
    /// limit); text must be valid UTF-8.
    fn complete(&self, fragment: Fragment) -> Result<Event, ProtocolError> {
        let Fragment {
            opcode,
            compressed,
            data,
            checked,
        } = fragment;
        let (payload, checked) = if compressed {
            let inflated =
                deflate::inflate(&data, self.max_message).map_err(|error| match error {
                    InflateError::TooLarge => ProtocolError::TooLarge {
                        size: self.max_message as u64 + 1,
                        max: self.max_message,
                    },
                    InflateError::Invalid => ProtocolError::InvalidDeflate,
                })?;
            (inflated, 0)
        } else {
            (data.freeze(), checked)
        };
        if opcode == OpCode::Text {
            // From where the fragments' check stopped (a character boundary).
            std::str::from_utf8(&payload[checked..]).map_err(|_| ProtocolError::InvalidUtf8)?;
            Ok(Event::Text(payload))
        } else {
            Ok(Event::Binary(payload))
        }
    }
}

/// A message being reassembled from its frames.
#[derive(Debug)]
struct Fragment {
    opcode: OpCode,
    /// permessage-deflate: inflated (and then checked) once complete.
    compressed: bool,
    data: BytesMut,
    /// Text: the bytes known to be valid UTF-8, up to a character boundary.
    checked: usize,
}

impl Fragment {
    /// Fails fast on text that can no longer become valid UTF-8, whatever
    /// follows (RFC 6455 §8.1); a character cut at the end of a fragment
    /// waits for the next one.
    fn check_utf8(&mut self) -> Result<(), ProtocolError> {
        if self.opcode != OpCode::Text || self.compressed {
            return Ok(());
        }
        match std::str::from_utf8(&self.data[self.checked..]) {
            Ok(_) => self.checked = self.data.len(),
            Err(error) if error.error_len().is_none() => self.checked += error.valid_up_to(),
            Err(_) => return Err(ProtocolError::InvalidUtf8),
        }
        Ok(())
    }
}

/// Validates a close frame's body: empty, or a valid code plus UTF-8 reason.
fn parse_close(payload: &[u8]) -> Result<Option<u16>, ProtocolError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ProtocolError::Violation("close frame with a one-byte body")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(ProtocolError::Violation("invalid close code"));
            }
            std::str::from_utf8(reason).map_err(|_| ProtocolError::InvalidUtf8)?;
            Ok(Some(code))
        }
    }
}

/// XORs the payload with the client's masking key, eight bytes at a time.
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let (chunks, rest) = data.as_chunks_mut::<8>();
    for chunk in chunks {
        *chunk = (u64::from_ne_bytes(*chunk) ^ wide).to_ne_bytes();
    }
    // `rest` starts at a multiple of eight, so the key restarts at index 0.
    for (i, byte) in rest.iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Encodes one unmasked, unfragmented server frame.
pub fn encode(opcode: OpCode, payload: &[u8]) -> Bytes {
    encode_frame(0x80 | opcode as u8, payload)
}

/// Encodes a message compressed with permessage-deflate (RSV1 set).
pub fn encode_deflated(opcode: OpCode, compressed: &[u8]) -> Bytes {
    encode_frame(0xC0 | opcode as u8, compressed)
}

fn encode_frame(first: u8, payload: &[u8]) -> Bytes {
    let len = payload.len();
    let mut out = BytesMut::with_capacity(len + 10);
    out.put_u8(first);
    if len < 126 {
        out.put_u8(len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        out.put_u8(126);
        out.put_u16(short);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
    out.extend_from_slice(payload);
    out.freeze()
}

/// Encodes a close frame; the reason is cut to fit the 125-byte limit on a
/// character boundary.
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut body = Vec::with_capacity(2 + end);
    body.extend_from_slice(&code.to_be_bytes());
    body.extend_from_slice(&reason.as_bytes()[..end]);
    encode(OpCode::Close, &body)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a masked client frame.
    pub(crate) fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 0xFFFF {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn decode_all(max: usize, bytes: &[u8]) -> (Vec<Event>, Option<ProtocolError>, BytesMut) {
        let mut decoder = Decoder::new(max);
        let mut buf = BytesMut::from(bytes);
        let mut events = Vec::new();
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(event)) => events.push(event),
                Ok(None) => return (events, None, buf),
                Err(e) => return (events, Some(e), buf),
            }
        }
    }

    #[test]
    fn decodes_text_and_binary_of_every_length_class() {
        for len in [0usize, 1, 7, 8, 9, 125, 126, 127, 65_535, 65_536, 200_000] {
            let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let mut stream = client_frame(true, 1, &payload);
            stream.extend(client_frame(true, 2, &payload));
            let (events, err, rest) = decode_all(1 << 20, &stream);
            assert_eq!(err, None, "len {len}");
            assert!(rest.is_empty());
            assert_eq!(
                events,
                [
                    Event::Text(payload.clone().into()),
                    Event::Binary(payload.into())
                ]
            );
        }
    }

    #[test]
    fn decodes_byte_by_byte() {
        let mut stream = client_frame(true, 1, b"hello");
        stream.extend(client_frame(false, 2, b"ab"));
        stream.extend(client_frame(true, 9, b"p"));
        stream.extend(client_frame(true, 0, b"cd"));
        let mut decoder = Decoder::new(1024);
        let mut buf = BytesMut::new();
        let mut events = Vec::new();
        for byte in stream {
            buf.put_u8(byte);
            while let Some(event) = decoder.decode(&mut buf).unwrap() {
                events.push(event);
            }
        }
        assert_eq!(
            events,
            [
                Event::Text(Bytes::from_static(b"hello")),
                Event::Ping(Bytes::from_static(b"p")),
                Event::Binary(Bytes::from_static(b"abcd")),
            ]
        );
    }

    #[test]
    fn reassembles_fragmented_text_and_validates_it_whole() {
        // "é" split across two fragments is valid once reassembled.
        let e_acute = "é".as_bytes();
        let mut stream = client_frame(false, 1, &e_acute[..1]);
        stream.extend(client_frame(false, 0, &e_acute[1..]));
        stream.extend(client_frame(true, 0, b"!"));
        let (events, err, _) = decode_all(1024, &stream);
        assert_eq!(err, None);
        assert_eq!(events, [Event::Text(Bytes::from("é!"))]);
    }

    #[test]
    fn invalid_utf8_fails_at_the_fragment_that_breaks_it() {
        // The first fragment is valid; the second can never become valid.
        let mut stream = client_frame(false, 1, "κόσμε".as_bytes());
        stream.extend(client_frame(false, 0, &[0xF4, 0x90, 0x80, 0x80]));
        let (events, err, _) = decode_all(1024, &stream);
        assert_eq!((events.len(), err), (0, Some(ProtocolError::InvalidUtf8)));
        // A character cut between fragments is not an error until it ends.
        let mut stream = client_frame(false, 1, &[b'a', 0xE2, 0x82]);
        let (_, err, _) = decode_all(1024, &stream);
        assert_eq!(err, None);
        stream.extend(client_frame(true, 0, &[0xAC]));
        let (events, err, _) = decode_all(1024, &stream);
        assert_eq!((events, err), (vec![Event::Text(Bytes::from("a€"))], None));
    }

    #[test]
    fn rejects_invalid_utf8_with_1007() {
        let (_, err, _) = decode_all(1024, &client_frame(true, 1, &[0xC3, 0x28]));
        assert_eq!(err, Some(ProtocolError::InvalidUtf8));
        assert_eq!(ProtocolError::InvalidUtf8.close_code(), 1007);
        // Binary frames are not UTF-8 checked.
        let (events, err, _) = decode_all(1024, &client_frame(true, 2, &[0xC3, 0x28]));
        assert_eq!((events.len(), err), (1, None));
    }

    #[test]
    fn enforces_the_size_limit_from_the_header_and_skips_the_payload() {
        let mut stream = client_frame(true, 2, &[7u8; 101]);
        stream.extend(client_frame(true, 8, &1000u16.to_be_bytes()));
        let mut decoder = Decoder::new(100);
        // Only the header has arrived: the limit applies before the payload.
        let mut buf = BytesMut::from(&stream[..8]);
        let err = decoder.decode(&mut buf).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::TooLarge {
                size: 101,
                max: 100
            }
        );
        assert_eq!(err.close_code(), 1009);
        // The rest of the oversized payload is skipped; the close frame after
        // it is still understood.
        buf.extend_from_slice(&stream[8..]);
        assert_eq!(decoder.decode(&mut buf), Ok(Some(Event::Close(Some(1000)))));
        // Exactly the limit is accepted.
        let (events, err, _) = decode_all(100, &client_frame(true, 2, &[1u8; 100]));
        assert_eq!((events.len(), err), (1, None));
    }

    #[test]
    fn the_limit_covers_a_fragmented_message_as_a_whole() {
        let mut stream = client_frame(false, 2, &[0u8; 60]);
        stream.extend(client_frame(true, 0, &[0u8; 41]));
        let (_, err, _) = decode_all(100, &stream);
        assert_eq!(
            err,
            Some(ProtocolError::TooLarge {
                size: 101,
                max: 100
            })
        );
    }

    #[test]
    fn huge_declared_lengths_do_not_allocate() {
        let mut frame = vec![0x82, 0x80 | 127];
        frame.extend_from_slice(&(u64::MAX >> 1).to_be_bytes());
        frame.extend_from_slice(&[1, 2, 3, 4]);
        let mut decoder = Decoder::new(1 << 20);
        let mut buf = BytesMut::from(&frame[..]);
        assert!(matches!(
            decoder.decode(&mut buf),
            Err(ProtocolError::TooLarge { .. })
        ));
        assert!(decoder.wanted(0, 4096) <= 4096);
        let mut top_bit = vec![0x82, 0x80 | 127];
        top_bit.extend_from_slice(&u64::MAX.to_be_bytes());
        top_bit.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(
            decode_all(1 << 20, &top_bit).1,
            Some(ProtocolError::Violation("frame length has its top bit set"))
        );
    }

    #[test]
    fn wanted_asks_for_the_rest_of_a_partial_frame() {
        let stream = client_frame(true, 2, &[0u8; 50_000]);
        let mut decoder = Decoder::new(1 << 20);
        let mut buf = BytesMut::from(&stream[..100]);
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        assert_eq!(decoder.wanted(buf.len(), 4096), stream.len() - 100);
        assert_eq!(decoder.wanted(stream.len(), 4096), 4096);
    }

    #[test]
    fn protocol_violations_close_with_1002() {
        let unmasked = vec![0x81, 0x02, b'h', b'i'];
        let rsv = {
            let mut f = client_frame(true, 1, b"x");
            f[0] |= 0x40;
            f
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("unmasked", unmasked),
            ("reserved bits", rsv),
            ("opcode 3", client_frame(true, 3, b"")),
            ("opcode 0xB", client_frame(true, 0xB, b"")),
            ("fragmented ping", client_frame(false, 9, b"")),
            ("long ping", client_frame(true, 9, &[0u8; 126])),
            ("lonely continuation", client_frame(true, 0, b"x")),
            ("interleaved message", {
                let mut f = client_frame(false, 1, b"a");
                f.extend(client_frame(true, 1, b"b"));
                f
            }),
            ("one-byte close", client_frame(true, 8, &[3])),
            (
                "close code 1005",
                client_frame(true, 8, &1005u16.to_be_bytes()),
            ),
            (
                "close code 999",
                client_frame(true, 8, &999u16.to_be_bytes()),
            ),
            (
                "close code 5000",
                client_frame(true, 8, &5000u16.to_be_bytes()),
            ),
        ];
        for (name, bytes) in cases {
            let (_, err, _) = decode_all(1024, &bytes);
            let err = err.unwrap_or_else(|| panic!("{name}: accepted"));
            assert_eq!(err.close_code(), 1002, "{name}: {err}");
        }
    }

    #[test]
    fn control_frames_interleave_with_fragments() {
        let mut stream = client_frame(false, 1, b"he");
        stream.extend(client_frame(true, 9, b"ping"));
        stream.extend(client_frame(true, 10, b""));
        stream.extend(client_frame(true, 0, b"llo"));
        let (events, err, _) = decode_all(1024, &stream);
        assert_eq!(err, None);
        assert_eq!(
            events,
            [
                Event::Ping(Bytes::from_static(b"ping")),
                Event::Pong,
                Event::Text(Bytes::from_static(b"hello"))
            ]
        );
    }

    #[test]
    fn close_frames_carry_their_code() {
        let (events, _, _) = decode_all(1024, &client_frame(true, 8, b""));
        assert_eq!(events, [Event::Close(None)]);
        let mut body = 4000u16.to_be_bytes().to_vec();
        body.extend_from_slice("bye ü".as_bytes());
        let (events, _, _) = decode_all(1024, &client_frame(true, 8, &body));
        assert_eq!(events, [Event::Close(Some(4000))]);
        let mut bad_reason = 1000u16.to_be_bytes().to_vec();
        bad_reason.push(0xFF);
        assert_eq!(
            decode_all(1024, &client_frame(true, 8, &bad_reason)).1,
            Some(ProtocolError::InvalidUtf8)
        );
    }

    #[test]
    fn encodes_every_length_class() {
        for (len, header) in [
            (0usize, vec![0x81, 0]),
            (125, vec![0x81, 125]),
            (126, vec![0x81, 126, 0, 126]),
            (65_536, vec![0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
        ] {
            let payload = vec![b'x'; len];
            let frame = encode(OpCode::Text, &payload);
            assert_eq!(&frame[..header.len()], &header[..], "len {len}");
            assert_eq!(&frame[header.len()..], &payload[..]);
        }
    }

    #[test]
    fn close_reasons_are_cut_on_a_character_boundary() {
        let frame = encode_close(4001, &"é".repeat(100));
        assert_eq!(frame[1] as usize, frame.len() - 2);
        assert!(frame.len() - 2 <= 125);
        assert_eq!(&frame[2..4], &4001u16.to_be_bytes());
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
    }

    #[test]
    fn unmask_matches_the_bytewise_definition() {
        let mask = [1, 2, 3, 4];
        for len in 0..40 {
            let original: Vec<u8> = (0..len as u8).collect();
            let mut data = original.clone();
            unmask(&mut data, mask);
            let expected: Vec<u8> = original
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(data, expected);
        }
    }
}

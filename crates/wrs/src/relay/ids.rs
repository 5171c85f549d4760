//! Identifiers and secrets: channel ids, client ids and channel tokens.
//!
//! All three come from the thread-local CSPRNG (`rand::rng()`, ChaCha12
//! seeded and periodically reseeded from the operating system).

use std::fmt;
use std::sync::Arc;

use rand::RngExt;
use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Hex digits used for ids, upper case so ids read well when spoken or typed.
const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// A channel id such as `D679-05F5`: random bytes as upper-case hex, grouped
/// in fours with dashes. `WRS_ID_LENGTH` is the number of random bytes.
///
/// Cloning is shallow (an `Arc<str>`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(Arc<str>);

impl ChannelId {
    /// A fresh random id made of `bytes` random bytes.
    pub fn random(bytes: usize) -> Self {
        let mut raw = vec![0u8; bytes];
        rand::rng().fill(&mut raw[..]);
        let mut text = String::with_capacity(bytes * 2 + bytes / 2);
        for (i, byte) in raw.iter().enumerate() {
            if i > 0 && i % 2 == 0 {
                text.push('-');
            }
            text.push(HEX[usize::from(byte >> 4)] as char);
            text.push(HEX[usize::from(byte & 0x0f)] as char);
        }
        Self(text.into())
    }

    /// Normalises an id taken from a request path: ids are upper-case hex, so
    /// a lower-case spelling names the same channel. Returns `None` for text
    /// that cannot be a channel id at all.
    pub fn parse(text: &str) -> Option<Self> {
        let valid = !text.is_empty()
            && text.len() <= 64
            && text.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        valid.then(|| Self(text.to_ascii_uppercase().into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A client id such as `3F2A-91C0-7B44`: 48 bits, shown as three groups of
/// four upper-case hex digits. Unique within its channel (the channel
/// re-draws on the rare collision). A connected client's id has its top
/// bit clear; the one-off origin of an HTTP call (`POST
/// /channels/{id}/messages` on `req-repl` and `fan-in-out`) has it set, so
/// any node can tell a reply to a call from a reply to a client.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(u64);

impl ClientId {
    const BITS: u32 = 48;
    /// Length of the text form, `XXXX-XXXX-XXXX`.
    pub const TEXT_LEN: usize = 14;

    /// The bit set in call origins and clear in client ids.
    const CALL: u64 = 1 << (Self::BITS - 1);

    /// A fresh random id for a client.
    pub fn random() -> Self {
        Self(rand::rng().random::<u64>() >> (64 - Self::BITS + 1))
    }

    /// A fresh random one-off origin for an HTTP call.
    pub fn call() -> Self {
        Self(Self::random().0 | Self::CALL)
    }

    /// Whether this id is an HTTP call's origin rather than a client's.
    pub fn is_call(self) -> bool {
        self.0 & Self::CALL != 0
    }

    /// Parses the text form (either case). Anything else is `None`.
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        if bytes.len() != Self::TEXT_LEN || bytes[4] != b'-' || bytes[9] != b'-' {
            return None;
        }
        let mut value = 0u64;
        for (i, &b) in bytes.iter().enumerate() {
            if i == 4 || i == 9 {
                continue;
            }
            let digit = char::from(b).to_digit(16)?;
            value = (value << 4) | u64::from(digit);
        }
        Some(Self(value))
    }

    /// Writes the 14-byte text form into `out`.
    pub fn write_text(self, out: &mut [u8; Self::TEXT_LEN]) {
        let mut shift = Self::BITS;
        for (i, slot) in out.iter_mut().enumerate() {
            if i == 4 || i == 9 {
                *slot = b'-';
                continue;
            }
            shift -= 4;
            *slot = HEX[((self.0 >> shift) & 0x0f) as usize];
        }
    }

    #[cfg(test)]
    pub(crate) fn from_raw(raw: u64) -> Self {
        Self(raw & ((1 << Self::BITS) - 1))
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = [0u8; Self::TEXT_LEN];
        self.write_text(&mut text);
        // The buffer holds only ASCII hex digits and dashes.
        f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl<'de> serde::Deserialize<'de> for ClientId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        ClientId::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("not a client id: {text:?}")))
    }
}

impl serde::Serialize for ClientId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// The secret a client must present to connect to a channel. Generated at
/// creation and returned once, in the create response; the service keeps
/// only its [`TokenDigest`]. Never logged, never shown by `Debug`.
pub struct Token(Box<str>);

impl Token {
    /// A fresh token of `len` alphanumeric characters (62 symbols each,
    /// about 95 bits of entropy at the default length of 16).
    pub fn random(len: usize) -> Self {
        Self(Alphanumeric.sample_string(&mut rand::rng(), len).into())
    }

    /// The token itself, for the one response that reveals it.
    pub fn reveal(&self) -> &str {
        &self.0
    }

    pub fn digest(&self) -> TokenDigest {
        TokenDigest::of(&self.0)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// The SHA-256 of a channel token: what the service stores (and, in a
/// cluster, what the shared registry holds).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenDigest([u8; 32]);

impl TokenDigest {
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// Whether `candidate` is the token, compared in constant time.
    pub fn matches(&self, candidate: &str) -> bool {
        Self::of(candidate).0.ct_eq(&self.0).into()
    }

    pub fn to_hex(self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 64 || !text.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(bytes))
    }
}

impl fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenDigest(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_ids_have_the_documented_shape() {
        let id = ChannelId::random(4);
        let text = id.as_str();
        assert_eq!(text.len(), 9, "{text}");
        assert_eq!(&text[4..5], "-");
        assert!(text.bytes().all(|b| b == b'-' || HEX.contains(&b)));
        assert_eq!(ChannelId::random(3).as_str().len(), 7);
        assert_eq!(ChannelId::random(2).as_str().len(), 4);
    }

    #[test]
    fn channel_id_parse_normalises_case_and_rejects_junk() {
        assert_eq!(ChannelId::parse("d679-05f5").unwrap().as_str(), "D679-05F5");
        assert!(ChannelId::parse("").is_none());
        assert!(ChannelId::parse("D679/05F5").is_none());
        assert!(ChannelId::parse("zz").is_none());
        assert!(ChannelId::parse(&"A".repeat(65)).is_none());
    }

    #[test]
    fn client_ids_round_trip_through_text() {
        for _ in 0..1000 {
            let id = ClientId::random();
            let text = id.to_string();
            assert_eq!(text.len(), ClientId::TEXT_LEN);
            assert_eq!(ClientId::parse(&text), Some(id));
            assert_eq!(ClientId::parse(&text.to_lowercase()), Some(id));
        }
        for _ in 0..1000 {
            let (client, call) = (ClientId::random(), ClientId::call());
            assert!(!client.is_call() && call.is_call());
            assert_eq!(ClientId::parse(&call.to_string()), Some(call));
        }
        assert_eq!(ClientId::from_raw(0).to_string(), "0000-0000-0000");
        assert_eq!(ClientId::from_raw(u64::MAX).to_string(), "FFFF-FFFF-FFFF");
    }

    #[test]
    fn client_id_parse_rejects_malformed_text() {
        for bad in [
            "",
            "0000-0000-000",
            "0000-0000-00000",
            "0000_0000_0000",
            "000G-0000-0000",
            "+000-0000-0000",
        ] {
            assert_eq!(ClientId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn tokens_are_alphanumeric_and_checked_by_digest() {
        let token = Token::random(16);
        let text = token.reveal().to_owned();
        assert_eq!(text.len(), 16);
        assert!(text.bytes().all(|b| b.is_ascii_alphanumeric()));
        let digest = token.digest();
        assert!(digest.matches(&text));
        assert!(!digest.matches(&text[..15]));
        assert!(!digest.matches(&format!("{text}x")));
        assert!(!digest.matches(""));
        assert_ne!(Token::random(16).reveal(), text);
        assert_eq!(format!("{token:?}"), "Token(<redacted>)");
        assert_eq!(format!("{digest:?}"), "TokenDigest(<redacted>)");
        assert_eq!(TokenDigest::from_hex(&digest.to_hex()), Some(digest));
        assert_eq!(TokenDigest::from_hex("zz"), None);
        // SHA-256 of "abc".
        assert_eq!(
            TokenDigest::of("abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

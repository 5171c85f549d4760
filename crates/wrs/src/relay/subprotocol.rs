//! The JSON request/reply sub-protocol of `req-repl` and `fan-in-out`.
//!
//! A frame is a JSON object whose `type` is `"request"` or `"reply"`. The
//! service stamps every request it forwards with `origin` = the sender's
//! client id (replacing whatever the client put there); a reply carries the
//! `origin` of the request it answers. Every other field belongs to the
//! application: values are forwarded byte for byte, replies are forwarded
//! unchanged. Pure functions, no I/O.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::ids::ClientId;

/// Deepest nesting of arrays and objects accepted in a sub-protocol frame.
pub const MAX_DEPTH: usize = 128;

/// Why a sub-protocol frame is not forwarded. The sender receives it as an
/// error frame and stays connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Not parseable JSON, or nested deeper than [`MAX_DEPTH`].
    InvalidJson(String),
    /// Valid JSON, but not an object.
    NotAnObject,
    /// `type` missing, not a string, or not `"request"`/`"reply"`.
    InvalidType,
    /// A reply without a string `origin`.
    MissingOrigin,
    /// A reply whose `origin` is not a client connected to the channel.
    UnknownOrigin(String),
    /// A binary frame on a sub-protocol channel.
    BinaryFrame,
}

impl FrameError {
    /// The machine-readable code sent in the error frame.
    pub fn code(&self) -> &'static str {
        match self {
            FrameError::InvalidJson(_) => "invalid_json",
            FrameError::NotAnObject => "not_an_object",
            FrameError::InvalidType => "invalid_type",
            FrameError::MissingOrigin => "missing_origin",
            FrameError::UnknownOrigin(_) => "unknown_origin",
            FrameError::BinaryFrame => "binary_frame",
        }
    }

    /// The error frame sent back to the sender:
    /// `{"type":"error","error":"<code>","message":"<text>"}`.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "type": "error",
            "error": self.code(),
            "message": self.to_string(),
        })
        .to_string()
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::InvalidJson(why) => write!(f, "frame is not valid JSON: {why}"),
            FrameError::NotAnObject => f.write_str("frame must be a JSON object"),
            FrameError::InvalidType => f.write_str(r#"field "type" must be "request" or "reply""#),
            FrameError::MissingOrigin => f.write_str(
                r#"a reply must carry the string field "origin" of the request it answers"#,
            ),
            FrameError::UnknownOrigin(origin) => {
                write!(f, "origin {origin:?} is not connected to this channel")
            }
            FrameError::BinaryFrame => f.write_str(
                "this channel's pattern uses JSON text frames; binary frames are not relayed",
            ),
        }
    }
}

impl std::error::Error for FrameError {}

/// A parsed sub-protocol frame.
#[derive(Debug)]
pub enum Envelope<'a> {
    /// A request, with its fields in their original order.
    Request(Fields<'a>),
    /// A reply addressed to `origin`.
    Reply { origin: ClientId },
}

/// Parses a text frame of the sub-protocol.
///
/// # Errors
///
/// Any [`FrameError`] except `BinaryFrame`.
pub fn parse(text: &str) -> Result<Envelope<'_>, FrameError> {
    check_depth(text)?;
    let fields: Fields<'_> = serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => FrameError::NotAnObject,
        _ => FrameError::InvalidJson(e.to_string()),
    })?;
    // Like `JSON.parse`, the last occurrence of a duplicated key wins.
    let string_field = |name: &str| {
        fields
            .0
            .iter()
            .rev()
            .find(|(key, _)| key == name)
            .map(|(_, raw)| serde_json::from_str::<Cow<'_, str>>(raw.get()).ok())
    };
    match string_field("type").flatten().as_deref() {
        Some("request") => Ok(Envelope::Request(fields)),
        Some("reply") => {
            let origin = string_field("origin")
                .flatten()
                .ok_or(FrameError::MissingOrigin)?;
            ClientId::parse(&origin)
                .map(|origin| Envelope::Reply { origin })
                .ok_or_else(|| FrameError::UnknownOrigin(shorten(&origin)))
        }
        _ => Err(FrameError::InvalidType),
    }
}

/// The fields of a JSON object: keys (unescaped) and raw values, in order.
#[derive(Debug)]
pub struct Fields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl Fields<'_> {
    /// Serialises the request with `origin` set to `origin`: every other
    /// field keeps its position and its value's exact text; any `origin` the
    /// client sent is dropped and the server's is appended.
    pub fn with_origin(&self, origin: ClientId) -> Vec<u8> {
        let size: usize = self
            .0
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum();
        let mut out = Vec::with_capacity(size + 30);
        out.push(b'{');
        for (key, value) in self.0.iter().filter(|(key, _)| key != "origin") {
            // Writing a string into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut out, key.as_ref());
            out.push(b':');
            out.extend_from_slice(value.get().as_bytes());
            out.push(b',');
        }
        out.extend_from_slice(br#""origin":""#);
        let mut id = [0u8; ClientId::TEXT_LEN];
        origin.write_text(&mut id);
        out.extend_from_slice(&id);
        out.extend_from_slice(b"\"}");
        out
    }
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;

        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::new();
                while let Some(Key(key)) = map.next_key()? {
                    let value: &'de RawValue = map.next_value()?;
                    fields.push((key, value));
                }
                Ok(Fields(fields))
            }
        }

        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// An object key, borrowed from the input unless it contains escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }

        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Rejects nesting deeper than [`MAX_DEPTH`] in one linear pass, before any
/// parser builds state proportional to the depth.
fn check_depth(text: &str) -> Result<(), FrameError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in text.as_bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(FrameError::InvalidJson(format!(
                        "nested deeper than {MAX_DEPTH} levels"
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Keeps error messages short when a client sends a huge bogus origin.
fn shorten(text: &str) -> String {
    const MAX: usize = 64;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> ClientId {
        ClientId::parse("ABCD-0123-EF45").unwrap()
    }

    fn stamped(text: &str) -> String {
        match parse(text).unwrap() {
            Envelope::Request(fields) => String::from_utf8(fields.with_origin(origin())).unwrap(),
            other => panic!("not a request: {other:?}"),
        }
    }

    #[test]
    fn requests_get_the_server_origin_and_keep_every_other_field_verbatim() {
        assert_eq!(
            stamped(r#"{"type":"request","payload":{"n": 1.50, "s":"\u00e9"},"z":[1, 2]}"#),
            r#"{"type":"request","payload":{"n": 1.50, "s":"\u00e9"},"z":[1, 2],"origin":"ABCD-0123-EF45"}"#
        );
    }

    #[test]
    fn a_forged_origin_is_replaced() {
        assert_eq!(
            stamped(r#"{"origin":"FFFF-FFFF-FFFF","type":"request","origin":"x"}"#),
            r#"{"type":"request","origin":"ABCD-0123-EF45"}"#
        );
        // An escaped spelling of the key is the same key.
        assert_eq!(
            stamped(r#"{"type":"request","\u006frigin":"FFFF-FFFF-FFFF"}"#),
            r#"{"type":"request","origin":"ABCD-0123-EF45"}"#
        );
    }

    #[test]
    fn stamped_requests_are_valid_json_with_escaped_keys_kept() {
        let text = stamped(r#"{"type":"request","a\"b":1,"tab\t":"x"}"#);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["a\"b"], 1);
        assert_eq!(value["tab\t"], "x");
        assert_eq!(value["origin"], "ABCD-0123-EF45");
    }

    #[test]
    fn replies_name_their_origin() {
        let text = r#"{"type":"reply","origin":"abcd-0123-ef45","payload":"hi"}"#;
        match parse(text).unwrap() {
            Envelope::Reply { origin: o } => assert_eq!(o, origin()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_last_duplicate_type_wins_like_json_parse() {
        assert!(matches!(
            parse(r#"{"type":"reply","type":"request"}"#),
            Ok(Envelope::Request(_))
        ));
    }

    #[test]
    fn bad_frames_get_precise_errors() {
        let cases: &[(&str, &str)] = &[
            ("", "invalid_json"),
            ("hello", "invalid_json"),
            (r#"{"type":"request""#, "invalid_json"),
            (r#"{"type":"request"} trailing"#, "invalid_json"),
            ("[1,2]", "not_an_object"),
            ("\"request\"", "not_an_object"),
            ("42", "not_an_object"),
            ("null", "not_an_object"),
            ("{}", "invalid_type"),
            (r#"{"type":"Request"}"#, "invalid_type"),
            (r#"{"type":7}"#, "invalid_type"),
            (r#"{"type":null}"#, "invalid_type"),
            (r#"{"type":"error"}"#, "invalid_type"),
            (r#"{"type":"reply"}"#, "missing_origin"),
            (r#"{"type":"reply","origin":42}"#, "missing_origin"),
            (r#"{"type":"reply","origin":"nobody"}"#, "unknown_origin"),
        ];
        for (text, code) in cases {
            let err = parse(text).expect_err(text);
            assert_eq!(err.code(), *code, "{text}: {err}");
        }
    }

    #[test]
    fn deep_nesting_is_rejected_without_recursion() {
        let deep = format!(
            r#"{{"type":"request","x":{}{}}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let err = parse(&deep).unwrap_err();
        assert_eq!(err.code(), "invalid_json");
        assert!(err.to_string().contains("nested deeper"), "{err}");
        let top = "[".repeat(10_000);
        assert_eq!(parse(&top).unwrap_err().code(), "invalid_json");
        // Brackets inside strings do not count.
        let stringy = format!(r#"{{"type":"request","x":"{}"}}"#, "[".repeat(1000));
        assert!(matches!(parse(&stringy), Ok(Envelope::Request(_))));
        // Exactly the limit is fine.
        let ok = format!(
            r#"{{"type":"request","x":{}{}}}"#,
            "[".repeat(MAX_DEPTH - 1),
            "]".repeat(MAX_DEPTH - 1)
        );
        assert!(matches!(parse(&ok), Ok(Envelope::Request(_))));
    }

    #[test]
    fn error_frames_have_the_documented_shape() {
        let frame: serde_json::Value =
            serde_json::from_str(&FrameError::MissingOrigin.to_json()).unwrap();
        assert_eq!(frame["type"], "error");
        assert_eq!(frame["error"], "missing_origin");
        assert!(frame["message"].as_str().unwrap().contains("origin"));
        assert_eq!(frame.as_object().unwrap().len(), 3);
    }

    #[test]
    fn long_unknown_origins_are_shortened_in_messages() {
        let text = format!(r#"{{"type":"reply","origin":"{}"}}"#, "x".repeat(10_000));
        match parse(&text).unwrap_err() {
            FrameError::UnknownOrigin(o) => assert_eq!(o.len(), 67),
            other => panic!("{other:?}"),
        }
    }
}

//! The server side of the WebSocket opening handshake (RFC 6455 §4.2):
//! checking the client's upgrade request and computing the accept key.

use axum::http::{HeaderMap, Method, Version, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

/// The GUID every server appends to the client's key (RFC 6455 §1.3).
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Why a request cannot be upgraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Not a WebSocket upgrade request at all (426 Upgrade Required).
    #[error(
        "this endpoint only accepts WebSocket upgrade requests (GET with Connection: Upgrade and Upgrade: websocket)"
    )]
    NotAnUpgrade,
    /// An upgrade for a version other than 13 (426 with the supported version).
    #[error("unsupported Sec-WebSocket-Version; this server speaks version 13")]
    UnsupportedVersion,
    /// A missing or malformed `Sec-WebSocket-Key` (400).
    #[error("missing or malformed Sec-WebSocket-Key header")]
    BadKey,
}

/// Checks an upgrade request and returns the `Sec-WebSocket-Accept` value.
///
/// # Errors
///
/// A [`HandshakeError`] saying what is wrong with the request.
pub fn accept(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Result<String, HandshakeError> {
    let upgrade = has_token(headers, header::UPGRADE, "websocket");
    let connection = has_token(headers, header::CONNECTION, "upgrade");
    if method != Method::GET || version < Version::HTTP_11 || !upgrade || !connection {
        return Err(HandshakeError::NotAnUpgrade);
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err(HandshakeError::UnsupportedVersion);
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|v| v.as_bytes().trim_ascii())
        .ok_or(HandshakeError::BadKey)?;
    match BASE64.decode(key) {
        Ok(nonce) if nonce.len() == 16 => Ok(accept_key(key)),
        _ => Err(HandshakeError::BadKey),
    }
}

/// `base64(sha1(key + GUID))`.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha1 = sha1_smol::Sha1::new();
    sha1.update(key);
    sha1.update(ACCEPT_GUID.as_bytes());
    BASE64.encode(sha1.digest().bytes())
}

/// Whether a comma-separated header contains `token` (case-insensitive),
/// across all its occurrences.
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .to_str()
            .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn upgrade_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        h
    }

    #[test]
    fn computes_the_rfc_example_accept_key() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept(&Method::GET, Version::HTTP_11, &upgrade_headers()),
            Ok("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".to_owned())
        );
    }

    #[test]
    fn rejects_requests_that_are_not_upgrades() {
        let mut plain = upgrade_headers();
        plain.remove(header::UPGRADE);
        assert_eq!(
            accept(&Method::GET, Version::HTTP_11, &plain),
            Err(HandshakeError::NotAnUpgrade)
        );
        let mut no_connection = upgrade_headers();
        no_connection.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        assert_eq!(
            accept(&Method::GET, Version::HTTP_11, &no_connection),
            Err(HandshakeError::NotAnUpgrade)
        );
        assert_eq!(
            accept(&Method::POST, Version::HTTP_11, &upgrade_headers()),
            Err(HandshakeError::NotAnUpgrade)
        );
        assert_eq!(
            accept(&Method::GET, Version::HTTP_10, &upgrade_headers()),
            Err(HandshakeError::NotAnUpgrade)
        );
    }

    #[test]
    fn rejects_other_versions_and_bad_keys() {
        let mut v8 = upgrade_headers();
        v8.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
        assert_eq!(
            accept(&Method::GET, Version::HTTP_11, &v8),
            Err(HandshakeError::UnsupportedVersion)
        );
        for key in ["", "not base64!", "dGhlIHNhbXBsZQ==" /* 10 bytes */] {
            let mut h = upgrade_headers();
            h.insert(
                header::SEC_WEBSOCKET_KEY,
                HeaderValue::from_str(key).unwrap(),
            );
            assert_eq!(
                accept(&Method::GET, Version::HTTP_11, &h),
                Err(HandshakeError::BadKey),
                "{key}"
            );
        }
        let mut missing = upgrade_headers();
        missing.remove(header::SEC_WEBSOCKET_KEY);
        assert_eq!(
            accept(&Method::GET, Version::HTTP_11, &missing),
            Err(HandshakeError::BadKey)
        );
    }

    #[test]
    fn header_tokens_are_case_insensitive() {
        let mut h = upgrade_headers();
        h.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("UPGRADE"));
        assert!(accept(&Method::GET, Version::HTTP_11, &h).is_ok());
    }
}

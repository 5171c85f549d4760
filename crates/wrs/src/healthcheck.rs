//! `wrs healthcheck`: an admin process for container health checks that
//! need no shell tools. It reads the same configuration as the service,
//! asks this node's `/healthz` on loopback (over TLS when `WRS_SSL` is on,
//! with the API token when auth protects the path) and exits 0 only on 200.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Config;

/// The whole probe may take this long.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Probes `path` on this node.
///
/// # Errors
///
/// A one-line reason: not reachable, TLS failed, or a status other than 200.
pub async fn run(config: &Config, path: &str) -> Result<(), String> {
    tokio::time::timeout(TIMEOUT, probe(config, path))
        .await
        .map_err(|_| format!("no answer within {TIMEOUT:?}"))?
}

async fn probe(config: &Config, path: &str) -> Result<(), String> {
    // A wildcard bind address is reached on loopback.
    let host = if config.bind_address.is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        config.bind_address
    };
    let address = SocketAddr::new(host, config.api_port);
    let tcp = TcpStream::connect(address)
        .await
        .map_err(|e| format!("cannot connect to {address}: {e}"))?;
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: wrs-healthcheck\r\n"
    );
    let protected = config.auth && config.auth_resources.protects("GET", path);
    if let (true, Some(token)) = (protected, &config.auth_token) {
        request.push_str(&format!("Authorization: Bearer {}\r\n", token.expose()));
    }
    request.push_str("\r\n");
    let status = if config.ssl {
        // Our own process on loopback: its certificate is not checked
        // (it may well be issued for the public host name only).
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate))
            .with_no_client_auth();
        let name = ServerName::IpAddress(host.into());
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {address} failed: {e}"))?;
        exchange(stream, &request).await?
    } else {
        exchange(tcp, &request).await?
    };
    if status == 200 {
        Ok(())
    } else {
        Err(format!("{path} answered {status}"))
    }
}

/// Sends the request and returns the response's status code.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &str,
) -> Result<u16, String> {
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            format!(
                "not an HTTP response: {:?}",
                line.lines().next().unwrap_or("")
            )
        })
}

/// Accepts any server certificate (loopback probe of this very process).
#[derive(Debug)]
struct AnyCertificate;

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

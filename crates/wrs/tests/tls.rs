//! TLS (SPEC §6, thesis cases 2.1.1 and 2.2.1): REST over HTTPS, connect
//! and echo over WSS, a clean failure for plain HTTP on the TLS port, and
//! clear start-up errors for bad certificate files. Certificates are made
//! at run time with rcgen.

mod common;

use std::sync::Arc;

use common::*;
use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use rustls_pki_types::CertificateDer;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// A self-signed certificate for localhost/127.0.0.1, written to files.
struct Cert {
    dir: tempfile::TempDir,
    pem: String,
    der: Vec<u8>,
}

impl Cert {
    fn new() -> Cert {
        let certified = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), certified.cert.pem()).unwrap();
        std::fs::write(
            dir.path().join("key.pem"),
            certified.signing_key.serialize_pem(),
        )
        .unwrap();
        Cert {
            pem: certified.cert.pem(),
            der: certified.cert.der().to_vec(),
            dir,
        }
    }

    fn configure(&self, config: &mut wrs::Config) {
        config.ssl = true;
        config.ssl_cert_path = Some(self.dir.path().join("cert.pem"));
        config.ssl_key_path = Some(self.dir.path().join("key.pem"));
    }

    /// An HTTPS client that trusts only this certificate.
    fn client(&self) -> reqwest::Client {
        let _ = http_client(); // installs the crypto provider
        reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(self.pem.as_bytes()).unwrap()])
            .build()
            .unwrap()
    }

    fn rustls(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(self.der.clone())).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

async fn tls_server(cert: &Cert) -> TestServer {
    TestServer::with(|c| cert.configure(c)).await
}

/// 2.1.1: the REST API over HTTPS.
#[tokio::test]
async fn tf_2_1_1_rest_over_https() {
    let cert = Cert::new();
    let server = tls_server(&cert).await;
    let https = cert.client();
    let base = format!("https://localhost:{}", server.addr.port());
    let response = https.get(format!("{base}/channels")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let response = https
        .post(format!("{base}/channels"))
        .body(r#"{"pattern":"echo"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["data"]["pattern"], "echo");
    // Links and docs use https and wss.
    let readme = https
        .get(format!("{base}/readme"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        readme.contains(&format!(
            "https://127.0.0.1:{}/channels",
            server.addr.port()
        )),
        "readme links"
    );
    assert!(readme.contains(&format!("wss://127.0.0.1:{}/channels/", server.addr.port())));
    let doc: Value = https
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        doc["servers"][0]["url"],
        format!("https://127.0.0.1:{}", server.addr.port())
    );
}

/// 2.2.1: connect and echo over WSS.
#[tokio::test]
async fn tf_2_2_1_connect_and_echo_over_wss() {
    let cert = Cert::new();
    let server = tls_server(&cert).await;
    let https = cert.client();
    let base = format!("https://localhost:{}", server.addr.port());
    let created: Value = https
        .post(format!("{base}/channels"))
        .body(r#"{"pattern":"pub-sub"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = format!(
        "wss://localhost:{}/channels/{}/connect?token={}",
        server.addr.port(),
        created["data"]["id"].as_str().unwrap(),
        created["token"].as_str().unwrap()
    );
    let connector = || Some(tokio_tungstenite::Connector::Rustls(cert.rustls()));
    let (mut a, _) = bounded(
        "wss",
        tokio_tungstenite::connect_async_tls_with_config(&url, None, false, connector()),
    )
    .await
    .unwrap();
    let (mut b, _) = bounded(
        "wss",
        tokio_tungstenite::connect_async_tls_with_config(&url, None, false, connector()),
    )
    .await
    .unwrap();
    eventually("two clients", || async {
        let body: Value = https
            .get(format!(
                "{base}/channels/{}",
                created["data"]["id"].as_str().unwrap()
            ))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (body["data"]["clients"] == 2).then_some(())
    })
    .await;
    a.send(Message::text("secret hello")).await.unwrap();
    let got = bounded("receive", b.next()).await.unwrap().unwrap();
    assert_eq!(got, Message::text("secret hello"));
    // Large frames too (several TLS records).
    let big = "z".repeat(200_000);
    b.send(Message::text(big.clone())).await.unwrap();
    let got = bounded("receive", a.next()).await.unwrap().unwrap();
    assert_eq!(got.into_text().unwrap().as_str(), big);
}

#[tokio::test]
async fn plain_http_to_the_tls_port_fails_cleanly() {
    let cert = Cert::new();
    let server = tls_server(&cert).await;
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    bounded("answer", stream.read_to_string(&mut answer))
        .await
        .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_error_envelope(&body, "tls_required");
    // A client without the certificate fails the handshake; the server
    // keeps serving.
    let untrusting = http_client();
    assert!(
        untrusting
            .get(format!("https://localhost:{}/healthz", server.addr.port()))
            .send()
            .await
            .is_err()
    );
    let ok = cert
        .client()
        .get(format!("https://localhost:{}/healthz", server.addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
}

#[tokio::test]
async fn bad_certificate_files_stop_the_start_with_a_reason() {
    let cert = Cert::new();
    let missing = tempfile::tempdir().unwrap();
    let mut config = wrs::Config::for_tests();
    config.ssl = true;
    config.ssl_cert_path = Some(missing.path().join("nope.pem"));
    config.ssl_key_path = Some(cert.dir.path().join("key.pem"));
    let error = wrs::start(config).await.unwrap_err().to_string();
    assert!(
        error.contains("cannot read the certificate") && error.contains("nope.pem"),
        "{error}"
    );

    let garbage = missing.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let mut config = wrs::Config::for_tests();
    cert.configure(&mut config);
    config.ssl_key_path = Some(garbage);
    let error = wrs::start(config).await.unwrap_err().to_string();
    assert!(error.contains("cannot read the private key"), "{error}");

    // Certificate and key that do not belong together.
    let other = Cert::new();
    let mut config = wrs::Config::for_tests();
    cert.configure(&mut config);
    config.ssl_key_path = Some(other.dir.path().join("key.pem"));
    let error = wrs::start(config).await.unwrap_err().to_string();
    assert!(error.starts_with("TLS:"), "{error}");
}

#[tokio::test]
async fn public_ssl_makes_links_https_without_serving_tls() {
    let server = TestServer::with(|c| {
        c.public_ssl = true;
        c.domain = "wrs.example".to_owned();
        c.public_api_port = Some(443);
    })
    .await;
    let readme = server
        .http
        .get(server.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(readme.contains("https://wrs.example:443/channels"));
    assert!(readme.contains("wss://wrs.example:443/channels/"));
    let (_, doc) = server.get("/openapi.json").await;
    assert_eq!(doc["servers"][0]["url"], "https://wrs.example:443");
    let (_, service) = server.get("/service").await;
    assert_eq!(service["data"]["name"], "wrs");
}

#[tokio::test]
async fn healthcheck_speaks_tls_to_a_tls_node() {
    let cert = Cert::new();
    let server = tls_server(&cert).await;
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_wrs"))
        .arg("healthcheck")
        .env("WRS_API_PORT", server.addr.port().to_string())
        .env("WRS_SSL", "true")
        .env("WRS_SSL_CERT_PATH", cert.dir.path().join("cert.pem"))
        .env("WRS_SSL_KEY_PATH", cert.dir.path().join("key.pem"))
        .status();
    assert!(bounded("healthcheck", status).await.unwrap().success());
}

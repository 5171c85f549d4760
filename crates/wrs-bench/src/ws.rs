//! A minimal WebSocket client (RFC 6455) made for load generation.
//!
//! It does only what a load generator needs and does it without per-message
//! allocation: the opening handshake (checked, including
//! `Sec-WebSocket-Accept`), masked client frames encoded back to back into
//! one buffer so a whole batch leaves in one `write`, and a decoder that
//! yields every complete frame already read as a borrowed slice. Pings are
//! answered, fragmented messages are reassembled, and a close frame ends
//! the connection.
//!
//! Two options apply to every connection of a run ([`configure`]): `wss://`
//! over rustls (trusting one CA certificate, or verifying nothing: the runs
//! are on loopback), and offering permessage-deflate (RFC 7692), in which
//! case compressed messages (RSV1) are inflated before they are returned.
//! Inflating costs the load generator, not the server under test.
//!
//! A general client such as tokio-tungstenite allocates, validates and
//! wakes per message; with a thousand receivers on one core that cost sits
//! in the load generator, not the server (see `docs/benchmarks.md`).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine;
use flate2::{Decompress, FlushDecompress, Status};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};

use crate::rng::FastRng;

/// The GUID of RFC 6455 §1.3, appended to the key for the accept hash.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest handshake response accepted.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Largest message accepted from a server (inflated size for compressed
/// ones).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// What the client offers with `--deflate`: what browsers offer.
const DEFLATE_OFFER: &str = "permessage-deflate; client_max_window_bits";
/// The empty stored block RFC 7692 §7.2.1 strips from every message.
const DEFLATE_TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];

pub type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// What every connection of this process does on connect.
#[derive(Clone, Default)]
pub struct ClientOptions {
    /// Offer permessage-deflate and inflate compressed messages.
    pub deflate: bool,
    /// For `wss://` URLs; `None` until [`configure`] or the first `wss://`
    /// connect, which then verifies nothing.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

static OPTIONS: OnceLock<ClientOptions> = OnceLock::new();

/// Sets the options of every connection of this process; the first call
/// wins.
pub fn configure(options: ClientOptions) {
    let _ = OPTIONS.set(options);
}

fn options() -> &'static ClientOptions {
    OPTIONS.get_or_init(ClientOptions::default)
}

/// A TLS client configuration: trusting only the certificates of `ca` (a
/// PEM file), or with `None` accepting any certificate (loopback
/// benchmarks only; signatures are still checked).
///
/// # Errors
///
/// The CA file cannot be read or holds no certificate.
pub fn tls_config(ca: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let config = match ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            {
                let cert = cert.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                roots.add(cert)?;
            }
            anyhow::ensure!(!roots.is_empty(), "{}: no certificate", path.display());
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Accepts any server certificate, checking only the handshake
/// signatures.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Opens a TLS session over `tcp` for `host` (`name` or `name:port`).
pub(crate) async fn tls_connect(tcp: TcpStream, host: &str) -> Result<TlsStream, ConnectError> {
    let config = match &options().tls {
        Some(config) => Arc::clone(config),
        None => {
            static ANY: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
            Arc::clone(ANY.get_or_init(|| {
                tls_config(None).expect("the ring provider supports the default versions")
            }))
        }
    };
    let name = host_name(host);
    let server_name = ServerName::try_from(name.to_owned())
        .map_err(|_| ConnectError::BadResponse("host is not a valid TLS server name"))?;
    Ok(tokio_rustls::TlsConnector::from(config)
        .connect(server_name, tcp)
        .await?)
}

/// The host of an authority, without the port (and IPv6 brackets).
fn host_name(authority: &str) -> &str {
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => authority,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Why a connection could not be opened.
#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("connect to {addr}: {source}")]
    Tcp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("handshake I/O: {0}")]
    Io(#[from] io::Error),
    #[error("server answered {status} instead of 101")]
    Refused { status: u16 },
    #[error("server answered {status} instead of 200")]
    NotOk { status: u16 },
    #[error("malformed handshake response: {0}")]
    BadResponse(&'static str),
    #[error("connect timed out")]
    Timeout,
}

/// A frame the server broke the protocol with.
#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("server sent a masked frame")]
    Masked,
    #[error("reserved bits or unknown opcode {0:#x}")]
    BadOpcode(u8),
    #[error("message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
    #[error("continuation frame without a message")]
    StrayContinuation,
    #[error("compressed message that does not inflate: {0}")]
    Inflate(String),
}

/// A `ws://host:port/path` or `wss://` address, resolved once.
#[derive(Clone, Debug)]
pub struct WsUrl {
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// Path and query.
    pub path: String,
    /// Over TLS (`wss://`, `https://`).
    pub tls: bool,
}

impl WsUrl {
    /// Parses `ws://host[:port][/path]` (or `http://`, the same thing for
    /// the handshake; `wss://` and `https://` over TLS) and resolves the
    /// host.
    ///
    /// # Errors
    ///
    /// A malformed URL or a host that does not resolve.
    pub async fn parse(url: &str) -> anyhow::Result<Self> {
        let (tls, rest) = if let Some(rest) = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("http://"))
        {
            (false, rest)
        } else if let Some(rest) = url
            .strip_prefix("wss://")
            .or_else(|| url.strip_prefix("https://"))
        {
            (true, rest)
        } else {
            anyhow::bail!("{url}: only ws://, wss://, http:// and https:// URLs are supported");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_owned()
        } else if tls {
            format!("{authority}:443")
        } else {
            format!("{authority}:80")
        };
        let addr = tokio::net::lookup_host(&with_port)
            .await?
            .next()
            .ok_or_else(|| anyhow::anyhow!("{authority} does not resolve"))?;
        Ok(Self {
            addr,
            host: authority.to_owned(),
            path: path.to_owned(),
            tls,
        })
    }

    /// The same server with another path.
    pub fn with_path(&self, path: String) -> Self {
        Self {
            addr: self.addr,
            host: self.host.clone(),
            path,
            tls: self.tls,
        }
    }
}

/// The read side of a connection, plain or TLS.
pub enum ReadHalf {
    Plain(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream>),
}

/// The write side of a connection, plain or TLS.
pub enum WriteHalf {
    Plain(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsStream>),
}

impl WriteHalf {
    /// Writes all of `bytes`.
    ///
    /// # Errors
    ///
    /// I/O errors of the socket or TLS session.
    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            WriteHalf::Plain(w) => w.write_all(bytes).await,
            WriteHalf::Tls(w) => {
                w.write_all(bytes).await?;
                w.flush().await
            }
        }
    }
}

/// Opens a TCP connection, optionally from a given source address.
///
/// # Errors
///
/// Socket, bind or connect failures.
pub async fn tcp_connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> Result<TcpStream, ConnectError> {
    let tcp = |source| ConnectError::Tcp { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(tcp)?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0)).map_err(tcp)?;
    }
    let stream = socket.connect(addr).await.map_err(tcp)?;
    stream.set_nodelay(true).map_err(tcp)?;
    Ok(stream)
}

/// One client connection after a successful handshake.
pub struct WsConn {
    pub read: ReadHalf,
    pub write: WriteHalf,
    pub rx: RxBuf,
    pub tx: TxBuf,
}

impl WsConn {
    /// Connects and performs the opening handshake, all within `timeout`.
    ///
    /// # Errors
    ///
    /// See [`ConnectError`].
    pub async fn connect(
        url: &WsUrl,
        source: Option<IpAddr>,
        timeout: Duration,
        rx_capacity: usize,
    ) -> Result<Self, ConnectError> {
        tokio::time::timeout(timeout, Self::connect_inner(url, source, rx_capacity))
            .await
            .map_err(|_| ConnectError::Timeout)?
    }

    async fn connect_inner(
        url: &WsUrl,
        source: Option<IpAddr>,
        rx_capacity: usize,
    ) -> Result<Self, ConnectError> {
        let stream = tcp_connect(url.addr, source).await?;
        let (mut read, mut write) = if url.tls {
            let (read, write) = tokio::io::split(tls_connect(stream, &url.host).await?);
            (ReadHalf::Tls(read), WriteHalf::Tls(write))
        } else {
            let (read, write) = stream.into_split();
            (ReadHalf::Plain(read), WriteHalf::Plain(write))
        };
        let mut rng = FastRng::seeded();
        let key = base64::engine::general_purpose::STANDARD.encode(rng.bytes16());
        let offer = if options().deflate {
            format!("Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n")
        } else {
            String::new()
        };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n",
            url.path, url.host
        );
        write.write_all(request.as_bytes()).await?;
        let mut rx = RxBuf::new(rx_capacity.max(1024));
        let head_len = loop {
            if rx.fill(&mut read).await? == 0 {
                return Err(ConnectError::BadResponse(
                    "connection closed during handshake",
                ));
            }
            if let Some(end) = memchr::memmem::find(rx.pending(), b"\r\n\r\n") {
                break end + 4;
            }
            if rx.pending().len() > MAX_RESPONSE_HEAD {
                return Err(ConnectError::BadResponse("response head too large"));
            }
        };
        let deflate = check_response(&rx.pending()[..head_len], &key, options().deflate)?;
        rx.consume(head_len);
        rx.inflate = deflate.map(Inflate::new);
        Ok(Self {
            read,
            write,
            rx,
            tx: TxBuf::new(rng),
        })
    }

    /// Waits for data and reads what is there into the receive buffer.
    /// Returns 0 at end of stream. Cancel-safe.
    ///
    /// # Errors
    ///
    /// I/O errors of the socket.
    pub async fn fill(&mut self) -> io::Result<usize> {
        self.rx.fill(&mut self.read).await
    }

    /// Whether permessage-deflate was negotiated.
    pub fn deflate(&self) -> bool {
        self.rx.inflate.is_some()
    }

    /// Writes every queued frame.
    ///
    /// # Errors
    ///
    /// I/O errors of the socket.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.tx.flush(&mut self.write).await
    }
}

/// Checks the status line, `Sec-WebSocket-Accept` and
/// `Sec-WebSocket-Extensions` of a handshake response head (which ends
/// with the empty line). Returns, when permessage-deflate was negotiated,
/// whether the server said `server_no_context_takeover`.
fn check_response(head: &[u8], key: &str, offered: bool) -> Result<Option<bool>, ConnectError> {
    let text = std::str::from_utf8(head).map_err(|_| ConnectError::BadResponse("not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or(ConnectError::BadResponse("no status code"))?;
    if status != 101 {
        return Err(ConnectError::Refused { status });
    }
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(ACCEPT_GUID.as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes());
    let headers: Vec<(&str, &str)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim(), value.trim()))
        .collect();
    let accept = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|(_, value)| *value)
        .ok_or(ConnectError::BadResponse("no Sec-WebSocket-Accept"))?;
    if accept != expected {
        return Err(ConnectError::BadResponse("wrong Sec-WebSocket-Accept"));
    }
    let mut deflate = None;
    for (_, value) in headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("sec-websocket-extensions"))
    {
        for extension in value.split(',') {
            let mut params = extension.split(';').map(str::trim);
            if params.next() != Some("permessage-deflate") || !offered || deflate.is_some() {
                return Err(ConnectError::BadResponse(
                    "an extension that was not offered",
                ));
            }
            let mut no_takeover = false;
            for param in params {
                match param.split_once('=').map_or(param, |(name, _)| name).trim() {
                    "server_no_context_takeover" => no_takeover = true,
                    "client_no_context_takeover"
                    | "server_max_window_bits"
                    | "client_max_window_bits" => {}
                    _ => {
                        return Err(ConnectError::BadResponse(
                            "unknown permessage-deflate parameter",
                        ));
                    }
                }
            }
            deflate = Some(no_takeover);
        }
    }
    Ok(deflate)
}

/// Inflates compressed messages (RFC 7692 §7.2.2).
struct Inflate {
    /// Allocated at the first compressed message: an idle connection
    /// holds no inflater.
    state: Option<Box<Decompress>>,
    /// The server compresses every message on its own
    /// (`server_no_context_takeover`): start each one afresh.
    reset_each: bool,
    out: Vec<u8>,
}

impl Inflate {
    fn new(reset_each: bool) -> Self {
        Self {
            state: None,
            reset_each,
            out: Vec::new(),
        }
    }

    /// Inflates one message's payload (without the stripped tail).
    fn inflate(&mut self, input: &[u8]) -> Result<&[u8], ProtocolError> {
        let state = self
            .state
            .get_or_insert_with(|| Box::new(Decompress::new(false)));
        self.out.clear();
        let mut ended = false;
        for chunk in [input, &DEFLATE_TAIL[..]] {
            let mut at = 0;
            while !ended {
                if self.out.len() == self.out.capacity() {
                    if self.out.len() >= MAX_MESSAGE {
                        return Err(ProtocolError::TooLarge);
                    }
                    self.out.reserve((input.len() * 4).max(4096));
                }
                let (in_before, out_before) = (state.total_in(), self.out.len());
                let status = state
                    .decompress_vec(&chunk[at..], &mut self.out, FlushDecompress::Sync)
                    .map_err(|e| ProtocolError::Inflate(e.to_string()))?;
                at += (state.total_in() - in_before) as usize;
                ended = status == Status::StreamEnd;
                let stalled = self.out.len() == out_before && state.total_in() == in_before;
                if (at == chunk.len() && self.out.len() < self.out.capacity()) || stalled {
                    break;
                }
            }
        }
        if self.out.len() > MAX_MESSAGE {
            return Err(ProtocolError::TooLarge);
        }
        if self.reset_each || ended {
            state.reset(false);
        }
        Ok(&self.out)
    }
}

/// A message or close frame received from the server.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Text(&'a [u8]),
    Binary(&'a [u8]),
    Close(Option<u16>),
}

/// The receive side: bytes read but not yet decoded, plus a message being
/// reassembled from fragments.
pub struct RxBuf {
    buf: Vec<u8>,
    /// Start of the undecoded bytes.
    start: usize,
    /// End of the bytes read.
    end: usize,
    capacity: usize,
    fragments: Vec<u8>,
    fragment_opcode: Option<u8>,
    /// Whether the message being reassembled is compressed.
    fragment_compressed: bool,
    /// Frame bytes (headers included) of the message being reassembled.
    fragment_wire: usize,
    /// Frame bytes of the last message returned.
    last_wire: usize,
    /// Whether the last message returned was compressed.
    last_compressed: bool,
    /// Set when permessage-deflate was negotiated.
    inflate: Option<Inflate>,
}

impl RxBuf {
    /// A buffer that reads up to `capacity` bytes at a time. Nothing is
    /// allocated until the first read.
    pub fn new(capacity: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            end: 0,
            capacity,
            fragments: Vec::new(),
            fragment_opcode: None,
            fragment_compressed: false,
            fragment_wire: 0,
            last_wire: 0,
            last_compressed: false,
            inflate: None,
        }
    }

    /// Bytes on the wire of the last message [`Self::next_frame`] returned:
    /// its frames' headers and payloads, compressed as they came.
    pub fn last_wire_bytes(&self) -> usize {
        self.last_wire
    }

    /// Whether the last message returned came compressed.
    pub fn last_compressed(&self) -> bool {
        self.last_compressed
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Makes room for at least `capacity` more bytes (or the rest of a
    /// large frame) and returns the free space.
    fn spare(&mut self) -> &mut [u8] {
        if self.start > 0 && self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let want = self.capacity.max(self.end - self.start + 1024);
        if self.buf.len() - self.end < want / 2 {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.buf.len() - self.end < want / 2 {
                self.buf.resize(self.end + want, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// Waits for readability and reads once. Returns 0 at end of stream.
    ///
    /// # Errors
    ///
    /// I/O errors of the socket.
    pub async fn fill(&mut self, read: &mut ReadHalf) -> io::Result<usize> {
        match read {
            ReadHalf::Plain(read) => loop {
                read.readable().await?;
                match read.try_read(self.spare()) {
                    Ok(n) => {
                        self.end += n;
                        return Ok(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            },
            ReadHalf::Tls(read) => {
                let n = read.read(self.spare()).await?;
                self.end += n;
                Ok(n)
            }
        }
    }

    /// Decodes the next complete message or close frame. Pings are answered
    /// through `tx` (flush it after decoding), pongs are skipped.
    ///
    /// # Errors
    ///
    /// A frame that breaks RFC 6455 for a server.
    pub fn next_frame(&mut self, tx: &mut TxBuf) -> Result<Option<Frame<'_>>, ProtocolError> {
        loop {
            let Some(head) = parse_header(self.pending(), self.inflate.is_some())? else {
                return Ok(None);
            };
            let FrameHead {
                fin,
                compressed,
                opcode,
                header,
                len,
            } = head;
            let at = self.start + header;
            self.consume(header + len);
            let payload = at..at + len;
            if compressed && !matches!(opcode, 0x1 | 0x2) {
                return Err(ProtocolError::BadOpcode(opcode | 0x40));
            }
            match opcode {
                0x0 => {
                    let Some(first) = self.fragment_opcode else {
                        return Err(ProtocolError::StrayContinuation);
                    };
                    if self.fragments.len() + len > MAX_MESSAGE {
                        return Err(ProtocolError::TooLarge);
                    }
                    self.fragments.extend_from_slice(&self.buf[payload]);
                    self.fragment_wire += header + len;
                    if fin {
                        self.fragment_opcode = None;
                        self.last_wire = self.fragment_wire;
                        self.last_compressed = self.fragment_compressed;
                        return self.finish(first, None);
                    }
                }
                0x1 | 0x2 if fin => {
                    if self.fragment_opcode.is_some() {
                        return Err(ProtocolError::StrayContinuation);
                    }
                    self.last_wire = header + len;
                    self.last_compressed = compressed;
                    return self.finish(opcode, Some(payload));
                }
                0x1 | 0x2 => {
                    self.fragments.clear();
                    self.fragments.extend_from_slice(&self.buf[payload]);
                    self.fragment_opcode = Some(opcode);
                    self.fragment_compressed = compressed;
                    self.fragment_wire = header + len;
                }
                0x8 => {
                    let body = &self.buf[payload];
                    let code = (body.len() >= 2).then(|| u16::from_be_bytes([body[0], body[1]]));
                    return Ok(Some(Frame::Close(code)));
                }
                0x9 => {
                    tx.push(0xA, &self.buf[payload]);
                }
                0xA => {}
                other => return Err(ProtocolError::BadOpcode(other)),
            }
        }
    }

    /// The message just completed: `payload` in the read buffer (a single
    /// frame) or the reassembled fragments, inflated when compressed.
    fn finish(
        &mut self,
        opcode: u8,
        payload: Option<std::ops::Range<usize>>,
    ) -> Result<Option<Frame<'_>>, ProtocolError> {
        let bytes = match &payload {
            Some(range) => &self.buf[range.clone()],
            None => &self.fragments[..],
        };
        if !self.last_compressed {
            return Ok(Some(message(opcode, bytes)));
        }
        let inflate = self
            .inflate
            .as_mut()
            .ok_or(ProtocolError::BadOpcode(opcode | 0x40))?;
        Ok(Some(message(opcode, inflate.inflate(bytes)?)))
    }
}

fn message(opcode: u8, payload: &[u8]) -> Frame<'_> {
    if opcode == 0x1 {
        Frame::Text(payload)
    } else {
        Frame::Binary(payload)
    }
}

/// A server frame's header.
struct FrameHead {
    fin: bool,
    /// RSV1: a compressed message (permessage-deflate only).
    compressed: bool,
    opcode: u8,
    /// Header length.
    header: usize,
    /// Payload length.
    len: usize,
}

/// Parses a server frame header, or `None` until the whole frame is
/// buffered. RSV1 is allowed only when `deflate` was negotiated.
fn parse_header(bytes: &[u8], deflate: bool) -> Result<Option<FrameHead>, ProtocolError> {
    if bytes.len() < 2 {
        return Ok(None);
    }
    let fin = bytes[0] & 0x80 != 0;
    let reserved = if deflate { 0x30 } else { 0x70 };
    if bytes[0] & reserved != 0 {
        return Err(ProtocolError::BadOpcode(bytes[0]));
    }
    let compressed = bytes[0] & 0x40 != 0;
    let opcode = bytes[0] & 0x0F;
    if bytes[1] & 0x80 != 0 {
        return Err(ProtocolError::Masked);
    }
    let (header, len) = match bytes[1] & 0x7F {
        126 => {
            if bytes.len() < 4 {
                return Ok(None);
            }
            (4, usize::from(u16::from_be_bytes([bytes[2], bytes[3]])))
        }
        127 => {
            if bytes.len() < 10 {
                return Ok(None);
            }
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&bytes[2..10]);
            let len = u64::from_be_bytes(raw);
            (10, usize::try_from(len).unwrap_or(usize::MAX))
        }
        n => (2, usize::from(n)),
    };
    if len > MAX_MESSAGE {
        return Err(ProtocolError::TooLarge);
    }
    if bytes.len() < header + len {
        return Ok(None);
    }
    Ok(Some(FrameHead {
        fin,
        compressed,
        opcode,
        header,
        len,
    }))
}

/// The send side: masked frames queued back to back.
pub struct TxBuf {
    out: Vec<u8>,
    rng: FastRng,
}

impl TxBuf {
    pub fn new(rng: FastRng) -> Self {
        Self {
            out: Vec::new(),
            rng,
        }
    }

    /// Queues a text frame.
    pub fn text(&mut self, payload: &[u8]) {
        self.push(0x1, payload);
    }

    /// Queues a close frame with a code.
    pub fn close(&mut self, code: u16) {
        self.push(0x8, &code.to_be_bytes());
    }

    /// Queues a final frame with this opcode, masked.
    pub fn push(&mut self, opcode: u8, payload: &[u8]) {
        let len = payload.len();
        self.out.push(0x80 | opcode);
        if len < 126 {
            self.out.push(0x80 | len as u8);
        } else if len <= usize::from(u16::MAX) {
            self.out.push(0x80 | 126);
            self.out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.out.push(0x80 | 127);
            self.out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let mask = self.rng.next_u32().to_ne_bytes();
        self.out.extend_from_slice(&mask);
        let start = self.out.len();
        self.out.extend_from_slice(payload);
        for (i, byte) in self.out[start..].iter_mut().enumerate() {
            *byte ^= mask[i & 3];
        }
    }

    /// Everything queued, taken out (tests).
    #[cfg(test)]
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Drops everything queued.
    pub fn clear(&mut self) {
        self.out.clear();
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// Writes everything queued and empties the queue.
    ///
    /// # Errors
    ///
    /// I/O errors of the socket.
    pub async fn flush(&mut self, write: &mut WriteHalf) -> io::Result<()> {
        if !self.out.is_empty() {
            write.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unmask(frame: &[u8]) -> (u8, Vec<u8>) {
        let opcode = frame[0] & 0x0F;
        let len = usize::from(frame[1] & 0x7F);
        assert!(len < 126);
        let mask = &frame[2..6];
        let payload = frame[6..6 + len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i & 3])
            .collect();
        (opcode, payload)
    }

    fn rx_with(bytes: &[u8]) -> RxBuf {
        let mut rx = RxBuf::new(1024);
        let spare = rx.spare();
        spare[..bytes.len()].copy_from_slice(bytes);
        rx.end += bytes.len();
        rx
    }

    #[test]
    fn encodes_masked_frames_back_to_back() {
        let mut tx = TxBuf::new(FastRng::new(7));
        tx.text(b"hello");
        tx.text(b"world!");
        assert_eq!(tx.out.len(), 6 + 5 + 6 + 6);
        let (op, payload) = unmask(&tx.out[..11]);
        assert_eq!((op, payload.as_slice()), (1, &b"hello"[..]));
        let (op, payload) = unmask(&tx.out[11..]);
        assert_eq!((op, payload.as_slice()), (1, &b"world!"[..]));
    }

    #[test]
    fn encodes_extended_lengths() {
        let mut tx = TxBuf::new(FastRng::new(1));
        tx.text(&[b'a'; 300]);
        assert_eq!(&tx.out[..4], &[0x81, 0x80 | 126, 1, 44]);
        assert_eq!(tx.out.len(), 4 + 4 + 300);
    }

    #[test]
    fn decodes_frames_and_waits_for_partial_ones() {
        let mut tx = TxBuf::new(FastRng::new(1));
        let mut rx = rx_with(&[0x81, 2, b'h', b'i', 0x82, 1, 7, 0x81, 5, b'x']);
        assert_eq!(rx.next_frame(&mut tx).unwrap(), Some(Frame::Text(b"hi")));
        assert_eq!(rx.next_frame(&mut tx).unwrap(), Some(Frame::Binary(&[7])));
        assert_eq!(rx.next_frame(&mut tx).unwrap(), None);
    }

    #[test]
    fn answers_pings_and_reassembles_fragments() {
        let mut tx = TxBuf::new(FastRng::new(1));
        let mut rx = rx_with(&[
            0x01, 2, b'a', b'b', // first fragment
            0x89, 1, b'p', // ping in between
            0x80, 1, b'c', // last fragment
            0x88, 2, 0x0F, 0xA1, // close 4001
        ]);
        assert_eq!(rx.next_frame(&mut tx).unwrap(), Some(Frame::Text(b"abc")));
        assert_eq!(unmask(&tx.out), (0xA, b"p".to_vec()));
        assert_eq!(
            rx.next_frame(&mut tx).unwrap(),
            Some(Frame::Close(Some(4001)))
        );
    }

    #[test]
    fn rejects_masked_server_frames() {
        let mut tx = TxBuf::new(FastRng::new(1));
        let mut rx = rx_with(&[0x81, 0x81, 0, 0, 0, 0, b'x']);
        assert!(matches!(rx.next_frame(&mut tx), Err(ProtocolError::Masked)));
    }

    #[test]
    fn checks_the_accept_header() {
        // The example of RFC 6455 §1.3.
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let good = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                    Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert!(check_response(good.as_bytes(), key, false).is_ok());
        let wrong = good.replace("s3pP", "AAAA");
        assert!(matches!(
            check_response(wrong.as_bytes(), key, false),
            Err(ConnectError::BadResponse(_))
        ));
        let refused = "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
        assert!(matches!(
            check_response(refused.as_bytes(), key, false),
            Err(ConnectError::Refused { status: 404 })
        ));
    }

    /// Raw deflate of each message with one compressor, flushed with
    /// SYNC and the tail stripped (RFC 7692 §7.2.1); `reset` starts each
    /// message afresh (no context takeover).
    fn deflate(messages: &[&[u8]], reset: bool) -> Vec<Vec<u8>> {
        let mut c = flate2::Compress::new(flate2::Compression::default(), false);
        messages
            .iter()
            .map(|m| {
                if reset {
                    c.reset();
                }
                let mut out = Vec::with_capacity(m.len() + 64);
                c.compress_vec(m, &mut out, flate2::FlushCompress::Sync)
                    .unwrap();
                assert!(out.ends_with(&DEFLATE_TAIL));
                out.truncate(out.len() - 4);
                out
            })
            .collect()
    }

    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mut f = vec![first, payload.len() as u8];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn inflates_compressed_messages_and_counts_their_wire_bytes() {
        let text = br#"{"services":[{"name":"api","rps":12.5},{"name":"api","rps":13.5}]}"#;
        let compressed = deflate(&[text, text], true);
        let mut bytes = frame(0xC1, &compressed[0]); // FIN + RSV1 + text
        bytes.extend(frame(0x81, b"plain"));
        bytes.extend(frame(0xC1, &compressed[1]));
        let mut rx = rx_with(&bytes);
        rx.inflate = Some(Inflate::new(true));
        let mut tx = TxBuf::new(FastRng::new(1));
        assert_eq!(
            rx.next_frame(&mut tx).unwrap(),
            Some(Frame::Text(&text[..]))
        );
        assert!(rx.last_compressed());
        assert_eq!(rx.last_wire_bytes(), 2 + compressed[0].len());
        assert!(rx.last_wire_bytes() < text.len());
        assert_eq!(rx.next_frame(&mut tx).unwrap(), Some(Frame::Text(b"plain")));
        assert!(!rx.last_compressed());
        assert_eq!(rx.last_wire_bytes(), 7);
        assert_eq!(
            rx.next_frame(&mut tx).unwrap(),
            Some(Frame::Text(&text[..]))
        );
    }

    #[test]
    fn inflates_fragmented_messages_and_context_takeover() {
        let one = b"the same words again and again and again";
        let two = b"the same words again and again, and once more";
        let compressed = deflate(&[one, two], false);
        // The first message in two fragments: RSV1 on the first only.
        let (a, b) = compressed[0].split_at(5);
        let mut bytes = frame(0x41, a);
        bytes.extend(frame(0x80, b));
        bytes.extend(frame(0xC1, &compressed[1]));
        let mut rx = rx_with(&bytes);
        rx.inflate = Some(Inflate::new(false));
        let mut tx = TxBuf::new(FastRng::new(1));
        assert_eq!(rx.next_frame(&mut tx).unwrap(), Some(Frame::Text(&one[..])));
        assert_eq!(rx.last_wire_bytes(), 4 + compressed[0].len());
        // The second refers back to the first: the context is kept.
        assert_eq!(rx.next_frame(&mut tx).unwrap(), Some(Frame::Text(&two[..])));
    }

    #[test]
    fn refuses_rsv1_without_deflate_and_garbage_with_it() {
        let mut tx = TxBuf::new(FastRng::new(1));
        let mut rx = rx_with(&frame(0xC1, b"xx"));
        assert!(matches!(
            rx.next_frame(&mut tx),
            Err(ProtocolError::BadOpcode(_))
        ));
        let mut rx = rx_with(&frame(0xC1, &[0xFF; 8]));
        rx.inflate = Some(Inflate::new(true));
        assert!(matches!(
            rx.next_frame(&mut tx),
            Err(ProtocolError::Inflate(_))
        ));
        // RSV1 on a control frame.
        let mut rx = rx_with(&frame(0xC9, b""));
        rx.inflate = Some(Inflate::new(true));
        assert!(rx.next_frame(&mut tx).is_err());
    }

    #[test]
    fn reads_the_negotiated_extension() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let head = |extensions: &str| {
            format!(
                "HTTP/1.1 101 Switching Protocols\r\n\
                 Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n{extensions}\r\n"
            )
        };
        let wrs = head(
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n",
        );
        assert_eq!(
            check_response(wrs.as_bytes(), key, true).unwrap(),
            Some(true)
        );
        let takeover =
            head("sec-websocket-extensions: permessage-deflate; server_max_window_bits=15\r\n");
        assert_eq!(
            check_response(takeover.as_bytes(), key, true).unwrap(),
            Some(false)
        );
        assert_eq!(
            check_response(head("").as_bytes(), key, true).unwrap(),
            None
        );
        // Not offered, or unknown: refused.
        assert!(check_response(wrs.as_bytes(), key, false).is_err());
        let other = head("Sec-WebSocket-Extensions: x-webkit-deflate-frame\r\n");
        assert!(check_response(other.as_bytes(), key, true).is_err());
    }

    #[test]
    fn parses_tls_urls_and_host_names() {
        assert_eq!(host_name("127.0.0.1:18443"), "127.0.0.1");
        assert_eq!(host_name("localhost"), "localhost");
        assert_eq!(host_name("[::1]:443"), "::1");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let url = runtime
            .block_on(WsUrl::parse("wss://127.0.0.1/sub/x"))
            .unwrap();
        assert!(url.tls);
        assert_eq!(url.addr.port(), 443);
        assert_eq!(url.with_path("/y".into()).path, "/y");
        assert!(url.with_path("/y".into()).tls);
        let plain = runtime.block_on(WsUrl::parse("ws://127.0.0.1:9/")).unwrap();
        assert!(!plain.tls);
    }
}

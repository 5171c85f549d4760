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
//! A general client such as tokio-tungstenite allocates, validates and
//! wakes per message; with a thousand receivers on one core that cost sits
//! in the load generator, not the server (see `docs/benchmarks.md`).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use base64::Engine;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};

use crate::rng::FastRng;

/// The GUID of RFC 6455 §1.3, appended to the key for the accept hash.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest handshake response accepted.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Largest message accepted from a server.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

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
}

/// A `ws://host:port/path` address, resolved once.
#[derive(Clone, Debug)]
pub struct WsUrl {
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// Path and query.
    pub path: String,
}

impl WsUrl {
    /// Parses `ws://host[:port][/path]` (or `http://`, the same thing for
    /// the handshake) and resolves the host.
    ///
    /// # Errors
    ///
    /// A malformed URL or a host that does not resolve.
    pub async fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| anyhow::anyhow!("{url}: only ws:// and http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_owned()
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
        })
    }

    /// The same server with another path.
    pub fn with_path(&self, path: String) -> Self {
        Self {
            addr: self.addr,
            host: self.host.clone(),
            path,
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
    pub read: OwnedReadHalf,
    pub write: OwnedWriteHalf,
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
        let mut rng = FastRng::seeded();
        let key = base64::engine::general_purpose::STANDARD.encode(rng.bytes16());
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            url.path, url.host
        );
        let (read, mut write) = stream.into_split();
        write.write_all(request.as_bytes()).await?;
        let mut rx = RxBuf::new(rx_capacity.max(1024));
        let head_len = loop {
            if rx.fill(&read).await? == 0 {
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
        check_response(&rx.pending()[..head_len], &key)?;
        rx.consume(head_len);
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
        self.rx.fill(&self.read).await
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

/// Checks the status line and `Sec-WebSocket-Accept` of a handshake
/// response head (which ends with the empty line).
fn check_response(head: &[u8], key: &str) -> Result<(), ConnectError> {
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
    let accept = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|(_, value)| value.trim())
        .ok_or(ConnectError::BadResponse("no Sec-WebSocket-Accept"))?;
    if accept != expected {
        return Err(ConnectError::BadResponse("wrong Sec-WebSocket-Accept"));
    }
    Ok(())
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
        }
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
    pub async fn fill(&mut self, read: &OwnedReadHalf) -> io::Result<usize> {
        loop {
            read.readable().await?;
            match read.try_read(self.spare()) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
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
            let Some((fin, opcode, header, len)) = parse_header(self.pending())? else {
                return Ok(None);
            };
            let at = self.start + header;
            self.consume(header + len);
            let payload = at..at + len;
            match opcode {
                0x0 => {
                    let Some(first) = self.fragment_opcode else {
                        return Err(ProtocolError::StrayContinuation);
                    };
                    if self.fragments.len() + len > MAX_MESSAGE {
                        return Err(ProtocolError::TooLarge);
                    }
                    self.fragments.extend_from_slice(&self.buf[payload]);
                    if fin {
                        self.fragment_opcode = None;
                        return Ok(Some(message(first, &self.fragments)));
                    }
                }
                0x1 | 0x2 if fin => {
                    if self.fragment_opcode.is_some() {
                        return Err(ProtocolError::StrayContinuation);
                    }
                    return Ok(Some(message(opcode, &self.buf[payload])));
                }
                0x1 | 0x2 => {
                    self.fragments.clear();
                    self.fragments.extend_from_slice(&self.buf[payload]);
                    self.fragment_opcode = Some(opcode);
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
}

fn message(opcode: u8, payload: &[u8]) -> Frame<'_> {
    if opcode == 0x1 {
        Frame::Text(payload)
    } else {
        Frame::Binary(payload)
    }
}

/// Parses a server frame header: `(fin, opcode, header length, payload
/// length)`, or `None` until the whole frame is buffered.
fn parse_header(bytes: &[u8]) -> Result<Option<(bool, u8, usize, usize)>, ProtocolError> {
    if bytes.len() < 2 {
        return Ok(None);
    }
    let fin = bytes[0] & 0x80 != 0;
    if bytes[0] & 0x70 != 0 {
        return Err(ProtocolError::BadOpcode(bytes[0]));
    }
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
    Ok(Some((fin, opcode, header, len)))
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
    pub async fn flush(&mut self, write: &mut OwnedWriteHalf) -> io::Result<()> {
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
        assert!(check_response(good.as_bytes(), key).is_ok());
        let wrong = good.replace("s3pP", "AAAA");
        assert!(matches!(
            check_response(wrong.as_bytes(), key),
            Err(ConnectError::BadResponse(_))
        ));
        let refused = "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
        assert!(matches!(
            check_response(refused.as_bytes(), key),
            Err(ConnectError::Refused { status: 404 })
        ));
    }
}

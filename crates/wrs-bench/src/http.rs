//! A minimal HTTP/1.1 keep-alive client for the WRS REST API.
//!
//! One connection, one request at a time, bodies framed by
//! `Content-Length` (or chunked). That is all `POST /channels` and
//! `DELETE /channels/{id}` need, and it keeps the churn scenario's cost
//! per request in the server rather than in the client.
//!
//! [`Pipeline`] is the same connection for a publisher that keeps several
//! requests in flight (HTTP/1.1 pipelining): requests written back to
//! back, responses read in order.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::either::Either;

/// A plain or TLS connection.
type Stream = Either<TcpStream, crate::ws::TlsStream>;

/// Largest response head or body accepted.
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum HttpError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    #[error("request timed out")]
    Timeout,
    #[error("TLS: {0}")]
    Tls(#[from] crate::ws::ConnectError),
}

/// A response: status and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// A keep-alive connection that reconnects when the server closed it.
pub struct HttpClient {
    addr: SocketAddr,
    host: String,
    /// HTTPS (see [`crate::ws::configure`] for what is trusted).
    tls: bool,
    stream: Option<Stream>,
    buf: Vec<u8>,
    timeout: Duration,
}

impl HttpClient {
    pub fn new(addr: SocketAddr, host: String, timeout: Duration) -> Self {
        Self {
            addr,
            host,
            tls: false,
            stream: None,
            buf: Vec::with_capacity(4096),
            timeout,
        }
    }

    /// The same client over TLS (`https://`) when `tls` is set.
    pub fn with_tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Sends one request and reads its response, within the timeout.
    ///
    /// # Errors
    ///
    /// I/O errors, a malformed response, or the timeout.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, HttpError> {
        let result = tokio::time::timeout(self.timeout, self.exchange(method, path, body)).await;
        match result {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => {
                self.stream = None;
                Err(error)
            }
            Err(_) => {
                self.stream = None;
                Err(HttpError::Timeout)
            }
        }
    }

    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, HttpError> {
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        if let Some(body) = body {
            request.push_str("Content-Type: application/json\r\n");
            request.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        let mut wire = request.into_bytes();
        wire.extend_from_slice(body.unwrap_or_default());
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.addr).await?;
            stream.set_nodelay(true)?;
            self.stream = Some(if self.tls {
                Either::Right(crate::ws::tls_connect(stream, &self.host).await?)
            } else {
                Either::Left(stream)
            });
            self.buf.clear();
        }
        let stream = self.stream.as_mut().expect("connected above");
        stream.write_all(&wire).await?;
        let (response, keep_alive) = read_response(stream, &mut self.buf).await?;
        if !keep_alive {
            self.stream = None;
        }
        Ok(response)
    }
}

/// Reads one response from `stream`; `buf` keeps bytes that arrived after
/// it. Returns the response and whether the connection stays open.
async fn read_response(
    stream: &mut Stream,
    buf: &mut Vec<u8>,
) -> Result<(Response, bool), HttpError> {
    let head_end = loop {
        if let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") {
            break end + 4;
        }
        read_more(stream, buf).await?;
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| HttpError::Malformed("head"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(HttpError::Malformed("status line"))?;
    let mut length = None;
    let mut chunked = false;
    let mut keep_alive = status_line.starts_with("HTTP/1.1");
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| HttpError::Malformed("content-length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            keep_alive = !value.eq_ignore_ascii_case("close");
        }
    }
    buf.drain(..head_end);
    let body = if chunked {
        read_chunked(stream, buf).await?
    } else if let Some(length) = length {
        if length > MAX_RESPONSE {
            return Err(HttpError::Malformed("body too large"));
        }
        while buf.len() < length {
            read_more(stream, buf).await?;
        }
        buf.drain(..length).collect()
    } else {
        // Body until the connection closes.
        keep_alive = false;
        loop {
            match read_more(stream, buf).await {
                Ok(()) => {}
                Err(HttpError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
        }
        std::mem::take(buf)
    };
    Ok((Response { status, body }, keep_alive))
}

async fn read_chunked(stream: &mut Stream, buf: &mut Vec<u8>) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(end) = memchr::memmem::find(buf, b"\r\n") {
                break end;
            }
            read_more(stream, buf).await?;
        };
        let size_text = std::str::from_utf8(&buf[..line_end])
            .map_err(|_| HttpError::Malformed("chunk size"))?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| HttpError::Malformed("chunk size"))?;
        if body.len() + size > MAX_RESPONSE {
            return Err(HttpError::Malformed("body too large"));
        }
        buf.drain(..line_end + 2);
        while buf.len() < size + 2 {
            read_more(stream, buf).await?;
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
        if size == 0 {
            return Ok(body);
        }
    }
}

async fn read_more(stream: &mut Stream, buf: &mut Vec<u8>) -> Result<(), HttpError> {
    if buf.len() > MAX_RESPONSE {
        return Err(HttpError::Malformed("response too large"));
    }
    buf.reserve(4096);
    if stream.read_buf(buf).await? == 0 {
        return Err(HttpError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}

/// One keep-alive connection carrying requests the caller encodes; the
/// responses are read in the order the requests were sent. Reconnects
/// (counting it) when a request is sent after the server closed.
pub struct Pipeline {
    addr: SocketAddr,
    host: String,
    tls: bool,
    stream: Option<Stream>,
    buf: Vec<u8>,
    /// Connections opened after the first.
    pub reconnects: u64,
}

impl Pipeline {
    /// Opens the connection to `url`'s server within `timeout`.
    ///
    /// # Errors
    ///
    /// TCP or TLS failures, or the timeout.
    pub async fn connect(url: &crate::ws::WsUrl, timeout: Duration) -> Result<Self, HttpError> {
        let mut pipeline = Self {
            addr: url.addr,
            host: url.host.clone(),
            tls: url.tls,
            stream: None,
            buf: Vec::with_capacity(16 * 1024),
            reconnects: 0,
        };
        tokio::time::timeout(timeout, pipeline.open())
            .await
            .map_err(|_| HttpError::Timeout)??;
        Ok(pipeline)
    }

    /// The `Host` header value.
    pub fn host(&self) -> &str {
        &self.host
    }

    async fn open(&mut self) -> Result<(), HttpError> {
        let stream = TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        self.stream = Some(if self.tls {
            Either::Right(crate::ws::tls_connect(stream, &self.host).await?)
        } else {
            Either::Left(stream)
        });
        self.buf.clear();
        Ok(())
    }

    /// Writes encoded requests, reconnecting first if the connection was
    /// closed.
    ///
    /// # Errors
    ///
    /// I/O errors; the connection is then closed.
    pub async fn send(&mut self, wire: &[u8]) -> Result<(), HttpError> {
        if self.stream.is_none() {
            self.open().await?;
            self.reconnects += 1;
        }
        let stream = self.stream.as_mut().expect("opened above");
        if let Err(error) = stream.write_all(wire).await {
            self.stream = None;
            return Err(error.into());
        }
        Ok(())
    }

    /// Reads the next response. A response that closes the connection
    /// (`Connection: close`) closes it here too: requests sent after it
    /// were not served.
    ///
    /// # Errors
    ///
    /// I/O errors or a malformed response; the connection is then closed.
    pub async fn read_response(&mut self) -> Result<Response, HttpError> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(HttpError::Io(io::ErrorKind::NotConnected.into()));
        };
        match read_response(stream, &mut self.buf).await {
            Ok((response, keep_alive)) => {
                if !keep_alive {
                    self.stream = None;
                }
                Ok(response)
            }
            Err(error) => {
                self.stream = None;
                Err(error)
            }
        }
    }

    /// Whether the connection is open.
    pub fn is_open(&self) -> bool {
        self.stream.is_some()
    }

    /// Whether a whole `Content-Length` response has been read already,
    /// so that [`Self::read_response`] returns without waiting.
    pub fn response_buffered(&self) -> bool {
        self.stream.is_some() && buffered_response_len(&self.buf).is_some()
    }
}

/// The length of the first response in `buf` if its head and its
/// `Content-Length` body are all there (`None` for chunked bodies).
fn buffered_response_len(buf: &[u8]) -> Option<usize> {
    let head_end = memchr::memmem::find(buf, b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let length = head.split("\r\n").skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    })?;
    (buf.len() >= head_end + length).then_some(head_end + length)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn serve_once(response: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 4096];
            let _ = socket.read(&mut request).await.unwrap();
            socket.write_all(response).await.unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn reads_content_length_bodies() {
        let addr =
            serve_once(b"HTTP/1.1 201 Created\r\ncontent-length: 11\r\n\r\n{\"a\":true}\n").await;
        let mut client = HttpClient::new(addr, "x".into(), Duration::from_secs(5));
        let response = client
            .request("POST", "/channels", Some(b"{}"))
            .await
            .unwrap();
        assert_eq!(response.status, 201);
        assert_eq!(response.body, b"{\"a\":true}\n");
    }

    #[test]
    fn knows_when_a_whole_response_is_buffered() {
        let full = b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}HTTP/1.1";
        assert_eq!(buffered_response_len(full), Some(full.len() - 8));
        assert_eq!(buffered_response_len(&full[..40]), None);
        assert_eq!(
            buffered_response_len(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            None
        );
    }

    #[tokio::test]
    async fn pipelines_requests() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut chunk = vec![0u8; 4096];
            // Two requests, answered together once both are in.
            while memchr::memmem::find_iter(&seen, b"\r\n\r\n").count() < 2 {
                let n = socket.read(&mut chunk).await.unwrap();
                seen.extend_from_slice(&chunk[..n]);
            }
            socket
                .write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 1\r\n\r\naHTTP/1.1 202 Accepted\r\nconnection: close\r\ncontent-length: 1\r\n\r\nb")
                .await
                .unwrap();
        });
        let url = crate::ws::WsUrl::parse(&format!("http://{addr}/p"))
            .await
            .unwrap();
        let mut pipeline = Pipeline::connect(&url, Duration::from_secs(5))
            .await
            .unwrap();
        let request = b"POST /p HTTP/1.1\r\nHost: x\r\ncontent-length: 0\r\n\r\n";
        pipeline
            .send(&[&request[..], &request[..]].concat())
            .await
            .unwrap();
        assert_eq!(pipeline.read_response().await.unwrap().body, b"a");
        assert!(pipeline.response_buffered());
        assert_eq!(pipeline.read_response().await.unwrap().body, b"b");
        assert!(!pipeline.is_open(), "closed by the server");
    }

    #[tokio::test]
    async fn reads_chunked_bodies() {
        let addr = serve_once(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .await;
        let mut client = HttpClient::new(addr, "x".into(), Duration::from_secs(5));
        let response = client.request("GET", "/", None).await.unwrap();
        assert_eq!(response.body, b"abcde");
    }
}

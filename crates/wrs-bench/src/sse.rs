//! A minimal Server-Sent Events client (the WHATWG `text/event-stream`
//! format) made for load generation, the receive-only counterpart of
//! [`crate::ws`].
//!
//! It sends one `GET` with `Accept: text/event-stream`, checks that the
//! answer is `200` with that content type, and then decodes the stream
//! in place: chunked transfer coding (RFC 9112 §7.1) when the server uses
//! it, lines found with memchr, `data:` lines joined with `\n`, `event:`,
//! `id:` and `retry:` fields, comment lines (`:`) counted as keepalives,
//! and an event dispatched at each blank line. Nothing is allocated per
//! event once the buffers have grown.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::ws::{ConnectError, ReadHalf, WriteHalf, WsUrl, tcp_connect, tls_connect};

/// Largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Largest event (all its lines) accepted.
const MAX_EVENT: usize = 16 * 1024 * 1024;

/// Counters of what a stream carried besides events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SseStats {
    /// Comment lines (`:` ...), the server's keepalives.
    pub comments: u64,
    /// The last `retry:` value, in milliseconds.
    pub retry_ms: Option<u64>,
    /// Events that carried a numeric `id:`.
    pub ids: u64,
    /// Numeric ids not greater than the one before.
    pub ids_not_increasing: u64,
    /// Numeric ids more than one above the one before.
    pub id_gaps: u64,
    /// Ids that are not a number (Nchan's `time:tag`, say).
    pub other_ids: u64,
}

/// One dispatched event, borrowed from the connection's buffers.
#[derive(Debug, PartialEq, Eq)]
pub struct Event<'a> {
    /// The `event:` field; empty for the default type, `message`.
    pub name: &'a [u8],
    /// The `data:` lines joined with `\n`.
    pub data: &'a [u8],
    /// Bytes of the event's lines in the stream (without chunk framing).
    pub wire_bytes: usize,
}

impl Event<'_> {
    /// Whether this is a `message` event (no `event:` field, or that name).
    pub fn is_message(&self) -> bool {
        self.name.is_empty() || self.name == b"message"
    }
}

/// Where the chunk decoder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(usize),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// The last chunk was read: the stream is over.
    Done,
}

/// An open event stream.
pub struct SseConn {
    read: ReadHalf,
    /// Kept open: dropping it would end the request for the server.
    _write: WriteHalf,
    buf: Vec<u8>,
    /// Start of the bytes not yet parsed as lines.
    start: usize,
    /// End of the decoded stream bytes (= `end` without chunking).
    decoded: usize,
    /// End of the bytes read.
    end: usize,
    /// How many bytes a read asks for.
    capacity: usize,
    /// `None` without chunked transfer coding.
    chunk: Option<Chunk>,
    /// The event being assembled.
    data: Vec<u8>,
    data_lines: usize,
    name: Vec<u8>,
    event_bytes: usize,
    /// Set after an event was returned: its buffers are reset next time.
    dispatched: bool,
    last_id: Option<u64>,
    pub stats: SseStats,
}

impl SseConn {
    /// Connects, sends the request and checks the response head, all
    /// within `timeout`.
    ///
    /// # Errors
    ///
    /// See [`ConnectError`]; a status other than 200 is `NotOk`.
    pub async fn connect(
        url: &WsUrl,
        source: Option<IpAddr>,
        timeout: Duration,
        capacity: usize,
    ) -> Result<Self, ConnectError> {
        tokio::time::timeout(timeout, Self::connect_inner(url, source, capacity))
            .await
            .map_err(|_| ConnectError::Timeout)?
    }

    async fn connect_inner(
        url: &WsUrl,
        source: Option<IpAddr>,
        capacity: usize,
    ) -> Result<Self, ConnectError> {
        let stream = tcp_connect(url.addr, source).await?;
        let (read, mut write) = if url.tls {
            let (read, write) = tokio::io::split(tls_connect(stream, &url.host).await?);
            (ReadHalf::Tls(read), WriteHalf::Tls(write))
        } else {
            let (read, write) = stream.into_split();
            (ReadHalf::Plain(read), WriteHalf::Plain(write))
        };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n",
            url.path, url.host
        );
        write.write_all(request.as_bytes()).await?;
        let mut conn = Self::new(read, write, capacity);
        let head_len = loop {
            if conn.read_raw().await? == 0 {
                return Err(ConnectError::BadResponse(
                    "connection closed before the response head",
                ));
            }
            if let Some(end) = memchr::memmem::find(&conn.buf[..conn.end], b"\r\n\r\n") {
                break end + 4;
            }
            if conn.end > MAX_HEAD {
                return Err(ConnectError::BadResponse("response head too large"));
            }
        };
        let chunked = check_head(&conn.buf[..head_len])?;
        conn.start = head_len;
        conn.decoded = head_len;
        conn.chunk = chunked.then_some(Chunk::Size);
        conn.decode()?;
        Ok(conn)
    }

    fn new(read: ReadHalf, write: WriteHalf, capacity: usize) -> Self {
        Self {
            read,
            _write: write,
            buf: Vec::new(),
            start: 0,
            decoded: 0,
            end: 0,
            capacity: capacity.max(1024),
            chunk: None,
            data: Vec::new(),
            data_lines: 0,
            name: Vec::new(),
            event_bytes: 0,
            dispatched: false,
            last_id: None,
            stats: SseStats::default(),
        }
    }

    /// Waits for data and reads what is there. Returns 0 at the end of the
    /// stream (the connection closed, or the last chunk came). Cancel-safe.
    ///
    /// # Errors
    ///
    /// I/O errors of the socket, malformed chunk framing.
    pub async fn fill(&mut self) -> io::Result<usize> {
        if self.chunk == Some(Chunk::Done) {
            return Ok(0);
        }
        let n = self.read_raw().await?;
        if n > 0 {
            self.decode()?;
            if self.chunk == Some(Chunk::Done) && self.start == self.decoded {
                return Ok(0);
            }
        }
        Ok(n)
    }

    /// Reads once into the free space after `end`.
    async fn read_raw(&mut self) -> io::Result<usize> {
        self.make_room();
        let spare = &mut self.buf[self.end..];
        let n = match &mut self.read {
            ReadHalf::Plain(read) => loop {
                read.readable().await?;
                match read.try_read(spare) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            },
            ReadHalf::Tls(read) => read.read(spare).await?,
        };
        self.end += n;
        Ok(n)
    }

    /// Moves the unparsed bytes to the front and grows the buffer so that
    /// at least half of `capacity` is free.
    fn make_room(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.decoded -= self.start;
            self.end -= self.start;
            self.start = 0;
        }
        let want = self.capacity.max(self.end + 1024);
        if self.buf.len() - self.end < want / 2 {
            self.buf.resize(self.end + want, 0);
        }
    }

    /// Decodes chunk framing in place: moves chunk data down to
    /// `decoded`, drops size lines and CRLFs.
    fn decode(&mut self) -> io::Result<()> {
        let Some(mut state) = self.chunk else {
            self.decoded = self.end;
            return Ok(());
        };
        let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_owned());
        // `scan`: the first raw byte not yet decoded; always >= `decoded`.
        let mut scan = self.decoded;
        loop {
            match state {
                Chunk::Done => {
                    scan = self.end;
                    break;
                }
                Chunk::Size => {
                    let Some(at) = memchr::memmem::find(&self.buf[scan..self.end], b"\r\n") else {
                        if self.end - scan > 1024 {
                            return Err(bad("chunk-size line too long"));
                        }
                        break;
                    };
                    let line = &self.buf[scan..scan + at];
                    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
                    let text = std::str::from_utf8(digits).map_err(|_| bad("chunk size"))?;
                    let size =
                        usize::from_str_radix(text.trim(), 16).map_err(|_| bad("chunk size"))?;
                    scan += at + 2;
                    state = if size == 0 {
                        Chunk::Done
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(left) => {
                    let n = left.min(self.end - scan);
                    if n == 0 {
                        break;
                    }
                    self.buf.copy_within(scan..scan + n, self.decoded);
                    self.decoded += n;
                    scan += n;
                    state = if n == left {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - n)
                    };
                }
                Chunk::DataEnd => {
                    if self.end - scan < 2 {
                        break;
                    }
                    if &self.buf[scan..scan + 2] != b"\r\n" {
                        return Err(bad("no CRLF after chunk data"));
                    }
                    scan += 2;
                    state = Chunk::Size;
                }
            }
        }
        // Undecoded raw bytes move down next to the decoded ones, so the
        // next read appends to them.
        let raw = self.end - scan;
        self.buf.copy_within(scan..self.end, self.decoded);
        self.end = self.decoded + raw;
        self.chunk = Some(state);
        Ok(())
    }

    /// The next complete event among the bytes read, or `None` until more
    /// are read.
    ///
    /// # Errors
    ///
    /// An event larger than 16 MiB.
    pub fn next_event(&mut self) -> io::Result<Option<Event<'_>>> {
        if std::mem::take(&mut self.dispatched) {
            self.data.clear();
            self.data_lines = 0;
            self.name.clear();
            self.event_bytes = 0;
        }
        loop {
            let Some(at) = memchr::memchr(b'\n', &self.buf[self.start..self.decoded]) else {
                if self.decoded - self.start + self.event_bytes > MAX_EVENT {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "event larger than 16 MiB",
                    ));
                }
                return Ok(None);
            };
            let line_start = self.start;
            let line_end = line_start + at;
            self.start = line_end + 1;
            self.event_bytes += at + 1;
            let mut line = &self.buf[line_start..line_end];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            if line.is_empty() {
                if self.data_lines == 0 {
                    // Nothing to dispatch (RFC: an event without data is
                    // dropped); its other fields are forgotten.
                    self.name.clear();
                    self.event_bytes = 0;
                    continue;
                }
                self.dispatched = true;
                return Ok(Some(Event {
                    name: &self.name,
                    data: &self.data,
                    wire_bytes: self.event_bytes,
                }));
            }
            if line[0] == b':' {
                self.stats.comments += 1;
                continue;
            }
            let (field, value) = match memchr::memchr(b':', line) {
                Some(i) => {
                    let value = &line[i + 1..];
                    (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (line, &b""[..]),
            };
            match field {
                b"data" => {
                    if self.data_lines > 0 {
                        self.data.push(b'\n');
                    }
                    self.data.extend_from_slice(value);
                    self.data_lines += 1;
                }
                b"event" => {
                    self.name.clear();
                    self.name.extend_from_slice(value);
                }
                b"id" => match parse_u64(value) {
                    Some(id) => {
                        self.stats.ids += 1;
                        match self.last_id {
                            Some(last) if id <= last => self.stats.ids_not_increasing += 1,
                            Some(last) if id > last + 1 => self.stats.id_gaps += 1,
                            _ => {}
                        }
                        self.last_id = Some(id);
                    }
                    None => self.stats.other_ids += 1,
                },
                b"retry" => {
                    if let Some(ms) = parse_u64(value) {
                        self.stats.retry_ms = Some(ms);
                    }
                }
                _ => {}
            }
        }
    }
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &d| {
        d.is_ascii_digit().then(|| acc * 10 + u64::from(d - b'0'))
    })
}

/// Checks the status line and content type of a response head (which
/// ends with the empty line). Returns whether the body is chunked.
fn check_head(head: &[u8]) -> Result<bool, ConnectError> {
    let text = std::str::from_utf8(head).map_err(|_| ConnectError::BadResponse("not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .unwrap_or_default()
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or(ConnectError::BadResponse("no status code"))?;
    if status != 200 {
        return Err(ConnectError::NotOk { status });
    }
    let mut chunked = false;
    let mut event_stream = false;
    for (name, value) in lines.filter_map(|line| line.split_once(':')) {
        let value = value.trim();
        if name.trim().eq_ignore_ascii_case("content-type") {
            event_stream = value
                .split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"));
        } else if name.trim().eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
        }
    }
    if !event_stream {
        return Err(ConnectError::BadResponse(
            "content type is not text/event-stream",
        ));
    }
    Ok(chunked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// Serves `parts` one write at a time (with a pause in between, so
    /// the client sees them split) on one connection.
    async fn serve(parts: Vec<&'static [u8]>) -> WsUrl {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 4096];
            let n = socket.read(&mut request).await.unwrap();
            let request = String::from_utf8_lossy(&request[..n]).to_string();
            assert!(request.starts_with("GET /events?token=t HTTP/1.1\r\n"));
            assert!(request.contains("Accept: text/event-stream\r\n"));
            for part in parts {
                socket.write_all(part).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        WsUrl::parse(&format!("http://{addr}/events?token=t"))
            .await
            .unwrap()
    }

    /// Every event until the end of the stream, as (name, data).
    async fn events(conn: &mut SseConn) -> Vec<(String, String)> {
        let mut out = Vec::new();
        loop {
            while let Some(event) = conn.next_event().unwrap() {
                out.push((
                    String::from_utf8_lossy(event.name).into_owned(),
                    String::from_utf8_lossy(event.data).into_owned(),
                ));
            }
            if conn.fill().await.unwrap() == 0 {
                while let Some(event) = conn.next_event().unwrap() {
                    out.push((
                        String::from_utf8_lossy(event.name).into_owned(),
                        String::from_utf8_lossy(event.data).into_owned(),
                    ));
                }
                return out;
            }
        }
    }

    #[tokio::test]
    async fn reads_a_plain_stream_split_anywhere() {
        let url = serve(vec![
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n\r\n: hi\n\nretry: 2000\n",
            b"id: 1\ndata: one\n\nid: 2\nda",
            b"ta: two\r\ndata: lines\r\n\r\n: keepalive\n\nid: 4\n",
            b"data: three\n\nevent: close\ndata: {\"code\":4001}\n\n",
        ])
        .await;
        let mut conn = SseConn::connect(&url, None, Duration::from_secs(5), 1024)
            .await
            .unwrap();
        let got = events(&mut conn).await;
        assert_eq!(
            got,
            vec![
                (String::new(), "one".into()),
                (String::new(), "two\nlines".into()),
                (String::new(), "three".into()),
                ("close".into(), "{\"code\":4001}".into()),
            ]
        );
        assert_eq!(conn.stats.comments, 2);
        assert_eq!(conn.stats.retry_ms, Some(2000));
        assert_eq!(conn.stats.ids, 3);
        assert_eq!(conn.stats.id_gaps, 1, "4 after 2");
        assert_eq!(conn.stats.ids_not_increasing, 0);
    }

    #[tokio::test]
    async fn decodes_chunked_streams() {
        let url = serve(vec![
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
            b"a\r\ndata: abc\n\r\n5\r\n\nda",
            b"ta\r",
            b"\n6\r\n: xyz\n\r",
            b"\n4\r\n: x\n\r\n1",
            b"\r\n\n\r\n0\r\n\r\n",
        ])
        .await;
        let mut conn = SseConn::connect(&url, None, Duration::from_secs(5), 1024)
            .await
            .unwrap();
        let got = events(&mut conn).await;
        assert_eq!(
            got,
            vec![(String::new(), "abc".into()), (String::new(), "xyz".into())]
        );
        assert_eq!(conn.stats.comments, 1);
    }

    #[tokio::test]
    async fn refuses_other_statuses_and_types() {
        let url = serve(vec![b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"]).await;
        let refused = SseConn::connect(&url, None, Duration::from_secs(5), 1024).await;
        assert!(matches!(refused, Err(ConnectError::NotOk { status: 404 })));
        let url = serve(vec![b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n"]).await;
        let wrong = SseConn::connect(&url, None, Duration::from_secs(5), 1024).await;
        assert!(matches!(wrong, Err(ConnectError::BadResponse(_))));
    }

    #[test]
    fn parses_ids_and_retry_values() {
        let numbers = [b"12" as &[u8], b"", b"x1", b"18446744073709551615"];
        assert_eq!(parse_u64(numbers[0]), Some(12));
        assert_eq!(parse_u64(numbers[1]), None);
        assert_eq!(parse_u64(numbers[2]), None);
        assert_eq!(parse_u64(numbers[3]), None, "too long");
    }
}

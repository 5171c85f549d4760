//! `wrs-bench relay`: a copy-only broadcast relay, the floor under the
//! figures of real relays.
//!
//! Every data frame a client sends goes, unmasked, to every client
//! connected (the sender included, whatever the path): one tokio
//! broadcast channel, one writer task per client that writes everything
//! queued in one `write`. No extensions, no per-message state, no
//! validation beyond framing. Run on the server core with the load
//! generator on the other, it shows what the load generator and the
//! loopback cost by themselves: a relay cannot do less.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

/// Frames queued per client before it lags (and loses them).
const QUEUE: usize = 4096;
/// Largest handshake request accepted.
const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// Largest client frame accepted.
const MAX_FRAME: usize = 16 * 1024 * 1024;

#[derive(Args, Clone, Debug)]
pub struct RelayArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18083")]
    pub listen: SocketAddr,
}

/// Serves until the process is killed.
///
/// # Errors
///
/// The address cannot be bound.
pub async fn serve(args: &RelayArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    let (frames_tx, _) = broadcast::channel::<Arc<[u8]>>(QUEUE);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of descriptors, say: wait a little and go on.
                eprintln!("wrs-bench relay: accept: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let frames_tx = frames_tx.clone();
        tokio::spawn(async move {
            let _ = connection(stream, frames_tx).await;
        });
    }
}

async fn connection(
    mut stream: TcpStream,
    frames_tx: broadcast::Sender<Arc<[u8]>>,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    let head_len = loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        if let Some(end) = memchr::memmem::find(&buf, b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() > MAX_REQUEST_HEAD {
            return Ok(());
        }
    };
    let Some(accept) = accept_key(&buf[..head_len]) else {
        stream
            .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream.write_all(response.as_bytes()).await?;
    buf.drain(..head_len);
    let (mut read, mut write) = stream.into_split();
    let mut frames_rx = frames_tx.subscribe();
    let writer = tokio::spawn(async move {
        let mut out = Vec::new();
        loop {
            match frames_rx.recv().await {
                Ok(frame) => out.extend_from_slice(&frame),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            }
            while let Ok(frame) = frames_rx.try_recv() {
                out.extend_from_slice(&frame);
            }
            if write.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    });
    'read: loop {
        loop {
            match relay_frame(&buf) {
                Decoded::Partial => break,
                Decoded::Invalid => break 'read,
                Decoded::Frame { used, forward } => {
                    buf.drain(..used);
                    match forward {
                        Forward::Data(frame) => {
                            let _ = frames_tx.send(frame.into());
                        }
                        Forward::Close => break 'read,
                        Forward::Nothing => {}
                    }
                }
            }
        }
        if read.read_buf(&mut buf).await? == 0 {
            break;
        }
    }
    writer.abort();
    Ok(())
}

/// `Sec-WebSocket-Accept` for the key of a request head.
fn accept_key(head: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(head).ok()?;
    let key = text
        .split("\r\n")
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("sec-websocket-key"))
        .map(|(_, value)| value.trim())?;
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    Some(base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes()))
}

/// What to do with one client frame.
#[derive(Debug, PartialEq, Eq)]
enum Forward {
    /// A data frame, re-encoded unmasked for every client.
    Data(Vec<u8>),
    Close,
    /// Pings, pongs.
    Nothing,
}

#[derive(Debug, PartialEq, Eq)]
enum Decoded {
    Partial,
    Invalid,
    Frame { used: usize, forward: Forward },
}

/// Decodes the client frame at the start of `bytes`.
fn relay_frame(bytes: &[u8]) -> Decoded {
    if bytes.len() < 2 {
        return Decoded::Partial;
    }
    let (first, opcode) = (bytes[0], bytes[0] & 0x0F);
    if bytes[1] & 0x80 == 0 {
        return Decoded::Invalid; // clients mask
    }
    let (mut at, len) = match bytes[1] & 0x7F {
        126 if bytes.len() >= 4 => (4, usize::from(u16::from_be_bytes([bytes[2], bytes[3]]))),
        127 if bytes.len() >= 10 => {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&bytes[2..10]);
            (
                10,
                usize::try_from(u64::from_be_bytes(raw)).unwrap_or(usize::MAX),
            )
        }
        126 | 127 => return Decoded::Partial,
        n => (2, usize::from(n)),
    };
    if len > MAX_FRAME {
        return Decoded::Invalid;
    }
    if bytes.len() < at + 4 + len {
        return Decoded::Partial;
    }
    let mask = [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]];
    at += 4;
    let used = at + len;
    let forward = match opcode {
        0x0..=0x2 => {
            let mut frame = Vec::with_capacity(len + 10);
            frame.push(first);
            if len < 126 {
                frame.push(len as u8);
            } else if len <= usize::from(u16::MAX) {
                frame.push(126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            } else {
                frame.push(127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
            frame.extend(
                bytes[at..used]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ mask[i & 3]),
            );
            Forward::Data(frame)
        }
        0x8 => Forward::Close,
        _ => Forward::Nothing,
    };
    Decoded::Frame { used, forward }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::FastRng;
    use crate::ws::TxBuf;

    #[test]
    fn unmasks_data_frames_for_the_clients() {
        for len in [5, 300, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut tx = TxBuf::new(FastRng::new(9));
            tx.text(&payload);
            let wire = tx.take();
            let Decoded::Frame { used, forward } = relay_frame(&wire) else {
                panic!("a whole frame");
            };
            assert_eq!(used, wire.len());
            let Forward::Data(frame) = forward else {
                panic!("a data frame");
            };
            let header = frame.len() - len;
            assert_eq!(frame[0], 0x81);
            assert_eq!(&frame[header..], &payload[..]);
            assert_eq!(relay_frame(&wire[..wire.len() - 1]), Decoded::Partial);
        }
    }

    #[test]
    fn closes_on_close_and_refuses_unmasked_frames() {
        let mut tx = TxBuf::new(FastRng::new(1));
        tx.close(1000);
        let wire = tx.take();
        assert_eq!(
            relay_frame(&wire),
            Decoded::Frame {
                used: wire.len(),
                forward: Forward::Close
            }
        );
        assert_eq!(relay_frame(&[0x81, 1, b'x']), Decoded::Invalid);
    }

    #[test]
    fn answers_the_handshake_key() {
        // The example of RFC 6455 §1.3.
        let head = b"GET / HTTP/1.1\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        assert_eq!(
            accept_key(head).as_deref(),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
        assert_eq!(accept_key(b"GET / HTTP/1.1\r\n\r\n"), None);
    }
}

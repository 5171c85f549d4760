//! The write half of a plain TCP connection, writing with `sendmsg(2)`.
//!
//! Tokio's `OwnedWriteHalf` writes with `writev(2)`, which goes through the
//! VFS layer (`fdget_pos`, `vfs_writev`, `sock_write_iter`) before it
//! reaches the socket; `sendmsg` enters the socket layer directly. At low
//! message rates every delivery is one system call, and that detour was
//! about a tenth of the server's CPU time (see docs/benchmarks.md).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncWrite, Interest};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;

/// No SIGPIPE on a connection the peer reset: an error instead, whether
/// or not the process ignores the signal (Rust binaries do; a host that
/// embeds the library might not).
#[cfg(target_os = "linux")]
const FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(target_os = "linux"))]
const FLAGS: libc::c_int = 0;

/// An [`OwnedWriteHalf`] whose writes are `sendmsg` calls.
pub struct SendHalf(OwnedWriteHalf);

impl SendHalf {
    pub fn new(half: OwnedWriteHalf) -> Self {
        Self(half)
    }

    fn poll_send(&self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let stream: &TcpStream = self.0.as_ref();
        loop {
            ready!(stream.poll_write_ready(cx))?;
            // try_io clears the readiness when the kernel says WouldBlock,
            // so the next poll_write_ready waits for room again.
            match stream.try_io(Interest::WRITABLE, || {
                socket2::SockRef::from(stream).send_vectored_with_flags(bufs, FLAGS)
            }) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                result => return Poll::Ready(result),
            }
        }
    }
}

impl AsyncWrite for SendHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_send(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_send(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn writes_everything_through_full_socket_buffers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (near, far) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (_, writer) = near.unwrap().into_split();
        let (mut far, _) = far.unwrap();
        // 4 MiB in vectored writes of three slices: far more than the
        // socket buffers hold, so sends return short and would block.
        let data: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            far.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut half = SendHalf::new(writer);
        let mut offset = 0;
        while offset < data.len() {
            let rest = &data[offset..];
            let third = rest.len().div_ceil(3);
            let slices: Vec<IoSlice<'_>> = rest.chunks(third).map(IoSlice::new).collect();
            let n = half.write_vectored(&slices).await.unwrap();
            assert!(n > 0);
            offset += n;
        }
        half.shutdown().await.unwrap();
        drop(half);
        assert!(reader.await.unwrap() == data);
    }

    #[tokio::test]
    async fn a_closed_peer_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (near, far) = tokio::join!(TcpStream::connect(addr), listener.accept());
        drop(far.unwrap());
        let (_, writer) = near.unwrap().into_split();
        let mut half = SendHalf::new(writer);
        let mut failed = None;
        for _ in 0..100 {
            if let Err(error) = half.write(&[0u8; 1024]).await {
                failed = Some(error.kind());
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(
            matches!(
                failed,
                Some(io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset)
            ),
            "{failed:?}"
        );
    }
}

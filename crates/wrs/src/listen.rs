//! The plain TCP listener and the client address every handler sees,
//! whichever listener (plain or [`crate::tls::TlsListener`]) accepted the
//! connection.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::serve::Listener;
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

/// A TCP listener that turns on `TCP_NODELAY` (frames are batched per
/// write already; never wait for more) and backs off when accepting fails,
/// for example when the process is out of file descriptors.
#[derive(Debug)]
pub struct PlainListener(pub TcpListener);

impl Listener for PlainListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return (stream, peer);
                }
                Err(error) => {
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// The client's address, in every request's extensions as
/// `ConnectInfo<PeerAddr>` (see [`crate::serve`]).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

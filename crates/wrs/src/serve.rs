//! The HTTP/1.1 accept loop: one task per connection, each served by
//! hyper's HTTP/1 connection directly.
//!
//! `axum::serve` wraps every connection in hyper-util's protocol detection,
//! which hides the socket behind a rewind buffer; serving HTTP/1 directly
//! keeps the upgraded WebSocket a plain `TcpStream` that splits into owned
//! halves without a lock ([`crate::ws`]). Each request carries the client's
//! address as `ConnectInfo<PeerAddr>`, a request's headers must arrive
//! within `WRS_HEADER_TIMEOUT_MS` (slow-header clients are cut off instead
//! of holding a connection forever), and a graceful stop lets requests in
//! flight finish while idle keep-alive connections close.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;
use tracing::debug;

use crate::listen::PeerAddr;

/// Serves `app` on every connection `listener` yields until `stop`, then
/// shuts each connection down gracefully and returns once all are done.
/// Upgraded WebSocket connections are not waited for: they belong to the
/// relay from the moment they switch protocols.
pub async fn serve<L>(
    mut listener: L,
    app: Router,
    header_timeout: Duration,
    stop: CancellationToken,
) where
    L: Listener<Addr = SocketAddr>,
{
    let connections = TaskTracker::new();
    loop {
        let (io, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let connection = serve_connection(io, peer, app.clone(), header_timeout, stop.clone());
        connections.spawn(connection);
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

async fn serve_connection<Io>(
    io: Io,
    peer: SocketAddr,
    app: Router,
    header_timeout: Duration,
    stop: CancellationToken,
) where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(ConnectInfo(PeerAddr(peer)));
        let mut app = app.clone();
        async move { Ok::<_, Infallible>(app.call(request).await.unwrap_or_else(|e| match e {})) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                debug!(%peer, %error, "HTTP connection ended with an error");
            }
            return;
        }
        () = stop.cancelled() => {}
    }
    connection.as_mut().graceful_shutdown();
    if let Err(error) = connection.await {
        debug!(%peer, %error, "HTTP connection ended with an error");
    }
}

//! HAProxy's agent-check (`WRS_AGENT_PORT`): HAProxy connects, the node
//! answers one line with its state and weight and closes.
//!
//! - ready, shedding or overloaded: `up ready 73%` — the weight is the
//!   share of `WRS_MAX_CONNECTIONS` that is free (0 % while shedding, so
//!   the clients it sheds land elsewhere, and while overloaded);
//! - draining: `drain` (HAProxy sends it no new connections);
//! - unable to reach NATS: `down`.
//!
//! `up` and `ready` undo an earlier `down` or `drain`. HAProxy may send a
//! line first (`agent-send`); it is not read.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::relay::{NodeState, Relay};

/// How long one answer may take to be written.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Most answers being written at once; more connections wait in the
/// listen backlog.
const MAX_OPEN: usize = 64;

/// The agent's answer for this node now.
pub fn answer(relay: &Relay) -> String {
    match relay.state() {
        NodeState::Ready | NodeState::Shedding | NodeState::Overloaded => {
            format!("up ready {}%\n", relay.weight())
        }
        NodeState::Draining => "drain\n".to_owned(),
        NodeState::Disconnected => "down\n".to_owned(),
    }
}

/// Answers every agent-check on `listener` until `stop`.
pub async fn serve(listener: TcpListener, relay: Arc<Relay>, stop: CancellationToken) {
    let open = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(MAX_OPEN));
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((socket, peer)) => {
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                    break;
                };
                let line = answer(&relay);
                open.spawn(async move {
                    if let Err(error) = reply(socket, &line).await {
                        debug!(%peer, %error, "agent-check answer not delivered");
                    }
                    drop(permit);
                });
            }
            Err(error) => {
                warn!(%error, "agent port: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    open.close();
    open.wait().await;
}

async fn reply(mut socket: TcpStream, line: &str) -> std::io::Result<()> {
    tokio::time::timeout(ANSWER_TIMEOUT, async {
        socket.write_all(line.as_bytes()).await?;
        socket.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

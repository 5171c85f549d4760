//! Commands from one node to another (`POST /cluster/{nodeId}/drain` and
//! `.../ready` on any node): a NATS request on the target's command
//! subject, answered by the target once it has carried the command out.

use std::time::Duration;

use futures_util::StreamExt;
use tracing::{info, warn};

use super::NatsCoordinator;
use crate::relay::NodeState;
use crate::relay::coordinator::{CommandError, CoordinatorError, NodeCommand};

/// How long a command may take to be answered.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

type Reply = Result<NodeState, CommandError>;

impl NatsCoordinator {
    /// Command subject of a node.
    fn command_subject(&self, node: &str) -> String {
        format!("{}.cmd.{node}", self.prefix)
    }

    /// Subscribes to this node's command subject and answers what arrives.
    pub(super) async fn start_commands(&self) -> Result<(), CoordinatorError> {
        let Some(me) = self.me() else {
            return Ok(());
        };
        let mut commands = self
            .store
            .client
            .subscribe(self.command_subject(&self.node))
            .await
            .map_err(|e| CoordinatorError::Unavailable(e.to_string()))?;
        self.spawn(async move {
            while let Some(message) = commands.next().await {
                let reply: Reply = match serde_json::from_slice::<NodeCommand>(&message.payload) {
                    Ok(command) => {
                        info!(?command, "command from another node");
                        me.handle()
                            .map_or(Err(CommandError::ShuttingDown), |handle| {
                                handle.command(command)
                            })
                    }
                    Err(error) => Err(CommandError::Unavailable(format!(
                        "unreadable command: {error}"
                    ))),
                };
                let Some(inbox) = message.reply else {
                    continue;
                };
                let payload = serde_json::to_vec(&reply).unwrap_or_default();
                if let Err(error) = me.store.client.publish(inbox, payload.into()).await {
                    warn!(%error, "cannot answer a command");
                }
            }
        });
        Ok(())
    }

    /// Has `node` carry out `command`.
    pub(super) async fn send_command(&self, node: &str, command: NodeCommand) -> Reply {
        use async_nats::RequestErrorKind;
        let payload = serde_json::to_vec(&command).unwrap_or_default();
        let request = self
            .store
            .client
            .request(self.command_subject(node), payload.into());
        let answer = match tokio::time::timeout(COMMAND_TIMEOUT, request).await {
            Err(_) => {
                return Err(CommandError::Unavailable(format!(
                    "node {node} did not answer within {COMMAND_TIMEOUT:?}"
                )));
            }
            Ok(Err(error)) if error.kind() == RequestErrorKind::NoResponders => {
                return Err(CommandError::NotFound(node.to_owned()));
            }
            Ok(Err(error)) => return Err(CommandError::Unavailable(error.to_string())),
            Ok(Ok(answer)) => answer,
        };
        serde_json::from_slice::<Reply>(&answer.payload).unwrap_or_else(|error| {
            Err(CommandError::Unavailable(format!(
                "unreadable answer from node {node}: {error}"
            )))
        })
    }
}

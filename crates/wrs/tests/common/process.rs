//! A `wrs` binary run as a child process, as an operator runs it.

use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::bounded;

pub const WRS: &str = env!("CARGO_BIN_EXE_wrs");

/// A `wrs` process on an ephemeral port with its stdout lines streamed.
pub struct Process {
    pub child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    pub seen: Vec<String>,
    pub addr: std::net::SocketAddr,
}

impl Process {
    pub async fn start(env: &[(&str, &str)]) -> Process {
        Self::start_command(Command::new(WRS), env).await
    }

    /// Starts `command` (which runs `wrs` in the end) like [`Process::start`].
    pub async fn start_command(mut command: Command, env: &[(&str, &str)]) -> Process {
        let mut child = command
            .env("WRS_API_PORT", "0")
            .env("WRS_BIND_ADDRESS", "127.0.0.1")
            .env("WRS_LOG_FORMAT", "json")
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn wrs");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut process = Process {
            child,
            lines,
            seen: Vec::new(),
            addr: "127.0.0.1:0".parse().unwrap(),
        };
        let listening = process.wait_for_log(|l| l["message"] == "listening").await;
        process.addr = listening["address"].as_str().unwrap().parse().unwrap();
        process
    }

    /// Waits for a JSON log line matching `predicate`.
    pub async fn wait_for_log(&mut self, predicate: impl Fn(&Value) -> bool) -> Value {
        if let Some(found) = self
            .seen
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| predicate(l))
        {
            return found;
        }
        bounded("log line", async {
            loop {
                let line = self
                    .lines
                    .recv()
                    .await
                    .expect("stdout closed before the line appeared");
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
                assert!(
                    value["timestamp"].is_string() && value["level"].is_string(),
                    "{line}"
                );
                self.seen.push(line);
                if predicate(&value) {
                    return value;
                }
            }
        })
        .await
    }

    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub async fn exit_code(&mut self) -> i32 {
        bounded("wrs to exit", self.child.wait())
            .await
            .unwrap()
            .code()
            .unwrap_or(-1)
    }
}

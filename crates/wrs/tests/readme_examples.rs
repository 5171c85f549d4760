//! The README's five-minute example, run as written: its `curl` commands
//! through `sh`, its browser JavaScript in Node's standard `WebSocket`
//! (the same API browsers have). Only the address, id and token change.

mod common;

use std::process::Stdio;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const README: &str = include_str!("../../../README.md");

/// The README's fenced blocks of one language, in order.
fn blocks(language: &str) -> Vec<String> {
    let fence = format!("```{language}\n");
    README
        .split(&fence)
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap_or("").to_owned())
        .collect()
}

/// The curl commands of the README, pointed at `server`.
fn curl_commands(server: &TestServer) -> Vec<String> {
    blocks("sh")
        .iter()
        .flat_map(|block| {
            block
                .lines()
                .filter(|l| l.starts_with("curl "))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .map(|command| command.replace("127.0.0.1:8080", &server.addr.to_string()))
        .collect()
}

async fn sh(command: &str) -> Value {
    let output = bounded(command, Command::new("sh").arg("-c").arg(command).output())
        .await
        .unwrap();
    assert!(output.status.success(), "{command}: {output:?}");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{command}: not JSON ({e})"))
}

/// Node's arguments for a global `WebSocket` (built in from Node 22,
/// behind a flag in Node 20).
async fn node_args() -> Vec<&'static str> {
    let probe = Command::new("node")
        .args([
            "-e",
            "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
        ])
        .status()
        .await
        .expect("node must be installed (scripts/test.sh installs it)");
    if probe.success() {
        vec![]
    } else {
        vec!["--experimental-websocket"]
    }
}

/// Runs a browser snippet in Node until a stdout line contains `expect`.
struct Tab {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Tab {
    async fn open(script: String) -> Tab {
        let mut child = Command::new("node")
            .args(node_args().await)
            .arg("-e")
            // Tabs stay open for the test's bound at most.
            .arg(format!(
                "{script}\nsetTimeout(() => process.exit(0), {});",
                WAIT.as_millis()
            ))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn node");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Tab { child, lines }
    }

    async fn expect_line(&mut self, expect: &str) -> String {
        bounded(expect, async {
            loop {
                let line = self
                    .lines
                    .next_line()
                    .await
                    .unwrap()
                    .unwrap_or_else(|| panic!("tab exited before printing {expect:?}"));
                if line.contains(expect) {
                    return line;
                }
            }
        })
        .await
    }
}

#[tokio::test]
async fn the_five_minute_example_works_as_written() {
    let server = TestServer::start().await;
    let curls = curl_commands(&server);
    let js = blocks("js");
    let host = server.addr.to_string();

    // Pub-sub: create with the README's curl, then two "tabs".
    let created = sh(&curls[0]).await;
    assert!(curls[0].contains(r#"{"pattern":"pub-sub"}"#));
    let (id, token) = (
        created["data"]["id"].as_str().unwrap(),
        created["token"].as_str().unwrap(),
    );
    let tab_script = js[0]
        .replace("127.0.0.1:8080", &host)
        .replace("5F1C-07A2", id)
        .replace("q3M9vR1xT0bLk2Ze", token);
    let mut first = Tab::open(tab_script.clone()).await;
    server.wait_for_clients(id, 1).await;
    let mut second = Tab::open(tab_script).await;
    let line = first.expect_line("received: hello from tab ").await;
    assert!(line.starts_with("received: hello from tab "), "{line}");
    server.wait_for_clients(id, 2).await;
    let _ = (first.child.kill().await, second.child.kill().await);

    // Request and reply.
    let created = sh(&curls[1]).await;
    assert!(curls[1].contains(r#"{"pattern":"req-repl"}"#));
    let (id, token) = (
        created["data"]["id"].as_str().unwrap(),
        created["token"].as_str().unwrap(),
    );
    let fill = |script: &str| {
        script
            .replace("127.0.0.1:8080", &host)
            .replace("ID", id)
            .replace("TOKEN", token)
    };
    let _responder = Tab::open(fill(&js[1])).await;
    server.wait_for_clients(id, 1).await;
    let mut asker = Tab::open(fill(&js[2])).await;
    let answer = asker.expect_line("answer:").await;
    assert!(
        answer.contains("type: 'reply'") && answer.contains("sum: 5"),
        "{answer}"
    );

    // Delete with the README's curl; the channel is gone.
    let delete = curls
        .iter()
        .find(|c| c.contains("-X DELETE"))
        .unwrap()
        .replace("ID", id);
    let deleted = sh(&delete).await;
    assert_eq!(deleted["message"], format!("channel {id} deleted"));
    let (status, _) = server.get(&format!("/channels/{id}")).await;
    assert_eq!(status, reqwest::StatusCode::NOT_FOUND);
}

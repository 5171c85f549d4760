//! The README's five-minute example, run as written: its `curl` commands
//! through `sh`, its browser JavaScript in Node's standard `WebSocket`
//! (the same API browsers have). Only the address, id and token change.
//! Likewise the example of "Publish over HTTP, Server-Sent Events,
//! history": its shell blocks run through `sh` and must print what the
//! README shows.

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

/// The fenced blocks of one language in the README section that starts
/// with the heading `heading`, up to the next `## ` heading.
fn section_blocks(heading: &str, language: &str) -> Vec<String> {
    let section = README
        .split(&format!("\n{heading}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("the README has no section {heading:?}"))
        .split("\n## ")
        .next()
        .unwrap_or("");
    let fence = format!("```{language}\n");
    section
        .split(&fence)
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap_or("").to_owned())
        .collect()
}

/// A JSON line of the README with the values that differ per run (the
/// history's epoch, publication times) taken from `real`.
fn with_run_values(documented: &Value, real: &Value) -> Value {
    let mut expected = documented.clone();
    if let (Some(epoch), Some(data)) = (real["data"].get("epoch"), expected.get_mut("data")) {
        data["epoch"] = epoch.clone();
    }
    if let Some(messages) = expected
        .get_mut("data")
        .and_then(|data| data.get_mut("messages"))
        .and_then(Value::as_array_mut)
    {
        for (i, message) in messages.iter_mut().enumerate() {
            message["at"] = real["data"]["messages"][i]["at"].clone();
        }
    }
    expected
}

#[tokio::test]
async fn the_http_publish_sse_and_history_example_prints_what_the_readme_shows() {
    let server = TestServer::start().await;
    let host = server.addr.to_string();
    let heading = "## Publish over HTTP, Server-Sent Events, history";
    let sh_blocks = section_blocks(heading, "sh");
    assert_eq!(
        sh_blocks.len(),
        3,
        "create, receive, publish: {sh_blocks:?}"
    );
    let json = section_blocks(heading, "json");
    let shown_stream = section_blocks(heading, "text");
    assert_eq!((json.len(), shown_stream.len()), (1, 1));

    // Create, as written.
    let create = sh_blocks[0].trim().replace("127.0.0.1:8080", &host);
    let created = sh(&create).await;
    assert_eq!(
        created["data"]["history"],
        serde_json::json!({"size": 100, "ttl": 3_600_000}),
        "{created}"
    );
    let (id, token) = (
        created["data"]["id"].as_str().unwrap().to_owned(),
        created["token"].as_str().unwrap().to_owned(),
    );
    let fill = |block: &str| {
        block
            .replace("127.0.0.1:8080", &host)
            .replace("ID", &id)
            .replace("TOKEN", &token)
    };

    // The receiver: the README's curl, running until the test ends.
    let mut receiver = Command::new("sh")
        .arg("-c")
        .arg(fill(sh_blocks[1].trim()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sh");
    let mut stream = receiver.stdout.take().unwrap();
    server.wait_for_clients(&id, 1).await;
    let (_, clients) = server.get(&format!("/channels/{id}/clients")).await;
    assert_eq!(clients["data"][0]["transport"], "sse", "{clients}");

    // The publisher's block as one script: three JSON lines, as shown.
    let script = fill(&sh_blocks[2]);
    let output = bounded(
        "the publisher's block",
        Command::new("sh").arg("-c").arg(&script).output(),
    )
    .await
    .unwrap();
    assert!(output.status.success(), "{script}: {output:?}");
    // curl ends no answer with a line break: the answers follow each
    // other on one line, which the README shows one per line.
    let printed: Vec<Value> = serde_json::Deserializer::from_slice(&output.stdout)
        .into_iter::<Value>()
        .map(|v| v.unwrap_or_else(|e| panic!("{output:?}: {e}")))
        .collect();
    let documented: Vec<Value> = json[0]
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert_eq!(printed.len(), documented.len(), "{printed:?}");
    for (real, shown) in printed.iter().zip(&documented) {
        assert_eq!(real, &with_run_values(shown, real));
    }

    // The receiver printed exactly the stream the README shows (keepalive
    // comments aside, which come every 15 s).
    let expected = shown_stream[0].clone();
    let mut seen = Vec::new();
    let received = bounded("the stream the README shows", async {
        loop {
            let text = String::from_utf8_lossy(&seen).replace(": keepalive\n\n", "");
            if text.len() >= expected.len() {
                return text;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::io::AsyncReadExt::read(&mut stream, &mut chunk)
                .await
                .unwrap();
            assert!(n > 0, "the receiver's stream ended: {text:?}");
            seen.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    assert_eq!(received, expected);
    let _ = receiver.kill().await;
    server.shutdown().await;
}

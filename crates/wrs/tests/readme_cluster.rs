//! The README's "Running a cluster" recipe, run as written: its commands go
//! to bash unchanged except for ports and temporary directories (tests use
//! ephemeral ports) and the binary path. nats-server, three `wrs` nodes and
//! nginx then serve a channel through the load balancer.

mod common;

use std::time::Duration;

use common::nats::free_port;
use common::*;
use reqwest::StatusCode;
use serde_json::Value;

const README: &str = include_str!("../../../README.md");
const NGINX_CONF: &str = include_str!("../../../deploy/nginx/wrs-cluster.conf");
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// The first two `sh` blocks under "## Running a cluster".
fn recipe() -> (String, String) {
    let section = README
        .split("## Running a cluster")
        .nth(1)
        .expect("README has the section");
    let mut blocks = section
        .split("```sh\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap_or("").to_owned());
    (
        blocks.next().expect("start block"),
        blocks.next().expect("use block"),
    )
}

/// Stops, by PID, every process the recipe started (recorded in a file)
/// and the shell that ran it, on drop.
struct Started {
    pids: std::path::PathBuf,
    shell: std::process::Child,
    /// The recipe's stderr (nginx and the nodes log there), shown only
    /// when the test fails.
    stderr: std::path::PathBuf,
}

impl Drop for Started {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- the recipe's stderr ---\n{}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            );
        }
        let pids: Vec<String> = std::fs::read_to_string(&self.pids)
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        for signal in ["-TERM", "-KILL"] {
            for pid in &pids {
                let _ = std::process::Command::new("kill")
                    .args([signal, "--", pid])
                    .status();
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let _ = self.shell.kill();
        let _ = self.shell.wait();
    }
}

#[tokio::test]
async fn the_cluster_recipe_works_as_written() {
    let (start, usage) = recipe();
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<(u16, u16)> = [4222, 8080, 8081, 8082, 8083]
        .into_iter()
        .map(|p| (p, free_port()))
        .collect();
    let port = |default: u16| ports.iter().find(|(d, _)| *d == default).unwrap().1;
    let substitute = |text: &str| {
        let mut text = text
            .replace(
                "/tmp/wrs-nats",
                &dir.path().join("nats").display().to_string(),
            )
            .replace(
                "/tmp/wrs-nginx",
                &dir.path().join("nginx").display().to_string(),
            );
        for (default, ephemeral) in &ports {
            let word = regex::Regex::new(&format!(r"\b{default}\b")).unwrap();
            text = word.replace_all(&text, ephemeral.to_string()).into_owned();
        }
        text
    };
    // The nginx config with the same ports, where the recipe expects it.
    let conf = dir.path().join("wrs-cluster.conf");
    std::fs::write(&conf, substitute(NGINX_CONF)).unwrap();
    let script = substitute(&start)
        .replace("cargo build --release", "true")
        .replace("target/release/wrs", env!("CARGO_BIN_EXE_wrs"))
        .replace(
            "\"$PWD/deploy/nginx/wrs-cluster.conf\"",
            &format!("\"{}\"", conf.display()),
        )
        .replace(
            "\"$PWD/deploy/nats/wrs.conf\"",
            &format!("\"{ROOT}/deploy/nats/wrs.conf\""),
        );
    assert!(
        script.contains("nats-server -js")
            && script.contains(&format!("-c \"{ROOT}/deploy/nats/wrs.conf\""))
            && script.matches("WRS_NATS_URL").count() == 3
            && script.contains("nginx -p")
    );
    // Record the PID of each background command, to stop exactly those.
    let pids = dir.path().join("pids");
    let stderr = dir.path().join("stderr.log");
    let script: String = script
        .lines()
        .map(|line| {
            if line.trim_end().ends_with('&') {
                format!("{line}\necho $! >> '{}'", pids.display())
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let shell = std::process::Command::new("bash")
        .args(["-c", &format!("set -e\n{script}\nwait")])
        .env_remove("RUST_LOG")
        .env("WRS_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("bash");
    let _started = Started {
        pids,
        shell,
        stderr,
    };

    let http = http_client();
    let lb = format!("http://127.0.0.1:{}", port(8080));
    // The three nodes find each other; the balancer answers.
    eventually("three nodes behind nginx", || {
        let (http, lb) = (http.clone(), lb.clone());
        async move {
            let body: Value = http
                .get(format!("{lb}/cluster"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (body["data"].as_array()?.len() == 3).then_some(())
        }
    })
    .await;
    // The README's usage commands, through the balancer.
    for line in usage.lines().filter(|l| l.starts_with("curl ")) {
        let output = tokio::process::Command::new("sh")
            .args(["-c", &substitute(line)])
            .output()
            .await
            .unwrap();
        let body: Value =
            serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(
            body["data"].is_array() || body["data"]["id"].is_string(),
            "{line}: {body}"
        );
    }
    // A channel through the balancer: its clients land on different nodes
    // and reach each other.
    let created: Value = http
        .post(format!("{lb}/channels"))
        .body(r#"{"pattern":"pub-sub"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (id, token) = (
        created["data"]["id"].as_str().unwrap(),
        created["token"].as_str().unwrap(),
    );
    let url = format!(
        "ws://127.0.0.1:{}/channels/{id}/connect?token={token}",
        port(8080)
    );
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (stream, _) = bounded(
            "connect through nginx",
            tokio_tungstenite::connect_async(&url),
        )
        .await
        .unwrap();
        clients.push(Ws { stream });
    }
    let nodes = eventually("three clients listed", || {
        let (http, lb) = (http.clone(), lb.clone());
        async move {
            let body: Value = http
                .get(format!("{lb}/channels/{id}/clients"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let list = body["data"].as_array()?;
            (list.len() == 3).then(|| {
                list.iter()
                    .map(|c| c["node"].as_str().unwrap_or("").to_owned())
                    .collect::<Vec<_>>()
            })
        }
    })
    .await;
    let distinct: std::collections::BTreeSet<_> = nodes.iter().collect();
    assert_eq!(
        distinct.len(),
        3,
        "round-robin spread the clients: {nodes:?}"
    );
    clients[0].send_text("through the balancer").await;
    assert_eq!(clients[1].recv_text().await, "through the balancer");
    assert_eq!(clients[2].recv_text().await, "through the balancer");
    let status = http
        .get(format!("{lb}/readyz"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::OK);
}

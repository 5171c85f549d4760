//! The `wrs` binary as an operator meets it: `--help`, configuration
//! errors, logs on stdout, and a graceful stop on SIGTERM/SIGINT.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::process::{Process, WRS};
use common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// Runs `wrs` to completion with `args` and `env`; returns (exit code, stdout, stderr).
async fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let output = bounded(
        "wrs to exit",
        Command::new(WRS)
            .args(args)
            .envs(env.iter().copied())
            .env_remove("RUST_LOG")
            .output(),
    )
    .await
    .expect("run wrs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn server_at(process: &Process) -> TestServerAt {
    TestServerAt {
        base: format!("http://{}", process.addr),
        http: http_client(),
    }
}

/// Plain HTTP helpers for a server in another process.
struct TestServerAt {
    base: String,
    http: reqwest::Client,
}

impl TestServerAt {
    async fn status(&self, path: &str) -> u16 {
        bounded(path, self.http.get(format!("{}{path}", self.base)).send())
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    async fn create(&self, pattern: &str) -> (String, String) {
        let response = bounded(
            "create",
            self.http
                .post(format!("{}/channels", self.base))
                .body(format!(r#"{{"pattern":"{pattern}"}}"#))
                .send(),
        )
        .await
        .unwrap();
        let body: Value = response.json().await.unwrap();
        (
            body["data"]["id"].as_str().unwrap().to_owned(),
            body["token"].as_str().unwrap().to_owned(),
        )
    }
}

/// Every variable `wrs --help` documents.
fn help_variables(help: &str) -> Vec<String> {
    let mut vars: Vec<String> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .map(str::to_owned)
        .collect();
    vars.sort();
    vars.dedup();
    vars
}

#[tokio::test]
async fn help_documents_every_setting_with_its_default() {
    let (code, help, _) = run_to_end(&["--help"], &[]).await;
    assert_eq!(code, 0);
    let vars = help_variables(&help);
    for expected in [
        "WRS_API_PORT",
        "WRS_BIND_ADDRESS",
        "WRS_PUBLIC_API_PORT",
        "WRS_DOMAIN",
        "WRS_TOKEN_LENGTH",
        "WRS_ID_LENGTH",
        "WRS_MAX_MESSAGE_BYTES",
        "WRS_MAX_CHANNELS",
        "WRS_CLIENT_QUEUE_MESSAGES",
        "WRS_CLIENT_QUEUE_BYTES",
        "WRS_SLOW_CONSUMER",
        "WRS_PING_INTERVAL_MS",
        "WRS_SHUTDOWN_TIMEOUT_MS",
        "WRS_NODE_ID",
        "WRS_README_PATH",
        "WRS_LOG_FORMAT",
        "WRS_LOG",
    ] {
        assert!(
            vars.iter().any(|v| v == expected),
            "{expected} missing from --help"
        );
    }
    for default in [
        "[default: 8080]",
        "[default: 127.0.0.1]",
        "[default: 16]",
        "[default: 4]",
        "[default: 1048576]",
        "[default: close]",
        "[default: human]",
    ] {
        assert!(help.contains(default), "{default} missing from --help");
    }
    assert!(help.contains("-p, --port"));
    let (code, version, _) = run_to_end(&["--version"], &[]).await;
    assert_eq!(
        (code, version.trim()),
        (0, concat!("wrs ", env!("CARGO_PKG_VERSION")))
    );
}

#[tokio::test]
async fn the_readme_config_table_matches_help() {
    let (_, help, _) = run_to_end(&["--help"], &[]).await;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let mut in_readme: Vec<String> = readme
        .lines()
        .filter(|l| l.starts_with("| `WRS_"))
        .flat_map(|l| {
            let first_cell = l.split('|').nth(1).unwrap_or("");
            first_cell
                .split('`')
                .filter(|s| s.starts_with("WRS_"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    in_readme.sort();
    in_readme.dedup();
    assert_eq!(
        in_readme,
        help_variables(&help),
        "README config table and --help disagree"
    );
}

#[tokio::test]
async fn invalid_configuration_exits_with_one_line_naming_the_variable() {
    for (var, value) in [
        ("WRS_API_PORT", "eighty"),
        ("WRS_API_PORT", "70000"),
        ("WRS_TOKEN_LENGTH", "3"),
        ("WRS_SLOW_CONSUMER", "sometimes"),
        ("WRS_LOG_FORMAT", "xml"),
        ("WRS_BIND_ADDRESS", "localhost:80"),
        ("WRS_CLIENT_QUEUE_BYTES", "100"),
        ("WRS_LOG", "wrs=shouty"),
        ("WRS_AUTH", "true"),
        ("WRS_AUTH_RESOURCES", "GET:/channels("),
        ("WRS_SSL", "true"),
        ("WRS_CORS_ORIGINS", "ftp://files.example"),
    ] {
        let (code, stdout, stderr) = run_to_end(&[], &[(var, value)]).await;
        assert_eq!(code, 2, "{var}={value}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{var}={value}: {stderr:?}");
        assert!(
            stderr.starts_with("wrs: invalid configuration: "),
            "{stderr}"
        );
        let names = if var == "WRS_LOG" { "log filter" } else { var };
        assert!(stderr.contains(names), "{var}={value}: {stderr}");
        assert!(stdout.is_empty());
    }
}

#[tokio::test]
async fn startup_failures_exit_non_zero_with_a_reason() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, _, stderr) = run_to_end(
        &[],
        &[("WRS_API_PORT", &port), ("WRS_BIND_ADDRESS", "127.0.0.1")],
    )
    .await;
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot listen on 127.0.0.1:"), "{stderr}");
    let (code, _, stderr) = run_to_end(
        &[],
        &[
            ("WRS_API_PORT", "0"),
            ("WRS_README_PATH", "/nonexistent/readme.md"),
        ],
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot read the readme at /nonexistent/readme.md"),
        "{stderr}"
    );
    let (code, _, stderr) = run_to_end(
        &[],
        &[
            ("WRS_API_PORT", "0"),
            ("WRS_SSL", "true"),
            ("WRS_SSL_CERT_PATH", "/nonexistent/cert.pem"),
            ("WRS_SSL_KEY_PATH", "/nonexistent/key.pem"),
        ],
    )
    .await;
    assert_eq!(code, 1);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("TLS: cannot read the certificate /nonexistent/cert.pem"),
        "{stderr}"
    );
}

#[tokio::test]
async fn sigterm_drains_clients_with_1012_after_the_drain_delay_and_exits() {
    let mut process = Process::start(&[
        ("WRS_SHUTDOWN_TIMEOUT_MS", "8000"),
        ("WRS_DRAIN_DELAY_MS", "1500"),
    ])
    .await;
    let http = server_at(&process);
    let (id, token) = http.create("pub-sub").await;
    let url = format!("ws://{}/channels/{id}/connect?token={token}", process.addr);
    let (polite, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let mut polite = Ws { stream: polite };
    // A client that never answers the close keeps the drain open for the
    // closing handshake's bound.
    let request = upgrade_request(&format!("/channels/{id}/connect?token={token}"));
    let silent = raw_request(process.addr, &request).await;
    assert_eq!(silent.status, 101);
    assert_eq!(http.status("/readyz").await, 200);

    let signalled = tokio::time::Instant::now();
    process.signal("TERM");
    // Not ready at once, but within the drain delay (the balancer's time to
    // notice) connections are still taken.
    eventually("readiness to fail", || async {
        (http.status("/readyz").await == 503).then_some(())
    })
    .await;
    assert_eq!(http.status("/healthz").await, 200);
    let late = raw_request(process.addr, &request).await;
    assert_eq!(late.status, 101, "taken within the drain delay");
    assert!(signalled.elapsed() < Duration::from_millis(1500));
    // Then every client is closed with 1012, the late one too.
    assert_eq!(polite.expect_close(1012).await, "draining");
    assert!(signalled.elapsed() >= Duration::from_millis(1500));
    for mut client in [silent, late] {
        let (opcode, payload) = read_server_frame(&mut client.stream)
            .await
            .expect("close frame");
        assert_eq!((opcode, close_code_of(&payload)), (0x8, 1012));
        assert_eq!(&payload[2..], b"draining");
    }
    // After the delay new connections are refused with 503.
    let refused = raw_request(process.addr, &request).await;
    assert_eq!(refused.status, 503);
    assert!(
        refused
            .head
            .to_ascii_lowercase()
            .contains("retry-after: 1\r\n"),
        "{}",
        refused.head
    );
    // A browser (Origin) learns it from the close code: 1013, try again
    // later, with the error code as the reason.
    let from_browser = request.replacen("\r\n", "\r\nOrigin: https://app.example\r\n", 1);
    let mut browser = raw_exchange(process.addr, &from_browser).await;
    assert_eq!(browser.status, 101, "{}", browser.head);
    let mut input = tokio::io::AsyncReadExt::chain(&browser.leftover[..], &mut browser.stream);
    let (opcode, payload) = read_server_frame(&mut input).await.expect("close frame");
    assert_eq!((opcode, close_code_of(&payload)), (0x8, 1013));
    assert_eq!(&payload[2..], b"draining");
    drop(polite);
    assert_eq!(process.exit_code().await, 0);
    process
        .wait_for_log(|l| l["message"] == "SIGTERM received")
        .await;
    process
        .wait_for_log(|l| l["message"] == "drained: every client was closed with 1012")
        .await;
    process.wait_for_log(|l| l["message"] == "stopped").await;
}

#[tokio::test]
async fn clients_left_at_the_shutdown_timeout_get_1001() {
    // One close a second from the start of the drain; the timeout comes
    // after about three of the six.
    let mut process = Process::start(&[
        ("WRS_SHUTDOWN_TIMEOUT_MS", "2500"),
        ("WRS_DRAIN_DELAY_MS", "0"),
        ("WRS_DRAIN_RATE", "1"),
    ])
    .await;
    let http = server_at(&process);
    let (id, token) = http.create("pub-sub").await;
    let url = format!("ws://{}/channels/{id}/connect?token={token}", process.addr);
    let mut clients = Vec::new();
    for _ in 0..6 {
        let (ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        clients.push(Ws { stream: ws });
    }
    process.signal("TERM");
    let mut codes = Vec::new();
    for client in &mut clients {
        let (_, close) = client.recv_until_close().await;
        codes.push(close.expect("a close frame").0);
    }
    let paced = codes.iter().filter(|&&c| c == 1012).count();
    let cut = codes.iter().filter(|&&c| c == 1001).count();
    assert_eq!(paced + cut, 6, "{codes:?}");
    // At 1 a second (a little less), at most three fit in 2.5 s.
    assert!((1..=3).contains(&paced), "{codes:?}");
    drop(clients);
    assert_eq!(process.exit_code().await, 0);
    process
        .wait_for_log(|l| l["message"] == "shutdown timeout: closing the clients left with 1001")
        .await;
}

#[tokio::test]
async fn sigint_stops_too() {
    let mut process = Process::start(&[("WRS_DRAIN_DELAY_MS", "0")]).await;
    let started = std::time::Instant::now();
    process.signal("INT");
    assert_eq!(process.exit_code().await, 0);
    assert!(started.elapsed() < Duration::from_secs(3));
    process
        .wait_for_log(|l| l["message"] == "SIGINT received")
        .await;
}

#[tokio::test]
async fn json_logs_record_channel_lifecycle_and_rejections() {
    let mut process = Process::start(&[]).await;
    let http = server_at(&process);
    let (id, _token) = http.create("push-pull").await;
    let created = process
        .wait_for_log(|l| l["message"] == "channel created")
        .await;
    assert_eq!(created["channel"], id.as_str());
    assert_eq!(created["pattern"], "push-pull");
    assert_eq!(created["level"], "INFO");
    // A rejected connection: one line with the reason.
    let refused = raw_request(
        process.addr,
        &upgrade_request(&format!("/channels/{id}/connect?token=nope")),
    )
    .await;
    assert_eq!(refused.status, 401);
    let rejected = process
        .wait_for_log(|l| l["message"] == "connection rejected")
        .await;
    assert_eq!(rejected["channel"], id.as_str());
    assert_eq!(rejected["reason"], "invalid_token");
    assert_eq!(rejected["status"], 401);
    let peer: std::net::SocketAddr = rejected["peer"].as_str().unwrap().parse().unwrap();
    assert_eq!(peer.ip().to_string(), "127.0.0.1");
    // Deleting is logged; the token never is.
    http.http
        .delete(format!("{}/channels/{id}", http.base))
        .send()
        .await
        .unwrap();
    let deleted = process
        .wait_for_log(|l| l["message"] == "channel deleted")
        .await;
    assert_eq!(deleted["channel"], id.as_str());
    assert!(
        !process.seen.iter().any(|l| l.contains(&_token)),
        "the token was logged"
    );
    process.signal("TERM");
    assert_eq!(process.exit_code().await, 0);
}

#[tokio::test]
async fn human_logs_are_the_default() {
    let mut child = Command::new(WRS)
        .env("WRS_API_PORT", "0")
        .env("WRS_BIND_ADDRESS", "127.0.0.1")
        .env_remove("WRS_LOG_FORMAT")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The first lines: the open-file limit, then listening.
    let first = bounded("listening log line", async {
        loop {
            let line = lines.next_line().await.unwrap().unwrap();
            if line.contains("listening") {
                return line;
            }
        }
    })
    .await;
    assert!(first.contains("INFO"), "{first}");
    assert!(
        serde_json::from_str::<Value>(&first).is_err(),
        "human logs are not JSON"
    );
    assert!(
        !first.contains('\u{1b}'),
        "no colour codes when stdout is not a terminal"
    );
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert_eq!(bounded("exit", child.wait()).await.unwrap().code(), Some(0));
}

#[tokio::test]
async fn healthcheck_probes_the_node_with_its_own_configuration() {
    // Nothing listening: unhealthy, one line, exit 1.
    let port = common::nats::free_port().to_string();
    let (code, _, stderr) = run_to_end(&["healthcheck"], &[("WRS_API_PORT", &port)]).await;
    assert_eq!(code, 1);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("wrs healthcheck: unhealthy: cannot connect"),
        "{stderr}"
    );
    // A node whose every route needs the API token: the probe sends it.
    let server = TestServer::with(|c| {
        c.auth = true;
        c.auth_token = Some(wrs::config::Secret::new("probe-token"));
    })
    .await;
    let port = server.addr.port().to_string();
    let env = [
        ("WRS_API_PORT", port.as_str()),
        ("WRS_AUTH", "true"),
        ("WRS_AUTH_TOKEN", "probe-token"),
    ];
    let (code, _, stderr) = run_to_end(&["healthcheck"], &env).await;
    assert_eq!(code, 0, "{stderr}");
    // /readyz can be probed too; a wrong token is unhealthy.
    let (code, _, _) = run_to_end(&["healthcheck", "--path", "/readyz"], &env).await;
    assert_eq!(code, 0);
    let wrong = [
        ("WRS_API_PORT", port.as_str()),
        ("WRS_AUTH", "true"),
        ("WRS_AUTH_TOKEN", "wrong"),
    ];
    let (code, _, stderr) = run_to_end(&["healthcheck"], &wrong).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("answered 401"), "{stderr}");
}

#[tokio::test]
async fn the_open_file_limit_is_raised_to_the_hard_limit() {
    // Started with a soft limit of 256 (as a shell with `ulimit -Sn` would):
    // every client is a socket, so the server raises it by itself.
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    assert!(hard > 256, "the hard limit here is {hard}");
    let mut command = Command::new("bash");
    command.args(["-c", "ulimit -Sn 256 && exec \"$0\"", WRS]);
    let mut process = Process::start_command(command, &[]).await;
    let logged = process
        .wait_for_log(|l| l["message"] == "open-file limit")
        .await;
    assert_eq!(logged["limit"].as_u64(), Some(hard));
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", process.child.id().unwrap())).unwrap();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap();
    assert_eq!(soft, hard.to_string());
    process.signal("TERM");
    assert_eq!(process.exit_code().await, 0);
}

/// `name value` samples without labels, from a Prometheus text scrape.
fn unlabelled_samples(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.contains('{'))
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// User plus system CPU time of process `pid` in seconds, read from
/// `/proc/PID/stat` (fields 14 and 15, in clock ticks).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces: count fields after the last ')'.
    let (_, rest) = stat.rsplit_once(')').unwrap();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields[n - 3].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a system constant.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(ticks_per_second > 0, "sysconf(_SC_CLK_TCK)");
    (field(14) + field(15)) as f64 / ticks_per_second as f64
}

#[tokio::test]
async fn metrics_report_the_process_itself() {
    let process = Process::start(&[]).await;
    let server = server_at(&process);
    let pid = process.child.id().unwrap();
    let scrape = || async {
        let text = bounded(
            "scrape",
            server.http.get(format!("{}/metrics", server.base)).send(),
        )
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(
            text.contains("# TYPE process_cpu_seconds counter"),
            "{text}"
        );
        unlabelled_samples(&text)
    };
    // A scrape whose CPU time must lie between what /proc says about the
    // server just before and just after it (the counter never goes back).
    let cpu = "process_cpu_seconds_total";
    let scrape_between_cpu_readings = || async {
        let low = cpu_seconds(pid);
        let samples = scrape().await;
        let high = cpu_seconds(pid);
        let reported = samples[cpu];
        assert!(
            low - 1e-9 <= reported && reported <= high + 1e-9,
            "{cpu} {reported} is not within /proc's {low}..={high}"
        );
        samples
    };

    let before = scrape_between_cpu_readings().await;
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    assert_eq!(before["process_max_fds"], hard as f64);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = before["process_start_time_seconds"];
    assert!(
        started > now - 60.0 && started <= now + 1.0,
        "{started} vs {now}"
    );
    // Resident memory as the kernel reports it in /proc/PID/status.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let resident = before["process_resident_memory_bytes"];
    assert!(
        (resident / (rss_kib * 1024.0) - 1.0).abs() < 0.25,
        "process_resident_memory_bytes {resident} vs VmRSS {rss_kib} KiB"
    );
    assert!(before["process_virtual_memory_bytes"] >= resident);

    // Every client is exactly one more open file descriptor, and gone again
    // when it leaves.
    let (id, token) = server.create("pub-sub").await;
    let url = format!("ws://{}/channels/{id}/connect?token={token}", process.addr);
    let mut clients = Vec::new();
    for _ in 0..40 {
        let (ws, _) = bounded("connect", tokio_tungstenite::connect_async(&url))
            .await
            .unwrap();
        clients.push(ws);
    }
    let with_clients = eventually("40 clients open", || async {
        let now = scrape().await;
        (now["wrs_connections_open"] == 40.0).then_some(now)
    })
    .await;
    assert_eq!(
        with_clients["process_open_fds"] - before["process_open_fds"],
        40.0
    );
    drop(clients);
    // A connection's socket is closed just after it leaves the gauge.
    let after = eventually("clients gone and their sockets closed", || async {
        let now = scrape().await;
        (now["wrs_connections_open"] == 0.0
            && now["process_open_fds"] == before["process_open_fds"])
            .then_some(now)
    })
    .await;
    assert!(after[cpu] >= before[cpu]);

    // Work the server until /proc shows it spent another 0.2 s of CPU
    // (20 clock ticks): the counter moves by at least as much.
    let busy = scrape_between_cpu_readings().await;
    let target = busy[cpu] + 0.2;
    bounded("the server to spend 0.2 s of CPU", async {
        while cpu_seconds(pid) < target {
            let requests = (0..32).map(|_| server.status("/openapi.json"));
            for status in futures_util::future::join_all(requests).await {
                assert_eq!(status, 200);
            }
        }
    })
    .await;
    let worked = scrape_between_cpu_readings().await;
    assert!(
        worked[cpu] >= target - 1e-9,
        "{cpu} went from {} to {} while /proc reached {target}",
        busy[cpu],
        worked[cpu]
    );
}

//! The tutorial's backend code (`docs/tutorial.md`, sections 6 and 7), run
//! as written against a live server: the curl block through `sh`, the
//! Python block with `python3` (standard library only) and the Node block
//! as a `.mjs` file with `node`. Only the address and the channels' ids
//! and tokens are swapped in. WebSocket clients sit on the channels the way
//! the tutorial describes (two listeners on the pub-sub channel, a worker on
//! the push-pull channel, a responder on the req-repl channel), and each
//! program must print exactly what the tutorial shows — with the worker's
//! real id and the call's real origin — and, for the 409 and 504 cases,
//! what its code prints for them.

mod common;

use common::{Created, TestServer, Ws, bounded};
use serde_json::{Value, json};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const TUTORIAL: &str = include_str!("../../../docs/tutorial.md");

/// The worker id and call origin the tutorial's sample output shows.
const SHOWN_WORKER: &str = "4C1D-88A0-13F2";
const SHOWN_ORIGIN: &str = "C7A1-0F3E-2B94";

/// The tutorial's fenced blocks of `language`, in order.
fn blocks(language: &str) -> Vec<&'static str> {
    TUTORIAL
        .split(&format!("```{language}\n"))
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .collect()
}

/// The tutorial's one block of `language` that contains `marker`.
fn block(language: &str, marker: &str) -> String {
    let found: Vec<&str> = blocks(language)
        .into_iter()
        .filter(|b| b.contains(marker))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "docs/tutorial.md should have exactly one {language} block with {marker:?}"
    );
    found[0].to_owned()
}

/// `code` with its one line that starts with `prefix` replaced by `line`.
fn with_line(code: &str, prefix: &str, line: &str) -> String {
    assert_eq!(
        code.lines().filter(|l| l.starts_with(prefix)).count(),
        1,
        "the tutorial's block should have one line starting {prefix:?}:\n{code}"
    );
    code.lines()
        .map(|l| if l.starts_with(prefix) { line } else { l })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The three channels of section 6 with their clients.
struct Channels {
    news: Created,
    jobs: Created,
    ask: Created,
    listeners: Vec<Ws>,
    /// The worker on `jobs`, if one is connected.
    worker: Option<Ws>,
    /// The origins of the requests the responder answered.
    origins: mpsc::UnboundedReceiver<String>,
    /// A client on `ask` that never answers (the 504 case).
    _silent: Option<Ws>,
}

/// How the req-repl channel is staffed.
#[derive(Clone, Copy, PartialEq)]
enum Ask {
    /// A responder that answers `{"type":"request","a","b"}` with the sum.
    Answering,
    /// A connected client that does not answer.
    Silent,
    /// Nobody.
    Nobody,
}

impl Channels {
    async fn new(server: &TestServer, worker: bool, ask: Ask) -> Self {
        let news = server.create_pattern("pub-sub").await;
        let jobs = server.create_pattern("push-pull").await;
        let ask_channel = server.create_pattern("req-repl").await;
        let listeners = server.connect_n(&news, 2).await;
        let worker = if worker {
            Some(server.connect(&jobs).await)
        } else {
            None
        };
        let (found, origins) = mpsc::unbounded_channel();
        let mut silent = None;
        match ask {
            Ask::Answering => {
                let mut responder = server.connect(&ask_channel).await;
                // The README's responder: the reply names the request's
                // origin and carries the sum, in this key order.
                tokio::spawn(async move {
                    loop {
                        let request = responder.recv_json().await;
                        if request["type"] != "request" {
                            continue;
                        }
                        let origin = request["origin"].as_str().unwrap().to_owned();
                        let sum = request["a"].as_i64().unwrap() + request["b"].as_i64().unwrap();
                        responder
                            .send_text(format!(
                                r#"{{"type":"reply","origin":"{origin}","sum":{sum}}}"#
                            ))
                            .await;
                        if found.send(origin).is_err() {
                            return;
                        }
                    }
                });
            }
            Ask::Silent => silent = Some(server.connect(&ask_channel).await),
            Ask::Nobody => {}
        }
        let clients = u64::from(ask != Ask::Nobody);
        server.wait_for_clients(&ask_channel.id, clients).await;
        server
            .wait_for_clients(&jobs.id, u64::from(worker.is_some()))
            .await;
        Self {
            news,
            jobs,
            ask: ask_channel,
            listeners,
            worker,
            origins,
            _silent: silent,
        }
    }

    /// The worker's client id (the only client of `jobs`).
    async fn worker_id(&self, server: &TestServer) -> String {
        let ids = server.client_ids(&self.jobs.id).await;
        assert_eq!(ids.len(), 1, "{ids:?}");
        ids[0].clone()
    }

    /// The origin of the one call the responder answered.
    fn answered_origin(&mut self) -> String {
        let origin = self.origins.try_recv().expect("the responder answered");
        assert!(
            self.origins.try_recv().is_err(),
            "the responder answered more than one call"
        );
        origin
    }

    /// Both listeners received `expected`, in order; the worker got the
    /// job, if it is there.
    async fn check_deliveries(&mut self, expected: &[Message]) {
        for listener in &mut self.listeners {
            for message in expected {
                assert_eq!(&listener.recv().await, message);
            }
        }
        if let Some(worker) = &mut self.worker {
            assert_eq!(worker.recv_json().await, json!({"job": 7}));
        }
    }
}

/// Runs a program; returns its stdout, which must be UTF-8. It must exit 0.
async fn run(program: &str, args: &[&str], what: &str) -> String {
    let output = bounded(what, Command::new(program).args(args).output())
        .await
        .unwrap_or_else(|e| panic!("{what}: cannot run {program}: {e}"));
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
    assert!(
        output.status.success(),
        "{what} failed: {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// `shown` with the sample worker id and call origin replaced by the
/// real ones.
fn as_run(shown: &str, worker: Option<&str>, origin: Option<&str>) -> String {
    let mut text = shown.to_owned();
    if let Some(worker) = worker {
        text = text.replace(SHOWN_WORKER, worker);
    }
    if let Some(origin) = origin {
        text = text.replace(SHOWN_ORIGIN, origin);
    }
    text
}

#[tokio::test]
async fn the_curl_block_prints_what_the_tutorial_shows() {
    let server = TestServer::start().await;
    let code = block("sh", "$WRS/channels/$NEWS/messages");
    let outputs = blocks("text");
    let shown_ok = outputs
        .iter()
        .find(|b| b.contains("\"receiver\":") && b.contains("\"sum\":5"))
        .expect("the tutorial shows the curl block's answers");
    let shown_refused = outputs
        .iter()
        .find(|b| b.contains("no_receiver") && b.contains("no_reply"))
        .expect("the tutorial shows the 409 and 504 answers");
    let fill = |channels: &Channels| {
        let mut code = with_line(&code, "WRS=", &format!("WRS=http://{}", server.addr));
        for (name, channel) in [
            ("NEWS", &channels.news),
            ("JOBS", &channels.jobs),
            ("ASK", &channels.ask),
        ] {
            code = with_line(
                &code,
                &format!("{name}="),
                &format!("{name}={} {name}_TOKEN={}", channel.id, channel.token),
            );
        }
        code
    };

    // Everyone there: 202, 202 to the worker, 200 with the reply.
    let mut channels = Channels::new(&server, true, Ask::Answering).await;
    let worker = channels.worker_id(&server).await;
    let printed = run("sh", &["-c", &fill(&channels)], "the curl block").await;
    let origin = channels.answered_origin();
    assert_eq!(
        printed,
        as_run(shown_ok, Some(&worker), Some(&origin)),
        "the curl block's output"
    );
    channels
        .check_deliveries(&[Message::text("deploy finished")])
        .await;

    // No worker, a responder that does not answer: 409, then 504.
    let mut channels = Channels::new(&server, false, Ask::Silent).await;
    let printed = run("sh", &["-c", &fill(&channels)], "the curl block").await;
    assert_eq!(printed, *shown_refused, "the curl block's output");
    channels
        .check_deliveries(&[Message::text("deploy finished")])
        .await;
    server.shutdown().await;
}

/// The printed lines of the Python and Node programs, with everyone
/// there, as the tutorial shows them.
fn shown_program_output() -> &'static str {
    blocks("text")
        .into_iter()
        .find(|b| b.starts_with("news: "))
        .expect("the tutorial shows what the programs print")
}

/// Runs a program of section 6 in the three situations: everyone there,
/// no worker and a silent responder, nobody on the req-repl channel.
async fn check_program(server: &TestServer, run_with: impl AsyncFn(&Channels) -> String) {
    let binary = Message::binary(vec![0x89u8, 0x50, 0x4e, 0x47]);
    let mut channels = Channels::new(server, true, Ask::Answering).await;
    let worker = channels.worker_id(server).await;
    let printed = run_with(&channels).await;
    channels.answered_origin();
    assert_eq!(printed, as_run(shown_program_output(), Some(&worker), None));
    channels
        .check_deliveries(&[Message::text("deploy finished"), binary.clone()])
        .await;

    let mut channels = Channels::new(server, false, Ask::Silent).await;
    let printed = run_with(&channels).await;
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(
        lines[2..],
        [
            "job: no worker connected, try again later",
            "call: nobody answered within 2 s"
        ],
        "{printed}"
    );
    channels
        .check_deliveries(&[Message::text("deploy finished"), binary.clone()])
        .await;

    let channels = Channels::new(server, true, Ask::Nobody).await;
    let printed = run_with(&channels).await;
    assert_eq!(
        printed.lines().last(),
        Some("call: nobody is connected to answer"),
        "{printed}"
    );
}

#[tokio::test]
async fn the_python_block_runs_with_the_standard_library_only() {
    let server = TestServer::start().await;
    let code = block("python", "def publish(");
    assert!(
        code.lines()
            .filter(|l| l.starts_with("import ") || l.starts_with("from "))
            .all(|l| [
                "import json",
                "import urllib.error",
                "import urllib.request"
            ]
            .contains(&l)),
        "only the standard library:\n{code}"
    );
    check_program(&server, async |channels: &Channels| {
        let mut code = with_line(
            &code,
            "WRS = ",
            &format!("WRS = \"http://{}\"", server.addr),
        );
        for (name, channel) in [
            ("NEWS", &channels.news),
            ("JOBS", &channels.jobs),
            ("ASK", &channels.ask),
        ] {
            code = with_line(
                &code,
                &format!("{name} = "),
                &format!("{name} = ({:?}, {:?})", channel.id, channel.token),
            );
        }
        run("python3", &["-I", "-c", &code], "the Python block").await
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn the_node_block_runs_with_the_built_in_fetch() {
    let server = TestServer::start().await;
    let code = block("javascript", "async function publish(");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("publish.mjs");
    check_program(&server, async |channels: &Channels| {
        let mut code = with_line(
            &code,
            "const WRS = ",
            &format!("const WRS = \"http://{}\";", server.addr),
        );
        for (name, channel) in [
            ("NEWS", &channels.news),
            ("JOBS", &channels.jobs),
            ("ASK", &channels.ask),
        ] {
            code = with_line(
                &code,
                &format!("const {name} = "),
                &format!(
                    "const {name} = {};",
                    json!({"id": channel.id, "token": channel.token})
                ),
            );
        }
        std::fs::write(&file, code).expect("write publish.mjs");
        run("node", &[file.to_str().unwrap()], "the Node block").await
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn the_history_channel_of_section_7_is_created_as_written() {
    let server = TestServer::start().await;
    let code = block("sh", "\"history\":{\"size\":1000");
    let printed = run(
        "sh",
        &[
            "-c",
            &code.replace("127.0.0.1:8080", &server.addr.to_string()),
        ],
        "the create block of 7.1",
    )
    .await;
    let created: Value = serde_json::from_str(&printed).expect("a JSON answer");
    assert_eq!(created["data"]["pattern"], "pub-sub", "{created}");
    assert_eq!(
        created["data"]["history"],
        json!({"size": 1000, "ttl": 3_600_000}),
        "{created}"
    );
    server.shutdown().await;
}

//! The browser side of the documentation, run in real headless Chromium
//! against a live server.
//!
//! The example app `examples/cursor-board`, in two Chromiums (two
//! chromedriver sessions, like two people on two machines), opened from the
//! repository as `file://` URLs exactly as a user would open them, with
//! `?server=` pointing at the test server. Page A creates a board, page B
//! opens A's share link; real WebDriver pointer moves (trusted
//! `pointermove` events) on one page must show up on the other as a cursor
//! at the same place relative to the board, although the two windows have
//! different sizes. Then B leaves and rejoins (and sees A's cursor without
//! A moving), A deletes the board (both pages show close code 4001), and
//! joining the deleted board shows the server's reason. Screenshots land in
//! `<workspace>/artifacts/`.
//!
//! The tutorial's JavaScript (`docs/tutorial.md`), each block taken from
//! the document and typed into a tab's developer console (the console's own
//! evaluation mode, through chromedriver's CDP bridge), with only the
//! server address, channel ids and tokens swapped in: creating, sharing and
//! connecting, the chat, the job queue, the poll, the map-reduce, and a
//! create with the API token; and the live feed of section 7, an
//! `EventSource` that resumes after a drain (by the browser's own
//! `Last-Event-ID`, and by the snippet's reopening once the browser gave
//! up), sees a `reset` when it was away too long, and stops on 4001.

#[path = "common/browser.rs"]
mod browser;
mod common;

use std::path::Path;
use std::time::Duration;

use browser::{Browser, WAIT};
use common::TestServer;
use fantoccini::actions::{InputSource, MouseActions, PointerAction};
use reqwest::{StatusCode, Url};
use serde_json::Value;

/// How often a position wait looks at the page.
const POLL: Duration = Duration::from_millis(25);
/// How far (as a fraction of the board) a shown cursor may be off: about
/// one pixel on these boards, far less than any wrong mapping would be.
const TOLERANCE: f64 = 0.0015;

/// The example page as a `file://` URL, pointed at `server`.
fn board_url(server: &TestServer) -> String {
    let page = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cursor-board/index.html");
    let page = page
        .canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", page.display()));
    let mut url = Url::from_file_path(&page)
        .unwrap_or_else(|()| panic!("{} is not an absolute path", page.display()));
    url.query_pairs_mut()
        .append_pair("server", &format!("http://{}", server.addr));
    url.to_string()
}

/// The board's inner box in the viewport: left, top, width, height.
async fn board_box(page: &Browser) -> [f64; 4] {
    let measured = page
        .execute(
            "const board = document.querySelector('#board');
             board.scrollIntoView({ block: 'center' });
             const rect = board.getBoundingClientRect();
             return [rect.left + board.clientLeft, rect.top + board.clientTop,
                     board.clientWidth, board.clientHeight];",
            vec![],
        )
        .await;
    serde_json::from_value(measured.clone()).unwrap_or_else(|e| panic!("{measured}: {e}"))
}

/// Moves the real (WebDriver) mouse of `page` to the point at fractions
/// `fx`, `fy` of its board, whole CSS pixels as a mouse does; returns the
/// fractions that point really is, i.e. where other pages must show it.
async fn point_at(page: &Browser, fx: f64, fy: f64) -> (f64, f64) {
    let [left, top, width, height] = board_box(page).await;
    let x = (left + fx * width).round();
    let y = (top + fy * height).round();
    let mouse = MouseActions::new("mouse".to_owned()).then(PointerAction::MoveTo {
        duration: Some(Duration::from_millis(0)),
        x,
        y,
    });
    tokio::time::timeout(WAIT, page.client().perform_actions(mouse))
        .await
        .unwrap_or_else(|_| panic!("moving the pointer took longer than {WAIT:?}"))
        .unwrap_or_else(|e| panic!("move the pointer to ({x}, {y}): {e}"));
    ((x - left) / width, (y - top) / height)
}

/// What `page` shows of the peer `peer`: the position it was sent
/// (`data-x`, `data-y`), where the cursor is drawn (as fractions of the
/// board's inner box) and its name label; `Value::Null` when no visible
/// cursor for that peer is on the board.
async fn cursor_of(page: &Browser, peer: &str) -> Value {
    page.execute(
        "const board = document.querySelector('#board');
         const cursor = Array.from(board.querySelectorAll('.cursor'))
           .find((c) => c.dataset.peer === arguments[0]);
         if (!cursor || cursor.hidden) return null;
         const b = board.getBoundingClientRect();
         const c = cursor.getBoundingClientRect();
         return {
           sentX: Number(cursor.dataset.x), sentY: Number(cursor.dataset.y),
           drawnX: (c.left - b.left - board.clientLeft) / board.clientWidth,
           drawnY: (c.top - b.top - board.clientTop) / board.clientHeight,
           label: cursor.querySelector('.label').textContent,
         };",
        vec![Value::from(peer)],
    )
    .await
}

/// Waits until `page` shows `peer`'s cursor, labelled `name`, at `at` —
/// both as the position received and as drawn on its board.
async fn wait_for_cursor(page: &Browser, peer: &str, name: &str, at: (f64, f64)) {
    let close = |a: &Value, key: &str, want: f64| {
        a[key]
            .as_f64()
            .is_some_and(|got| (got - want).abs() <= TOLERANCE)
    };
    let mut seen = Value::Null;
    let found = tokio::time::timeout(WAIT, async {
        loop {
            seen = cursor_of(page, peer).await;
            if seen["label"] == name
                && close(&seen, "sentX", at.0)
                && close(&seen, "sentY", at.1)
                && close(&seen, "drawnX", at.0)
                && close(&seen, "drawnY", at.1)
            {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    if found.is_err() {
        panic!(
            "after {WAIT:?} the page does not show {name}'s cursor ({peer}) at {at:?}; \
             last seen: {seen}; the page shows:\n{}",
            page.page_text().await
        );
    }
}

/// Waits until `page` lists exactly `count` people (itself included).
async fn wait_for_count(page: &Browser, count: usize) {
    page.wait_for(&format!("#peer-count[data-count='{count}']"))
        .await;
}

/// The CSS selector of `peer`'s entry in the list of people.
fn listed(peer: &str) -> String {
    format!("#peers li[data-peer='{peer}']")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_board_shows_each_pages_pointer_on_the_other() {
    let server = TestServer::start().await;
    let (a, b) = tokio::join!(Browser::start(), Browser::start());
    // B's window is smaller: positions must map relative to the board.
    tokio::time::timeout(WAIT, b.client().set_window_size(1000, 900))
        .await
        .expect("resizing took too long")
        .expect("resize page B's window");

    // A creates a board.
    a.goto(&board_url(&server)).await;
    a.wait_for("body[data-ready=true]").await;
    a.click("#create").await;
    a.wait_for("#status[data-state=open]").await;
    a.fill("#name", "Ada").await;
    let id = a.text("#board-id").await;
    let (status, body) = server.get(&format!("/channels/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["pattern"], "pub-sub", "{body}");
    let link = a.value("#share-link").await;
    let shared = Url::parse(&link).unwrap_or_else(|e| panic!("share link {link:?}: {e}"));
    assert_eq!(shared.scheme(), "file", "{link}");
    let server_param = shared
        .query_pairs()
        .find(|(key, _)| key == "server")
        .map(|(_, value)| value.into_owned());
    assert_eq!(
        server_param,
        Some(format!("http://{}", server.addr)),
        "{link}"
    );
    let fragment = shared.fragment().unwrap_or_default();
    let token = fragment
        .strip_prefix(&format!("channel={id}&token="))
        .unwrap_or_else(|| panic!("no board in the share link {link}"))
        .to_owned();
    assert_eq!(token.len(), 16, "{link}");
    // The address bar shows the board too, so a reload stays on it.
    let address = tokio::time::timeout(WAIT, a.client().current_url())
        .await
        .expect("reading the address took too long")
        .expect("page A's address");
    assert_eq!(address.fragment(), Some(fragment), "{address}");

    // B opens the link and joins.
    b.goto(&link).await;
    b.wait_for("body[data-ready=true]").await;
    b.wait_for("#status[data-state=open]").await;
    assert_eq!(b.text("#board-id").await, id);
    b.fill("#name", "Grace").await;
    server.wait_for_clients(&id, 2).await;

    let a_id = a.attr("#me", "data-peer").await.expect("A's id");
    let b_id = b.attr("#me", "data-peer").await.expect("B's id");
    assert_ne!(a_id, b_id);
    for (page, other, name) in [(&a, &b_id, "Grace"), (&b, &a_id, "Ada")] {
        wait_for_count(page, 2).await;
        page.wait_for(&listed(other)).await;
        let entry = listed(other);
        common::eventually(&format!("{name} listed"), || async {
            page.text(&entry).await.contains(name).then_some(())
        })
        .await;
    }

    // A's pointer appears on B's board, B's on A's, and A's follows a move.
    let at = point_at(&a, 0.25, 0.40).await;
    wait_for_cursor(&b, &a_id, "Ada", at).await;
    let at = point_at(&b, 0.70, 0.65).await;
    wait_for_cursor(&a, &b_id, "Grace", at).await;
    let a_last = point_at(&a, 0.80, 0.20).await;
    wait_for_cursor(&b, &a_id, "Ada", a_last).await;
    // Pub-sub never echoes: no page draws its own pointer as a peer's.
    assert_eq!(cursor_of(&a, &a_id).await, Value::Null);
    assert_eq!(cursor_of(&b, &b_id).await, Value::Null);
    a.screenshot("example-cursor-board-a.png").await;
    b.screenshot("example-cursor-board-b.png").await;

    // B leaves: A takes B off its board at once.
    b.click("#leave").await;
    b.wait_for("#status[data-state=idle]").await;
    wait_for_count(&a, 1).await;
    assert!(a.find_all(&listed(&b_id)).await.is_empty());
    assert_eq!(cursor_of(&a, &b_id).await, Value::Null);
    server.wait_for_clients(&id, 1).await;

    // B joins again from the form, which the page filled in: A answers
    // B's join, so B shows A's cursor where it is, without A moving.
    assert_eq!(b.value("#join-id").await, id);
    b.click("#join").await;
    b.wait_for("#status[data-state=open]").await;
    wait_for_cursor(&b, &a_id, "Ada", a_last).await;
    wait_for_count(&a, 2).await;
    a.wait_for(&listed(&b_id)).await;

    // A deletes the board: the server closes both pages with 4001.
    a.click("#delete").await;
    for page in [&a, &b] {
        page.wait_for("#status[data-state=closed][data-close-code='4001']")
            .await;
        page.wait_for("#error[data-error=board_deleted]:not([hidden])")
            .await;
        page.wait_for("#setup:not([hidden])").await;
    }
    let (status, body) = server.get(&format!("/channels/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    b.screenshot("example-cursor-board-deleted.png").await;

    // Joining the deleted board fails with the server's reason, which the
    // page finds out although the browser hides why a WebSocket failed.
    b.fill("#join-id", &id).await;
    b.fill("#join-token", &token).await;
    b.click("#join").await;
    b.wait_for("#error[data-error=channel_not_found]:not([hidden])")
        .await;
    b.wait_for("#status[data-state=closed]").await;
    assert!(b.displayed("#setup").await);

    a.close().await;
    b.close().await;
    server.shutdown().await;
}

// --- The tutorial's browser code, run as written ---------------------------

/// The tutorial; its JavaScript blocks are run below as a reader runs them.
const TUTORIAL: &str = include_str!("../../../docs/tutorial.md");

/// The tutorial's one JavaScript block that contains `marker`.
fn snippet(marker: &str) -> String {
    let found: Vec<&str> = TUTORIAL
        .split("```js\n")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .filter(|block| block.contains(marker))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "docs/tutorial.md should have exactly one JavaScript block with {marker:?}"
    );
    found[0].to_owned()
}

/// `code` with every `from` replaced by `to`; `from` must occur.
fn replaced(code: &str, from: &str, to: &str) -> String {
    assert!(
        code.contains(from),
        "the tutorial's snippet no longer contains {from:?}:\n{code}"
    );
    code.replace(from, to)
}

/// `code` with its line that starts with `prefix` replaced by `line`.
fn with_line(code: &str, prefix: &str, line: &str) -> String {
    assert_eq!(
        code.lines().filter(|l| l.starts_with(prefix)).count(),
        1,
        "the tutorial's snippet should have one line starting {prefix:?}:\n{code}"
    );
    code.lines()
        .map(|l| if l.starts_with(prefix) { line } else { l })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A snippet pointed at `server` instead of `127.0.0.1:8080`.
fn for_server(code: &str, server: &TestServer) -> String {
    replaced(code, "127.0.0.1:8080", &server.addr.to_string())
}

/// A snippet with its `const ID = ..., TOKEN = ...;` line set to a channel.
fn with_channel(code: &str, id: &str, token: &str) -> String {
    with_line(
        code,
        "const ID = ",
        &format!("const ID = {id:?}, TOKEN = {token:?};"),
    )
}

/// Code typed into the developer console: chromedriver's CDP bridge runs
/// `Runtime.evaluate` with `replMode`, the console's own mode (top-level
/// `await`; declarations stay global for the snippets that follow).
#[derive(Debug)]
struct ConsoleEval(String);

impl fantoccini::wd::WebDriverCompatibleCommand for ConsoleEval {
    fn endpoint(
        &self,
        base_url: &Url,
        session_id: Option<&str>,
    ) -> Result<Url, <Url as std::str::FromStr>::Err> {
        base_url.join(&format!(
            "session/{}/goog/cdp/execute",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _request_url: &Url) -> (reqwest::Method, Option<String>) {
        let body = serde_json::json!({
            "cmd": "Runtime.evaluate",
            "params": {
                "expression": self.0,
                "replMode": true,
                "awaitPromise": true,
                "returnByValue": true,
            },
        });
        (reqwest::Method::POST, Some(body.to_string()))
    }
}

/// What every tab's console prints is also kept in `window.__logs`, one
/// string per call, objects as JSON; `prompt` answers `window.__answer`.
const CONSOLE_HOOK: &str = "
window.__logs = [];
for (const level of ['log', 'warn', 'table']) {
  const original = console[level].bind(console);
  console[level] = (...args) => {
    window.__logs.push(args.map((a) => typeof a === 'string' ? a : JSON.stringify(a)).join(' '));
    original(...args);
  };
}
window.prompt = (question) => {
  window.__logs.push('prompt: ' + question);
  return window.__answer;
};
";

/// Browser tabs (windows of one Chromium) with a console each.
struct Tabs {
    browser: Browser,
    /// The window the browser started with, until it is used.
    unused: Option<Tab>,
}

type Tab = fantoccini::wd::WindowHandle;

impl Tabs {
    async fn start() -> Self {
        let browser = Browser::start().await;
        let unused = bounded(browser.client().window())
            .await
            .expect("the first window");
        Self {
            browser,
            unused: Some(unused),
        }
    }

    /// Opens `url` in a tab of its own.
    async fn open(&mut self, url: &str) -> Tab {
        let tab = match self.unused.take() {
            Some(tab) => tab,
            None => {
                bounded(self.browser.client().new_window(false))
                    .await
                    .expect("a new window")
                    .handle
            }
        };
        self.select(&tab).await;
        self.browser.goto(url).await;
        self.run(&tab, CONSOLE_HOOK).await;
        tab
    }

    async fn select(&self, tab: &Tab) {
        bounded(self.browser.client().switch_to_window(tab.clone()))
            .await
            .expect("switch window");
    }

    /// Runs `code` in `tab`'s console; returns its completion value and
    /// fails the test on an exception.
    async fn run(&self, tab: &Tab, code: &str) -> Value {
        self.select(tab).await;
        let answer = bounded(
            self.browser
                .client()
                .issue_cmd(ConsoleEval(code.to_owned())),
        )
        .await
        .unwrap_or_else(|e| panic!("console: {e}\n{code}"));
        if let Some(details) = answer.get("exceptionDetails") {
            panic!(
                "the console threw: {}\n{code}",
                details["exception"]["description"]
                    .as_str()
                    .map_or_else(|| details.to_string(), str::to_owned)
            );
        }
        answer["result"]["value"].clone()
    }

    /// What `tab`'s console printed so far.
    async fn logs(&self, tab: &Tab) -> Vec<String> {
        let logs = self.run(tab, "window.__logs").await;
        serde_json::from_value(logs.clone()).unwrap_or_else(|e| panic!("{logs}: {e}"))
    }

    /// Waits until `tab`'s console printed `count` lines containing `text`;
    /// returns those lines.
    async fn wait_for_logs(&self, tab: &Tab, text: &str, count: usize) -> Vec<String> {
        let mut seen = Vec::new();
        let found = tokio::time::timeout(WAIT, async {
            loop {
                seen = self.logs(tab).await;
                let matching: Vec<String> =
                    seen.iter().filter(|l| l.contains(text)).cloned().collect();
                if matching.len() >= count {
                    return matching;
                }
                tokio::time::sleep(POLL).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "after {WAIT:?} the console has not printed {count}× {text:?}; it printed {seen:#?}"
            )
        })
    }

    async fn close(self) {
        self.browser.close().await;
    }
}

/// Awaits one WebDriver call, bounded by [`WAIT`].
async fn bounded<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("a browser call took longer than {WAIT:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_browser_code_runs_as_written() {
    // The tutorial says every one of its JavaScript blocks runs here: a new
    // block needs its place below (the live feed of section 7 runs in
    // `tutorial_live_feed_resumes_after_a_drain`).
    assert_eq!(
        TUTORIAL.matches("```js\n").count(),
        15,
        "docs/tutorial.md has a JavaScript block this test does not run"
    );
    let server = TestServer::start().await;
    let mut tabs = Tabs::start().await;
    let readme = server.url("/readme");

    // 3.1 to 3.3: create, share, connect.
    let first = tabs.open(&readme).await;
    tabs.run(
        &first,
        &for_server(&snippet("const created = await response.json()"), &server),
    )
    .await;
    let created = tabs.run(&first, "[created.data.id, created.token]").await;
    let [id, token]: [String; 2] =
        serde_json::from_value(created.clone()).unwrap_or_else(|e| panic!("{created}: {e}"));
    let (status, body) = server.get(&format!("/channels/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (
            &body["data"]["pattern"],
            &body["data"]["clientLimit"],
            &body["data"]["timeout"]
        ),
        (
            &Value::from("pub-sub"),
            &Value::from(10),
            &Value::from(3_600_000)
        ),
        "{body}"
    );
    tabs.wait_for_logs(&first, &format!("id: {id} token: {token}"), 1)
        .await;

    tabs.run(&first, &snippet("const link = ")).await;
    let link = format!("{readme}#channel={id}&token={token}");
    tabs.wait_for_logs(&first, &link, 1).await;
    tabs.browser.goto(&link).await;
    tabs.run(&first, &snippet("const fragment = new URLSearchParams"))
        .await;
    let from_link = tabs.run(&first, "[channelId, channelToken]").await;
    assert_eq!(from_link, serde_json::json!([id, token]));

    let connect = with_channel(
        &for_server(&snippet("console.log(\"connected\")"), &server),
        &id,
        &token,
    );
    tabs.run(&first, &connect).await;
    tabs.wait_for_logs(&first, "connected", 1).await;
    server.wait_for_clients(&id, 1).await;
    // 3.4: a refused connect is told in the close frame. The reconnecting
    // client stops for good on 4404, and retries a full channel (4409)
    // until there is room.
    let retrying = for_server(&snippet("const FINAL = "), &server);
    let gone = tabs.open(&readme).await;
    tabs.run(&gone, &with_channel(&retrying, "NOPE-NOPE", "x"))
        .await;
    tabs.wait_for_logs(&gone, "closed: 4404 channel_not_found", 1)
        .await;
    let full = server
        .create(serde_json::json!({"pattern": "pub-sub", "clientLimit": 1}))
        .await;
    let member = server.connect(&full).await;
    let member_id = server.client_ids(&full.id).await;
    let waiting = tabs.open(&readme).await;
    tabs.run(&waiting, &with_channel(&retrying, &full.id, &full.token))
        .await;
    tabs.wait_for_logs(&waiting, "closed: 4409 channel_full", 2)
        .await;
    member.close().await;
    common::eventually("the waiting client gets the free place", || async {
        let ids = server.client_ids(&full.id).await;
        (ids.len() == 1 && ids != member_id).then_some(())
    })
    .await;
    // Meanwhile (two back-offs) the client told 4404 never came back.
    let closes = tabs.logs(&gone).await;
    let closes: Vec<_> = closes.iter().filter(|l| l.starts_with("closed:")).collect();
    assert_eq!(closes, ["closed: 4404 channel_not_found"]);

    // 4.1 The chat: Ada is alone when she greets; Grace's greeting and
    // Ada's next line reach the other one.
    let chat = server.create_pattern("pub-sub").await;
    let code = with_channel(
        &for_server(&snippet("const chat = new WebSocket"), &server),
        &chat.id,
        &chat.token,
    );
    let ada = tabs.open(&readme).await;
    tabs.run(&ada, &code).await;
    server.wait_for_clients(&chat.id, 1).await;
    let grace = tabs.open(&readme).await;
    tabs.run(
        &grace,
        &replaced(&code, "const NAME = \"Ada\"", "const NAME = \"Grace\""),
    )
    .await;
    tabs.wait_for_logs(&ada, "Grace: hi, Grace here", 1).await;
    tabs.run(&ada, "say(\"how is everyone?\")").await;
    tabs.wait_for_logs(&grace, "Ada: how is everyone?", 1).await;
    assert!(
        !tabs
            .logs(&grace)
            .await
            .iter()
            .any(|l| l.contains("Ada: hi")),
        "Ada greeted while alone"
    );

    // 4.2 The job queue: a producer, two workers, twenty jobs.
    let producer = tabs.open(&readme).await;
    tabs.run(
        &producer,
        &for_server(&snippet("const JOBS = await createChannel"), &server),
    )
    .await;
    let printed = tabs.wait_for_logs(&producer, "const JOBS = ", 1).await;
    let worker_code = with_line(
        &for_server(&snippet("jobs.onmessage"), &server),
        "const JOBS = ",
        &printed[0],
    );
    let workers = [tabs.open(&readme).await, tabs.open(&readme).await];
    for worker in &workers {
        tabs.run(worker, &worker_code).await;
    }
    let jobs_id = tabs.run(&producer, "JOBS.id").await;
    server
        .wait_for_clients(jobs_id.as_str().expect("jobs id"), 2)
        .await;
    tabs.run(&producer, &snippet("const queue = connect(JOBS)"))
        .await;
    tabs.wait_for_logs(&producer, "primes below 2 000 000: 148933", 1)
        .await;
    // Round-robin: both workers took jobs, and together all twenty.
    let mut done = 0;
    for worker in &workers {
        done += tabs.wait_for_logs(worker, " did job ", 1).await.len();
    }
    assert!(done >= 20, "the workers did {done} jobs");

    // 4.3 The poll: two voters, a host who asks and publishes.
    let poll = server.create_pattern("req-repl").await;
    let voter_code = with_channel(
        &for_server(&snippet("const voter = "), &server),
        &poll.id,
        &poll.token,
    );
    let voters = [tabs.open(&readme).await, tabs.open(&readme).await];
    for (voter, answer) in voters.iter().zip(["tabs", "spaces"]) {
        tabs.run(voter, &format!("window.__answer = {answer:?};"))
            .await;
        tabs.run(voter, &voter_code).await;
    }
    let host = tabs.open(&readme).await;
    tabs.run(
        &host,
        &with_channel(
            &for_server(&snippet("function ask("), &server),
            &poll.id,
            &poll.token,
        ),
    )
    .await;
    server.wait_for_clients(&poll.id, 3).await;
    tabs.run(&host, "ask(\"Tabs or spaces?\", [\"tabs\", \"spaces\"])")
        .await;
    tabs.wait_for_logs(&host, " voted ", 2).await;
    let totals = tabs.run(&host, "tally()").await;
    assert_eq!(totals, serde_json::json!({"tabs": 1, "spaces": 1}));
    tabs.run(&host, "publish()").await;
    for voter in &voters {
        tabs.wait_for_logs(voter, "prompt: Tabs or spaces? (tabs / spaces)", 1)
            .await;
        let shown = tabs.wait_for_logs(voter, "{\"", 1).await;
        let shown: Value =
            serde_json::from_str(&shown[0]).unwrap_or_else(|e| panic!("{shown:?}: {e}"));
        assert_eq!(shown, totals, "the published results");
    }

    // 4.4 The map-reduce: two workers, eight parts of the readme page.
    let words = server.create_pattern("fan-in-out").await;
    let worker_code = with_channel(
        &for_server(&snippet("function countWords("), &server),
        &words.id,
        &words.token,
    );
    let counters = [tabs.open(&readme).await, tabs.open(&readme).await];
    for counter in &counters {
        tabs.run(counter, &worker_code).await;
    }
    let coordinator = tabs.open(&readme).await;
    tabs.run(
        &coordinator,
        &with_channel(
            &for_server(&snippet("function mapReduce("), &server),
            &words.id,
            &words.token,
        ),
    )
    .await;
    server.wait_for_clients(&words.id, 3).await;
    tabs.run(&coordinator, "mapReduce(document.body.innerText, 8)")
        .await;
    let table = tabs.wait_for_logs(&coordinator, "[[", 1).await;
    let top: Vec<(String, u64)> =
        serde_json::from_str(&table[0]).unwrap_or_else(|e| panic!("{table:?}: {e}"));
    // Round-robin: the eight parts went four to each worker.
    for counter in &counters {
        let parts = tabs.wait_for_logs(counter, "counted part ", 4).await;
        assert_eq!(parts.len(), 4, "{parts:?}");
    }
    // The same page counted in one piece (a worker tab shows the same
    // readme) gives the same ten most frequent counts.
    let whole = tabs
        .run(&counters[0], "countWords(document.body.innerText)")
        .await;
    let whole: std::collections::HashMap<String, u64> =
        serde_json::from_value::<Vec<(String, u64)>>(whole)
            .expect("word counts")
            .into_iter()
            .collect();
    let mut most: Vec<u64> = whole.values().copied().collect();
    most.sort_unstable_by(|a, b| b.cmp(a));
    most.truncate(10);
    assert_eq!(top.len(), 10, "{top:?}");
    assert_eq!(
        top.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        most,
        "map-reduce {top:?}"
    );
    for (word, count) in &top {
        assert_eq!(whole.get(word), Some(count), "{word}: {top:?}");
    }

    // 2.3 Creating with the API token, from a page.
    let guarded = TestServer::with(|c| {
        c.auth = true;
        c.auth_token = Some(wrs::config::Secret::new("s3cret"));
        c.auth_resources = "POST:/channels DELETE:/channels *:/reset *:/cluster/"
            .parse()
            .unwrap();
    })
    .await;
    let page = tabs.open(&guarded.url("/readme")).await;
    tabs.run(
        &page,
        &for_server(&snippet("\"Authorization\": \"Bearer s3cret\""), &guarded),
    )
    .await;
    let created = tabs.wait_for_logs(&page, "201 {", 1).await;
    assert!(
        created[0].contains("\"pattern\":\"pub-sub\""),
        "{created:?}"
    );
    guarded.shutdown().await;

    tabs.close().await;
    server.shutdown().await;
}

/// Publishes one message over HTTP; it must be accepted.
async fn publish(server: &TestServer, channel: &common::Created, body: Vec<u8>, binary: bool) {
    let response = bounded(
        server
            .http
            .post(server.url(&format!("/channels/{}/messages", channel.id)))
            .header("wrs-token", &channel.token)
            .header(
                "content-type",
                if binary {
                    "application/octet-stream"
                } else {
                    "text/plain"
                },
            )
            .body(body)
            .send(),
    )
    .await
    .expect("publish");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
}

/// How many refused connects `/metrics` counts for `reason`.
async fn rejections(server: &TestServer, reason: &str) -> u64 {
    let text = bounded(
        bounded(server.http.get(server.url("/metrics")).send())
            .await
            .expect("metrics")
            .text(),
    )
    .await
    .expect("metrics text");
    let line = format!("wrs_connect_rejections_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or(0, |n| n.trim().parse().expect("a count"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_live_feed_resumes_after_a_drain() {
    let server = TestServer::start().await;
    // History of 5, so that a longer absence ends in a `reset`.
    let channel = server
        .create(serde_json::json!({"pattern": "pub-sub", "history": {"size": 5}}))
        .await;
    let mut tabs = Tabs::start().await;
    let tab = tabs.open(&server.url("/readme")).await;
    let code = with_channel(
        &for_server(&snippet("function openFeed()"), &server),
        &channel.id,
        &channel.token,
    );
    tabs.run(&tab, &code).await;
    server.wait_for_clients(&channel.id, 1).await;
    let (_, clients) = server
        .get(&format!("/channels/{}/clients", channel.id))
        .await;
    assert_eq!(clients["data"][0]["transport"], "sse", "{clients}");

    // Live: text (its line breaks, whichever, arrive as \n) and binary.
    for text in ["one", "two\nlines", "three\r\ncrlf"] {
        publish(&server, &channel, text.into(), false).await;
    }
    publish(&server, &channel, vec![0, 1, 2, 255], true).await;
    tabs.wait_for_logs(&tab, "#4 binary, 4 bytes: 0 1 2 255", 1)
        .await;

    // A drain closes the stream with 1012. What is published meanwhile
    // arrives once the browser reconnects by itself (after the stream's
    // retry delay, 1 s) with Last-Event-ID, the node being ready again.
    let (status, body) = server.post("/cluster/test-node/drain", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.wait_for_clients(&channel.id, 0).await;
    publish(&server, &channel, "while away".into(), false).await;
    let (status, body) = server.post("/cluster/test-node/ready", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    tabs.wait_for_logs(&tab, "feed closed: 1012 draining", 1)
        .await;
    tabs.wait_for_logs(&tab, "#5 while away", 1).await;
    server.wait_for_clients(&channel.id, 1).await;
    publish(&server, &channel, "live again".into(), false).await;
    tabs.wait_for_logs(&tab, "#6 live again", 1).await;
    let logs = tabs.logs(&tab).await;
    assert!(
        !logs.iter().any(|l| l.contains("gave up")),
        "the browser's own reconnect resumed the feed: {logs:#?}"
    );

    // A drain that lasts: the browser's reconnect is refused (503) and it
    // gives up; the snippet opens a new EventSource with ?lastEventId=.
    // Six messages meanwhile overflow the history of 5: `reset` first,
    // then the five kept ones.
    let (status, body) = server.post("/cluster/test-node/drain", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    tabs.wait_for_logs(&tab, "feed closed: 1012 draining", 2)
        .await;
    for n in 1..=6 {
        publish(&server, &channel, format!("away {n}").into_bytes(), false).await;
    }
    tabs.wait_for_logs(&tab, "the browser gave up reconnecting", 1)
        .await;
    assert!(rejections(&server, "draining").await >= 1);
    let (status, body) = server.post("/cluster/test-node/ready", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    tabs.wait_for_logs(&tab, "#12 away 6", 1).await;
    let reset = tabs
        .wait_for_logs(&tab, "missed: what came before #8 is no longer kept", 1)
        .await;
    assert_eq!(reset.len(), 1, "{reset:?}");

    // Every message once, in order: nothing lost (but the one the
    // history no longer had) and nothing twice.
    let shown: Vec<String> = tabs
        .logs(&tab)
        .await
        .into_iter()
        .filter(|l| l.starts_with('#'))
        .collect();
    assert_eq!(
        shown,
        [
            "#1 one",
            "#2 two\nlines",
            "#3 three\ncrlf",
            "#4 binary, 4 bytes: 0 1 2 255",
            "#5 while away",
            "#6 live again",
            "#8 away 2",
            "#9 away 3",
            "#10 away 4",
            "#11 away 5",
            "#12 away 6",
        ]
    );

    // Deleted: 4001, and the snippet closes the EventSource, so the
    // browser does not come back (it would be refused as not found).
    server.wait_for_clients(&channel.id, 1).await;
    let (status, body) = server.delete(&format!("/channels/{}", channel.id)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    tabs.wait_for_logs(&tab, "feed closed: 4001 channel deleted", 1)
        .await;
    assert_eq!(tabs.run(&tab, "feed.readyState").await, 2);
    // Twice the retry delay: a reconnect would have been refused by now.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert_eq!(rejections(&server, "channel_not_found").await, 0);

    tabs.close().await;
    server.shutdown().await;
}

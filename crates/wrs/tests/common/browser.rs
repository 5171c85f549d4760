//! A real headless Chromium for the page tests, driven over WebDriver:
//! each [`Browser`] spawns its own `chromedriver --port=0` (which picks a
//! free port and prints it), opens a session through fantoccini with a
//! fresh profile directory, and tears all of it down again. Every browser
//! call is bounded by [`WAIT`] (starting by [`START_WAIT`]); element waits
//! poll the DOM, so no test sleeps to synchronise.
//!
//! Debian's `chromium` and `chromium-driver` packages provide the two
//! binaries (`scripts/test.sh` installs them); without them every page test
//! fails with a message that says so.

#![allow(dead_code)] // Each test uses a different subset.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Upper bound for one browser step: a click, a lookup, an element wait.
pub const WAIT: Duration = Duration::from_secs(15);
/// Upper bound for starting chromedriver and Chromium on a busy machine.
pub const START_WAIT: Duration = Duration::from_secs(60);
/// How often element waits look at the DOM.
const POLL: Duration = Duration::from_millis(25);

/// Debian's Chromium (package `chromium`).
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's ChromeDriver (package `chromium-driver`).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Headless, and quiet on the network: this machine allows no outside
/// connections, and Chromium's background services would try many.
const CHROMIUM_ARGS: [&str; 10] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1300",
];

/// Awaits a browser step, failing the test after `limit`.
async fn within<F: Future>(limit: Duration, what: &str, future: F) -> F::Output {
    match tokio::time::timeout(limit, future).await {
        Ok(output) => output,
        Err(_) => panic!("browser: timed out after {limit:?}: {what}"),
    }
}

/// A headless Chromium session with its own chromedriver and profile.
/// Dropping it kills chromedriver and the browser it started.
pub struct Browser {
    client: Option<Client>,
    driver: Child,
    profile: PathBuf,
}

impl Browser {
    /// Starts chromedriver and a Chromium session.
    ///
    /// # Panics
    ///
    /// When a binary is missing (naming the Debian package), or when
    /// either process does not come up within [`START_WAIT`].
    pub async fn start() -> Self {
        for (binary, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                Path::new(binary).is_file(),
                "{binary} is missing: the browser tests need Debian's `{package}` package \
                 (scripts/test.sh installs it: apt-get install -y chromium chromium-driver)"
            );
        }
        let profile = fresh_profile_dir();
        // Its own process group, so that Drop can end chromedriver together
        // with the Chromium processes it started.
        let mut driver = Command::new(CHROMEDRIVER)
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}"));
        let stdout = driver.stdout.take().expect("chromedriver stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let port = within(START_WAIT, "chromedriver to report its port", async {
            while let Some(line) = lines.next_line().await.expect("read chromedriver output") {
                // "ChromeDriver was started successfully on port 41235."
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    return rest
                        .trim_end_matches('.')
                        .trim()
                        .parse::<u16>()
                        .unwrap_or_else(|e| {
                            panic!("chromedriver printed an unreadable port ({e}): {line}")
                        });
                }
            }
            panic!("chromedriver exited before it was ready");
        })
        .await;
        // Keep draining its output so it never blocks on a full pipe; the
        // task ends when chromedriver exits.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("chromedriver: {line}");
            }
        });

        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| (*a).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
            "timeouts": { "pageLoad": WAIT.as_millis() as u64, "script": WAIT.as_millis() as u64 },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!("a JSON object literal")
        };
        let mut builder = ClientBuilder::new(HttpConnector::new());
        builder.capabilities(capabilities);
        let webdriver = format!("http://127.0.0.1:{port}");
        let client = within(
            START_WAIT,
            "a Chromium session",
            builder.connect(&webdriver),
        )
        .await
        .unwrap_or_else(|e| {
            panic!("cannot start Chromium through chromedriver at {webdriver}: {e}")
        });
        Self {
            client: Some(client),
            driver,
            profile,
        }
    }

    /// The WebDriver client, for anything the helpers below do not cover.
    pub fn client(&self) -> &Client {
        self.client
            .as_ref()
            .expect("the session is open until close()")
    }

    /// Loads `url` and waits for the page's `load` event.
    pub async fn goto(&self, url: &str) {
        within(WAIT, &format!("load {url}"), self.client().goto(url))
            .await
            .unwrap_or_else(|e| panic!("load {url}: {e}"));
    }

    /// Waits until an element matching `css` exists and returns it. On
    /// timeout the panic shows what the page displays, to tell why.
    pub async fn wait_for(&self, css: &str) -> Element {
        let found = within(
            WAIT + Duration::from_secs(5),
            &format!("wait for {css}"),
            self.client()
                .wait()
                .at_most(WAIT)
                .every(POLL)
                .for_element(Locator::Css(css)),
        )
        .await;
        match found {
            Ok(element) => element,
            Err(e) => panic!(
                "no element matches {css} after {WAIT:?} ({e}); the page shows:\n{}",
                self.page_text().await
            ),
        }
    }

    /// Every element matching `css` now (possibly none).
    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        within(
            WAIT,
            &format!("find {css}"),
            self.client().find_all(Locator::Css(css)),
        )
        .await
        .unwrap_or_else(|e| panic!("find {css}: {e}"))
    }

    /// Waits until at least `n` elements match `css`; returns them all.
    pub async fn wait_for_count(&self, css: &str, n: usize) -> Vec<Element> {
        let found = tokio::time::timeout(WAIT, async {
            loop {
                let found = self.find_all(css).await;
                if found.len() >= n {
                    return found;
                }
                tokio::time::sleep(POLL).await;
            }
        })
        .await;
        match found {
            Ok(found) => found,
            Err(_) => panic!(
                "fewer than {n} elements match {css} after {WAIT:?}; the page shows:\n{}",
                self.page_text().await
            ),
        }
    }

    /// Clicks the element matching `css` once it exists.
    pub async fn click(&self, css: &str) {
        let element = self.wait_for(css).await;
        within(WAIT, &format!("click {css}"), element.click())
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Replaces the content of the input or textarea matching `css`.
    pub async fn fill(&self, css: &str, text: &str) {
        let element = self.wait_for(css).await;
        within(WAIT, &format!("clear {css}"), element.clear())
            .await
            .unwrap_or_else(|e| panic!("clear {css}: {e}"));
        within(WAIT, &format!("type into {css}"), element.send_keys(text))
            .await
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// Chooses the option with `value` in the select matching `css`.
    pub async fn select(&self, css: &str, value: &str) {
        let element = self.wait_for(css).await;
        within(
            WAIT,
            &format!("select {value} in {css}"),
            element.select_by_value(value),
        )
        .await
        .unwrap_or_else(|e| panic!("select {value} in {css}: {e}"));
    }

    /// The rendered text of the element matching `css`.
    pub async fn text(&self, css: &str) -> String {
        let element = self.wait_for(css).await;
        within(WAIT, &format!("text of {css}"), element.text())
            .await
            .unwrap_or_else(|e| panic!("text of {css}: {e}"))
    }

    /// The current `value` of the input or textarea matching `css`.
    pub async fn value(&self, css: &str) -> String {
        let element = self.wait_for(css).await;
        within(WAIT, &format!("value of {css}"), element.prop("value"))
            .await
            .unwrap_or_else(|e| panic!("value of {css}: {e}"))
            .unwrap_or_default()
    }

    /// Whether the element matching `css` is rendered visibly.
    pub async fn displayed(&self, css: &str) -> bool {
        let element = self.wait_for(css).await;
        within(
            WAIT,
            &format!("visibility of {css}"),
            element.is_displayed(),
        )
        .await
        .unwrap_or_else(|e| panic!("visibility of {css}: {e}"))
    }

    /// An attribute of the element matching `css`.
    pub async fn attr(&self, css: &str, name: &str) -> Option<String> {
        let element = self.wait_for(css).await;
        within(
            WAIT,
            &format!("attribute {name} of {css}"),
            element.attr(name),
        )
        .await
        .unwrap_or_else(|e| panic!("attribute {name} of {css}: {e}"))
    }

    /// Runs `script` in the page (`arguments` holds `args`).
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        within(
            WAIT,
            "execute a script",
            self.client().execute(script, args),
        )
        .await
        .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// The visible text of the whole page, for failure messages.
    pub async fn page_text(&self) -> String {
        match tokio::time::timeout(
            WAIT,
            self.client().execute(
                "return document.body ? document.body.innerText : ''",
                vec![],
            ),
        )
        .await
        {
            Ok(Ok(Value::String(text))) => text,
            Ok(Ok(other)) => other.to_string(),
            Ok(Err(e)) => format!("(cannot read the page: {e})"),
            Err(_) => "(the browser did not answer)".to_owned(),
        }
    }

    /// Saves a PNG of the window as the test artifact `name` in the
    /// workspace's `artifacts/` directory (git-ignored) and prints where.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = within(WAIT, "screenshot", self.client().screenshot())
            .await
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n"),
            "the screenshot is not a PNG"
        );
        let dir = artifacts_dir();
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let path = dir.join(name);
        std::fs::write(&path, &png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        println!("screenshot saved: {}", path.display());
        path
    }

    /// Ends the session (Chromium quits), then chromedriver.
    pub async fn close(mut self) {
        if let Some(client) = self.client.take() {
            within(WAIT, "close the Chromium session", client.close())
                .await
                .unwrap_or_else(|e| panic!("close the Chromium session: {e}"));
        }
        // Dropping `self` ends chromedriver and removes the profile.
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium runs in chromedriver's process group; ending the group
        // ends both, also when a test failed with the session still open.
        if let Some(pid) = self.driver.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.driver.start_kill();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// `<workspace>/artifacts`, where test artifacts such as screenshots go.
pub fn artifacts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/wrs sits two levels below the workspace")
        .join("artifacts")
}

/// A new, empty Chromium profile directory under the system temp dir.
fn fresh_profile_dir() -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "wrs-chromium-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

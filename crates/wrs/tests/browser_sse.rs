//! Server-Sent Events and HTTP publishing in a real headless Chromium
//! (SPEC §10): a page served by WRS opens a plain `EventSource`, receives
//! what is published over HTTP (text whose line breaks arrive as `\n`,
//! binary as a `binary` event, each with its history offset as
//! `lastEventId`) and the `close` event with 4001 when the channel is
//! deleted; the test client page (`/client`) opens SSE clients beside
//! WebSocket clients and publishes over HTTP on every pattern, end to end.
//! Screenshots land in `<workspace>/artifacts/`.
//!
//! Chromium and chromedriver come from Debian (`chromium`,
//! `chromium-driver`); see `common/browser.rs` for how they are driven.

#[path = "common/browser.rs"]
mod browser;
mod common;

use std::time::Duration;

use base64::Engine;
use browser::Browser;
use common::{Created, TestServer};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Publishes one message over HTTP with the token in the `WRS-Token`
/// header; returns the status and the JSON answer.
async fn publish(
    server: &TestServer,
    channel: &Created,
    body: Vec<u8>,
    binary: bool,
) -> (StatusCode, Value) {
    let response = common::bounded(
        "publish",
        server
            .http
            .post(server.url(&format!("/channels/{}/messages", channel.id)))
            .header("wrs-token", &channel.token)
            .header(
                "content-type",
                if binary {
                    "application/octet-stream"
                } else {
                    "text/plain; charset=utf-8"
                },
            )
            .body(body)
            .send(),
    )
    .await
    .expect("publish");
    let status = response.status();
    (status, response.json().await.expect("a JSON answer"))
}

/// How many refused connects `/metrics` counts for `reason`.
async fn rejections(server: &TestServer, reason: &str) -> u64 {
    let text = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let line = format!("wrs_connect_rejections_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or(0, |n| n.trim().parse().expect("a count"))
}

/// What the page's `EventSource` recorded: `[type, data, lastEventId]`
/// per event, `open` and `error` included (with the `readyState`).
async fn recorded(browser: &Browser) -> Vec<(String, String, String)> {
    let events = browser.execute("return window.__events", vec![]).await;
    serde_json::from_value(events.clone()).unwrap_or_else(|e| panic!("{events}: {e}"))
}

/// Waits until the page recorded at least `n` events; returns them all.
async fn wait_for_events(browser: &Browser, n: usize) -> Vec<(String, String, String)> {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(browser::WAIT, async {
        loop {
            seen = recorded(browser).await;
            if seen.len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "the page recorded {} of {n} events: {seen:#?}",
        seen.len()
    );
    seen
}

fn event(kind: &str, data: &str, id: &str) -> (String, String, String) {
    (kind.to_owned(), data.to_owned(), id.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_source_receives_http_publishes_and_the_close_event() {
    let server = TestServer::start().await;
    let channel = server
        .create(json!({"pattern": "pub-sub", "history": {"size": 20}}))
        .await;
    let browser = Browser::start().await;
    // A page served by WRS itself; the EventSource is the browser's own.
    browser.goto(&server.url("/readme")).await;
    browser
        .execute(
            "const url = arguments[0];
             window.__events = [];
             const source = new EventSource(url);
             window.__source = source;
             const record = (type) => (event) => window.__events.push(
               [type, event.data === undefined ? String(source.readyState) : event.data,
                event.lastEventId === undefined ? '' : event.lastEventId]);
             for (const type of ['open', 'message', 'binary', 'reset', 'close', 'error']) {
               source.addEventListener(type, record(type));
             }",
            vec![Value::from(format!(
                "/channels/{}/events?token={}",
                channel.id, channel.token
            ))],
        )
        .await;
    wait_for_events(&browser, 1).await;
    server.wait_for_clients(&channel.id, 1).await;

    // Text: every kind of line break arrives as \n; an empty message and a
    // trailing line break survive; non-ASCII text is unchanged.
    let texts = [
        "plain",
        "two\nlines",
        "crlf\r\nline",
        "cr\rline",
        "trailing\n",
        "",
        "grüße ✓",
    ];
    for (i, text) in texts.iter().enumerate() {
        let (status, answer) = publish(&server, &channel, text.as_bytes().to_vec(), false).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        assert_eq!(
            answer["data"],
            json!({"receivers": 1, "offset": i + 1}),
            "{answer}"
        );
    }
    let bytes = vec![0u8, 1, 2, 255, b'\n'];
    let (status, answer) = publish(&server, &channel, bytes.clone(), true).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");

    let seen = wait_for_events(&browser, 9).await;
    let expected = vec![
        event("open", "1", ""),
        event("message", "plain", "1"),
        event("message", "two\nlines", "2"),
        event("message", "crlf\nline", "3"),
        event("message", "cr\nline", "4"),
        event("message", "trailing\n", "5"),
        event("message", "", "6"),
        event("message", "grüße ✓", "7"),
        event(
            "binary",
            &base64::engine::general_purpose::STANDARD.encode(&bytes),
            "8",
        ),
    ];
    assert_eq!(seen, expected);
    browser.screenshot("sse-event-source.png").await;

    // Deleted: a `close` event with 4001 ends the stream. This page does
    // not close its EventSource, so the browser reconnects once, is
    // refused (404) and gives up: what the README's advice to close it on
    // 4001 avoids.
    let (status, body) = server.delete(&format!("/channels/{}", channel.id)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let seen = wait_for_events(&browser, 10).await;
    assert_eq!(seen[9].0, "close", "{seen:#?}");
    let close: Value = serde_json::from_str(&seen[9].1).expect("JSON close data");
    assert_eq!(close, json!({"code": 4001, "reason": "channel deleted"}));
    common::eventually("the browser gives up after a refused reconnect", || async {
        let state = browser
            .execute("return window.__source.readyState", vec![])
            .await;
        (state == 2).then_some(())
    })
    .await;
    assert_eq!(rejections(&server, "channel_not_found").await, 1);
    let seen = recorded(&browser).await;
    assert!(
        seen[10..].iter().all(|(kind, _, _)| kind == "error"),
        "after close only errors: {seen:#?}"
    );
    browser.close().await;
    server.shutdown().await;
}

/// The CSS selector of something inside client panel `n`.
fn panel(n: u32, inner: &str) -> String {
    format!("#client-{n} {inner}")
}

/// The log entries panel `n` received (`data-dir=in`), oldest first.
async fn received(browser: &Browser, n: u32) -> Vec<String> {
    let texts = browser
        .execute(
            "return Array.from(document.querySelectorAll(arguments[0]), (e) => e.textContent)",
            vec![Value::from(panel(
                n,
                "[data-testid=log] li[data-dir=in] [data-testid=body]",
            ))],
        )
        .await;
    serde_json::from_value(texts).expect("an array of strings")
}

/// Creates a channel with the page's form; returns its id and token.
async fn create_in_page(browser: &Browser, pattern: &str, history_size: &str) -> (String, String) {
    let before = browser.value("#channel-id").await;
    browser.select("#pattern", pattern).await;
    browser.fill("#history-size", history_size).await;
    browser.click("#create").await;
    let id = common::eventually("the page shows the new channel", || async {
        let id = browser.value("#channel-id").await;
        (!id.is_empty() && id != before).then_some(id)
    })
    .await;
    browser
        .wait_for(&format!("#channel[data-created='{id}']"))
        .await;
    (id, browser.value("#channel-token").await)
}

/// Publishes the text in the page's form (binary if `binary`) and waits
/// for publish number `count`'s answer; returns its status line and body.
async fn publish_in_page(
    browser: &Browser,
    text: &str,
    binary: bool,
    count: u32,
) -> (String, String) {
    browser.fill("#publish-body", text).await;
    browser
        .click(if binary {
            "#publish-binary"
        } else {
            "#publish-text"
        })
        .await;
    browser
        .wait_for(&format!(
            "#publish-result:not([hidden])[data-state=done][data-count='{count}']"
        ))
        .await;
    (
        browser.text("#publish-status").await,
        browser.text("#publish-response").await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_page_opens_sse_clients_and_publishes_over_http() {
    let server = TestServer::start().await;
    let browser = Browser::start().await;
    browser.goto(&server.url("/client")).await;
    browser.wait_for("body[data-ready=true]").await;

    // Pub-sub with history: a WebSocket client and an SSE client.
    let (id, token) = create_in_page(&browser, "pub-sub", "5").await;
    let (_, body) = server.get(&format!("/channels/{id}")).await;
    assert_eq!(body["data"]["history"]["size"], 5, "{body}");
    assert_eq!(
        browser.text("#sse-url").await,
        format!("http://{}/channels/{id}/events?token={token}", server.addr)
    );
    browser.click("#connect").await;
    browser.wait_for("#client-1[data-state=open]").await;
    browser.click("#connect-sse").await;
    browser
        .wait_for("#client-2[data-transport=sse][data-state=open]")
        .await;
    assert_eq!(
        browser.text(&panel(2, "[data-testid=transport]")).await,
        "SSE"
    );
    assert!(
        !browser.displayed(&panel(2, "[data-testid=send]")).await,
        "an SSE client sends nothing"
    );
    let (_, clients) = server.get(&format!("/channels/{id}/clients")).await;
    let transports: Vec<&str> = clients["data"]
        .as_array()
        .expect("clients")
        .iter()
        .map(|c| c["transport"].as_str().expect("transport"))
        .collect();
    assert_eq!(transports, ["websocket", "sse"]);
    // The channel's details list both, the SSE client marked as such.
    browser.click("#refresh").await;
    let ids: Vec<&str> = clients["data"]
        .as_array()
        .expect("clients")
        .iter()
        .map(|c| c["id"].as_str().expect("id"))
        .collect();
    let listed = format!("{}, {} (sse)", ids[0], ids[1]);
    common::eventually("the page lists both clients", || async {
        let shown = browser
            .execute(
                "const dd = document.querySelector(\"#channel-info dd[data-field='client ids']\");
                 return dd ? dd.textContent : null;",
                vec![],
            )
            .await;
        (shown == listed.as_str()).then_some(())
    })
    .await;
    assert_eq!(
        browser.text("#channel-info dd[data-field=clients]").await,
        "2"
    );
    assert_eq!(
        browser.text("#channel-info dd[data-field=history]").await,
        "size 5, ttl 86400000 ms"
    );
    assert!(
        !browser.displayed("#error").await,
        "showing the details failed: {}",
        browser.text("#error-message").await
    );

    // Text over HTTP: 202 with both receivers and the offset; both panels
    // show it, the SSE one with its id.
    let (status, answer) = publish_in_page(&browser, "hello\nover http", false, 1).await;
    assert!(status.starts_with("202"), "{status}");
    let answer: Value = serde_json::from_str(&answer).expect("the JSON answer");
    assert_eq!(answer["data"], json!({"receivers": 2, "offset": 1}));
    browser
        .wait_for(&panel(1, "[data-testid=log] li[data-dir=in]"))
        .await;
    browser
        .wait_for(&panel(
            2,
            "[data-testid=log] li[data-dir=in][data-kind=text][data-id='1']",
        ))
        .await;
    assert_eq!(received(&browser, 1).await, ["hello\nover http"]);
    assert_eq!(received(&browser, 2).await, ["hello\nover http"]);

    // Binary over HTTP: bytes at the WebSocket, a `binary` event at SSE.
    let (status, _) = publish_in_page(&browser, "bytes", true, 2).await;
    assert!(status.starts_with("202"), "{status}");
    for n in [1, 2] {
        let shown = browser
            .text(&panel(
                n,
                "[data-testid=log] li[data-dir=in][data-kind=binary]",
            ))
            .await;
        assert!(shown.contains("binary, 5 bytes: 62 79 74 65 73"), "{shown}");
    }
    // A WebSocket client's message reaches the SSE client too.
    browser
        .fill(&panel(1, "[data-testid=message]"), "from the socket")
        .await;
    browser.click(&panel(1, "[data-testid=send]")).await;
    browser
        .wait_for(&panel(2, "[data-testid=log] li[data-dir=in][data-id='3']"))
        .await;
    assert_eq!(
        browser.text(&panel(2, "[data-testid=last-event-id]")).await,
        "3"
    );
    assert_eq!(received(&browser, 2).await[2], "from the socket");
    browser
        .execute(
            "document.querySelector('#publish').scrollIntoView()",
            vec![],
        )
        .await;
    browser.screenshot("client-sse-publish.png").await;

    // Deleting the channel: 4001 in both panels; the SSE panel's
    // EventSource is closed (it does not come back).
    browser.click("#delete").await;
    for n in [1, 2] {
        browser
            .wait_for(&format!(
                "#client-{n}[data-state=closed][data-close-code='4001']"
            ))
            .await;
        let state = browser.text(&panel(n, "[data-testid=state]")).await;
        assert!(state.contains("4001"), "client {n} state {state:?}");
    }
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert_eq!(rejections(&server, "channel_not_found").await, 0);

    // Push-pull: nobody connected is 409 no_receiver; an SSE client takes
    // the message and is named as its receiver.
    let (id, _) = create_in_page(&browser, "push-pull", "").await;
    let (status, answer) = publish_in_page(&browser, "job 1", false, 3).await;
    assert!(status.starts_with("409"), "{status}");
    browser
        .wait_for("#publish-result[data-status='409'][data-error=no_receiver]")
        .await;
    assert!(answer.contains("no_receiver"), "{answer}");
    browser.click("#connect-sse").await;
    browser.wait_for("#client-3[data-state=open]").await;
    server.wait_for_clients(&id, 1).await;
    let sse_id = server.client_ids(&id).await.remove(0);
    let (status, answer) = publish_in_page(&browser, "job 2", false, 4).await;
    assert!(status.starts_with("202"), "{status}");
    let answer: Value = serde_json::from_str(&answer).expect("the JSON answer");
    assert_eq!(answer["data"], json!({"receiver": sse_id}));
    browser
        .wait_for(&panel(3, "[data-testid=log] li[data-dir=in]"))
        .await;
    assert_eq!(received(&browser, 3).await, ["job 2"]);
    browser.click(&panel(3, "[data-testid=close]")).await;
    server.wait_for_clients(&id, 0).await;

    // Req-repl: the publish is a call, answered by the reply a WebSocket
    // panel sends with its reply template.
    let (id, _) = create_in_page(&browser, "req-repl", "").await;
    browser.click("#connect").await;
    browser.wait_for("#client-4[data-state=open]").await;
    server.wait_for_clients(&id, 1).await;
    browser.fill("#publish-wait", "10000").await;
    browser
        .fill("#publish-body", r#"{"type":"request","q":"ready?"}"#)
        .await;
    browser.click("#publish-text").await;
    browser
        .wait_for(&panel(4, "[data-testid=log] li[data-dir=in]"))
        .await;
    let request: Value =
        serde_json::from_str(&received(&browser, 4).await[0]).expect("the request as JSON");
    assert_eq!(request["q"], "ready?", "{request}");
    browser
        .click(&panel(4, "[data-testid=reply]:enabled"))
        .await;
    let reply = browser.value(&panel(4, "[data-testid=message]")).await;
    browser.click(&panel(4, "[data-testid=send]")).await;
    browser
        .wait_for("#publish-result[data-state=done][data-count='5'][data-status='200']")
        .await;
    let answered: Value =
        serde_json::from_str(&browser.text("#publish-response").await).expect("the reply");
    assert_eq!(answered, serde_json::from_str::<Value>(&reply).unwrap());
    assert_eq!(answered["origin"], request["origin"]);

    // An SSE client on req-repl is refused, and the page tells why.
    browser.click("#connect-sse").await;
    browser
        .wait_for("#client-5[data-state=closed][data-error=pattern_not_supported]")
        .await;
    browser
        .wait_for("#error:not([hidden])[data-status='409'][data-error=pattern_not_supported]")
        .await;
    assert_eq!(server.client_count(&id).await, Some(1));

    browser.close().await;
    server.shutdown().await;
}

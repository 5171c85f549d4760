//! The service's own pages in a real headless Chromium: the test client
//! (`/client`) relays between two of its WebSocket clients, runs the
//! request/reply templates and shows API errors and close codes; the API
//! docs (`/docs`) list every operation of `/openapi.json` and send
//! requests. Screenshots land in `<workspace>/artifacts/`.
//!
//! Chromium and chromedriver come from Debian (`chromium`,
//! `chromium-driver`); see `common/browser.rs` for how they are driven.

#[path = "common/browser.rs"]
mod browser;
mod common;

use browser::Browser;
use common::TestServer;
use reqwest::StatusCode;
use serde_json::Value;

/// The CSS selector of something inside client panel `n`.
fn panel(n: u32, inner: &str) -> String {
    format!("#client-{n} {inner}")
}

/// Creates a channel through the page's form; returns its id and token
/// as the page shows them.
async fn create_in_page(browser: &Browser, pattern: &str, welcome: bool) -> (String, String) {
    browser.select("#pattern", pattern).await;
    if welcome {
        browser.click("#welcome").await;
    }
    browser.click("#create").await;
    browser.wait_for("#channel[data-created]").await;
    let id = browser.value("#channel-id").await;
    let token = browser.value("#channel-token").await;
    assert!(
        !id.is_empty() && !token.is_empty(),
        "id {id:?}, token {token:?}"
    );
    (id, token)
}

/// Presses "Connect a client" and waits until panel `n` is open.
async fn connect_in_page(browser: &Browser, n: u32) {
    browser.click("#connect").await;
    browser
        .wait_for(&format!("#client-{n}[data-state=open]"))
        .await;
}

/// Types `text` into panel `n` and presses its Send button.
async fn send_from(browser: &Browser, n: u32, text: &str) {
    browser.fill(&panel(n, "[data-testid=message]"), text).await;
    browser.click(&panel(n, "[data-testid=send]")).await;
}

/// The texts of the messages panel `n` has received, oldest first.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_page_relays_pub_sub_between_two_page_clients() {
    let server = TestServer::start().await;
    let browser = Browser::start().await;
    browser.goto(&server.url("/client")).await;
    browser.wait_for("body[data-ready=true]").await;

    let (id, token) = create_in_page(&browser, "pub-sub", false).await;
    assert!(
        !browser.displayed("#error").await,
        "an error is shown after a good create"
    );
    let (status, body) = server.get(&format!("/channels/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["pattern"], "pub-sub", "{body}");
    let ws_url = browser.text("#ws-url").await;
    assert_eq!(
        ws_url,
        format!("ws://{}/channels/{id}/connect?token={token}", server.addr)
    );

    connect_in_page(&browser, 1).await;
    connect_in_page(&browser, 2).await;
    server.wait_for_clients(&id, 2).await;
    assert_eq!(server.client_count(&id).await, Some(2));

    let greeting = "hello from page client 1 ✓";
    send_from(&browser, 1, greeting).await;
    browser
        .wait_for(&panel(2, "[data-testid=log] li[data-dir=in]"))
        .await;
    assert_eq!(received(&browser, 2).await, [greeting]);

    // The answer is a barrier: once client 1 has it, client 1's own
    // greeting would have come back before it if pub-sub echoed.
    let answer = "and back from client 2";
    send_from(&browser, 2, answer).await;
    browser
        .wait_for(&panel(1, "[data-testid=log] li[data-dir=in]"))
        .await;
    assert_eq!(received(&browser, 1).await, [answer]);
    assert_eq!(received(&browser, 2).await, [greeting]);
    assert_eq!(
        browser.text(&panel(1, "[data-testid=counts]")).await,
        "1 in · 1 out"
    );

    // Deleting the channel in the page closes both clients with 4001.
    browser.click("#delete").await;
    for n in [1, 2] {
        browser
            .wait_for(&format!("#client-{n}[data-state=closed]"))
            .await;
        assert_eq!(
            browser
                .attr(&format!("#client-{n}"), "data-close-code")
                .await
                .as_deref(),
            Some("4001")
        );
        let state = browser.text(&panel(n, "[data-testid=state]")).await;
        assert!(state.contains("4001"), "client {n} state {state:?}");
    }
    assert_eq!(server.client_count(&id).await, None, "the channel is gone");

    browser.execute("window.scrollTo(0, 0)", vec![]).await;
    let shot = browser.screenshot("client-page.png").await;
    assert!(shot.is_file());
    browser.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_page_request_and_reply_templates_round_trip() {
    let server = TestServer::start().await;
    let browser = Browser::start().await;
    browser.goto(&server.url("/client")).await;
    browser.wait_for("body[data-ready=true]").await;

    let (id, _token) = create_in_page(&browser, "req-repl", true).await;
    connect_in_page(&browser, 1).await;
    connect_in_page(&browser, 2).await;
    // The welcome frame tells each panel its client id.
    let first = browser
        .attr("#client-1[data-client-id]", "data-client-id")
        .await
        .expect("client 1 id");
    let second = browser
        .attr("#client-2[data-client-id]", "data-client-id")
        .await
        .expect("client 2 id");
    assert_eq!(server.client_ids(&id).await, [first.clone(), second]);

    browser.click(&panel(1, "[data-testid=request]")).await;
    let request = browser.value(&panel(1, "[data-testid=message]")).await;
    let request: Value = serde_json::from_str(&request).expect("the template is JSON");
    assert_eq!(request["type"], "request", "{request}");
    browser.click(&panel(1, "[data-testid=send]")).await;

    // Client 2 gets the request stamped with client 1's id; its reply
    // template answers exactly that origin.
    browser
        .wait_for_count(&panel(2, "[data-testid=log] li[data-dir=in]"), 2)
        .await;
    let at_two = received(&browser, 2).await;
    assert_eq!(at_two.len(), 2, "{at_two:?}");
    let forwarded: Value = serde_json::from_str(&at_two[1]).expect("a JSON request");
    assert_eq!(forwarded["type"], "request", "{forwarded}");
    assert_eq!(forwarded["origin"], first.as_str(), "{forwarded}");
    assert_eq!(forwarded["text"], request["text"], "{forwarded}");

    browser
        .click(&panel(2, "[data-testid=reply]:enabled"))
        .await;
    let reply = browser.value(&panel(2, "[data-testid=message]")).await;
    let reply: Value = serde_json::from_str(&reply).expect("the template is JSON");
    assert_eq!(reply["type"], "reply", "{reply}");
    assert_eq!(reply["origin"], first.as_str(), "{reply}");
    browser.click(&panel(2, "[data-testid=send]")).await;

    browser
        .wait_for_count(&panel(1, "[data-testid=log] li[data-dir=in]"), 2)
        .await;
    let at_one = received(&browser, 1).await;
    assert_eq!(at_one.len(), 2, "hello and the reply: {at_one:?}");
    let hello: Value = serde_json::from_str(&at_one[0]).expect("the welcome frame");
    assert_eq!(hello["type"], "hello", "{hello}");
    let answered: Value = serde_json::from_str(&at_one[1]).expect("a JSON reply");
    assert_eq!(answered, reply);

    browser
        .execute(
            "document.querySelector('#clients').scrollIntoView()",
            vec![],
        )
        .await;
    browser.screenshot("client-request-reply.png").await;
    browser.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_page_shows_api_errors_and_refused_connections() {
    let server = TestServer::start().await;
    let browser = Browser::start().await;
    browser.goto(&server.url("/client")).await;
    browser.wait_for("body[data-ready=true]").await;

    // The service's 400 envelope appears as it is: status, code, message.
    browser.fill("#client-limit", "0").await;
    browser.click("#create").await;
    browser
        .wait_for("#error:not([hidden])[data-status='400'][data-error=invalid_field]")
        .await;
    assert!(browser.displayed("#error").await);
    let shown = browser.text("#error").await;
    assert!(
        shown.contains("400 invalid_field") && shown.contains("clientLimit"),
        "{shown}"
    );
    let (_, body) = server.get("/channels").await;
    assert_eq!(body["data"].as_array().map(Vec::len), Some(0), "{body}");

    // A pasted channel with a wrong token: the service accepts the upgrade
    // and closes it at once with 4401 and the error code as the reason
    // (a browser cannot see the status of a refused upgrade).
    let channel = server.create_pattern("echo").await;
    browser.fill("#channel-id", &channel.id).await;
    browser.fill("#channel-token", "not-the-token").await;
    browser.click("#connect").await;
    browser
        .wait_for("#client-1[data-state=closed][data-error=invalid_token][data-close-code='4401']")
        .await;
    browser
        .wait_for("#error:not([hidden])[data-status='401'][data-error=invalid_token]")
        .await;
    let log = browser
        .text(&panel(1, "[data-testid=log] li[data-dir=error]"))
        .await;
    assert!(log.contains("401 invalid_token"), "{log}");
    assert_eq!(server.client_count(&channel.id).await, Some(0));

    // The right token connects; the echo comes back to the sender.
    browser.fill("#channel-token", &channel.token).await;
    connect_in_page(&browser, 2).await;
    send_from(&browser, 2, "echo me").await;
    browser
        .wait_for(&panel(2, "[data-testid=log] li[data-dir=in]"))
        .await;
    assert_eq!(received(&browser, 2).await, ["echo me"]);
    assert_eq!(server.client_count(&channel.id).await, Some(1));

    // Binary frames go out and come back as bytes, shown in hex.
    browser
        .fill(&panel(2, "[data-testid=message]"), "bytes")
        .await;
    browser.click(&panel(2, "[data-testid=send-binary]")).await;
    let binary = browser
        .text(&panel(
            2,
            "[data-testid=log] li[data-dir=in][data-kind=binary]",
        ))
        .await;
    assert!(
        binary.contains("binary, 5 bytes: 62 79 74 65 73"),
        "{binary}"
    );

    // Closing a client in the page closes it normally on the server too.
    browser.click(&panel(2, "[data-testid=close]")).await;
    browser.wait_for("#client-2[data-state=closed]").await;
    assert_eq!(
        browser
            .attr("#client-2", "data-close-code")
            .await
            .as_deref(),
        Some("1000")
    );
    server.wait_for_clients(&channel.id, 0).await;

    // A full channel: the page sees 4409 with the reason channel_full, and
    // the client already in it stays.
    let full = server
        .create(serde_json::json!({"pattern": "pub-sub", "clientLimit": 1}))
        .await;
    let mut member = server.connect(&full).await;
    browser.fill("#channel-id", &full.id).await;
    browser.fill("#channel-token", &full.token).await;
    browser.click("#connect").await;
    browser
        .wait_for("#client-3[data-state=closed][data-error=channel_full][data-close-code='4409']")
        .await;
    browser
        .wait_for("#error:not([hidden])[data-status='409'][data-error=channel_full]")
        .await;
    let log = browser
        .text(&panel(3, "[data-testid=log] li[data-dir=error]"))
        .await;
    assert!(log.contains("409 channel_full"), "{log}");
    browser.screenshot("client-channel-full.png").await;
    assert_eq!(server.client_count(&full.id).await, Some(1));
    member.send_text("still connected").await;
    member.close().await;

    browser.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_page_lists_every_operation_and_sends_requests() {
    let server = TestServer::start().await;
    let (status, document) = server.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK, "{document}");
    let paths = document["paths"].as_object().expect("paths");
    assert!(paths.contains_key("/service"), "{document}");

    let browser = Browser::start().await;
    browser.goto(&server.url("/docs")).await;
    browser.wait_for("body[data-state=ready]").await;

    let mut operations = 0;
    for (path, item) in paths {
        let methods: Vec<&str> = item
            .as_object()
            .expect("path item")
            .keys()
            .map(String::as_str)
            .filter(|m| {
                [
                    "get", "put", "post", "delete", "options", "head", "patch", "trace",
                ]
                .contains(m)
            })
            .collect();
        assert!(!methods.is_empty(), "{path} has no operation");
        for method in methods {
            let selector = format!(
                "details.op[data-method={method}][data-path={}]",
                Value::from(path.as_str())
            );
            let found = browser.find_all(&selector).await;
            assert!(
                !found.is_empty(),
                "the docs page does not list {method} {path}"
            );
            operations += 1;
        }
    }
    let shown = browser.attr("body", "data-operations").await;
    assert_eq!(shown, Some(operations.to_string()));

    let service = "details.op[data-method=get][data-path='/service']";
    browser.click(&format!("{service} > summary")).await;
    browser
        .click(&format!("{service} [data-testid=send]"))
        .await;
    browser
        .wait_for(&format!("{service} form.try[data-state=done]"))
        .await;
    let status_line = browser
        .text(&format!("{service} [data-testid=response-status]"))
        .await;
    assert!(status_line.starts_with("200"), "{status_line}");
    let body = browser
        .text(&format!("{service} [data-testid=response-body]"))
        .await;
    let body: Value = serde_json::from_str(&body).expect("the page shows the JSON body");
    assert_eq!(body["data"]["name"], "wrs", "{body}");
    assert_eq!(body["data"]["version"], env!("CARGO_PKG_VERSION"), "{body}");

    // "Try it" on POST /channels sends the example body it was prefilled
    // with, and the channel exists afterwards.
    let create = "details.op[data-method=post][data-path='/channels']";
    browser.click(&format!("{create} > summary")).await;
    let prefilled = browser.value(&format!("{create} [data-testid=body]")).await;
    let prefilled: Value = serde_json::from_str(&prefilled).expect("the prefilled body is JSON");
    let pattern = prefilled["pattern"]
        .as_str()
        .expect("the example names a pattern");
    browser.click(&format!("{create} [data-testid=send]")).await;
    browser
        .wait_for(&format!("{create} form.try[data-state=done]"))
        .await;
    let status_line = browser
        .text(&format!("{create} [data-testid=response-status]"))
        .await;
    assert!(status_line.starts_with("201"), "{status_line}");
    let created = browser
        .text(&format!("{create} [data-testid=response-body]"))
        .await;
    let created: Value = serde_json::from_str(&created).expect("the page shows the JSON body");
    let id = created["data"]["id"].as_str().expect("channel id");
    let (status, channel) = server.get(&format!("/channels/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{channel}");
    assert_eq!(channel["data"]["pattern"], pattern, "{channel}");

    // A path parameter goes into the URL.
    let show = "details.op[data-method=get][data-path='/channels/{id}']";
    browser.click(&format!("{show} > summary")).await;
    browser
        .fill(&format!("{show} [data-testid=param-id]"), id)
        .await;
    browser.click(&format!("{show} [data-testid=send]")).await;
    browser
        .wait_for(&format!("{show} form.try[data-state=done]"))
        .await;
    assert_eq!(
        browser
            .text(&format!("{show} [data-testid=request-url]"))
            .await,
        format!("GET /channels/{id}")
    );
    let status_line = browser
        .text(&format!("{show} [data-testid=response-status]"))
        .await;
    assert!(status_line.starts_with("200"), "{status_line}");
    let shown = browser
        .text(&format!("{show} [data-testid=response-body]"))
        .await;
    let shown: Value = serde_json::from_str(&shown).expect("the page shows the JSON body");
    assert_eq!(shown["data"]["id"], id, "{shown}");

    browser
        .execute(
            "document.querySelector(arguments[0]).scrollIntoView()",
            vec![Value::from(format!("{service} form.try"))],
        )
        .await;
    let shot = browser.screenshot("docs-page.png").await;
    assert!(shot.is_file());
    browser.close().await;
    server.shutdown().await;
}

/// CORS from a real browser: a page served by another origin (a second
/// server, another port) calls the API with a JSON body and an
/// `Authorization` header, which needs a preflight. A server that does not
/// allow that origin is blocked by the browser before the POST is sent.
#[tokio::test]
async fn a_page_on_another_origin_calls_the_api_through_a_preflight() {
    let api = TestServer::with(|c| {
        c.auth = true;
        c.auth_token = Some(wrs::config::Secret::new("cross-origin-token"));
        c.auth_resources = "POST:/channels".parse().unwrap();
    })
    .await;
    let strict =
        TestServer::with(|c| c.cors_origins = "https://elsewhere.example".parse().unwrap()).await;
    let page = TestServer::start().await;
    let browser = Browser::start().await;
    browser.goto(&page.url("/readme")).await;
    let script = "const [url, token] = arguments;
        return fetch(url, {
            method: 'POST',
            headers: {'Content-Type': 'application/json', 'Authorization': 'Bearer ' + token},
            body: JSON.stringify({pattern: 'echo'})
        }).then(async r => ({status: r.status, location: r.headers.get('location'), body: await r.json()}))
          .catch(e => ({error: String(e)}));";
    let allowed = browser
        .execute(
            script,
            vec![
                Value::from(api.url("/channels")),
                Value::from("cross-origin-token"),
            ],
        )
        .await;
    assert_eq!(allowed["status"], 201, "{allowed}");
    let id = allowed["body"]["data"]["id"].as_str().unwrap();
    assert_eq!(
        allowed["location"],
        format!("/channels/{id}"),
        "Location is exposed"
    );
    assert_eq!(
        api.client_count(id).await,
        Some(0),
        "the channel exists on the API server"
    );
    // The API token still applies cross-origin.
    let wrong = browser
        .execute(
            script,
            vec![Value::from(api.url("/channels")), Value::from("nope")],
        )
        .await;
    assert_eq!(wrong["status"], 401, "{wrong}");
    assert_eq!(wrong["body"]["error"], "invalid_auth");
    // Not an allowed origin: the browser refuses before sending the POST.
    let blocked = browser
        .execute(
            script,
            vec![Value::from(strict.url("/channels")), Value::from("x")],
        )
        .await;
    assert!(
        blocked["error"]
            .as_str()
            .is_some_and(|e| e.contains("Failed to fetch")),
        "{blocked}"
    );
    let (status, list) = strict.get("/channels").await;
    assert_eq!(
        (status, list["data"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(0))
    );
    browser.close().await;
}

#[tokio::test]
async fn the_dashboard_shows_the_node_its_channels_and_charts() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("pub-sub").await;
    let mut clients = server.connect_n(&channel, 2).await;
    clients[0].send_text("hello").await;
    assert_eq!(clients[1].recv_text().await, "hello");
    let browser = Browser::start().await;
    browser.goto(&server.url("/dashboard")).await;
    // Two refreshes: the charts have points to draw.
    browser.wait_for("body[data-refreshes='2']").await;
    assert_eq!(
        browser
            .text("#nodes tr[data-node='test-node'] .connections")
            .await,
        "2"
    );
    assert!(
        browser
            .text("#nodes tr[data-node='test-node'] .state")
            .await
            .contains("ready")
    );
    assert!(browser.page_text().await.contains(&channel.id));
    assert_eq!(
        browser
            .find_all("#chart-connections polyline[data-series='test-node']")
            .await
            .len(),
        1
    );
    assert!(browser.text("#error").await.is_empty());
    browser.screenshot("dashboard.png").await;
    browser.close().await;
}

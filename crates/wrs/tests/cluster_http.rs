//! The HTTP side of a channel (SPEC §10) across three nodes on a real
//! `nats-server`: publishing over HTTP on one node reaches clients on
//! every node with the exact delivery sets, calls are answered across
//! nodes, and history lives in JetStream, the same on every node and
//! after a node is gone.

mod common;

use std::collections::BTreeMap;

use common::nats::*;
use common::sse::{Sse, post, post_json};
use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn sse(node: &TestServer, channel: &Created, last: Option<&str>) -> Sse {
    Sse::open_ok(node, channel, last).await
}

/// Which node lists each client of the channel, by id.
async fn nodes_of(node: &TestServer, channel: &str) -> BTreeMap<String, (String, String)> {
    let (_, body) = node.get(&format!("/channels/{channel}/clients")).await;
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_owned(),
                (
                    c["node"].as_str().unwrap().to_owned(),
                    c["transport"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect()
}

#[tokio::test]
async fn every_pattern_published_over_http_reaches_exactly_its_receivers_across_nodes() {
    let nats = NatsServer::start().await;
    let nodes = three_nodes(&NodeOptions::new(nats.url())).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    // pub-sub: WebSocket clients on every node and an SSE client on B.
    let channel = a.create_pattern("pub-sub").await;
    let mut ws = vec![
        a.connect(&channel).await,
        b.connect(&channel).await,
        c.connect(&channel).await,
    ];
    let mut events = sse(b, &channel, None).await;
    wait_everywhere(&[a, b, c], &channel.id, 4).await;
    let listed = nodes_of(c, &channel.id).await;
    let sse_listed: Vec<_> = listed.values().filter(|(_, t)| t == "sse").collect();
    assert_eq!(sse_listed, [&("node-b".to_owned(), "sse".to_owned())]);
    for (i, node) in nodes.iter().enumerate() {
        let (status, body) = post_json(node, &channel, &format!("to all {i}"), "").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert_eq!(
            body["data"],
            json!({"receivers": 4}),
            "published on node {i}"
        );
        for client in &mut ws {
            assert_eq!(client.recv_text().await, format!("to all {i}"));
        }
        assert_eq!(events.event().await.data, format!("to all {i}"));
    }

    // push-pull: workers on B and C and an SSE worker on A; published on
    // A, each takes exactly its share, and `receiver` names who got it.
    let jobs = a.create_pattern("push-pull").await;
    let mut workers = vec![b.connect(&jobs).await, c.connect(&jobs).await];
    let mut sse_worker = sse(a, &jobs, None).await;
    wait_everywhere(&[a, b, c], &jobs.id, 3).await;
    let ids = a.client_ids(&jobs.id).await;
    let mut by_receiver: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in 0..12 {
        let (status, body) = post_json(a, &jobs, &format!("job {n}"), "").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let receiver = body["data"]["receiver"].as_str().unwrap().to_owned();
        assert!(ids.contains(&receiver), "{receiver} not in {ids:?}");
        by_receiver
            .entry(receiver)
            .or_default()
            .push(format!("job {n}"));
    }
    assert_eq!(by_receiver.len(), 3, "{by_receiver:?}");
    assert!(
        by_receiver.values().all(|jobs| jobs.len() == 4),
        "{by_receiver:?}"
    );
    let listed = nodes_of(a, &jobs.id).await;
    for (id, jobs_of) in &by_receiver {
        let (node, transport) = &listed[id];
        for job in jobs_of {
            let got = match (node.as_str(), transport.as_str()) {
                ("node-a", "sse") => sse_worker.event().await.data,
                ("node-b", _) => workers[0].recv_text().await,
                ("node-c", _) => workers[1].recv_text().await,
                other => panic!("unexpected client {other:?}"),
            };
            assert_eq!(&got, job);
        }
    }
    drop(sse_worker);
    drop(workers);
    eventually("the push-pull clients gone", || async {
        (a.client_count(&jobs.id).await == Some(0)).then_some(())
    })
    .await;
    let (status, body) = post_json(c, &jobs, "nobody", "").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_error_envelope(&body, "no_receiver");

    // echo, through any node.
    let echo = b.create_pattern("echo").await;
    assert_eq!(
        post(c, &echo, "back", "").await,
        (StatusCode::OK, "back".to_owned())
    );
}

#[tokio::test]
async fn http_calls_are_answered_by_workers_on_other_nodes() {
    let nats = NatsServer::start().await;
    let nodes = three_nodes(&NodeOptions::new(nats.url())).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    for pattern in ["req-repl", "fan-in-out"] {
        let channel = a.create_pattern(pattern).await;
        // The workers are on B and C; the calls come in on A, so every
        // reply travels from the worker's node to A.
        let mut workers = [b.connect(&channel).await, c.connect(&channel).await];
        wait_everywhere(&[a, b, c], &channel.id, 2).await;
        let mut answered_by = Vec::new();
        for n in 0..4 {
            let call = {
                let a = TestServer::client_of(a.addr);
                let channel = Created {
                    id: channel.id.clone(),
                    token: channel.token.clone(),
                    body: Value::Null,
                };
                tokio::spawn(async move {
                    post_json(
                        &a,
                        &channel,
                        &format!(r#"{{"type":"request","n":{n}}}"#),
                        "",
                    )
                    .await
                })
            };
            // req-repl: both workers get it and both answer (the first
            // reply wins); fan-in-out: exactly one, in turn.
            let receivers: Vec<usize> = if pattern == "req-repl" {
                vec![0, 1]
            } else {
                vec![n % 2]
            };
            let mut origin = String::new();
            for &w in &receivers {
                let request = workers[w].recv_json().await;
                assert_eq!(request["n"], n);
                origin = request["origin"].as_str().unwrap().to_owned();
                workers[w]
                    .send_json(json!({"type": "reply", "origin": origin, "by": w}))
                    .await;
            }
            let (status, reply) = call.await.unwrap();
            assert_eq!(status, StatusCode::OK, "{pattern} {reply}");
            assert_eq!(reply["origin"], origin.as_str());
            let by = reply["by"].as_u64().unwrap() as usize;
            assert!(receivers.contains(&by));
            answered_by.push(by);
            if pattern == "req-repl" {
                // The other worker's reply came after the call ended (or
                // lost the race): it gets the error frame.
                let loser = 1 - by;
                let error = workers[loser].recv_json().await;
                assert_eq!(error["error"], "unknown_origin", "{pattern}");
            }
        }
        if pattern == "fan-in-out" {
            assert_eq!(answered_by, [0, 1, 0, 1]);
        }
        // A reply to a call that never was: the error frame, across nodes too.
        workers[0]
            .send_json(json!({"type": "reply", "origin": "8000-0000-0001"}))
            .await;
        assert_eq!(workers[0].recv_json().await["error"], "unknown_origin");
        // Nobody answers in time: 504.
        let (status, body) = post_json(a, &channel, r#"{"type":"request"}"#, "&wait=300").await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
        for worker in if pattern == "req-repl" {
            vec![0, 1]
        } else {
            vec![0]
        } {
            workers[worker].recv_json().await;
        }
    }
}

#[tokio::test]
async fn history_is_kept_in_jetstream_and_read_alike_on_every_node() {
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let mut nodes = three_nodes(&options).await;
    let channel = nodes[0]
        .create(json!({"pattern": "pub-sub", "history": {"size": 5, "ttl": 60000}}))
        .await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut on_b = sse(b, &channel, None).await;
    let mut ws_c = c.connect(&channel).await;
    wait_everywhere(&[a, b, c], &channel.id, 2).await;
    // Published over HTTP on every node and by the WebSocket client on C.
    let mut offsets = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let (status, body) = post_json(node, &channel, &format!("m{i}"), "").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert_eq!(body["data"]["receivers"], 2);
        offsets.push(body["data"]["offset"].as_u64().unwrap());
        let event = on_b.event().await;
        assert_eq!(event.id, Some(offsets[i].to_string()));
        assert_eq!(event.data, format!("m{i}"));
        assert_eq!(ws_c.recv_text().await, format!("m{i}"));
    }
    ws_c.send_text("m3").await;
    let event = on_b.event().await;
    assert_eq!(event.data, "m3");
    offsets.push(event.id.unwrap().parse().unwrap());
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    // The same history on every node.
    let path = format!("/channels/{}/messages?token={}", channel.id, channel.token);
    let (_, first) = a.get(&path).await;
    let listed: Vec<(u64, String)> = first["data"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["offset"].as_u64().unwrap(),
                m["data"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(u64, String)> = offsets
        .iter()
        .enumerate()
        .map(|(i, &o)| (o, format!("m{i}")))
        .collect();
    assert_eq!(listed, expected);
    for node in &nodes[1..] {
        let (_, body) = node.get(&path).await;
        assert_eq!(body["data"], first["data"]);
    }
    let (_, after) = c.get(&format!("{path}&since={}", offsets[1])).await;
    assert_eq!(after["data"]["messages"].as_array().unwrap().len(), 2);
    // Resumed on another node after the last id B's stream saw.
    drop(on_b);
    post(a, &channel, "m4", "").await;
    let mut on_c = sse(c, &channel, Some(&offsets[3].to_string())).await;
    assert_eq!(on_c.event().await.data, "m4");
    post(b, &channel, "m5", "").await;
    let live = on_c.event().await;
    assert_eq!(live.data, "m5");
    // Five kept: m0 is gone, so resuming from before it is a reset.
    let mut from_start = sse(b, &channel, Some("0")).await;
    let reset = from_start.event().await;
    assert_eq!(reset.event, "reset");
    let reset: Value = serde_json::from_str(&reset.data).unwrap();
    assert_eq!(reset["reason"], "history_expired");
    assert_eq!(reset["oldest"], offsets[1]);
    let mut replayed = Vec::new();
    for _ in 0..5 {
        replayed.push(from_start.event().await.data);
    }
    assert_eq!(replayed, ["m1", "m2", "m3", "m4", "m5"]);
    drop(from_start);
    drop(on_c);
    // The node that created the channel and published first goes away:
    // the history is still there, on the others.
    let gone = nodes.remove(0);
    gone.shutdown().await;
    let (status, body) = nodes[1].get(&path).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let data: Vec<&str> = body["data"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].as_str().unwrap())
        .collect();
    assert_eq!(data, ["m1", "m2", "m3", "m4", "m5"]);
    assert_eq!(body["data"]["epoch"], first["data"]["epoch"]);
    // Deleting the channel: SSE clients see 4001, the history is gone.
    let mut last = sse(&nodes[0], &channel, None).await;
    let (status, _) = nodes[1].delete(&format!("/channels/{}", channel.id)).await;
    assert_eq!(status, StatusCode::OK);
    let (_, close) = last.until_close().await;
    let close: Value = serde_json::from_str(&close.unwrap().data).unwrap();
    assert_eq!(close["code"], 4001);
}

#[tokio::test]
async fn an_sse_client_of_a_drained_node_resumes_on_another_with_exactly_the_sequence() {
    const TOTAL: usize = 10_000;
    let nats = NatsServer::start().await;
    let nodes = three_nodes(&NodeOptions::new(nats.url())).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let channel = a
        .create(json!({"pattern": "pub-sub", "history": {"size": TOTAL}}))
        .await;
    let mut publisher = a.connect(&channel).await;
    let mut events = sse(b, &channel, None).await;
    wait_everywhere(&[a, b, c], &channel.id, 2).await;
    // A WebSocket client on A publishes at full rate.
    let publishing = tokio::spawn(async move {
        for i in 0..TOTAL {
            publisher.send_text(i.to_string()).await;
        }
        publisher
    });
    let mut received: Vec<usize> = Vec::new();
    let mut last_id = String::new();
    while received.len() < 2_000 {
        let event = events.event().await;
        received.push(event.data.parse().unwrap());
        last_id = event.id.unwrap();
    }
    // B drains: its SSE client is closed with 1012 after what it was sent.
    let (status, body) = a.post("/cluster/node-b/drain", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (before, close) = events.until_close().await;
    for event in before {
        received.push(event.data.parse().unwrap());
        last_id = event.id.unwrap();
    }
    let close: Value = serde_json::from_str(&close.expect("close event").data).unwrap();
    assert_eq!(close["code"], 1012);
    // It reconnects elsewhere with the last id it saw and resumes.
    let mut events = sse(c, &channel, Some(&last_id)).await;
    while received.len() < TOTAL {
        let event = events.event().await;
        assert_ne!(event.event, "reset");
        received.push(event.data.parse().unwrap());
    }
    let _publisher = publishing.await.unwrap();
    assert_eq!(received, (0..TOTAL).collect::<Vec<_>>());
}

#[tokio::test]
async fn the_epoch_changes_when_nats_loses_the_history() {
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let a = node(&options, "node-a").await;
    let channel = a
        .create(json!({"pattern": "pub-sub", "history": {"size": 10}}))
        .await;
    let (status, _) = post(&a, &channel, "kept", "").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let path = format!("/channels/{}/messages?token={}", channel.id, channel.token);
    let (_, before) = a.get(&path).await;
    assert_eq!(before["data"]["messages"].as_array().unwrap().len(), 1);
    // NATS loses the stream; a node that starts creates it again.
    let client = async_nats::connect(nats.url()).await.unwrap();
    async_nats::jetstream::new(client)
        .delete_stream(format!("{}-history", options.prefix))
        .await
        .unwrap();
    let _b = node(&options, "node-b").await;
    let (status, after) = a.get(&path).await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!(after["data"]["messages"], json!([]));
    assert_ne!(after["data"]["epoch"], before["data"]["epoch"]);
}

//! Browser-only mode (thesis cases 4.1.1 and 4.1.2): GET aliases for
//! create and delete, validated like POST and DELETE, absent unless
//! switched on.

mod common;

use common::*;
use reqwest::StatusCode;

async fn server() -> TestServer {
    TestServer::with(|c| c.browser_only = true).await
}

/// 4.1.1 `GET /channels/create` creates a channel, answered as JSON.
#[tokio::test]
async fn tf_4_1_1_get_create() {
    let server = server().await;
    let (status, body) = server
        .get("/channels/create?pattern=pub-sub&clientLimit=2&timeout=60000&welcome=true")
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["data"]["id"].as_str().unwrap();
    assert_eq!(body["data"]["pattern"], "pub-sub");
    assert_eq!(body["data"]["clientLimit"], 2);
    assert_eq!(body["data"]["timeout"], 60000);
    assert_eq!(body["token"].as_str().unwrap().len(), 16);
    // It is a real channel: connect with the token, get the welcome frame.
    let created = Created {
        id: id.to_owned(),
        token: body["token"].as_str().unwrap().to_owned(),
        body: body.clone(),
    };
    let mut client = server.connect(&created).await;
    assert_eq!(client.recv_json().await["type"], "hello");
    // The singular alias works as well.
    let (status, _) = server.get("/channel/create?pattern=echo").await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test]
async fn get_create_validates_like_post() {
    let server = server().await;
    for (query, code, mention) in [
        ("", "missing_field", "\"pattern\""),
        ("?pattern=broadcast", "invalid_field", "\"pattern\""),
        (
            "?pattern=echo&clientLimit=0",
            "invalid_field",
            "\"clientLimit\"",
        ),
        (
            "?pattern=echo&clientLimit=ten",
            "invalid_field",
            "\"clientLimit\"",
        ),
        ("?pattern=echo&timeout=-7", "invalid_field", "\"timeout\""),
        (
            "?pattern=echo&welcome=maybe",
            "invalid_field",
            "\"welcome\"",
        ),
        ("?pattern=echo&color=red", "unknown_field", "\"color\""),
        (
            "?pattern=echo&pattern=pub-sub",
            "duplicate_field",
            "\"pattern\"",
        ),
    ] {
        let (status, body) = server.get(&format!("/channels/create{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_error_envelope(&body, code);
        assert!(
            body["message"].as_str().unwrap().contains(mention),
            "{query}: {body}"
        );
    }
    let (_, list) = server.get("/channels").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
}

/// 4.1.2 `GET /channels/{id}/delete` deletes the channel.
#[tokio::test]
async fn tf_4_1_2_get_delete() {
    let server = server().await;
    let channel = server.create_pattern("pub-sub").await;
    let mut client = server.connect(&channel).await;
    let (status, body) = server
        .get(&format!("/channels/{}/delete", channel.id))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["message"], format!("channel {} deleted", channel.id));
    assert_eq!(client.expect_close(4001).await, "channel deleted");
    let (status, body) = server
        .get(&format!("/channels/{}/delete", channel.id))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error_envelope(&body, "channel_not_found");
}

#[tokio::test]
async fn the_get_aliases_are_absent_by_default() {
    let server = TestServer::start().await;
    // /channels/create is then just a channel id that does not exist.
    let (status, body) = server.get("/channels/create?pattern=echo").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error_envelope(&body, "channel_not_found");
    let channel = server.create_pattern("echo").await;
    let (status, body) = server
        .get(&format!("/channels/{}/delete", channel.id))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error_envelope(&body, "not_found");
    assert_eq!(
        server.client_count(&channel.id).await,
        Some(0),
        "the channel survived"
    );
    let (_, doc) = server.get("/openapi.json").await;
    assert!(doc["paths"]["/channels/create"].is_null());
}

//! The OpenAPI 3 document, generated from the same registration that builds
//! the router: every route is added through [`routes`], so the document
//! lists exactly what the server serves.

use axum::Extension;
use axum::body::Bytes;
use axum::http::{Method, header};
use axum::response::IntoResponse;
use utoipa::OpenApi;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::server::Server;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
use utoipa_axum::routes;

use super::{AppState, channels, connect, messages, pages, readme, service};
use crate::config::{AuthPolicy, Config};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "WRS — WebSocket Relay Service",
        description = "Relays messages between plain browser WebSocket clients by channel pattern: echo, pub-sub, push-pull, req-repl, fan-in-out. Create a channel, hand its id and token to your clients, connect with `new WebSocket(...)`. Every response is a JSON object: `{\"message\", \"data\"}` on success, `{\"message\", \"error\"}` on failure."
    ),
    tags(
        (name = "channels", description = "Create, list, inspect and delete channels"),
        (name = "connect", description = "Join a channel over WebSocket"),
        (name = "http", description = "Publish over HTTP, read a channel's history, receive as Server-Sent Events"),
        (name = "service", description = "Metadata, cluster, health and metrics"),
        (name = "docs", description = "Human-readable pages"),
        (name = "browser-only", description = "GET aliases for create and delete (WRS_BROWSER_ONLY=true)"),
        (name = "aliases", description = "The singular /channel/... paths, same as /channels/...")
    )
)]
struct ApiDoc;

/// The served document, serialised once.
#[derive(Clone, Debug)]
pub struct Document(Bytes);

/// Every route, registered with the router and the document at once.
pub fn routes(config: &Config) -> OpenApiRouter<AppState> {
    let mut router = OpenApiRouter::with_openapi(ApiDoc::openapi());
    for group in channel_routes(config) {
        router = router.routes(group);
    }
    for group in channel_routes(config) {
        router = router.routes(alias(group));
    }
    router
        .routes(routes!(channels::reset))
        .routes(routes!(service::service))
        .routes(routes!(service::cluster))
        .routes(routes!(service::evict))
        .routes(routes!(service::drain))
        .routes(routes!(service::ready))
        .routes(routes!(service::healthz))
        .routes(routes!(service::readyz))
        .routes(routes!(service::metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(readme::root))
        .routes(routes!(readme::readme))
        .routes(routes!(pages::client))
        .routes(routes!(pages::docs))
        .routes(routes!(pages::dashboard))
}

/// The routes under `/channels`; the browser-only ones only when enabled.
fn channel_routes(config: &Config) -> Vec<UtoipaMethodRouter<AppState>> {
    let mut groups = vec![
        routes!(channels::list, channels::create),
        routes!(channels::show, channels::remove),
        routes!(channels::clients),
        routes!(connect::connect),
        routes!(messages::publish, messages::history),
        routes!(messages::events),
    ];
    if config.browser_only {
        groups.push(routes!(channels::create_via_get));
        groups.push(routes!(channels::delete_via_get));
    }
    groups
}

/// The same routes under the singular `/channel` prefix.
fn alias(
    (schemas, mut paths, method_router): UtoipaMethodRouter<AppState>,
) -> UtoipaMethodRouter<AppState> {
    paths.paths = std::mem::take(&mut paths.paths)
        .into_iter()
        .map(|(path, mut item)| {
            let original = path.clone();
            for operation in operations_mut(&mut item) {
                operation.operation_id = operation
                    .operation_id
                    .take()
                    .map(|id| format!("{id}_alias"));
                operation.tags = Some(vec!["aliases".to_owned()]);
                operation.description = Some(format!("Alias of `{original}`."));
            }
            (path.replacen("/channels", "/channel", 1), item)
        })
        .collect();
    (schemas, paths, method_router)
}

fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.post,
        &mut item.put,
        &mut item.patch,
        &mut item.delete,
        &mut item.head,
        &mut item.options,
    ]
    .into_iter()
    .filter_map(Option::as_mut)
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = (Method, &mut Operation)> {
    [
        (Method::GET, &mut item.get),
        (Method::POST, &mut item.post),
        (Method::PUT, &mut item.put),
        (Method::PATCH, &mut item.patch),
        (Method::DELETE, &mut item.delete),
        (Method::HEAD, &mut item.head),
        (Method::OPTIONS, &mut item.options),
    ]
    .into_iter()
    .filter_map(|(method, operation)| operation.as_mut().map(|o| (method, o)))
}

/// Completes the document for this configuration: version, server URL,
/// and — with `WRS_AUTH` — which operations need the API token.
pub fn finish(
    mut doc: utoipa::openapi::OpenApi,
    config: &Config,
    auth: Option<&AuthPolicy>,
) -> Document {
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc.servers = Some(vec![Server::new(config.public_http_url())]);
    if let Some(policy) = auth {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "query",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::new("auth"))),
        );
        for (path, item) in doc.paths.paths.iter_mut() {
            // A concrete path for the rule's regex.
            let sample = path.replace("{id}", "0000-0000");
            for (method, operation) in operations(item) {
                if policy.protects(method.as_str(), &sample) {
                    operation.security = Some(vec![
                        SecurityRequirement::new("bearer", Vec::<String>::new()),
                        SecurityRequirement::new("query", Vec::<String>::new()),
                    ]);
                }
            }
        }
    }
    Document(serde_json::to_vec(&doc).unwrap_or_default().into())
}

/// `GET /openapi.json`
#[utoipa::path(get, path = "/openapi.json", tag = "docs", summary = "This OpenAPI document",
    responses((status = 200, description = "OpenAPI 3 JSON", content_type = "application/json", body = Object)))]
pub async fn openapi_json(Extension(doc): Extension<Document>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], doc.0)
}

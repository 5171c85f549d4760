//! `GET /` and `GET /readme`: the API readme as HTML.
//!
//! The Markdown is the built-in readme, or the file at `WRS_README_PATH`.
//! `{{BASE_URL}}` and `{{WS_URL}}` in it become this service's public
//! addresses. It is rendered once, at start.

use std::path::Path;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::Html;

use super::AppState;
use crate::config::Config;

const BUILT_IN: &str = include_str!("readme.md");

/// Renders the readme page for `config`.
///
/// # Errors
///
/// The file at `WRS_README_PATH` cannot be read.
pub fn render(config: &Config) -> Result<String, std::io::Error> {
    let markdown = match &config.readme_path {
        Some(path) => std::fs::read_to_string(path)?,
        None => BUILT_IN.to_owned(),
    };
    let markdown = markdown
        .replace("{{BASE_URL}}", &config.public_http_url())
        .replace("{{WS_URL}}", &config.public_ws_url());
    let parser = pulldown_cmark::Parser::new_ext(&markdown, pulldown_cmark::Options::ENABLE_TABLES);
    let mut body = String::with_capacity(markdown.len() * 2);
    pulldown_cmark::html::push_html(&mut body, parser);
    let title = match &config.readme_path {
        Some(path) => Path::new(path)
            .file_name()
            .map_or_else(|| "readme".to_owned(), |n| n.to_string_lossy().into_owned()),
        None => "WRS — WebSocket Relay Service".to_owned(),
    };
    Ok(format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head>\n<body><main>\n{body}</main></body></html>\n",
        escape(&title)
    ))
}

const STYLE: &str = "body{font:16px/1.5 system-ui,sans-serif;margin:0;color:#1b1f24;background:#fafafa}\
main{max-width:52rem;margin:0 auto;padding:1rem 1.5rem 3rem}\
code,pre{font:14px/1.4 ui-monospace,monospace;background:#eef0f3;border-radius:4px}\
code{padding:.1em .3em}pre{padding:.8em;overflow-x:auto}pre code{padding:0;background:none}\
table{border-collapse:collapse}th,td{border:1px solid #ccd;padding:.3em .6em;text-align:left;vertical-align:top}";

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `GET /`
#[utoipa::path(get, path = "/", tag = "docs", summary = "The API readme",
    responses((status = 200, description = "HTML", content_type = "text/html", body = String)))]
pub async fn root(State(app): State<AppState>) -> Html<Bytes> {
    Html(app.readme.clone())
}

/// `GET /readme`
#[utoipa::path(get, path = "/readme", tag = "docs", summary = "The API readme",
    responses((status = 200, description = "HTML", content_type = "text/html", body = String)))]
pub async fn readme(State(app): State<AppState>) -> Html<Bytes> {
    Html(app.readme.clone())
}

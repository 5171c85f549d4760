//! The relay under test: WRS through its REST API, or any other relay
//! through WebSocket URL templates.
//!
//! For WRS the benchmark creates its channels with `POST /channels`,
//! connects with `/channels/{id}/connect?token=T` and deletes them at the
//! end. For another relay, `--sub-url` and `--pub-url` are templates in
//! which `{channel}` is replaced by a channel name unique to the run (for
//! example Nchan's `ws://127.0.0.1:8081/sub/{channel}`); a relay with a
//! single broadcast room (websocat's `broadcast:mirror:`) takes a URL
//! without `{channel}` and one channel.
//!
//! Besides WebSocket URLs every channel has the two HTTP addresses of
//! SPEC §10: its Server-Sent Events stream (`GET /channels/{id}/events`)
//! and its publish endpoint (`POST /channels/{id}/messages`). With
//! templates they are the templates themselves: `--sub-url` names the
//! event stream when subscribers use SSE, `--pub-url` the publish URL
//! when publishers use HTTP.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::Args;
use serde::Deserialize;

use crate::http::HttpClient;
use crate::ws::WsUrl;

/// Where the relay under test is.
#[derive(Args, Clone, Debug)]
pub struct TargetArgs {
    /// Base URL of a WRS server (its REST API and WebSocket endpoint).
    #[arg(long, global = true, default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// Subscriber WebSocket URL template of another relay; `{channel}` is
    /// replaced by the channel name. Given, the REST API is not used.
    #[arg(long, global = true)]
    pub sub_url: Option<String>,
    /// Publisher WebSocket URL template (default: the subscriber template).
    #[arg(long, global = true)]
    pub pub_url: Option<String>,
    /// Name of the relay in reports (default: `wrs`, or `relay` with
    /// templates).
    #[arg(long, global = true)]
    pub label: Option<String>,
}

/// A channel ready to be connected to.
#[derive(Clone, Debug)]
pub struct Channel {
    /// WRS channel id, or the name put into the templates.
    pub name: String,
    pub sub: WsUrl,
    pub publ: WsUrl,
    /// Its Server-Sent Events stream.
    pub events: WsUrl,
    /// Where messages are published with HTTP `POST`.
    pub messages: WsUrl,
}

/// A WRS channel's history (SPEC §10): the last `size` messages younger
/// than `ttl_ms` are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct History {
    pub size: u32,
    pub ttl_ms: u64,
}

impl History {
    /// `SIZE:TTL_MS`, as on the command line.
    ///
    /// # Errors
    ///
    /// Not two numbers separated by a colon.
    pub fn parse(value: &str) -> Result<Self, String> {
        let (size, ttl) = value
            .split_once(':')
            .ok_or_else(|| format!("{value:?}: expected SIZE:TTL_MS, e.g. 1000:60000"))?;
        Ok(Self {
            size: size
                .parse()
                .map_err(|_| format!("{value:?}: {size:?} is not a size"))?,
            ttl_ms: ttl
                .parse()
                .map_err(|_| format!("{value:?}: {ttl:?} is not a TTL in milliseconds"))?,
        })
    }
}

impl std::fmt::Display for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.size, self.ttl_ms)
    }
}

/// The relay under test.
pub enum Target {
    Wrs {
        api: WsUrl,
        label: String,
    },
    Templates {
        sub: String,
        publ: String,
        label: String,
    },
}

#[derive(Deserialize)]
struct Created {
    token: String,
    data: CreatedChannel,
}

#[derive(Deserialize)]
struct CreatedChannel {
    id: String,
}

impl Target {
    /// Builds the target from the command line.
    ///
    /// # Errors
    ///
    /// A malformed or unresolvable server URL.
    pub async fn from_args(args: &TargetArgs) -> anyhow::Result<Self> {
        match (&args.sub_url, &args.pub_url) {
            (None, None) => Ok(Target::Wrs {
                api: WsUrl::parse(&args.server)
                    .await
                    .with_context(|| format!("server URL {}", args.server))?,
                label: args.label.clone().unwrap_or_else(|| "wrs".into()),
            }),
            (sub, publ) => {
                let sub = sub.clone().or_else(|| publ.clone()).unwrap_or_default();
                let publ = publ.clone().unwrap_or_else(|| sub.clone());
                Ok(Target::Templates {
                    sub,
                    publ,
                    label: args.label.clone().unwrap_or_else(|| "relay".into()),
                })
            }
        }
    }

    pub fn label(&self) -> &str {
        match self {
            Target::Wrs { label, .. } | Target::Templates { label, .. } => label,
        }
    }

    /// The WRS API address, for scenarios only WRS can run.
    ///
    /// # Errors
    ///
    /// The target is a URL template, not WRS.
    pub fn wrs_api(&self, scenario: &str) -> anyhow::Result<&WsUrl> {
        match self {
            Target::Wrs { api, .. } => Ok(api),
            Target::Templates { .. } => bail!(
                "the {scenario} scenario needs the WRS REST API; URL templates only drive broadcast relays (fanout, idle)"
            ),
        }
    }

    /// Creates (WRS) or names (templates) `count` channels of `pattern`.
    ///
    /// # Errors
    ///
    /// A REST call failed, or a template cannot hold several channels.
    pub async fn open_channels(
        &self,
        count: usize,
        pattern: &str,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Channel>> {
        self.open_channels_with(count, pattern, None, timeout).await
    }

    /// [`Self::open_channels`], the WRS channels created with `history`.
    ///
    /// # Errors
    ///
    /// As there, and history asked of a relay given by templates.
    pub async fn open_channels_with(
        &self,
        count: usize,
        pattern: &str,
        history: Option<History>,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Channel>> {
        match self {
            Target::Wrs { api, .. } => {
                let mut client =
                    HttpClient::new(api.addr, api.host.clone(), timeout).with_tls(api.tls);
                let mut channels = Vec::with_capacity(count);
                for _ in 0..count {
                    channels.push(create_channel_with(&mut client, api, pattern, history).await?);
                }
                Ok(channels)
            }
            Target::Templates { sub, publ, .. } => {
                ensure!(
                    history.is_none(),
                    "--history creates WRS channels; it does not apply to URL templates"
                );
                ensure!(
                    count == 1 || (sub.contains("{channel}") && publ.contains("{channel}")),
                    "more than one channel needs {{channel}} in the URL templates"
                );
                let run = crate::rng::FastRng::seeded().next_u32();
                let mut channels = Vec::with_capacity(count);
                for k in 0..count {
                    let name = format!("b{run:08x}c{k}");
                    let sub = WsUrl::parse(&sub.replace("{channel}", &name)).await?;
                    let publ = WsUrl::parse(&publ.replace("{channel}", &name)).await?;
                    channels.push(Channel {
                        events: sub.clone(),
                        messages: publ.clone(),
                        sub,
                        publ,
                        name,
                    });
                }
                Ok(channels)
            }
        }
    }

    /// Deletes WRS channels (nothing to do for templates). Failures are
    /// returned as a count: the run's numbers stand regardless.
    pub async fn close_channels(&self, channels: &[Channel], timeout: Duration) -> u64 {
        let Target::Wrs { api, .. } = self else {
            return 0;
        };
        let mut client = HttpClient::new(api.addr, api.host.clone(), timeout).with_tls(api.tls);
        let mut failures = 0;
        for channel in channels {
            let path = format!("/channels/{}", channel.name);
            match client.request("DELETE", &path, None).await {
                Ok(response) if response.status == 200 || response.status == 404 => {}
                _ => failures += 1,
            }
        }
        failures
    }
}

/// `POST /channels` with `pattern` and no inactivity timeout.
///
/// # Errors
///
/// The request failed or was refused.
pub async fn create_channel(
    client: &mut HttpClient,
    api: &WsUrl,
    pattern: &str,
) -> anyhow::Result<Channel> {
    create_channel_with(client, api, pattern, None).await
}

/// [`create_channel`], with `history` when given.
///
/// # Errors
///
/// The request failed or was refused.
pub async fn create_channel_with(
    client: &mut HttpClient,
    api: &WsUrl,
    pattern: &str,
    history: Option<History>,
) -> anyhow::Result<Channel> {
    let body = match history {
        None => format!(r#"{{"pattern":"{pattern}","timeout":-1}}"#),
        Some(History { size, ttl_ms }) => format!(
            r#"{{"pattern":"{pattern}","timeout":-1,"history":{{"size":{size},"ttl":{ttl_ms}}}}}"#
        ),
    };
    let response = client
        .request("POST", "/channels", Some(body.as_bytes()))
        .await
        .context("POST /channels")?;
    ensure!(
        response.status == 201,
        "POST /channels answered {}: {}",
        response.status,
        String::from_utf8_lossy(&response.body)
    );
    let created: Created =
        serde_json::from_slice(&response.body).context("POST /channels response body")?;
    let (id, token) = (&created.data.id, &created.token);
    let url = api.with_path(format!("/channels/{id}/connect?token={token}"));
    Ok(Channel {
        events: api.with_path(format!("/channels/{id}/events?token={token}")),
        messages: api.with_path(format!("/channels/{id}/messages?token={token}")),
        name: created.data.id,
        sub: url.clone(),
        publ: url,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_history() {
        let history = History::parse("1000:60000").unwrap();
        assert_eq!(
            history,
            History {
                size: 1000,
                ttl_ms: 60_000
            }
        );
        assert_eq!(history.to_string(), "1000:60000");
        assert!(History::parse("1000").is_err());
        assert!(History::parse("x:1").is_err());
    }
}

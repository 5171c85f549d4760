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
        match self {
            Target::Wrs { api, .. } => {
                let mut client =
                    HttpClient::new(api.addr, api.host.clone(), timeout).with_tls(api.tls);
                let mut channels = Vec::with_capacity(count);
                for _ in 0..count {
                    channels.push(create_channel(&mut client, api, pattern).await?);
                }
                Ok(channels)
            }
            Target::Templates { sub, publ, .. } => {
                ensure!(
                    count == 1 || (sub.contains("{channel}") && publ.contains("{channel}")),
                    "more than one channel needs {{channel}} in the URL templates"
                );
                let run = crate::rng::FastRng::seeded().next_u32();
                let mut channels = Vec::with_capacity(count);
                for k in 0..count {
                    let name = format!("b{run:08x}c{k}");
                    channels.push(Channel {
                        sub: WsUrl::parse(&sub.replace("{channel}", &name)).await?,
                        publ: WsUrl::parse(&publ.replace("{channel}", &name)).await?,
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
    let body = format!(r#"{{"pattern":"{pattern}","timeout":-1}}"#);
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
    let url = api.with_path(format!(
        "/channels/{}/connect?token={}",
        created.data.id, created.token
    ));
    Ok(Channel {
        name: created.data.id,
        sub: url.clone(),
        publ: url,
    })
}

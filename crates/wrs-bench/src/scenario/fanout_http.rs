//! The HTTP roles of `fanout` (SPEC §10): a subscriber that reads a
//! Server-Sent Events stream, and a publisher that `POST`s every message
//! on one HTTP/1.1 keep-alive connection.
//!
//! The SSE subscriber counts the stamps in `message` events exactly as a
//! WebSocket subscriber counts them in frames ([`Tally`]); a `close`
//! event, a `reset` event or the end of the stream is an error. The
//! publisher keeps at most `--pipeline` requests in flight (1: each POST
//! waits for its response) and, at the maximum rate, stays at most
//! `--backlog` messages ahead of its slowest subscriber, like the
//! WebSocket publisher. A message counts as sent once its response is a
//! 2xx; any other status is an error. The number of receivers the server
//! reports (WRS: `data.receivers`, Nchan: `subscribers`) is kept, so a
//! server that counts its subscribers wrongly shows up in the report.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::fanout::{
    FanoutArgs, MAX_BATCH, PayloadKind, Sent, Shared, SubscriberOut, Tally, WARMUP_EVERY,
    WRITE_TIMEOUT,
};
use crate::http::{Pipeline, Response};
use crate::payload::{Composer, Kind, Stamp, now_ns};
use crate::report::Report;
use crate::sse::{SseConn, SseStats};

/// What an HTTP publisher counted. Every refused (or unanswered) measured
/// `POST` is an error of the run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpStats {
    /// Measured `POST`s answered with a 2xx.
    pub accepted: u64,
    /// Measured `POST`s answered otherwise (or not at all).
    pub refused: u64,
    /// Lowest and highest receiver count the server reported for
    /// measured messages.
    pub receivers_min: Option<u64>,
    pub receivers_max: Option<u64>,
    /// 2xx responses without a receiver count.
    pub receivers_unknown: u64,
    /// Connections opened again after the server closed one.
    pub reconnects: u64,
}

impl HttpStats {
    pub fn add(&mut self, other: &HttpStats) {
        self.accepted += other.accepted;
        self.refused += other.refused;
        self.receivers_min = min_opt(self.receivers_min, other.receivers_min);
        self.receivers_max = self.receivers_max.max(other.receivers_max);
        self.receivers_unknown += other.receivers_unknown;
        self.reconnects += other.reconnects;
    }

    fn receivers(&mut self, count: Option<u64>) {
        match count {
            Some(n) => {
                self.receivers_min = min_opt(self.receivers_min, Some(n));
                self.receivers_max = self.receivers_max.max(Some(n));
            }
            None => self.receivers_unknown += 1,
        }
    }

    pub fn note(&self, report: &mut Report) {
        let extra = &mut report.extra;
        extra.insert("http_accepted".into(), json!(self.accepted));
        extra.insert("http_refused".into(), json!(self.refused));
        extra.insert("receivers_min".into(), json!(self.receivers_min));
        extra.insert("receivers_max".into(), json!(self.receivers_max));
        extra.insert("receivers_unknown".into(), json!(self.receivers_unknown));
        extra.insert("http_reconnects".into(), json!(self.reconnects));
    }
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// SSE stream counters added over the subscribers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SseTotals {
    subscribers: u64,
    comments: u64,
    /// Subscribers that got a `retry:` line.
    with_retry: u64,
    ids: u64,
    ids_not_increasing: u64,
    id_gaps: u64,
    other_ids: u64,
}

impl SseTotals {
    pub fn add(&mut self, stats: &SseStats) {
        self.subscribers += 1;
        self.comments += stats.comments;
        self.with_retry += u64::from(stats.retry_ms.is_some());
        self.ids += stats.ids;
        self.ids_not_increasing += stats.ids_not_increasing;
        self.id_gaps += stats.id_gaps;
        self.other_ids += stats.other_ids;
    }

    pub fn note(&self, report: &mut Report) {
        let extra = &mut report.extra;
        extra.insert("sse_subscribers".into(), json!(self.subscribers));
        extra.insert("sse_comments".into(), json!(self.comments));
        extra.insert("sse_with_retry".into(), json!(self.with_retry));
        extra.insert("sse_numeric_ids".into(), json!(self.ids));
        extra.insert(
            "sse_ids_not_increasing".into(),
            json!(self.ids_not_increasing),
        );
        extra.insert("sse_id_gaps".into(), json!(self.id_gaps));
        extra.insert("sse_other_ids".into(), json!(self.other_ids));
    }
}

/// Reads one event stream until `stop`.
pub(super) async fn subscribe(
    mut conn: SseConn,
    shared: Arc<Shared>,
    mut tally: Tally,
    stop: CancellationToken,
) -> SubscriberOut {
    let mut errors = Vec::new();
    // Events already read with the response head.
    let mut read: std::io::Result<usize> = Ok(1);
    'read: loop {
        match read {
            Ok(0) => {
                errors.push("SSE subscriber: stream ended by the server".into());
                break;
            }
            Err(e) => {
                errors.push(format!("SSE subscriber: read failed: {e}"));
                break;
            }
            Ok(_) => {}
        }
        let now = now_ns();
        loop {
            let (stamp, size, wire) = match conn.next_event() {
                Ok(Some(event)) if event.is_message() => {
                    (Stamp::find(event.data), event.data.len(), event.wire_bytes)
                }
                Ok(Some(event)) => {
                    errors.push(format!(
                        "SSE subscriber: event {} {}",
                        String::from_utf8_lossy(event.name),
                        String::from_utf8_lossy(&event.data[..event.data.len().min(200)])
                    ));
                    if event.name == b"close" {
                        break 'read;
                    }
                    continue;
                }
                Ok(None) => break,
                Err(e) => {
                    errors.push(format!("SSE subscriber: {e}"));
                    break 'read;
                }
            };
            let Some(stamp) = stamp else {
                continue;
            };
            if tally.arrive(&shared, stamp, now) {
                tally.wire.record(size, wire, false);
            }
        }
        tally.batch_done(&shared, now);
        read = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            read = conn.fill() => read,
        };
    }
    tally.finish(Some(conn.stats), errors)
}

/// One `POST` of `body` to `path`, encoded onto `out`.
fn encode_post(out: &mut Vec<u8>, path: &str, host: &str, body: &[u8]) {
    use std::io::Write as _;
    let _ = write!(
        out,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain\r\n\
         Accept: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    out.extend_from_slice(body);
}

/// The receiver count in a publish response: WRS's `"receivers": N` (in
/// `data`), Nchan's `"subscribers": N`.
pub fn receivers(body: &[u8]) -> Option<u64> {
    let at = [&b"\"receivers\":"[..], &b"\"subscribers\":"[..]]
        .iter()
        .find_map(|key| memchr::memmem::find(body, key).map(|i| i + key.len()))?;
    let digits: Vec<u8> = body[at..]
        .iter()
        .skip_while(|b| b.is_ascii_whitespace())
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// What the publisher does with one response; refusals are counted in
/// `stats` and the first few described in `samples`.
fn answered(response: &Response, stats: &mut HttpStats, samples: &mut Vec<String>) -> bool {
    if (200..300).contains(&response.status) {
        stats.accepted += 1;
        stats.receivers(receivers(&response.body));
        true
    } else {
        stats.refused += 1;
        if samples.len() < 5 {
            samples.push(format!(
                "HTTP publisher: answered {}: {}",
                response.status,
                String::from_utf8_lossy(&response.body[..response.body.len().min(200)])
            ));
        }
        false
    }
}

/// Publishes with `POST`s to `path` until the duration ends: warm-up
/// messages until `go`, then measured ones.
pub(super) async fn publish(
    mut pipe: Box<Pipeline>,
    path: String,
    me: usize,
    shared: Arc<Shared>,
    args: FanoutArgs,
    duration: Duration,
    go: CancellationToken,
) -> Sent {
    let mut composer = match args.payload {
        PayloadKind::Plain => Composer::plain(args.size),
        PayloadKind::Snapshot => Composer::snapshot(args.size, me as u64 + 1),
    };
    let host = pipe.host().to_owned();
    let source = me as u32;
    let publisher = Arc::clone(&shared.publishers[me]);
    let mut stats = HttpStats::default();
    let mut errors = Vec::new();
    let mut samples = Vec::new();
    let mut wire = Vec::with_capacity(64 * 1024);
    // Warm-up, one request at a time, until the measurement starts.
    let mut warm_seq = 0;
    while !go.is_cancelled() {
        let stamp = Stamp {
            kind: Kind::Warmup,
            source,
            seq: warm_seq,
            sent_ns: now_ns(),
        };
        warm_seq += 1;
        wire.clear();
        encode_post(&mut wire, &path, &host, composer.compose(&stamp));
        let exchange = async {
            pipe.send(&wire).await?;
            pipe.read_response().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, exchange).await {
            Ok(Ok(response)) if (200..300).contains(&response.status) => {}
            Ok(Ok(response)) => {
                errors.push(format!(
                    "HTTP publisher: warm-up answered {}: {}",
                    response.status,
                    String::from_utf8_lossy(&response.body[..response.body.len().min(200)])
                ));
                return Sent::http(errors, stats);
            }
            Ok(Err(e)) => {
                errors.push(format!("HTTP publisher: warm-up: {e}"));
                return Sent::http(errors, stats);
            }
            Err(_) => {
                errors.push("HTTP publisher: warm-up request took 10 s".into());
                return Sent::http(errors, stats);
            }
        }
        tokio::select! {
            () = go.cancelled() => {}
            () = tokio::time::sleep(WARMUP_EVERY) => {}
        }
    }
    let started = Instant::now();
    let end = started + duration;
    let window = args.pipeline as u64;
    let mut seq = 0u64;
    let mut in_flight = 0u64;
    let mut min_acked = 0u64;
    let total_at_rate = args
        .rate
        .map(|rate| (duration.as_secs_f64() * rate).ceil() as u64);
    let result: Result<(), String> = async {
        loop {
            let sending = Instant::now() < end;
            // How many may go now: the window, then the rate or the backlog.
            let mut allowed = if sending { window - in_flight } else { 0 };
            if allowed > 0 {
                allowed = match (args.rate, total_at_rate) {
                    (Some(rate), Some(total)) => {
                        let due = ((started.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
                        due.saturating_sub(seq)
                    }
                    _ => {
                        if seq >= min_acked.saturating_add(args.backlog) {
                            min_acked = publisher.min_acked();
                        }
                        min_acked.saturating_add(args.backlog).saturating_sub(seq)
                    }
                }
                .min(allowed)
                .min(MAX_BATCH);
            }
            if allowed > 0 {
                wire.clear();
                let sent_ns = now_ns();
                for i in 0..allowed {
                    let stamp = Stamp {
                        kind: Kind::Measure,
                        source,
                        seq: seq + i,
                        sent_ns,
                    };
                    encode_post(&mut wire, &path, &host, composer.compose(&stamp));
                }
                if !pipe.is_open() && in_flight > 0 {
                    // The server closed after a response: what was in
                    // flight behind it was not served.
                    stats.refused += in_flight;
                    in_flight = 0;
                }
                match tokio::time::timeout(WRITE_TIMEOUT, pipe.send(&wire)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(format!("HTTP publisher: write failed: {e}")),
                    Err(_) => return Err("HTTP publisher: write blocked for 10 s".into()),
                }
                seq += allowed;
                in_flight += allowed;
                continue;
            }
            if in_flight > 0 {
                if !pipe.is_open() {
                    stats.refused += in_flight;
                    in_flight = 0;
                    continue;
                }
                // Every response already read, and at least one.
                loop {
                    let response =
                        match tokio::time::timeout(WRITE_TIMEOUT, pipe.read_response()).await {
                            Ok(Ok(response)) => response,
                            Ok(Err(e)) => return Err(format!("HTTP publisher: response: {e}")),
                            Err(_) => return Err("HTTP publisher: no response for 10 s".into()),
                        };
                    in_flight -= 1;
                    if answered(&response, &mut stats, &mut samples) {
                        publisher.sent.fetch_add(1, Ordering::SeqCst);
                    }
                    if in_flight == 0 || !pipe.response_buffered() {
                        break;
                    }
                }
                continue;
            }
            if !sending {
                return Ok(());
            }
            // Nothing in flight, nothing allowed: wait for the rate or
            // for the subscribers.
            match args.rate {
                Some(rate) => {
                    let next = started + Duration::from_secs_f64(seq as f64 / rate);
                    tokio::time::sleep_until(next.min(end).into()).await;
                }
                None => {
                    publisher.waiting.store(true, Ordering::SeqCst);
                    min_acked = publisher.min_acked();
                    if seq >= min_acked.saturating_add(args.backlog) {
                        tokio::select! {
                            () = publisher.wake.notified() => {}
                            () = tokio::time::sleep(Duration::from_millis(1)) => {}
                        }
                    }
                    publisher.waiting.store(false, Ordering::SeqCst);
                }
            }
        }
    }
    .await;
    if let Err(e) = result {
        stats.refused += in_flight;
        errors.push(e);
    }
    stats.reconnects = pipe.reconnects;
    let mut sent = Sent::http(errors, stats);
    sent.samples = samples;
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_receiver_count() {
        assert_eq!(
            receivers(br#"{"message":"published","data":{"receivers":1000}}"#),
            Some(1000)
        );
        assert_eq!(
            receivers(
                br#"{"messages": 2, "requested": 0, "subscribers": 17, "last_message_id": "1:1" }"#
            ),
            Some(17)
        );
        assert_eq!(receivers(br#"{"message":"published"}"#), None);
    }

    #[test]
    fn encodes_a_post() {
        let mut out = Vec::new();
        encode_post(&mut out, "/channels/AB/messages?token=t", "h:1", b"hello");
        assert_eq!(
            out,
            b"POST /channels/AB/messages?token=t HTTP/1.1\r\nHost: h:1\r\nContent-Type: text/plain\r\nAccept: application/json\r\nContent-Length: 5\r\n\r\nhello"
        );
    }

    #[test]
    fn adds_stats() {
        let mut a = HttpStats::default();
        a.receivers(Some(10));
        a.receivers(None);
        let mut b = HttpStats::default();
        b.receivers(Some(7));
        a.add(&b);
        assert_eq!(
            (a.receivers_min, a.receivers_max, a.receivers_unknown),
            (Some(7), Some(10), 1)
        );
    }
}

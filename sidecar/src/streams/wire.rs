//! The three wire formats of DESIGN.md ("The sidecar"): Splunk HEC, Datadog
//! logs intake and a signed webhook; what a batch looks like on the wire and
//! what a receiver's answer means.

use std::io::Write;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::config::SiemKind;

/// Datadog's intake takes at most this many entries, and bytes, per request.
pub const DATADOG_MAX_EVENTS: usize = 1000;
pub const DATADOG_MAX_BYTES: usize = 5 * 1024 * 1024;

/// One event ready to go: its chain position and the JSON DESIGN.md lists.
#[derive(Clone, Debug)]
pub struct Event {
    pub seq: i64,
    pub id: i64,
    pub at: chrono::DateTime<chrono::Utc>,
    pub body: Value,
    /// The body's size as JSON, measured once (by `fit`).
    pub size: usize,
}

pub struct Destination {
    pub kind: SiemKind,
    pub url: String,
    pub secret: crate::config::Secret,
    /// In the webhook body: the tenant stream's id, or the operator stream's name.
    pub stream: Value,
    pub host: String,
    pub gzip: bool,
    pub index: Option<String>,
}

/// An event larger than `max` bytes keeps its identity and its place in the
/// chain, with the bulky parts replaced by a marker: never dropped silently
/// (its hash then cannot be recomputed by the receiver, which the marker says).
pub fn fit(mut e: Event, max: usize) -> Event {
    let size = json_len(&e.body);
    e.size = size;
    if size <= max {
        return e;
    }
    if let Some(o) = e.body.as_object_mut() {
        for k in ["old", "new", "detail", "pk"] {
            if o.get(k).is_some_and(|v| !v.is_null()) {
                o.insert(k.into(), Value::Null);
            }
        }
        o.insert("truncated".into(), json!({"original_bytes": size, "reason": "larger than the stream's batch limit"}));
    }
    e.size = json_len(&e.body);
    e
}

/// The length of a value's JSON text, without keeping the text.
fn json_len(v: &Value) -> usize {
    struct Count(usize);
    impl Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    serde_json::to_writer(&mut c, v).expect("JSON of a JSON value");
    c.0
}

/// The request body (and content type) for a batch of events of one chain.
pub fn body(d: &Destination, tenant_id: &Value, tenant: &str, events: &[Event]) -> Vec<u8> {
    match d.kind {
        SiemKind::SplunkHec => {
            let mut out = Vec::new();
            for e in events {
                let mut o = json!({
                    "time": e.at.timestamp() as f64 + f64::from(e.at.timestamp_subsec_micros()) / 1e6,
                    "host": d.host,
                    "source": "levqor",
                    "sourcetype": "levqor:audit",
                    "event": e.body,
                });
                if let Some(i) = &d.index {
                    o["index"] = json!(i);
                }
                serde_json::to_writer(&mut out, &o).expect("json");
                out.push(b'\n');
            }
            out
        }
        SiemKind::Datadog => {
            let entries: Vec<Value> = events
                .iter()
                .map(|e| {
                    json!({
                        "ddsource": "levqor",
                        "service": "levqor",
                        "hostname": d.host,
                        "ddtags": format!("tenant:{tenant}"),
                        "message": e.body,
                    })
                })
                .collect();
            serde_json::to_vec(&entries).expect("json")
        }
        SiemKind::Webhook => serde_json::to_vec(&json!({
            "stream": d.stream,
            "tenant_id": tenant_id,
            "events": events.iter().map(|e| &e.body).collect::<Vec<_>>(),
        }))
        .expect("json"),
    }
}

pub fn gzip(body: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(body).expect("gzip in memory");
    z.finish().expect("gzip in memory")
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// What a receiver's answer means for the batch.
#[derive(Debug, PartialEq)]
pub enum Answer {
    Accepted,
    /// 401/403: the secret is refused; nothing more is sent until it changes.
    AuthFailed(String),
    /// 400 (and other 4xx but 408/429): something in the batch is refused.
    Refused(String),
    /// 429, 503 (Splunk's "server busy"), other 5xx, 408, no answer: later,
    /// with backoff. `counts`: the receiver answered with an error for this
    /// batch (500, 502, 504), which after `[audit] max_attempts` parks it; a
    /// receiver that is down, busy or rate limiting is waited for, never
    /// given up on (nothing it would have received is lost).
    Later { why: String, retry_after: Option<std::time::Duration>, counts: bool },
}

pub fn answer(status: u16, reply: &str, retry_after: Option<std::time::Duration>) -> Answer {
    let reply: String = reply.chars().take(500).collect();
    match status {
        200..=299 => Answer::Accepted,
        401 | 403 => Answer::AuthFailed(format!("{status}: {reply}")),
        408 | 429 | 503 => Answer::Later { why: format!("{status}: {reply}"), retry_after, counts: false },
        500..=599 => Answer::Later { why: format!("{status}: {reply}"), retry_after, counts: true },
        _ => Answer::Refused(format!("{status}: {reply}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: i64) -> Event {
        Event { seq, id: seq * 10, at: chrono::Utc::now(), body: json!({"seq": seq, "new": {"x": "y".repeat(100)}}), size: 0 }
    }

    #[test]
    fn bodies_follow_the_three_formats() {
        let d = Destination {
            kind: SiemKind::SplunkHec,
            url: "http://127.0.0.1/".into(),
            secret: crate::config::Secret::new("s3cret-token".into()),
            stream: json!(1),
            host: "h".into(),
            gzip: false,
            index: None,
        };
        let b = body(&d, &json!("t"), "acme", &[ev(1), ev(2)]);
        let parsed: Vec<Value> = serde_json::Deserializer::from_slice(&b).into_iter().map(|v| v.unwrap()).collect();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0]["sourcetype"], "levqor:audit");
        assert_eq!(parsed[1]["event"]["seq"], 2);
        let d = Destination { kind: SiemKind::Datadog, ..d };
        let b: Value = serde_json::from_slice(&body(&d, &json!("t"), "acme", &[ev(1)])).unwrap();
        assert_eq!(b[0]["ddtags"], "tenant:acme");
        let d = Destination { kind: SiemKind::Webhook, ..d };
        let b: Value = serde_json::from_slice(&body(&d, &json!("t"), "acme", &[ev(1), ev(2)])).unwrap();
        assert_eq!(b["events"].as_array().unwrap().len(), 2);
        assert!(signature("k", 5, b"x").starts_with("t=5,v1="));
    }

    #[test]
    fn a_large_event_is_truncated_with_a_marker() {
        let e = fit(ev(1), 50);
        assert_eq!(e.body["seq"], 1);
        assert!(e.body["new"].is_null());
        assert!(e.body["truncated"]["original_bytes"].as_u64().unwrap() > 50);
        assert_eq!(e.size, e.body.to_string().len());
    }

    #[test]
    fn answers_mean_what_receivers_mean() {
        assert_eq!(answer(200, "", None), Answer::Accepted);
        assert!(matches!(answer(403, "bad token", None), Answer::AuthFailed(_)));
        assert!(matches!(answer(503, "{\"code\":9}", None), Answer::Later { counts: false, .. }));
        assert!(matches!(answer(500, "oops", None), Answer::Later { counts: true, .. }));
        assert!(matches!(answer(400, "bad event", None), Answer::Refused(_)));
    }
}

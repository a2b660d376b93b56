//! Three SIEM receivers on loopback, one per wire format of DESIGN.md
//! ("The sidecar"): a Splunk HTTP Event Collector (`Authorization: Splunk
//! <token>`, concatenated event objects, HEC's `{"text","code"}` answers), a
//! Datadog logs intake (`DD-API-KEY`, a JSON array of at most 1,000 entries
//! and 5 MB uncompressed, gzip, 202) and a webhook receiver that verifies
//! `Levqor-Signature`. Each records the events it accepted, and can be made to
//! fail: a status for the next N requests, dropped connections, a slow
//! answer, down (connection refused) and back, a poison event it refuses.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::server::{body_of, Reply, Req, Server};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    SplunkHec,
    Datadog,
    Webhook,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::SplunkHec => "splunk_hec",
            Kind::Datadog => "datadog",
            Kind::Webhook => "webhook",
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Kind::SplunkHec => "/services/collector/event",
            Kind::Datadog => "/api/v2/logs",
            Kind::Webhook => "/levqor/audit",
        }
    }
}

/// One accepted request.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub delivery_id: Option<String>,
    pub events: usize,
    pub gzip: bool,
    pub bytes: usize,
}

#[derive(Default)]
pub struct State {
    pub secret: String,
    /// Every accepted event (the levqor event object), in arrival order.
    pub events: Vec<Value>,
    /// When each event arrived (same index as `events`).
    pub arrived: Vec<std::time::SystemTime>,
    pub deliveries: Vec<Delivery>,
    /// Every request that reached the handler, accepted or not.
    pub requests: u64,
    /// Requests refused for their credentials.
    pub auth_refused: u64,
    /// Requests answered with an injected fault or a refusal.
    pub refused: u64,
    faults: VecDeque<(Fault, u32)>,
    /// A batch holding an event whose JSON contains this text is refused (400).
    pub poison: Option<String>,
    /// Every request waits this long before its answer.
    pub delay: Option<Duration>,
}

#[derive(Clone, Debug)]
pub enum Fault {
    Status(u16),
    Drop,
}

pub struct Receiver {
    pub kind: Kind,
    pub state: Arc<Mutex<State>>,
    pub server: Arc<Server>,
}

impl Receiver {
    pub async fn start(kind: Kind, secret: &str) -> std::io::Result<Receiver> {
        Self::start_on("127.0.0.1:0".parse().unwrap(), kind, secret).await
    }

    pub async fn start_on(addr: SocketAddr, kind: Kind, secret: &str) -> std::io::Result<Receiver> {
        let state = Arc::new(Mutex::new(State { secret: secret.into(), ..State::default() }));
        let s = state.clone();
        let server = Server::start(addr, Arc::new(move |r| Box::pin(handle(kind, s.clone(), r)))).await?;
        Ok(Receiver { kind, state, server })
    }

    pub fn url(&self) -> String {
        format!("http://{}{}", self.server.addr, self.kind.path())
    }

    /// Answer `status` to the next `count` requests.
    pub fn fail(&self, status: u16, count: u32) {
        if count == 0 {
            return;
        }
        self.state.lock().unwrap().faults.push_back((Fault::Status(status), count));
    }

    /// Close the connection of the next `count` requests without answering.
    pub fn drop_next(&self, count: u32) {
        if count == 0 {
            return;
        }
        self.state.lock().unwrap().faults.push_back((Fault::Drop, count));
    }

    pub fn set_secret(&self, s: &str) {
        self.state.lock().unwrap().secret = s.into();
    }

    pub fn set_poison(&self, p: Option<&str>) {
        self.state.lock().unwrap().poison = p.map(str::to_owned);
    }

    pub fn set_delay(&self, d: Option<Duration>) {
        self.state.lock().unwrap().delay = d;
    }

    /// Connection refused from now on.
    pub fn down(&self) {
        self.server.stop();
    }

    pub async fn up(&self) {
        self.server.resume().await.expect("listen again on the same port");
    }

    pub fn events(&self) -> Vec<Value> {
        self.state.lock().unwrap().events.clone()
    }

    pub fn requests(&self) -> u64 {
        self.state.lock().unwrap().requests
    }

    /// The accepted events of one tenant, as received.
    pub fn events_of(&self, tenant_id: &str) -> Vec<Value> {
        self.events().into_iter().filter(|e| e["tenant_id"].as_str() == Some(tenant_id)).collect()
    }
}

/// What a receiver can prove about one tenant's chain from what it got:
/// redelivered entries (same seq, same hash) are dropped, as a receiver
/// deduplicates; then seqs must run 1, 2, 3… (or from `first`) with no gap and
/// no fork, each `prev_hash` equal to the previous entry's `hash`.
pub fn check_chain(events: &[Value], first: i64) -> Result<Vec<Value>, String> {
    let mut by_seq: BTreeMap<i64, Value> = BTreeMap::new();
    let mut last_seen = i64::MIN;
    for e in events {
        let seq = e["seq"].as_i64().ok_or_else(|| format!("an event without seq: {e}"))?;
        if let Some(prev) = by_seq.get(&seq) {
            if prev["hash"] != e["hash"] {
                return Err(format!("fork at seq {seq}: {} then {}", prev["hash"], e["hash"]));
            }
            // A redelivery: fine, but it must not come after later entries
            // of another batch were accepted out of order.
            continue;
        }
        if seq < last_seen {
            return Err(format!("seq {seq} arrived after seq {last_seen}"));
        }
        last_seen = seq;
        by_seq.insert(seq, e.clone());
    }
    let mut expect = first;
    let mut prev_hash: Option<Value> = None;
    for (seq, e) in &by_seq {
        if *seq != expect {
            return Err(format!("gap: expected seq {expect}, got {seq}"));
        }
        if let Some(p) = &prev_hash {
            if &e["prev_hash"] != p {
                return Err(format!("seq {seq}: prev_hash {} is not the previous hash {p}", e["prev_hash"]));
            }
        }
        prev_hash = Some(e["hash"].clone());
        expect += 1;
    }
    Ok(by_seq.into_values().collect())
}

fn hec(status: u16, text: &str, code: u32) -> Reply {
    Reply::json(status, json!({"text": text, "code": code}))
}

async fn handle(kind: Kind, state: Arc<Mutex<State>>, r: Req) -> Reply {
    if r.method == "GET" && r.path == "/_fake/events" {
        let st = state.lock().unwrap();
        return Reply::json(200, json!({"requests": st.requests, "events": st.events}));
    }
    let (fault, delay) = {
        let mut st = state.lock().unwrap();
        st.requests += 1;
        let mut hit = None;
        if let Some((f, n)) = st.faults.front_mut() {
            *n -= 1;
            hit = Some(f.clone());
            if *n == 0 {
                st.faults.pop_front();
            }
        }
        if hit.is_some() {
            st.refused += 1;
        }
        (hit, st.delay)
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    match fault {
        Some(Fault::Drop) => return Reply::Drop,
        Some(Fault::Status(s)) => {
            return match (kind, s) {
                (Kind::SplunkHec, 503) => hec(503, "Server is busy", 9),
                (Kind::SplunkHec, _) => hec(s, "Internal server error", 8),
                (Kind::Datadog, 429) => Reply::Json(429, json!({"errors": ["Too Many Requests"]}), vec![("retry-after", "1".into())]),
                _ => Reply::json(s, json!({"errors": [format!("injected {s}")]})),
            };
        }
        None => {}
    }
    if r.method != "POST" || r.path != kind.path() {
        return Reply::json(404, json!({"errors": ["not found"]}));
    }
    let secret = state.lock().unwrap().secret.clone();
    // Credentials, as each product checks them.
    let auth = match kind {
        Kind::SplunkHec => match r.header("authorization") {
            None => Err(hec(401, "Token is required", 2)),
            Some(h) if h != format!("Splunk {secret}") => Err(hec(403, "Invalid token", 4)),
            _ => Ok(()),
        },
        Kind::Datadog => match r.header("dd-api-key") {
            None => Err(Reply::json(401, json!({"errors": ["Unauthorized"]}))),
            Some(k) if k != secret => Err(Reply::json(403, json!({"errors": ["Forbidden"]}))),
            _ => Ok(()),
        },
        Kind::Webhook => match (r.header("levqor-signature"), r.header("levqor-delivery")) {
            (Some(sig), Some(_)) if verify(&secret, sig, &r.body) => Ok(()),
            _ => Err(Reply::json(401, json!({"error": "bad or missing Levqor-Signature"}))),
        },
    };
    if let Err(reply) = auth {
        let mut st = state.lock().unwrap();
        st.auth_refused += 1;
        st.refused += 1;
        return reply;
    }
    let gzip = r.header("content-encoding").is_some_and(|e| e.eq_ignore_ascii_case("gzip"));
    let body = match body_of(&r) {
        Ok(b) => b,
        Err(e) => return Reply::json(400, json!({"errors": [format!("bad gzip: {e}")]})),
    };
    let events = match parse(kind, &body) {
        Ok(ev) => ev,
        Err(reply) => {
            state.lock().unwrap().refused += 1;
            return reply;
        }
    };
    let mut st = state.lock().unwrap();
    if let Some(p) = &st.poison {
        if let Some(i) = events.iter().position(|e| e.to_string().contains(p.as_str())) {
            st.refused += 1;
            return match kind {
                Kind::SplunkHec => Reply::json(400, json!({"text": "Invalid data format", "code": 6, "invalid-event-number": i})),
                _ => Reply::json(400, json!({"errors": [format!("event {i} refused")]})),
            };
        }
    }
    let now = std::time::SystemTime::now();
    st.deliveries.push(Delivery {
        delivery_id: r.header("levqor-delivery").map(str::to_owned),
        events: events.len(),
        gzip,
        bytes: body.len(),
    });
    for e in events {
        st.events.push(e);
        st.arrived.push(now);
    }
    match kind {
        Kind::SplunkHec => hec(200, "Success", 0),
        Kind::Datadog => Reply::json(202, json!({})),
        Kind::Webhook => Reply::json(200, json!({"ok": true})),
    }
}

/// The levqor events in a body, or the receiver's refusal.
fn parse(kind: Kind, body: &[u8]) -> Result<Vec<Value>, Reply> {
    match kind {
        Kind::SplunkHec => {
            if body.iter().all(u8::is_ascii_whitespace) {
                return Err(hec(400, "No data", 5));
            }
            let mut out = Vec::new();
            for (i, v) in serde_json::Deserializer::from_slice(body).into_iter::<Value>().enumerate() {
                let Ok(v) = v else {
                    return Err(Reply::json(400, json!({"text": "Invalid data format", "code": 6, "invalid-event-number": i})));
                };
                match v.get("event") {
                    Some(e) if !e.is_null() => {
                        if v["sourcetype"] != "levqor:audit" || v["source"] != "levqor" || !v["time"].is_number() {
                            return Err(Reply::json(400, json!({"text": "Invalid data format", "code": 6, "invalid-event-number": i})));
                        }
                        out.push(e.clone())
                    }
                    _ => return Err(Reply::json(400, json!({"text": "Event field is required", "code": 12, "invalid-event-number": i}))),
                }
            }
            Ok(out)
        }
        Kind::Datadog => {
            if body.len() > 5 * 1024 * 1024 {
                return Err(Reply::json(413, json!({"errors": ["Payload too large"]})));
            }
            let Ok(Value::Array(entries)) = serde_json::from_slice::<Value>(body) else {
                return Err(Reply::json(400, json!({"errors": ["Malformed payload"]})));
            };
            if entries.len() > 1000 {
                return Err(Reply::json(413, json!({"errors": ["Too many entries in the array (at most 1000)"]})));
            }
            let mut out = Vec::new();
            for e in entries {
                if e["ddsource"] != "levqor" || !e["ddtags"].as_str().is_some_and(|t| t.starts_with("tenant:")) {
                    return Err(Reply::json(400, json!({"errors": ["entry without ddsource or tenant tag"]})));
                }
                let m = &e["message"];
                if m["tenant"].as_str() != e["ddtags"].as_str().and_then(|t| t.strip_prefix("tenant:")) {
                    return Err(Reply::json(400, json!({"errors": ["tenant tag does not match the event"]})));
                }
                out.push(m.clone());
            }
            Ok(out)
        }
        Kind::Webhook => {
            let Ok(v) = serde_json::from_slice::<Value>(body) else {
                return Err(Reply::json(400, json!({"error": "not JSON"})));
            };
            let Some(events) = v["events"].as_array() else {
                return Err(Reply::json(400, json!({"error": "no events array"})));
            };
            if events.iter().any(|e| e["tenant_id"] != v["tenant_id"]) {
                return Err(Reply::json(400, json!({"error": "an event of another tenant in the batch"})));
            }
            Ok(events.clone())
        }
    }
}

fn verify(secret: &str, header: &str, body: &[u8]) -> bool {
    use hmac::{Hmac, Mac};
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => sigs.push(v.to_string()),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    if (crate::stripe::unix_now() - t).abs() > 300 {
        return false;
    }
    sigs.iter().any(|s| {
        let Ok(raw) = hex::decode(s) else { return false };
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        mac.verify_slice(&raw).is_ok()
    })
}

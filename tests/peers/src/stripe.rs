//! A fake Stripe for the endpoints levqor's sidecar uses, speaking Stripe's
//! wire format: form-encoded requests, `Authorization: Bearer sk_…`, JSON
//! answers and Stripe's error shape, `Idempotency-Key` replaying the first
//! answer (and refusing the same key with other parameters), meter events
//! deduplicated by `identifier`, meters and their event summaries. Faults can
//! be injected: a status (429 with `Retry-After`, 500, 400) for the next N
//! requests to a path, slow answers, dropped connections, an outage.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::server::{Reply, Req, Server};

#[derive(Clone, Debug)]
pub struct MeterEvent {
    pub identifier: String,
    pub event_name: String,
    pub customer: String,
    pub value: i64,
    pub timestamp: i64,
}

#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer `status` to the next `count` requests whose path starts with `path`.
    Status { path: String, status: u16, retry_after: Option<u64>, count: u32 },
    /// Answer the next `count` such requests after `delay`.
    Slow { path: String, delay: Duration, count: u32 },
    /// Close the connection of the next `count` such requests without answering.
    Drop { path: String, count: u32 },
}

#[derive(Default)]
pub struct State {
    pub api_key: String,
    pub meters: Vec<(String, String)>,
    pub customers: BTreeMap<String, Value>,
    pub subscriptions: BTreeMap<String, Value>,
    pub events: Vec<MeterEvent>,
    identifiers: HashSet<String>,
    idempotency: HashMap<String, (String, u16, Value)>,
    pub faults: VecDeque<Fault>,
    /// Every request, by "METHOD path-prefix" (the path up to its id).
    pub requests: BTreeMap<String, u64>,
    /// While set, every API request answers 503 (Stripe down).
    pub down: bool,
    /// Meter events refused with a 400 when their value is this (a poison entry).
    pub refuse_value: Option<i64>,
    /// Extra usage per (customer, event_name) that Stripe "has" (injected drift).
    pub drift: HashMap<(String, String), i64>,
    /// How long a meter event request takes (default 200 µs): a stand-in
    /// for the round trip to Stripe, so that concurrency shows.
    pub meter_latency: Duration,
    /// Meter requests in flight per (customer, event_name), and the most seen at once.
    in_flight: HashMap<(String, String), u32>,
    pub max_in_flight_per_customer: u32,
    seq: u64,
}

impl State {
    fn id(&mut self, prefix: &str) -> String {
        self.seq += 1;
        format!("{prefix}_{:014}{:08x}", self.seq, rand::random::<u32>())
    }

    /// What Stripe holds for a customer and meter event, in [start, end).
    pub fn total(&self, customer: &str, event_name: &str, start: i64, end: i64) -> i64 {
        self.events
            .iter()
            .filter(|e| e.customer == customer && e.event_name == event_name && e.timestamp >= start && e.timestamp < end)
            .map(|e| e.value)
            .sum::<i64>()
            + self.drift.get(&(customer.to_string(), event_name.to_string())).copied().unwrap_or(0)
    }

    pub fn total_all(&self, customer: &str, event_name: &str) -> i64 {
        self.total(customer, event_name, i64::MIN, i64::MAX)
    }

    pub fn customer_of(&self, tenant: &str) -> Option<String> {
        self.customers
            .iter()
            .find(|(_, c)| c.pointer("/metadata/levqor_tenant_id").and_then(Value::as_str) == Some(tenant))
            .map(|(id, _)| id.clone())
    }

    pub fn request_count(&self, key: &str) -> u64 {
        self.requests.iter().filter(|(k, _)| k.starts_with(key)).map(|(_, n)| n).sum()
    }
}

pub struct FakeStripe {
    pub state: Arc<Mutex<State>>,
    pub server: Arc<Server>,
}

impl FakeStripe {
    pub async fn start(addr: SocketAddr, api_key: &str, meters: &[&str]) -> std::io::Result<FakeStripe> {
        let mut st = State { api_key: api_key.into(), meter_latency: Duration::from_micros(200), ..State::default() };
        for (i, m) in meters.iter().enumerate() {
            st.meters.push((format!("mtr_fake{i:04}"), m.to_string()));
        }
        let state = Arc::new(Mutex::new(st));
        let s = state.clone();
        let server = Server::start(addr, Arc::new(move |r| Box::pin(handle(s.clone(), r)))).await?;
        Ok(FakeStripe { state, server })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr)
    }
}

fn error(status: u16, kind: &str, message: &str, code: Option<&str>) -> Reply {
    Reply::json(status, json!({"error": {"type": kind, "message": message, "code": code}}))
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn form(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).into_owned().collect()
}

fn get<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
    p.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str())
}

/// items[0][price]=…, items[1][id]=…&items[1][deleted]=true
fn items(p: &[(String, String)]) -> BTreeMap<u32, BTreeMap<String, String>> {
    let mut out: BTreeMap<u32, BTreeMap<String, String>> = BTreeMap::new();
    for (k, v) in p {
        if let Some(rest) = k.strip_prefix("items[") {
            if let Some((i, field)) = rest.split_once("][") {
                if let Ok(i) = i.parse() {
                    out.entry(i).or_default().insert(field.trim_end_matches(']').to_string(), v.clone());
                }
            }
        }
    }
    out
}

fn request_key(r: &Req) -> String {
    // "/v1/subscriptions/sub_123" -> "/v1/subscriptions/{id}"
    let path: Vec<String> = r
        .path
        .split('/')
        .map(|s| if s.contains('_') && !s.starts_with("meter") && !s.contains("event_summaries") { "{id}".into() } else { s.to_string() })
        .collect();
    format!("{} {}", r.method, path.join("/"))
}

async fn handle(state: Arc<Mutex<State>>, r: Req) -> Reply {
    if r.path.starts_with("/_fake/") {
        return admin(&state, &r);
    }
    // Faults first: they stand for the network and Stripe's own trouble.
    let fault = {
        let mut st = state.lock().unwrap();
        *st.requests.entry(request_key(&r)).or_default() += 1;
        if st.down {
            return error(503, "api_error", "Stripe is unavailable (fake outage)", None);
        }
        let mut hit = None;
        for f in st.faults.iter_mut() {
            let (path, count) = match f {
                Fault::Status { path, count, .. } | Fault::Slow { path, count, .. } | Fault::Drop { path, count } => (path, count),
            };
            if *count > 0 && r.path.starts_with(path.as_str()) {
                *count -= 1;
                hit = Some(f.clone());
                break;
            }
        }
        st.faults.retain(|f| !matches!(f, Fault::Status { count: 0, .. } | Fault::Slow { count: 0, .. } | Fault::Drop { count: 0, .. }));
        hit
    };
    match fault {
        Some(Fault::Status { status, retry_after, .. }) => {
            let mut headers = Vec::new();
            if let Some(s) = retry_after {
                headers.push(("retry-after", s.to_string()));
            }
            let kind = if status == 429 { "rate_limit_error" } else if status >= 500 { "api_error" } else { "invalid_request_error" };
            return Reply::Json(status, json!({"error": {"type": kind, "message": format!("injected {status}")}}), headers);
        }
        Some(Fault::Drop { .. }) => return Reply::Drop,
        Some(Fault::Slow { delay, .. }) => tokio::time::sleep(delay).await,
        None => {}
    }
    let key = state.lock().unwrap().api_key.clone();
    if r.header("authorization") != Some(&format!("Bearer {key}")) {
        return error(401, "invalid_request_error", "Invalid API Key provided", None);
    }
    let params = form(&r.body);
    // Idempotency: the first answer, replayed; other parameters under the same key, refused.
    let idem = r.header("idempotency-key").map(str::to_owned);
    let fingerprint = format!("{} {} {}", r.method, r.path, String::from_utf8_lossy(&r.body));
    if let Some(k) = &idem {
        if let Some((fp, status, body)) = state.lock().unwrap().idempotency.get(k).cloned() {
            if fp != fingerprint {
                return error(400, "idempotency_error", "Keys for idempotent requests can only be used with the same parameters they were first used with.", None);
            }
            return Reply::Json(status, body, vec![("idempotent-replayed", "true".into())]);
        }
    }
    let (status, body) = api(&state, &r, &params).await;
    if let Some(k) = idem {
        if status < 500 {
            state.lock().unwrap().idempotency.insert(k, (fingerprint, status, body.clone()));
        }
    }
    Reply::Json(status, body, Vec::new())
}

async fn api(state: &Arc<Mutex<State>>, r: &Req, p: &[(String, String)]) -> (u16, Value) {
    let err = |status: u16, message: &str| (status, json!({"error": {"type": "invalid_request_error", "message": message}}));
    let parts: Vec<&str> = r.path.trim_start_matches('/').split('/').collect();
    match (r.method.as_str(), parts.as_slice()) {
        ("POST", ["v1", "customers"]) => {
            let mut st = state.lock().unwrap();
            let id = st.id("cus");
            let metadata: serde_json::Map<String, Value> = p
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix("metadata[")?.trim_end_matches(']').to_string(), json!(v))))
                .collect();
            let c = json!({"id": id, "object": "customer", "name": get(p, "name"), "metadata": metadata, "created": now()});
            st.customers.insert(id, c.clone());
            (200, c)
        }
        ("POST", ["v1", "subscriptions"]) => {
            let mut st = state.lock().unwrap();
            let Some(customer) = get(p, "customer").map(str::to_owned) else { return err(400, "Missing required param: customer.") };
            if !st.customers.contains_key(&customer) {
                return err(400, &format!("No such customer: '{customer}'"));
            }
            let id = st.id("sub");
            let mut data = Vec::new();
            for (_, it) in items(p) {
                if let Some(price) = it.get("price") {
                    let item = st.id("si");
                    data.push(json!({"id": item, "object": "subscription_item", "price": {"id": price, "object": "price"}}));
                }
            }
            let s = json!({"id": id, "object": "subscription", "customer": customer, "status": "active",
                           "items": {"object": "list", "data": data}, "created": now()});
            st.subscriptions.insert(id, s.clone());
            (200, s)
        }
        ("POST", ["v1", "subscriptions", id]) => {
            let mut st = state.lock().unwrap();
            let Some(mut s) = st.subscriptions.get(*id).cloned() else { return err(404, &format!("No such subscription: '{id}'")) };
            let mut data: Vec<Value> = s.pointer("/items/data").and_then(Value::as_array).cloned().unwrap_or_default();
            for (_, it) in items(p) {
                if it.get("deleted").map(String::as_str) == Some("true") {
                    let gone = it.get("id").cloned().unwrap_or_default();
                    data.retain(|d| d.get("id").and_then(Value::as_str) != Some(gone.as_str()));
                } else if let Some(price) = it.get("price") {
                    let item = st.id("si");
                    data.push(json!({"id": item, "object": "subscription_item", "price": {"id": price, "object": "price"}}));
                }
            }
            s["items"]["data"] = json!(data);
            st.subscriptions.insert(id.to_string(), s.clone());
            (200, s)
        }
        ("GET", ["v1", "subscriptions", id]) => match state.lock().unwrap().subscriptions.get(*id) {
            Some(s) => (200, s.clone()),
            None => err(404, &format!("No such subscription: '{id}'")),
        },
        ("DELETE", ["v1", "subscriptions", id]) => {
            let mut st = state.lock().unwrap();
            match st.subscriptions.get_mut(*id) {
                Some(s) => {
                    s["status"] = json!("canceled");
                    (200, s.clone())
                }
                None => err(404, &format!("No such subscription: '{id}'")),
            }
        }
        ("POST", ["v1", "billing", "meter_events"]) => meter_event(state, p).await,
        ("GET", ["v1", "billing", "meters"]) => {
            let st = state.lock().unwrap();
            let data: Vec<Value> = st
                .meters
                .iter()
                .map(|(id, e)| json!({"id": id, "object": "billing.meter", "event_name": e, "status": "active"}))
                .collect();
            (200, json!({"object": "list", "data": data, "has_more": false}))
        }
        ("GET", ["v1", "billing", "meters", id, "event_summaries"]) => {
            let q = form(r.query.as_bytes());
            let st = state.lock().unwrap();
            let Some(event_name) = st.meters.iter().find(|(m, _)| m == id).map(|(_, e)| e.clone()) else {
                return err(404, &format!("No such billing meter: '{id}'"));
            };
            let (Some(customer), Some(start), Some(end)) = (
                get(&q, "customer"),
                get(&q, "start_time").and_then(|s| s.parse::<i64>().ok()),
                get(&q, "end_time").and_then(|s| s.parse::<i64>().ok()),
            ) else {
                return err(400, "customer, start_time and end_time are required");
            };
            if start % 60 != 0 || end % 60 != 0 {
                return err(400, "start_time and end_time must be aligned with minute boundaries");
            }
            let total = st.total(customer, &event_name, start, end);
            (200, json!({"object": "list", "has_more": false, "data": [{
                "id": format!("mtrusg_{customer}_{start}"), "object": "billing.meter_event_summary",
                "aggregated_value": total, "start_time": start, "end_time": end, "meter": id}]}))
        }
        _ => err(404, &format!("Unrecognized request URL ({} {})", r.method, r.path)),
    }
}

async fn meter_event(state: &Arc<Mutex<State>>, p: &[(String, String)]) -> (u16, Value) {
    let err = |status: u16, message: String| (status, json!({"error": {"type": "invalid_request_error", "message": message}}));
    let event_name = get(p, "event_name").unwrap_or_default().to_string();
    let customer = get(p, "payload[stripe_customer_id]").unwrap_or_default().to_string();
    let Some(value) = get(p, "payload[value]").and_then(|v| v.parse::<i64>().ok()) else {
        return err(400, "payload[value] must be a whole number".into());
    };
    let timestamp = get(p, "timestamp").and_then(|t| t.parse::<i64>().ok()).unwrap_or_else(now);
    let identifier = get(p, "identifier").map(str::to_owned).unwrap_or_else(|| format!("gen_{}", rand::random::<u64>()));
    let key = (customer.clone(), event_name.clone());
    let latency = {
        let mut st = state.lock().unwrap();
        if !st.meters.iter().any(|(_, e)| *e == event_name) {
            return err(400, format!("No active meter was found for event_name '{event_name}'"));
        }
        if !st.customers.contains_key(&customer) {
            return err(400, format!("No such customer: '{customer}'"));
        }
        if timestamp < now() - 35 * 86_400 || timestamp > now() + 300 {
            return err(400, "timestamp must be within the past 35 calendar days or up to 5 minutes in the future".into());
        }
        if st.refuse_value == Some(value) {
            return err(400, format!("value {value} refused (fake poison)"));
        }
        let n = st.in_flight.entry(key.clone()).or_default();
        *n += 1;
        let seen = *n;
        st.max_in_flight_per_customer = st.max_in_flight_per_customer.max(seen);
        st.meter_latency
    };
    // The request takes a moment, so concurrency shows.
    tokio::time::sleep(latency).await;
    let mut st = state.lock().unwrap();
    if let Some(n) = st.in_flight.get_mut(&key) {
        *n -= 1;
    }
    // Deduplicated by identifier: the same event twice counts once.
    if st.identifiers.insert(identifier.clone()) {
        st.events.push(MeterEvent { identifier: identifier.clone(), event_name: event_name.clone(), customer: customer.clone(), value, timestamp });
    }
    (200, json!({"object": "billing.meter_event", "event_name": event_name, "identifier": identifier, "livemode": false,
                 "payload": {"stripe_customer_id": customer, "value": value.to_string()}, "timestamp": timestamp, "created": now()}))
}

/// `/_fake/state` (GET): customers, subscriptions, meter totals, requests;
/// `/_fake/down` and `/_fake/up` (POST); `/_fake/drift` (POST form:
/// customer, event_name, value).
fn admin(state: &Arc<Mutex<State>>, r: &Req) -> Reply {
    let mut st = state.lock().unwrap();
    match (r.method.as_str(), r.path.as_str()) {
        ("GET", "/_fake/state") => {
            let mut totals: BTreeMap<String, i64> = BTreeMap::new();
            for e in &st.events {
                *totals.entry(format!("{}/{}", e.customer, e.event_name)).or_default() += e.value;
            }
            Reply::json(200, json!({
                "customers": st.customers, "subscriptions": st.subscriptions, "meter_totals": totals,
                "meter_events": st.events.len(), "requests": st.requests,
                "max_in_flight_per_customer": st.max_in_flight_per_customer}))
        }
        ("POST", "/_fake/down") => {
            st.down = true;
            Reply::json(200, json!({"down": true}))
        }
        ("POST", "/_fake/up") => {
            st.down = false;
            Reply::json(200, json!({"down": false}))
        }
        ("POST", "/_fake/drift") => {
            let p = form(&r.body);
            let (Some(c), Some(e), Some(v)) = (get(&p, "customer"), get(&p, "event_name"), get(&p, "value").and_then(|v| v.parse::<i64>().ok())) else {
                return Reply::json(400, json!({"error": "customer, event_name, value"}));
            };
            *st.drift.entry((c.to_string(), e.to_string())).or_default() += v;
            Reply::json(200, json!({"ok": true}))
        }
        _ => Reply::json(404, json!({"error": "unknown fake endpoint"})),
    }
}

/// A Stripe webhook event, signed as Stripe signs them.
pub fn signed_event(secret: &str, id: &str, kind: &str, created: i64, object: Value, t: i64) -> (String, String) {
    use hmac::{Hmac, Mac};
    let body = json!({"id": id, "object": "event", "type": kind, "created": created, "data": {"object": object},
                      "livemode": false, "api_version": "2025-04-30.basil"})
    .to_string();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    (body, format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes())))
}

/// A `Stripe-Signature` header for any raw body (garbage included).
pub fn sign_raw(secret: &str, t: i64, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

pub fn unix_now() -> i64 {
    now()
}

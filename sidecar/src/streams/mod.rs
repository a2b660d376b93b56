//! Audit streams (docs/streams.md): each tenant's sealed audit chain to its
//! SIEM, and every chain to the operator's `[[siem]]` destinations.
//!
//! One delivery task per stream, so a slow or dead destination never delays
//! another; at most one batch in flight per stream, so order holds. A batch
//! is the next sealed entries of one chain after the stream's cursor
//! (`levqor.audit_events`), bounded by count and bytes. The cursor
//! (`levqor.stream_advance`) moves only after a 2xx: at least once, and a
//! redelivered batch carries the same `Levqor-Delivery` id (derived from the
//! stream, chain and positions). A 400 splits the batch to find the refused
//! event, which is parked with the receiver's reply; 401/403 puts the stream
//! in `auth_failed` until its secret changes; 429, 5xx, timeouts and resets
//! are retried with backoff and jitter, and after `[audit] max_attempts` the
//! batch is parked, never lost. Woken by `NOTIFY levqor_sealed`, with polling
//! as the fallback.

pub mod wire;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{secret, Secret, SiemKind};
use crate::daemon::App;
use crate::metrics::StreamLabels;
use crate::retry::Backoff;
use wire::{Answer, Destination, Event};

/// The next sealed entries of a chain after a position, as events.
const AUDIT_EVENTS: &str = "SELECT seq, id, at, event FROM levqor.audit_events($1, $2, $3)";

/// What a stream is, for the supervisor to notice a change.
#[derive(Clone, Debug, PartialEq)]
struct Spec {
    /// The cursor's key: `stream:<id>` or `siem:<name>`.
    name: String,
    kind: SiemKind,
    url: String,
    secret_env_or_version: String,
    /// A tenant stream's tenant; None: every chain (operator-wide).
    tenant: Option<(Uuid, String)>,
    stream_id: Option<i64>,
    gzip: bool,
    batch_max_events: usize,
    host: Option<String>,
    index: Option<String>,
    auth_failed: bool,
}

pub async fn run(app: Arc<App>) {
    'connect: loop {
        let Some(mut db) = crate::db::connect_retrying(&app.db(), "streams", &app.stop).await else { return };
        if db.client.batch_execute("LISTEN levqor_sealed; LISTEN levqor_streams").await.is_err() {
            if !app.pause(Duration::from_secs(1)).await {
                return;
            }
            continue;
        }
        let client = Arc::new(db.client);
        let wake = Arc::new(Notify::new());
        let mut running: HashMap<String, (Spec, CancellationToken)> = HashMap::new();
        let mut config = app.config.clone();
        loop {
            let poll = Duration::from_secs(app.cfg().audit.poll_seconds.max(1));
            app.beat("streams", poll.max(Duration::from_secs(5)));
            let specs = match specs(&app, &client).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %crate::db::describe(&e), "streams: database connection lost");
                    for (_, (_, stop)) in running.drain() {
                        stop.cancel();
                    }
                    if !app.pause(Duration::from_secs(1)).await {
                        return;
                    }
                    continue 'connect;
                }
            };
            // Start what is new, stop what is gone or changed.
            running.retain(|name, (spec, stop)| {
                let keep = specs.iter().any(|s| s.name == *name && s == spec);
                if !keep {
                    stop.cancel();
                }
                keep
            });
            for s in specs {
                if !running.contains_key(&s.name) {
                    let stop = app.stop.child_token();
                    tokio::spawn(deliver(app.clone(), client.clone(), s.clone(), wake.clone(), stop.clone()));
                    running.insert(s.name.clone(), (s, stop));
                }
            }
            tokio::select! {
                n = db.notifications.recv() => match n.as_deref() {
                    None => {
                        for (_, (_, stop)) in running.drain() { stop.cancel(); }
                        continue 'connect;
                    }
                    Some("levqor_sealed") => wake.notify_waiters(),
                    Some(_) => {}
                },
                // A reloaded file may carry a fixed token (the environment is
                // read again): the operator's streams start over.
                _ = config.changed() => running.retain(|name, (_, stop)| {
                    let keep = !name.starts_with("siem:");
                    if !keep {
                        stop.cancel();
                    }
                    keep
                }),
                _ = tokio::time::sleep(poll) => wake.notify_waiters(),
                _ = app.stop.cancelled() => return,
            }
        }
    }
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "levqor".into())
}

/// Every stream there should be: the tenants' (from the database) and the
/// operator's (from the file).
async fn specs(app: &App, client: &Client) -> Result<Vec<Spec>, tokio_postgres::Error> {
    let cfg = app.cfg();
    let mut out = Vec::new();
    for (i, s) in cfg.siem.iter().enumerate() {
        let name = s.name.clone().unwrap_or_else(|| format!("{}-{i}", s.kind.as_str()));
        out.push(Spec {
            name: format!("siem:{name}"),
            kind: s.kind,
            url: s.url.clone(),
            secret_env_or_version: s.token_env.clone(),
            tenant: None,
            stream_id: None,
            gzip: s.gzip.unwrap_or(s.kind != SiemKind::Webhook),
            batch_max_events: cfg.audit.batch_max_events,
            host: None,
            index: None,
            auth_failed: false,
        });
    }
    for r in client.query("SELECT * FROM levqor.stream_destinations()", &[]).await? {
        if r.get::<_, bool>("paused") {
            continue;
        }
        let id: i64 = r.get("id");
        let Some(kind) = SiemKind::parse(r.get("kind")) else { continue };
        let options: Value = r.get("options");
        let version: i32 = r.get("secret_version");
        out.push(Spec {
            name: format!("stream:{id}"),
            kind,
            url: r.get("url"),
            secret_env_or_version: format!("v{version}"),
            tenant: Some((r.get("tenant_id"), r.get("tenant"))),
            stream_id: Some(id),
            gzip: options.get("gzip").and_then(Value::as_bool).unwrap_or(kind != SiemKind::Webhook),
            batch_max_events: options
                .get("batch_max_events")
                .and_then(Value::as_u64)
                .map(|n| n as usize)
                .unwrap_or(cfg.audit.batch_max_events)
                .clamp(1, 10_000),
            host: options.get("host").and_then(Value::as_str).map(str::to_owned),
            index: options.get("index").and_then(Value::as_str).map(str::to_owned),
            auth_failed: r.get::<_, String>("state") == "auth_failed",
        });
    }
    Ok(out)
}

async fn secret_of(client: &Client, spec: &Spec) -> Result<Secret, String> {
    match spec.stream_id {
        None => secret(&spec.name, &spec.secret_env_or_version).map_err(|e| e.to_string()),
        Some(id) => client
            .query_one("SELECT secret FROM levqor.stream_destinations() WHERE id = $1", &[&id])
            .await
            .map(|r| Secret::new(r.get(0)))
            .map_err(|e| e.to_string()),
    }
}

/// One stream's delivery loop.
async fn deliver(app: Arc<App>, client: Arc<Client>, spec: Spec, wake: Arc<Notify>, stop: CancellationToken) {
    let labels = StreamLabels {
        stream: spec.name.clone(),
        tenant: spec.tenant.as_ref().map(|t| t.1.clone()).unwrap_or_else(|| "*".into()),
        kind: spec.kind.as_str().into(),
    };
    if spec.auth_failed {
        // Nothing is sent until the secret changes (the supervisor restarts us then).
        tracing::warn!(stream = %spec.name, "audit stream waits for a new secret (auth_failed)");
        stop.cancelled().await;
        return;
    }
    let secret = match secret_of(&client, &spec).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(stream = %spec.name, error = %e, "audit stream has no secret");
            stop.cancelled().await;
            return;
        }
    };
    let cfg = app.cfg();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(cfg.audit.timeout_seconds))
        .user_agent(concat!("levqor-sidecar/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("an HTTP client");
    let dest = Destination {
        kind: spec.kind,
        url: spec.url.clone(),
        secret,
        stream: spec.stream_id.map(|i| json!(i)).unwrap_or_else(|| json!(spec.name.trim_start_matches("siem:"))),
        host: spec.host.clone().unwrap_or_else(host),
        gzip: spec.gzip,
        index: spec.index.clone(),
    };
    let (max_events, max_bytes) = match spec.kind {
        SiemKind::Datadog => (spec.batch_max_events.min(wire::DATADOG_MAX_EVENTS), cfg.audit.batch_max_bytes.min(wire::DATADOG_MAX_BYTES)),
        _ => (spec.batch_max_events, cfg.audit.batch_max_bytes),
    };
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(cfg.audit.retry_max_seconds.max(1)));
    let mut state = String::from("active");
    loop {
        if stop.is_cancelled() {
            return;
        }
        // Register for the next wake-up before looking, so none is missed.
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let chains: Vec<(Uuid, String, i64)> = match &spec.tenant {
            Some((id, slug)) => match client.query_one("SELECT seq FROM levqor.stream_destinations() WHERE id = $1", &[&spec.stream_id]).await {
                Ok(r) => vec![(*id, slug.clone(), r.get(0))],
                Err(e) => {
                    if !db_trouble(&app, &client, &spec, &e, &stop).await {
                        return;
                    }
                    continue;
                }
            },
            None => match client.query("SELECT chain, tenant, head, seq FROM levqor.stream_chains($1) WHERE head > seq", &[&spec.name]).await {
                Ok(rows) => rows
                    .iter()
                    .map(|r| (r.get::<_, Uuid>(0), r.get::<_, Option<String>>(1).unwrap_or_else(|| "platform".into()), r.get::<_, i64>(3)))
                    .collect(),
                Err(e) => {
                    if !db_trouble(&app, &client, &spec, &e, &stop).await {
                        return;
                    }
                    continue;
                }
            },
        };
        let mut worked = false;
        for (chain, slug, mut seq) in chains {
            // The next batch of this chain, read while the current one is on
            // its way: it starts after the current one whatever becomes of
            // it (delivered, or parked), so order and the cursor are as if
            // read afterwards.
            let mut prefetched: Option<tokio::task::JoinHandle<Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>>> = None;
            loop {
                if stop.is_cancelled() {
                    return;
                }
                let read_started = std::time::Instant::now();
                let rows = match prefetched.take() {
                    Some(next) => match next.await {
                        Ok(r) => r,
                        Err(_) => return,
                    },
                    None => client.query(AUDIT_EVENTS, &[&chain, &seq, &(max_events as i32)]).await,
                };
                let rows = match rows {
                    Ok(r) => r,
                    Err(e) => {
                        if !db_trouble(&app, &client, &spec, &e, &stop).await {
                            return;
                        }
                        worked = true;
                        break;
                    }
                };
                if rows.is_empty() {
                    let lag: i64 = client.query_one("SELECT levqor.stream_lag($1, $2)", &[&chain, &seq]).await.map(|r| r.get(0)).unwrap_or(0);
                    app.metrics.stream_lag_entries.get_or_create(&labels).set(lag.max(0));
                    break;
                }
                let full = rows.len() >= max_events;
                let mut events: Vec<Event> = rows
                    .iter()
                    .map(|r| wire::fit(Event { seq: r.get(0), id: r.get(1), at: r.get(2), body: r.get(3), size: 0 }, max_bytes.saturating_sub(512)))
                    .collect();
                // Keep the batch under the byte bound.
                let mut total = 0;
                let keep = events
                    .iter()
                    .position(|e| {
                        total += e.size + 200;
                        total > max_bytes
                    })
                    .unwrap_or(events.len())
                    .max(1);
                let more = full || keep < events.len();
                events.truncate(keep);
                worked = true;
                let last = events.last().expect("a batch").seq;
                if more {
                    let (c, max) = (client.clone(), max_events as i32);
                    prefetched = Some(tokio::spawn(async move { c.query(AUDIT_EVENTS, &[&chain, &last, &max]).await }));
                }
                let read_ms = read_started.elapsed().as_millis() as u64;
                let (n, send_started) = (events.len(), std::time::Instant::now());
                let outcome = send_batch(&app, &client, &http, &dest, &spec, &labels, chain, &slug, events, &mut backoff, &mut state, &stop).await;
                tracing::debug!(stream = %spec.name, events = n, read_ms, send_ms = send_started.elapsed().as_millis() as u64, "audit batch");
                match outcome {
                    Outcome::Done => {
                        backoff.reset();
                        seq = last;
                    }
                    Outcome::AuthFailed(why) => {
                        tracing::error!(stream = %spec.name, reply = %why, "the receiver refused the stream's secret: nothing is sent until it changes");
                        app.metrics.error("streams", "auth_failed");
                        report(&client, &spec, "auth_failed", Some(&why)).await;
                        stop.cancelled().await;
                        return;
                    }
                    Outcome::Stopped => return,
                }
                if !more {
                    break;
                }
            }
        }
        if !worked {
            tokio::select! {
                _ = &mut woken => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// A statement of the delivery loop failed: logged and counted; true when it
/// is worth going on after a pause (false: the connection is gone, and the
/// supervisor reconnects and restarts every stream, or we are stopping).
async fn db_trouble(app: &App, client: &Client, spec: &Spec, e: &tokio_postgres::Error, stop: &CancellationToken) -> bool {
    tracing::warn!(stream = %spec.name, error = %crate::db::describe(e), "audit stream: database error");
    app.metrics.error("streams", "database");
    if client.is_closed() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(2)) => true,
        _ = stop.cancelled() => false,
    }
}

async fn report(client: &Client, spec: &Spec, state: &str, why: Option<&str>) {
    if let Some(id) = spec.stream_id {
        if let Err(e) = client.execute("SELECT levqor.stream_report($1, $2, $3)", &[&id, &state, &why]).await {
            tracing::warn!(stream = %spec.name, error = %crate::db::describe(&e), "cannot record the stream's state");
        }
    }
}

enum Outcome {
    Done,
    AuthFailed(String),
    Stopped,
}

/// Deliver one chain's batch: split on a 400 to find the refused event
/// (parked), retry what is worth retrying, park a batch after max_attempts.
#[allow(clippy::too_many_arguments)]
async fn send_batch(
    app: &App,
    client: &Client,
    http: &reqwest::Client,
    dest: &Destination,
    spec: &Spec,
    labels: &StreamLabels,
    chain: Uuid,
    slug: &str,
    events: Vec<Event>,
    backoff: &mut Backoff,
    state: &mut String,
    stop: &CancellationToken,
) -> Outcome {
    let max_attempts = app.cfg().audit.max_attempts;
    let tenant_id = if chain.is_nil() { Value::Null } else { json!(chain) };
    // Parts still to send, in order; a refused part is halved.
    let mut parts: Vec<Vec<Event>> = vec![events];
    let mut attempts = 0u32;
    while let Some(part) = parts.first().cloned() {
        if stop.is_cancelled() {
            return Outcome::Stopped;
        }
        let (first, last) = (part.first().unwrap().seq, part.last().unwrap().seq);
        let delivery = Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("{}/{chain}/{first}-{last}", spec.name).as_bytes());
        let raw = wire::body(dest, &tenant_id, slug, &part);
        let mut req = http.post(&dest.url).header("content-type", "application/json").header("Levqor-Delivery", delivery.to_string());
        req = match dest.kind {
            SiemKind::SplunkHec => req.header("Authorization", format!("Splunk {}", dest.secret.expose())),
            SiemKind::Datadog => req.header("DD-API-KEY", dest.secret.expose()),
            SiemKind::Webhook => req.header("Levqor-Signature", wire::signature(dest.secret.expose(), chrono::Utc::now().timestamp(), &raw)),
        };
        let req = if dest.gzip { req.header("content-encoding", "gzip").body(wire::gzip(&raw)) } else { req.body(raw) };
        let answer = match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let text = resp.text().await.unwrap_or_default();
                wire::answer(status, &text, retry_after)
            }
            Err(e) => Answer::Later { why: e.without_url().to_string(), retry_after: None, counts: false },
        };
        match answer {
            Answer::Accepted => {
                if client.execute("SELECT levqor.stream_advance($1, $2, $3)", &[&spec.name, &chain, &last]).await.is_err() {
                    // Delivered but not recorded: delivered again later (same delivery id).
                    return Outcome::Stopped;
                }
                app.metrics.stream_delivered.get_or_create(labels).inc_by(part.len() as u64);
                let age = chrono::Utc::now() - part.last().unwrap().at;
                app.metrics.stream_lag_seconds.get_or_create(labels).set(age.num_seconds().max(0));
                parts.remove(0);
                attempts = 0;
            }
            Answer::AuthFailed(why) => return Outcome::AuthFailed(why),
            Answer::Refused(why) if part.len() > 1 => {
                let right = part[part.len() / 2..].to_vec();
                let left = part[..part.len() / 2].to_vec();
                parts.splice(0..1, [left, right]);
                tracing::debug!(stream = %spec.name, reply = %why, "batch refused: halving it to find the event");
            }
            Answer::Refused(why) => {
                let e = &part[0];
                // Parked first, then the cursor past it: never past an event
                // that is neither delivered nor parked.
                if let Err(err) = client
                    .execute("SELECT levqor.stream_park($1, $2, $3, $4, $5)", &[&spec.name, &chain, &e.seq, &e.id, &why])
                    .await
                {
                    tracing::warn!(stream = %spec.name, error = %crate::db::describe(&err), "cannot park the refused event");
                    return Outcome::Stopped;
                }
                if client.execute("SELECT levqor.stream_advance($1, $2, $3)", &[&spec.name, &chain, &e.seq]).await.is_err() {
                    return Outcome::Stopped;
                }
                app.metrics.stream_parked.get_or_create(labels).inc();
                tracing::warn!(stream = %spec.name, seq = e.seq, entry = e.id, reply = %why, "event refused by the receiver: parked");
                parts.remove(0);
            }
            Answer::Later { why, retry_after, counts } => {
                app.metrics.stream_retried.get_or_create(labels).inc();
                app.metrics.error("streams", "delivery");
                if *state != "failing" {
                    *state = "failing".into();
                    report(client, spec, "failing", Some(&why)).await;
                }
                if counts {
                    attempts += 1;
                }
                if attempts >= max_attempts {
                    for e in &part {
                        let reply = format!("given up after {attempts} attempts: {why}");
                        if let Err(err) = client
                            .execute("SELECT levqor.stream_park($1, $2, $3, $4, $5)", &[&spec.name, &chain, &e.seq, &e.id, &reply])
                            .await
                        {
                            tracing::warn!(stream = %spec.name, error = %crate::db::describe(&err), "cannot park the batch");
                            return Outcome::Stopped;
                        }
                    }
                    if client.execute("SELECT levqor.stream_advance($1, $2, $3)", &[&spec.name, &chain, &last]).await.is_err() {
                        return Outcome::Stopped;
                    }
                    app.metrics.stream_parked.get_or_create(labels).inc_by(part.len() as u64);
                    tracing::error!(stream = %spec.name, from = first, to = last, "batch parked after max_attempts");
                    parts.remove(0);
                    attempts = 0;
                    continue;
                }
                let wait = retry_after.unwrap_or_else(|| backoff.next_delay()).min(Duration::from_secs(300));
                tracing::warn!(stream = %spec.name, error = %why, retry_in_ms = wait.as_millis() as u64,
                               "audit delivery failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return Outcome::Stopped,
                }
            }
        }
    }
    if *state != "active" {
        *state = "active".into();
        report(client, spec, "active", None).await;
    }
    Outcome::Done
}

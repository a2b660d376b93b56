//! The sidecar's HTTP server (axum) on `[http] listen`:
//! * `GET /healthz`: 200 when the database answers and every task of the
//!   daemon is alive, else 503 with a JSON reason;
//! * `GET /metrics`: Prometheus text format (crate::metrics);
//! * `POST /stripe/webhook`: Stripe's events (crate::billing::webhook).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::billing::webhook;
use crate::config::secret;
use crate::daemon::App;
use crate::metrics::{TenantLabels, TenantRow, WebhookLabels};

pub async fn serve(app: Arc<App>, listener: tokio::net::TcpListener) {
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/stripe/webhook", post(stripe_webhook))
        .with_state(app.clone());
    let stop = app.stop.clone();
    if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(async move { stop.cancelled().await }).await {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

/// A short-lived connection per request: the HTTP side never holds up the
/// daemon's own connections.
async fn connect(app: &App) -> Result<crate::db::Db, String> {
    match tokio::time::timeout(Duration::from_secs(5), crate::db::connect(&app.db())).await {
        Ok(r) => r,
        Err(_) => Err("timed out".into()),
    }
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    let database = match connect(&app).await {
        Ok(db) => db.client.simple_query("SELECT 1").await.map(|_| ()).map_err(|e| crate::db::describe(&e)),
        Err(e) => Err(e),
    };
    let stalled = app.stalled();
    match (database, stalled.is_empty()) {
        (Ok(()), true) => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        (Ok(()), false) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "unhealthy", "reason": "tasks not alive", "tasks": stalled})))
                .into_response()
        }
        (Err(e), _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unhealthy", "reason": "database unreachable", "error": e, "tasks": stalled})),
        )
            .into_response(),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let mut tenants = Vec::new();
    match connect(&app).await {
        Ok(db) => {
            match db
                .client
                .query("SELECT slug, status, plan, metric, used, quota, percent::text AS percent_text FROM levqor.sidecar_tenant_metrics()", &[])
                .await
            {
                Ok(rows) => {
                    for r in rows {
                        tenants.push(TenantRow {
                            slug: r.get("slug"),
                            status: r.get("status"),
                            plan: r.get("plan"),
                            metric: r.get("metric"),
                            used: r.get("used"),
                            limit: r.get("quota"),
                            percent: r.get::<_, Option<String>>("percent_text").and_then(|p| p.parse().ok()),
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %crate::db::describe(&e), "metrics: tenant gauges unavailable");
                    app.metrics.error("metrics", "database");
                }
            }
            // The achieved RPO: each tenant's last good backup, by age.
            match db
                .client
                .query("SELECT slug, extract(epoch FROM age)::bigint FROM levqor.backup_coverage WHERE last_good_backup IS NOT NULL", &[])
                .await
            {
                Ok(rows) => {
                    for r in rows {
                        app.metrics.backup_age_seconds.get_or_create(&TenantLabels { tenant: r.get(0) }).set(r.get(1));
                    }
                }
                Err(e) => tracing::debug!(error = %crate::db::describe(&e), "metrics: backup ages unavailable"),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics: database unreachable");
            app.metrics.error("metrics", "database");
        }
    }
    (
        StatusCode::OK,
        [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        app.metrics.encode(&tenants),
    )
        .into_response()
}

async fn stripe_webhook(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let cfg = app.cfg();
    let Some(s) = cfg.stripe.as_ref() else {
        return (StatusCode::NOT_FOUND, Json(json!({"error": "billing is not configured"}))).into_response();
    };
    let Some(secret_env) = s.webhook_secret_env.as_deref() else {
        return (StatusCode::NOT_FOUND, Json(json!({"error": "no webhook secret configured"}))).into_response();
    };
    let refuse = |why: String| {
        app.metrics.webhooks.get_or_create(&WebhookLabels { r#type: "unverified".into(), outcome: "refused".into() }).inc();
        tracing::warn!(reason = %why, "Stripe webhook refused");
        (StatusCode::BAD_REQUEST, Json(json!({"error": why}))).into_response()
    };
    let key = match secret("stripe.webhook_secret_env", secret_env) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %e, "webhook secret missing");
            return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": "webhook secret missing"}))).into_response();
        }
    };
    let signature = headers.get("stripe-signature").and_then(|v| v.to_str().ok());
    if let Err(r) = webhook::verify(signature, &body, key.expose(), chrono::Utc::now().timestamp()) {
        return refuse(r.to_string());
    }
    let event = match webhook::parse(&body, s) {
        Ok(e) => e,
        Err(r) => return refuse(r.to_string()),
    };
    if !webhook::handled(&event.kind) {
        tracing::debug!(event = %event.id, r#type = %event.kind, "Stripe event not handled; acknowledged");
        app.metrics.webhooks.get_or_create(&WebhookLabels { r#type: event.kind.clone(), outcome: "ignored".into() }).inc();
        return (StatusCode::OK, Json(json!({"received": true, "outcome": "ignored"}))).into_response();
    }
    // Applied in the database, in one transaction; a failure there is a 503
    // so that Stripe delivers the event again.
    let outcome = async {
        let db = connect(&app).await?;
        let row = db
            .client
            .query_one(
                "SELECT levqor.billing_webhook($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &event.id,
                    &event.kind,
                    &event.created,
                    &event.customer,
                    &event.plan,
                    &event.subscription_status,
                    &s.force_plan_changes,
                    &(s.suspend_after_failed_payments as i32),
                ],
            )
            .await
            .map_err(|e| crate::db::describe(&e))?;
        Ok::<String, String>(row.get(0))
    }
    .await;
    match outcome {
        Ok(outcome) => {
            tracing::info!(event = %event.id, r#type = %event.kind, outcome = %outcome, "Stripe event applied");
            app.metrics.webhooks.get_or_create(&WebhookLabels { r#type: event.kind.clone(), outcome: short(&outcome) }).inc();
            (StatusCode::OK, Json(json!({"received": true, "outcome": outcome}))).into_response()
        }
        Err(e) => {
            tracing::error!(event = %event.id, error = %e, "Stripe event not applied; Stripe will send it again");
            app.metrics.error("webhook", "database");
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": "not applied, retry"}))).into_response()
        }
    }
}

/// Outcomes as metric labels (the refusal message is left out).
fn short(outcome: &str) -> String {
    outcome.split(':').next().unwrap_or(outcome).to_string()
}

//! Provisioning: every tenant gets a Stripe customer (metadata: its levqor
//! id and slug) and a subscription with its plan's prices; a plan change in
//! the database moves the subscription's items; an offboarded or purged
//! tenant's subscription is cancelled. Woken by `NOTIFY levqor_billing`
//! (tenant created, plan or status changed), with a sweep every
//! `[stripe] sweep_seconds` in case a notification is lost.
//!
//! Every request carries an `Idempotency-Key` derived from the tenant (and,
//! for subscription changes, the billing row's version), so a crash between
//! "created in Stripe" and "recorded in the database" replays Stripe's first
//! answer on the retry instead of creating a second customer.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use uuid::Uuid;

use super::stripe::{Stripe, StripeError};
use crate::config::secret;
use crate::daemon::App;
use crate::metrics::OutcomeLabels;
use crate::retry::Backoff;

pub struct Pending {
    pub tenant: Uuid,
    pub slug: String,
    pub plan: Option<String>,
    pub action: String,
    pub customer: Option<String>,
    pub subscription: Option<String>,
    pub items: serde_json::Value,
    pub version: i32,
}

pub async fn run(app: Arc<App>) {
    let retry_max = app.cfg().stripe.as_ref().map_or(60, |s| s.retry_max_seconds).max(1);
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(retry_max));
    'connect: loop {
        let Some(mut db) = crate::db::connect_retrying(&app.db(), "provisioning", &app.stop).await else { return };
        if let Err(e) = db.client.batch_execute("LISTEN levqor_billing").await {
            tracing::warn!(error = %crate::db::describe(&e), "provisioning: LISTEN failed");
            if !app.pause(backoff.next_delay()).await {
                return;
            }
            continue;
        }
        loop {
            let cfg = app.cfg();
            let Some(stripe_cfg) = cfg.stripe.clone() else { return };
            app.beat("provisioning", Duration::from_secs(stripe_cfg.sweep_seconds));
            match sweep(&app, &db.client).await {
                Ok(true) => {
                    backoff.reset();
                }
                Ok(false) => {
                    // Something failed in Stripe: back off before the next sweep.
                    if !app.pause(backoff.next_delay()).await {
                        return;
                    }
                    continue;
                }
                Err(e) if crate::db::is_connection_error(&e) => {
                    tracing::warn!(error = %crate::db::describe(&e), "provisioning: database connection lost");
                    if !app.pause(backoff.next_delay()).await {
                        return;
                    }
                    continue 'connect;
                }
                Err(e) => {
                    tracing::error!(error = %crate::db::describe(&e), "provisioning: database error");
                    app.metrics.error("provisioning", "database");
                    if !app.pause(backoff.next_delay()).await {
                        return;
                    }
                    continue;
                }
            }
            // Idle: wait for a notification or the next sweep.
            tokio::select! {
                n = db.notifications.recv() => if n.is_none() { continue 'connect; },
                _ = tokio::time::sleep(Duration::from_secs(stripe_cfg.sweep_seconds)) => {}
                _ = app.stop.cancelled() => return,
            }
            // Drain what else arrived meanwhile: one sweep covers them all.
            while db.notifications.try_recv().is_ok() {}
        }
    }
}

/// One pass over what is pending. Ok(false): Stripe failed somewhere.
pub async fn sweep(app: &App, client: &Client) -> Result<bool, tokio_postgres::Error> {
    let cfg = app.cfg();
    let Some(s) = cfg.stripe.as_ref() else { return Ok(true) };
    let key = match secret("stripe.api_key_env", &s.api_key_env) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %e, "provisioning: no Stripe key");
            return Ok(false);
        }
    };
    let stripe = Stripe::new(&s.api_base, key, Duration::from_secs(s.timeout_seconds));
    let mut ok = true;
    loop {
        let rows = client.query("SELECT * FROM levqor.billing_pending(100)", &[]).await?;
        if rows.is_empty() {
            return Ok(ok);
        }
        let mut progressed = false;
        for r in rows {
            if app.stop.is_cancelled() {
                return Ok(ok);
            }
            let p = Pending {
                tenant: r.get("tenant_id"),
                slug: r.get("slug"),
                plan: r.get("plan"),
                action: r.get("action"),
                customer: r.get("customer_id"),
                subscription: r.get("subscription_id"),
                items: r.get("items"),
                version: r.get("version"),
            };
            match step(app, &stripe, s, client, &p).await? {
                Ok(()) => {
                    progressed = true;
                    app.metrics.provisioned.get_or_create(&OutcomeLabels { outcome: p.action.clone() }).inc();
                }
                Err(e) => {
                    ok = false;
                    app.metrics.error("provisioning", e.kind());
                    tracing::warn!(tenant = %p.slug, action = %p.action, error = %e, "provisioning step failed; retried later");
                    if e.unauthorized() || e.transient() {
                        // Stripe is down or refuses the key: the rest would fail alike.
                        return Ok(false);
                    }
                }
            }
        }
        if !progressed {
            return Ok(ok);
        }
    }
}

async fn step(
    app: &App,
    stripe: &Stripe,
    s: &crate::config::Stripe,
    client: &Client,
    p: &Pending,
) -> Result<Result<(), StripeError>, tokio_postgres::Error> {
    let tenant = p.tenant.to_string();
    let prices = |plan: &Option<String>| -> Result<Vec<String>, StripeError> {
        let plan = plan.as_deref().unwrap_or_default();
        s.plans.get(plan).map(|x| x.prices.clone()).ok_or_else(|| {
            StripeError::Protocol(format!("plan {plan:?} has no [stripe.plans.{plan}] in the configuration"))
        })
    };
    match p.action.as_str() {
        "create_customer" => {
            let id = match stripe.create_customer(&tenant, &p.slug).await {
                Ok(id) => id,
                Err(e) => return Ok(Err(e)),
            };
            client.execute("SELECT levqor.billing_customer($1, $2)", &[&p.tenant, &id]).await?;
            tracing::info!(tenant = %p.slug, customer = %id, "Stripe customer created");
        }
        "create_subscription" | "change_plan" => {
            let prices = match prices(&p.plan) {
                Ok(x) => x,
                Err(e) => return Ok(Err(e)),
            };
            let answer = if p.action == "create_subscription" {
                let customer = p.customer.clone().unwrap_or_default();
                stripe.create_subscription(&tenant, &customer, &prices, p.version).await
            } else {
                let current: Vec<(String, String)> = p
                    .items
                    .as_object()
                    .map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
                    .unwrap_or_default();
                let sub_id = p.subscription.clone().unwrap_or_default();
                stripe.set_subscription_prices(&tenant, &sub_id, &current, &prices, p.version).await
            };
            let sub = match answer {
                Ok(x) => x,
                Err(e) => return Ok(Err(e)),
            };
            client
                .execute(
                    "SELECT levqor.billing_subscription($1, $2, $3, $4, $5)",
                    &[&p.tenant, &sub.id, &sub.status, &p.plan, &sub.items_json()],
                )
                .await?;
            tracing::info!(tenant = %p.slug, subscription = %sub.id, plan = ?p.plan, action = %p.action, "Stripe subscription on the tenant's plan");
        }
        "cancel" => {
            let sub_id = p.subscription.clone().unwrap_or_default();
            let status = match stripe.cancel_subscription(&tenant, &sub_id).await {
                Ok(s) => s,
                // Already gone in Stripe: record it as cancelled.
                Err(StripeError::Status { status: 404, .. }) => "canceled".to_string(),
                Err(e) => return Ok(Err(e)),
            };
            client.execute("SELECT levqor.billing_cancelled($1, $2)", &[&p.tenant, &status]).await?;
            tracing::info!(tenant = %p.slug, "Stripe subscription cancelled");
        }
        other => tracing::warn!(action = other, "provisioning: unknown action"),
    }
    let _ = app;
    Ok(Ok(()))
}

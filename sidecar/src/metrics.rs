//! `/metrics`, in Prometheus' text format (prometheus-client): the sidecar's
//! own counters and lags, and per-tenant gauges read from the database at
//! each scrape (usage, limit and percent per metric, status and plan).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub task: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    pub r#type: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub stream: String,
    pub tenant: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    pub tenant: String,
}

pub struct Metrics {
    registry: Registry,
    pub meter_events: Counter,
    pub requests: Family<PeerLabels, Counter>,
    pub retries: Family<PeerLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub parked_entries: Counter,
    pub ledger_lag_entries: Gauge,
    pub ledger_lag_seconds: Gauge,
    pub provisioned: Family<OutcomeLabels, Counter>,
    pub webhooks: Family<WebhookLabels, Counter>,
    pub stream_delivered: Family<StreamLabels, Counter>,
    pub stream_retried: Family<StreamLabels, Counter>,
    pub stream_parked: Family<StreamLabels, Counter>,
    pub stream_lag_entries: Family<StreamLabels, Gauge>,
    pub stream_lag_seconds: Family<StreamLabels, Gauge>,
    pub backups: Family<OutcomeLabels, Counter>,
    pub backup_age_seconds: Family<TenantLabels, Gauge>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("levqor_sidecar");
        let m = Metrics {
            meter_events: Counter::default(),
            requests: Family::default(),
            retries: Family::default(),
            errors: Family::default(),
            parked_entries: Counter::default(),
            ledger_lag_entries: Gauge::default(),
            ledger_lag_seconds: Gauge::default(),
            provisioned: Family::default(),
            webhooks: Family::default(),
            stream_delivered: Family::default(),
            stream_retried: Family::default(),
            stream_parked: Family::default(),
            stream_lag_entries: Family::default(),
            stream_lag_seconds: Family::default(),
            backups: Family::default(),
            backup_age_seconds: Family::default(),
            registry: Registry::default(),
        };
        registry.register("meter_events_sent", "Meter events Stripe accepted", m.meter_events.clone());
        registry.register("requests", "HTTP requests sent, by peer", m.requests.clone());
        registry.register("retries", "Requests retried after a failure, by peer", m.retries.clone());
        registry.register("errors", "Errors, by task and kind", m.errors.clone());
        registry.register("parked_entries", "Ledger entries Stripe refused, set aside", m.parked_entries.clone());
        registry.register("ledger_lag_entries", "Ledger entries not yet metered", m.ledger_lag_entries.clone());
        registry.register("ledger_lag_seconds", "Age of the oldest ledger entry not yet metered", m.ledger_lag_seconds.clone());
        registry.register("provisioning", "Stripe provisioning steps, by outcome", m.provisioned.clone());
        registry.register("webhooks", "Stripe webhook events, by type and outcome", m.webhooks.clone());
        registry.register("stream_delivered", "Audit events delivered, by stream", m.stream_delivered.clone());
        registry.register("stream_retried", "Audit batches retried, by stream", m.stream_retried.clone());
        registry.register("stream_parked", "Audit events parked, by stream", m.stream_parked.clone());
        registry.register("stream_lag_entries", "Sealed audit entries not yet delivered, by stream", m.stream_lag_entries.clone());
        registry.register("stream_lag_seconds", "Commit-to-receipt time of the last batch delivered, by stream", m.stream_lag_seconds.clone());
        registry.register("backups", "Backups taken, by outcome", m.backups.clone());
        registry.register("backup_age_seconds", "Age of each tenant's last good backup (the achieved RPO)", m.backup_age_seconds.clone());
        Metrics { registry, ..m }
    }

    pub fn error(&self, task: &str, kind: &str) {
        self.errors.get_or_create(&ErrorLabels { task: task.into(), kind: kind.into() }).inc();
    }

    pub fn encode(&self, tenants: &[TenantRow]) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode_registry(&mut out, &self.registry).expect("metrics encode");
        out.push_str(&tenant_gauges(tenants));
        prometheus_client::encoding::text::encode_eof(&mut out).expect("metrics encode");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// One row of levqor.sidecar_tenant_metrics().
pub struct TenantRow {
    pub slug: String,
    pub status: String,
    pub plan: String,
    pub metric: Option<String>,
    pub used: Option<i64>,
    pub limit: Option<i64>,
    pub percent: Option<f64>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantMetricLabels {
    tenant: String,
    metric: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantInfoLabels {
    tenant: String,
    status: String,
    plan: String,
}

fn tenant_gauges(rows: &[TenantRow]) -> String {
    use prometheus_client::metrics::gauge::Gauge as G;
    let mut reg = Registry::with_prefix("levqor_tenant");
    let used: Family<TenantMetricLabels, G<f64, std::sync::atomic::AtomicU64>> = Family::default();
    let limit: Family<TenantMetricLabels, G<f64, std::sync::atomic::AtomicU64>> = Family::default();
    let percent: Family<TenantMetricLabels, G<f64, std::sync::atomic::AtomicU64>> = Family::default();
    let info: Family<TenantInfoLabels, G> = Family::default();
    for r in rows {
        info.get_or_create(&TenantInfoLabels { tenant: r.slug.clone(), status: r.status.clone(), plan: r.plan.clone() }).set(1);
        if let Some(metric) = &r.metric {
            let l = TenantMetricLabels { tenant: r.slug.clone(), metric: metric.clone() };
            if let Some(u) = r.used {
                used.get_or_create(&l).set(u as f64);
            }
            if let Some(q) = r.limit {
                limit.get_or_create(&l).set(q as f64);
            }
            if let Some(p) = r.percent {
                percent.get_or_create(&l).set(p);
            }
        }
    }
    reg.register("info", "A tenant's status and plan (always 1)", info);
    reg.register("usage", "Usage of a metric in its current window", used);
    reg.register("limit", "A tenant's limit for a metric (absent: unlimited)", limit);
    reg.register("usage_percent", "Usage as a percentage of the limit", percent);
    let mut out = String::new();
    prometheus_client::encoding::text::encode_registry(&mut out, &reg).expect("metrics encode");
    out
}

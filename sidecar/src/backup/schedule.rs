//! Scheduled backups in the daemon: every day at `[backup] schedule` (UTC),
//! or every so often (`every 15m`), every tenant that is not offboarded, one
//! after the other. A failed backup
//! is recorded (`levqor.backups`), logged and counted, and the next tenant
//! still gets its backup; retention runs after each good one.

use std::sync::Arc;
use std::time::Duration;

use chrono::{Timelike, Utc};
use serde_json::json;

use crate::config::{parse_schedule, Schedule};
use crate::daemon::App;
use crate::metrics::OutcomeLabels;

/// Seconds from `now` to the next HH:MM (UTC).
pub fn until_next(now: chrono::DateTime<Utc>, hour: u32, minute: u32) -> Duration {
    let today = now.date_naive().and_hms_opt(hour, minute, 0).expect("a time of day").and_utc();
    let next = if today > now { today } else { today + chrono::Duration::days(1) };
    (next - now).to_std().unwrap_or(Duration::from_secs(60))
}

pub async fn run(app: Arc<App>) {
    let mut first = true;
    loop {
        let cfg = app.cfg();
        let Some(schedule) = cfg.backup.as_ref().and_then(|b| b.schedule.as_deref()).and_then(parse_schedule) else { return };
        let wait = match schedule {
            Schedule::Daily { hour, minute } => {
                let w = until_next(Utc::now(), hour, minute);
                tracing::info!(next_in_s = w.as_secs(), at = %format!("{hour:02}:{minute:02} UTC"), "next scheduled backup");
                w
            }
            // The first run right away, then one every interval.
            Schedule::Every(d) => {
                if first {
                    Duration::ZERO
                } else {
                    tracing::info!(next_in_s = d.as_secs(), "next scheduled backup");
                    d
                }
            }
        };
        first = false;
        // Alive while waiting: beat at least once a minute.
        let mut left = wait;
        while !left.is_zero() {
            app.beat("backups", Duration::from_secs(120));
            let step = left.min(Duration::from_secs(60));
            if !app.pause(step).await {
                return;
            }
            left = left.saturating_sub(step);
        }
        run_once(&app).await;
        // Past the minute, so the same HH:MM is not taken twice.
        if matches!(schedule, Schedule::Daily { .. }) && Utc::now().second() < 59 && !app.pause(Duration::from_secs(61)).await {
            return;
        }
    }
}

/// One scheduled run over every tenant.
pub async fn run_once(app: &App) {
    let cfg = app.cfg();
    let tenants = match crate::db::connect(&super::target(&cfg)).await {
        Ok(db) => match db.client.query("SELECT slug FROM levqor.backup_tenants()", &[]).await {
            Ok(rows) => rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>(),
            Err(e) => {
                tracing::error!(error = %e, "scheduled backups: cannot list tenants");
                return;
            }
        },
        Err(e) => {
            tracing::error!(error = %e, "scheduled backups: cannot connect");
            return;
        }
    };
    let (mut ok, mut failed) = (0, 0);
    for slug in tenants {
        if app.stop.is_cancelled() {
            return;
        }
        app.beat("backups", Duration::from_secs(600));
        match super::take(&cfg, &slug, None).await {
            Ok(t) => {
                ok += 1;
                super::record(&cfg, &slug, "backup", Some(&t), "ok", None, json!({"scheduled": true})).await;
                app.metrics.backups.get_or_create(&OutcomeLabels { outcome: "ok".into() }).inc();
                if let Some(b) = &cfg.backup {
                    for r in super::apply_retention(&b.dir.join(&slug), &slug, b.keep_daily, b.keep_weekly) {
                        tracing::info!(file = %r.display(), "retention: removed");
                    }
                }
                tracing::info!(tenant = %slug, file = %t.path.display(), rows = t.rows, "backup taken");
            }
            Err(e) => {
                failed += 1;
                super::record(&cfg, &slug, "backup", None, "failed", Some(&e), json!({"scheduled": true})).await;
                app.metrics.backups.get_or_create(&OutcomeLabels { outcome: "failed".into() }).inc();
                app.metrics.error("backups", "backup");
                tracing::error!(tenant = %slug, error = %e, "backup failed; going on with the next tenant");
            }
        }
    }
    tracing::info!(ok, failed, "scheduled backups done");
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn the_next_run_is_today_or_tomorrow() {
        let now = Utc.with_ymd_and_hms(2026, 12, 1, 1, 30, 0).unwrap();
        assert_eq!(until_next(now, 2, 0), Duration::from_secs(30 * 60));
        assert_eq!(until_next(now, 1, 0), Duration::from_secs(23 * 3600 + 30 * 60));
    }
}

//! Plan quotas: `consume()`, row limits (`limit_rows`, sql/quota.sql), the
//! live numbers behind `levqor.usage`, and `flush_usage()`, which the worker
//! calls to copy counters into tables and the billing ledger.
//!
//! Counters live in shared memory ([`crate::counters`]); what a tenant may use
//! comes from its plan and overrides, cached per backend and dropped when
//! `levqor.plans`, `levqor.quota_overrides`, `levqor.metrics`,
//! `levqor.row_limits` or `levqor.tenants` change (relcache invalidation, as
//! in [`crate::cache`]).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use pgrx::pg_sys;
use pgrx::prelude::*;
use uuid::Uuid;

use crate::context::{self, from_uuid, to_uuid};
use crate::cache;
use crate::counters::{self, Data, Key, NO_WINDOW};
use crate::errors;
use crate::privilege::{as_catalog_owner, current_role_has};

const USEC_PER_DAY: i64 = 86_400_000_000;
/// Days from 1970-01-01 to PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_DAYS: i64 = 10_957;
/// Row-count slots are keyed by the row_limits registration, apart from metrics.
const ROWS_KEY: u32 = 0x8000_0000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Window {
    Never,
    Fixed(i64),
    Month,
}

impl Window {
    fn from_micros(w: i64) -> Window {
        match w {
            0 => Window::Never,
            -1 => Window::Month,
            w => Window::Fixed(w),
        }
    }

    /// Start of the window holding `ts` (µs since 2000-01-01 UTC).
    pub fn start(self, ts: i64) -> i64 {
        match self {
            Window::Never => NO_WINDOW,
            Window::Fixed(p) => ts - ts.rem_euclid(p),
            Window::Month => {
                let (y, m, _) = civil_from_days(ts.div_euclid(USEC_PER_DAY) + PG_EPOCH_DAYS);
                (days_from_civil(y, m, 1) - PG_EPOCH_DAYS) * USEC_PER_DAY
            }
        }
    }

    pub fn end(self, start: i64) -> Option<i64> {
        match self {
            Window::Never => None,
            Window::Fixed(p) => Some(start + p),
            Window::Month => Some(Window::Month.start(start + 32 * USEC_PER_DAY)),
        }
    }
}

// Calendar arithmetic on the proleptic Gregorian calendar (H. Hinnant's
// days_from_civil / civil_from_days); month windows are in UTC.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

/// "2026-11-23 10:15:00 UTC"
fn format_ts(ts: i64) -> String {
    let days = ts.div_euclid(USEC_PER_DAY);
    let secs = ts.rem_euclid(USEC_PER_DAY) / 1_000_000;
    let (y, m, d) = civil_from_days(days + PG_EPOCH_DAYS);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", secs / 3600, secs / 60 % 60, secs % 60)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Counter,
    Rows,
    Storage,
}

#[derive(Clone)]
struct Metric {
    id: u32,
    kind: Kind,
    window: Window,
}

#[derive(Clone)]
struct Limit {
    quota: Option<i64>,
    slug: String,
    plan: String,
}

#[derive(Clone)]
struct RowTable {
    registration: u32,
    metric: String,
    column: String,
    name: String,
}

thread_local! {
    static METRICS: RefCell<HashMap<String, Metric>> = RefCell::new(HashMap::new());
    static LIMITS: RefCell<HashMap<(Uuid, String), Limit>> = RefCell::new(HashMap::new());
    static ROW_TABLES: RefCell<HashMap<pg_sys::Oid, RowTable>> = RefCell::new(HashMap::new());
    /// The oids of the tables the caches above are read from.
    static CATALOG: Cell<[pg_sys::Oid; 5]> = const { Cell::new([pg_sys::InvalidOid; 5]) };
}

/// Called from the relcache callback in crate::cache.
pub fn forget(relid: pg_sys::Oid) {
    if relid == pg_sys::InvalidOid || CATALOG.with(Cell::get).contains(&relid) {
        METRICS.with(|m| m.borrow_mut().clear());
        LIMITS.with(|m| m.borrow_mut().clear());
        ROW_TABLES.with(|m| m.borrow_mut().clear());
    } else {
        ROW_TABLES.with(|m| m.borrow_mut().remove(&relid));
    }
}

fn require_shared_memory(what: &str) {
    if !counters::available() {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("{what} needs levqor in shared_preload_libraries"),
            Some("Quota counters live in shared memory: ALTER SYSTEM SET shared_preload_libraries = 'levqor'; then restart PostgreSQL."),
        );
    }
}

fn query_one<R>(sql: &str, args: &[pgrx::datum::DatumWithOid<'_>], read: impl FnOnce(&pgrx::spi::SpiHeapTupleData<'_>) -> R) -> Option<R> {
    as_catalog_owner(|| {
        Spi::connect(|client| {
            let table = client.select(sql, Some(1), args).expect("levqor quota lookup runs");
            table.into_iter().next().map(|row| read(&row))
        })
    })
}

fn metric(name: &str) -> Option<Metric> {
    cache::get_or_fill(&METRICS, name, || fill_metric(name))
}

fn fill_metric(name: &str) -> Option<Metric> {
    query_one(
        "SELECT m.id::int4, m.kind, levqor._window_micros(m.reset_every),
                'levqor.metrics'::regclass::oid, 'levqor.plans'::regclass::oid,
                'levqor.quota_overrides'::regclass::oid, 'levqor.tenants'::regclass::oid,
                'levqor.row_limits'::regclass::oid
           FROM levqor.metrics m WHERE m.name = $1",
        &[name.into()],
        |row| {
            let oid = |i| row.get::<pg_sys::Oid>(i).ok().flatten().unwrap_or(pg_sys::InvalidOid);
            CATALOG.with(|c| c.set([oid(4), oid(5), oid(6), oid(7), oid(8)]));
            Metric {
                id: row.get::<i32>(1).ok().flatten().unwrap_or_default() as u32,
                kind: match row.get::<String>(2).ok().flatten().as_deref() {
                    Some("rows") => Kind::Rows,
                    Some("storage") => Kind::Storage,
                    _ => Kind::Counter,
                },
                window: Window::from_micros(row.get::<i64>(3).ok().flatten().unwrap_or_default()),
            }
        },
    )
}

fn limit(tenant: Uuid, metric: &str) -> Limit {
    cache::get_or_fill(&LIMITS, &(tenant, metric.to_owned()), || Some(fill_limit(tenant, metric)))
        .expect("a filled limit")
}

fn fill_limit(tenant: Uuid, metric: &str) -> Limit {
    query_one(
        "SELECT t.slug, t.plan, levqor._limit(t.id, $2) FROM levqor.tenants t WHERE t.id = $1",
        &[from_uuid(tenant).into(), metric.into()],
        |row| Limit {
            slug: row.get::<String>(1).ok().flatten().unwrap_or_default(),
            plan: row.get::<String>(2).ok().flatten().unwrap_or_default(),
            quota: row.get::<i64>(3).ok().flatten(),
        },
    )
    .unwrap_or_else(|| errors::unknown_tenant(&tenant.to_string()))
}

fn row_table(relid: pg_sys::Oid) -> Option<RowTable> {
    cache::get_or_fill(&ROW_TABLES, &relid, || fill_row_table(relid))
}

fn fill_row_table(relid: pg_sys::Oid) -> Option<RowTable> {
    query_one(
        "SELECT r.id::int4, r.metric, r.tenant_column::text, r.tbl::regclass::text
           FROM levqor.row_limits r WHERE r.tbl = $1",
        &[relid.into()],
        |row| RowTable {
            registration: row.get::<i32>(1).ok().flatten().unwrap_or_default() as u32,
            metric: row.get::<String>(2).ok().flatten().unwrap_or_default(),
            column: row.get::<String>(3).ok().flatten().unwrap_or_default(),
            name: row.get::<String>(4).ok().flatten().unwrap_or_default(),
        },
    )
}

fn key(tenant: Uuid, metric: u32) -> Key {
    Key { db: unsafe { pg_sys::MyDatabaseId }.to_u32(), metric, tenant: *tenant.as_bytes() }
}

fn now() -> i64 {
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// 53400, for every quota refusal.
fn exceeded(what: String, detail: String) -> ! {
    errors::raise_with_detail(
        PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
        what,
        Some(detail),
        Some("Move the tenant to a larger plan (levqor.change_plan) or ask a levqor_admin for an override (levqor.set_quota)."),
    )
}

/// 22003: an amount no counter can hold. Nothing was counted.
fn overflow(slug: &str, metric: &str, amount: i64, used: i64, unbilled: i64) -> ! {
    errors::raise_with_detail(
        PgSqlErrorCode::ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
        format!("levqor quota counter out of range: {amount} more {metric} for tenant \"{slug}\" would pass {}", i64::MAX),
        Some(format!(
            "metric {metric}: {used} used in the current window, {unbilled} not yet in the billing ledger; nothing was counted."
        )),
        Some("Amounts are counted exactly as 64-bit integers; check the amount the application computed, or count in a larger unit."),
    )
}

/// Count `amount` of `metric` for the current tenant and return what is left
/// in this window (NULL when the plan has no limit). Refused, counting
/// nothing, when it would pass the limit. Undone if the transaction aborts.
#[pg_extern(volatile, parallel_unsafe)]
fn consume(metric_name: &str, amount: default!(i64, 1)) -> Option<i64> {
    require_shared_memory("levqor.consume()");
    let Some(ctx) = context::current() else {
        errors::not_allowed(
            "levqor.consume() needs a tenant context",
            Some("Call levqor.authenticate() (or set_tenant) in this transaction first."),
        )
    };
    if amount < 1 {
        errors::bad_argument(format!("amount must be at least 1, not {amount}"), None);
    }
    let Some(m) = metric(metric_name) else {
        errors::raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("unknown metric \"{}\"", metric_name.escape_debug()),
            Some("Metrics are listed in levqor.metrics; a levqor_admin adds one with levqor.define_metric()."),
        )
    };
    if m.kind != Kind::Counter {
        errors::bad_argument(
            format!("metric \"{metric_name}\" is measured by levqor ({}), not consumed", if m.kind == Kind::Rows { "rows in a table" } else { "storage" }),
            Some("Only counter metrics are consumed; row metrics are enforced by levqor.limit_rows()."),
        );
    }
    let lim = limit(ctx.tenant, metric_name);
    let window = m.window.start(now());
    let slot = counters::find_or_create(&key(ctx.tenant, m.id), false, || Data {
        window,
        used: flushed_usage(ctx.tenant, metric_name, window),
        ..Data::default()
    });
    match counters::reserve(slot, window, amount, lim.quota, true) {
        Ok(used) => lim.quota.map(|q| q - used),
        Err(counters::Refusal::Overflow { used, unbilled }) => overflow(&lim.slug, metric_name, amount, used, unbilled),
        Err(counters::Refusal::Limit { used }) => {
            let per = match m.window {
                Window::Never => String::new(),
                _ => " in this window".to_string(),
            };
            let resets = m
                .window
                .end(window)
                .map(|e| format!("; the window resets at {}", format_ts(e)))
                .unwrap_or_default();
            exceeded(
                format!(
                    "quota exceeded: tenant \"{}\" (plan {}) may use {} {metric_name}{per}",
                    lim.slug,
                    lim.plan,
                    lim.quota.unwrap_or_default()
                ),
                format!("{used} used, {amount} requested{resets}."),
            )
        }
    }
}

/// What the tables say a counter had used in a window (after a restart or
/// when the counter was never in memory).
fn flushed_usage(tenant: Uuid, metric: &str, window: i64) -> i64 {
    query_one(
        "SELECT used FROM levqor.usage_counters
          WHERE tenant_id = $1 AND metric = $2 AND window_start = levqor._ts($3)",
        &[from_uuid(tenant).into(), metric.into(), window.into()],
        |row| row.get::<i64>(1).ok().flatten().unwrap_or_default(),
    )
    .unwrap_or_default()
}

/// The tenant's rows in a row-limited table, counted when its counter is
/// first needed (a BEFORE trigger, so this transaction has not touched them).
fn row_slot(t: &RowTable, tenant: Uuid) -> &'static counters::Slot {
    counters::find_or_create(&key(tenant, ROWS_KEY | t.registration), true, || {
        let sql = format!("SELECT count(*) FROM {} WHERE {} = $1", t.name, pgrx::spi::quote_identifier(&t.column));
        let n = query_one(&sql, &[from_uuid(tenant).into()], |row| row.get::<i64>(1).ok().flatten().unwrap_or_default());
        Data { window: NO_WINDOW, used: n.unwrap_or_default(), ..Data::default() }
    })
}

fn tenant_of(tuple: Option<PgHeapTuple<'_, pgrx::AllocatedByPostgres>>, column: &str) -> Option<Uuid> {
    tuple?.get_by_name::<pgrx::Uuid>(column).ok().flatten().map(to_uuid)
}

/// Row limits: BEFORE ROW makes sure the tenant's counter exists (counted
/// before this statement changes anything), AFTER ROW counts what actually
/// happened (so ON CONFLICT DO NOTHING and skipped rows cost nothing), and a
/// BEFORE TRUNCATE refuses.
#[pg_trigger]
fn _limit_rows<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
    require_shared_memory("levqor.limit_rows()");
    let relid = trigger.relid()?;
    let op = trigger.op()?;
    let Some(t) = row_table(relid) else {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("{} has a levqor row limit trigger but no levqor.row_limits entry", trigger.table_name()?),
            Some("Call levqor.limit_rows() again, or levqor.unlimit_rows()."),
        )
    };
    if matches!(op, pgrx::PgTriggerOperation::Truncate) {
        errors::raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("TRUNCATE is refused on {}: its rows count against the \"{}\" quota", t.name, t.metric),
            Some("DELETE the rows instead (each delete frees room when it commits)."),
        );
    }
    let before = matches!(trigger.when()?, pgrx::PgTriggerWhen::Before);
    let old = tenant_of(trigger.old(), &t.column);
    let new = tenant_of(trigger.new(), &t.column);
    let (gone, came) = match op {
        pgrx::PgTriggerOperation::Insert => (None, new),
        pgrx::PgTriggerOperation::Delete => (old, None),
        _ if old == new => (None, None),
        _ => (old, new),
    };
    if before {
        for tenant in gone.into_iter().chain(came) {
            row_slot(&t, tenant);
        }
        // A BEFORE ROW trigger hands the row on unchanged.
        return Ok(trigger.new().or_else(|| trigger.old()));
    }
    if let Some(tenant) = gone {
        counters::release(row_slot(&t, tenant), 1);
    }
    if let Some(tenant) = came {
        let lim = limit(tenant, &t.metric);
        // A restore brings back rows that were allowed when written: count
        // them, refuse none (a tenant left over a lowered limit keeps its rows).
        let quota = if crate::privilege::restoring() { None } else { lim.quota };
        match counters::reserve(row_slot(&t, tenant), NO_WINDOW, 1, quota, false) {
            Ok(_) => {}
            Err(counters::Refusal::Overflow { used, unbilled }) => overflow(&lim.slug, &t.metric, 1, used, unbilled),
            Err(counters::Refusal::Limit { used }) => exceeded(
                format!(
                    "quota exceeded: tenant \"{}\" (plan {}) may have {} {} (rows of {})",
                    lim.slug,
                    lim.plan,
                    lim.quota.unwrap_or_default(),
                    t.metric,
                    t.name
                ),
                format!("{used} in use; a row is freed when its DELETE commits."),
            ),
        }
    }
    Ok(None)
}

/// The counters in shared memory for this database, for `levqor.usage`:
/// every tenant's for a levqor_admin, the context tenant's for anyone else.
#[pg_extern(stable, parallel_unsafe)]
fn _usage_live() -> TableIterator<
    'static,
    (
        name!(tenant_id, pgrx::Uuid),
        name!(counter, i32),
        name!(rows, bool),
        name!(window_start, i64),
        name!(used, i64),
    ),
> {
    if !counters::available() {
        return TableIterator::new(Vec::new());
    }
    let everyone = current_role_has("levqor_admin");
    let mine = context::current().map(|c| *c.tenant.as_bytes());
    let rows: Vec<_> = counters::in_this_database()
        .filter(|s| everyone || Some(s.key().tenant) == mine)
        .map(|s| {
            let k = s.key();
            let d = s.with(|d| *d);
            (from_uuid(Uuid::from_bytes(k.tenant)), (k.metric & !ROWS_KEY) as i32, s.is_rows(), d.window, d.used)
        })
        .collect();
    TableIterator::new(rows)
}

/// Copy this database's changed counters into `levqor.usage_counters`,
/// append committed consumption to `levqor.usage_ledger`, and raise the 80 %
/// and 100 % events. The background worker calls it every
/// `levqor.quota_flush_interval`; returns how many counters it wrote.
#[pg_extern(volatile, parallel_unsafe)]
fn flush_usage() -> i64 {
    require_shared_memory("levqor.flush_usage()");
    if !current_role_has("levqor_admin") {
        errors::not_allowed("levqor.flush_usage() is for levqor_admin", None);
    }
    as_catalog_owner(|| {
        Spi::connect_mut(|client| {
            // One flush at a time, and ledger ids commit in order (the
            // sidecar's cursor relies on it).
            client.update("LOCK TABLE levqor.usage_ledger IN EXCLUSIVE MODE", None, &[]).expect("lock the ledger");
            let mut slots = Vec::new();
            let (mut tenants, mut counters_, mut rows, mut windows, mut used, mut billable) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for s in counters::in_this_database() {
                let d = s.with(|d| *d);
                if d.version == d.flushed_version {
                    continue;
                }
                let k = s.key();
                tenants.push(from_uuid(Uuid::from_bytes(k.tenant)));
                counters_.push((k.metric & !ROWS_KEY) as i32);
                rows.push(s.is_rows());
                windows.push(d.window);
                used.push(d.used - d.inflight);
                billable.push(d.unflushed);
                slots.push((s, d.unflushed, d.version));
            }
            if slots.is_empty() {
                return 0;
            }
            client
                .update(
                    "SELECT levqor._record_usage($1, $2, $3, $4, $5, $6)",
                    None,
                    &[tenants.into(), counters_.into(), rows.into(), windows.into(), used.into(), billable.into()],
                )
                .expect("record usage");
            for (s, unflushed, version) in &slots {
                counters::flushed(s, *unflushed, *version);
            }
            slots.len() as i64
        })
    })
}

/// The start of the window holding `at`, as the counters compute it (for
/// tests that hold SQL's `levqor._window_start` to the same answer).
#[pg_extern(stable, parallel_safe)]
fn _window_start_of(reset_every_micros: i64, at: pgrx::datum::TimestampWithTimeZone) -> i64 {
    Window::from_micros(reset_every_micros).start(pg_sys::TimestampTz::from(at))
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    fn ts(sql: &str) -> i64 {
        let t = Spi::get_one::<pgrx::datum::TimestampWithTimeZone>(&format!("SELECT {sql}")).unwrap().unwrap();
        pg_sys::TimestampTz::from(t)
    }

    #[pg_test]
    fn windows_start_and_end_on_calendar_boundaries() {
        let at = ts("timestamptz '2026-11-23 10:22:31.5+00'");
        let q = Window::Fixed(15 * 60 * 1_000_000);
        assert_eq!(q.start(at), ts("timestamptz '2026-11-23 10:15:00+00'"));
        assert_eq!(q.end(q.start(at)), Some(ts("timestamptz '2026-11-23 10:30:00+00'")));
        let day = Window::Fixed(USEC_PER_DAY);
        assert_eq!(day.start(at), ts("timestamptz '2026-11-23 00:00:00+00'"));
        assert_eq!(Window::Month.start(at), ts("timestamptz '2026-11-01 00:00:00+00'"));
        assert_eq!(Window::Month.end(Window::Month.start(at)), Some(ts("timestamptz '2026-12-01 00:00:00+00'")));
        let dec = ts("timestamptz '2026-12-31 23:59:59+00'");
        assert_eq!(Window::Month.end(Window::Month.start(dec)), Some(ts("timestamptz '2027-01-01 00:00:00+00'")));
        let leap = ts("timestamptz '2028-02-29 12:00:00+00'");
        assert_eq!(Window::Month.start(leap), ts("timestamptz '2028-02-01 00:00:00+00'"));
        assert_eq!(Window::Month.end(Window::Month.start(leap)), Some(ts("timestamptz '2028-03-01 00:00:00+00'")));
        assert_eq!(Window::Never.start(at), NO_WINDOW);
        assert_eq!(format_ts(ts("timestamptz '2026-11-23 10:15:00+00'")), "2026-11-23 10:15:00 UTC");
        let before_2000 = ts("timestamptz '1999-12-31 23:50:00+00'");
        assert_eq!(q.start(before_2000), ts("timestamptz '1999-12-31 23:45:00+00'"));
    }

    #[pg_test]
    fn the_sql_window_start_agrees_with_the_counters() {
        let micros = Spi::get_one::<i64>("SELECT levqor._window_micros(interval '15 minutes')").unwrap().unwrap();
        assert_eq!(micros, 15 * 60 * 1_000_000);
        assert_eq!(Spi::get_one::<i64>("SELECT levqor._window_micros(interval '1 month')").unwrap(), Some(-1));
        assert_eq!(Spi::get_one::<i64>("SELECT levqor._window_micros(NULL)").unwrap(), Some(0));
        let same = Spi::get_one::<bool>(
            "SELECT levqor._window_start(interval '1 month', now()) = levqor._ts(levqor._window_start_of(-1, now()))
                AND levqor._window_start(interval '15 minutes', now()) = levqor._ts(levqor._window_start_of(900000000, now()))",
        )
        .unwrap();
        assert_eq!(same, Some(true));
    }
}

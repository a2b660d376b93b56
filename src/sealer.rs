//! levqor's background workers, one in each database named by
//! `levqor.audit_database` (a comma-separated list):
//! * seals the audit log every `levqor.audit_seal_interval` (an entry stays
//!   unsealed for at most about one interval after its transaction commits);
//! * flushes the quota counters (`levqor.flush_usage()`) every
//!   `levqor.quota_flush_interval`: what a crash can lose;
//! * measures storage (`levqor.refresh_storage()`) every
//!   `levqor.storage_refresh_interval`.
//! Registered only when levqor is preloaded and `levqor.audit_database` is set;
//! elsewhere, call those functions on a schedule of your own.

use std::ffi::CString;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::prelude::*;

static AUDIT_DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static SEAL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
static FLUSH_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
static STORAGE_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(300);

pub fn init() {
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    // A server-start setting can only be defined while the server starts
    // (PostgreSQL refuses it, fatally, in a session that loads levqor later).
    if preloading {
        GucRegistry::define_string_guc(
            c"levqor.audit_database",
            c"Databases levqor's worker serves, comma-separated: it seals the audit log and flushes quota counters",
            c"One worker per database; needs shared_preload_libraries = 'levqor'; takes effect at server start.",
            &AUDIT_DATABASE,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
    GucRegistry::define_int_guc(
        c"levqor.audit_seal_interval",
        c"Milliseconds between two sealing passes of the levqor audit worker",
        c"An audit entry stays unsealed for about this long after it commits.",
        &SEAL_INTERVAL_MS,
        50,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"levqor.quota_flush_interval",
        c"Milliseconds between two flushes of the quota counters to levqor.usage_counters and the ledger",
        c"A crash loses at most about this much committed consumption (never over-billing).",
        &FLUSH_INTERVAL_MS,
        50,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"levqor.storage_refresh_interval",
        c"Seconds between two storage measurements of every tenant (0: never)",
        c"Storage limits are enforced as of the last measurement.",
        &STORAGE_INTERVAL_S,
        0,
        86_400 * 7,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    if preloading {
        for db in databases() {
            BackgroundWorkerBuilder::new(&format!("levqor worker {db}"))
                .set_type("levqor worker")
                .set_function("levqor_audit_sealer_main")
                .set_library("levqor")
                .set_extra(&db)
                .enable_spi_access()
                .set_restart_time(Some(Duration::from_secs(1)))
                .load();
        }
    }
}

/// The databases in `levqor.audit_database`, each once.
fn databases() -> Vec<String> {
    let list = AUDIT_DATABASE.get().map(|d| d.to_string_lossy().into_owned()).unwrap_or_default();
    let mut dbs: Vec<String> = Vec::new();
    for db in list.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !dbs.iter().any(|d| d == db) {
            dbs.push(db.to_string());
        }
    }
    dbs
}

/// Run `sql` if levqor (with `function`) is installed in this database;
/// returns the first column of its result when that is an integer.
/// `asynchronous`: commit without waiting for the WAL flush (see the
/// sealing pass below).
fn run_if_installed(function: &str, sql: &str, asynchronous: bool) -> Option<i64> {
    let result = BackgroundWorker::transaction(|| {
        Spi::connect_mut(|client| {
            let installed = client
                .select("SELECT to_regprocedure($1) IS NOT NULL", Some(1), &[function.into()])
                .ok()
                .and_then(|t| t.first().get::<bool>(1).ok().flatten())
                .unwrap_or(false);
            if !installed {
                return None;
            }
            if asynchronous {
                client.update("SET LOCAL synchronous_commit = off", None, &[]).expect("levqor worker: synchronous_commit");
            }
            let t = client.update(sql, None, &[]).unwrap_or_else(|e| panic!("levqor worker: {sql}: {e}"));
            t.first().get::<i64>(1).ok().flatten()
        })
    });
    // A backend reports its table statistics when it goes idle; a worker
    // must do it itself. Without it autovacuum never learns of the runs,
    // heads and counters the worker writes, so it never analyzes or vacuums
    // those tables (at most once a second: PostgreSQL rate-limits it).
    unsafe { pg_sys::pgstat_report_stat(false) };
    result
}

/// Whether a DROP DATABASE of this worker's database holds its lock on it.
fn being_dropped() -> bool {
    BackgroundWorker::transaction(|| {
        Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks l
                             WHERE l.locktype = 'object' AND l.database = 0 AND l.classid = 'pg_catalog.pg_database'::pg_catalog.regclass
                               AND l.objid = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database())
                               AND l.mode = 'AccessExclusiveLock' AND l.pid <> pg_catalog.pg_backend_pid())",
        )
        .ok()
        .flatten()
        .unwrap_or(false)
    })
}

/// Entries one sealing transaction takes; a pass repeats while it fills one
/// (a backlog after a restart), up to this many times.
const SEAL_BATCH: i64 = 10_000;
const SEAL_ROUNDS: usize = 20;

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn levqor_audit_sealer_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = BackgroundWorker::get_extra().to_string();
    // Exits with an error (and is restarted) while the database does not exist.
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    let (mut sealed, mut flushed, mut measured) = (Instant::now(), Instant::now(), Instant::now());
    loop {
        let seal = Duration::from_millis(SEAL_INTERVAL_MS.get().max(50) as u64);
        let flush = Duration::from_millis(FLUSH_INTERVAL_MS.get().max(50) as u64);
        let storage = Duration::from_secs(STORAGE_INTERVAL_S.get().max(0) as u64);
        let next = [
            seal.saturating_sub(sealed.elapsed()),
            flush.saturating_sub(flushed.elapsed()),
        ]
        .into_iter()
        .min()
        .unwrap_or(seal);
        if !BackgroundWorker::wait_latch(Some(next.max(Duration::from_millis(10)))) {
            // SIGTERM: one last flush, so a clean shutdown loses nothing
            // even before the postmaster saves the counters.
            run_if_installed("levqor.flush_usage()", "SELECT levqor.flush_usage()", false);
            break;
        }
        // DROP DATABASE waits five seconds for the sessions connected to the
        // database to leave, then refuses: this worker leaves as soon as it
        // sees the dropper's lock (and is started again a second later; it
        // connects once the database exists again).
        if being_dropped() {
            log!("levqor worker: database {db} is being dropped; leaving it");
            unsafe { pg_sys::proc_exit(1) };
        }
        // The intervals are reloadable (SIGHUP), in this worker too.
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            continue;
        }
        if sealed.elapsed() >= seal {
            // A sealing pass commits without waiting for its WAL to reach
            // disk: while it waited, the writers queued for the WAL write
            // lock far more often (benches/README.md, seventh audit run).
            // A crash can then undo the last moments' sealing, runs and
            // heads together (one transaction), and the next pass seals
            // those entries again; audit_head() flushes the WAL before it
            // gives a head out, so no head seen outside is ever undone.
            for _ in 0..SEAL_ROUNDS {
                let sql = format!("SELECT levqor.seal_audit({SEAL_BATCH})::int8");
                if run_if_installed("levqor.seal_audit(integer)", &sql, true) != Some(SEAL_BATCH) {
                    break;
                }
            }
            sealed = Instant::now();
        }
        if flushed.elapsed() >= flush {
            run_if_installed("levqor.flush_usage()", "SELECT levqor.flush_usage()", false);
            flushed = Instant::now();
        }
        if !storage.is_zero() && measured.elapsed() >= storage {
            run_if_installed("levqor.refresh_storage()", "SELECT levqor.refresh_storage()", false);
            measured = Instant::now();
        }
    }
}

//! The audit sealing worker: a background worker that calls
//! `levqor.seal_audit()` every `levqor.audit_seal_interval` milliseconds in
//! the database named by `levqor.audit_database`, so an audit entry stays
//! unsealed for at most about one interval after its transaction commits.
//! Registered only when levqor is preloaded and `levqor.audit_database` is set;
//! without it, call `SELECT levqor.seal_audit()` on a schedule of your own.

use std::ffi::CString;
use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::prelude::*;

static AUDIT_DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static SEAL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);

pub fn init() {
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    // A server-start setting can only be defined while the server starts
    // (PostgreSQL refuses it, fatally, in a session that loads levqor later).
    if preloading {
        GucRegistry::define_string_guc(
            c"levqor.audit_database",
            c"Database whose audit log the levqor sealing worker seals (empty: no worker)",
            c"Needs shared_preload_libraries = 'levqor'; takes effect at server start.",
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
    if preloading && AUDIT_DATABASE.get().is_some_and(|d| !d.as_bytes().is_empty()) {
        BackgroundWorkerBuilder::new("levqor audit sealer")
            .set_type("levqor audit sealer")
            .set_function("levqor_audit_sealer_main")
            .set_library("levqor")
            .enable_spi_access()
            .set_restart_time(Some(Duration::from_secs(1)))
            .load();
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn levqor_audit_sealer_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = AUDIT_DATABASE.get().map(|d| d.to_string_lossy().into_owned()).unwrap_or_default();
    // Exits with an error (and is restarted) while the database does not exist.
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    loop {
        let interval = Duration::from_millis(SEAL_INTERVAL_MS.get().max(50) as u64);
        if !BackgroundWorker::wait_latch(Some(interval)) {
            break; // SIGTERM
        }
        BackgroundWorker::transaction(|| {
            Spi::connect_mut(|client| {
                // Nothing to do until levqor is installed in that database.
                let installed = client
                    .select("SELECT to_regprocedure('levqor.seal_audit(integer)') IS NOT NULL", Some(1), &[])
                    .ok()
                    .and_then(|t| t.first().get::<bool>(1).ok().flatten())
                    .unwrap_or(false);
                if installed {
                    client.update("SELECT levqor.seal_audit(10000)", None, &[]).expect("seal the audit log");
                }
            })
        });
    }
}

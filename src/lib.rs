//! levqor: PostgreSQL enforces multi-tenancy.
//!
//! Modules are named after what they do:
//! * `context`   — the unforgeable tenant context and the policy helpers;
//! * `auth`      — authenticate / set_tenant / set_tenant_token;
//! * `keys`, `token` — API keys and signed tokens;
//! * `privilege` — running catalog lookups with the extension's authority;
//! * `exposure`  — refuses protected tables whose row level security a
//!   superuser switched off behind the DDL guard (fail closed);
//! * `members`   — the member role a context acts with, from levqor.members;
//! * `lifecycle`, `audit`, `sealer` — the tenant lifecycle, the audit trigger
//!   and the background worker that seals the log and flushes counters
//!   (`audit_direct`, `row_json`: a one-row statement's entry, without SPI;
//!   `seal`: a sealing batch);
//! * `counters`, `quota` — plan quotas counted in shared memory;
//! * `pooling`   — `levqor.transaction_pooling`: nothing of a tenant's
//!   outlives its transaction on a shared connection;
//! * `redact`    — keys and tokens out of pg_stat_activity and error reports;
//! * `citus`     — on Citus: the context forwarded to the workers, signed,
//!   and each tenant's queries routed to its shard;
//! * `errors`    — every refusal, with a stable SQLSTATE.
//!
//! SQL that reads better as SQL lives in `sql/`: the catalog, tenant creation,
//! table protection and its guards, what the sidecar works through (billing,
//! audit streams, backups), and the grants.

use pgrx::prelude::*;

::pgrx::pg_module_magic!(name, version);

mod audit;
mod audit_direct;
mod auth;
mod cache;
mod citus;
mod context;
mod counters;
mod errors;
mod exposure;
mod guc;
mod keys;
mod lifecycle;
mod members;
mod policy;
mod pooling;
mod privilege;
mod quota;
mod redact;
mod row_json;
mod seal;
mod sealer;
mod shmem;
mod tenancy_tests;
mod token;

extension_sql_file!("../sql/catalog.sql", name = "catalog", bootstrap);
extension_sql_file!("../sql/tenants.sql", name = "tenants", requires = ["catalog"]);
extension_sql_file!("../sql/tenancy.sql", name = "tenancy", requires = ["tenants"]);
extension_sql_file!("../sql/citus.sql", name = "citus", requires = ["tenancy", _citus_active]);
extension_sql_file!("../sql/lifecycle.sql", name = "lifecycle", requires = ["citus"]);
extension_sql_file!("../sql/report.sql", name = "report", requires = ["lifecycle"]);
extension_sql_file!("../sql/foreign_keys.sql", name = "foreign_keys", requires = ["report", _caller]);
extension_sql_file!("../sql/schemas.sql", name = "schemas", requires = ["foreign_keys"]);
extension_sql_file!("../sql/adopt.sql", name = "adopt", requires = ["schemas"]);
extension_sql_file!("../sql/audit.sql", name = "audit", requires = ["adopt", current_user_id, current_member_role, _audit_id, _seal_batch, _flush_wal]);
extension_sql_file!("../sql/export.sql", name = "export", requires = ["audit"]);
extension_sql_file!("../sql/quota.sql", name = "quota", requires = ["export", _usage_live]);
extension_sql_file!("../sql/hierarchy.sql", name = "hierarchy", requires = ["quota", _caller_is_admin]);
extension_sql_file!("../sql/members.sql", name = "members", requires = ["hierarchy", _caller_has]);
extension_sql_file!("../sql/policy.sql", name = "policy", requires = ["members"]);
extension_sql_file!("../sql/billing.sql", name = "billing", requires = ["policy"]);
extension_sql_file!("../sql/streams.sql", name = "streams", requires = ["billing"]);
extension_sql_file!("../sql/backup.sql", name = "backup", requires = ["streams", backup_context]);
extension_sql_file!("../sql/grants.sql", name = "grants", finalize);

thread_local! {
    static PRELOADED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    PRELOADED.with(|p| p.set(unsafe { pg_sys::process_shared_preload_libraries_in_progress }));
    context::init();
    token::init();
    cache::init();
    citus::init();
    lifecycle::init();
    exposure::init();
    pooling::init();
    redact::init();
    counters::init();
    sealer::init();
    // Any other levqor.* name is a typo or an attempt at one; refuse it, and
    // drop placeholders a session made before the library was loaded.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"levqor".as_ptr()) };
}

/// Whether levqor was loaded through shared_preload_libraries (recommended:
/// no session can then create a placeholder for a levqor setting before the
/// library defines it, and later features need shared memory).
#[pg_extern(stable, parallel_safe)]
fn preloaded() -> bool {
    PRELOADED.with(|p| p.get())
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn loaded_through_shared_preload_libraries() {
        assert_eq!(Spi::get_one::<bool>("SELECT levqor.preloaded()").unwrap(), Some(true));
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'levqor'",
            "levqor.token_secret = 'pg-test-secret-0123456789abcdef-0123456789'",
        ]
    }
}

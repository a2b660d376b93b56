//! Enforcing the tenant lifecycle on contexts that already exist.
//!
//! `authenticate` and friends refuse new contexts for blocked, offboarded and
//! expired-trial tenants. Two things cover the contexts made before a change:
//!
//! * the write guard, a statement trigger on every protected table, refuses
//!   writes unless the context's tenant may write *now* (a suspended
//!   `read_only` tenant reads but does not write);
//! * an `ExecutorStart` hook: after the tenants table changed (the cache's
//!   invalidation says so), the next query re-checks the context and clears it
//!   if its tenant may no longer have one. It runs in the leader before any
//!   parallel worker copies the context, so workers never see a stale one.

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::auth::lookup_tenant_id;
use crate::cache::{self, Access};
use crate::context;

static mut PREV_EXECUTOR_START: pg_sys::ExecutorStart_hook_type = None;

pub fn init() {
    unsafe {
        PREV_EXECUTOR_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_start(query: *mut pg_sys::QueryDesc, eflags: i32) {
    // take_stale() resets the flag first, so the lookup's own queries pass
    // straight through this hook. Inside a catalog lookup (whose query can
    // itself take an invalidation) the flag is left for the next query.
    if pg_sys::ParallelWorkerNumber < 0 && !crate::auth::in_lookup() && cache::take_stale() {
        recheck_context();
    }
    if pg_sys::ParallelWorkerNumber < 0 {
        crate::citus::verify_before_execution(query);
        crate::citus::supply_tenant(query);
        crate::redact::executing(query);
        crate::pooling::recheck();
        crate::exposure::check_query(query);
    }
    match PREV_EXECUTOR_START {
        Some(prev) => prev(query, eflags),
        None => pg_sys::standard_ExecutorStart(query, eflags),
    }
}

fn recheck_context() {
    let Some(ctx) = context::current() else { return };
    // Forwarded by a Citus coordinator, which re-checks it there.
    if context::forwarded().is_some() {
        return;
    }
    // A backup reads whatever the tenant's status (its restore sets it last).
    if ctx.source == context::Source::Backup {
        return;
    }
    let refused = match lookup_tenant_id(ctx.tenant) {
        None => Some("its tenant no longer exists".to_string()),
        Some(t) => match t.access() {
            Access::Refused(why) => Some(why),
            // A context for a user lasts as long as the membership.
            Access::Full | Access::ReadOnly => ctx.user.and_then(|u| {
                crate::members::membership(ctx.tenant, u)
                    .is_none()
                    .then(|| format!("user {u} is no longer a member of tenant \"{}\"", t.slug))
            }),
        },
    };
    if let Some(why) = refused {
        context::clear();
        ereport!(WARNING, PgSqlErrorCode::ERRCODE_WARNING, format!("levqor: tenant context cleared: {why}"));
    }
}

/// May the context's tenant write now? Raises if not. `grows` is true for
/// INSERT and UPDATE, which a tenant over its storage limit may not run.
fn check_write(ctx: &context::Context, grows: bool) {
    if let Some(f) = context::forwarded() {
        return check_forwarded_write(f, grows);
    }
    if let Some(user) = ctx.user {
        if crate::members::membership(ctx.tenant, user).is_none() {
            crate::errors::refused(format!("user {user} is no longer a member of this tenant"), None);
        }
    }
    // Viewers and auditors read; they never write.
    if let Some(role @ (context::MemberRole::Viewer | context::MemberRole::Auditor)) = crate::members::effective_role(ctx) {
        crate::errors::not_allowed(
            format!("a member with role {} may not write", role.as_str()),
            Some("Viewers and auditors only read; act with a key or token for an operator, admin or owner."),
        );
    }
    let Some(t) = lookup_tenant_id(ctx.tenant) else {
        crate::errors::refused("the tenant of this context no longer exists", None)
    };
    match t.access() {
        Access::Full => {}
        Access::ReadOnly => crate::errors::raise(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            format!(
                "tenant \"{}\" is suspended (read only): writes are refused{}",
                t.slug,
                t.suspension_reason.map(|r| format!(" ({r})")).unwrap_or_default()
            ),
            Some("A levqor_admin can lift the suspension with levqor.resume_tenant()."),
        ),
        Access::Refused(why) => crate::errors::refused(why, None),
    }
    if grows && t.storage_exceeded {
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            format!("tenant \"{}\" has reached its storage limit: inserts and updates are refused", t.slug),
            Some("Delete data (then levqor.refresh_storage() measures again), or move to a larger plan."),
        );
    }
}

/// On a Citus worker: what the coordinator decided when it forwarded the context.
fn check_forwarded_write(f: crate::citus::Forwarded, grows: bool) {
    if let Some(role @ (context::MemberRole::Viewer | context::MemberRole::Auditor)) = f.role {
        crate::errors::not_allowed(format!("a member with role {} may not write", role.as_str()), None);
    }
    if f.read_only {
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            "the tenant of this context is suspended (read only): writes are refused",
            Some("A levqor_admin can lift the suspension with levqor.resume_tenant()."),
        );
    }
    if grows && f.storage_exceeded {
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            "the tenant of this context has reached its storage limit: inserts and updates are refused",
            None,
        );
    }
}

fn grows(trigger: &pgrx::PgTrigger<'_>) -> Result<bool, pgrx::PgTriggerError> {
    Ok(matches!(trigger.op()?, pgrx::PgTriggerOperation::Insert | pgrx::PgTriggerOperation::Update))
}

/// BEFORE INSERT OR UPDATE OR DELETE, once per statement, on protected tables.
#[pg_trigger]
fn _write_guard<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
    // No context: the policies already refuse (or match nothing).
    if let Some(ctx) = context::current() {
        check_write(&ctx, grows(trigger)?);
    }
    Ok(None)
}

/// BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE, once per statement, on the
/// tables of a tenant's schema; the trigger's argument is the owning tenant.
/// Row level security already hides other schemas' rows; this also stops
/// TRUNCATE (which ignores it) and writes while suspended.
#[pg_trigger]
fn _schema_guard<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
    let owner = trigger
        .extra_args()?
        .first()
        .and_then(|a| uuid::Uuid::parse_str(a).ok())
        .unwrap_or_else(|| crate::errors::refused("levqor_schema_guard has no tenant argument", None));
    match context::current() {
        // Maintenance by a role that bypasses row level security (migrations).
        None if unsafe { pg_sys::has_bypassrls_privilege(pg_sys::GetUserId()) } => {}
        None => crate::errors::not_allowed(
            format!("no levqor tenant context for a write to {}", trigger.table_name()?),
            Some("Call levqor.authenticate() in this transaction first."),
        ),
        Some(ctx) if ctx.tenant != owner => crate::errors::not_allowed(
            format!("{}.{} belongs to another tenant's schema", trigger.table_schema()?, trigger.table_name()?),
            None,
        ),
        Some(ctx) => check_write(&ctx, grows(trigger)?),
    }
    Ok(None)
}

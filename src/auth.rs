//! The three ways to establish a tenant context: an API key, a trusted
//! server's `set_tenant`, and a signed token. Each one checks everything first
//! and writes the context last, so a refusal leaves no context behind.

use std::cell::RefCell;

use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::PgBuiltInOids;
use uuid::Uuid;

use crate::cache::{self, KeyRow, TenantRow};
use crate::context::{self, from_uuid, to_uuid, Context, MemberRole, Source};
use crate::privilege::{as_catalog_owner, current_role_has};
use crate::{errors, keys, token};

const KEY_SQL: &str = "
    SELECT k.tenant_id, k.key_hash, k.role, k.user_id, k.revoked_at IS NOT NULL, k.expires_at,
           'levqor.tenants'::regclass::oid, 'levqor.tenant_keys'::regclass::oid
      FROM levqor.tenant_keys k
     WHERE k.key_id = $1";

/// One tenant row by a condition on $1, with the catalog's oids for the cache.
macro_rules! tenant_sql {
    ($condition:literal) => {
        concat!(
            "SELECT id, slug, status, suspension_mode, suspension_reason, trial_ends_at,
                    'levqor.tenants'::regclass::oid, 'levqor.tenant_keys'::regclass::oid, schema_name::text,
                    storage_exceeded
               FROM levqor.tenants WHERE ",
            $condition
        )
    };
}
const TENANT_BY_ID_SQL: &str = tenant_sql!("id = $1");
const TENANT_BY_SLUG_SQL: &str = tenant_sql!("slug = $1");

thread_local! {
    /// Plans are prepared once per backend under the pinned search_path and
    /// kept; PostgreSQL's plan cache re-plans them after DDL.
    static PLANS: RefCell<Vec<(&'static str, OwnedPreparedStatement)>> = const { RefCell::new(Vec::new()) };
}

thread_local! {
    /// Catalog lookups under way: their own queries must not start another
    /// (the ExecutorStart hook's context re-check waits for the next query).
    static LOOKUPS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

pub fn in_lookup() -> bool {
    LOOKUPS.with(|l| l.get() > 0)
}

struct Lookup;

impl Lookup {
    fn start() -> Lookup {
        LOOKUPS.with(|l| l.set(l.get() + 1));
        Lookup
    }
}

impl Drop for Lookup {
    fn drop(&mut self) {
        LOOKUPS.with(|l| l.set(l.get() - 1));
    }
}

fn run<R>(
    client: &SpiClient<'_>,
    sql: &'static str,
    arg_type: PgBuiltInOids,
    args: &[pgrx::datum::DatumWithOid<'_>],
    read: impl FnOnce(pgrx::spi::SpiTupleTable<'_>) -> R,
) -> R {
    let _lookup = Lookup::start();
    PLANS.with(|plans| {
        let mut plans = plans.borrow_mut();
        let idx = match plans.iter().position(|(s, _)| std::ptr::eq(*s, sql)) {
            Some(i) => i,
            None => {
                let stmt = client
                    .prepare(sql, &[pgrx::pg_sys::PgOid::BuiltIn(arg_type)])
                    .expect("levqor catalog query prepares")
                    .keep();
                plans.push((sql, stmt));
                plans.len() - 1
            }
        };
        let table = client.select(&plans[idx].1, Some(1), args).expect("levqor catalog query runs");
        read(table)
    })
}

fn timestamp(row: &pgrx::spi::SpiHeapTupleData<'_>, i: usize) -> Option<Option<pgrx::pg_sys::TimestampTz>> {
    Some(row.get::<pgrx::datum::TimestampWithTimeZone>(i).ok()?.map(pgrx::pg_sys::TimestampTz::from))
}

fn lookup_key(key_id: &str) -> Option<KeyRow> {
    cache::key(key_id, || {
        as_catalog_owner(|| {
            Spi::connect(|client| {
                run(&client, KEY_SQL, PgBuiltInOids::TEXTOID, &[key_id.into()], |table| {
                    let row = table.into_iter().next()?;
                    cache::remember_catalog(row.get(7).ok()??, row.get(8).ok()??);
                    Some(KeyRow {
                        tenant: to_uuid(row.get::<pgrx::Uuid>(1).ok()??),
                        hash: row.get::<Vec<u8>>(2).ok()??,
                        role: row.get::<String>(3).ok()??,
                        user: row.get::<pgrx::Uuid>(4).ok()?.map(to_uuid),
                        revoked: row.get::<bool>(5).ok()??,
                        expires_at: timestamp(&row, 6)?,
                    })
                })
            })
        })
    })
}

/// Find a tenant by uuid or slug, with the catalog owner's authority.
pub fn lookup_tenant(tenant: &str) -> Option<TenantRow> {
    cache::tenant(tenant, || {
        let by_id = Uuid::parse_str(tenant).ok();
        as_catalog_owner(|| {
            Spi::connect(|client| {
                let read = |table: pgrx::spi::SpiTupleTable<'_>| {
                    let row = table.into_iter().next()?;
                    cache::remember_catalog(row.get(7).ok()??, row.get(8).ok()??);
                    Some(TenantRow {
                        id: to_uuid(row.get::<pgrx::Uuid>(1).ok()??),
                        slug: row.get::<String>(2).ok()??,
                        status: row.get::<String>(3).ok()??,
                        suspension_mode: row.get::<String>(4).ok()?,
                        suspension_reason: row.get::<String>(5).ok()?,
                        trial_ends_at: timestamp(&row, 6)?,
                        schema: row.get::<String>(9).ok()?,
                        storage_exceeded: row.get::<bool>(10).ok()?.unwrap_or(false),
                    })
                };
                match by_id {
                    Some(id) => run(&client, TENANT_BY_ID_SQL, PgBuiltInOids::UUIDOID, &[from_uuid(id).into()], read),
                    None => run(&client, TENANT_BY_SLUG_SQL, PgBuiltInOids::TEXTOID, &[tenant.into()], read),
                }
            })
        })
    })
}

pub fn lookup_tenant_id(id: Uuid) -> Option<TenantRow> {
    lookup_tenant(&id.hyphenated().to_string())
}

/// Refuse a context for tenants that may not have one. A read-only
/// (suspended) tenant gets one: the write guard refuses its writes.
fn check_access(t: &TenantRow) {
    if let cache::Access::Refused(why) = t.access() {
        errors::refused(why, Some("A levqor_admin can see why in levqor.tenants and levqor.tenant_events."));
    }
}

/// A context for a user needs the user to be a member (crate::members).
fn check_member(t: &TenantRow, user: Option<Uuid>) {
    if let Some(u) = user {
        if crate::members::membership(t.id, u).is_none() {
            errors::refused(
                format!("user {u} is not a member of tenant \"{}\" or of any tenant above it", t.slug),
                Some("A levqor_admin adds members with levqor.add_member(); a credential for a user works only while the user is a member."),
            );
        }
    }
}

fn parse_role(role: Option<&str>) -> Option<MemberRole> {
    role.map(|r| {
        MemberRole::parse(r).unwrap_or_else(|| {
            errors::bad_argument(
                format!("unknown member role \"{}\"", r.escape_debug()),
                Some("Member roles are owner, admin, operator, auditor and viewer."),
            )
        })
    })
}

/// Verify a tenant API key and act for its tenant for the rest of the
/// transaction (or, with `session => true`, the session). Returns the tenant id.
#[pg_extern(volatile, parallel_unsafe)]
fn authenticate(api_key: Option<&str>, session: default!(bool, false)) -> pgrx::Uuid {
    crate::redact::statement(0);
    let api_key = api_key.unwrap_or("");
    let Some(key_id) = keys::key_id(api_key) else { errors::invalid_api_key() };
    let Some(row) = lookup_key(key_id) else { errors::invalid_api_key() };
    if !keys::matches(api_key, &row.hash) {
        errors::invalid_api_key();
    }
    if row.revoked {
        errors::refused(format!("API key {key_id} has been revoked"), None);
    }
    if row.expired() {
        errors::refused(
            format!("API key {key_id} has expired"),
            Some("Ask a levqor_admin for a new key (levqor.issue_key)."),
        );
    }
    let Some(t) = lookup_tenant_id(row.tenant) else { errors::invalid_api_key() };
    check_access(&t);
    check_member(&t, row.user);
    let ctx = Context {
        tenant: row.tenant,
        user: row.user,
        role: MemberRole::parse(&row.role),
        source: Source::ApiKey,
    };
    context::apply_for(&ctx, t.schema.as_deref(), session);
    from_uuid(row.tenant)
}

/// For trusted application servers that authenticate end users themselves.
/// Only roles with the privileges of `levqor_context_admin` may call it.
#[pg_extern(volatile, parallel_unsafe)]
fn set_tenant(
    tenant: &str,
    session: default!(bool, false),
    user_id: default!(Option<pgrx::Uuid>, "NULL"),
    member_role: default!(Option<&str>, "NULL"),
) -> pgrx::Uuid {
    if !current_role_has("levqor_context_admin") {
        errors::not_allowed(
            "permission denied to set the levqor tenant context",
            Some("Only members of levqor_context_admin may call levqor.set_tenant(); applications use levqor.authenticate(api_key)."),
        );
    }
    let role = parse_role(member_role);
    let Some(t) = lookup_tenant(tenant) else { errors::unknown_tenant(tenant) };
    check_access(&t);
    check_member(&t, user_id.map(to_uuid));
    let ctx = Context { tenant: t.id, user: user_id.map(to_uuid), role, source: Source::SetTenant };
    context::apply_for(&ctx, t.schema.as_deref(), session);
    from_uuid(t.id)
}

/// For levqor_backup only (the sidecar's backups and restores): act for
/// `tenant` for the rest of this transaction, so that reading or writing its
/// rows goes through row level security like any of its own sessions. Never
/// session-scoped; no user and no member role.
#[pg_extern(volatile, parallel_unsafe)]
fn backup_context(tenant: &str, restore: default!(bool, false)) -> pgrx::Uuid {
    if !current_role_has("levqor_backup") {
        errors::not_allowed(
            "permission denied to set a backup's tenant context",
            Some("Only members of levqor_backup (the sidecar's backup role) may call levqor.backup_context()."),
        );
    }
    let Some(t) = lookup_tenant(tenant) else { errors::unknown_tenant(tenant) };
    // Whatever its status: an offboarded or suspended tenant's rows are
    // backed up too (and a restore makes it active while its rows come back).
    let ctx = Context { tenant: t.id, user: None, role: None, source: Source::Backup };
    if restore {
        // The rows that come back were audited and counted when first
        // written; the restore itself is one audited event (restore_finish).
        crate::privilege::restoring_in_this_transaction();
    }
    context::apply_for(&ctx, t.schema.as_deref(), false);
    from_uuid(t.id)
}

/// Act for the tenant named in a signed token (see `levqor.token_secret`).
#[pg_extern(volatile, parallel_unsafe)]
fn set_tenant_token(token: Option<&str>, session: default!(bool, false)) -> pgrx::Uuid {
    crate::redact::statement(0);
    let Some(secret) = token::secret() else {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "levqor.token_secret is not set (or shorter than 32 bytes)",
            Some("A superuser sets it with ALTER SYSTEM SET levqor.token_secret = '…'; SELECT pg_reload_conf();"),
        )
    };
    let claims = match token::verify(token.unwrap_or(""), &secret, token::now_unix()) {
        Ok(c) => c,
        Err(reason) => errors::refused(format!("invalid levqor token: {reason}"), None),
    };
    let user = match claims.sub.as_deref() {
        None => None,
        Some(s) => Some(Uuid::parse_str(s).unwrap_or_else(|_| {
            errors::refused("invalid levqor token: sub must be a uuid", None)
        })),
    };
    let role = claims.member_role.as_deref().map(|r| {
        MemberRole::parse(r).unwrap_or_else(|| errors::refused("invalid levqor token: unknown member_role", None))
    });
    let Some(t) = lookup_tenant(&claims.tenant) else {
        errors::refused("invalid levqor token: unknown tenant", None)
    };
    check_access(&t);
    check_member(&t, user);
    let ctx = Context { tenant: t.id, user, role, source: Source::Token };
    context::apply_for(&ctx, t.schema.as_deref(), session);
    from_uuid(t.id)
}

/// Mint a token for `set_tenant_token`. Whoever can mint tokens can act for
/// any tenant, so this takes `levqor_context_admin` like `set_tenant`.
#[pg_extern(volatile, parallel_unsafe)]
fn sign_token(
    tenant: &str,
    user_id: default!(Option<pgrx::Uuid>, "NULL"),
    member_role: default!(Option<&str>, "NULL"),
    ttl: default!(pgrx::datum::Interval, "'15 minutes'"),
) -> String {
    if !current_role_has("levqor_context_admin") {
        errors::not_allowed(
            "permission denied to sign levqor tokens",
            Some("Only members of levqor_context_admin may call levqor.sign_token()."),
        );
    }
    let Some(secret) = token::secret() else {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "levqor.token_secret is not set (or shorter than 32 bytes)",
            None,
        )
    };
    let micros = ttl.as_micros();
    if micros <= 0 || micros > 86_400 * 1_000_000 {
        errors::bad_argument("ttl must be positive and at most 24 hours", None);
    }
    parse_role(member_role);
    let Some(t) = lookup_tenant(tenant) else { errors::unknown_tenant(tenant) };
    let now = token::now_unix();
    let claims = token::Claims {
        tenant: t.id.hyphenated().to_string(),
        sub: user_id.map(|u| to_uuid(u).hyphenated().to_string()),
        member_role: member_role.map(str::to_owned),
        exp: now + (micros / 1_000_000).max(1) as i64,
        nbf: None,
        iat: Some(now),
    };
    token::sign(&claims, &secret)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn new_tenant(slug: &str) -> (pgrx::Uuid, String) {
        Spi::get_two::<pgrx::Uuid, String>(&format!(
            "SELECT tenant_id, api_key FROM levqor.create_tenant('{slug}', 'Test {slug}')"
        ))
        .map(|(a, b)| (a.unwrap(), b.unwrap()))
        .unwrap()
    }

    #[pg_test]
    fn authenticate_sets_the_context_for_the_transaction() {
        let (id, key) = new_tenant("unit-auth");
        let got = Spi::get_one_with_args::<pgrx::Uuid>("SELECT levqor.authenticate($1)", &[key.as_str().into()]).unwrap();
        assert_eq!(got, Some(id));
        assert_eq!(Spi::get_one::<pgrx::Uuid>("SELECT levqor.current_tenant()").unwrap(), Some(id));
        assert_eq!(Spi::get_one::<&str>("SELECT levqor.current_member_role()").unwrap(), Some("admin"));
        assert_eq!(Spi::get_one::<&str>("SELECT source FROM levqor.context_info()").unwrap(), Some("api_key"));
        Spi::run("SELECT levqor.clear_tenant()").unwrap();
        assert_eq!(Spi::get_one::<pgrx::Uuid>("SELECT levqor.current_tenant()").unwrap(), None);
    }

    #[pg_test(error = "invalid levqor API key")]
    fn a_wrong_secret_is_refused() {
        let (_, key) = new_tenant("unit-wrong");
        let wrong = format!("{}{}", &key[..key.len() - 1], if key.ends_with('x') { 'y' } else { 'x' });
        Spi::get_one_with_args::<pgrx::Uuid>("SELECT levqor.authenticate($1)", &[wrong.as_str().into()]).unwrap();
    }

    #[pg_test]
    fn set_tenant_accepts_slug_or_id_and_carries_user_and_role() {
        let (id, _) = new_tenant("unit-set");
        let user = "6f1c1a4e-0000-4000-8000-000000000001";
        Spi::run(&format!("SELECT levqor.add_member('unit-set', '{user}', 'admin')")).unwrap();
        Spi::run(&format!("SELECT levqor.set_tenant('unit-set', user_id => '{user}', member_role => 'viewer')")).unwrap();
        assert_eq!(Spi::get_one::<pgrx::Uuid>("SELECT levqor.current_tenant()").unwrap(), Some(id));
        assert_eq!(
            Spi::get_one::<String>("SELECT levqor.current_user_id()::text").unwrap().as_deref(),
            Some(user)
        );
        assert_eq!(Spi::get_one::<&str>("SELECT levqor.current_member_role()").unwrap(), Some("viewer"));
        Spi::run(&format!("SELECT levqor.set_tenant('{id}')")).unwrap();
        assert_eq!(Spi::get_one::<&str>("SELECT levqor.current_member_role()").unwrap(), None);
    }

    #[pg_test]
    fn a_signed_token_round_trips() {
        let (id, _) = new_tenant("unit-token");
        let token = Spi::get_one::<String>("SELECT levqor.sign_token('unit-token', member_role => 'operator')")
            .unwrap()
            .unwrap();
        let got = Spi::get_one_with_args::<pgrx::Uuid>("SELECT levqor.set_tenant_token($1)", &[token.as_str().into()]).unwrap();
        assert_eq!(got, Some(id));
        assert_eq!(Spi::get_one::<&str>("SELECT source FROM levqor.context_info()").unwrap(), Some("token"));
    }

    #[pg_test(error = "tenant \"unit-off\" is offboarded")]
    fn offboarded_tenants_get_no_context() {
        new_tenant("unit-off");
        Spi::run("UPDATE levqor.tenants SET status = 'offboarded' WHERE slug = 'unit-off'").unwrap();
        Spi::run("SELECT levqor.set_tenant('unit-off')").unwrap();
    }
}

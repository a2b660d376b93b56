//! The tenant context: which tenant (and which member) the current
//! transaction or session acts for.
//!
//! The context lives in the GUC `levqor.context`. A GUC, because PostgreSQL
//! already does everything a context needs with one: `SET LOCAL` semantics end
//! it with the transaction (safe behind PgBouncer transaction pooling),
//! subtransaction rollback undoes it, `DISCARD ALL` resets it, and parallel
//! query copies it into every worker. What a plain GUC lacks is protection,
//! so this one is:
//!
//! * `PGC_SUSET`: `SET`, `set_config()`, `RESET`, `ALTER ROLE … SET` and
//!   connection options are refused to ordinary roles by PostgreSQL itself;
//! * guarded by a check hook that refuses every value not written by levqor's
//!   own functions (even a superuser's `SET`), except the copy a parallel
//!   worker receives from its leader. A placeholder set before the library
//!   loaded is re-applied through that same hook and dropped.
//!
//! An assign hook parses the value once into backend-local memory, so the
//! policy helper `current_tenant()` is a load from a thread-local.

use std::cell::Cell;
use std::ffi::{c_char, c_void, CStr, CString};

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::prelude::*;
use uuid::Uuid;

use crate::guc;


pub const GUC_NAME: &CStr = c"levqor.context";

static CONTEXT_GUC: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// A member role, as carried by keys, tokens and `set_tenant`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberRole {
    Owner,
    Admin,
    Operator,
    Auditor,
    Viewer,
}

impl MemberRole {
    pub const ALL: [MemberRole; 5] = [
        MemberRole::Owner,
        MemberRole::Admin,
        MemberRole::Operator,
        MemberRole::Auditor,
        MemberRole::Viewer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MemberRole::Owner => "owner",
            MemberRole::Admin => "admin",
            MemberRole::Operator => "operator",
            MemberRole::Auditor => "auditor",
            MemberRole::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<MemberRole> {
        MemberRole::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// How the context was established; kept for diagnostics (`levqor.context_info()`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    ApiKey,
    SetTenant,
    Token,
    /// levqor.backup_context(): a backup or restore transaction.
    Backup,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::ApiKey => "api_key",
            Source::SetTenant => "set_tenant",
            Source::Token => "token",
            Source::Backup => "backup",
        }
    }
    pub fn parse(s: &str) -> Option<Source> {
        [Source::ApiKey, Source::SetTenant, Source::Token, Source::Backup]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    pub tenant: Uuid,
    pub user: Option<Uuid>,
    pub role: Option<MemberRole>,
    pub source: Source,
}

impl Context {
    /// `v1 <tenant> <user|-> <role|-> <source>`: fixed, space separated, no
    /// user text, so parsing cannot be confused.
    fn encode(&self) -> String {
        format!(
            "v1 {} {} {} {}",
            self.tenant.hyphenated(),
            self.user.map(|u| u.hyphenated().to_string()).unwrap_or_else(|| "-".into()),
            self.role.map(MemberRole::as_str).unwrap_or("-"),
            self.source.as_str()
        )
    }

    fn decode(s: &str) -> Option<Context> {
        let mut it = s.split(' ');
        if it.next()? != "v1" {
            return None;
        }
        let tenant = Uuid::parse_str(it.next()?).ok()?;
        let user = match it.next()? {
            "-" => None,
            u => Some(Uuid::parse_str(u).ok()?),
        };
        let role = match it.next()? {
            "-" => None,
            r => Some(MemberRole::parse(r)?),
        };
        let source = Source::parse(it.next()?)?;
        if it.next().is_some() {
            return None;
        }
        Some(Context { tenant, user, role, source })
    }
}

thread_local! {
    /// The parsed value of `levqor.context`; written only by the assign hook.
    static CURRENT: Cell<Option<Context>> = const { Cell::new(None) };
    /// True only while levqor itself writes `levqor.context`.
    static WRITING: Cell<bool> = const { Cell::new(false) };
    /// Whether this session was already told that its context ends with the statement.
    static NOTICED: Cell<bool> = const { Cell::new(false) };
    /// Whether a session-scoped context set search_path (to undo on clear).
    static SESSION_PATH: Cell<bool> = const { Cell::new(false) };
}

/// The context this transaction acts for: levqor.context, or on a Citus
/// worker the context its coordinator forwarded (crate::citus).
pub fn current() -> Option<Context> {
    CURRENT.with(Cell::get).or_else(|| crate::citus::forwarded().map(|(c, _)| c))
}

/// What the coordinator decided for a forwarded context (None for a context
/// made here): a worker cannot look the tenant up.
pub fn forwarded() -> Option<crate::citus::Forwarded> {
    match CURRENT.with(Cell::get) {
        Some(_) => None,
        None => crate::citus::forwarded().map(|(_, f)| f),
    }
}

pub fn init() {
    // SAFETY: the hooks below never raise errors or panic.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            GUC_NAME,
            c"levqor tenant context (set only by levqor.authenticate, set_tenant, set_tenant_token)",
            c"Cannot be set with SET or set_config(); see the levqor documentation.",
            &CONTEXT_GUC,
            GucContext::Suset,
            GucFlags::NO_SHOW_ALL | GucFlags::DISALLOW_IN_FILE,
            Some(check_context),
            Some(assign_context),
            None,
        );
    }
}

unsafe extern "C-unwind" fn check_context(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    let value = *newval;
    // Clearing never grants anything.
    if value.is_null() || *value == 0 {
        return true;
    }
    // A parallel worker receives the leader's value while it starts.
    if pg_sys::InitializingParallelWorker {
        return true;
    }
    if WRITING.with(Cell::get) {
        return true;
    }
    pg_sys::GUC_check_errcode(PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE as i32);
    pg_sys::GUC_check_errmsg_string = pg_sys::pstrdup(
        c"levqor.context can only be set by levqor.authenticate(), levqor.set_tenant() or levqor.set_tenant_token()".as_ptr(),
    );
    false
}

unsafe extern "C-unwind" fn assign_context(newval: *const c_char, _extra: *mut c_void) {
    let parsed = if newval.is_null() {
        None
    } else {
        CStr::from_ptr(newval).to_str().ok().and_then(Context::decode)
    };
    let before = CURRENT.with(|c| c.replace(parsed));
    if before.map(|c| c.tenant) != parsed.map(|c| c.tenant) {
        crate::citus::tenant_changed(parsed.map(|c| c.tenant));
    }
}

/// Set (or with `None`, clear) the context for the transaction or the session.
pub fn apply(ctx: Option<&Context>, session: bool) {
    if ctx.is_some() {
        crate::pooling::check_scope(session);
    }
    let value = CString::new(ctx.map(Context::encode).unwrap_or_default()).expect("no NUL");
    struct Writing;
    impl Drop for Writing {
        fn drop(&mut self) {
            WRITING.with(|w| w.set(false));
        }
    }
    WRITING.with(|w| w.set(true));
    let _reset = Writing;
    // With superuser authority: levqor may set this superuser-only parameter;
    // an ordinary role never can.
    guc::set(GUC_NAME, Some(&value), guc::Scope::of_session(session), true);
    drop(_reset);
    crate::citus::forward(ctx, session);
    if session {
        crate::pooling::note_session_context(ctx.is_some());
    }
    if ctx.is_some() && !session && unsafe { !pg_sys::IsTransactionBlock() } && !NOTICED.with(|n| n.replace(true)) {
        // Once per session: a hint for people at psql, not noise in loops.
        ereport!(
            NOTICE,
            PgSqlErrorCode::ERRCODE_WARNING,
            "levqor: tenant context set for this statement's transaction only",
            "Run it inside BEGIN … COMMIT, or pass session => true to keep it for the session."
        );
    }
}

/// Set the context and, for a schema-isolation tenant, point search_path at
/// its schema (then public), for the same scope.
pub fn apply_for(ctx: &Context, schema: Option<&str>, session: bool) {
    apply(Some(ctx), session);
    if let Some(schema) = schema {
        let quoted = pgrx::spi::quote_identifier(schema);
        let path = CString::new(format!("{quoted}, public")).expect("identifiers have no NUL");
        guc::set(c"search_path", Some(&path), guc::Scope::of_session(session), false);
        if session {
            SESSION_PATH.with(|p| p.set(true));
        }
    }
}

/// Clear the context for the session and the transaction, and undo a
/// search_path a session-scoped schema context had set.
pub fn clear() {
    apply(None, true);
    if SESSION_PATH.with(|p| p.replace(false)) {
        guc::set(c"search_path", None, guc::Scope::Session, false);
    }
}

/// Between the `uuid` crate's type (the context) and pgrx's (SQL values).
pub fn to_uuid(u: pgrx::Uuid) -> Uuid {
    Uuid::from_bytes(*u.as_bytes())
}

pub fn from_uuid(u: Uuid) -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(*u.as_bytes())
}

/// The tenant the current transaction acts for; NULL when there is none, so
/// that `tenant_id = levqor.current_tenant()` matches no row (fail closed).
#[pg_extern(stable, parallel_safe)]
fn current_tenant() -> Option<pgrx::Uuid> {
    current().map(|c| from_uuid(c.tenant))
}

/// The end user the context carries (from a key bound to a user, a token's
/// `sub`, or `set_tenant(..., user_id => ...)`).
#[pg_extern(stable, parallel_safe)]
fn current_user_id() -> Option<pgrx::Uuid> {
    current().and_then(|c| c.user).map(from_uuid)
}

/// The member role the context acts with: owner, admin, operator, auditor or
/// viewer. For a context that names a user, levqor.members decides it (the
/// credential may only narrow it: crate::members).
#[pg_extern(stable, parallel_safe)]
fn current_member_role() -> Option<&'static str> {
    current().and_then(|c| crate::members::effective_role(&c)).map(MemberRole::as_str)
}

/// Everything about the current context as one row, for humans and tests.
#[pg_extern(stable, parallel_safe)]
fn context_info() -> TableIterator<
    'static,
    (
        name!(tenant_id, Option<pgrx::Uuid>),
        name!(user_id, Option<pgrx::Uuid>),
        name!(member_role, Option<&'static str>),
        name!(source, Option<&'static str>),
    ),
> {
    let c = current();
    TableIterator::once((
        c.map(|c| from_uuid(c.tenant)),
        c.and_then(|c| c.user).map(from_uuid),
        c.and_then(|c| crate::members::effective_role(&c)).map(MemberRole::as_str),
        c.map(|c| c.source.as_str()),
    ))
}

/// Drop the context, for the session and the transaction alike.
#[pg_extern(volatile, parallel_unsafe)]
fn clear_tenant() {
    clear();
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn encode_decode_roundtrip() {
        let c = Context {
            tenant: Uuid::from_u128(0x1234),
            user: Some(Uuid::from_u128(0x99)),
            role: Some(MemberRole::Auditor),
            source: Source::Token,
        };
        assert_eq!(Context::decode(&c.encode()), Some(c));
        assert_eq!(Context::decode("v1 not-a-uuid - - api_key"), None);
        assert_eq!(Context::decode(&(c.encode() + " extra")), None);
        assert_eq!(Context::decode(""), None);
    }

    #[pg_test]
    fn no_context_means_null() {
        assert_eq!(Spi::get_one::<pgrx::Uuid>("SELECT levqor.current_tenant()").unwrap(), None);
    }

    #[pg_test(
        error = "levqor.context can only be set by levqor.authenticate(), levqor.set_tenant() or levqor.set_tenant_token()"
    )]
    fn superuser_set_is_refused_too() {
        Spi::run("SET levqor.context = 'v1 00000000-0000-0000-0000-000000000001 - - api_key'").unwrap();
    }
}


//! `levqor.transaction_pooling`: this server's connections are shared by
//! clients in turn (PgBouncer in transaction or statement mode, PgCat,
//! Supavisor), so nothing that outlives a transaction may carry a tenant's
//! context or rows into the next client's transaction (docs/context.md,
//! "Behind a connection pooler").
//!
//! With it on, levqor refuses what would survive the transaction:
//! * session-scoped contexts (`session => true`), and clears one made before
//!   the setting was switched on, at the next statement;
//! * `DECLARE … WITH HOLD` while a tenant context is set: the cursor's rows
//!   stay readable by whoever gets the connection next;
//! * temporary tables made while a tenant context is set, unless `ON COMMIT
//!   DROP`: they live as long as the server connection.

use std::cell::Cell;

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::context;

static TRANSACTION_POOLING: GucSetting<bool> = GucSetting::<bool>::new(false);

thread_local! {
    /// A session-scoped context was set (and not cleared by levqor since).
    static SESSION_CONTEXT: Cell<bool> = const { Cell::new(false) };
}

pub fn init() {
    GucRegistry::define_bool_guc(
        c"levqor.transaction_pooling",
        c"Connections are shared by clients in turn (a transaction pooler): refuse what outlives a transaction",
        c"Refuses session-scoped tenant contexts, WITH HOLD cursors and lasting temporary tables under a tenant context.",
        &TRANSACTION_POOLING,
        GucContext::Suset,
        GucFlags::default(),
    );
}

pub fn on() -> bool {
    TRANSACTION_POOLING.get()
}

fn refuse(what: &str) -> ! {
    crate::errors::raise(
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        format!("{what} is refused: levqor.transaction_pooling is on, and the next client on this connection would inherit it"),
        Some("Behind a transaction pooler, set the tenant context per transaction (the default) and keep rows inside it."),
    )
}

/// Called before a context is set.
pub fn check_scope(session: bool) {
    if session && on() {
        refuse("a session-scoped tenant context");
    }
}

/// Called after a context is set or cleared for the session.
pub fn note_session_context(set: bool) {
    SESSION_CONTEXT.with(|s| s.set(set));
}

/// At the start of each query (ExecutorStart): a session context made before
/// the setting was switched on does not survive it.
pub fn recheck() {
    if on() && SESSION_CONTEXT.with(Cell::get) && context::current().is_some() {
        context::clear();
        ereport!(
            WARNING,
            PgSqlErrorCode::ERRCODE_WARNING,
            "levqor: session-scoped tenant context cleared: levqor.transaction_pooling is on"
        );
    }
}

/// Utility statements that would outlive the transaction under a tenant
/// context (from the ProcessUtility hook).
pub unsafe fn check_utility(stmt: *mut pg_sys::Node) {
    if stmt.is_null() || !on() || context::current().is_none() {
        return;
    }
    let temp_lasting = |rel: *mut pg_sys::RangeVar, on_commit: pg_sys::OnCommitAction::Type| {
        !rel.is_null()
            && (*rel).relpersistence as u8 == pg_sys::RELPERSISTENCE_TEMP
            && on_commit != pg_sys::OnCommitAction::ONCOMMIT_DROP
    };
    match (*stmt).type_ {
        pg_sys::NodeTag::T_DeclareCursorStmt => {
            let d = &*(stmt as *mut pg_sys::DeclareCursorStmt);
            if d.options & pg_sys::CURSOR_OPT_HOLD as i32 != 0 {
                refuse("a WITH HOLD cursor under a tenant context");
            }
        }
        pg_sys::NodeTag::T_CreateStmt => {
            let c = &*(stmt as *mut pg_sys::CreateStmt);
            if temp_lasting(c.relation, c.oncommit) {
                refuse("a temporary table without ON COMMIT DROP under a tenant context");
            }
        }
        pg_sys::NodeTag::T_CreateTableAsStmt => {
            let c = &*(stmt as *mut pg_sys::CreateTableAsStmt);
            if !c.into.is_null() && temp_lasting((*c.into).rel, (*c.into).onCommit) {
                refuse("a temporary table without ON COMMIT DROP under a tenant context");
            }
        }
        _ => {}
    }
}

//! Setting a PostgreSQL setting from levqor's own code, the one way levqor
//! does it (the tenant context, and search_path for schema tenants).

use std::ffi::CStr;

use pgrx::pg_sys;

/// How long a value lasts.
#[derive(Clone, Copy)]
pub enum Scope {
    /// Until the end of the transaction (`SET LOCAL`).
    Transaction,
    /// Until changed or reset (`SET`).
    Session,
}

impl Scope {
    pub fn of_session(session: bool) -> Scope {
        if session {
            Scope::Session
        } else {
            Scope::Transaction
        }
    }
}

/// Set `name` to `value` (None resets it). `superuser` acts with the
/// authority to set a superuser-only parameter; errors are raised as ERROR.
pub fn set(name: &CStr, value: Option<&CStr>, scope: Scope, superuser: bool) {
    let action = match scope {
        Scope::Transaction => pg_sys::GucAction::GUC_ACTION_LOCAL,
        Scope::Session => pg_sys::GucAction::GUC_ACTION_SET,
    };
    let context = if superuser {
        pg_sys::GucContext::PGC_SUSET
    } else {
        pg_sys::GucContext::PGC_USERSET
    };
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.map_or(std::ptr::null(), CStr::as_ptr),
            context,
            pg_sys::GucSource::PGC_S_SESSION,
            action,
            true,
            pg_sys::PGERROR as i32,
            false,
        );
    }
}

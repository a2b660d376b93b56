//! Every refusal levqor raises from Rust, in one place, so that messages and
//! SQLSTATEs stay stable (docs/errors.md lists them).

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

pub fn raise(code: PgSqlErrorCode, message: impl Into<String>, hint: Option<&str>) -> ! {
    raise_with_detail(code, message, None, hint)
}

pub fn raise_with_detail(code: PgSqlErrorCode, message: impl Into<String>, detail: Option<String>, hint: Option<&str>) -> ! {
    let mut report = ErrorReport::new(code, message.into(), "levqor");
    if let Some(d) = detail {
        report = report.set_detail(d);
    }
    if let Some(h) = hint {
        report = report.set_hint(h);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// 28P01: the key is not a levqor key, or no such key, or wrong secret. One
/// message for all three so a caller learns nothing about which it was.
pub fn invalid_api_key() -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INVALID_PASSWORD,
        "invalid levqor API key",
        Some("API keys look like lvq_<16 hex>_<43 base64url>; they are shown once, when issued."),
    )
}

/// 28000: a known, correctly presented credential that may not be used now.
pub fn refused(message: impl Into<String>, hint: Option<&str>) -> ! {
    raise(PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION, message, hint)
}

/// 42501: the calling role lacks a levqor role.
pub fn not_allowed(message: impl Into<String>, hint: Option<&str>) -> ! {
    raise(PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE, message, hint)
}

/// 42704: no tenant with that id or slug.
pub fn unknown_tenant(tenant: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        format!("tenant \"{}\" does not exist", tenant.escape_debug()),
        None,
    )
}

/// 22023: a bad argument.
pub fn bad_argument(message: impl Into<String>, hint: Option<&str>) -> ! {
    raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message, hint)
}

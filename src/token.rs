//! Signed context tokens for PostgREST-style stacks: a compact JWS (JWT) with
//! HS256, whose secret lives in the superuser-only setting
//! `levqor.token_secret`.
//!
//! Claims: `tenant` (uuid or slug), `sub` (user uuid, optional),
//! `member_role` (optional), `exp` (required, seconds since the epoch),
//! `nbf` and `iat` (optional). Other claims, such as PostgREST's `role`, are
//! ignored, so one token can serve both. Only HS256 is accepted; `alg: none`
//! and every other algorithm are refused before anything else is read.

use std::ffi::{c_char, c_void, CString};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

static TOKEN_SECRET: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

pub const MIN_SECRET_LEN: usize = 32;
const MAX_TOKEN_LEN: usize = 8192;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_role: Option<String>,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
}

pub fn init() {
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"levqor.token_secret",
            c"HMAC-SHA256 secret for levqor.set_tenant_token() (at least 32 bytes)",
            c"Superuser-only. Set it in postgresql.conf or with ALTER SYSTEM.",
            &TOKEN_SECRET,
            GucContext::Suset,
            GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
            Some(check_secret),
            None,
            None,
        );
    }
}


/// Only superusers (or the server's configuration) may set the secret. PostgreSQL
/// already refuses `SET` to others; this also catches a placeholder an
/// ordinary role set before the library was loaded.
unsafe extern "C-unwind" fn check_secret(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    let value = *newval;
    if value.is_null() || *value == 0 || pg_sys::InitializingParallelWorker {
        return true;
    }
    if source >= pg_sys::GucSource::PGC_S_CLIENT && !pg_sys::superuser() {
        pg_sys::GUC_check_errcode(PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE as i32);
        pg_sys::GUC_check_errmsg_string =
            pg_sys::pstrdup(c"only a superuser may set levqor.token_secret".as_ptr());
        return false;
    }
    true
}

pub fn secret() -> Option<Vec<u8>> {
    TOKEN_SECRET
        .get()
        .map(|s| s.into_bytes())
        .filter(|s| s.len() >= MIN_SECRET_LEN)
}

pub fn mac(secret: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length")
}

pub fn sign(claims: &Claims, secret: &[u8]) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialize"));
    let signing_input = format!("{header}.{payload}");
    let mut m = mac(secret);
    m.update(signing_input.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(m.finalize().into_bytes());
    format!("{signing_input}.{sig}")
}

/// Verify signature, algorithm and time window. The error is a short reason
/// for the message; it never contains the token.
pub fn verify(token: &str, secret: &[u8], now: i64) -> Result<Claims, &'static str> {
    if token.len() > MAX_TOKEN_LEN {
        return Err("token too long");
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a compact JWS (header.payload.signature)");
    };
    let header: Header = URL_SAFE_NO_PAD
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("malformed header")?;
    if header.alg != "HS256" {
        return Err("unsupported algorithm (only HS256 is accepted)");
    }
    if header.typ.as_deref().is_some_and(|t| !t.eq_ignore_ascii_case("JWT")) {
        return Err("unsupported token type");
    }
    let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| "malformed signature")?;
    let mut m = mac(secret);
    m.update(h.as_bytes());
    m.update(b".");
    m.update(p.as_bytes());
    m.verify_slice(&sig).map_err(|_| "bad signature")?;
    let claims: Claims = URL_SAFE_NO_PAD
        .decode(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("malformed claims (tenant and exp are required)")?;
    if now >= claims.exp {
        return Err("token expired");
    }
    if claims.nbf.is_some_and(|nbf| now < nbf) {
        return Err("token not yet valid");
    }
    Ok(claims)
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn claims(exp: i64) -> Claims {
        Claims {
            tenant: "acme".into(),
            sub: None,
            member_role: Some("viewer".into()),
            exp,
            nbf: None,
            iat: None,
        }
    }

    #[pg_test]
    fn sign_then_verify() {
        let t = sign(&claims(2_000), SECRET);
        assert_eq!(verify(&t, SECRET, 1_000), Ok(claims(2_000)));
        assert_eq!(verify(&t, SECRET, 2_000), Err("token expired"));
        assert_eq!(verify(&t, b"another secret of 32 bytes......", 1_000), Err("bad signature"));
    }

    #[pg_test]
    fn tampered_and_hostile_tokens_fail() {
        let t = sign(&claims(2_000), SECRET);
        let (hp, _) = t.rsplit_once('.').unwrap();
        let (h, _) = hp.split_once('.').unwrap();
        // Payload swapped for another tenant, old signature kept.
        let forged_payload = URL_SAFE_NO_PAD.encode(br#"{"tenant":"other","exp":2000}"#);
        let sig = t.rsplit_once('.').unwrap().1;
        assert_eq!(verify(&format!("{h}.{forged_payload}.{sig}"), SECRET, 1_000), Err("bad signature"));
        // alg none, unsigned.
        let none = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        assert!(verify(&format!("{none}.{forged_payload}."), SECRET, 1_000).is_err());
        assert!(verify("", SECRET, 0).is_err());
        assert!(verify("a.b", SECRET, 0).is_err());
        assert!(verify("a.b.c.d", SECRET, 0).is_err());
        assert!(verify(&"x".repeat(10_000), SECRET, 0).is_err());
    }
}

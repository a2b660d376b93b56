//! Keys and tokens out of `pg_stat_activity`.
//!
//! PostgreSQL shows a role the query text of its own sessions, so while one
//! session runs `SELECT levqor.authenticate('lvq_…')` any other session of
//! the same application role reads the key from `pg_stat_activity.query`
//! (one SQL injection anywhere would then harvest every tenant's keys in
//! flight). levqor overwrites the secret part of anything shaped like a key,
//! and the signature and claims of a token handed to `set_tenant_token`, in
//! the statement's own text, and reports the redacted text as the session's
//! activity:
//! * right after each top-level statement is parsed (`post_parse_analyze`);
//! * when a prepared statement is planned after Bind, and when it starts to
//!   execute (`ExecutorStart`): its text is a copy made at Parse time;
//! * in `authenticate` and `set_tenant_token` themselves.
//! The same text is what error reports quote (`log_min_error_statement`).
//! What remains is documented in docs/context.md: the microseconds between
//! the server receiving a statement and parsing it, and `log_statement`,
//! which logs before parsing. Bind keys as parameters: then no statement text
//! ever holds them.

use pgrx::pg_sys;

static mut PREV_POST_PARSE_ANALYZE: pg_sys::post_parse_analyze_hook_type = None;
static mut PREV_PLANNER: pg_sys::planner_hook_type = None;

pub fn init() {
    unsafe {
        PREV_POST_PARSE_ANALYZE = pg_sys::post_parse_analyze_hook;
        pg_sys::post_parse_analyze_hook = Some(post_parse_analyze);
        PREV_PLANNER = pg_sys::planner_hook;
        pg_sys::planner_hook = Some(planner);
    }
}

/// The extended protocol keeps a copy of the statement's text, made before
/// it was parsed, and shows it from Bind on; the first planning of it
/// (right after Bind) redacts that copy, for this and every later execution.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn planner(
    parse: *mut pg_sys::Query,
    query_string: *const std::ffi::c_char,
    cursor_options: std::ffi::c_int,
    bound_params: pg_sys::ParamListInfo,
) -> *mut pg_sys::PlannedStmt {
    if !query_string.is_null() && query_string == pg_sys::debug_query_string {
        statement(if parse.is_null() { 0 } else { (*parse).queryId });
    }
    match PREV_PLANNER {
        Some(prev) => prev(parse, query_string, cursor_options, bound_params),
        None => pg_sys::standard_planner(parse, query_string, cursor_options, bound_params),
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn post_parse_analyze(
    pstate: *mut pg_sys::ParseState,
    query: *mut pg_sys::Query,
    jstate: *mut pg_sys::JumbleState,
) {
    if let Some(prev) = PREV_POST_PARSE_ANALYZE {
        prev(pstate, query, jstate);
    }
    if !pstate.is_null() && (*pstate).p_sourcetext == pg_sys::debug_query_string {
        statement(if query.is_null() { 0 } else { (*query).queryId });
    }
}

/// Redact the current top-level statement (debug_query_string) in place and
/// report it as this session's activity if anything was redacted.
pub fn statement(query_id: u64) {
    unsafe {
        let text = pg_sys::debug_query_string as *mut std::ffi::c_char;
        if scrub(text) {
            pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, text);
            if query_id != 0 {
                pg_sys::pgstat_report_query_id(query_id, true);
            }
        }
    }
}

/// From the ExecutorStart hook: a prepared statement's text is a copy made
/// when it was parsed; redacting it once covers every later execution.
pub unsafe fn executing(query: *mut pg_sys::QueryDesc) {
    if query.is_null() || (*query).sourceText.is_null() || (*query).sourceText != pg_sys::debug_query_string {
        return;
    }
    let id = if (*query).plannedstmt.is_null() { 0 } else { (*(*query).plannedstmt).queryId };
    statement(id);
}

const KEY_PREFIX: &[u8] = b"lvq_";
const KEY_ID_LEN: usize = 16;
const SECRET_LEN: usize = 43;

fn is_b64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Overwrite secrets in a NUL-terminated string in place (same length, so
/// every position PostgreSQL recorded in it stays right). Returns whether
/// anything changed.
unsafe fn scrub(text: *mut std::ffi::c_char) -> bool {
    if text.is_null() {
        return false;
    }
    let len = libc_strlen(text);
    let bytes = std::slice::from_raw_parts_mut(text as *mut u8, len);
    let mut changed = redact_keys(bytes);
    if memmem(bytes, b"set_tenant_token").is_some() {
        changed |= redact_tokens(bytes);
    }
    if memmem(bytes, NODE_CONTEXT_PREFIX).is_some() {
        changed |= redact_node_contexts(bytes);
    }
    changed
}

const NODE_CONTEXT_PREFIX: &[u8] = b"lvqn1.";

/// A context forwarded to Citus workers (crate::citus), `lvqn1.<fields>.<64 hex>`:
/// the signature becomes `*`.
fn redact_node_contexts(bytes: &mut [u8]) -> bool {
    let mut changed = false;
    let mut from = 0;
    while let Some(at) = memmem(&bytes[from..], NODE_CONTEXT_PREFIX).map(|i| i + from) {
        let mut end = at + NODE_CONTEXT_PREFIX.len();
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || matches!(bytes[end], b'.' | b'-' | b'_' | b'*')) {
            end += 1;
        }
        if end - at > 64 + NODE_CONTEXT_PREFIX.len() && bytes[end - 65] == b'.' {
            for b in &mut bytes[end - 64..end] {
                if *b != b'*' {
                    *b = b'*';
                    changed = true;
                }
            }
        }
        from = end.max(at + 1);
    }
    changed
}

unsafe fn libc_strlen(p: *const std::ffi::c_char) -> usize {
    std::ffi::CStr::from_ptr(p).to_bytes().len()
}

fn memmem(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `lvq_<16 hex>_<43 base64url>`: the 43 characters become `*`.
fn redact_keys(bytes: &mut [u8]) -> bool {
    let mut changed = false;
    let mut from = 0;
    while let Some(at) = memmem(&bytes[from..], KEY_PREFIX).map(|i| i + from) {
        let id = at + KEY_PREFIX.len();
        let secret = id + KEY_ID_LEN + 1;
        let shaped = bytes.len() >= secret + SECRET_LEN
            && bytes[id..id + KEY_ID_LEN].iter().all(|b| b.is_ascii_hexdigit())
            && bytes[id + KEY_ID_LEN] == b'_'
            && bytes[secret..secret + SECRET_LEN].iter().all(|&b| is_b64url(b) || b == b'*');
        if shaped {
            if bytes[secret..secret + SECRET_LEN].iter().any(|&b| b != b'*') {
                bytes[secret..secret + SECRET_LEN].fill(b'*');
                changed = true;
            }
            from = secret + SECRET_LEN;
        } else {
            from = id;
        }
    }
    changed
}

/// A compact JWT, `eyJ<header>.<claims>.<signature>`: claims and signature
/// become `*` (the header says only which algorithm).
fn redact_tokens(bytes: &mut [u8]) -> bool {
    let mut changed = false;
    let mut from = 0;
    while let Some(at) = memmem(&bytes[from..], b"eyJ").map(|i| i + from) {
        let mut i = at;
        let mut dots = Vec::new();
        while i < bytes.len() && (is_b64url(bytes[i]) || bytes[i] == b'.' || bytes[i] == b'*') {
            if bytes[i] == b'.' {
                dots.push(i);
            }
            i += 1;
        }
        if dots.len() == 2 && dots[0] > at + 3 {
            let rest = &mut bytes[dots[0] + 1..i];
            for b in rest.iter_mut() {
                if *b != b'.' && *b != b'*' {
                    *b = b'*';
                    changed = true;
                }
            }
        }
        from = i.max(at + 3);
    }
    changed
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn keys_and_tokens_are_redacted_in_place() {
        let key = "lvq_0123456789abcdef_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopq";
        let mut text = format!("SELECT levqor.authenticate('{key}'), 'lvq_notakey', '{key}'").into_bytes();
        let len = text.len();
        assert!(super::redact_keys(&mut text));
        let s = String::from_utf8(text).unwrap();
        assert_eq!(s.len(), len, "same length: positions stay right");
        assert!(!s.contains("ABCDEFGH") && s.contains("lvq_0123456789abcdef_****") && s.contains("'lvq_notakey'"), "{s}");
        let mut again = s.clone().into_bytes();
        assert!(!super::redact_keys(&mut again), "already redacted: nothing to do");

        let mut t = b"SELECT levqor.set_tenant_token('eyJhbGciOiJIUzI1NiJ9.eyJ0ZW5hbnQiOiJhIn0.c2lnbmF0dXJl')".to_vec();
        assert!(super::redact_tokens(&mut t));
        let t = String::from_utf8(t).unwrap();
        assert!(t.contains("eyJhbGciOiJIUzI1NiJ9.") && !t.contains("eyJ0ZW5hbnQ") && !t.contains("c2lnbmF0dXJl"), "{t}");

        let sig = "0123456789abcdef".repeat(4);
        let mut n = format!("BEGIN;SET LOCAL levqor.node_context = 'lvqn1.0000-1.-.-.api_key.-.rw.ok.617070.0.42.99.{sig}';SELECT 1").into_bytes();
        assert!(super::redact_node_contexts(&mut n));
        let n = String::from_utf8(n).unwrap();
        assert!(n.contains(".42.99.****") && !n.contains(&sig) && n.ends_with("';SELECT 1"), "{n}");
    }
}

//! Signed context tokens (set_tenant_token), attacked.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use levqor_e2e::*;

/// The secret scripts/cluster.sh writes to postgresql.conf.
const CLUSTER_SECRET: &[u8] = b"e2e-token-secret-please-change-0123456789";

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A token made outside the database, the way an attacker (or another stack) would.
pub fn jwt(header: &str, claims: &str, secret: &[u8]) -> String {
    let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
    let mut m = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    m.update(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(m.finalize().into_bytes()))
}

const HS256: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

#[test]
fn a_signed_token_sets_tenant_user_and_role() {
    let a = tenant("tok");
    let user = uuid::Uuid::new_v4();
    admin().execute("SELECT levqor.add_member($1, $2, 'admin')", &[&a.slug, &user]).unwrap();
    let token: String = server()
        .query_one("SELECT levqor.sign_token($1, $2, 'auditor', interval '5 minutes')", &[&a.slug, &user])
        .unwrap()
        .get(0);
    let mut c = app();
    let mut tx = c.transaction().unwrap();
    let row = tx
        .query_one(
            "SELECT levqor.set_tenant_token($1), levqor.current_user_id(), levqor.current_member_role()",
            &[&token],
        )
        .unwrap();
    assert_eq!(row.get::<_, uuid::Uuid>(0), a.id);
    assert_eq!(row.get::<_, Option<uuid::Uuid>>(1), Some(user));
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("auditor"));
    tx.commit().unwrap();
    assert!(current_tenant(&mut c).is_none(), "transaction-scoped by default");

    // A token minted elsewhere with the same secret works too (PostgREST-style),
    // and unknown claims such as PostgREST's "role" are ignored.
    let foreign = jwt(HS256, &format!(r#"{{"tenant":"{}","role":"web_user","exp":{}}}"#, a.id, now() + 60), CLUSTER_SECRET);
    let got: uuid::Uuid = c.query_one("SELECT levqor.set_tenant_token($1)", &[&foreign]).unwrap().get(0);
    assert_eq!(got, a.id);
}

#[test]
fn forged_expired_and_malformed_tokens_are_refused() {
    let (a, b) = (tenant("tokbad-a"), tenant("tokbad-b"));
    let good = jwt(HS256, &format!(r#"{{"tenant":"{}","exp":{}}}"#, a.id, now() + 60), CLUSTER_SECRET);
    let (h, rest) = good.split_once('.').unwrap();
    let sig = rest.split_once('.').unwrap().1;
    let swapped = format!("{h}.{}.{sig}", URL_SAFE_NO_PAD.encode(format!(r#"{{"tenant":"{}","exp":{}}}"#, b.id, now() + 60)));
    let cases = vec![
        ("other tenant, old signature", swapped),
        ("wrong secret", jwt(HS256, &format!(r#"{{"tenant":"{}","exp":{}}}"#, b.id, now() + 60), b"attacker-secret-attacker-secret-attacker")),
        ("alg none", format!("{}.{}.", URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#), URL_SAFE_NO_PAD.encode(format!(r#"{{"tenant":"{}","exp":{}}}"#, b.id, now() + 60)))),
        ("alg HS512", jwt(r#"{"alg":"HS512"}"#, &format!(r#"{{"tenant":"{}","exp":{}}}"#, b.id, now() + 60), CLUSTER_SECRET)),
        ("expired", jwt(HS256, &format!(r#"{{"tenant":"{}","exp":{}}}"#, a.id, now() - 1), CLUSTER_SECRET)),
        ("no exp", jwt(HS256, &format!(r#"{{"tenant":"{}"}}"#, a.id), CLUSTER_SECRET)),
        ("not yet valid", jwt(HS256, &format!(r#"{{"tenant":"{}","exp":{},"nbf":{}}}"#, a.id, now() + 600, now() + 300), CLUSTER_SECRET)),
        ("unknown tenant", jwt(HS256, &format!(r#"{{"tenant":"{}","exp":{}}}"#, uuid::Uuid::new_v4(), now() + 60), CLUSTER_SECRET)),
        ("bad sub", jwt(HS256, &format!(r#"{{"tenant":"{}","sub":"root","exp":{}}}"#, a.id, now() + 60), CLUSTER_SECRET)),
        ("bad role", jwt(HS256, &format!(r#"{{"tenant":"{}","member_role":"superuser","exp":{}}}"#, a.id, now() + 60), CLUSTER_SECRET)),
        ("empty", String::new()),
        ("garbage", "a.b.c".into()),
    ];
    let mut c = app();
    for (what, token) in cases {
        let (code, msg) = error_of(c.query_one("SELECT levqor.set_tenant_token($1)", &[&token]));
        assert_eq!(code, "28000", "{what}: {msg}");
        assert!(msg.starts_with("invalid levqor token"), "{what}: {msg}");
        assert!(current_tenant(&mut c).is_none(), "{what}");
    }
    assert_eq!(sqlstate(c.query_one("SELECT levqor.set_tenant_token(NULL)", &[])), "28000");
}

#[test]
fn only_context_admins_sign_and_nobody_else_reads_the_secret() {
    let a = tenant("toksign");
    let mut c = app();
    assert_eq!(sqlstate(c.query_one("SELECT levqor.sign_token($1)", &[&a.slug])), "42501");
    assert_eq!(sqlstate(c.batch_execute("SET levqor.token_secret = 'x'")), "42501");
    assert_eq!(sqlstate(c.query_one("SHOW levqor.token_secret", &[])), "42501");
    let via_setting: Option<String> = c
        .query_one("SELECT setting FROM pg_settings WHERE name = 'levqor.token_secret'", &[])
        .map(|r| r.get(0))
        .unwrap_or(None);
    assert!(via_setting.is_none() || !via_setting.unwrap().contains("e2e-token-secret"));
    let mut s = server();
    assert_eq!(sqlstate(s.query_one("SELECT levqor.sign_token($1, ttl => interval '2 days')", &[&a.slug])), "22023");
    assert_eq!(sqlstate(s.query_one("SELECT levqor.sign_token($1, ttl => interval '-1 minute')", &[&a.slug])), "22023");
}

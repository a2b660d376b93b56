//! A cluster *without* shared_preload_libraries: the library loads only when a
//! session first calls levqor, so a session can create `levqor.*`
//! placeholders before that. They must not become a context or a secret.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use levqor_e2e::*;

fn np_superuser() -> Client {
    connect_to(nopreload_port(), "postgres", nopreload_db())
}
fn np_app() -> Client {
    connect_to(nopreload_port(), APP, nopreload_db())
}

fn setup() -> (Tenant, String) {
    let mut su = np_superuser();
    let a = create_tenant_on(&mut su, "np");
    let t = unique("np_items");
    su.batch_execute(&format!(
        "CREATE TABLE {t} (id bigserial PRIMARY KEY, body text NOT NULL);
         SELECT levqor.enable_tenancy('{t}');
         GRANT SELECT, INSERT ON {t} TO {APP}; GRANT USAGE ON SEQUENCE {t}_id_seq TO {APP};"
    ))
    .unwrap();
    let mut c = np_app();
    insert_rows(&mut c, &a, &t, &["np-secret"]);
    (a, t)
}

#[test]
fn a_placeholder_made_before_loading_is_not_a_context() {
    let (a, t) = setup();
    let mut c = np_app();
    // No levqor function has run in this session yet: this creates a placeholder.
    let set = c.batch_execute(&format!("SET levqor.context = 'v1 {} - admin api_key'", a.id));
    assert!(set.is_ok(), "PostgreSQL accepts placeholders before the library loads");
    assert!(current_tenant(&mut c).is_none(), "loading levqor drops the placeholder");
    assert_eq!(bodies(&mut c, &t), Vec::<String>::new());
    let preloaded: bool = c.query_one("SELECT levqor.preloaded()", &[]).unwrap().get(0);
    assert!(!preloaded);
    // Once loaded, the same SET is refused like anywhere else.
    assert_eq!(sqlstate(c.batch_execute(&format!("SET levqor.context = 'v1 {} - admin api_key'", a.id))), "42501");
}

#[test]
fn a_placeholder_from_connection_options_is_not_a_context() {
    let (a, t) = setup();
    let opt = format!("-c levqor.context=v1\\ {}\\ -\\ admin\\ api_key", a.id);
    if let Ok(mut c) = try_connect_with_options(nopreload_port(), APP, nopreload_db(), &opt) {
        assert!(current_tenant(&mut c).is_none());
        assert_eq!(bodies(&mut c, &t), Vec::<String>::new());
    }
}

#[test]
fn a_token_secret_placeholder_does_not_replace_the_real_secret() {
    let (a, _) = setup();
    let attacker_secret = "attacker-chosen-secret-0123456789abcdef";
    let mut c = np_app();
    c.batch_execute(&format!("SET levqor.token_secret = '{attacker_secret}'")).unwrap();
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 60;
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256"}"#),
        URL_SAFE_NO_PAD.encode(format!(r#"{{"tenant":"{}","exp":{exp}}}"#, a.id))
    );
    let mut m = Hmac::<sha2::Sha256>::new_from_slice(attacker_secret.as_bytes()).unwrap();
    m.update(input.as_bytes());
    let forged = format!("{input}.{}", URL_SAFE_NO_PAD.encode(m.finalize().into_bytes()));
    let (code, msg) = error_of(c.query_one("SELECT levqor.set_tenant_token($1)", &[&forged]));
    assert_eq!(code, "28000", "{msg}");
    assert!(current_tenant(&mut c).is_none());
}

#[test]
fn everything_else_works_without_preloading() {
    let (a, t) = setup();
    let mut c = np_app();
    assert_eq!(as_tenant(&mut c, &a, |tx| bodies(tx, &t)), ["np-secret"]);
}

#[test]
fn even_a_superusers_placeholder_is_dropped_by_the_check_hook() {
    // PostgreSQL's own permission check stops an ordinary role's placeholder;
    // a superuser's passes it, so only levqor's check hook stands in the way.
    let (a, _) = setup();
    let mut su = np_superuser();
    su.batch_execute(&format!("SET levqor.context = 'v1 {} - admin api_key'", a.id)).unwrap();
    assert!(current_tenant(&mut su).is_none());
}

#[test]
fn a_database_without_a_sealing_worker_is_told_so() {
    let (_, mut su) = new_database("unsealed");
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = notices.clone();
    let mut cfg: postgres::Config = format!("host=127.0.0.1 port={} user=postgres dbname={}", port(),
        su.query_one("SELECT current_database()", &[]).unwrap().get::<_, String>(0)).parse().unwrap();
    cfg.notice_callback(move |n| sink.lock().unwrap().push(n.message().to_string()));
    drop(su);
    let mut c = cfg.connect(NoTls).unwrap();
    c.batch_execute("CREATE EXTENSION levqor; CREATE TABLE t (id int); SELECT levqor.enable_audit('t');").unwrap();
    let said = notices.lock().unwrap().clone();
    assert_eq!(said.iter().filter(|n| n.contains("no worker seals the audit log")).count(), 2, "{said:?}");
}

//! The side channels row level security leaves open (issue 20): partitions
//! made after protection, foreign keys across tenants, keys in
//! pg_stat_activity, notification payloads.

use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;

use levqor_e2e::*;

fn rows_of(c: &mut impl postgres::GenericClient, table: &str) -> Vec<String> {
    c.query(&format!("SELECT body FROM {table} ORDER BY body"), &[]).unwrap().iter().map(|r| r.get(0)).collect()
}

#[test]
fn partitions_made_after_protection_are_protected_like_their_parent() {
    let (name, mut su) = new_database("partitions");
    su.batch_execute(&format!(
        "CREATE EXTENSION levqor;
         -- As in most deployments: the application is granted whatever is created later.
         ALTER DEFAULT PRIVILEGES GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {APP};
         ALTER DEFAULT PRIVILEGES GRANT USAGE ON SEQUENCES TO {APP};
         CREATE TABLE events (id bigserial, at date NOT NULL, body text NOT NULL) PARTITION BY RANGE (at);
         CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
         SELECT levqor.enable_tenancy('events');
         -- Afterwards, as pg_partman or a cron job does:
         CREATE TABLE events_2027 PARTITION OF events FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');
         -- a sub-partitioned year:
         CREATE TABLE events_2028 PARTITION OF events FOR VALUES FROM ('2028-01-01') TO ('2029-01-01') PARTITION BY LIST (body);
         CREATE TABLE events_2028_rest PARTITION OF events_2028 DEFAULT;
         -- made apart, then attached:
         CREATE TABLE events_2029 (LIKE events INCLUDING DEFAULTS);
         ALTER TABLE events ATTACH PARTITION events_2029 FOR VALUES FROM ('2029-01-01') TO ('2030-01-01');"
    ))
    .unwrap();
    let (a, b) = (create_tenant_on(&mut su, "pt-a"), create_tenant_on(&mut su, "pt-b"));
    let mut c = connect_to(port(), APP, &name);
    for t in [&a, &b] {
        as_tenant(&mut c, t, |tx| {
            for year in 2026..2030 {
                tx.execute(&format!("INSERT INTO events (at, body) VALUES ('{year}-06-01', $1)"), &[&format!("{}-{year}", t.slug)])
                    .unwrap();
            }
        });
    }
    let partitions = ["events_2026", "events_2027", "events_2028", "events_2028_rest", "events_2029"];
    for p in partitions {
        assert_eq!(rows_of(&mut c, p), Vec::<String>::new(), "{p} read directly without a context");
        let seen = as_tenant(&mut c, &a, |tx| rows_of(tx, p));
        assert!(seen.len() == 1 && seen[0].starts_with(&a.slug), "{p} read directly as a: {seen:?}");
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT levqor.authenticate($1)", &[&a.key]).unwrap();
        let year = &p[7..11];
        let r = tx.execute(&format!("INSERT INTO {p} (at, body, tenant_id) VALUES ('{year}-07-01', 'planted', $1)"), &[&b.id]);
        assert_eq!(sqlstate(r), "42501", "{p}: writing for another tenant directly");
    }
    let findings: i64 = su
        .query_one("SELECT count(*) FROM levqor.isolation_report() WHERE kind = 'unprotected_partition'", &[])
        .unwrap()
        .get(0);
    assert_eq!(findings, 0);
    // Detached, a partition stays protected.
    su.batch_execute("ALTER TABLE events DETACH PARTITION events_2027").unwrap();
    assert_eq!(rows_of(&mut c, "events_2027"), Vec::<String>::new());
    assert_eq!(as_tenant(&mut c, &b, |tx| rows_of(tx, "events_2027")), [format!("{}-2027", b.slug)]);
    // A partition cannot lose its protection while its parent has it.
    assert_eq!(sqlstate(su.batch_execute("SELECT levqor.disable_tenancy('events_2026')")), "55000");
    // One made behind the guard's back is reported, and refused until fixed.
    su.batch_execute(
        "BEGIN; SET LOCAL session_replication_role = replica;
         CREATE TABLE events_2030 PARTITION OF events FOR VALUES FROM ('2030-01-01') TO ('2031-01-01'); COMMIT;",
    )
    .unwrap();
    let high: i64 = su
        .query_one(
            "SELECT count(*) FROM levqor.isolation_report() WHERE kind = 'unprotected_partition' AND severity = 'high' AND object = 'public.events_2030'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(high, 1);
    assert_eq!(sqlstate(c.query("SELECT * FROM events_2030", &[])), "42501");
    su.batch_execute("SELECT levqor.enable_tenancy('events_2030')").unwrap();
    assert_eq!(rows_of(&mut c, "events_2030"), Vec::<String>::new());
    // The whole table through its parent, as before.
    assert_eq!(as_tenant(&mut c, &a, |tx| rows_of(tx, "events")).len(), 3, "2026, 2028, 2029 (2027 was detached)");
}

/// notes and items (items.note_id -> notes.id), both protected.
fn notes_and_items(su: &mut Client, on_delete: &str) -> (String, String) {
    let (notes, items) = (unique("notes"), unique("items"));
    su.batch_execute(&format!(
        "CREATE TABLE {notes} (id bigserial PRIMARY KEY, body text NOT NULL);
         CREATE TABLE {items} (id bigserial PRIMARY KEY, note_id bigint REFERENCES {notes} (id) {on_delete}, body text NOT NULL);
         SELECT levqor.enable_tenancy('{notes}');
         GRANT SELECT, INSERT, UPDATE, DELETE ON {notes}, {items} TO {APP};
         GRANT USAGE ON SEQUENCE {notes}_id_seq, {items}_id_seq TO {APP};"
    ))
    .unwrap();
    (notes, items)
}

fn add_note(c: &mut Client, t: &Tenant, notes: &str, body: &str) -> i64 {
    as_tenant(c, t, |tx| tx.query_one(&format!("INSERT INTO {notes} (body) VALUES ($1) RETURNING id"), &[&body]).unwrap().get(0))
}

fn add_item(c: &mut Client, t: &Tenant, items: &str, note: i64) -> Result<u64, Error> {
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
    let r = tx.execute(&format!("INSERT INTO {items} (note_id, body) VALUES ($1, 'item')"), &[&note])?;
    tx.commit().unwrap();
    Ok(r)
}

#[test]
fn foreign_keys_across_tenants_are_refused_once_scoped() {
    let (acme, globex) = (tenant("fk-acme"), tenant("fk-globex"));
    let (mut su, notices) = connect_collecting_notices("postgres");
    let (notes, items) = notes_and_items(&mut su, "ON DELETE CASCADE");
    su.batch_execute(&format!("SELECT levqor.enable_tenancy('{items}')")).unwrap();
    let warned = notices.lock().unwrap().join("\n");
    assert!(warned.contains(&format!("{items}_note_id_fkey")) && warned.contains("without the tenant column"), "{warned}");
    let report: i64 = su
        .query_one(
            "SELECT count(*) FROM levqor.isolation_report() WHERE kind = 'foreign_key_without_tenant' AND object LIKE $1",
            &[&format!("%{items}_note_id_fkey%")],
        )
        .unwrap()
        .get(0);
    assert_eq!(report, 1);

    let mut c = app();
    let acme_note = add_note(&mut c, &acme, &notes, "acme's note");
    // The hole: globex points at acme's note.
    assert_eq!(add_item(&mut c, &globex, &items, acme_note).unwrap(), 1);
    su.batch_execute(&format!("DELETE FROM {items}")).unwrap();

    let scoped: i32 = su.query_one("SELECT levqor.scope_foreign_keys($1::text::regclass)", &[&items]).unwrap().get(0);
    assert_eq!(scoped, 1);
    let def: String = su
        .query_one("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = $1", &[&format!("{items}_note_id_fkey")])
        .unwrap()
        .get(0);
    assert!(def.contains("(tenant_id, note_id)") && def.contains("ON DELETE CASCADE"), "{def}");
    // Another tenant's note and a missing one: the same refusal, nothing to tell them apart.
    let other = error_of(add_item(&mut c, &globex, &items, acme_note));
    let missing = error_of(add_item(&mut c, &globex, &items, 999_999_999));
    assert_eq!(other.0, "23503");
    assert_eq!(other.0, missing.0);
    assert_eq!(other.1, missing.1, "the messages are the same");
    // Its own note: fine; and a cascade stays inside the tenant.
    assert_eq!(add_item(&mut c, &acme, &items, acme_note).unwrap(), 1);
    let globex_note = add_note(&mut c, &globex, &notes, "globex's note");
    add_item(&mut c, &globex, &items, globex_note).unwrap();
    as_tenant(&mut c, &acme, |tx| tx.execute(&format!("DELETE FROM {notes}"), &[]).unwrap());
    let left: Vec<(uuid::Uuid, i64)> = su
        .query(&format!("SELECT tenant_id, note_id FROM {items}"), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(left, vec![(globex.id, globex_note)]);
    assert!(su.query_one("SELECT count(*) = 0 FROM levqor.isolation_report() WHERE kind = 'foreign_key_without_tenant' AND object LIKE $1",
        &[&format!("%{items}%")]).unwrap().get::<_, bool>(0));
}

#[test]
fn scoping_refuses_keys_whose_rows_already_cross_tenants_and_keeps_set_null() {
    let (acme, globex) = (tenant("fkx-acme"), tenant("fkx-globex"));
    let mut su = superuser();
    let (notes, items) = notes_and_items(&mut su, "ON DELETE SET NULL");
    su.batch_execute(&format!("SELECT levqor.enable_tenancy('{items}')")).unwrap();
    let mut c = app();
    let acme_note = add_note(&mut c, &acme, &notes, "acme");
    add_item(&mut c, &globex, &items, acme_note).unwrap();
    let before: String = su
        .query_one("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = $1", &[&format!("{items}_note_id_fkey")])
        .unwrap()
        .get(0);
    let e = su.query_one("SELECT levqor.scope_foreign_keys($1::text::regclass)", &[&items]).unwrap_err();
    let db = e.as_db_error().unwrap();
    assert_eq!(db.code().code(), "23503");
    let detail = db.detail().unwrap_or_default();
    assert!(detail.contains(&globex.id.to_string()) && detail.contains(&acme.id.to_string()), "{detail}");
    assert!(db.hint().unwrap_or_default().contains("_crossing_references"), "{:?}", db.hint());
    let after: String = su
        .query_one("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = $1", &[&format!("{items}_note_id_fkey")])
        .unwrap()
        .get(0);
    assert_eq!(before, after, "nothing changed");
    // Fixed, it goes through, and SET NULL sets the key's own column only.
    su.batch_execute(&format!("DELETE FROM {items}")).unwrap();
    su.query_one("SELECT levqor.scope_foreign_keys($1::text::regclass)", &[&items]).unwrap();
    add_item(&mut c, &acme, &items, acme_note).unwrap();
    as_tenant(&mut c, &acme, |tx| tx.execute(&format!("DELETE FROM {notes}"), &[]).unwrap());
    let row = su.query_one(&format!("SELECT tenant_id, note_id FROM {items}"), &[]).unwrap();
    assert_eq!((row.get::<_, uuid::Uuid>(0), row.get::<_, Option<i64>>(1)), (acme.id, None));
    // A key to a table that holds no tenant data stays as it is.
    let (plain, refs) = (unique("currencies"), unique("prices"));
    su.batch_execute(&format!(
        "CREATE TABLE {plain} (code text PRIMARY KEY);
         CREATE TABLE {refs} (id bigserial PRIMARY KEY, code text REFERENCES {plain});
         SELECT levqor.enable_tenancy('{refs}');"
    ))
    .unwrap();
    let n: i32 = su.query_one("SELECT levqor.scope_foreign_keys($1::text::regclass)", &[&refs]).unwrap().get(0);
    assert_eq!(n, 0);
}

/// Run `sql` on `victim` (a slow statement) and, while it runs, poll its
/// pg_stat_activity.query as another session of the same role: every text seen.
fn watch_while_running(victim: &mut Option<Client>, pid: i32, sql: String, extended: bool) -> Vec<String> {
    let mut c = victim.take().unwrap();
    let runner = std::thread::spawn(move || {
        let r = if extended { c.query(sql.as_str(), &[]).map(|_| ()) } else { c.simple_query(&sql).map(|_| ()) };
        (c, r)
    });
    // Under way: past the microseconds between its arrival and its parsing.
    std::thread::sleep(Duration::from_millis(100));
    let mut poller = app();
    let mut seen = Vec::new();
    let until = Instant::now() + Duration::from_millis(350);
    while Instant::now() < until {
        let q: Option<String> = poller.query_one("SELECT query FROM pg_stat_activity WHERE pid = $1", &[&pid]).unwrap().get(0);
        seen.extend(q);
    }
    let (c, r) = runner.join().unwrap();
    r.unwrap();
    *victim = Some(c);
    seen
}

#[test]
fn keys_and_tokens_never_show_in_pg_stat_activity() {
    let t = tenant("psa");
    let secret = &t.key[21..];
    let token: String = server().query_one("SELECT levqor.sign_token($1)", &[&t.slug]).unwrap().get(0);
    let claims = token.split('.').nth(1).unwrap().to_string();
    let mut c = app();
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let mut victim = Some(c);
    let mut seen = Vec::new();
    // The key as a literal: simple protocol, then extended (a prepared statement).
    seen.extend(watch_while_running(&mut victim, pid, format!("SELECT levqor.authenticate('{}'), pg_sleep(0.6)", t.key), false));
    seen.extend(watch_while_running(&mut victim, pid, format!("SELECT levqor.authenticate('{}'), pg_sleep(0.6)", t.key), true));
    seen.extend(watch_while_running(&mut victim, pid, format!("SELECT levqor.set_tenant_token('{token}'), pg_sleep(0.6)"), false));
    assert!(seen.len() > 50, "the poller polled: {}", seen.len());
    let leaks: Vec<&String> = seen.iter().filter(|q| q.contains(secret) || q.contains(&claims)).collect();
    assert!(leaks.is_empty(), "a secret was visible in pg_stat_activity: {leaks:?}");
    let key_id = &t.key[..21];
    assert!(seen.iter().any(|q| q.contains(&format!("{key_id}*****")) && q.contains("pg_sleep")), "the statement itself was shown");
    assert!(seen.iter().any(|q| q.contains("set_tenant_token('eyJ") && q.contains(".****")), "the token's statement was shown");

    // Deterministically: as soon as levqor has it, the statement's own text is redacted,
    let mut c = victim.take().unwrap();
    let own: String = c
        .query_one(
            &format!("SELECT (SELECT query FROM pg_stat_activity WHERE pid = pg_backend_pid()) FROM levqor.authenticate('{}')", t.key),
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!own.contains(secret) && own.contains(&format!("{key_id}****")), "{own}");
    // and so is the text an error report quotes (log_min_error_statement).
    let e = c.simple_query(&format!("SELECT levqor.authenticate('{}'), 1/0", t.key)).unwrap_err();
    assert_eq!(e.code().unwrap().code(), "22012");
    let after: Option<String> = app().query_one("SELECT query FROM pg_stat_activity WHERE pid = $1", &[&pid]).unwrap().get(0);
    assert!(!after.unwrap_or_default().contains(secret));
}

#[test]
fn quota_notifications_say_nothing_about_the_tenant() {
    let (t, other) = (tenant("ntf"), tenant("ntf-other"));
    let metric = unique("ntf_calls");
    let mut a = admin();
    a.execute("SELECT levqor.define_metric($1, 'counter', NULL, 10)", &[&metric]).unwrap();
    // Two listeners: no context at all, and another tenant's session context.
    let mut bare = app();
    bare.batch_execute("LISTEN levqor_quota").unwrap();
    let mut nosy = app();
    nosy.execute("SELECT levqor.authenticate($1, session => true)", &[&other.key]).unwrap();
    nosy.batch_execute("LISTEN levqor_quota").unwrap();
    as_tenant(&mut app(), &t, |tx| tx.execute("SELECT levqor.consume($1, 9)", &[&metric]).unwrap());
    a.execute("SELECT levqor.flush_usage()", &[]).unwrap();
    for (who, c) in [("without a context", &mut bare), ("another tenant", &mut nosy)] {
        let mut payloads = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut n = c.notifications();
        let mut it = n.timeout_iter(Duration::from_millis(200));
        while Instant::now() < deadline {
            if let Some(note) = it.next().unwrap() {
                payloads.push(note.payload().to_string());
            }
        }
        assert!(!payloads.is_empty(), "{who} is notified");
        for p in &payloads {
            assert!(p.chars().all(|c| c.is_ascii_digit()), "{who} got {p:?}");
            assert!(!p.contains(&t.slug) && !p.contains(&t.id.to_string()) && !p.contains(&metric), "{who} got {p:?}");
        }
    }
    // And they cannot look the alert up.
    assert_eq!(sqlstate(bare.query("SELECT * FROM levqor.quota_alerts", &[])), "42501");
}

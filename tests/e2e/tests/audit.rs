//! The tamper-evident audit trail, attacked. Each test has its own database,
//! so chains and seals of other tests do not interfere.

use levqor_e2e::*;

fn fresh_db(prefix: &str) -> (String, Client) {
    let (name, mut su) = new_database(prefix);
    su.batch_execute(&format!(
        "CREATE EXTENSION levqor;
         CREATE TABLE items (id serial PRIMARY KEY, body text NOT NULL);
         SELECT levqor.enable_tenancy('items');
         SELECT levqor.enable_audit('items');
         GRANT SELECT, INSERT, UPDATE, DELETE ON items TO {APP}, {SERVER};
         GRANT USAGE ON SEQUENCE items_id_seq TO {APP}, {SERVER};"
    ))
    .unwrap();
    (name, su)
}

fn seal(su: &mut Client) -> i32 {
    su.query_one("SELECT levqor.seal_audit()", &[]).unwrap().get(0)
}

fn verify(su: &mut Client, t: &Tenant) -> (bool, i64, Option<i64>, Option<String>) {
    let r = su.query_one("SELECT * FROM levqor.verify_audit($1)", &[&t.slug]).unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

#[test]
fn every_change_is_recorded_with_who_what_and_when() {
    let (db, mut su) = fresh_db("audit_rec");
    let a = create_tenant_on(&mut su, "aud-rec");
    let user = uuid::Uuid::new_v4();
    su.execute("SELECT levqor.add_member($1, $2, 'operator')", &[&a.slug, &user]).unwrap();
    let mut s = connect_to(port(), SERVER, &db);
    s.batch_execute("SET application_name = 'billing-api'").unwrap();
    let mut tx = s.transaction().unwrap();
    tx.execute("SELECT levqor.set_tenant($1, user_id => $2, member_role => 'operator')", &[&a.slug, &user]).unwrap();
    tx.batch_execute(
        "INSERT INTO items (body) VALUES ('first'), ('second');
         UPDATE items SET body = 'FIRST' WHERE body = 'first';
         DELETE FROM items WHERE body = 'second';",
    )
    .unwrap();
    tx.commit().unwrap();
    let rows = su
        .query(
            "SELECT operation, pk::text, old_row->>'body', new_row->>'body', changed, db_role::text, user_id,
                    member_role, application_name, client_addr IS NOT NULL, tenant_id
               FROM levqor.audit_log WHERE kind = 'row' ORDER BY id",
            &[],
        )
        .unwrap();
    let ops: Vec<(String, String, Option<String>, Option<String>, Option<Vec<String>>)> =
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))).collect();
    assert_eq!(
        ops,
        [
            ("INSERT".into(), r#"{"id": 1}"#.into(), None, Some("first".into()), None),
            ("INSERT".into(), r#"{"id": 2}"#.into(), None, Some("second".into()), None),
            ("UPDATE".into(), r#"{"id": 1}"#.into(), Some("first".into()), Some("FIRST".into()), Some(vec!["body".into()])),
            ("DELETE".into(), r#"{"id": 2}"#.into(), Some("second".into()), None, None),
        ]
    );
    for r in &rows {
        assert_eq!(r.get::<_, String>(5), SERVER);
        assert_eq!(r.get::<_, Option<uuid::Uuid>>(6), Some(user));
        assert_eq!(r.get::<_, Option<String>>(7).as_deref(), Some("operator"));
        assert_eq!(r.get::<_, Option<String>>(8).as_deref(), Some("billing-api"));
        assert!(r.get::<_, bool>(9));
        assert_eq!(r.get::<_, Option<uuid::Uuid>>(10), Some(a.id));
    }
    // Lifecycle calls land in the same log and chain.
    su.execute("SELECT levqor.suspend_tenant($1, 'audit test')", &[&a.slug]).unwrap();
    let ev: i64 = su
        .query_one("SELECT count(*) FROM levqor.audit_log WHERE tenant_id = $1 AND event = 'tenant_suspended'", &[&a.id])
        .unwrap()
        .get(0);
    assert_eq!(ev, 1);
    assert!(seal(&mut su) >= 7);
    assert_eq!(verify(&mut su, &a), (true, 7, None, None), "created, member added, 4 rows, suspended");
    // TRUNCATE of an audited table is recorded (protected tables refuse it).
    su.batch_execute("CREATE TABLE scratch (x int); SELECT levqor.enable_audit('scratch'); TRUNCATE scratch;").unwrap();
    let t: i64 = su.query_one("SELECT count(*) FROM levqor.audit_log WHERE operation = 'TRUNCATE'", &[]).unwrap().get(0);
    assert_eq!(t, 1);
}

#[test]
fn tenants_read_only_their_own_trail_and_nobody_edits_it() {
    let (db, mut su) = fresh_db("audit_read");
    let (a, b) = (create_tenant_on(&mut su, "aud-a"), create_tenant_on(&mut su, "aud-b"));
    let mut c = connect_to(port(), APP, &db);
    insert_rows(&mut c, &a, "items", &["a-secret"]);
    insert_rows(&mut c, &b, "items", &["b-secret"]);
    let auditor: String = su.query_one("SELECT levqor.issue_key($1, 'auditor')", &[&a.slug]).unwrap().get(0);
    let viewer: String = su.query_one("SELECT levqor.issue_key($1, 'viewer')", &[&a.slug]).unwrap().get(0);
    let seen = |c: &mut Client, key: &str| -> Vec<String> {
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT levqor.authenticate($1)", &[&key]).unwrap();
        let v = tx
            .query("SELECT coalesce(new_row->>'body', event) FROM levqor.audit_log ORDER BY id", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        tx.commit().unwrap();
        v
    };
    let mine = seen(&mut c, &auditor);
    assert!(mine.contains(&"a-secret".to_string()), "{mine:?}");
    assert!(!mine.iter().any(|x| x.contains("b-secret")), "{mine:?}");
    assert!(seen(&mut c, &a.key).contains(&"a-secret".to_string()), "admin keys read it too");
    assert_eq!(seen(&mut c, &viewer), Vec::<String>::new(), "viewers do not");
    assert_eq!(c.query("SELECT * FROM levqor.audit_log", &[]).unwrap().len(), 0, "no context, nothing");
    let all: i64 = connect_to(port(), ADMIN, &db).query_one("SELECT count(*) FROM levqor.audit_log", &[]).unwrap().get(0);
    assert!(all >= 4, "levqor_admin reads every tenant's trail");
    // The chain positions, and the trail view over both, follow the same rule.
    seal(&mut su);
    let chains = |c: &mut Client, key: &str| -> Vec<(String, Option<i64>)> {
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT levqor.authenticate($1)", &[&key]).unwrap();
        let v = tx
            .query(
                "SELECT DISTINCT c.chain::text, NULL::int8 FROM levqor.audit_chain c
                 UNION ALL SELECT coalesce(new_row->>'body', event), seq FROM levqor.audit_trail",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        tx.commit().unwrap();
        v
    };
    let mine = chains(&mut c, &auditor);
    assert!(mine.contains(&(a.id.to_string(), None)) && !mine.contains(&(b.id.to_string(), None)), "{mine:?}");
    assert!(mine.iter().any(|(body, seq)| body == "a-secret" && seq.is_some()), "{mine:?}");
    assert!(!mine.iter().any(|(body, _)| body.contains("b-secret")), "{mine:?}");
    assert_eq!(chains(&mut c, &viewer), Vec::new(), "viewers see no positions either");
    assert_eq!(c.query("SELECT * FROM levqor.audit_chain", &[]).unwrap().len(), 0, "no context, nothing");

    for who in [APP, ADMIN] {
        let mut x = connect_to(port(), who, &db);
        for sql in [
            "UPDATE levqor.audit_chain SET first_seq = first_seq + 1",
            "DELETE FROM levqor.audit_chain",
            "INSERT INTO levqor.audit_chain SELECT * FROM levqor.audit_chain",
            "UPDATE levqor.audit_log SET detail = '{}'",
            "DELETE FROM levqor.audit_log",
            "TRUNCATE levqor.audit_log",
            "INSERT INTO levqor.audit_log (kind, event) VALUES ('event', 'forged')",
            "SELECT levqor.purge_audit_before(now())",
        ] {
            assert_eq!(sqlstate(x.batch_execute(sql)), "42501", "{who}: {sql}");
        }
    }
    // Even a superuser is stopped by the triggers (and caught by verify_audit if they bypass them).
    assert_eq!(sqlstate(su.batch_execute("UPDATE levqor.audit_log SET detail = '{}'")), "42501");
    assert_eq!(sqlstate(su.batch_execute("TRUNCATE levqor.audit_log")), "42501");
    assert_eq!(sqlstate(su.batch_execute("UPDATE levqor.audit_chain SET first_seq = first_seq")), "42501");
    assert_eq!(sqlstate(su.batch_execute("DELETE FROM levqor.audit_chain")), "42501");
    assert_eq!(sqlstate(su.batch_execute("TRUNCATE levqor.audit_chain")), "42501");
    // The owner of an audited table cannot switch auditing off.
    assert_eq!(sqlstate(su.batch_execute("DROP TRIGGER levqor_audit_insert ON items")), "42501");
    assert_eq!(sqlstate(su.batch_execute("ALTER TABLE items DISABLE TRIGGER levqor_audit_update")), "42501");
    assert_eq!(sqlstate(su.batch_execute("ALTER TABLE items ENABLE REPLICA TRIGGER levqor_audit_delete")), "42501");
    assert_eq!(sqlstate(c.batch_execute("SELECT levqor.disable_audit('items')")), "42501");
}

#[test]
fn verify_audit_catches_edits_deletions_insertions_and_reordering() {
    let (db, mut su) = fresh_db("audit_tamper");
    let a = create_tenant_on(&mut su, "aud-t");
    let mut c = connect_to(port(), APP, &db);
    for i in 0..6 {
        insert_rows(&mut c, &a, "items", &[&format!("row-{i}")]);
    }
    seal(&mut su);
    assert_eq!(verify(&mut su, &a).0, true);
    let ids: Vec<i64> = su
        .query("SELECT id FROM levqor.audit_trail WHERE tenant_id = $1 AND seq IS NOT NULL ORDER BY seq", &[&a.id])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Tampering as a superuser with triggers bypassed, each undone afterwards.
    let tamper = |su: &mut Client, sql: &str| {
        su.batch_execute(&format!("BEGIN; SET LOCAL session_replication_role = replica; {sql}; COMMIT;")).unwrap();
    };
    su.batch_execute(
        "CREATE TEMP TABLE saved AS SELECT * FROM levqor.audit_log;
         CREATE TEMP TABLE saved_chain AS SELECT * FROM levqor.audit_chain",
    )
    .unwrap();
    let restore = |su: &mut Client| {
        tamper(
            su,
            "DELETE FROM levqor.audit_log; INSERT INTO levqor.audit_log SELECT * FROM saved;
             DELETE FROM levqor.audit_chain; INSERT INTO levqor.audit_chain SELECT * FROM saved_chain",
        );
        assert_eq!(verify(su, &a).0, true, "restored");
    };

    // an edited entry
    tamper(&mut su, &format!("UPDATE levqor.audit_log SET new_row = jsonb_set(new_row, '{{body}}', '\"rewritten\"') WHERE id = {}", ids[2]));
    let (ok, _, bad, why) = verify(&mut su, &a);
    assert_eq!((ok, bad), (false, Some(ids[2])), "{why:?}");
    assert!(why.unwrap().contains("changed"));
    restore(&mut su);

    // a deleted entry in the middle, its chain position left
    tamper(&mut su, &format!("DELETE FROM levqor.audit_log WHERE id = {}", ids[3]));
    let (ok, _, bad, why) = verify(&mut su, &a);
    assert_eq!((ok, bad), (false, Some(ids[3])), "{why:?}");
    assert!(why.unwrap().contains("deleted from the log"));
    restore(&mut su);

    // ... and with its chain position gone too
    tamper(
        &mut su,
        &format!(
            "DELETE FROM levqor.audit_log WHERE id = {x};
             UPDATE levqor.audit_chain SET ids = array_remove(ids, {x}::int8),
                    hashes = overlay(hashes placing ''::bytea from array_position(ids, {x}::int8) * 32 - 31 for 32)
              WHERE {x} = ANY (ids)",
            x = ids[3]
        ),
    );
    let (ok, _, bad, why) = verify(&mut su, &a);
    assert_eq!((ok, bad), (false, Some(ids[4])), "{why:?}");
    assert!(why.unwrap().contains("removed or moved"));
    restore(&mut su);

    // ... or a whole run of positions gone
    tamper(&mut su, &format!("UPDATE levqor.audit_chain SET first_seq = first_seq + 1 WHERE chain = '{}'", a.id));
    let (ok, _, bad, why) = verify(&mut su, &a);
    assert_eq!((ok, bad), (false, Some(ids[0])), "{why:?}");
    assert!(why.unwrap().contains("missing"));
    restore(&mut su);

    // a run whose parts disagree (its last id no longer its last entry's)
    tamper(&mut su, &format!("UPDATE levqor.audit_chain SET last_id = last_id + 1 WHERE chain = '{}'", a.id));
    let (ok, _, _, why) = verify(&mut su, &a);
    assert!(!ok && why.as_deref().unwrap_or("").contains("damaged"), "{why:?}");
    restore(&mut su);

    // the newest entries deleted (the tail), entries and positions
    tamper(
        &mut su,
        &format!(
            "DELETE FROM levqor.audit_log WHERE id >= {x};
             UPDATE levqor.audit_chain SET ids = ids[1:array_position(ids, {x}::int8) - 1],
                    hashes = substr(hashes, 1, (array_position(ids, {x}::int8) - 1) * 32),
                    last_id = ids[array_position(ids, {x}::int8) - 1]
              WHERE {x} = ANY (ids)",
            x = ids[5]
        ),
    );
    let (ok, _, _, why) = verify(&mut su, &a);
    assert!(!ok && why.as_deref().unwrap_or("").contains("removed from its end"), "{why:?}");
    restore(&mut su);

    // a forged entry inserted into the chain (later positions shifted to make room)
    tamper(
        &mut su,
        &format!(
            "INSERT INTO levqor.audit_log (tenant_id, kind, event) VALUES ('{id}', 'event', 'forged');
             UPDATE levqor.audit_chain SET ids = ids[1:2] || currval('levqor.audit_log_id_seq') || ids[3:],
                    hashes = substr(hashes, 1, 64) || sha256(substr(hashes, 33, 32)) || substr(hashes, 65)
              WHERE chain = '{id}' AND first_seq = 1",
            id = a.id
        ),
    );
    let (ok, _, bad, why) = verify(&mut su, &a);
    assert!(!ok && bad.is_some_and(|b| !ids.contains(&b)), "the forged entry is the bad one: {bad:?} {why:?}");
    restore(&mut su);

    // A rolled-back write leaves its entry id unused; once the sealer's
    // watermark is past it, an entry forged into that gap (into the log
    // alone) is one no pass will ever chain, and verify says so.
    let gap: i64 = {
        let mut tx = su.transaction().unwrap();
        tx.execute("SELECT levqor.set_tenant($1)", &[&a.slug]).unwrap();
        tx.execute("INSERT INTO items (body) VALUES ('rolled back')", &[]).unwrap();
        let gap = tx.query_one("SELECT currval('levqor.audit_log_id_seq')", &[]).unwrap().get(0);
        tx.rollback().unwrap();
        gap
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while su.query_one("SELECT through FROM levqor.audit_seal_state", &[]).unwrap().get::<_, i64>(0) < gap {
        assert!(std::time::Instant::now() < deadline, "the sealer's watermark passes a rolled-back id");
        seal(&mut su);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(verify(&mut su, &a).0, true, "a rolled-back entry is no gap in the chain");
    tamper(&mut su, &format!("INSERT INTO levqor.audit_log (id, tenant_id, kind, event) VALUES ({gap}, '{}', 'event', 'forged')", a.id));
    let (ok, _, bad, why) = verify(&mut su, &a);
    assert_eq!((ok, bad), (false, Some(gap)), "{why:?}");
    assert!(why.unwrap().contains("in no chain"));
    restore(&mut su);

    // two entries swapped
    tamper(
        &mut su,
        &format!(
            "UPDATE levqor.audit_chain SET ids = array_replace(array_replace(array_replace(ids, {x}::int8, -1), {y}::int8, {x}::int8), -1, {y}::int8)
              WHERE {x} = ANY (ids)",
            x = ids[1],
            y = ids[4]
        ),
    );
    let (ok, _, bad, _) = verify(&mut su, &a);
    assert_eq!((ok, bad), (false, Some(ids[4])));
    restore(&mut su);
    assert_eq!(verify(&mut su, &a), (true, 7, None, None), "tenant created + 6 rows, intact again");

    // audit_head is the last hash of the chain
    let head: String = su.query_one("SELECT hash FROM levqor.audit_head($1)", &[&a.slug]).unwrap().get(0);
    let last: String = su
        .query_one("SELECT encode(hash, 'hex') FROM levqor.audit_trail WHERE tenant_id = $1 ORDER BY seq DESC NULLS LAST LIMIT 1", &[&a.id])
        .unwrap()
        .get(0);
    assert_eq!(head, last);
}

#[test]
fn a_long_open_transaction_does_not_block_its_tenants_other_writers() {
    let (db, mut su) = fresh_db("audit_conc");
    let a = create_tenant_on(&mut su, "aud-c");
    let mut slow = connect_to(port(), APP, &db);
    let mut tx = slow.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&a.key]).unwrap();
    tx.execute("INSERT INTO items (body) VALUES ('slow')", &[]).unwrap();
    // Meanwhile, the same tenant writes from another session, and it seals.
    let mut fast = connect_to(port(), APP, &db);
    fast.batch_execute("SET statement_timeout = '3s'").unwrap();
    insert_rows(&mut fast, &a, "items", &["fast-1", "fast-2"]);
    assert_eq!(seal(&mut su), 4, "audit_enabled (platform), tenant created, two committed rows; the open one waits");
    tx.commit().unwrap();
    assert_eq!(seal(&mut su), 1);
    assert_eq!(verify(&mut su, &a), (true, 4, None, None));
    let order: Vec<String> = su
        .query("SELECT coalesce(new_row->>'body', event) FROM levqor.audit_trail WHERE tenant_id = $1 ORDER BY seq", &[&a.id])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(order, ["tenant_created", "fast-1", "fast-2", "slow"], "sealed in commit-visible order");
}

#[test]
fn sealing_while_writers_commit_and_roll_back_chains_every_committed_entry_once() {
    let (db, mut su) = fresh_db("audit_race");
    let a = create_tenant_on(&mut su, "aud-race");
    let b = create_tenant_on(&mut su, "aud-race-b");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (db, t) = (db.clone(), if w % 2 == 0 { a.clone() } else { b.clone() });
            std::thread::spawn(move || {
                let mut c = connect_to(port(), APP, &db);
                let mut committed = 0;
                for i in 0..150 {
                    let mut tx = c.transaction().unwrap();
                    tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
                    tx.execute("INSERT INTO items (body) VALUES ($1)", &[&format!("w{w}-{i}")]).unwrap();
                    if i % 3 == 0 {
                        // a second statement, and a pause inside the transaction
                        tx.execute("UPDATE items SET body = body || '!' WHERE body = $1", &[&format!("w{w}-{i}")]).unwrap();
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                    if i % 7 == 0 {
                        tx.rollback().unwrap();
                    } else {
                        tx.commit().unwrap();
                        committed += 1 + usize::from(i % 3 == 0);
                    }
                }
                committed
            })
        })
        .collect();
    let sealer = {
        let (db, done) = (db.clone(), done.clone());
        std::thread::spawn(move || {
            let mut su = connect_to(port(), "postgres", &db);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                su.query_one("SELECT levqor.seal_audit(7)", &[]).unwrap();
            }
        })
    };
    let written: usize = writers.into_iter().map(|w| w.join().unwrap()).sum();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    sealer.join().unwrap();
    while seal(&mut su) > 0 {}
    let r = su
        .query_one(
            "SELECT (SELECT count(*) FROM levqor.audit_log WHERE kind = 'row'),
                    (SELECT count(*) FROM levqor.audit_trail WHERE seq IS NULL),
                    (SELECT count(*) FROM levqor.audit_chain c, unnest(c.ids) AS x(id) JOIN levqor.audit_log l USING (id) WHERE l.kind = 'row')",
            &[],
        )
        .unwrap();
    let (rows, unsealed, chained): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
    assert_eq!(rows as usize, written, "one entry per committed change, none of the rolled-back ones");
    assert_eq!((unsealed, chained), (0, rows), "every committed entry is in a chain, once");
    for t in [&a, &b] {
        let (ok, checked, _, why) = verify(&mut su, t);
        assert!(ok, "{why:?}");
        assert_eq!(checked as usize, 1 + written_of(&mut su, t), "the tenant_created event and its rows");
    }
}

fn written_of(su: &mut Client, t: &Tenant) -> usize {
    su.query_one("SELECT count(*) FROM levqor.audit_log WHERE kind = 'row' AND tenant_id = $1", &[&t.id])
        .unwrap()
        .get::<_, i64>(0) as usize
}

#[test]
fn a_worker_in_each_listed_database_seals_and_flushes_by_itself() {
    // scripts/cluster.sh creates these databases and lists them in
    // levqor.audit_database, with a 200 ms interval; each worker waits in its
    // database until levqor is installed.
    let _ = db();
    for database in ["levqor_sealer", "levqor_sealer2"] {
        let mut su = connect_to(port(), "postgres", database);
        su.batch_execute("CREATE EXTENSION IF NOT EXISTS levqor").unwrap();
        let a = create_tenant_on(&mut su, "sealed");
        su.batch_execute("SELECT levqor.define_metric('sealer_test_calls') WHERE NOT EXISTS
                            (SELECT FROM levqor.metrics WHERE name = 'sealer_test_calls')")
            .unwrap();
        let mut tx = su.transaction().unwrap();
        tx.execute("SELECT levqor.set_tenant($1)", &[&a.slug]).unwrap();
        tx.execute("SELECT levqor.consume('sealer_test_calls', 3)", &[]).unwrap();
        tx.commit().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let r = su
                .query_one(
                    "SELECT (SELECT count(*) FROM levqor.audit_trail WHERE seq IS NULL),
                            (SELECT coalesce(sum(quantity), 0)::int8 FROM levqor.usage_ledger WHERE tenant_id = $1)",
                    &[&a.id],
                )
                .unwrap();
            let (unsealed, billed): (i64, i64) = (r.get(0), r.get(1));
            if unsealed == 0 && billed == 3 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{database}: within 30 s the worker left {unsealed} entries unsealed and billed {billed} of 3"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let (ok, checked): (bool, i64) = {
            let r = su.query_one("SELECT ok, checked FROM levqor.verify_audit($1)", &[&a.slug]).unwrap();
            (r.get(0), r.get(1))
        };
        assert!(ok && checked >= 1, "{database}");
        let workers: i64 = su
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'levqor worker' AND datname = current_database()",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(workers, 1, "{database}");
        // The worker reports what it writes, so autovacuum analyzes and
        // vacuums the chain (unanalyzed, the sealer's plans read every run).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let inserted: i64 = su
                .query_one(
                    "SELECT coalesce(sum(n_tup_ins), 0)::int8 FROM pg_stat_all_tables WHERE relid = 'levqor.audit_chain'::regclass",
                    &[],
                )
                .unwrap()
                .get(0);
            if inserted > 0 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{database}: the worker's chain runs never reached the statistics");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    // The worker remembers the chain's indexes between passes too: one a
    // DBA adds must receive every run it seals after, and one dropped must
    // not stop it.
    let mut su = connect_to(port(), "postgres", "levqor_sealer");
    let sealed_all = |su: &mut Client, what: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while su.query_one("SELECT count(*) FROM levqor.audit_trail WHERE seq IS NULL", &[]).unwrap().get::<_, i64>(0) > 0 {
            assert!(std::time::Instant::now() < deadline, "the worker stopped sealing {what}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    su.batch_execute(
        "CREATE EXTENSION IF NOT EXISTS amcheck;
         DROP INDEX IF EXISTS levqor.audit_chain_by_time;
         CREATE INDEX audit_chain_by_time ON levqor.audit_chain (sealed_at);",
    )
    .unwrap();
    for _ in 0..3 {
        create_tenant_on(&mut su, "sealed-ix");
    }
    sealed_all(&mut su, "after an index was added to the chain");
    su.execute("SELECT bt_index_check('levqor.audit_chain_by_time'::regclass, true)", &[]).unwrap();
    su.batch_execute("DROP INDEX levqor.audit_chain_by_time").unwrap();
    create_tenant_on(&mut su, "sealed-ix");
    sealed_all(&mut su, "after an index of the chain was dropped");
}

#[test]
fn export_holds_everything_of_one_tenant_and_nothing_of_another() {
    let (db, mut su) = fresh_db("audit_export");
    su.batch_execute(
        "GRANT USAGE ON SCHEMA levqor_template TO levqor_app;
         CREATE TABLE levqor_template.notes (id serial PRIMARY KEY, body text);
         GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA levqor_template TO levqor_app;
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA levqor_template TO levqor_app;",
    )
    .unwrap();
    let (a, b) = (create_tenant_on(&mut su, "exp-a"), create_tenant_on(&mut su, "exp-b"));
    let s_row = su.query_one("SELECT tenant_id, api_key FROM levqor.create_tenant('exp-s', 'S', isolation => 'schema')", &[]).unwrap();
    let s = Tenant { id: s_row.get(0), slug: "exp-s".into(), key: s_row.get(1) };
    let mut c = connect_to(port(), APP, &db);
    insert_rows(&mut c, &a, "items", &["a-1", "a-2"]);
    insert_rows(&mut c, &b, "items", &["b-SECRET"]);
    insert_rows(&mut c, &s, "items", &["s-shared"]);
    as_tenant(&mut c, &s, |tx| {
        tx.execute("INSERT INTO notes (body) VALUES ('s-own-schema')", &[]).unwrap();
    });

    let export = |cl: &mut Client, sql: &str, arg: Option<&str>| -> Vec<(String, serde_like::Json)> {
        let rows = match arg {
            Some(x) => cl.query(sql, &[&x]).unwrap(),
            None => cl.query(sql, &[]).unwrap(),
        };
        rows.iter().map(|r| (r.get::<_, String>(0), serde_like::Json(r.get::<_, String>(1)))).collect()
    };
    let rows = export(&mut su, "SELECT table_name, row_data::text FROM levqor.export_tenant($1)", Some(&a.slug));
    assert_eq!(rows[0].0, "manifest");
    assert!(rows[0].1 .0.contains("\"public.items\": 2"), "{}", rows[0].1 .0);
    let items: Vec<&str> = rows.iter().filter(|(t, _)| t == "public.items").map(|(_, j)| j.0.as_str()).collect();
    assert_eq!(items.len(), 2);
    let all = rows.iter().map(|(_, j)| j.0.clone()).collect::<Vec<_>>().join("\n");
    assert!(!all.contains("b-SECRET") && !all.contains(&b.id.to_string()), "another tenant's data leaked into the export");
    assert!(!all.contains("key_hash"), "key hashes are never exported");
    assert!(rows.iter().any(|(t, _)| t == "levqor.tenant_keys") && rows.iter().any(|(t, _)| t == "levqor.audit_log"));

    // A schema tenant's export includes its own schema's tables.
    let srows = export(&mut su, "SELECT table_name, row_data::text FROM levqor.export_tenant($1)", Some(&s.slug));
    assert!(srows.iter().any(|(t, j)| t == "tenant_exp_s.notes" && j.0.contains("s-own-schema")));
    assert!(srows.iter().any(|(t, j)| t == "public.items" && j.0.contains("s-shared")));

    // Self-service: the owner or admin exports its own tenant, and only that.
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&a.key]).unwrap();
    let own: Vec<String> = tx.query("SELECT row_data::text FROM levqor.export_my_tenant()", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    tx.commit().unwrap();
    assert!(own.iter().any(|r| r.contains("a-1")) && !own.iter().any(|r| r.contains("b-SECRET")));
    let viewer: String = su.query_one("SELECT levqor.issue_key($1, 'viewer')", &[&a.slug]).unwrap().get(0);
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&viewer]).unwrap();
    assert_eq!(sqlstate(tx.query("SELECT * FROM levqor.export_my_tenant()", &[])), "42501");
    drop(tx);
    assert_eq!(sqlstate(c.query("SELECT * FROM levqor.export_my_tenant()", &[])), "42501", "no context");
    assert_eq!(sqlstate(c.query("SELECT * FROM levqor.export_tenant($1)", &[&b.slug])), "42501");
}

/// Rows compared as text; a tiny newtype keeps the test readable.
mod serde_like {
    #[derive(Debug)]
    pub struct Json(pub String);
}

#[test]
fn retention_keeps_the_chain_verifiable_and_unrecorded_deletions_still_fail() {
    let (db, mut su) = fresh_db("audit_retention");
    let a = create_tenant_on(&mut su, "aud-ret");
    let mut c = connect_to(port(), APP, &db);
    insert_rows(&mut c, &a, "items", &["old-1", "old-2"]);
    seal(&mut su);
    su.batch_execute("SELECT pg_sleep(0.05)").unwrap();
    let cutoff: std::time::SystemTime = su.query_one("SELECT clock_timestamp()", &[]).unwrap().get(0);
    su.batch_execute("SELECT pg_sleep(0.05)").unwrap();
    insert_rows(&mut c, &a, "items", &["new-1"]);
    seal(&mut su);
    let removed: i64 = su.query_one("SELECT levqor.purge_audit_before($1)", &[&cutoff]).unwrap().get(0);
    assert!(removed >= 3, "tenant created + 2 old rows (+ platform entries): {removed}");
    let left: Vec<String> = su
        .query("SELECT coalesce(new_row->>'body', event) FROM levqor.audit_trail WHERE tenant_id = $1 ORDER BY seq", &[&a.id])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["new-1"]);
    assert_eq!(verify(&mut su, &a), (true, 1, None, None), "verifies from the recorded floor");
    // Only superusers keep records short.
    assert_eq!(sqlstate(connect_to(port(), ADMIN, &db).query("SELECT levqor.purge_audit_before(now())", &[])), "42501");
    // Deleting the oldest remaining entry without retention is still caught.
    su.batch_execute(&format!(
        "BEGIN; SET LOCAL session_replication_role = replica;
         DELETE FROM levqor.audit_log WHERE tenant_id = '{}'; COMMIT;",
        a.id
    ))
    .unwrap();
    insert_rows(&mut c, &a, "items", &["after"]);
    seal(&mut su);
    assert!(!verify(&mut su, &a).0);
}

#[test]
fn bulk_statements_tables_without_a_key_and_awkward_column_names_are_audited_exactly() {
    let (_db, mut su) = fresh_db("audit_bulk");
    su.batch_execute(
        "CREATE TABLE odd (id int PRIMARY KEY, o text, n int, levqor_new int);
         SELECT levqor.enable_audit('odd');
         INSERT INTO odd SELECT g, 'o' || g, g, g FROM generate_series(1, 1000) g;
         UPDATE odd SET n = n + 1 WHERE id <= 10;
         UPDATE odd SET id = id + 5000 WHERE id = 1000;
         DELETE FROM odd WHERE id > 900;
         CREATE TABLE nokey (v int);
         SELECT levqor.enable_audit('nokey');
         INSERT INTO nokey SELECT g FROM generate_series(1, 5) g;
         UPDATE nokey SET v = v * 10;",
    )
    .unwrap();
    let mut count = |sql: &str| -> i64 { su.query_one(sql, &[]).unwrap().get(0) };
    assert_eq!(count("SELECT count(*) FROM levqor.audit_log WHERE table_name = 'public.odd' AND operation = 'INSERT'"), 1000);
    assert_eq!(
        count("SELECT count(*) FROM levqor.audit_log WHERE table_name = 'public.odd' AND operation = 'UPDATE' AND changed = '{n}'
                 AND (new_row->>'n')::int = (old_row->>'n')::int + 1 AND old_row->>'o' = new_row->>'o'"),
        10,
        "updates pair old and new by primary key, whatever the columns are called"
    );
    // A key change cannot be paired: it is recorded as the old row and the new row.
    assert_eq!(
        count("SELECT count(*) FROM levqor.audit_log WHERE table_name = 'public.odd' AND operation = 'UPDATE'
                 AND ((old_row->>'id' = '1000' AND new_row IS NULL) OR (new_row->>'id' = '6000' AND old_row IS NULL))"),
        2
    );
    assert_eq!(count("SELECT count(*) FROM levqor.audit_log WHERE table_name = 'public.odd' AND operation = 'DELETE'"), 100);
    assert_eq!(
        count("SELECT count(*) FROM levqor.audit_log WHERE table_name = 'public.nokey' AND operation = 'UPDATE'
                 AND (new_row->>'v')::int = (old_row->>'v')::int * 10"),
        5,
        "without a primary key, updates are audited row by row"
    );
    // Over a thousand entries of one chain seal into runs of at most 96
    // positions; the trail finds every entry's own position.
    while count("SELECT levqor.seal_audit(500)::int8") > 0 {}
    let entries = count("SELECT count(*) FROM levqor.audit_log WHERE tenant_id IS NULL");
    assert!(entries > 1100, "{entries}");
    assert_eq!(count("SELECT max(cardinality(ids))::int8 FROM levqor.audit_chain"), 96);
    assert_eq!(
        count(
            "SELECT count(*) FROM levqor.audit_trail t
              WHERE t.tenant_id IS NULL AND t.hash = (SELECT substr(c.hashes, k.o::int * 32 - 31, 32)
                                   FROM levqor.audit_chain c, unnest(c.ids) WITH ORDINALITY AS k(id, o)
                                  WHERE k.id = t.id AND c.first_seq + k.o - 1 = t.seq)"
        ),
        entries,
        "each entry, with its own position and hash"
    );
    assert_eq!(count("SELECT count(DISTINCT seq) FROM levqor.audit_trail WHERE tenant_id IS NULL"), entries);
    let r = su.query_one("SELECT ok, checked, reason FROM levqor.verify_audit()", &[]).unwrap();
    assert_eq!((r.get::<_, bool>(0), r.get::<_, i64>(1)), (true, entries), "{:?}", r.get::<_, Option<String>>(2));
}

/// Cache invalidations arrive inside whatever query runs, the audit
/// trigger's own insert included (autovacuum's ANALYZE of a busy table sends
/// one). A backend writing audited rows while another session keeps
/// invalidating the table must keep working (it once aborted).
#[test]
fn invalidations_arriving_during_audited_writes_are_harmless() {
    let (db, mut su) = fresh_db("audit_inval");
    let t = create_tenant_on(&mut su, "aud-inval");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let analyzer = {
        let (db, stop) = (db.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut c = connect_to(port(), "postgres", &db);
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.batch_execute("ANALYZE items; ANALYZE levqor.audit_log").unwrap();
                n += 1;
            }
            n
        })
    };
    let mut c = connect_to(port(), SERVER, &db);
    let started = std::time::Instant::now();
    let mut written = 0i64;
    while started.elapsed() < std::time::Duration::from_secs(2) {
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT levqor.set_tenant($1)", &[&t.slug]).unwrap();
        tx.execute("INSERT INTO items (body) VALUES ('x')", &[]).unwrap();
        tx.execute("UPDATE items SET body = 'y' WHERE body = 'x'", &[]).unwrap();
        tx.commit().unwrap();
        written += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(analyzer.join().unwrap() > 0);
    let entries: i64 = su
        .query_one("SELECT count(*) FROM levqor.audit_log WHERE tenant_id = $1 AND kind = 'row'", &[&t.id])
        .unwrap()
        .get(0);
    assert_eq!(entries, written * 2, "every insert and update recorded");
}

/// A one-row statement's entry is written without SPI (src/audit_direct.rs);
/// it must be the entry the set-based path writes for the same row.
#[test]
fn one_row_and_many_row_statements_write_the_same_entries() {
    let (db, mut su) = fresh_db("audit_same");
    su.batch_execute(&format!(
        "CREATE TABLE typed (id int PRIMARY KEY, n numeric, t timestamptz, j jsonb, a int[], b boolean, s text,
                             tenant_id uuid DEFAULT levqor.current_tenant());
         SELECT levqor.enable_audit('typed');
         GRANT SELECT, INSERT, UPDATE, DELETE ON typed TO {SERVER};"
    ))
    .unwrap();
    let t = create_tenant_on(&mut su, "aud-same");
    let user = uuid::Uuid::new_v4();
    su.execute("SELECT levqor.add_member($1, $2, 'operator')", &[&t.slug, &user]).unwrap();
    let mut s = connect_to(port(), SERVER, &db);
    s.batch_execute("SET application_name = 'same-check'").unwrap();
    let row = "123456789012345678901234567890.123456789, '2026-11-23 10:15:00.123456+00', '{\"k\": [1, \"é\"]}', '{1,2,NULL}', true, 'zoë \"quoted\"'";
    let mut tx = s.transaction().unwrap();
    tx.execute("SELECT levqor.set_tenant($1, user_id => $2, member_role => 'operator')", &[&t.slug, &user]).unwrap();
    tx.batch_execute(&format!(
        "INSERT INTO typed (id, n, t, j, a, b, s) VALUES (1, {row});
         INSERT INTO typed (id, n, t, j, a, b, s) VALUES (2, {row}), (3, {row});
         UPDATE typed SET s = NULL, n = n + 1 WHERE id = 1;
         UPDATE typed SET s = NULL, n = n + 1 WHERE id IN (2, 3);
         DELETE FROM typed WHERE id = 1;
         DELETE FROM typed WHERE id IN (2, 3);"
    ))
    .unwrap();
    tx.commit().unwrap();
    let differing: i64 = su
        .query_one(
            "WITH e AS (
                 SELECT operation, coalesce(new_row, old_row)->>'id' AS id, tenant_id, db_role, user_id, member_role,
                        application_name, client_addr, kind, table_name, changed, xid,
                        old_row - 'id' AS o, new_row - 'id' AS n, pk - 'id' AS pk_rest, pk ? 'id' AS has_pk
                   FROM levqor.audit_log WHERE table_name = 'public.typed')
             SELECT count(*) FROM e one JOIN e two ON two.operation = one.operation AND two.id = '2'
              WHERE one.id = '1'
                AND (one.tenant_id, one.db_role, one.user_id, one.member_role, one.application_name, one.client_addr,
                     one.kind, one.changed, one.xid, one.o, one.n, one.pk_rest, one.has_pk)
                    IS DISTINCT FROM
                    (two.tenant_id, two.db_role, two.user_id, two.member_role, two.application_name, two.client_addr,
                     two.kind, two.changed, two.xid, two.o, two.n, two.pk_rest, two.has_pk)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(differing, 0, "the one-row entries differ from the set-based ones");
    let pairs: i64 = su
        .query_one(
            "SELECT count(DISTINCT operation) FROM levqor.audit_log
              WHERE table_name = 'public.typed' AND coalesce(new_row, old_row)->>'id' = '1'
                AND tenant_id = $1 AND user_id = $2 AND application_name = 'same-check'",
            &[&t.id, &user],
        )
        .unwrap()
        .get(0);
    assert_eq!(pairs, 3, "insert, update and delete of the one-row statements, with who and where");
    let changed: Vec<String> = su
        .query_one(
            "SELECT changed FROM levqor.audit_log WHERE table_name = 'public.typed' AND operation = 'UPDATE'
                AND new_row->>'id' = '1'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(changed, ["n", "s"]);

    // A key of two columns, and a type the one-row path leaves to to_jsonb
    // (float8): the key object holds exactly the key's columns, both ways.
    su.batch_execute(&format!(
        "CREATE TABLE keyed (region text, n int, f float8, note text, PRIMARY KEY (region, n));
         SELECT levqor.enable_audit('keyed');
         GRANT SELECT, INSERT, UPDATE ON keyed TO {SERVER};"
    ))
    .unwrap();
    let mut tx = s.transaction().unwrap();
    tx.execute("SELECT levqor.set_tenant($1)", &[&t.slug]).unwrap();
    tx.batch_execute(
        "INSERT INTO keyed VALUES ('eu', 1, 0.5, 'one');
         INSERT INTO keyed VALUES ('eu', 2, 'NaN', 'two'), ('us', 1, '-Infinity', NULL);
         UPDATE keyed SET note = 'changed' WHERE region = 'eu' AND n = 1;
         UPDATE keyed SET note = 'changed' WHERE n = 1;",
    )
    .unwrap();
    tx.commit().unwrap();
    let (entries, right): (i64, i64) = {
        let r = su
            .query_one(
                "SELECT count(*),
                        count(*) FILTER (WHERE pk = jsonb_build_object('region', new_row->'region', 'n', new_row->'n')
                                           AND new_row ? 'f' AND new_row ? 'note')
                   FROM levqor.audit_log WHERE table_name = 'public.keyed'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((entries, right), (6, 6), "three inserts and three updates, each keyed by (region, n)");
}

#[test]
fn entries_with_hostile_text_seal_in_rust_and_verify_in_sql_alike() {
    // The sealer writes each entry's canonical form in Rust; verify_audit
    // recomputes it in SQL. Text that JSON must escape has to come out the same.
    let (db, mut su) = fresh_db("audit_hostile");
    let a = create_tenant_on(&mut su, "aud-h");
    let mut c = connect_to(port(), APP, &db);
    c.batch_execute("SET application_name = 'app \"quoted\" \\ back\tslash'").unwrap();
    let nasty = [
        "\"quotes\" and \\backslashes\\",
        "control \u{1} \u{8} \u{c} \u{1f} chars\r\n\ttabbed",
        "unicode: é ß 漢字 😀 \u{2028} \u{7f}",
        "{\"looks\": [\"like\", \"json\"]}",
        "",
    ];
    insert_rows(&mut c, &a, "items", &nasty);
    as_tenant(&mut c, &a, |tx| {
        tx.execute("UPDATE items SET body = body || ' \\u0000 \u{1}'", &[]).unwrap();
        tx.execute("DELETE FROM items WHERE body LIKE 'unicode%'", &[]).unwrap();
    });
    while seal(&mut su) > 0 {}
    let (ok, checked, bad, why) = verify(&mut su, &a);
    assert!(ok, "entry {bad:?}: {why:?}");
    assert_eq!(checked, 1 + 5 + 5 + 1, "tenant created, 5 inserts, 5 updates (one statement), 1 delete");
    let app: String = su
        .query_one("SELECT DISTINCT application_name FROM levqor.audit_log WHERE kind = 'row' AND tenant_id = $1", &[&a.id])
        .unwrap()
        .get(0);
    assert_eq!(app, "app \"quoted\" \\ back?slash", "as PostgreSQL keeps it (non-printable characters become ?)");
}

#[test]
fn every_shape_of_json_seals_in_rust_and_verifies_in_sql_alike() {
    // The sealer reads jsonb's binary form itself (src/seal.rs); verify_audit
    // uses jsonb's own text output. Objects past 32 keys (where offsets are
    // stored instead of lengths), nesting, numbers, scalars and empties.
    let (_db, mut su) = fresh_db("audit_json");
    su.batch_execute(
        "CREATE TABLE docs (id int PRIMARY KEY, j jsonb, n numeric);
         SELECT levqor.enable_audit('docs');
         INSERT INTO docs VALUES
           (1, (SELECT jsonb_object_agg('key' || g, CASE g % 5 WHEN 0 THEN to_jsonb(g) WHEN 1 THEN to_jsonb('v' || repeat('x', g))
                                                           WHEN 2 THEN 'null' WHEN 3 THEN to_jsonb(g % 2 = 0) ELSE jsonb_build_array(g, '{}'::jsonb, '[]'::jsonb) END)
                  FROM generate_series(1, 70) g), 0),
           (2, '[0, -1.5e-10, 1e100, 123456789012345678901234567890.5, -0, 3.000]', -12.5),
           (3, '{\"a\": {\"b\": {\"c\": [[[\"deep\", {\"\": \"empty key\"}]]]}}, \"esc\": \"\\\"q\\\" \\\\ \\n \\u0001 é 😀\"}', 1e-20),
           (4, '\"a raw string\"', NULL), (5, '42', NULL), (6, 'null', NULL), (7, 'true', NULL), (8, '{}', NULL), (9, '[]', NULL),
           (10, (SELECT jsonb_agg(g) FROM generate_series(1, 100) g), NULL);
         UPDATE docs SET j = j || '{\"added\": [1, 2]}'::jsonb WHERE jsonb_typeof(j) = 'object';
         DELETE FROM docs WHERE id IN (2, 10);",
    )
    .unwrap();
    while su.query_one("SELECT levqor.seal_audit()", &[]).unwrap().get::<_, i32>(0) > 0 {}
    let r = su.query_one("SELECT ok, checked, first_bad_id, reason FROM levqor.verify_audit()", &[]).unwrap();
    let (ok, checked): (bool, i64) = (r.get(0), r.get(1));
    assert!(ok, "entry {:?}: {:?}", r.get::<_, Option<i64>>(2), r.get::<_, Option<String>>(3));
    assert!(checked >= 10 + 3 + 2, "{checked}");
}

#[test]
fn databases_in_latin1_and_sql_ascii_seal_and_verify() {
    // The SQL form hashes convert_to(…, 'UTF8'); the sealer reads the server
    // encoding's bytes and converts them alike (SQL_ASCII: as they are).
    let _ = db();
    for encoding in ["LATIN1", "SQL_ASCII"] {
        let name = unique("audit_enc");
        connect_to(port(), "postgres", "postgres")
            .batch_execute(&format!("CREATE DATABASE {name} ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"))
            .unwrap();
        let mut su = connect_to(port(), "postgres", &name);
        su.batch_execute(
            "CREATE EXTENSION levqor;
             CREATE TABLE notes (id int PRIMARY KEY, body text, tags text[]);
             SELECT levqor.enable_audit('notes');
             INSERT INTO notes VALUES (1, 'café ß ü', '{naïve}'), (2, 'plain', NULL);
             UPDATE notes SET body = body || ' ÿ', tags = tags || 'ñ'::text WHERE id = 1;",
        )
        .unwrap();
        while seal(&mut su) > 0 {}
        let r = su.query_one("SELECT ok, checked, first_bad_id, reason FROM levqor.verify_audit()", &[]).unwrap();
        let (ok, checked): (bool, i64) = (r.get(0), r.get(1));
        assert!(ok, "{encoding}: entry {:?}: {:?}", r.get::<_, Option<i64>>(2), r.get::<_, Option<String>>(3));
        assert!(checked >= 3, "{encoding}: {checked}");
        let body: String =
            su.query_one("SELECT new_row->>'body' FROM levqor.audit_log WHERE operation = 'UPDATE'", &[]).unwrap().get(0);
        assert_eq!(body, "café ß ü ÿ", "{encoding}");
    }
}

#[test]
fn entries_reach_every_index_of_the_log_even_ones_a_dba_added() {
    // Entries and chain runs go in with the index AM directly while every
    // index is over plain columns, and through the executor when one is not.
    // amcheck's heapallindexed checks that each row is in each index.
    let (db, mut su) = fresh_db("audit_ix");
    su.batch_execute("CREATE EXTENSION IF NOT EXISTS amcheck").unwrap();
    let a = create_tenant_on(&mut su, "aud-ix");
    let mut c = connect_to(port(), APP, &db);
    let check = |su: &mut Client| {
        for r in su
            .query(
                "SELECT i.indexrelid::regclass::text FROM pg_index i
                  WHERE i.indrelid IN ('levqor.audit_log'::regclass, 'levqor.audit_chain'::regclass)",
                &[],
            )
            .unwrap()
        {
            let index: String = r.get(0);
            su.execute("SELECT bt_index_check($1::text::regclass, true)", &[&index]).unwrap_or_else(|e| panic!("{index}: {e}"));
        }
    };
    for i in 0..5 {
        insert_rows(&mut c, &a, "items", &[&format!("plain {i}")]);
    }
    while seal(&mut su) > 0 {}
    check(&mut su);

    su.batch_execute(
        "CREATE INDEX audit_log_lower_table ON levqor.audit_log ((lower(table_name))) WHERE kind = 'row';
         CREATE INDEX audit_chain_partial ON levqor.audit_chain (sealed_at) WHERE first_seq > 0;",
    )
    .unwrap();
    for i in 0..5 {
        insert_rows(&mut c, &a, "items", &[&format!("with an expression index {i}")]);
    }
    while seal(&mut su) > 0 {}
    check(&mut su);
    let by_index: i64 = su
        .query_one("SELECT count(*) FROM levqor.audit_log WHERE lower(table_name) = 'public.items' AND kind = 'row'", &[])
        .unwrap()
        .get(0);
    assert_eq!(by_index, 10);
    let (ok, checked, bad, why) = verify(&mut su, &a);
    assert!(ok, "entry {bad:?}: {why:?}");
    assert_eq!(checked, 11, "tenant created and 10 inserts");
    su.batch_execute("DROP INDEX levqor.audit_log_lower_table, levqor.audit_chain_partial").unwrap();

    // Writers remember the log's indexes between statements; an index a DBA
    // adds or drops on a busy log, CONCURRENTLY, must reach them.
    insert_rows(&mut c, &a, "items", &["plain again"]);
    su.batch_execute("CREATE INDEX CONCURRENTLY audit_log_at ON levqor.audit_log (at)").unwrap();
    for i in 0..3 {
        insert_rows(&mut c, &a, "items", &[&format!("with an index added concurrently {i}")]);
    }
    while seal(&mut su) > 0 {}
    check(&mut su);
    su.batch_execute("DROP INDEX CONCURRENTLY levqor.audit_log_at").unwrap();
    for i in 0..3 {
        insert_rows(&mut c, &a, "items", &[&format!("after a concurrent drop {i}")]);
    }
    while seal(&mut su) > 0 {}
    check(&mut su);
    let (ok, checked, bad, why) = verify(&mut su, &a);
    assert!(ok, "entry {bad:?}: {why:?}");
    assert_eq!(checked, 18, "tenant created and 17 inserts");
}

/// A database levqor's worker serves can be dropped without FORCE: the
/// worker leaves it when it sees the DROP DATABASE waiting.
#[test]
fn a_database_the_worker_serves_can_be_dropped() {
    let _ = db();
    let mut su = connect_to(port(), "postgres", "postgres");
    su.batch_execute("DROP DATABASE IF EXISTS levqor_dropped WITH (FORCE)").unwrap();
    su.batch_execute("CREATE DATABASE levqor_dropped").unwrap();
    connect_to(port(), "postgres", "levqor_dropped").batch_execute("CREATE EXTENSION levqor").unwrap();
    let connected = || -> bool {
        connect_to(port(), "postgres", "postgres")
            .query_one(
                "SELECT count(*) > 0 FROM pg_stat_activity WHERE backend_type = 'levqor worker' AND datname = 'levqor_dropped'",
                &[],
            )
            .unwrap()
            .get(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !connected() {
        assert!(std::time::Instant::now() < deadline, "the worker never connected to levqor_dropped");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let started = std::time::Instant::now();
    su.batch_execute("DROP DATABASE levqor_dropped").unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "dropped in {:?}", started.elapsed());
}

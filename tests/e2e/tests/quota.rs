//! Plan quotas: consume(), row limits under concurrency, storage limits, the
//! usage view, threshold events, the billing ledger, and what survives a
//! clean restart and a crash.

use std::sync::{Arc, Barrier};

use postgres::fallible_iterator::FallibleIterator;

use levqor_e2e::*;

/// A counter metric of its own for one test (default limit, no window).
fn counter_metric(limit: Option<i64>, reset_every: Option<&str>) -> String {
    let name = unique("calls");
    admin()
        .execute(
            "SELECT levqor.define_metric($1, 'counter', $2::text::interval, $3)",
            &[&name, &reset_every, &limit],
        )
        .unwrap();
    name
}

fn consume(c: &mut impl postgres::GenericClient, metric: &str, amount: i64) -> Result<Option<i64>, Error> {
    c.query_one("SELECT levqor.consume($1, $2)", &[&metric, &amount]).map(|r| r.get(0))
}

fn used(c: &mut impl postgres::GenericClient, tenant: &Tenant, metric: &str) -> Option<i64> {
    c.query_one("SELECT used FROM levqor.usage WHERE tenant_id = $1 AND metric = $2", &[&tenant.id, &metric])
        .unwrap()
        .get(0)
}

#[test]
fn consume_counts_refuses_past_the_limit_and_counts_nothing_refused() {
    let t = tenant("q-consume");
    let m = counter_metric(Some(10), None);
    let mut c = app();
    let left = as_tenant(&mut c, &t, |tx| (consume(tx, &m, 3).unwrap(), consume(tx, &m, 6).unwrap()));
    assert_eq!(left, (Some(7), Some(1)));

    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
    let (code, message) = error_of(consume(&mut tx, &m, 2));
    assert_eq!(code, "53400");
    assert!(message.contains(&t.slug) && message.contains(&m) && message.contains("10"), "{message}");
    drop(tx);
    // The refused 2 were not counted: 1 is still there.
    assert_eq!(as_tenant(&mut c, &t, |tx| consume(tx, &m, 1).unwrap()), Some(0));
    assert_eq!(used(&mut admin(), &t, &m), Some(10));
}

#[test]
fn an_aborted_transaction_or_savepoint_gives_its_consumption_back() {
    let t = tenant("q-abort");
    let m = counter_metric(Some(5), None);
    let mut c = app();
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
    consume(&mut tx, &m, 4).unwrap();
    tx.rollback().unwrap();

    as_tenant(&mut c, &t, |tx| {
        consume(tx, &m, 1).unwrap();
        tx.batch_execute("SAVEPOINT s").unwrap();
        consume(tx, &m, 3).unwrap();
        tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
        // A released (committed) savepoint keeps its consumption.
        tx.batch_execute("SAVEPOINT k").unwrap();
        consume(tx, &m, 2).unwrap();
        tx.batch_execute("RELEASE SAVEPOINT k").unwrap();
    });
    assert_eq!(used(&mut admin(), &t, &m), Some(3));
    // A transaction that errors after consuming gives it back too.
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
    consume(&mut tx, &m, 2).unwrap();
    assert!(tx.batch_execute("SELECT 1/0").is_err());
    drop(tx);
    assert_eq!(used(&mut admin(), &t, &m), Some(3));
    // Quota reservations cannot be handed to a prepared transaction.
    let mut su = superuser();
    let mut tx = su.transaction().unwrap();
    tx.execute("SELECT levqor.set_tenant($1)", &[&t.slug]).unwrap();
    consume(&mut tx, &m, 1).unwrap();
    assert_eq!(sqlstate(tx.batch_execute("PREPARE TRANSACTION 'levqor_q'")), "0A000");
}

#[test]
fn consume_refuses_bad_calls() {
    let t = tenant("q-bad");
    let m = counter_metric(Some(5), None);
    let mut c = app();
    // No context: nobody to count against.
    assert_eq!(sqlstate(consume(&mut c, &m, 1)), "42501");
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
    tx.batch_execute("SAVEPOINT s").unwrap();
    assert_eq!(sqlstate(consume(&mut tx, "no_such_metric", 1)), "42704");
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    assert_eq!(sqlstate(consume(&mut tx, &m, 0)), "22023");
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    assert_eq!(sqlstate(consume(&mut tx, &m, -5)), "22023");
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    assert_eq!(sqlstate(consume(&mut tx, "users", 1)), "22023", "rows metrics are not consumed");
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    assert_eq!(sqlstate(consume(&mut tx, "storage_bytes", 1)), "22023");
    drop(tx);
    // Only levqor_admin defines metrics and sets quotas; windows are checked.
    assert_eq!(sqlstate(c.execute("SELECT levqor.set_quota($1, $2, 100)", &[&t.slug, &m])), "42501");
    assert_eq!(sqlstate(admin().execute("SELECT levqor.define_metric('odd', 'counter', '1 month 2 days')", &[])), "22023");
    assert_eq!(sqlstate(admin().execute("SELECT levqor.define_metric('Bad Name')", &[])), "23514");
    assert_eq!(sqlstate(admin().execute("SELECT levqor.set_quota($1, $2, -1)", &[&t.slug, &m])), "22023");
    // Plans' limits are numbers or null.
    assert_eq!(
        sqlstate(superuser().execute("UPDATE levqor.plans SET limits = '{\"users\": \"lots\"}' WHERE name = 'free'", &[])),
        "23514"
    );
}

#[test]
fn unlimited_plans_never_refuse_and_overrides_replace_the_plan() {
    let t = tenant("q-unl");
    let mut a = admin();
    // The free plan allows 100 API calls per 15 minutes; enterprise is unlimited.
    a.execute("SELECT levqor.change_plan($1, 'enterprise')", &[&t.slug]).unwrap();
    let mut c = app();
    let left = as_tenant(&mut c, &t, |tx| consume(tx, "api_calls_per_15min", 1_000_000).unwrap());
    assert_eq!(left, None, "unlimited: nothing is 'left'");
    // An override caps even an unlimited plan, from the next transaction.
    a.execute("SELECT levqor.set_quota($1, 'api_calls_per_15min', 1000005, 'contract')", &[&t.slug]).unwrap();
    let left = as_tenant(&mut c, &t, |tx| consume(tx, "api_calls_per_15min", 5).unwrap());
    assert_eq!(left, Some(0));
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
    assert_eq!(sqlstate(consume(&mut tx, "api_calls_per_15min", 1)), "53400");
    drop(tx);
    assert!(a.query_one("SELECT levqor.clear_quota($1, 'api_calls_per_15min')", &[&t.slug]).unwrap().get::<_, bool>(0));
    as_tenant(&mut c, &t, |tx| consume(tx, "api_calls_per_15min", 1).unwrap());
    // Both changes are in the tenant's audit trail.
    let events: i64 = a
        .query_one(
            "SELECT count(*) FROM levqor.audit_log WHERE tenant_id = $1
                AND event IN ('quota_override_set', 'quota_override_cleared')",
            &[&t.id],
        )
        .unwrap()
        .get(0);
    assert_eq!(events, 2);
}

#[test]
fn windows_roll_over_by_themselves() {
    let t = tenant("q-window");
    let m = counter_metric(Some(2), Some("1 second"));
    let mut c = app();
    // Start right after a second boundary so the three calls share a window.
    let start = |c: &mut Client| -> f64 { c.query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[]).unwrap().get(0) };
    loop {
        let now = start(&mut c);
        if now.fract() < 0.5 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
    assert_eq!(consume(&mut tx, &m, 2).unwrap(), Some(0));
    let (code, message) = error_of(consume(&mut tx, &m, 1));
    assert_eq!(code, "53400");
    drop(tx);
    let _ = message;
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(as_tenant(&mut c, &t, |tx| consume(tx, &m, 2).unwrap()), Some(0), "a new window starts from zero");
    let row = admin()
        .query_one(
            "SELECT window_start IS NOT NULL AND window_end = window_start + interval '1 second'
               FROM levqor.usage WHERE tenant_id = $1 AND metric = $2",
            &[&t.id, &m],
        )
        .unwrap();
    assert!(row.get::<_, bool>(0));
}

/// A table whose rows count against a rows metric of its own (default limit).
fn limited_table(limit: i64) -> (String, String) {
    let table = protected_table("q_rows");
    let metric = unique("seats");
    admin().execute("SELECT levqor.define_metric($1, 'rows', NULL, $2)", &[&metric, &limit]).unwrap();
    superuser().execute(&format!("SELECT levqor.limit_rows('{table}', $1)"), &[&metric]).unwrap();
    superuser()
        .batch_execute(&format!("CREATE UNIQUE INDEX ON {table} (tenant_id, body)"))
        .unwrap();
    (table, metric)
}

#[test]
fn concurrent_inserts_never_overshoot_a_row_limit() {
    let (table, metric) = limited_table(25);
    let t = tenant("q-race");
    let other = tenant("q-race-other");
    const CLIENTS: usize = 8;
    const EACH: usize = 10;
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let handles: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (t, table, barrier) = (t.clone(), table.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut c = app();
                barrier.wait();
                let mut ok = 0;
                for j in 0..EACH {
                    let mut tx = c.transaction().unwrap();
                    tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
                    match tx.execute(&format!("INSERT INTO {table} (body) VALUES ($1)"), &[&format!("{i}-{j}")]) {
                        Ok(_) => {
                            tx.commit().unwrap();
                            ok += 1;
                        }
                        Err(e) => assert_eq!(e.code().unwrap().code(), "53400", "{e}"),
                    }
                }
                ok
            })
        })
        .collect();
    let inserted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(inserted, 25, "exactly the limit got in");
    let mut su = superuser();
    let n: i64 = su.query_one(&format!("SELECT count(*) FROM {table} WHERE tenant_id = $1"), &[&t.id]).unwrap().get(0);
    assert_eq!(n, 25);
    // Another tenant has its own room.
    insert_rows(&mut app(), &other, &table, &["x"]);
    assert_eq!(used(&mut admin(), &t, &metric), Some(25));
    assert_eq!(used(&mut admin(), &other, &metric), Some(1));
}

#[test]
fn deletes_free_room_when_they_commit_and_skipped_rows_cost_nothing() {
    let (table, _metric) = limited_table(3);
    let t = tenant("q-del");
    let mut c = app();
    insert_rows(&mut c, &t, &table, &["a", "b", "c"]);
    let full = |c: &mut Client| {
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
        tx.execute(&format!("INSERT INTO {table} (body) VALUES ($1)"), &[&unique("extra")]).map(|_| ())
    };
    assert_eq!(sqlstate(full(&mut c)), "53400");
    // A delete that rolls back frees nothing; one still open frees nothing yet.
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
    tx.execute(&format!("DELETE FROM {table} WHERE body = 'a'"), &[]).unwrap();
    let mut c2 = app();
    assert_eq!(sqlstate(full(&mut c2)), "53400", "the delete has not committed");
    tx.rollback().unwrap();
    assert_eq!(sqlstate(full(&mut c)), "53400");
    // A committed delete frees a row.
    as_tenant(&mut c, &t, |tx| tx.execute(&format!("DELETE FROM {table} WHERE body = 'a'"), &[]).unwrap());
    // ON CONFLICT DO NOTHING on an existing row does not count.
    as_tenant(&mut c, &t, |tx| {
        let n = tx.execute(&format!("INSERT INTO {table} (body) VALUES ('b') ON CONFLICT DO NOTHING"), &[]).unwrap();
        assert_eq!(n, 0);
    });
    as_tenant(&mut c, &t, |tx| tx.execute(&format!("INSERT INTO {table} (body) VALUES ('d')"), &[]).unwrap());
    assert_eq!(sqlstate(full(&mut c)), "53400");
    // A multi-row insert past the limit is refused whole.
    as_tenant(&mut c, &t, |tx| tx.execute(&format!("DELETE FROM {table} WHERE body IN ('b', 'c')"), &[]).unwrap());
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
    assert_eq!(sqlstate(tx.execute(&format!("INSERT INTO {table} (body) VALUES ('x'), ('y'), ('z')"), &[])), "53400");
    drop(tx);
    as_tenant(&mut c, &t, |tx| tx.execute(&format!("INSERT INTO {table} (body) VALUES ('x'), ('y')"), &[]).unwrap());
    let n: i64 = superuser().query_one(&format!("SELECT count(*) FROM {table} WHERE tenant_id = $1"), &[&t.id]).unwrap().get(0);
    assert_eq!(n, 3);
}

#[test]
fn row_limits_cannot_be_switched_off_by_the_owner() {
    let (table, _metric) = limited_table(3);
    let mut su = superuser();
    assert_eq!(sqlstate(su.batch_execute(&format!("TRUNCATE {table}"))), "0A000");
    assert_eq!(sqlstate(su.batch_execute(&format!("DROP TRIGGER levqor_limit_rows ON {table}"))), "42501");
    assert_eq!(
        sqlstate(su.batch_execute(&format!("ALTER TABLE {table} DISABLE TRIGGER levqor_limit_rows_before"))),
        "42501"
    );
    assert_eq!(
        sqlstate(su.batch_execute(&format!("ALTER TABLE {table} ENABLE REPLICA TRIGGER levqor_limit_rows"))),
        "42501"
    );
    // An application cannot remove it either; a levqor_admin can.
    assert_eq!(sqlstate(app().execute(&format!("SELECT levqor.unlimit_rows('{table}')"), &[])), "42501");
    admin().execute(&format!("SELECT levqor.unlimit_rows('{table}')"), &[]).unwrap();
    let t = tenant("q-unlimited");
    insert_rows(&mut app(), &t, &table, &["1", "2", "3", "4"]);
}

#[test]
fn limit_rows_refuses_what_it_cannot_count() {
    let table = protected_table("q_lr_bad");
    let mut su = superuser();
    assert_eq!(sqlstate(su.execute(&format!("SELECT levqor.limit_rows('{table}', 'no_such')"), &[])), "42704");
    assert_eq!(sqlstate(su.execute(&format!("SELECT levqor.limit_rows('{table}', 'api_calls_per_15min')"), &[])), "22023");
    let plain = unique("q_plain");
    su.batch_execute(&format!("CREATE TABLE {plain} (id int)")).unwrap();
    let m = unique("seats");
    admin().execute("SELECT levqor.define_metric($1, 'rows')", &[&m]).unwrap();
    assert_eq!(sqlstate(su.execute(&format!("SELECT levqor.limit_rows('{plain}', $1)"), &[&m])), "22023");
    assert_eq!(sqlstate(su.execute(&format!("SELECT levqor.limit_rows('{plain}', $1, 'id')"), &[&m])), "42703");
    // Only the table's owner limits it.
    assert_eq!(sqlstate(app().execute(&format!("SELECT levqor.limit_rows('{table}', $1)"), &[&m])), "42501");
    su.execute(&format!("SELECT levqor.limit_rows('{table}', $1)"), &[&m]).unwrap();
    // One table per metric...
    let second = protected_table("q_lr_second");
    assert_eq!(sqlstate(su.execute(&format!("SELECT levqor.limit_rows('{second}', $1)"), &[&m])), "42710");
    // ... until that table is dropped.
    su.batch_execute(&format!("DROP TABLE {table}")).unwrap();
    su.execute(&format!("SELECT levqor.limit_rows('{second}', $1)"), &[&m]).unwrap();
}

#[test]
fn a_downgrade_below_the_rows_in_use_is_refused() {
    let table = protected_table("q_plan");
    let mut su = superuser();
    // The plans' own "projects" metric, as the seed's plan table has it.
    let projects_free = su.query_one("SELECT (limits->>'projects')::int FROM levqor.plans WHERE name = 'free'", &[]).unwrap();
    let free: i32 = projects_free.get(0);
    // (The only test of this binary that counts rows against "projects".)
    su.execute(&format!("SELECT levqor.limit_rows('{table}', 'projects')"), &[]).unwrap();
    let t = tenant("q-plan");
    admin().execute("SELECT levqor.change_plan($1, 'starter')", &[&t.slug]).unwrap();
    let bodies: Vec<String> = (0..=free).map(|i| format!("p{i}")).collect();
    let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
    insert_rows(&mut app(), &t, &table, &refs);
    let (code, message) = error_of(admin().execute("SELECT levqor.change_plan($1, 'free')", &[&t.slug]));
    assert_eq!(code, "23514");
    assert!(message.contains("projects"), "{message}");
    admin().execute("SELECT levqor.change_plan($1, 'free', force => true)", &[&t.slug]).unwrap();
    // Forced below its limit: keeps its rows, adds none.
    let mut c = app();
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
    assert_eq!(sqlstate(tx.execute(&format!("INSERT INTO {table} (body) VALUES ('more')"), &[])), "53400");
}

#[test]
fn usage_shows_a_tenant_only_its_own_numbers() {
    let a = tenant("q-view-a");
    let b = tenant("q-view-b");
    let m = counter_metric(Some(100), Some("1 day"));
    let mut c = app();
    as_tenant(&mut c, &a, |tx| consume(tx, &m, 7).unwrap());
    as_tenant(&mut c, &b, |tx| consume(tx, &m, 9).unwrap());
    let seen = as_tenant(&mut c, &a, |tx| {
        let rows = tx.query("SELECT DISTINCT tenant_id FROM levqor.usage", &[]).unwrap();
        let live = tx.query("SELECT DISTINCT tenant_id FROM levqor._usage_live()", &[]).unwrap();
        let mine: (i64, i64, String) = {
            let r = tx.query_one(r#"SELECT used, "limit", percent::text FROM levqor.usage WHERE metric = $1"#, &[&m]).unwrap();
            (r.get(0), r.get(1), r.get(2))
        };
        (rows.iter().map(|r| r.get::<_, uuid::Uuid>(0)).collect::<Vec<_>>(), live.len(), mine)
    });
    assert_eq!(seen.0, vec![a.id]);
    assert_eq!(seen.1, 1, "the live counters show only the context's tenant");
    assert_eq!(seen.2, (7, 100, "7.0".to_string()));
    // Without a context: nothing.
    assert_eq!(c.query("SELECT * FROM levqor.usage", &[]).unwrap().len(), 0);
    assert_eq!(c.query("SELECT * FROM levqor._usage_live()", &[]).unwrap().len(), 0);
    // A levqor_admin sees both.
    assert_eq!(used(&mut admin(), &b, &m), Some(9));
    // Tables behind it are not the application's to read.
    assert_eq!(sqlstate(c.query("SELECT * FROM levqor.usage_counters", &[])), "42501");
    assert_eq!(sqlstate(c.query("SELECT * FROM levqor.usage_ledger", &[])), "42501");
}

#[test]
fn flushing_fills_the_ledger_once_and_raises_each_threshold_once() {
    let t = tenant("q-flush");
    let m = counter_metric(Some(10), Some("1 day"));
    let mut listener = admin();
    listener.batch_execute("LISTEN levqor_quota").unwrap();
    let mut c = app();
    let mut a = admin();
    as_tenant(&mut c, &t, |tx| consume(tx, &m, 5).unwrap());
    a.execute("SELECT levqor.flush_usage()", &[]).unwrap();
    as_tenant(&mut c, &t, |tx| consume(tx, &m, 3).unwrap());
    a.execute("SELECT levqor.flush_usage()", &[]).unwrap();
    a.execute("SELECT levqor.flush_usage()", &[]).unwrap(); // nothing new: nothing appended
    let ledger: Vec<i64> = a
        .query("SELECT quantity FROM levqor.usage_ledger WHERE tenant_id = $1 AND metric = $2 ORDER BY id", &[&t.id, &m])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ledger, vec![5, 3]);
    as_tenant(&mut c, &t, |tx| consume(tx, &m, 2).unwrap());
    a.execute("SELECT levqor.flush_usage()", &[]).unwrap();
    a.execute("SELECT levqor.flush_usage()", &[]).unwrap();

    let thresholds: Vec<i32> = a
        .query("SELECT threshold FROM levqor.quota_alerts WHERE tenant_id = $1 AND metric = $2 ORDER BY 1", &[&t.id, &m])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(thresholds, vec![80, 100]);
    // One NOTIFY per crossing, carrying only the alert's id.
    let mut got = Vec::new();
    let mut n = listener.notifications();
    let mut it = n.timeout_iter(std::time::Duration::from_secs(2));
    while let Some(note) = it.next().unwrap() {
        got.push(note.payload().to_string());
    }
    let mine: Vec<(i32, String)> = got
        .iter()
        .filter_map(|p| p.parse::<i64>().ok())
        .filter_map(|id| {
            a.query_opt("SELECT threshold, metric FROM levqor.quota_alerts WHERE id = $1 AND tenant_id = $2", &[&id, &t.id])
                .unwrap()
                .map(|r| (r.get(0), r.get(1)))
        })
        .collect();
    assert_eq!(mine, vec![(80, m.clone()), (100, m.clone())], "{got:?}");
    assert!(got.iter().all(|p| p.parse::<i64>().is_ok()), "payloads are ids only: {got:?}");
    // And in the tenant's audit trail.
    let events: i64 = a
        .query_one(
            "SELECT count(*) FROM levqor.audit_log WHERE tenant_id = $1 AND event = 'quota_threshold' AND detail->>'metric' = $2",
            &[&t.id, &m],
        )
        .unwrap()
        .get(0);
    assert_eq!(events, 2);
}

#[test]
fn the_ledger_is_append_only_and_consumers_keep_their_place() {
    let t = tenant("q-ledger");
    let m = counter_metric(None, None);
    let mut a = admin();
    let mut c = app();
    as_tenant(&mut c, &t, |tx| consume(tx, &m, 4).unwrap());
    a.execute("SELECT levqor.flush_usage()", &[]).unwrap();
    let consumer = unique("stripe").replace('_', "-");
    let mine = |a: &mut Client| -> Vec<(i64, i64)> {
        a.query("SELECT id, quantity FROM levqor.ledger_read($1, 100000) WHERE metric = $2", &[&consumer, &m])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    let first = mine(&mut a);
    assert_eq!(first.iter().map(|e| e.1).collect::<Vec<_>>(), vec![4]);
    assert_eq!(mine(&mut a), first, "reading does not move the cursor");
    let last: i64 = a.query_one("SELECT max(id) FROM levqor.ledger_read($1, 100000)", &[&consumer]).unwrap().get(0);
    a.execute("SELECT levqor.ledger_advance($1, $2)", &[&consumer, &last]).unwrap();
    assert!(mine(&mut a).is_empty());
    as_tenant(&mut c, &t, |tx| consume(tx, &m, 6).unwrap());
    a.execute("SELECT levqor.flush_usage()", &[]).unwrap();
    assert_eq!(mine(&mut a).iter().map(|e| e.1).collect::<Vec<_>>(), vec![6]);
    assert_eq!(sqlstate(a.execute("SELECT levqor.ledger_advance($1, $2)", &[&consumer, &(last - 1)])), "22023");
    assert_eq!(sqlstate(a.execute("SELECT levqor.ledger_advance('nobody-here', 1)", &[])), "42704");
    // Nobody edits the ledger, not even a superuser.
    let mut su = superuser();
    assert_eq!(sqlstate(su.execute("UPDATE levqor.usage_ledger SET quantity = 1 WHERE id = $1", &[&last])), "42501");
    assert_eq!(sqlstate(su.execute("DELETE FROM levqor.usage_ledger WHERE id = $1", &[&last])), "42501");
    assert_eq!(sqlstate(su.batch_execute("TRUNCATE levqor.usage_ledger")), "42501");
    assert_eq!(sqlstate(a.execute("DELETE FROM levqor.usage_ledger", &[])), "42501");
}

#[test]
fn a_tenant_over_its_storage_limit_may_delete_but_not_grow() {
    let table = protected_table("q_storage");
    let t = tenant("q-storage");
    let mut c = app();
    insert_rows(&mut c, &t, &table, &["some data", "more data"]);
    let mut a = admin();
    a.execute("SELECT levqor.set_quota($1, 'storage_bytes', 10)", &[&t.slug]).unwrap();
    a.execute("SELECT levqor.refresh_storage()", &[]).unwrap();
    let bytes = used(&mut a, &t, "storage_bytes").unwrap();
    assert!(bytes > 10, "measured {bytes}");
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
    tx.batch_execute("SAVEPOINT s").unwrap();
    assert_eq!(sqlstate(tx.execute(&format!("INSERT INTO {table} (body) VALUES ('x')"), &[])), "53400");
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    assert_eq!(sqlstate(tx.execute(&format!("UPDATE {table} SET body = body || body"), &[])), "53400");
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    assert_eq!(tx.execute(&format!("DELETE FROM {table} WHERE body = 'more data'"), &[]).unwrap(), 1);
    tx.commit().unwrap();
    a.execute("SELECT levqor.set_quota($1, 'storage_bytes', 1000000)", &[&t.slug]).unwrap();
    a.execute("SELECT levqor.refresh_storage()", &[]).unwrap();
    insert_rows(&mut c, &t, &table, &["room again"]);
}

#[test]
fn without_shared_preload_libraries_quotas_refuse_clearly() {
    let db = nopreload_db();
    let mut su = connect_to(nopreload_port(), "postgres", db);
    let t = create_tenant_on(&mut su, "q-nopre");
    let mut c = connect_to(nopreload_port(), APP, db);
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
    let (code, message) = error_of(tx.query_one("SELECT levqor.consume('api_calls_per_15min')", &[]));
    assert_eq!(code, "55000");
    assert!(message.contains("shared_preload_libraries"), "{message}");
    drop(tx);
    let table = unique("q_np");
    su.batch_execute(&format!("CREATE TABLE {table} (id int); SELECT levqor.enable_tenancy('{table}')")).unwrap();
    assert_eq!(sqlstate(su.execute(&format!("SELECT levqor.limit_rows('{table}', 'users')"), &[])), "55000");
}

/// Clean restart: nothing lost even though nothing was flushed; crash: what
/// was flushed survives, the rest is lost (bounded by the flush interval)
/// and never over-billed. On a cluster of its own, in a database the worker
/// does not serve, so only levqor.flush_usage() here writes the tables.
#[test]
fn counters_survive_a_clean_restart_and_a_crash_loses_only_unflushed_counts() {
    let port = restart_port();
    let mut su = connect_when_up(port, "postgres", "postgres");
    let name = unique("q_durable");
    su.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    let mut su = connect_to(port, "postgres", &name);
    su.batch_execute("CREATE EXTENSION levqor").unwrap();
    let t = create_tenant_on(&mut su, "q-dur");
    // Unlimited and never reset, so the numbers cannot roll over mid-test.
    su.batch_execute("SELECT levqor.define_metric('durable_calls')").unwrap();
    let consume_n = |n: i64| {
        let mut c = connect_when_up(port, "postgres", &name);
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT levqor.set_tenant($1)", &[&t.slug]).unwrap();
        for _ in 0..n {
            tx.query_one("SELECT levqor.consume('durable_calls')", &[]).unwrap();
        }
        tx.commit().unwrap();
    };
    let ledger_total = |c: &mut Client| -> i64 {
        c.query_one("SELECT coalesce(sum(quantity), 0)::int8 FROM levqor.usage_ledger", &[]).unwrap().get(0)
    };
    let live_used = |c: &mut Client| -> i64 {
        c.query_one("SELECT used FROM levqor.usage WHERE metric = 'durable_calls'", &[]).unwrap().get(0)
    };

    consume_n(40);
    drop(su);
    pg_ctl("e2e-restart", &["restart", "-m", "fast"]);
    let mut su = connect_when_up(port, "postgres", &name);
    assert_eq!(live_used(&mut su), 40, "the counter came back from the clean shutdown");
    su.execute("SELECT levqor.flush_usage()", &[]).unwrap();
    assert_eq!(ledger_total(&mut su), 40, "and was billed once");

    consume_n(7);
    su.execute("SELECT levqor.flush_usage()", &[]).unwrap();
    consume_n(5); // committed, not flushed: a crash may lose these
    // A backend killed mid-flight: PostgreSQL restarts every process and
    // reinitializes shared memory, as after any crash.
    let mut victim = connect_to(port, "postgres", &name);
    let pid: i32 = victim.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let killed = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
    assert!(victim.query_one("SELECT 1", &[]).is_err(), "the backend is gone");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(su.query_one("SELECT 1", &[]).is_err(), "the crash took every backend down");
    let mut su = connect_when_up(port, "postgres", &name);
    su.execute("SELECT levqor.flush_usage()", &[]).unwrap();
    let billed = ledger_total(&mut su);
    assert_eq!(billed, 47, "the flushed 47 stay billed; the 5 unflushed are lost, never more");
    assert_eq!(live_used(&mut su), 47, "enforcement restarts from the last flush");
    consume_n(1);
    assert_eq!(live_used(&mut su), 48);
}

/// A schema tenant's storage is everything in its schema; over the limit, its
/// writes are refused like a shared tenant's.
#[test]
fn a_schema_tenants_storage_is_its_schema() {
    let (name, mut su) = new_database("q_schema_storage");
    su.batch_execute(&format!(
        "CREATE EXTENSION levqor;
         GRANT USAGE ON SCHEMA levqor_template TO levqor_app;
         CREATE TABLE levqor_template.notes (id serial PRIMARY KEY, body text NOT NULL);
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA levqor_template TO levqor_app;
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA levqor_template TO levqor_app;"
    ))
    .unwrap();
    let row = su.query_one("SELECT tenant_id, api_key FROM levqor.create_tenant('q-sch', 'S', isolation => 'schema')", &[]).unwrap();
    let t = Tenant { id: row.get(0), slug: "q-sch".into(), key: row.get(1) };
    let mut c = connect_to(port(), APP, &name);
    as_tenant(&mut c, &t, |tx| tx.batch_execute("INSERT INTO notes (body) SELECT repeat('x', 100) FROM generate_series(1, 500)").unwrap());
    su.execute("SELECT levqor.refresh_storage()", &[]).unwrap();
    let bytes: i64 = su
        .query_one("SELECT used FROM levqor.usage WHERE tenant_id = $1 AND metric = 'storage_bytes'", &[&t.id])
        .unwrap()
        .get(0);
    let schema_size: i64 = su
        .query_one(
            "SELECT sum(pg_total_relation_size(c.oid))::int8 FROM pg_class c
              WHERE c.relnamespace = 'tenant_q_sch'::regnamespace AND c.relkind IN ('r', 'm')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(bytes, schema_size, "the schema's tables, indexes and TOAST");
    assert!(bytes > 50_000, "{bytes}");
    su.execute("SELECT levqor.set_quota('q-sch', 'storage_bytes', 1000)", &[]).unwrap();
    su.execute("SELECT levqor.refresh_storage()", &[]).unwrap();
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
    assert_eq!(sqlstate(tx.execute("INSERT INTO notes (body) VALUES ('one more')", &[])), "53400");
}

/// Regression: an unlimited tenant's counter wrapped to a negative number
/// past i64::MAX, and the flush then recorded nothing for it.
#[test]
fn counters_near_i64_max_are_refused_not_wrapped() {
    const MAX: i64 = i64::MAX;
    let mut a = admin();
    let mut c = app();
    let ledger_total = |a: &mut Client, t: &Tenant, m: &str| -> String {
        a.query_one(
            "SELECT coalesce(sum(quantity), 0)::text FROM levqor.usage_ledger WHERE tenant_id = $1 AND metric = $2",
            &[&t.id, &m],
        )
        .unwrap()
        .get(0)
    };
    let refused = |c: &mut Client, t: &Tenant, m: &str, amount: i64| -> (String, String, String) {
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
        let e = consume(&mut tx, m, amount).expect_err("should overflow");
        let db = e.as_db_error().unwrap();
        (db.code().code().to_string(), db.message().to_string(), db.detail().unwrap_or_default().to_string())
    };

    // Unlimited (an override of NULL), the issue's two calls.
    let t = tenant("q-max");
    let m = counter_metric(Some(10), Some("1 day"));
    a.execute("SELECT levqor.set_quota($1, $2, NULL)", &[&t.slug, &m]).unwrap();
    assert_eq!(as_tenant(&mut c, &t, |tx| consume(tx, &m, 9_223_372_036_854_775_000).unwrap()), None);
    let (code, message, detail) = refused(&mut c, &t, &m, 9_223_372_036_854_775_000);
    assert_eq!(code, "22003", "{message}");
    assert!(message.contains(&m) && message.contains(&t.slug), "{message}");
    assert!(detail.contains("9223372036854775000 used"), "the current value is in the detail: {detail}");
    // Up to exactly i64::MAX is fine; one more is not.
    assert_eq!(as_tenant(&mut c, &t, |tx| consume(tx, &m, 807).unwrap()), None);
    assert_eq!(refused(&mut c, &t, &m, 1).0, "22003");
    assert_eq!(used(&mut a, &t, &m), Some(MAX), "usage never wraps");
    a.execute("SELECT levqor.flush_usage()", &[]).unwrap();
    assert_eq!(ledger_total(&mut a, &t, &m), MAX.to_string(), "the ledger holds what was accepted");
    // After the flush the window is still full: nothing more fits in it.
    assert_eq!(refused(&mut c, &t, &m, 1).0, "22003");
    assert_eq!(used(&mut a, &t, &m), Some(MAX));

    // A limit of exactly i64::MAX: the second call no longer slips through.
    let t = tenant("q-maxlim");
    let m = counter_metric(Some(MAX), None);
    assert_eq!(as_tenant(&mut c, &t, |tx| consume(tx, &m, MAX - 1000).unwrap()), Some(1000));
    assert_eq!(refused(&mut c, &t, &m, 9_223_372_036_854_775_000).0, "22003");
    assert_eq!(as_tenant(&mut c, &t, |tx| consume(tx, &m, 1000).unwrap()), Some(0));
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
    assert_eq!(sqlstate(consume(&mut tx, &m, 1)), "22003");
    drop(tx);
    a.execute("SELECT levqor.flush_usage()", &[]).unwrap();
    assert_eq!(ledger_total(&mut a, &t, &m), MAX.to_string());
    let alerts: i64 = a
        .query_one("SELECT count(*) FROM levqor.quota_alerts WHERE tenant_id = $1 AND metric = $2 AND used >= 0", &[&t.id, &m])
        .unwrap()
        .get(0);
    assert_eq!(alerts, 2, "both thresholds raised, with no wrapped values");

    // Many concurrent callers: each asks for a fifth of i64::MAX; exactly
    // five fit, the others are refused, and the ledger holds what committed.
    let t = tenant("q-maxconc");
    let m = counter_metric(None, None);
    let fifth = MAX / 5;
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (t, m, barrier) = (t.clone(), m.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut c = app();
                let mut tx = c.transaction().unwrap();
                tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
                barrier.wait();
                let r = consume(&mut tx, &m, fifth);
                match r {
                    Ok(_) => {
                        tx.commit().unwrap();
                        true
                    }
                    Err(e) => {
                        assert_eq!(e.code().unwrap().code(), "22003", "{e}");
                        false
                    }
                }
            })
        })
        .collect();
    let accepted = handles.into_iter().map(|h| h.join().unwrap()).filter(|ok| *ok).count() as i64;
    assert_eq!(accepted, 5);
    assert_eq!(used(&mut a, &t, &m), Some(5 * fifth));
    a.execute("SELECT levqor.flush_usage()", &[]).unwrap();
    assert_eq!(ledger_total(&mut a, &t, &m), (5 * fifth).to_string());
    // The flush of the others was not held up by these counters.
    let other = tenant("q-maxother");
    let m2 = counter_metric(None, None);
    as_tenant(&mut c, &other, |tx| consume(tx, &m2, 3).unwrap());
    a.execute("SELECT levqor.flush_usage()", &[]).unwrap();
    assert_eq!(ledger_total(&mut a, &other, &m2), "3");
}

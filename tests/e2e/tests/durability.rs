//! Crashes on the cluster of its own the durability tests use (see
//! scripts/test.sh); quota.rs has the other one.

use levqor_e2e::*;
use postgres::Client;

fn head(c: &mut Client) -> (i64, String, String) {
    let r = c.query_one("SELECT seq, hash, updated_at::text FROM levqor.audit_head()", &[]).unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// The worker commits its sealing passes without waiting for the WAL flush;
/// audit_head() flushes before it answers, so a head given out survives a
/// crash that comes right after. (The walwriter is slowed to 10 s here, so
/// nothing else would have flushed it.)
#[test]
fn a_chain_head_given_out_survives_a_crash() {
    let port = restart_port();
    let mut su = connect_when_up(port, "postgres", "postgres");
    su.batch_execute("ALTER SYSTEM SET wal_writer_delay = '10s'").unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
    // A database the worker serves on this cluster (scripts/cluster.sh).
    let mut db = connect_when_up(port, "postgres", "levqor_sealer");
    let table = unique("crash_notes");
    db.batch_execute(&format!(
        "CREATE EXTENSION IF NOT EXISTS levqor;
         CREATE TABLE {table} (id serial PRIMARY KEY, body text);
         SELECT levqor.enable_audit('{table}');
         INSERT INTO {table} (body) VALUES ('sealed by the worker, then a crash');"
    ))
    .unwrap();
    // Wait for the worker, reading its tables directly (no flush).
    let mut sealed = false;
    for _ in 0..200 {
        let r = db
            .query_one(
                "SELECT count(*) FILTER (WHERE seq IS NULL) = 0 AND count(*) > 0 FROM levqor.audit_trail WHERE table_name = $1",
                &[&format!("public.{table}")],
            )
            .unwrap();
        if r.get::<_, bool>(0) {
            sealed = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(sealed, "the worker sealed the entry");
    let before = head(&mut db);

    let mut victim = connect_to(port, "postgres", "postgres");
    let pid: i32 = victim.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    assert!(std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(db.query_one("SELECT 1", &[]).is_err(), "the crash took every backend down");

    let mut db = connect_when_up(port, "postgres", "levqor_sealer");
    let after = db.query_one("SELECT seq, hash, updated_at::text FROM levqor.audit_heads WHERE chain = '00000000-0000-0000-0000-000000000000'", &[]);
    let mut su = connect_when_up(port, "postgres", "postgres");
    su.batch_execute("ALTER SYSTEM RESET wal_writer_delay").unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
    let after = after.map(|r| (r.get::<_, i64>(0), hex(&r.get::<_, Vec<u8>>(1)), r.get::<_, String>(2)));
    assert_eq!(after.ok(), Some(before), "the head given out is the head after the crash");
    let (ok, _, bad, why): (bool, i64, Option<i64>, Option<String>) = {
        let r = db.query_one("SELECT * FROM levqor.verify_audit()", &[]).unwrap();
        (r.get(0), r.get(1), r.get(2), r.get(3))
    };
    assert!(ok, "entry {bad:?}: {why:?}");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

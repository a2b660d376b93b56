//! Behind a real PgBouncer in transaction pooling with one server connection
//! (issue 20): no tenant context survives into the next client's
//! transaction, and with `levqor.transaction_pooling` on, what would
//! (session contexts, WITH HOLD cursors, lasting temporary tables) is
//! refused.

use std::path::PathBuf;
use std::process::Command;

use levqor_e2e::*;

fn bouncer_port() -> u16 {
    std::env::var("LEVQOR_E2E_BOUNCER_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(28818)
}

/// A PgBouncer of the test's own, stopped when dropped.
struct Bouncer {
    dir: PathBuf,
    port: u16,
}

impl Bouncer {
    fn start(port: u16, databases: &[(&str, &str)]) -> Bouncer {
        let dir = std::env::temp_dir().join(unique("pgbouncer"));
        std::fs::create_dir_all(&dir).unwrap();
        let dbs: String = databases
            .iter()
            .map(|(alias, db)| format!("{alias} = host=127.0.0.1 port={} dbname={db}\n", levqor_e2e::port()))
            .collect();
        std::fs::write(dir.join("users.txt"), format!("\"{APP}\" \"\"\n\"{SERVER}\" \"\"\n\"postgres\" \"\"\n")).unwrap();
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n{dbs}\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {d}/users.txt\npool_mode = transaction\ndefault_pool_size = 1\n\
                 max_client_conn = 50\nlogfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n",
                d = dir.display()
            ),
        )
        .unwrap();
        // PgBouncer refuses to run as root.
        Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).status().unwrap();
        let status = Command::new("runuser")
            .args(["-u", "postgres", "--", "/usr/sbin/pgbouncer", "-d"])
            .arg(dir.join("pgbouncer.ini"))
            .status()
            .expect("pgbouncer (scripts/bootstrap.sh installs it)");
        assert!(status.success(), "pgbouncer did not start: {}", std::fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default());
        let b = Bouncer { dir, port };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return b;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("pgbouncer is not listening on {port}");
    }

    /// A client through the pooler (simple protocol only, as behind
    /// transaction pooling a named prepared statement is another client's).
    fn client(&self, user: &str, db: &str) -> Client {
        Client::connect(&format!("host=127.0.0.1 port={} user={user} dbname={db} connect_timeout=10", self.port), NoTls)
            .unwrap_or_else(|e| panic!("through pgbouncer: {e}"))
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pgbouncer.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

fn one(c: &mut Client, sql: &str) -> Option<String> {
    let rows = c.simple_query(sql).unwrap();
    rows.iter().find_map(|m| match m {
        postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
        _ => None,
    })?
}

fn error(c: &mut Client, sql: &str) -> String {
    let e = c.simple_query(sql).unwrap_err();
    e.code().map(|c| c.code().to_string()).unwrap_or_else(|| panic!("{e}"))
}

#[test]
fn no_context_survives_into_the_next_clients_transaction() {
    let (plain, mut su) = new_database("bouncer_plain");
    let (pooled, mut su2) = new_database("bouncer_pooled");
    for (db, s) in [(&plain, &mut su), (&pooled, &mut su2)] {
        s.batch_execute(&format!(
            "CREATE EXTENSION levqor;
             CREATE TABLE orders (id bigserial PRIMARY KEY, body text NOT NULL);
             SELECT levqor.enable_tenancy('orders');
             GRANT SELECT, INSERT ON orders TO {APP}; GRANT USAGE ON SEQUENCE orders_id_seq TO {APP};"
        ))
        .unwrap();
        let _ = db;
    }
    su2.batch_execute(&format!("ALTER DATABASE {pooled} SET levqor.transaction_pooling = on")).unwrap();
    let a = create_tenant_on(&mut su, "pool-a");
    let a2 = create_tenant_on(&mut su2, "pool-a");
    for (db, t) in [(&plain, &a), (&pooled, &a2)] {
        let mut c = connect_to(port(), APP, db);
        insert_rows(&mut c, t, "orders", &["a's order"]);
    }
    let bouncer = Bouncer::start(bouncer_port(), &[("plain", &plain), ("pooled", &pooled)]);

    // Two clients, one server connection.
    let mut first = bouncer.client(APP, "plain");
    let mut next = bouncer.client(APP, "plain");
    assert_eq!(one(&mut first, "SELECT pg_backend_pid()"), one(&mut next, "SELECT pg_backend_pid()"), "one server connection");
    // A statement-long context, and one for an explicit transaction.
    assert!(one(&mut first, &format!("SELECT levqor.authenticate('{}')", a.key)).is_some());
    assert_eq!(one(&mut next, "SELECT levqor.current_tenant()"), None);
    assert_eq!(one(&mut next, "SELECT count(*) FROM orders").as_deref(), Some("0"));
    first.simple_query(&format!("BEGIN; SELECT levqor.authenticate('{}'); SELECT count(*) FROM orders; COMMIT;", a.key)).unwrap();
    assert_eq!(one(&mut next, "SELECT levqor.current_tenant()"), None);
    assert_eq!(one(&mut next, "SELECT count(*) FROM orders").as_deref(), Some("0"));

    // With levqor.transaction_pooling on, what would outlive the
    // transaction is refused.
    let mut first = bouncer.client(APP, "pooled");
    let mut next = bouncer.client(APP, "pooled");
    assert_eq!(one(&mut first, "SHOW levqor.transaction_pooling").as_deref(), Some("on"));
    assert_eq!(error(&mut first, &format!("SELECT levqor.authenticate('{}', session => true)", a2.key)), "0A000");
    assert_eq!(one(&mut next, "SELECT levqor.current_tenant()"), None);
    assert_eq!(one(&mut next, "SELECT count(*) FROM orders").as_deref(), Some("0"));
    let in_context = |c: &mut Client, sql: &str| -> Result<Vec<postgres::SimpleQueryMessage>, Error> {
        c.simple_query(&format!("BEGIN; SELECT levqor.authenticate('{}'); {sql}; COMMIT;", a2.key))
    };
    for refused in [
        "DECLARE held CURSOR WITH HOLD FOR SELECT * FROM orders",
        "CREATE TEMP TABLE mine AS SELECT * FROM orders",
        "CREATE TEMP TABLE mine (body text)",
    ] {
        let e = in_context(&mut first, refused).unwrap_err();
        assert_eq!(e.code().unwrap().code(), "0A000", "{refused}: {e}");
        first.simple_query("ROLLBACK").unwrap();
    }
    in_context(&mut first, "CREATE TEMP TABLE mine ON COMMIT DROP AS SELECT * FROM orders").unwrap();
    in_context(&mut first, "DECLARE c CURSOR FOR SELECT * FROM orders").unwrap();
    assert_eq!(error(&mut next, "FETCH ALL FROM held"), "34000", "no cursor was left behind");
    drop(bouncer);
}

#[test]
fn a_session_context_made_before_the_setting_is_cleared_at_the_next_statement() {
    let t = tenant("pool-late");
    let mut su = superuser();
    su.execute("SELECT levqor.set_tenant($1, session => true)", &[&t.slug]).unwrap();
    assert_eq!(current_tenant(&mut su), Some(t.id));
    su.batch_execute("SET levqor.transaction_pooling = on").unwrap();
    assert_eq!(current_tenant(&mut su), None, "cleared once the setting is on");
    assert_eq!(sqlstate(su.execute("SELECT levqor.set_tenant($1, session => true)", &[&t.slug])), "0A000");
    // Transaction-scoped contexts are what it is for.
    let mut tx = su.transaction().unwrap();
    tx.execute("SELECT levqor.set_tenant($1)", &[&t.slug]).unwrap();
    assert_eq!(current_tenant(&mut tx), Some(t.id));
}

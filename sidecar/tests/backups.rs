//! Backups end to end: the real `levqor-sidecar` (backup, verify-backup,
//! restore, export, dr-drill, scheduled backups in the daemon) against a real
//! cluster with levqor, as a login role granted only levqor_backup, with the
//! real pg_dump. Every comparison is an ordered checksum of a tenant's rows,
//! table by table.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const KEY_HEX: &str = "6c6576716f722d6261636b75702d6b65792d666f722d74657374732d30313233";
const TABLES: [&str; 4] = ["users", "projects", "accounts", "transfers"];

struct Fixture {
    db: Db,
    dir: TempDir,
    config: PathBuf,
    _sealer: Sealer,
}

impl Fixture {
    fn new(prefix: &str, encrypted: bool) -> Fixture {
        let db = Db::new(prefix);
        db.table("users", "tenant_id uuid NOT NULL, email text NOT NULL, name text");
        db.table("projects", "tenant_id uuid NOT NULL, name text NOT NULL, owner_id bigint, tags text[], meta jsonb");
        db.table("accounts", "tenant_id uuid NOT NULL, balance bigint NOT NULL DEFAULT 0");
        db.table("transfers", "tenant_id uuid NOT NULL, account_id bigint NOT NULL, amount bigint NOT NULL, at timestamptz NOT NULL DEFAULT now()");
        db.su().batch_execute("SELECT levqor.enable_audit('users'); SELECT levqor.enable_audit('projects');").unwrap();
        let dir = TempDir::new("backups");
        let config = dir.path().join("sidecar.toml");
        let _sealer = Sealer::start(&db);
        let f = Fixture { db, dir, config, _sealer };
        f.write_config(encrypted, "");
        f
    }

    fn write_config(&self, encrypted: bool, extra: &str) {
        let key = if encrypted { "encryption_key_env = \"LEVQOR_BACKUP_KEY\"\n" } else { "" };
        std::fs::write(
            &self.config,
            format!(
                "[database]\nurl = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[backup]\ndatabase_url = \"{}\"\ndir = \"{}\"\nadmin_url = \"{}\"\n{key}{extra}",
                self.db.url(SIDECAR),
                self.db.url(BACKUP),
                self.dir.path().join("archives").display(),
                self.db.url("postgres"),
            ),
        )
        .unwrap();
    }

    fn cfg(&self) -> &str {
        self.config.to_str().unwrap()
    }

    fn run(&self, args: &[&str]) -> (i32, String, String) {
        self.run_with_key(args, KEY_HEX)
    }

    fn run_with_key(&self, args: &[&str], key: &str) -> (i32, String, String) {
        cli(args, &[("LEVQOR_BACKUP_KEY", key)])
    }

    /// Back the tenant up; the archive's path (the last line printed).
    fn backup(&self, t: &Tenant) -> PathBuf {
        let (code, out, err) = self.run(&["backup", "--config", self.cfg(), "--tenant", &t.slug]);
        assert_eq!(code, 0, "backup of {}: {out}{err}", t.slug);
        PathBuf::from(out.lines().last().unwrap())
    }

    fn restore(&self, t: &Tenant, from: &Path, extra: &[&str]) -> (i32, String, String) {
        let mut args = vec!["restore", "--config", self.cfg(), "--tenant", &t.slug, "--from", from.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    fn fill(&self, t: &Tenant, n: i64) {
        self.db.as_tenant(t, |tx| {
            for i in 0..n {
                let uid: i64 = tx
                    .query_one("INSERT INTO users (email, name) VALUES ($1, $2) RETURNING id", &[&format!("user{i}@{}.test", t.slug), &format!("User \"{i}\"\t'quoted'")])
                    .unwrap()
                    .get(0);
                tx.execute(
                    "INSERT INTO projects (name, owner_id, tags, meta) VALUES ($1, $2, $3, $4)",
                    &[&format!("project {i}"), &uid, &vec![format!("t{i}"), "with,comma".to_string()], &serde_json::json!({"n": i, "nested": {"null": null}})],
                )
                .unwrap();
            }
            let acct: i64 = tx.query_one("INSERT INTO accounts (balance) VALUES (0) RETURNING id", &[]).unwrap().get(0);
            for i in 1..=n {
                tx.execute("INSERT INTO transfers (account_id, amount) VALUES ($1, $2)", &[&acct, &i]).unwrap();
            }
            tx.execute("UPDATE accounts SET balance = (SELECT sum(amount) FROM transfers WHERE account_id = $1) WHERE id = $1", &[&acct]).unwrap();
        });
    }

    /// An ordered checksum of each table's rows of one tenant (and their count).
    fn sums_in(&self, c: &mut Client, t: &Tenant) -> Vec<(String, i64, String)> {
        TABLES
            .iter()
            .map(|tbl| {
                let r = c
                    .query_one(
                        &format!("SELECT count(*), coalesce(md5(string_agg(x::text, '|' ORDER BY x.id)), '') FROM {tbl} x WHERE tenant_id = $1"),
                        &[&t.id],
                    )
                    .unwrap();
                (tbl.to_string(), r.get(0), r.get(1))
            })
            .collect()
    }

    fn sums(&self, t: &Tenant) -> Vec<(String, i64, String)> {
        self.sums_in(&mut self.db.su(), t)
    }

    fn purge(&self, t: &Tenant) {
        let mut a = self.db.admin();
        a.execute("SELECT levqor.offboard_tenant($1::uuid, '0 seconds')", &[&t.id]).unwrap();
        a.execute("SELECT * FROM levqor.purge_tenant($1::uuid)", &[&t.id]).unwrap();
    }
}

fn new_target_db(prefix: &str) -> Db {
    let target = Db::new(prefix);
    target.su().batch_execute(&format!("GRANT CREATE ON SCHEMA public TO {BACKUP}")).unwrap();
    target
}

#[test]
fn backup_purge_restore_brings_the_tenant_back_exactly_and_never_touches_another() {
    let f = Fixture::new("bk_cycle", true);
    let a = f.db.tenant("northwind", "professional");
    let b = f.db.tenant("contoso", "starter");
    f.fill(&a, 40);
    f.fill(&b, 25);
    let user = uuid::Uuid::new_v4();
    let mut admin = f.db.admin();
    admin.execute("SELECT levqor.add_member($1, $2, 'admin')", &[&a.slug, &user]).unwrap();
    admin.execute("SELECT levqor.set_quota($1, 'api_calls_per_15min', 1234)", &[&a.slug]).unwrap();
    let before_a = f.sums(&a);
    let before_b = f.sums(&b);
    assert!(before_a.iter().all(|(_, n, _)| *n > 0));

    let archive = f.backup(&a);
    let name = archive.file_name().unwrap().to_string_lossy().to_string();
    assert!(name.starts_with(&format!("{}-", a.slug)) && name.contains('T') && name.ends_with(".levqor.tar.enc"), "{name}");
    assert!(!archive.parent().unwrap().read_dir().unwrap().any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".tmp")));
    let (code, out, err) = f.run(&["verify-backup", "--config", f.cfg(), "--from", archive.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok") && out.contains(&a.slug), "{out}");

    f.purge(&a);
    assert!(f.sums(&a).iter().all(|(_, n, _)| *n == 0), "purged");
    assert_eq!(f.sums(&b), before_b);

    let (code, out, err) = f.restore(&a, &archive, &[]);
    assert_eq!(code, 0, "restore: {out}{err}");
    assert_eq!(f.sums(&a), before_a, "every table of the tenant as it was");
    assert_eq!(f.sums(&b), before_b, "the other tenant untouched");
    // Its id, key, members, settings and quota overrides are back.
    let mut app = f.db.app();
    let ctx: uuid::Uuid = app.query_one("SELECT levqor.authenticate($1)", &[&a.key]).unwrap().get(0);
    assert_eq!(ctx, a.id);
    let role: String = admin.query_one("SELECT role FROM levqor.members WHERE tenant_id = $1 AND user_id = $2", &[&a.id, &user]).unwrap().get(0);
    assert_eq!(role, "admin");
    let quota: i64 = admin.query_one("SELECT quota FROM levqor.quota_overrides WHERE tenant_id = $1", &[&a.id]).unwrap().get(0);
    assert_eq!(quota, 1234);
    // Sequences are past the restored ids: new rows go in.
    f.db.as_tenant(&a, |tx| tx.execute("INSERT INTO users (email) VALUES ('new@northwind.test')", &[]).unwrap());
    // The restore is in the tenant's audit trail and in the catalog.
    let restored: i64 = f.db.su().query_one("SELECT count(*) FROM levqor.audit_log WHERE tenant_id = $1 AND event = 'tenant_restored'", &[&a.id]).unwrap().get(0);
    assert_eq!(restored, 1);
    let ok: bool = f.db.su().query_one("SELECT ok FROM levqor.verify_audit($1::uuid)", &[&a.id]).unwrap().get(0);
    assert!(ok);
    let kinds: Vec<String> = f.db.admin().query("SELECT kind || ':' || status FROM levqor.backups WHERE tenant_id = $1 ORDER BY id", &[&a.id]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(kinds, ["backup:ok", "restore:ok"]);

    // A live tenant is not overwritten without --replace; with it, only its rows.
    let (code, _, err) = f.restore(&a, &archive, &[]);
    assert_eq!(code, 1);
    assert!(err.contains("--replace"), "{err}");
    let (code, out, err) = f.restore(&a, &archive, &["--replace"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(f.sums(&a), before_a, "replaced: exactly the archive's rows (the new one is gone)");
    assert_eq!(f.sums(&b), before_b);
    // The coverage view, and /metrics, know the last good backup.
    let age: Option<f64> = f
        .db
        .admin()
        .query_one("SELECT extract(epoch FROM age)::float8 FROM levqor.backup_coverage WHERE tenant_id = $1", &[&a.id])
        .unwrap()
        .get(0);
    assert!(age.is_some_and(|s| s < 600.0));
}

#[test]
fn a_tenant_restored_into_a_fresh_database_brings_its_rows_and_nothing_of_another() {
    let f = Fixture::new("bk_fresh", false);
    let a = f.db.tenant("fabrikam", "professional");
    let b = f.db.tenant("tailspin", "professional");
    f.fill(&a, 30);
    f.fill(&b, 30);
    let before_a = f.sums(&a);
    let archive = f.backup(&a);
    let target = new_target_db("bk_staging");
    let (code, out, err) = f.restore(&a, &archive, &["--into", &target.url(BACKUP)]);
    assert_eq!(code, 0, "{out}{err}");
    let mut c = target.su();
    assert_eq!(f.sums_in(&mut c, &a), before_a);
    for tbl in TABLES {
        let others: i64 = c.query_one(&format!("SELECT count(*) FROM {tbl} WHERE tenant_id <> $1"), &[&a.id]).unwrap().get(0);
        assert_eq!(others, 0, "no row of another tenant in {tbl}");
        let protected: bool = c.query_one("SELECT EXISTS (SELECT 1 FROM levqor.protected_tables WHERE tbl = $1::text::regclass)", &[&tbl]).unwrap().get(0);
        assert!(protected, "{tbl} is protected in the new database");
    }
    let tenants: i64 = c.query_one("SELECT count(*) FROM levqor.tenants WHERE kind = 'tenant'", &[]).unwrap().get(0);
    assert_eq!(tenants, 1);
    // The audit trail came with its chain, and verifies there.
    let (ok, entries): (bool, i64) = {
        let r = c.query_one("SELECT (SELECT ok FROM levqor.verify_audit($1::uuid)), (SELECT count(*) FROM levqor.audit_log WHERE tenant_id = $1)", &[&a.id]).unwrap();
        (r.get(0), r.get(1))
    };
    assert!(ok && entries > 0, "verify_audit passes on the restored trail ({entries} entries)");
    // The tenant works there: its key, its isolation. (Tables a restore
    // creates carry no grants: the operator grants the application's.)
    c.batch_execute(&format!("GRANT SELECT ON users TO {}", e2e::APP)).unwrap();
    let mut app = target.app();
    let n: i64 = e2e::as_tenant(&mut app, &a, |tx| tx.query_one("SELECT count(*) FROM users", &[]).unwrap().get(0));
    assert_eq!(n, 30);
}

#[test]
fn a_backup_taken_while_the_tenant_writes_is_one_point_in_time() {
    let f = Fixture::new("bk_consistent", false);
    let a = f.db.tenant("bank", "professional");
    f.fill(&a, 5);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, port, name, t) = (stop.clone(), f.db.port, f.db.name.clone(), a.clone());
        std::thread::spawn(move || {
            let mut c = e2e::connect_to(port, e2e::APP, &name);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                e2e::as_tenant(&mut c, &t, |tx| {
                    let acct: i64 = tx.query_one("SELECT id FROM accounts ORDER BY id LIMIT 1", &[]).unwrap().get(0);
                    tx.execute("INSERT INTO transfers (account_id, amount) VALUES ($1, 7)", &[&acct]).unwrap();
                    tx.execute("UPDATE accounts SET balance = balance + 7 WHERE id = $1", &[&acct]).unwrap();
                });
                n += 1;
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // --out: archives kept where asked, retention does not apply to them.
    let out = f.dir.path().join("pit");
    let archives: Vec<PathBuf> = (0..3)
        .map(|_| {
            let (code, o, e) = f.run(&["backup", "--config", f.cfg(), "--tenant", &a.slug, "--out", out.to_str().unwrap()]);
            assert_eq!(code, 0, "{o}{e}");
            PathBuf::from(o.lines().last().unwrap())
        })
        .collect();
    stop.store(true, Ordering::Relaxed);
    assert!(writer.join().unwrap() > 10, "the tenant kept writing");
    for (i, archive) in archives.iter().enumerate() {
        let target = new_target_db(&format!("bk_pit{i}"));
        let (code, out, err) = f.restore(&a, archive, &["--into", &target.url(BACKUP)]);
        assert_eq!(code, 0, "{out}{err}");
        let r = target
            .su()
            .query_one("SELECT (SELECT sum(balance) FROM accounts)::bigint, (SELECT sum(amount) FROM transfers)::bigint", &[])
            .unwrap();
        assert_eq!(r.get::<_, i64>(0), r.get::<_, i64>(1), "balances and transfers from one snapshot");
    }
}

#[test]
fn a_flipped_byte_a_truncated_file_or_a_wrong_key_is_refused_and_changes_nothing() {
    let f = Fixture::new("bk_corrupt", true);
    let a = f.db.tenant("globex", "starter");
    f.fill(&a, 20);
    let before = f.sums(&a);
    let archive = f.backup(&a);
    f.purge(&a);
    let bytes = std::fs::read(&archive).unwrap();
    let bad = f.dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let flipped = bad.join("flipped.levqor.tar.enc");
    let mut b = bytes.clone();
    let mid = b.len() / 2;
    b[mid] ^= 0x40;
    std::fs::write(&flipped, &b).unwrap();
    let truncated = bad.join("truncated.levqor.tar.enc");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    for path in [&flipped, &truncated] {
        let (code, _, err) = f.run(&["verify-backup", "--config", f.cfg(), "--from", path.to_str().unwrap()]);
        assert_eq!(code, 1, "{}: {err}", path.display());
        assert!(err.contains("does not decrypt") || err.contains("corrupt"), "{err}");
        let (code, _, err) = f.restore(&a, path, &[]);
        assert_eq!(code, 1, "{err}");
    }
    let wrong = "00".repeat(32);
    let (code, _, err) = f.run_with_key(&["verify-backup", "--config", f.cfg(), "--from", archive.to_str().unwrap()], &wrong);
    assert_eq!(code, 1);
    assert!(err.contains("wrong key"), "{err}");
    let (code, _, _) = f.run_with_key(&["restore", "--config", f.cfg(), "--tenant", &a.slug, "--from", archive.to_str().unwrap()], &wrong);
    assert_eq!(code, 1);
    let gone: i64 = f.db.su().query_one("SELECT count(*) FROM levqor.tenants WHERE id = $1", &[&a.id]).unwrap().get(0);
    assert_eq!(gone, 0, "nothing was restored from a bad archive");
    // The good archive still restores.
    let (code, out, err) = f.restore(&a, &archive, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(f.sums(&a), before);

    // In the clear: a flipped byte is caught by the checksums.
    f.write_config(false, "");
    let plain = f.backup(&a);
    let mut b = std::fs::read(&plain).unwrap();
    let at = b.len() / 3;
    b[at] ^= 0x01;
    let p = bad.join("plain.levqor.tar");
    std::fs::write(&p, &b).unwrap();
    let (code, _, err) = f.run(&["verify-backup", "--from", p.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
}

#[test]
fn a_schema_tenant_and_a_shared_tenant_both_come_back() {
    let f = Fixture::new("bk_schema", false);
    f.db.su()
        .batch_execute(&format!(
            "GRANT USAGE ON SCHEMA levqor_template TO levqor_app;
             CREATE TABLE levqor_template.invoices (id serial PRIMARY KEY, number text NOT NULL, total numeric(12,2));
             CREATE TABLE levqor_template.lines (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 invoice_id int NOT NULL REFERENCES levqor_template.invoices (id) ON DELETE CASCADE, sku text);
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA levqor_template TO levqor_app;
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA levqor_template TO levqor_app;"
        ))
        .unwrap();
    let slug = e2e::unique("initech").replace('_', "-");
    let row = f.db.admin().query_one("SELECT tenant_id, api_key FROM levqor.create_tenant($1, $1, 'professional', isolation => 'schema')", &[&slug]).unwrap();
    let s = Tenant { id: row.get(0), slug: slug.clone(), key: row.get(1) };
    let shared = f.db.tenant("hooli", "professional");
    f.fill(&shared, 10);
    f.db.as_tenant(&s, |tx| {
        for i in 0..15 {
            let id: i32 = tx.query_one("INSERT INTO invoices (number, total) VALUES ($1, $2::text::numeric) RETURNING id", &[&format!("INV-{i}"), &format!("{i}.50")]).unwrap().get(0);
            tx.execute("INSERT INTO lines (invoice_id, sku) VALUES ($1, 'sku-a'), ($1, 'sku-b')", &[&id]).unwrap();
        }
        tx.execute("INSERT INTO users (email) VALUES ('shared-table-row@initech.test')", &[]).unwrap();
    });
    let schema = format!("tenant_{}", slug.replace('-', "_"));
    let sum = |c: &mut Client| -> (i64, String) {
        let r = c
            .query_one(
                &format!("SELECT (SELECT count(*) FROM {schema}.lines), (SELECT md5(string_agg(i::text || l::text, '|' ORDER BY l.id)) FROM {schema}.lines l JOIN {schema}.invoices i ON i.id = l.invoice_id)"),
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    let before = sum(&mut f.db.su());
    let before_shared = f.sums(&shared);
    let users_before = f.sums(&s);
    let archive = f.backup(&s);
    let shared_archive = f.backup(&shared);
    f.purge(&s);
    let gone: bool = f.db.su().query_one("SELECT to_regnamespace($1) IS NULL", &[&schema]).unwrap().get(0);
    assert!(gone, "purge drops the tenant's schema");
    let (code, out, err) = f.restore(&s, &archive, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(sum(&mut f.db.su()), before, "the schema tenant's tables as they were");
    assert_eq!(f.sums(&s), users_before, "and its rows in shared tables");
    assert_eq!(f.sums(&shared), before_shared);
    // Its own sequences go on past the restored ids.
    f.db.as_tenant(&s, |tx| tx.execute("INSERT INTO invoices (number) VALUES ('INV-new')", &[]).unwrap());
    // The shared tenant into a fresh database.
    let target = new_target_db("bk_schema_fresh");
    let (code, out, err) = f.restore(&shared, &shared_archive, &["--into", &target.url(BACKUP)]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(f.sums_in(&mut target.su(), &shared), before_shared);
}

#[test]
fn the_gdpr_export_and_a_timed_dr_drill() {
    let f = Fixture::new("bk_drill", true);
    let a = f.db.tenant("acme", "professional");
    f.fill(&a, 12);
    let out_zip = f.dir.path().join("acme-export.zip");
    let (code, out, err) = f.run(&["export", "--config", f.cfg(), "--tenant", &a.slug, "--out", out_zip.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let names = zip_names(&out_zip);
    for want in ["tenant.json", "members.json", "audit_trail.json", "manifest.json", "tables/public.users.json", "tables/public.projects.json"] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    let (code, out, err) = f.run(&["dr-drill", "--config", f.cfg(), "--tenant", &a.slug]);
    assert_eq!(code, 0, "{out}{err}");
    let report: std::collections::HashMap<&str, &str> = out.lines().filter_map(|l| l.split_once(": ")).collect();
    assert_eq!(report["result"], "ok");
    assert_eq!(report["within_target"], "true");
    assert_eq!(report["target_seconds"], "1800");
    assert_eq!(report["rows"].parse::<i64>().unwrap(), 12 + 12 + 1 + 12);
    for k in ["backup_seconds", "verify_seconds", "restore_seconds", "total_seconds"] {
        assert!(report[k].parse::<f64>().unwrap() >= 0.0, "{k}");
    }
    // The scratch database is gone; the drill is in the catalog.
    let scratch: i64 = f.db.su().query_one("SELECT count(*) FROM pg_database WHERE datname LIKE 'levqor_drill_%'", &[]).unwrap().get(0);
    assert_eq!(scratch, 0);
    let r = f.db.admin().query_one("SELECT drills, drills_ok, drill_success_percent::float8 FROM levqor.backup_coverage WHERE tenant_id = $1", &[&a.id]).unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, Option<f64>>(2)), (1, 1, Some(100.0)));
}

fn zip_names(path: &Path) -> Vec<String> {
    // The zip's central directory: names after each "PK\x01\x02" header (46 bytes, name length at 28).
    let data = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut i = 0;
    while i + 46 <= data.len() {
        if data[i..i + 4] == [0x50, 0x4b, 0x01, 0x02] {
            let n = u16::from_le_bytes([data[i + 28], data[i + 29]]) as usize;
            out.push(String::from_utf8_lossy(&data[i + 46..i + 46 + n]).to_string());
            i += 46 + n;
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn scheduled_backups_go_on_past_a_failing_tenant_and_retention_keeps_the_newest() {
    let f = Fixture::new("bk_sched", false);
    let a = f.db.tenant("alpha", "starter");
    let b = f.db.tenant("beta", "starter");
    f.fill(&a, 3);
    f.fill(&b, 3);
    // The first tenant's directory cannot be made (a file is in its place:
    // tests run as root, so a read-only directory would not stop a write).
    let archives = f.dir.path().join("archives");
    std::fs::create_dir_all(&archives).unwrap();
    let (first, second) = if a.slug < b.slug { (&a, &b) } else { (&b, &a) };
    std::fs::write(archives.join(&first.slug), b"not a directory").unwrap();
    f.write_config(false, "schedule = \"every 10s\"\nkeep_daily = 2\nkeep_weekly = 0\n");
    let config = std::fs::read_to_string(&f.config).unwrap().replace("127.0.0.1:0", "{http}");
    let sidecar = Sidecar::start(&config, &[]);
    let statuses = |t: &Tenant| -> Vec<String> {
        f.db.admin().query("SELECT status FROM levqor.backups WHERE tenant_id = $1 AND kind = 'backup' ORDER BY id", &[&t.id]).unwrap().iter().map(|r| r.get(0)).collect()
    };
    wait_until("both tenants' first scheduled backup", Duration::from_secs(60), || !statuses(first).is_empty() && !statuses(second).is_empty());
    assert_eq!(statuses(first)[0], "failed", "the failure is recorded");
    assert_eq!(statuses(second)[0], "ok", "and the next tenant still gets its backup");
    let error: String = f.db.admin().query_one("SELECT error FROM levqor.backups WHERE tenant_id = $1 AND status = 'failed' LIMIT 1", &[&first.id]).unwrap().get(0);
    assert!(!error.is_empty());
    assert!(metric(&sidecar.metrics(), "levqor_sidecar_backups_total{outcome=\"failed\"}") >= 1.0);
    let m = sidecar.metrics();
    assert!(m.contains(&format!("levqor_sidecar_backup_age_seconds{{tenant=\"{}\"}}", second.slug)), "the RPO per tenant in /metrics:\n{m}");
    // Retention after the next good backup: the newest of each of the last
    // two days; older archives go, files that are not archives stay.
    let dir = archives.join(&second.slug);
    let day = |n: i64| (chrono::Utc::now() - chrono::Duration::days(n)).format("%Y%m%d").to_string();
    for n in 1..=5 {
        for hm in ["020000", "140000"] {
            std::fs::write(dir.join(format!("{}-{}T{hm}.000Z.levqor.tar", second.slug, day(n))), b"old").unwrap();
        }
    }
    std::fs::write(dir.join("notes.txt"), b"operator notes").unwrap();
    let good = statuses(second).iter().filter(|s| *s == "ok").count();
    wait_until("another good backup", Duration::from_secs(60), || statuses(second).iter().filter(|s| *s == "ok").count() > good);
    std::thread::sleep(Duration::from_millis(500));
    let mut files: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    files.sort();
    let newest: String = f.db.admin().query_one("SELECT file FROM levqor.backups WHERE tenant_id = $1 AND status = 'ok' ORDER BY id DESC LIMIT 1", &[&second.id]).unwrap().get(0);
    let mut expected = vec![
        Path::new(&newest).file_name().unwrap().to_string_lossy().to_string(),
        format!("{}-{}T140000.000Z.levqor.tar", second.slug, day(1)),
        "notes.txt".to_string(),
    ];
    expected.sort();
    assert_eq!(files, expected);
    // The failing tenant's last good archive is never removed: it has none, and nothing of it went.
    assert!(archives.join(&first.slug).is_file());
}

//! ALTER EXTENSION levqor UPDATE from every earlier release, with data in
//! place: the data and its protection survive, the new features work, and the
//! catalog is the same as a fresh install of the new version.
//! (scripts/test.sh installs sql/archive/levqor--*.sql beside the new one.)

use levqor_e2e::*;

const FINGERPRINT: &str = "
WITH ext AS (SELECT oid FROM pg_extension WHERE extname = 'levqor')
SELECT x FROM (
  SELECT 'fn ' || p.oid::regprocedure::text || ' ' || p.prokind::text || p.provolatile::text || p.proparallel::text
         || p.prosecdef::text || p.proleakproof::text || p.proisstrict::text || ' '
         || coalesce(array_to_string(p.proconfig, ','), '') || ' ' || md5(p.prosrc) || ' '
         || coalesce(p.probin, '') || ' ' || coalesce(pg_get_function_result(p.oid), '') || ' '
         || coalesce(array_to_string(ARRAY(SELECT unnest(p.proacl)::text ORDER BY 1), ','), '') AS x
    FROM pg_proc p WHERE p.pronamespace = 'levqor'::regnamespace
  UNION ALL
  SELECT 'col ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' '
         || a.attnotnull::text || ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '') || ' ' || a.attidentity::text
    FROM pg_class c
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
   WHERE c.relnamespace = 'levqor'::regnamespace AND c.relkind IN ('r', 'v')
  UNION ALL
  SELECT 'rel ' || c.relname || ' ' || c.relkind::text || ' '
         || coalesce(array_to_string(ARRAY(SELECT unnest(c.relacl)::text ORDER BY 1), ','), '')
    FROM pg_class c WHERE c.relnamespace = 'levqor'::regnamespace
  UNION ALL
  SELECT 'colacl ' || c.relname || '.' || a.attname || ' ' || array_to_string(ARRAY(SELECT unnest(a.attacl)::text ORDER BY 1), ',')
    FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attacl IS NOT NULL
   WHERE c.relnamespace = 'levqor'::regnamespace
  UNION ALL
  SELECT 'con ' || conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
    FROM pg_constraint WHERE connamespace = 'levqor'::regnamespace
  UNION ALL
  SELECT 'idx ' || pg_get_indexdef(indexrelid)
    FROM pg_index WHERE indrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'levqor'::regnamespace)
  UNION ALL
  SELECT 'trg ' || pg_get_triggerdef(oid)
    FROM pg_trigger WHERE NOT tgisinternal AND tgrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'levqor'::regnamespace)
  UNION ALL
  SELECT 'evt ' || evtname || ' ' || evtevent || ' ' || evtfoid::regproc::text || ' ' || evtenabled::text || ' '
         || coalesce(array_to_string(evttags, ','), '')
    FROM pg_event_trigger
  UNION ALL
  SELECT 'nsp ' || nspname || ' ' || coalesce(array_to_string(ARRAY(SELECT unnest(nspacl)::text ORDER BY 1), ','), '')
    FROM pg_namespace WHERE nspname IN ('levqor', 'levqor_template')
  UNION ALL
  SELECT 'cfg ' || u.c::regclass::text || ' ' || coalesce(u.w, '')
    FROM pg_extension e, unnest(e.extconfig, e.extcondition) AS u(c, w) WHERE e.extname = 'levqor'
  UNION ALL
  SELECT 'pol ' || pol.polrelid::regclass::text || ' ' || pol.polname || ' ' || pol.polcmd::text || pol.polpermissive::text
         || ' ' || coalesce(pg_get_expr(pol.polqual, pol.polrelid), '') || ' ' || coalesce(pg_get_expr(pol.polwithcheck, pol.polrelid), '')
         || ' ' || array_to_string(pol.polroles::regrole[]::text[], ',')
    FROM pg_policy pol WHERE pol.polrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'levqor'::regnamespace)
  UNION ALL
  SELECT 'member ' || pg_describe_object(classid, objid, objsubid)
    FROM pg_depend, ext WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e' AND refobjid = ext.oid
) f ORDER BY 1";

fn fingerprint(c: &mut Client) -> Vec<String> {
    c.query(FINGERPRINT, &[]).unwrap().iter().map(|r| r.get(0)).collect()
}

const CURRENT: &str = "0.4.0";

#[test]
fn update_from_0_1_0_keeps_data_and_matches_a_fresh_install() {
    update_from("0.1.0");
}

#[test]
fn update_from_0_2_0_keeps_data_and_matches_a_fresh_install() {
    update_from("0.2.0");
}

#[test]
fn update_from_0_3_0_keeps_data_and_matches_a_fresh_install() {
    update_from("0.3.0");
}

fn update_from(from: &str) {
    let (old_db, mut old) = new_database("upgrade_old");
    old.batch_execute(&format!(
        "CREATE EXTENSION levqor VERSION '{from}';
         CREATE TABLE orders (id bigserial PRIMARY KEY, item text NOT NULL);
         SELECT levqor.enable_tenancy('orders');
         GRANT SELECT, INSERT, UPDATE, DELETE ON orders TO {APP};
         GRANT USAGE ON SEQUENCE orders_id_seq TO {APP};"
    ))
    .unwrap();
    let a = create_tenant_on(&mut old, "upg-a");
    let b = create_tenant_on(&mut old, "upg-b");
    if from != "0.1.0" {
        // An audit trail, sealed by the old release (chain fields in the entries).
        old.batch_execute("SELECT levqor.enable_audit('orders')").unwrap();
    }
    old.execute("INSERT INTO orders (item, tenant_id) VALUES ('a-order', $1), ('b-order', $2)", &[&a.id, &b.id]).unwrap();
    if from != "0.1.0" {
        old.batch_execute("SELECT levqor.seal_audit()").unwrap();
        // More than a run's worth (96) of one chain, and an entry sealed
        // after a newer one (its transaction committed later): the update
        // must cut the old chain into runs of ascending ids.
        let mut straggler = connect_to(port(), "postgres", &old_db);
        let mut tx = straggler.transaction().unwrap();
        tx.execute("INSERT INTO orders (item, tenant_id) VALUES ('late', $1)", &[&a.id]).unwrap();
        old.execute("INSERT INTO orders (item, tenant_id) SELECT 'bulk ' || g, $1 FROM generate_series(1, 300) g", &[&a.id])
            .unwrap();
        old.batch_execute("SELECT levqor.seal_audit()").unwrap();
        tx.commit().unwrap();
        old.batch_execute("SELECT levqor.seal_audit()").unwrap();
    }
    let version: String = old.query_one("SELECT extversion FROM pg_extension WHERE extname = 'levqor'", &[]).unwrap().get(0);
    assert_eq!(version, from);

    old.batch_execute("ALTER EXTENSION levqor UPDATE").unwrap();
    let version: String = old.query_one("SELECT extversion FROM pg_extension WHERE extname = 'levqor'", &[]).unwrap().get(0);
    assert_eq!(version, CURRENT);

    // Data, keys and protection came through.
    let mut c = connect_to(port(), APP, &old_db);
    let a_orders = if from == "0.1.0" { 1 } else { 1 + 301 };
    assert_eq!(as_tenant(&mut c, &a, |tx| tx.query("SELECT item FROM orders", &[]).unwrap().len()), a_orders);
    assert_eq!(c.query("SELECT item FROM orders", &[]).unwrap().len(), 0);
    assert_eq!(sqlstate(old.batch_execute("ALTER TABLE orders NO FORCE ROW LEVEL SECURITY")), "42501");
    // What 0.3.0 added works on the old tenants: quotas count and refuse.
    old.execute("SELECT levqor.set_quota($1, 'api_calls_per_15min', 2)", &[&a.slug]).unwrap();
    let left: Vec<Option<i64>> = as_tenant(&mut c, &a, |tx| {
        (0..2).map(|_| tx.query_one("SELECT levqor.consume('api_calls_per_15min')", &[]).unwrap().get(0)).collect()
    });
    assert_eq!(left, vec![Some(1), Some(0)]);
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&a.key]).unwrap();
    assert_eq!(sqlstate(tx.execute("SELECT levqor.consume('api_calls_per_15min')", &[])), "53400");
    drop(tx);
    // What 0.2.0 added works on the old tables: suspension refuses writes.
    old.execute("SELECT levqor.suspend_tenant($1, 'upgrade test')", &[&b.slug]).unwrap();
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&b.key]).unwrap();
    assert_eq!(sqlstate(tx.execute("INSERT INTO orders (item) VALUES ('x')", &[])), "25006");
    drop(tx);
    assert!(old.query("SELECT * FROM levqor.isolation_report()", &[]).unwrap().is_empty());

    // The audit chains came through: what the old release sealed still
    // verifies, and new entries (new ids, past the old ones) seal after it.
    let trail = |c: &mut Client| -> (i64, i64) {
        let r = c.query_one("SELECT count(*), max(id) FROM levqor.audit_log WHERE tenant_id = $1", &[&a.id]).unwrap();
        (r.get(0), r.get::<_, Option<i64>>(1).unwrap_or(0))
    };
    let (_, last_old) = trail(&mut old);
    let chained: i64 = old.query_one("SELECT count(*) FROM levqor.audit_trail WHERE tenant_id = $1 AND seq IS NOT NULL", &[&a.id]).unwrap().get(0);
    assert!(from == "0.1.0" || chained >= 303, "tenant_created and the orders, sealed by {from}: {chained}");
    if from != "0.1.0" {
        let r = old
            .query_one("SELECT count(*), max(cardinality(ids))::int8 FROM levqor.audit_chain WHERE chain = $1", &[&a.id])
            .unwrap();
        assert!(r.get::<_, i64>(0) >= 4 && r.get::<_, i64>(1) == 96, "runs: {:?}", (r.get::<_, i64>(0), r.get::<_, i64>(1)));
        let late: i64 = old
            .query_one(
                "SELECT t.seq - (SELECT max(seq) FROM levqor.audit_trail WHERE tenant_id = $1 AND new_row->>'item' LIKE 'bulk%')
                   FROM levqor.audit_trail t WHERE t.tenant_id = $1 AND t.new_row->>'item' = 'late'",
                &[&a.id],
            )
            .unwrap()
            .get(0);
        assert_eq!(late, 1, "the late entry keeps its place after the bulk ones");
    }
    let checked: i64 = old.query_one("SELECT checked FROM levqor.verify_audit($1) WHERE ok", &[&a.slug]).unwrap().get(0);
    assert_eq!(checked, chained, "every entry the old release sealed verifies");
    old.batch_execute("SELECT levqor.enable_audit('orders')").unwrap();
    as_tenant(&mut c, &a, |tx| tx.execute("INSERT INTO orders (item) VALUES ('after-upgrade')", &[]).unwrap());
    old.batch_execute("SELECT levqor.seal_audit()").unwrap();
    let (after, last_new) = trail(&mut old);
    assert!(last_new > last_old, "new entries take new ids: {last_old} -> {last_new}");
    let r = old.query_one("SELECT ok, checked, reason FROM levqor.verify_audit($1)", &[&a.slug]).unwrap();
    assert_eq!((r.get::<_, bool>(0), r.get::<_, i64>(1)), (true, after), "{:?}", r.get::<_, Option<String>>(2));

    // The catalog is exactly that of a fresh install.
    let (_new_db, mut new) = new_database("upgrade_new");
    new.batch_execute("CREATE EXTENSION levqor").unwrap();
    let (o, n) = (fingerprint(&mut old), fingerprint(&mut new));
    let only_old: Vec<_> = o.iter().filter(|x| !n.contains(x)).collect();
    let only_new: Vec<_> = n.iter().filter(|x| !o.contains(x)).collect();
    assert!(
        only_old.is_empty() && only_new.is_empty(),
        "catalog upgraded from {from} differs from a fresh install\nonly after upgrade: {only_old:#?}\nonly in fresh install: {only_new:#?}"
    );
    assert!(o.len() > 100, "the fingerprint covers the catalog ({} items)", o.len());

    // A table protected by the old release has the policies a new one gets.
    new.batch_execute("CREATE TABLE orders (id bigserial PRIMARY KEY, item text NOT NULL); SELECT levqor.enable_tenancy('orders');")
        .unwrap();
    let shape = "SELECT polname || ' ' || polcmd::text || polpermissive::text || ' ' || coalesce(pg_get_expr(polqual, polrelid), '')
                        || ' ' || coalesce(pg_get_expr(polwithcheck, polrelid), '')
                   FROM pg_policy WHERE polrelid = 'orders'::regclass ORDER BY polname";
    let rows = |c: &mut Client| -> Vec<String> { c.query(shape, &[]).unwrap().iter().map(|r| r.get(0)).collect() };
    assert_eq!(rows(&mut old), rows(&mut new), "policies of a table protected before the update");
    let problems: i64 = old.query_one("SELECT count(*) FROM levqor._tenancy_problems('orders', true)", &[]).unwrap().get(0);
    assert_eq!(problems, 0);
}

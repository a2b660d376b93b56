//! Tests of sql/tenancy.sql (enable_tenancy, disable_tenancy and the guards),
//! run inside PostgreSQL as an ordinary role where row level security matters.

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn setup() -> (String, String) {
        Spi::run(
            "CREATE ROLE unit_app NOLOGIN IN ROLE levqor_app;
             CREATE TABLE notes (id serial PRIMARY KEY, body text);
             GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO unit_app;
             GRANT USAGE ON SEQUENCE notes_id_seq TO unit_app;
             SELECT levqor.enable_tenancy('notes');",
        )
        .unwrap();
        let a = Spi::get_one::<String>("SELECT api_key FROM levqor.create_tenant('unit-a', 'A')").unwrap().unwrap();
        let b = Spi::get_one::<String>("SELECT api_key FROM levqor.create_tenant('unit-b', 'B')").unwrap().unwrap();
        (a, b)
    }

    fn as_app(key: &str, sql: &str) -> Option<i64> {
        Spi::run("SET LOCAL ROLE unit_app").unwrap();
        Spi::get_one_with_args::<pgrx::Uuid>("SELECT levqor.authenticate($1)", &[key.into()]).unwrap();
        let r = Spi::get_one::<i64>(sql).unwrap();
        Spi::run("RESET ROLE").unwrap();
        r
    }

    #[pg_test]
    fn the_generated_policies_are_restrictive_and_canonical() {
        setup();
        let n = Spi::get_one::<i64>(
            "SELECT count(*) FROM pg_policy WHERE polrelid = 'notes'::regclass AND NOT polpermissive
                AND coalesce(pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid))
                    = '(tenant_id = levqor.current_tenant())'",
        )
        .unwrap();
        assert_eq!(n, Some(4));
        let forced = Spi::get_one::<bool>("SELECT relforcerowsecurity AND relrowsecurity FROM pg_class WHERE oid = 'notes'::regclass").unwrap();
        assert_eq!(forced, Some(true));
        let problems = Spi::get_one::<i64>("SELECT count(*) FROM levqor._tenancy_problems('notes', true)").unwrap();
        assert_eq!(problems, Some(0));
    }

    #[pg_test]
    fn rows_stay_with_their_tenant() {
        let (a, b) = setup();
        as_app(&a, "WITH i AS (INSERT INTO notes (body) VALUES ('a1'), ('a2') RETURNING 1) SELECT count(*) FROM i");
        as_app(&b, "WITH i AS (INSERT INTO notes (body) VALUES ('b1') RETURNING 1) SELECT count(*) FROM i");
        assert_eq!(as_app(&a, "SELECT count(*) FROM notes"), Some(2));
        assert_eq!(as_app(&b, "SELECT count(*) FROM notes"), Some(1));
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM notes").unwrap(), Some(3), "superuser sees all");
    }

    #[pg_test(error = "levqor: ALTER TABLE would weaken tenant isolation on public.notes: row level security is not forced (the owner would bypass it)")]
    fn the_guard_refuses_no_force() {
        setup();
        Spi::run("ALTER TABLE notes NO FORCE ROW LEVEL SECURITY").unwrap();
    }

    #[pg_test]
    fn disable_tenancy_removes_exactly_what_enable_added() {
        setup();
        Spi::run("SELECT levqor.disable_tenancy('notes')").unwrap();
        let left = Spi::get_one::<i64>("SELECT count(*) FROM pg_policy WHERE polrelid = 'notes'::regclass").unwrap();
        assert_eq!(left, Some(0));
        let rls = Spi::get_one::<bool>("SELECT relrowsecurity FROM pg_class WHERE oid = 'notes'::regclass").unwrap();
        assert_eq!(rls, Some(false));
        let col = Spi::get_one::<i64>("SELECT count(*) FROM pg_attribute WHERE attrelid = 'notes'::regclass AND attname = 'tenant_id'").unwrap();
        assert_eq!(col, Some(1), "the data column stays");
    }
}

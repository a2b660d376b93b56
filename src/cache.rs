//! A backend-local cache of the catalog rows `authenticate()` and
//! `set_tenant()` read, so that establishing a context costs a hash and a
//! map lookup instead of a catalog query.
//!
//! Correctness comes from PostgreSQL's own cache invalidation: a statement
//! trigger on `levqor.tenants` and `levqor.tenant_keys` queues a relcache
//! invalidation for the table, which PostgreSQL delivers to every backend when
//! the writing transaction commits (and to the writer itself at once). Each
//! backend processes it before its next transaction starts, and the callback
//! below empties the cache. So a revoked key, a new expiry or a suspended
//! tenant is refused by every transaction that starts after the change
//! commits. Memberships (crate::members) are dropped the same way, by a
//! trigger on `levqor.members`. Expiry itself is checked on every use against the statement's
//! start time.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use pgrx::pg_sys;
use pgrx::prelude::*;
use uuid::Uuid;

/// Beyond this many entries the cache starts over rather than grow.
const MAX_ENTRIES: usize = 10_000;

#[derive(Clone)]
pub struct KeyRow {
    pub tenant: Uuid,
    pub hash: Vec<u8>,
    pub role: String,
    pub user: Option<Uuid>,
    pub revoked: bool,
    pub expires_at: Option<pg_sys::TimestampTz>,
}

fn now() -> pg_sys::TimestampTz {
    unsafe { pg_sys::GetCurrentStatementStartTimestamp() }
}

impl KeyRow {
    pub fn expired(&self) -> bool {
        self.expires_at.is_some_and(|e| e <= now())
    }
}

#[derive(Clone)]
pub struct TenantRow {
    pub id: Uuid,
    pub slug: String,
    pub status: String,
    pub suspension_mode: Option<String>,
    pub suspension_reason: Option<String>,
    pub trial_ends_at: Option<pg_sys::TimestampTz>,
    /// The tenant's own schema, for schema-isolation tenants.
    pub schema: Option<String>,
    /// At or over its storage limit (levqor.refresh_storage): no inserts or updates.
    pub storage_exceeded: bool,
}

/// What a tenant's status allows right now.
pub enum Access {
    Full,
    ReadOnly,
    Refused(String),
}

impl TenantRow {
    pub fn access(&self) -> Access {
        let slug = &self.slug;
        match (self.status.as_str(), self.suspension_mode.as_deref()) {
            ("active", _) => Access::Full,
            ("trial", _) if self.trial_ends_at.is_some_and(|t| t <= now()) => {
                Access::Refused(format!("the trial of tenant \"{slug}\" has ended"))
            }
            ("trial", _) => Access::Full,
            ("suspended", Some("read_only")) => Access::ReadOnly,
            ("suspended", _) => Access::Refused(format!("tenant \"{slug}\" is suspended")),
            ("offboarded", _) => Access::Refused(format!("tenant \"{slug}\" is offboarded")),
            (other, _) => Access::Refused(format!("tenant \"{slug}\" has unknown status \"{other}\"")),
        }
    }
}

thread_local! {
    static KEYS: RefCell<HashMap<String, KeyRow>> = RefCell::new(HashMap::new());
    static TENANTS: RefCell<HashMap<String, TenantRow>> = RefCell::new(HashMap::new());
    /// The oids of levqor.tenants and levqor.tenant_keys, learnt on first fill.
    static CATALOG: Cell<[pg_sys::Oid; 2]> = const { Cell::new([pg_sys::InvalidOid; 2]) };
    /// The oid of levqor.members, learnt on the first membership lookup.
    static MEMBERS: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    /// Set when the catalog changed: a session context must be re-checked.
    static STALE: Cell<bool> = const { Cell::new(false) };
}

/// Whether the catalog changed since the last call (and reset the flag).
pub fn take_stale() -> bool {
    STALE.with(|s| s.replace(false))
}

pub fn init() {
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(invalidate), pg_sys::Datum::from(0)) };
}

/// The one relcache callback for all of levqor's backend-local caches
/// (PostgreSQL has room for few): each module forgets what depends on relid.
unsafe extern "C-unwind" fn invalidate(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    crate::audit::forget(relid);
    crate::quota::forget(relid);
    crate::policy::forget(relid);
    crate::exposure::forget(relid);
    if relid == pg_sys::InvalidOid || CATALOG.with(Cell::get).contains(&relid) || MEMBERS.with(Cell::get) == relid {
        clear();
    }
}

pub fn clear() {
    STALE.with(|s| s.set(true));
    KEYS.with(|k| k.borrow_mut().clear());
    TENANTS.with(|t| t.borrow_mut().clear());
    crate::members::forget_all();
}

pub fn remember_members(members: pg_sys::Oid) {
    MEMBERS.with(|m| m.set(members));
}

pub fn remember_catalog(tenants: pg_sys::Oid, keys: pg_sys::Oid) {
    CATALOG.with(|c| c.set([tenants, keys]));
}

/// The value cached under `key`, or `fill()`'s, kept for next time (the
/// map starts over beyond MAX_ENTRIES). Every levqor cache goes through here.
pub fn get_or_fill<K, Q, V>(
    map: &'static std::thread::LocalKey<RefCell<HashMap<K, V>>>,
    key: &Q,
    fill: impl FnOnce() -> Option<V>,
) -> Option<V>
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ToOwned<Owned = K> + ?Sized,
    V: Clone,
{
    if let Some(v) = map.with(|m| m.borrow().get(key).cloned()) {
        return Some(v);
    }
    let v = fill()?;
    map.with(|m| {
        let mut m = m.borrow_mut();
        if m.len() >= MAX_ENTRIES {
            m.clear();
        }
        m.insert(key.to_owned(), v.clone());
    });
    Some(v)
}

pub fn key(key_id: &str, fill: impl FnOnce() -> Option<KeyRow>) -> Option<KeyRow> {
    get_or_fill(&KEYS, key_id, fill)
}

pub fn tenant(tenant: &str, fill: impl FnOnce() -> Option<TenantRow>) -> Option<TenantRow> {
    get_or_fill(&TENANTS, tenant, fill)
}

/// Statement trigger on the catalog tables: tell every backend to drop its cache.
#[pg_trigger]
fn _catalog_changed<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(trigger.relid()?) };
    Ok(None)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// authenticate() in a subtransaction: "ok" or the SQLSTATE it raised.
    fn try_auth(key: &str) -> String {
        Spi::run(
            "CREATE OR REPLACE FUNCTION pg_temp.try_auth(k text) RETURNS text LANGUAGE plpgsql AS
             $$ BEGIN PERFORM levqor.authenticate(k); RETURN 'ok';
                EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE; END $$",
        )
        .unwrap();
        Spi::get_one_with_args::<String>("SELECT pg_temp.try_auth($1)", &[key.into()]).unwrap().unwrap()
    }

    #[pg_test]
    fn changes_to_a_cached_key_or_tenant_take_effect_at_once() {
        let key = Spi::get_one::<String>("SELECT api_key FROM levqor.create_tenant('cache-rev', 'C')").unwrap().unwrap();
        assert_eq!(try_auth(&key), "ok");
        assert_eq!(try_auth(&key), "ok", "now served from the cache");
        Spi::run("UPDATE levqor.tenants SET status = 'suspended' WHERE slug = 'cache-rev'").unwrap();
        assert_eq!(try_auth(&key), "28000");
        Spi::run("UPDATE levqor.tenants SET status = 'active' WHERE slug = 'cache-rev'").unwrap();
        assert_eq!(try_auth(&key), "ok");
        Spi::run(&format!("SELECT levqor.revoke_key('{}')", &key[4..20])).unwrap();
        assert_eq!(try_auth(&key), "28000");
    }
}

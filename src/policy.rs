//! `levqor.authorize()`: the policy engine's decision (sql/policy.sql,
//! `levqor._decide`) cached per backend, so that a policy used in a row
//! level security policy costs a hash lookup per row rather than a query.
//! The cache is dropped when `levqor.policies`, `levqor.plans` or
//! `levqor.tenants` change (relcache invalidation, as in [`crate::cache`]).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use pgrx::pg_sys;
use pgrx::prelude::*;
use uuid::Uuid;

use crate::context::{self, from_uuid};
use crate::privilege::as_catalog_owner;

#[derive(Clone)]
struct Decision {
    allowed: bool,
    rule: String,
    rationale: String,
}

type Key = (Option<Uuid>, Option<&'static str>, String, String);

thread_local! {
    static DECISIONS: RefCell<HashMap<Key, Decision>> = RefCell::new(HashMap::new());
    static CATALOG: Cell<[pg_sys::Oid; 3]> = const { Cell::new([pg_sys::InvalidOid; 3]) };
}

/// Called from the relcache callback in crate::cache.
pub fn forget(relid: pg_sys::Oid) {
    if relid == pg_sys::InvalidOid || CATALOG.with(Cell::get).contains(&relid) {
        DECISIONS.with(|d| d.borrow_mut().clear());
    }
}

fn decide(key: &Key) -> Decision {
    crate::cache::get_or_fill(&DECISIONS, key, || Some(fill(key))).expect("a filled decision")
}

fn fill(key: &Key) -> Decision {
    let (tenant, role, action, resource) = key;
    as_catalog_owner(|| {
        Spi::connect(|client| {
            let table = client
                .select(
                    "SELECT d.allowed, d.rule, d.rationale,
                            'levqor.policies'::regclass::oid, 'levqor.plans'::regclass::oid, 'levqor.tenants'::regclass::oid
                       FROM levqor._decide($1, $2, $3, $4) d",
                    Some(1),
                    &[tenant.map(from_uuid).into(), (*role).into(), action.as_str().into(), resource.as_str().into()],
                )
                .expect("levqor: policy decision");
            let row = table.first();
            let oid = |i| row.get::<pg_sys::Oid>(i).ok().flatten().unwrap_or(pg_sys::InvalidOid);
            CATALOG.with(|c| c.set([oid(4), oid(5), oid(6)]));
            Decision {
                allowed: row.get::<bool>(1).ok().flatten().unwrap_or(false),
                rule: row.get::<String>(2).ok().flatten().unwrap_or_else(|| "default-deny".into()),
                rationale: row.get::<String>(3).ok().flatten().unwrap_or_default(),
            }
        })
    })
}

/// May the current context do `action` to `resource`? Default deny; every
/// deny is recorded (once per transaction and action/resource, see
/// `levqor._record_deny`). Usable from the application, in triggers and in
/// row level security policies.
#[pg_extern(volatile, parallel_unsafe)]
fn authorize(action: &str, resource: default!(&str, "'*'")) -> bool {
    let ctx = context::current();
    let key: Key = (
        ctx.map(|c| c.tenant),
        ctx.and_then(|c| crate::members::effective_role(&c)).map(|r| r.as_str()),
        action.to_owned(),
        resource.to_owned(),
    );
    let d = decide(&key);
    if !d.allowed && first_deny(&format!("{action}\u{1}{resource}")) {
        as_catalog_owner(|| {
            Spi::connect_mut(|client| {
                client
                    .update(
                        "SELECT levqor._record_deny($1, $2, $3, $4)",
                        None,
                        &[action.into(), resource.into(), d.rule.as_str().into(), d.rationale.as_str().into()],
                    )
                    .expect("levqor: record a deny");
            })
        });
    }
    d.allowed
}

thread_local! {
    /// Denies already recorded in this transaction (by its local id).
    static DENIED: std::cell::RefCell<(u32, std::collections::HashSet<String>)> =
        std::cell::RefCell::new((0, std::collections::HashSet::new()));
}

/// True the first time a transaction asks about `key`: the policy engine
/// records each distinct deny once per transaction, so a policy evaluated
/// for every row of a scan does not write an entry per row.
fn first_deny(key: &str) -> bool {
    let lxid = unsafe { (*pg_sys::MyProc).lxid };
    DENIED.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != lxid {
            *d = (lxid, std::collections::HashSet::new());
        }
        d.1.len() < 10_000 && d.1.insert(key.to_owned())
    })
}

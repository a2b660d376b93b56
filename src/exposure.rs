//! Fail closed when a protected table's row level security is off.
//!
//! levqor's DDL guard refuses `DISABLE ROW LEVEL SECURITY` and `NO FORCE`,
//! but a superuser can bypass event triggers (`session_replication_role =
//! replica`, `ALTER EVENT TRIGGER … DISABLE`). PostgreSQL then applies no
//! policy at all: every tenant's rows to anyone granted the table. So every
//! query (the `ExecutorStart` hook in lifecycle.rs) and every `COPY` of a
//! table (the `ProcessUtility` hook below) is checked: a table carrying
//! levqor's policies, or a partition of one, whose row level security is off
//! is refused to every role that row level security would have filtered;
//! with row level security on but not forced, to its owner.
//!
//! What a relation is, is learnt once per backend and forgotten by the
//! relcache callback (enabling or disabling row level security and creating
//! or dropping a policy both invalidate the table's relcache entry).

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::privilege::as_catalog_owner;

/// A protected table whose row level security does not apply to everyone.
#[derive(Clone, Copy)]
struct Exposure {
    rls_off: bool,
    owner: pg_sys::Oid,
}

thread_local! {
    /// relid -> None (not protected, or protected and closed) or its exposure.
    static KNOWN: RefCell<HashMap<pg_sys::Oid, Option<Exposure>>> = RefCell::new(HashMap::new());
}

/// Called from the relcache callback in crate::cache.
pub fn forget(relid: pg_sys::Oid) {
    KNOWN.with(|k| {
        let mut k = k.borrow_mut();
        if relid == pg_sys::InvalidOid {
            k.clear();
        } else {
            k.remove(&relid);
        }
    });
}

const LOOKUP: &str = "
    SELECT NOT (c.relrowsecurity AND c.relforcerowsecurity), NOT c.relrowsecurity, c.relowner,
           EXISTS (SELECT 1 FROM pg_catalog.pg_policy p
                    WHERE p.polrelid IN (SELECT a.relid FROM pg_catalog.pg_partition_ancestors(c.oid) a
                                         UNION ALL SELECT c.oid)
                      AND (p.polname LIKE 'levqor\\_tenant\\_%' OR p.polname IN ('levqor_base', 'levqor_schema_tenant')))
      FROM pg_catalog.pg_class c WHERE c.oid = $1";

fn lookup(relid: pg_sys::Oid) -> Option<Exposure> {
    if let Some(known) = KNOWN.with(|k| k.borrow().get(&relid).copied()) {
        return known;
    }
    let found = crate::citus::with_shards_visible(|| as_catalog_owner(|| {
        Spi::connect(|client| {
            let table = client.select(LOOKUP, Some(1), &[relid.into()]).ok()?;
            let row = table.into_iter().next()?;
            let open = row.get::<bool>(1).ok()??;
            let protected = row.get::<bool>(4).ok()??;
            (open && protected).then(|| Exposure {
                rls_off: row.get::<bool>(2).ok().flatten().unwrap_or(true),
                owner: row.get::<pg_sys::Oid>(3).ok().flatten().unwrap_or(pg_sys::InvalidOid),
            })
        })
    }));
    KNOWN.with(|k| {
        let mut k = k.borrow_mut();
        if k.len() >= 10_000 {
            k.clear();
        }
        k.insert(relid, found);
    });
    found
}

/// A relation's name for a message (its oid if it has none any more).
fn relation_name(relid: pg_sys::Oid) -> String {
    unsafe {
        let n = pg_sys::get_rel_name(relid);
        if n.is_null() { relid.to_u32().to_string() } else { std::ffi::CStr::from_ptr(n).to_string_lossy().into_owned() }
    }
}

fn refuse(relid: pg_sys::Oid, user: pg_sys::Oid) {
    let Some(e) = lookup(relid) else { return };
    unsafe {
        if pg_sys::superuser_arg(user) || pg_sys::has_bypassrls_privilege(user) {
            return;
        }
        if !e.rls_off && !pg_sys::has_privs_of_role(user, e.owner) {
            return;
        }
    }
    let name = relation_name(relid);
    crate::errors::raise(
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        if e.rls_off {
            format!("levqor: row level security is off on protected table {name}: refused, it would show every tenant's rows")
        } else {
            format!("levqor: row level security is not forced on protected table {name}, which you own: refused")
        },
        Some("levqor's DDL guard was bypassed. A superuser restores it: ALTER TABLE … ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY; levqor.isolation_report() lists such tables."),
    );
}

/// Check the relations a query reads or writes (from the ExecutorStart hook).
pub unsafe fn check_query(query: *mut pg_sys::QueryDesc) {
    if query.is_null() || (*query).plannedstmt.is_null() {
        return;
    }
    let rtable = pgrx::PgList::<pg_sys::RangeTblEntry>::from_pg((*(*query).plannedstmt).rtable);
    for rte in rtable.iter_ptr() {
        let rte = &*rte;
        // User tables only: levqor's own lookups read catalogs.
        if rte.rtekind != pg_sys::RTEKind::RTE_RELATION
            || rte.relid.to_u32() < pg_sys::FirstNormalObjectId
            || !matches!(rte.relkind as u8, b'r' | b'p')
        {
            continue;
        }
        let user = if rte.checkAsUser != pg_sys::InvalidOid { rte.checkAsUser } else { pg_sys::GetUserId() };
        refuse(rte.relid, user);
    }
}

static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

pub fn init() {
    unsafe {
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

/// `COPY table TO/FROM` reads and writes without the executor when row
/// level security is off, so it is checked here.
#[pg_guard]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    let stmt = (*pstmt).utilityStmt;
    if !stmt.is_null() && (*stmt).type_ == pg_sys::NodeTag::T_CopyStmt {
        let copy = &*(stmt as *mut pg_sys::CopyStmt);
        if !copy.relation.is_null() && copy.query.is_null() {
            let relid = relid_of(copy.relation);
            if relid != pg_sys::InvalidOid && relid.to_u32() >= pg_sys::FirstNormalObjectId {
                refuse(relid, pg_sys::GetUserId());
            }
        }
    }
    if !stmt.is_null() && (*stmt).type_ == pg_sys::NodeTag::T_TruncateStmt {
        let rels = pgrx::PgList::<pg_sys::RangeVar>::from_pg((*(stmt as *mut pg_sys::TruncateStmt)).relations);
        for rv in rels.iter_ptr() {
            let relid = relid_of(rv);
            if relid != pg_sys::InvalidOid && relid.to_u32() >= pg_sys::FirstNormalObjectId {
                refuse_unguarded_truncate(relid);
            }
        }
    }
    crate::pooling::check_utility(stmt);
    // CREATE TABLE AS / SELECT INTO: which relations the query reads, learnt
    // before it runs (the statement may be executed from a cached plan).
    let copied = if !stmt.is_null() && (*stmt).type_ == pg_sys::NodeTag::T_CreateTableAsStmt {
        let ctas = &*(stmt as *mut pg_sys::CreateTableAsStmt);
        if ctas.objtype == pg_sys::ObjectType::OBJECT_TABLE && !ctas.into.is_null() {
            let mut sources: Vec<pg_sys::Oid> = Vec::new();
            read_relations(ctas.query, &mut sources as *mut Vec<pg_sys::Oid> as *mut std::ffi::c_void);
            sources.retain(|r| r.to_u32() >= pg_sys::FirstNormalObjectId);
            (!sources.is_empty()).then_some(((*ctas.into).rel, sources))
        } else {
            None
        }
    } else {
        None
    };
    match PREV_PROCESS_UTILITY {
        Some(prev) => prev(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
        None => pg_sys::standard_ProcessUtility(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
    }
    if let Some((rel, sources)) = copied {
        record_copy(rel, sources);
    }
}

/// A table carrying levqor's tenant policies but no TRUNCATE guard trigger:
/// a Citus shard made after its table was distributed (Citus keeps no
/// TRUNCATE triggers on shards). TRUNCATE ignores row level security, so it
/// is refused here as the trigger would refuse it.
fn refuse_unguarded_truncate(relid: pg_sys::Oid) {
    const UNGUARDED: &str = "
        SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_policy p WHERE p.polrelid = $1
                          AND (p.polname LIKE 'levqor\\_tenant\\_%' OR p.polname = 'levqor_base'))
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t WHERE t.tgrelid = $1
                              AND t.tgname ~ '^levqor_no_truncate(_[0-9]+)?$')";
    let unguarded = as_catalog_owner(|| Spi::get_one_with_args::<bool>(UNGUARDED, &[relid.into()]).ok().flatten()).unwrap_or(false);
    if unguarded {
        let name = relation_name(relid);
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("TRUNCATE of {name} is refused: it would remove every tenant's rows"),
            Some("DELETE removes only the current tenant's rows."),
        );
    }
}

unsafe fn relid_of(rv: *mut pg_sys::RangeVar) -> pg_sys::Oid {
    pg_sys::RangeVarGetRelidExtended(rv, pg_sys::NoLock as i32, pg_sys::RVROption::RVR_MISSING_OK, None, std::ptr::null_mut())
}

/// Collects the relations a query tree reads: range table entries, in
/// subqueries, CTEs and sublinks too.
unsafe extern "C-unwind" fn read_relations(node: *mut pg_sys::Node, out: *mut std::ffi::c_void) -> bool {
    if node.is_null() {
        return false;
    }
    match (*node).type_ {
        pg_sys::NodeTag::T_RangeTblEntry => {
            let rte = &*(node as *mut pg_sys::RangeTblEntry);
            if rte.rtekind == pg_sys::RTEKind::RTE_RELATION {
                (*(out as *mut Vec<pg_sys::Oid>)).push(rte.relid);
            }
            false
        }
        pg_sys::NodeTag::T_Query => pg_sys::query_tree_walker(
            node as *mut pg_sys::Query,
            Some(read_relations),
            out,
            pg_sys::QTW_EXAMINE_RTES_BEFORE as i32,
        ),
        _ => pg_sys::expression_tree_walker(node, Some(read_relations), out),
    }
}

/// A table made from protected tables holds tenant rows outside any policy:
/// recorded for `isolation_report()` (copy_of_protected) and warned about.
fn record_copy(rel: *mut pg_sys::RangeVar, sources: Vec<pg_sys::Oid>) {
    let relid = unsafe { relid_of(rel) };
    if relid == pg_sys::InvalidOid {
        return;
    }
    let user = unsafe { pg_sys::GetUserId() };
    let bypassed = unsafe { pg_sys::superuser_arg(user) || pg_sys::has_bypassrls_privilege(user) };
    let creator = unsafe { std::ffi::CStr::from_ptr(pg_sys::GetUserNameFromId(user, false)) }.to_string_lossy().into_owned();
    let copied = as_catalog_owner(|| {
        Spi::connect_mut(|client| {
            let installed = client
                .select("SELECT to_regclass('levqor.derived_tables') IS NOT NULL", Some(1), &[])
                .ok()
                .and_then(|t| t.first().get::<bool>(1).ok().flatten())
                .unwrap_or(false);
            if !installed {
                return None;
            }
            client
                .update(
                    "INSERT INTO levqor.derived_tables AS d (tbl, sources, bypassed, created_by)
                     SELECT $1::oid::regclass, array_agg(DISTINCT s::regclass), $3, $4
                       FROM unnest($2::oid[]) s WHERE levqor._is_protected(s)
                     HAVING count(*) > 0
                     ON CONFLICT (tbl) DO UPDATE SET sources = EXCLUDED.sources, bypassed = EXCLUDED.bypassed,
                                                     created_by = EXCLUDED.created_by, created_at = now()
                     RETURNING array_to_string(d.sources::text[], ', ')",
                    None,
                    &[relid.into(), sources.into(), bypassed.into(), creator.as_str().into()],
                )
                .ok()
                .and_then(|t| t.first().get::<String>(1).ok().flatten())
        })
    });
    if let Some(from) = copied {
        let name = relation_name(relid);
        ereport!(
            WARNING,
            PgSqlErrorCode::ERRCODE_WARNING,
            format!(
                "levqor: table {name} copies rows of protected {from}{}, outside any policy",
                if bypassed { " (every tenant's: you bypass row level security)" } else { "" }
            ),
            "Protect it with levqor.enable_tenancy(), or drop it once done; levqor.isolation_report() lists it."
        );
    }
}

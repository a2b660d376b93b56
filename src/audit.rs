//! The audit trigger: one entry per inserted, updated or deleted row (and per
//! TRUNCATE) of an audited table, appended to `levqor.audit_log` unchained;
//! `levqor.seal_audit()` links entries into their tenant's hash chain later,
//! so writers never wait for one another (sql/audit.sql).
//!
//! Statement-level triggers over transition tables write all of a
//! statement's entries with one set-based insert (a 100,000-row INSERT is one
//! audit insert, not 100,000). Updates are paired by primary key; a table
//! without one is audited row by row for updates. Inserts run with the
//! catalog owner's authority (nobody else may write the log) through saved
//! plans, one per table, operation and kind of trigger.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;
use std::rc::Rc;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::PgBuiltInOids;

use crate::privilege::as_catalog_owner;

const INSERT_SQL: &str = "
    INSERT INTO levqor.audit_log
        (tenant_id, db_role, user_id, member_role, kind, table_name, operation, pk, old_row, new_row, changed)
    SELECT coalesce((coalesce(r.n, r.o) ->> $7)::uuid, levqor.current_tenant()), $5,
           levqor.current_user_id(), levqor.current_member_role(), 'row', $4, $3,
           (SELECT jsonb_object_agg(k, coalesce(r.n, r.o) -> k) FROM unnest($6::text[]) k),
           r.o, r.n,
           CASE WHEN $3 = 'UPDATE' THEN
               ARRAY(SELECT e.key FROM jsonb_each(r.n) e WHERE e.value IS DISTINCT FROM r.o -> e.key ORDER BY e.key COLLATE \"C\")
           END
      FROM (SELECT to_jsonb($1) AS o, to_jsonb($2) AS n) r";

const TABLE_SQL: &str = "
    SELECT (SELECT array_agg(a.attname::text ORDER BY k.ord)
              FROM pg_index i
              CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = $1 AND i.indisprimary),
           (SELECT p.tenant_column::text FROM levqor._protected() p WHERE p.tbl = $1 LIMIT 1),
           $1::regclass::text";

struct TablePlan {
    plan: OwnedPreparedStatement,
    pk: Vec<String>,
    /// How its columns become JSON in one-row entries (src/row_json.rs).
    kinds: Option<Vec<Option<crate::row_json::Kind>>>,
    tenant_column: Option<String>,
    name: String,
}

/// (table, operation, statement-level)
type PlanKey = (pg_sys::Oid, &'static str, bool);

thread_local! {
    /// Never borrowed across a query: the relcache callback (`forget`) may
    /// run inside any query and must find the map free. Plans are shared out
    /// as `Rc`, so one forgotten mid-use lives until its caller is done.
    static PLANS: RefCell<HashMap<PlanKey, Rc<TablePlan>>> = RefCell::new(HashMap::new());
}

/// The set-based insert of a statement-level trigger: rows come from the
/// transition tables levqor_old / levqor_new (named in enable_audit).
fn statement_sql(op: &str, pk: &[String]) -> String {
    // Whole-row references (alias.*) under aliases no user column is
    // likely to share; primary key columns are NOT NULL, so `=` pairs rows
    // (and FULL JOIN needs a hashable or mergeable condition).
    let source = match op {
        "INSERT" => "SELECT NULL::jsonb AS o, to_jsonb(levqor_n.*) AS n FROM levqor_new AS levqor_n".to_string(),
        "DELETE" => "SELECT to_jsonb(levqor_o.*) AS o, NULL::jsonb AS n FROM levqor_old AS levqor_o".to_string(),
        _ => {
            let on = pk
                .iter()
                .map(|c| {
                    let c = pgrx::spi::quote_identifier(c);
                    format!("levqor_o.{c} = levqor_n.{c}")
                })
                .collect::<Vec<_>>()
                .join(" AND ");
            format!(
                "SELECT to_jsonb(levqor_o.*) AS o, to_jsonb(levqor_n.*) AS n
                   FROM levqor_old AS levqor_o FULL JOIN levqor_new AS levqor_n ON {on}"
            )
        }
    };
    format!(
        "INSERT INTO levqor.audit_log
             (tenant_id, db_role, user_id, member_role, kind, table_name, operation, pk, old_row, new_row, changed)
         SELECT coalesce((coalesce(r.n, r.o) ->> $3)::uuid, levqor.current_tenant()), $1,
                levqor.current_user_id(), levqor.current_member_role(), 'row', $2, '{op}',
                (SELECT jsonb_object_agg(k, coalesce(r.n, r.o) -> k) FROM unnest($4::text[]) k),
                r.o, r.n,
                CASE WHEN '{op}' = 'UPDATE' THEN
                    ARRAY(SELECT e.key FROM jsonb_each(r.n) e WHERE e.value IS DISTINCT FROM r.o -> e.key ORDER BY e.key COLLATE \"C\")
                END
           FROM ({source}) r"
    )
}

/// Forget plans when a table changes shape (called from the relcache callback).
pub fn forget(relid: pg_sys::Oid) {
    crate::audit_direct::forget(relid);
    PLANS.with(|p| {
        let mut p = p.borrow_mut();
        if relid == pg_sys::InvalidOid {
            p.clear();
        } else {
            p.retain(|k, _| k.0 != relid);
        }
    });
}

#[pg_trigger]
fn _audit_row<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
    // A data-only restore loads rows that the restored trail already
    // records; auditing them again would duplicate the trail (and collide
    // with its restored entry ids, the id sequence being set only later).
    if crate::privilege::restoring() {
        return Ok(None);
    }
    let data = trigger.trigger_data();
    let relid = trigger.relid()?;
    let op = match trigger.op()? {
        pgrx::PgTriggerOperation::Insert => "INSERT",
        pgrx::PgTriggerOperation::Update => "UPDATE",
        pgrx::PgTriggerOperation::Delete => "DELETE",
        pgrx::PgTriggerOperation::Truncate => "TRUNCATE",
    };
    // The role that made the change, before switching to the catalog owner.
    let role =
        unsafe { CStr::from_ptr(pg_sys::GetUserNameFromId(pg_sys::GetUserId(), false)) }.to_string_lossy().into_owned();
    let (reltype, tupdesc) = unsafe { ((*(*data.tg_relation).rd_rel).reltype, (*data.tg_relation).rd_att) };
    // Row images as composite datums of the table's row type.
    let as_datum = |t: *mut pg_sys::HeapTupleData| -> Option<pg_sys::Datum> {
        (!t.is_null()).then(|| unsafe { pg_sys::heap_copy_tuple_as_datum(t, tupdesc) })
    };
    let row_level = matches!(trigger.level(), pgrx::PgTriggerLevel::Row);
    // Statement level with transition tables, except TRUNCATE (no rows).
    let set_based = !row_level && op != "TRUNCATE";
    let (old, new) = match (row_level, op) {
        (false, _) => (None, None),
        (true, "INSERT") => (None, as_datum(data.tg_trigtuple)),
        (true, "UPDATE") => (as_datum(data.tg_trigtuple), as_datum(data.tg_newtuple)),
        (true, _) => (as_datum(data.tg_trigtuple), None),
    };
    let key: PlanKey = (relid, op, set_based);
    // One row, of a table whose metadata this backend has: written directly,
    // without so much as an SPI connection or a change of user
    // (src/audit_direct.rs).
    let direct = |p: &TablePlan| -> bool {
        let Some((old, new)) = (unsafe { crate::audit_direct::single_row(data, op) }) else {
            return false;
        };
        let entry = crate::audit_direct::Entry {
            old,
            new,
            op,
            table: &p.name,
            role: &role,
            pk: &p.pk,
            kinds: p.kinds.as_deref(),
            tenant_column: p.tenant_column.as_deref(),
        };
        unsafe { crate::audit_direct::insert(&entry, tupdesc) }
    };
    // Whether that was tried already (a many-row statement, or an update of
    // the key, then takes the SQL path without forming its entry twice).
    let mut tried = false;
    if set_based {
        let cached = PLANS.with(|plans| plans.borrow().get(&key).cloned());
        if let Some(p) = cached.filter(|_| crate::audit_direct::client_addr_known()) {
            if direct(&p) {
                return Ok(None);
            }
            tried = true;
        }
    }
    as_catalog_owner(|| {
        Spi::connect_mut(|client| {
            if set_based {
                // Makes levqor_old / levqor_new visible to this SPI connection.
                unsafe { pg_sys::SPI_register_trigger_data(data as *const _ as *mut pg_sys::TriggerData) };
            }
            let cached = PLANS.with(|plans| plans.borrow().get(&key).cloned());
            let p = match cached {
                Some(p) => p,
                None => {
                    let (pk, tenant_column, name) = {
                        let t = client.select(TABLE_SQL, Some(1), &[relid.into()]).expect("audit: read table metadata");
                        let row = t.first();
                        (
                            row.get::<Vec<String>>(1).ok().flatten().unwrap_or_default(),
                            row.get::<String>(2).ok().flatten(),
                            row.get::<String>(3).ok().flatten().unwrap_or_default(),
                        )
                    };
                    let text = pg_sys::PgOid::BuiltIn(PgBuiltInOids::TEXTOID);
                    let plan = if set_based {
                        let types = [text, text, text, pg_sys::PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID)];
                        client.prepare_mut(statement_sql(op, &pk).as_str(), &types)
                    } else {
                        let types = [
                            pg_sys::PgOid::from(reltype),
                            pg_sys::PgOid::from(reltype),
                            text,
                            text,
                            text,
                            pg_sys::PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID),
                            text,
                        ];
                        client.prepare_mut(INSERT_SQL, &types)
                    }
                    .expect("audit: prepare")
                    .keep();
                    let kinds = unsafe { crate::row_json::kinds(tupdesc) };
                    let p = Rc::new(TablePlan { plan, pk, kinds, tenant_column, name });
                    PLANS.with(|plans| plans.borrow_mut().insert(key, p.clone()));
                    p
                }
            };
            if set_based {
                crate::audit_direct::client_addr(client);
                if !tried && direct(&p) {
                    return;
                }
                let args =
                    [role.as_str().into(), p.name.as_str().into(), p.tenant_column.clone().into(), p.pk.clone().into()];
                client.update(&p.plan, None, &args).expect("audit: append entries");
            } else {
                let row = |d: Option<pg_sys::Datum>| match d {
                    Some(d) => unsafe { DatumWithOid::new(d, reltype) },
                    None => DatumWithOid::null_oid(reltype),
                };
                let args = [
                    row(old),
                    row(new),
                    op.into(),
                    p.name.as_str().into(),
                    role.as_str().into(),
                    p.pk.clone().into(),
                    p.tenant_column.clone().into(),
                ];
                client.update(&p.plan, None, &args).expect("audit: append entry");
            }
        })
    });
    Ok(None)
}

/// The default of levqor.audit_log.id: the transaction's id first, then the
/// next entry id.
#[pg_extern(volatile, parallel_unsafe)]
fn _audit_id() -> i64 {
    crate::audit_direct::next_id(true)
}

/// Make every WAL record written so far durable, as a synchronous commit
/// would, for levqor.audit_head(): the worker commits its sealing passes
/// without waiting for the flush, and a head given out must survive a crash.
#[pg_extern(volatile, parallel_unsafe)]
fn _flush_wal() {
    unsafe {
        if !pg_sys::RecoveryInProgress() {
            pg_sys::XLogFlush(pg_sys::GetXLogInsertRecPtr());
        }
    }
}

/// The next transaction id to be assigned, for the sealer's watermark (it
/// must be read, not taken: the sealer's own transaction may already have
/// an id older than some writer's).
#[pg_extern(volatile, parallel_unsafe)]
fn _next_xid() -> i64 {
    unsafe { pg_sys::ReadNextFullTransactionId() }.value as i64
}

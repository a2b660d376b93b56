//! The audit entry of a one-row statement, written without SPI.
//!
//! Most writes change one row. Planning and starting an executor for the
//! trigger's `INSERT … SELECT` into `levqor.audit_log` costs more than the
//! audited insert itself, so for a statement whose transition tables hold
//! one row this forms the entry here and inserts it with the table access
//! method and the index AM, as COPY does. The entry is the one the SQL path
//! writes: the same JSON (to_jsonb), the same defaults.
//! Bulk statements keep the set-based SQL path (src/audit.rs).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::IntoDatum;

use crate::context;

/// levqor.audit_log and its id sequence, learnt once per backend.
#[derive(Clone, Copy)]
struct Target {
    rel: pg_sys::Oid,
    seq: pg_sys::Oid,
}

thread_local! {
    static TARGET: Cell<Option<Target>> = const { Cell::new(None) };
    /// inet_client_addr(), learnt by client_addr().
    static CLIENT_INET: Cell<Option<Option<pg_sys::Datum>>> = const { Cell::new(None) };
    /// What appending to each of levqor's append-only tables needs to know
    /// of its indexes (`indexes`), learnt once per backend. Never
    /// borrowed across a call into PostgreSQL: the relcache callback
    /// (`forget`) may run inside one. Shared out as `Rc`, so that an entry
    /// forgotten mid-use lives until its user is done.
    static INDEXES: RefCell<HashMap<pg_sys::Oid, Rc<Indexes>>> = RefCell::new(HashMap::new());
}

/// Forget the target, and what is known of a table's indexes, when the
/// table changes (relcache callback; an index created or dropped
/// invalidates its table too).
pub fn forget(relid: pg_sys::Oid) {
    TARGET.with(|t| {
        if relid == pg_sys::InvalidOid || t.get().is_some_and(|x| x.rel == relid || x.seq == relid) {
            t.set(None);
        }
    });
    INDEXES.with(|i| {
        let mut i = i.borrow_mut();
        if relid == pg_sys::InvalidOid {
            i.clear();
        } else {
            i.remove(&relid);
        }
    });
}

/// levqor.audit_log and its id sequence, looked up by name (no SPI: the id
/// default calls this for every entry the SQL paths write).
pub fn target() -> (pg_sys::Oid, pg_sys::Oid) {
    if let Some(t) = TARGET.with(Cell::get) {
        return (t.rel, t.seq);
    }
    let (rel, seq) = (levqor_relation(c"audit_log"), levqor_relation(c"audit_log_id_seq"));
    TARGET.with(|c| c.set(Some(Target { rel, seq })));
    (rel, seq)
}

/// A relation of levqor's schema, by name (a syscache lookup, no SPI).
pub fn levqor_relation(name: &CStr) -> pg_sys::Oid {
    let rel = unsafe { pg_sys::get_relname_relid(name.as_ptr(), pg_sys::get_namespace_oid(c"levqor".as_ptr(), false)) };
    assert!(rel != pg_sys::InvalidOid, "levqor.{} exists", name.to_string_lossy());
    rel
}

unsafe extern "C-unwind" {
    // commands/sequence.h (not in pgrx's bindings).
    fn nextval_internal(relid: pg_sys::Oid, check_permissions: bool) -> i64;
}

/// The next entry id, taken after the transaction's id: the sealer relies
/// on that order (see levqor.seal_audit in sql/audit.sql). The trigger's
/// direct path takes it unchecked: it runs as the writer, who has no
/// privileges on levqor's sequence (by design).
pub fn next_id(check_permissions: bool) -> i64 {
    unsafe {
        pg_sys::GetTopTransactionId();
        let seq = target().1;
        pg_sys::ffi::pg_guard_ffi_boundary(|| nextval_internal(seq, check_permissions))
    }
}

/// Whether client_addr() has learnt the client's address.
pub fn client_addr_known() -> bool {
    CLIENT_INET.with(Cell::get).is_some()
}

/// Learn the client's address as the column default inet_client_addr()
/// gives it, once per backend (it is constant), as an inet datum in
/// TopMemoryContext.
pub fn client_addr(client: &pgrx::spi::SpiClient<'_>) {
    if client_addr_known() {
        return;
    }
    let text = client
        .select("SELECT inet_client_addr()::text", Some(1), &[])
        .ok()
        .and_then(|t| t.first().get::<String>(1).ok().flatten());
    let inet = text.map(|a| unsafe {
        pgrx::PgMemoryContexts::TopMemoryContext
            .switch_to(|_| call1(pg_sys::inet_in, pg_sys::Datum::from(cstr(&a).as_ptr())))
    });
    CLIENT_INET.with(|c| c.set(Some(inet)));
}

/// The one row of a transition table, as a composite datum.
unsafe fn only_row(store: *mut pg_sys::Tuplestorestate, desc: pg_sys::TupleDesc) -> Option<pg_sys::Datum> {
    if store.is_null() || pg_sys::tuplestore_tuple_count(store) != 1 {
        return None;
    }
    let slot = pg_sys::MakeSingleTupleTableSlot(desc, &pg_sys::TTSOpsMinimalTuple);
    pg_sys::tuplestore_rescan(store);
    let got = pg_sys::tuplestore_gettupleslot(store, true, false, slot);
    let datum = got.then(|| pg_sys::ExecFetchSlotHeapTupleDatum(slot));
    pg_sys::ExecDropSingleTupleTableSlot(slot);
    datum
}

/// The statement's single (old, new) row images, or None for a statement
/// that changed no row or more than one.
pub unsafe fn single_row(
    data: &pg_sys::TriggerData,
    op: &str,
) -> Option<(Option<pg_sys::Datum>, Option<pg_sys::Datum>)> {
    let desc = (*data.tg_relation).rd_att;
    match op {
        "INSERT" => Some((None, Some(only_row(data.tg_newtable, desc)?))),
        "DELETE" => Some((Some(only_row(data.tg_oldtable, desc)?), None)),
        "UPDATE" => Some((Some(only_row(data.tg_oldtable, desc)?), Some(only_row(data.tg_newtable, desc)?))),
        _ => None,
    }
}

pub(crate) type PgFn = unsafe fn(pg_sys::FunctionCallInfo) -> pg_sys::Datum;

/// A built-in function called directly; None when it returns SQL NULL.
unsafe fn call(f: PgFn, args: &[pg_sys::Datum]) -> Option<pg_sys::Datum> {
    let args: Vec<Option<pg_sys::Datum>> = args.iter().copied().map(Some).collect();
    pgrx::direct_function_call_as_datum(f, &args)
}

pub(crate) unsafe fn call1(f: PgFn, a: pg_sys::Datum) -> pg_sys::Datum {
    call(f, &[a]).expect("a strict built-in returns a value")
}

/// to_jsonb(row), as the SQL path computes it: built directly for a table
/// whose column types src/row_json.rs handles, else by to_jsonb. to_jsonb
/// learns its argument's type from the call expression, so it gets one: a
/// call on a NULL constant of the row type.
pub(crate) unsafe fn row_jsonb(row: pg_sys::Datum, desc: pg_sys::TupleDesc, kinds: Option<&[Option<crate::row_json::Kind>]>) -> pg_sys::Datum {
    // (The plan that classified the columns is forgotten when the table
    // changes; the length check is a second guard.)
    if let Some(kinds) = kinds.filter(|k| k.len() == (*desc).natts as usize) {
        return crate::row_json::row(row, desc, kinds);
    }
    let rowtype = (*desc).tdtypeid;
    let to_jsonb = pg_sys::Oid::from(pg_sys::F_TO_JSONB);
    let mut flinfo: pg_sys::FmgrInfo = std::mem::zeroed();
    pg_sys::fmgr_info(to_jsonb, &mut flinfo);
    let arg = pg_sys::makeNullConst(rowtype, -1, pg_sys::InvalidOid);
    let args = pg_sys::lappend(std::ptr::null_mut(), arg.cast());
    let expr = pg_sys::makeFuncExpr(
        to_jsonb,
        pg_sys::JSONBOID,
        args,
        pg_sys::InvalidOid,
        pg_sys::InvalidOid,
        pg_sys::CoercionForm::COERCE_EXPLICIT_CALL,
    );
    flinfo.fn_expr = expr.cast();
    pg_sys::FunctionCall1Coll(&mut flinfo, pg_sys::InvalidOid, row)
}

fn cstr(s: &str) -> CString {
    CString::new(s.replace('\0', "")).expect("no NUL")
}

/// The entry's `pk`: an object of the primary key's columns (the row
/// without its other columns), or NULL for a table without one (as
/// jsonb_object_agg over no keys gives).
unsafe fn pk_jsonb(row: pg_sys::Datum, pk: &[String]) -> Option<pg_sys::Datum> {
    (!pk.is_empty()).then(|| crate::row_json::pick(row, pk))
}

/// The columns whose values differ, in byte order of their names (as the
/// SQL path sorts them).
unsafe fn changed(old: pg_sys::Datum, new: pg_sys::Datum, desc: pg_sys::TupleDesc) -> Vec<String> {
    let mut names = Vec::new();
    for i in 0..(*desc).natts as usize {
        let att = &*(*desc).attrs.as_ptr().add(i);
        if att.attisdropped {
            continue;
        }
        let name = CStr::from_ptr(att.attname.data.as_ptr()).to_string_lossy().into_owned();
        let same = crate::row_json::same_field(old, new, &name);
        if !same {
            names.push(name);
        }
    }
    names.sort();
    names
}

/// The tenant of the row: its tenant column, else the context's.
unsafe fn tenant_of(row: pg_sys::Datum, tenant_column: Option<&str>) -> Option<pg_sys::Datum> {
    let from_row = tenant_column
        .and_then(|c| crate::row_json::string_field(row, c))
        .and_then(|text| uuid::Uuid::try_parse_ascii(&text).ok());
    from_row
        .or_else(|| context::current().map(|c| c.tenant))
        .and_then(|u| context::from_uuid(u).into_datum())
}

pub struct Entry<'a> {
    pub old: Option<pg_sys::Datum>,
    pub new: Option<pg_sys::Datum>,
    pub op: &'a str,
    pub table: &'a str,
    pub role: &'a str,
    pub pk: &'a [String],
    /// How the table's columns become JSON without to_jsonb, when they can.
    pub kinds: Option<&'a [Option<crate::row_json::Kind>]>,
    pub tenant_column: Option<&'a str>,
}

/// Form and insert one audit entry, once client_addr() has run. Needs no
/// privilege: nothing here checks one (the table and index AMs do not, and
/// the id is taken unchecked).
/// Returns false, writing nothing, for an update that changed the primary
/// key: the SQL path records that as the old row and the new row, unpaired,
/// and so must this.
pub unsafe fn insert(e: &Entry<'_>, desc: pg_sys::TupleDesc) -> bool {
    let old = e.old.map(|d| row_jsonb(d, desc, e.kinds));
    let new = e.new.map(|d| row_jsonb(d, desc, e.kinds));
    let any = new.or(old).expect("an entry has a row");
    let pk = pk_jsonb(any, e.pk);
    if let (Some(o), Some(_), Some(key)) = (old, new, pk) {
        let old_key = pk_jsonb(o, e.pk).expect("same key columns");
        if !call(pg_sys::jsonb_eq, &[key, old_key]).is_some_and(|d| d.value() != 0) {
            return false;
        }
    }
    let ctx = context::current();
    // The setting's own variable: what current_setting('application_name') reads.
    let app_name = if pg_sys::application_name.is_null() { c"".as_ptr() } else { pg_sys::application_name };
    let changed = match (old, new) {
        (Some(o), Some(n)) if e.op == "UPDATE" => Some(changed(o, n, desc)),
        _ => None,
    };

    let rel = pg_sys::table_open(target().0, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
    let log_desc = (*rel).rd_att;
    let natts = (*log_desc).natts as usize;
    let mut values = vec![pg_sys::Datum::from(0); natts];
    let mut nulls = vec![true; natts];
    for i in 0..natts {
        let att = &*(*log_desc).attrs.as_ptr().add(i);
        if att.attisdropped {
            continue;
        }
        let name = CStr::from_ptr(att.attname.data.as_ptr()).to_bytes();
        let v: Option<pg_sys::Datum> = match name {
            b"id" => Some(pg_sys::Datum::from(next_id(false))),
            b"tenant_id" => tenant_of(any, e.tenant_column),
            b"at" => Some(pg_sys::Datum::from(pg_sys::GetCurrentStatementStartTimestamp())),
            b"xid" => Some(pg_sys::Datum::from(pg_sys::GetTopFullTransactionId().value)),
            b"db_role" => e.role.into_datum(),
            b"user_id" => ctx.and_then(|c| c.user).and_then(|u| context::from_uuid(u).into_datum()),
            b"member_role" => ctx.and_then(|c| crate::members::effective_role(&c)).and_then(|r| r.as_str().into_datum()),
            b"application_name" => Some(pg_sys::Datum::from(pg_sys::cstring_to_text(app_name))),
            b"client_addr" => CLIENT_INET.with(Cell::get).flatten(),
            b"kind" => "row".into_datum(),
            b"table_name" => e.table.into_datum(),
            b"operation" => e.op.into_datum(),
            b"pk" => pk,
            b"old_row" => old,
            b"new_row" => new,
            b"changed" => changed.clone().and_then(|c| c.into_datum()),
            _ => None, // event and detail: an event's, not a row's
        };
        if let Some(v) = v {
            values[i] = v;
            nulls[i] = false;
        }
    }
    append_open(rel, std::iter::once((values, nulls)));
    pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    true
}

/// Insert rows into an open table with the table AM and its indexes (unique
/// ones checked), as COPY does: no executor, no SPI. No triggers, no
/// constraints other than the indexes': for levqor's own append-only tables.
pub unsafe fn append_open(rel: pg_sys::Relation, rows: impl Iterator<Item = (Vec<pg_sys::Datum>, Vec<bool>)>) {
    let indexes = indexes(rel);
    match &indexes.plain {
        Some(plain) => append_plain(rel, plain, rows),
        None => append_with_executor(rel, rows),
    }
}

/// A table's indexes, when the table is a heap and every index is over
/// plain columns, immediate and without exclusion constraints (as levqor
/// creates them): each index's oid and IndexInfo (in `context`). Otherwise
/// None: an index a DBA added with expressions, a predicate or deferred
/// uniqueness, or another table access method, takes the executor's way,
/// which handles all of those.
struct Indexes {
    plain: Option<Vec<(pg_sys::Oid, *mut pg_sys::IndexInfo)>>,
    context: pg_sys::MemoryContext,
}

impl Drop for Indexes {
    fn drop(&mut self) {
        unsafe { pg_sys::MemoryContextDelete(self.context) };
    }
}

/// What is known of an open table's indexes, learnt on first use. The
/// caller holds a lock on the table, so no index comes or goes meanwhile
/// other than by the caller's own transaction, whose invalidation reaches
/// `forget` at its next command.
unsafe fn indexes(rel: pg_sys::Relation) -> Rc<Indexes> {
    let relid = (*rel).rd_id;
    if let Some(known) = INDEXES.with(|i| i.borrow().get(&relid).cloned()) {
        return known;
    }
    let context = pg_sys::AllocSetContextCreateExtended(
        pg_sys::CacheMemoryContext,
        c"levqor append indexes".as_ptr(),
        pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
        pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
        pg_sys::ALLOCSET_SMALL_MAXSIZE as usize,
    );
    let mut plain = ((*rel).rd_tableam == pg_sys::GetHeapamTableAmRoutine()).then(Vec::new);
    if let Some(out) = plain.as_mut() {
        let list = pg_sys::RelationGetIndexList(rel);
        let mut all_plain = true;
        if !list.is_null() {
            for i in 0..(*list).length {
                let oid = pg_sys::list_nth_oid(list, i);
                let index = pg_sys::index_open(oid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
                let old = pg_sys::MemoryContextSwitchTo(context);
                let info = pg_sys::BuildIndexInfo(index);
                pg_sys::MemoryContextSwitchTo(old);
                let form = &*(*index).rd_index;
                if !(*info).ii_Expressions.is_null()
                    || !(*info).ii_Predicate.is_null()
                    || !(*info).ii_ExclusionOps.is_null()
                    || (form.indisunique && !form.indimmediate)
                {
                    all_plain = false;
                }
                out.push((oid, info));
                pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
            }
            pg_sys::list_free(list);
        }
        if !all_plain {
            plain = None;
        }
    }
    let known = Rc::new(Indexes { plain, context });
    INDEXES.with(|i| i.borrow_mut().insert(relid, known.clone()));
    known
}

/// The heap tuple, then an entry in each index that is ready for inserts
/// (what ExecInsertIndexTuples does for plain indexes), keys taken from the
/// row's own values.
unsafe fn append_plain(
    rel: pg_sys::Relation,
    indexes: &[(pg_sys::Oid, *mut pg_sys::IndexInfo)],
    rows: impl Iterator<Item = (Vec<pg_sys::Datum>, Vec<bool>)>,
) {
    let desc = (*rel).rd_att;
    let open: Vec<(pg_sys::Relation, *mut pg_sys::IndexInfo)> = indexes
        .iter()
        .map(|&(oid, info)| (pg_sys::index_open(oid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE), info))
        .collect();
    let mut keys = [pg_sys::Datum::from(0); pg_sys::INDEX_MAX_KEYS as usize];
    let mut key_nulls = [false; pg_sys::INDEX_MAX_KEYS as usize];
    for (mut values, mut nulls) in rows {
        let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::simple_heap_insert(rel, tuple);
        for &(index, info) in &open {
            // Read now, not when the IndexInfo was built: CREATE INDEX
            // CONCURRENTLY makes an index ready while the table is in use.
            if !(*(*index).rd_index).indisready {
                continue;
            }
            for k in 0..(*info).ii_NumIndexAttrs as usize {
                let column = (*info).ii_IndexAttrNumbers[k] as usize - 1;
                keys[k] = values[column];
                key_nulls[k] = nulls[column];
            }
            let check = if (*(*index).rd_index).indisunique {
                pg_sys::IndexUniqueCheck::UNIQUE_CHECK_YES
            } else {
                pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO
            };
            pg_sys::index_insert(index, keys.as_mut_ptr(), key_nulls.as_mut_ptr(), &mut (*tuple).t_self, rel, check, false, info);
        }
        pg_sys::heap_freetuple(tuple);
    }
    for (index, _) in open {
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
}

/// The executor's way: a result relation, its indexes and a slot.
unsafe fn append_with_executor(rel: pg_sys::Relation, rows: impl Iterator<Item = (Vec<pg_sys::Datum>, Vec<bool>)>) {
    let desc = (*rel).rd_att;
    let estate = pg_sys::CreateExecutorState();
    let rri = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>()).cast::<pg_sys::ResultRelInfo>();
    (*rri).type_ = pg_sys::NodeTag::T_ResultRelInfo;
    pg_sys::InitResultRelInfo(rri, rel, 1, std::ptr::null_mut(), 0);
    pg_sys::ExecOpenIndices(rri, false);
    let slot = pg_sys::ExecInitExtraTupleSlot(estate, desc, &pg_sys::TTSOpsHeapTuple);
    for (mut values, mut nulls) in rows {
        let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::ExecStoreHeapTuple(tuple, slot, true);
        pg_sys::simple_table_tuple_insert(rel, slot);
        let recheck =
            pg_sys::ExecInsertIndexTuples(rri, slot, estate, false, false, std::ptr::null_mut(), std::ptr::null_mut());
        if !recheck.is_null() {
            pg_sys::list_free(recheck);
        }
        pg_sys::ExecClearTuple(slot);
    }
    pg_sys::ExecCloseIndices(rri);
    pg_sys::ExecResetTupleTable((*estate).es_tupleTable, false);
    pg_sys::FreeExecutorState(estate);
}

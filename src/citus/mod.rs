//! levqor on Citus (docs/citus.md). Detected at run time: levqor does not
//! link against Citus; the few Citus functions used are looked up in the
//! running server, and without them everything here is a no-op.
//!
//! * **The context on the workers.** Policies run where the shards are. A
//!   transaction's context is forwarded as `levqor.node_context`, which Citus
//!   replays (`SET LOCAL`, with `citus.propagate_set_commands = 'local'`) on
//!   every worker connection of the transaction. The value is signed with
//!   `levqor.cluster_secret` (superuser-only, the same on every node) and
//!   names the database role and the Citus distributed transaction it was
//!   made for, and when it expires. A worker accepts it only if the signature
//!   holds and its role is the connection's; uses it only inside that
//!   distributed transaction, before it expires (each statement checks), and
//!   never after that transaction ended on this node (`ended`). The
//!   coordinator re-signs it when half its lifetime is gone, so a long
//!   transaction keeps a fresh one. It carries what the worker
//!   cannot look up (the tenant's catalog lives on the coordinator): the
//!   member role the coordinator decided and whether the tenant may write.
//!   The value is hidden from `SHOW` and `pg_stat_activity` (crate::redact).
//! * **Routing.** Citus prunes shards only with constants and parameters;
//!   levqor's policies compare with `levqor.current_tenant()`. On the
//!   coordinator, the planner hook gives a client's statement of one
//!   hash-distributed protected table `<tenant column> = $k`, a parameter
//!   past its own that the executor fills in (`supply_tenant`), so one plan
//!   serves every tenant; anything else gets the current tenant as a
//!   constant in its policy quals (never of local tables: those run here),
//!   and a change to another tenant invalidates exactly those plans. The
//!   workers still apply the real policies with the forwarded context: a
//!   stale route could only pick the wrong shard, never show another
//!   tenant's rows.

use std::cell::Cell;
use std::ffi::{c_char, c_void, CStr, CString};

use hmac::Mac;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::context::{self, Context, MemberRole};

mod ended;

/// How long a forwarded context is accepted after it was made (seconds).
/// The coordinator re-signs it at a statement's start once half of this is
/// gone; a worker refuses it at a statement's start once all is.
static LIFETIME: GucSetting<i32> = GucSetting::<i32>::new(60);
const MIN_SECRET_LEN: usize = 32;
const PREFIX: &str = "lvqn1.";

static CLUSTER_SECRET: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static NODE_CONTEXT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// What the coordinator decided, for the workers that cannot look it up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forwarded {
    pub role: Option<MemberRole>,
    pub read_only: bool,
    pub storage_exceeded: bool,
    txn: ended::Txn,
    expires: i64,
}

#[repr(C)]
struct DistributedTransactionId {
    initiator_node_identifier: i32,
    transaction_originator: bool,
    transaction_number: u64,
    timestamp: pg_sys::TimestampTz,
}

#[derive(Clone, Copy)]
struct Symbols {
    current_transaction: unsafe extern "C-unwind" fn() -> *mut DistributedTransactionId,
    ensure_transaction: unsafe extern "C-unwind" fn(),
    is_citus_table: unsafe extern "C-unwind" fn(pg_sys::Oid) -> bool,
    partition_column: unsafe extern "C-unwind" fn(pg_sys::Oid, u32) -> *mut pg_sys::Var,
}

extern "C" {
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

thread_local! {
    static SYMBOLS: Cell<Option<Option<Symbols>>> = const { Cell::new(None) };
    /// The verified, parsed `levqor.node_context`.
    static NODE: Cell<Option<(Context, Forwarded)>> = const { Cell::new(None) };
    /// The local transaction in which NODE was found to belong to Citus's
    /// distributed transaction.
    static BOUND: Cell<Option<(u32, bool)>> = const { Cell::new(None) };
    /// The tenant (None: no context) that this backend's valid routed plans
    /// carry as a constant; None when no routed plan is valid.
    static ROUTED_FOR: Cell<Option<Option<uuid::Uuid>>> = const { Cell::new(None) };
    /// The distributed transactions of the forwarded contexts this local
    /// transaction was handed, with the latest expiry of each: recorded as
    /// ended on this node when it ends.
    static SEEN: std::cell::RefCell<Vec<(ended::Txn, i64)>> = const { std::cell::RefCell::new(Vec::new()) };
    /// On a coordinator: the context this local transaction forwarded and
    /// when it was signed, to re-sign it before it expires.
    static SIGNED: Cell<Option<(u32, i64, Context)>> = const { Cell::new(None) };
    static RESIGNING: Cell<bool> = const { Cell::new(false) };
}

/// Citus's functions, if Citus is loaded in this server.
fn symbols() -> Option<Symbols> {
    if let Some(known) = SYMBOLS.with(Cell::get) {
        return known;
    }
    // SAFETY: dlsym on the default handle finds what shared_preload_libraries
    // loaded (PostgreSQL loads libraries RTLD_GLOBAL); the signatures are
    // those of Citus 11 to 13 (transaction_identifier.h, metadata_cache.h).
    let found = unsafe {
        let look = |name: &CStr| dlsym(std::ptr::null_mut(), name.as_ptr());
        let a = look(c"GetCurrentDistributedTransactionId");
        let b = look(c"EnsureDistributedTransactionId");
        let c = look(c"IsCitusTable");
        let d = look(c"PartitionColumn");
        (!a.is_null() && !b.is_null() && !c.is_null() && !d.is_null()).then(|| Symbols {
            current_transaction: std::mem::transmute::<*mut c_void, unsafe extern "C-unwind" fn() -> *mut DistributedTransactionId>(a),
            ensure_transaction: std::mem::transmute::<*mut c_void, unsafe extern "C-unwind" fn()>(b),
            is_citus_table: std::mem::transmute::<*mut c_void, unsafe extern "C-unwind" fn(pg_sys::Oid) -> bool>(c),
            partition_column: std::mem::transmute::<*mut c_void, unsafe extern "C-unwind" fn(pg_sys::Oid, u32) -> *mut pg_sys::Var>(d),
        })
    };
    SYMBOLS.with(|s| s.set(Some(found)));
    found
}

/// Run `f` with Citus's shard hiding off: on a worker, Citus filters its
/// shards out of every query of pg_class, and levqor's catalog checks must
/// see them. The setting is scoped like a function's SET clause.
pub fn with_shards_visible<R>(f: impl FnOnce() -> R) -> R {
    if symbols().is_none() {
        return f();
    }
    unsafe {
        let nest = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"citus.override_table_visibility".as_ptr(),
            c"off".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        let r = f();
        pg_sys::AtEOXact_GUC(true, nest);
        r
    }
}

/// Citus is loaded and its extension exists in this database.
pub fn active() -> bool {
    symbols().is_some() && unsafe { pg_sys::get_extension_oid(c"citus".as_ptr(), true) != pg_sys::InvalidOid }
}

/// Whether Citus is loaded and installed here, for SQL (levqor.distribute and the guards).
#[pg_extern(stable, parallel_safe)]
fn _citus_active() -> bool {
    active()
}

pub fn init() {
    // SAFETY: the hooks never raise errors.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"levqor.cluster_secret",
            c"HMAC-SHA256 secret that signs the tenant context levqor forwards to Citus workers (at least 32 bytes, the same on every node)",
            c"Superuser-only. Set it in postgresql.conf or with ALTER SYSTEM on every node.",
            &CLUSTER_SECRET,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
            None,
            None,
            None,
        );
        GucRegistry::define_int_guc(
            c"levqor.node_context_lifetime",
            c"How long a tenant context forwarded to Citus workers is accepted after it was signed",
            c"The coordinator re-signs it when half is gone. Superuser-only; per role with ALTER ROLE … SET.",
            &LIFETIME,
            2,
            86_400,
            // Superuser-set, so that a role running long analytic statements
            // can get a longer one (ALTER ROLE … SET) and nobody a shorter
            // replay window than the cluster's by their own choice.
            GucContext::Suset,
            GucFlags::UNIT_S,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"levqor.node_context",
            c"the tenant context as forwarded to Citus workers (set only by levqor, signed)",
            c"Written by levqor.authenticate() and friends on a Citus coordinator; a worker accepts only a value signed with levqor.cluster_secret.",
            &NODE_CONTEXT,
            GucContext::Userset,
            GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL | GucFlags::DISALLOW_IN_FILE,
            Some(check_node_context),
            Some(assign_node_context),
            None,
        );
        PREV_PLANNER = pg_sys::planner_hook;
        pg_sys::planner_hook = Some(planner);
        if symbols().is_some() {
            ended::init();
        }
        pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
    }
}

fn lifetime() -> i64 {
    LIFETIME.get() as i64
}

/// At the end of a local transaction, record the distributed transactions
/// whose contexts it was handed as ended on this node. A Citus transaction
/// ends on all its connections together (COMMIT, or PREPARE for two-phase
/// commit), so none of its connections here needs the context after that.
#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    use pg_sys::XactEvent::*;
    if !matches!(event, XACT_EVENT_COMMIT | XACT_EVENT_ABORT | XACT_EVENT_PREPARE) {
        return;
    }
    let seen = SEEN.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let now = now_unix();
    for (txn, expires) in seen {
        ended::record(txn, expires.max(now + lifetime()), now);
    }
}

fn note_seen(f: &Forwarded) {
    SEEN.with(|s| {
        let mut s = s.borrow_mut();
        match s.iter_mut().find(|(t, _)| *t == f.txn) {
            Some(e) => e.1 = e.1.max(f.expires),
            None => s.push((f.txn, f.expires)),
        }
    });
}

fn secret() -> Option<Vec<u8>> {
    CLUSTER_SECRET.get().map(|s| s.into_bytes()).filter(|s| s.len() >= MIN_SECRET_LEN)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

fn current_role_name() -> Option<String> {
    unsafe {
        let name = pg_sys::GetUserNameFromId(pg_sys::GetUserId(), true);
        (!name.is_null()).then(|| CStr::from_ptr(name).to_string_lossy().into_owned())
    }
}

fn now_unix() -> i64 {
    // PostgreSQL's epoch is 2000-01-01; microseconds.
    unsafe { pg_sys::GetCurrentTimestamp() / 1_000_000 + 946_684_800 }
}

/// `lvqn1.<context fields>.<forwarded fields>.<role hex>.<initiator>.<transaction>.<its start>.<expires>.<hmac>`:
/// dot separated, no user text except the hex-encoded role name, nothing to quote.
fn encode(ctx: &Context, f: &Forwarded, role_name: &str, secret: &[u8]) -> String {
    let payload = format!(
        "{PREFIX}{}.{}.{}.{}.{}.{}.{}.{}.{}.{}.{}.{}",
        ctx.tenant.hyphenated(),
        ctx.user.map(|u| u.hyphenated().to_string()).unwrap_or_else(|| "-".into()),
        ctx.role.map(MemberRole::as_str).unwrap_or("-"),
        ctx.source.as_str(),
        f.role.map(MemberRole::as_str).unwrap_or("-"),
        if f.read_only { "ro" } else { "rw" },
        if f.storage_exceeded { "full" } else { "ok" },
        hex(role_name.as_bytes()),
        f.txn.initiator,
        f.txn.number,
        f.txn.stamp,
        f.expires,
    );
    let mut m = crate::token::mac(secret);
    m.update(payload.as_bytes());
    format!("{payload}.{}", hex(&m.finalize().into_bytes()))
}

/// Why a value is refused; never contains the value. The expiry is checked
/// where the value is used (`check_in_force`), not here: Citus replays every
/// `SET LOCAL` of a transaction on a connection it opens late, the expired
/// ones before the one that re-signed them.
fn decode(value: &str, secret: &[u8], role_name: &str) -> Result<(Context, Forwarded), &'static str> {
    let (payload, sig) = value.rsplit_once('.').ok_or("malformed")?;
    let sig = unhex(sig).ok_or("malformed")?;
    let mut m = crate::token::mac(secret);
    m.update(payload.as_bytes());
    m.verify_slice(&sig).map_err(|_| "bad signature (is levqor.cluster_secret the same on every node?)")?;
    let rest = payload.strip_prefix(PREFIX).ok_or("malformed")?;
    let f: Vec<&str> = rest.split('.').collect();
    if f.len() != 12 {
        return Err("malformed");
    }
    let uuid = |s: &str| uuid::Uuid::parse_str(s).map_err(|_| "malformed");
    let role = |s: &str| match s {
        "-" => Ok(None),
        r => MemberRole::parse(r).map(Some).ok_or("malformed"),
    };
    let ctx = Context {
        tenant: uuid(f[0])?,
        user: if f[1] == "-" { None } else { Some(uuid(f[1])?) },
        role: role(f[2])?,
        source: context::Source::parse(f[3]).ok_or("malformed")?,
    };
    let fwd = Forwarded {
        role: role(f[4])?,
        read_only: f[5] == "ro",
        storage_exceeded: f[6] == "full",
        txn: ended::Txn {
            initiator: f[8].parse().map_err(|_| "malformed")?,
            number: f[9].parse().map_err(|_| "malformed")?,
            stamp: f[10].parse().map_err(|_| "malformed")?,
        },
        expires: f[11].parse().map_err(|_| "malformed")?,
    };
    if unhex(f[7]).as_deref() != Some(role_name.as_bytes()) {
        return Err("it was made for another database role");
    }
    Ok((ctx, fwd))
}

unsafe extern "C-unwind" fn check_node_context(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    let value = *newval;
    if value.is_null() || *value == 0 || pg_sys::InitializingParallelWorker {
        return true;
    }
    let refuse = |why: &str| {
        pg_sys::GUC_check_errcode(PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION as i32);
        let msg = CString::new(format!("levqor: the forwarded tenant context is refused: {why}")).expect("no NUL");
        pg_sys::GUC_check_errmsg_string = pg_sys::pstrdup(msg.as_ptr());
        false
    };
    let Some(secret) = secret() else {
        return refuse("levqor.cluster_secret is not set on this node (or shorter than 32 bytes)");
    };
    if !ended::available() {
        return refuse("levqor is not in shared_preload_libraries after citus on this node");
    }
    let Some(role) = current_role_name() else { return refuse("no current role") };
    let Ok(text) = CStr::from_ptr(value).to_str() else { return refuse("malformed") };
    match decode(text, &secret, &role) {
        Ok((_, f)) if ended::state(&f.txn, None, now_unix()) == ended::State::Ended => {
            refuse(ENDED)
        }
        Ok(_) => true,
        Err(why) => refuse(why),
    }
}

const ENDED: &str = "the distributed transaction it was made for has ended on this node";

unsafe extern "C-unwind" fn assign_node_context(newval: *const c_char, _extra: *mut c_void) {
    // Checked by the hook above (or copied from a parallel leader that did);
    // parsed again here, where PostgreSQL hands over no parsed copy.
    let parsed = if newval.is_null() || *newval == 0 {
        None
    } else {
        let text = CStr::from_ptr(newval).to_str().ok();
        let (secret, role) = (secret(), current_role_name());
        match (text, secret, role) {
            (Some(t), Some(s), Some(r)) => decode(t, &s, &r).ok(),
            _ => None,
        }
    };
    if let Some((_, f)) = &parsed {
        if !pg_sys::InitializingParallelWorker {
            note_seen(f);
        }
    }
    let before = NODE.with(|n| n.replace(parsed));
    BOUND.with(|b| b.set(None));
    if before.map(|(c, _)| c.tenant) != parsed.map(|(c, _)| c.tenant) {
        tenant_changed(parsed.map(|(c, _)| c.tenant));
    }
}

fn local_transaction() -> u32 {
    unsafe { (*pg_sys::MyProc).lxid }
}

/// The forwarded context, if any, and only inside the distributed transaction
/// it was made for. Parallel workers use what their leader verified (the
/// leader checks before any worker starts: `verify_before_execution`).
pub fn forwarded() -> Option<(Context, Forwarded)> {
    let (ctx, fwd) = NODE.with(Cell::get)?;
    if unsafe { pg_sys::ParallelWorkerNumber } >= 0 {
        return Some((ctx, fwd));
    }
    let lxid = local_transaction();
    if BOUND.with(Cell::get) == Some((lxid, true)) {
        return Some((ctx, fwd));
    }
    let ok = match symbols() {
        Some(s) => unsafe {
            let id = pg_sys::ffi::pg_guard_ffi_boundary(|| (s.current_transaction)());
            !id.is_null()
                && (*id).transaction_number == fwd.txn.number
                && (*id).initiator_node_identifier == fwd.txn.initiator
                && (*id).timestamp == fwd.txn.stamp
                && fwd.txn.number != 0
        },
        None => false,
    };
    // Only a match is remembered: Citus assigns the distributed transaction
    // after it replays the SET LOCAL (in the same message).
    if ok {
        BOUND.with(|b| b.set(Some((lxid, true))));
    }
    ok.then_some((ctx, fwd))
}

/// From the ExecutorStart hook, in a leader. On a coordinator: re-sign the
/// forwarded context once half its lifetime is gone. On a worker: refuse a
/// forwarded context that has expired or whose distributed transaction ended
/// here; and drop one that does not belong to this distributed transaction
/// before the parallel workers of a parallel plan copy it (they trust their
/// leader's value).
pub unsafe fn verify_before_execution(query: *mut pg_sys::QueryDesc) {
    resign_if_due();
    if NODE.with(Cell::get).is_none() || query.is_null() || (*query).plannedstmt.is_null() {
        return;
    }
    match context::forwarded() {
        Some(f) => check_in_force(&f),
        None if (*(*query).plannedstmt).parallelModeNeeded && forwarded().is_none() => {
            crate::guc::set(c"levqor.node_context", Some(c""), crate::guc::Scope::Transaction, false);
        }
        None => {}
    }
}

/// Raise unless a forwarded context in use may still act (fail closed: the
/// statement does not run).
fn check_in_force(f: &Forwarded) {
    let now = now_unix();
    let refuse = |why: &str, hint: &str| -> ! {
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
            &format!("levqor: the forwarded tenant context is refused: {why}"),
            Some(hint),
        )
    };
    if f.expires <= now {
        refuse(
            "it has expired",
            "The coordinator re-signs it at each statement once half of levqor.node_context_lifetime is gone; set the same lifetime on every node, and keep their clocks in step.",
        );
    }
    match ended::state(&f.txn, Some(f.expires), now) {
        ended::State::Open => {}
        ended::State::Ended => refuse(ENDED, "A forwarded context works only inside the transaction it was made for."),
        ended::State::Forgotten => refuse(
            "it is older than this node's record of ended distributed transactions",
            "Raise levqor.citus_ended_transactions on this node (it remembers fewer transactions than end in levqor.node_context_lifetime).",
        ),
    }
}

/// On a coordinator, at a statement's start: sign the context again when
/// half its lifetime is gone, so that worker connections opened later in a
/// long transaction get a fresh one (and the tenant's status is decided
/// again).
fn resign_if_due() {
    let Some((lxid, signed, ctx)) = SIGNED.with(Cell::get) else { return };
    if lxid != local_transaction() {
        SIGNED.with(|s| s.set(None));
        return;
    }
    // Not from inside levqor's own catalog lookups (which re-signing makes).
    if RESIGNING.with(Cell::get) || crate::auth::in_lookup() || now_unix() - signed < lifetime() / 2 {
        return;
    }
    if context::current() != Some(ctx) {
        return;
    }
    struct Resigning;
    impl Drop for Resigning {
        fn drop(&mut self) {
            RESIGNING.with(|r| r.set(false));
        }
    }
    RESIGNING.with(|r| r.set(true));
    let _reset = Resigning;
    forward(Some(&ctx), false);
}

/// On a Citus coordinator, forward a transaction's context (None: its end)
/// to the workers of this transaction. A session-scoped context is not
/// forwarded (Citus replays only `SET LOCAL`): distributed tables then show
/// no rows, as without a context.
pub fn forward(ctx: Option<&Context>, session: bool) {
    let Some(s) = symbols() else { return };
    let had = NODE.with(Cell::get).is_some();
    if ctx.is_none() && !had {
        return;
    }
    if !active() {
        return;
    }
    let value = match ctx {
        Some(ctx) if !session => {
            let Some(secret) = secret() else {
                crate::errors::raise(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    "levqor.cluster_secret is not set: the tenant context cannot reach the Citus workers",
                    Some("A superuser sets the same levqor.cluster_secret (at least 32 bytes) on every node, then SELECT pg_reload_conf()."),
                )
            };
            let t = crate::auth::lookup_tenant_id(ctx.tenant);
            let id = unsafe {
                pg_sys::ffi::pg_guard_ffi_boundary(|| {
                    (s.ensure_transaction)();
                    (s.current_transaction)()
                })
            };
            let txn = unsafe {
                ended::Txn {
                    initiator: (*id).initiator_node_identifier,
                    number: (*id).transaction_number,
                    stamp: (*id).timestamp,
                }
            };
            let now = now_unix();
            let fwd = Forwarded {
                role: crate::members::effective_role(ctx),
                read_only: t.as_ref().is_none_or(|t| !matches!(t.access(), crate::cache::Access::Full)),
                storage_exceeded: t.as_ref().is_some_and(|t| t.storage_exceeded),
                txn,
                expires: now + lifetime(),
            };
            let role = current_role_name().unwrap_or_default();
            SIGNED.with(|s| s.set(Some((local_transaction(), now, *ctx))));
            encode(ctx, &fwd, &role, &secret)
        }
        _ if !had => return,
        _ => {
            SIGNED.with(|s| s.set(None));
            String::new()
        }
    };
    // Citus replays SET LOCAL statements it sees run, not settings changed
    // from C: so through SPI, with propagation on for this transaction.
    crate::guc::set(c"citus.propagate_set_commands", Some(c"local"), crate::guc::Scope::Transaction, false);
    set_local_through_utility(&value);
}

/// `SET LOCAL levqor.node_context = '<value>'`, run as a utility statement
/// (what Citus's utility hook replays), built as a node rather than parsed:
/// this runs in every authenticate().
fn set_local_through_utility(value: &str) {
    let text = CString::new(format!("SET LOCAL levqor.node_context = '{value}'")).expect("no NUL");
    let value = CString::new(value).expect("no NUL");
    unsafe {
        let constant = pg_sys::palloc0(std::mem::size_of::<pg_sys::A_Const>()) as *mut pg_sys::A_Const;
        (*constant).type_ = pg_sys::NodeTag::T_A_Const;
        (*constant).val.sval = pg_sys::String { type_: pg_sys::NodeTag::T_String, sval: pg_sys::pstrdup(value.as_ptr()) };
        (*constant).location = -1;
        let mut args = pgrx::PgList::<pg_sys::Node>::new();
        args.push(constant as *mut pg_sys::Node);
        let set = pg_sys::palloc0(std::mem::size_of::<pg_sys::VariableSetStmt>()) as *mut pg_sys::VariableSetStmt;
        (*set).type_ = pg_sys::NodeTag::T_VariableSetStmt;
        (*set).kind = pg_sys::VariableSetKind::VAR_SET_VALUE;
        (*set).name = pg_sys::pstrdup(c"levqor.node_context".as_ptr());
        (*set).args = args.into_pg();
        (*set).is_local = true;
        let stmt = pg_sys::palloc0(std::mem::size_of::<pg_sys::PlannedStmt>()) as *mut pg_sys::PlannedStmt;
        (*stmt).type_ = pg_sys::NodeTag::T_PlannedStmt;
        (*stmt).commandType = pg_sys::CmdType::CMD_UTILITY;
        (*stmt).canSetTag = true;
        (*stmt).utilityStmt = set as *mut pg_sys::Node;
        (*stmt).stmt_location = -1;
        let query = pg_sys::pstrdup(text.as_ptr());
        pg_sys::ProcessUtility(
            stmt,
            query,
            false,
            pg_sys::ProcessUtilityContext::PROCESS_UTILITY_QUERY,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            pg_sys::None_Receiver,
            std::ptr::null_mut(),
        );
    }
}

// ---------------------------------------------------------------- routing

static mut PREV_PLANNER: pg_sys::planner_hook_type = None;

/// The syscache entry routed plans say they depend on: invalidating it
/// re-plans them and nothing else. Any function's oid would do; this one is
/// never part of a query's plan.
fn routing_dependency() -> (i32, u32) {
    let oid = pg_sys::ProcedureRelationId;
    let cache = pg_sys::SysCacheIdentifier::PROCOID as i32;
    let hash = unsafe {
        pg_sys::GetSysCacheHashValue(cache, pg_sys::Datum::from(oid), pg_sys::Datum::from(0), pg_sys::Datum::from(0), pg_sys::Datum::from(0))
    };
    (cache, hash)
}

/// The context's tenant is now `now`: routed plans made for another tenant
/// must be made again. Without a context any routed plan shows nothing (the
/// workers' policies see no context), so it may stay.
pub fn tenant_changed(now: Option<uuid::Uuid>) {
    let Some(built_for) = ROUTED_FOR.with(Cell::get) else { return };
    if now.is_none() || now == built_for {
        return;
    }
    let (cache, hash) = routing_dependency();
    unsafe { pg_sys::CallSyscacheCallbacks(cache, hash) };
    ROUTED_FOR.with(|r| r.set(None));
}

#[pg_guard]
unsafe extern "C-unwind" fn planner(
    parse: *mut pg_sys::Query,
    query_string: *const c_char,
    cursor_options: std::ffi::c_int,
    bound_params: pg_sys::ParamListInfo,
) -> *mut pg_sys::PlannedStmt {
    // A statement of the client's of one protected table: routed by a
    // parameter the executor fills in (crate::citus::supply_tenant), so its
    // plan serves every tenant. Anything else: the tenant as a constant.
    let (param, routed) = match symbols() {
        Some(s) if !parse.is_null() && pg_sys::ParallelWorkerNumber < 0 => {
            let top_level = !query_string.is_null() && query_string == pg_sys::debug_query_string;
            match if top_level { route_by_param(s, parse) } else { None } {
                Some(k) => (Some(k), false),
                None => (None, route(s, parse)),
            }
        }
        _ => (None, false),
    };
    let stmt = match PREV_PLANNER {
        Some(prev) => prev(parse, query_string, cursor_options, bound_params),
        None => pg_sys::standard_planner(parse, query_string, cursor_options, bound_params),
    };
    if let (Some(k), false) = (param, stmt.is_null()) {
        let item = pg_sys::palloc0(std::mem::size_of::<pg_sys::PlanInvalItem>()) as *mut pg_sys::PlanInvalItem;
        (*item).type_ = pg_sys::NodeTag::T_PlanInvalItem;
        (*item).cacheId = TENANT_PARAM_MARK;
        (*item).hashValue = k as u32;
        (*stmt).invalItems = pg_sys::lappend((*stmt).invalItems, item as *mut c_void);
    }
    if routed && !stmt.is_null() {
        let (cache, hash) = routing_dependency();
        let item = pg_sys::palloc0(std::mem::size_of::<pg_sys::PlanInvalItem>()) as *mut pg_sys::PlanInvalItem;
        (*item).type_ = pg_sys::NodeTag::T_PlanInvalItem;
        (*item).cacheId = cache;
        (*item).hashValue = hash;
        (*stmt).invalItems = pg_sys::lappend((*stmt).invalItems, item as *mut c_void);
        ROUTED_FOR.with(|r| r.set(Some(context::current().map(|c| c.tenant))));
    }
    stmt
}

/// Put the current tenant as a constant into the policy quals of the
/// hash-distributed tables `query` reads or writes (subqueries and CTEs
/// included). Returns whether anything changed.
unsafe fn route(s: Symbols, query: *mut pg_sys::Query) -> bool {
    let func = current_tenant_oid();
    if func == pg_sys::InvalidOid {
        return false;
    }
    let tenant = context::current().map(|c| c.tenant);
    let mut walker = Walker { s, func, tenant, changed: false };
    walk_query(&mut walker, query);
    walker.changed
}

/// Marks a plan routed by a parameter: a PlanInvalItem whose cache id no
/// syscache has (so it never invalidates anything), carrying the parameter's number.
const TENANT_PARAM_MARK: i32 = -0x6c76;

/// A query of one hash-distributed protected table (SELECT, UPDATE,
/// DELETE) gets `<tenant column> = $k` in its WHERE clause, $k a parameter
/// beyond the statement's own: the same rows (the policy admits no other
/// tenant's), and where Citus's fast-path router looks for the shard, at
/// execution time for a parameter. Returns k.
unsafe fn route_by_param(s: Symbols, query: *mut pg_sys::Query) -> Option<i32> {
    let q = &mut *query;
    if !matches!(q.commandType, pg_sys::CmdType::CMD_SELECT | pg_sys::CmdType::CMD_UPDATE | pg_sys::CmdType::CMD_DELETE)
        || q.jointree.is_null()
        || q.hasSubLinks
        || !q.cteList.is_null()
        || !q.setOperations.is_null()
    {
        return None;
    }
    let rtable = pgrx::PgList::<pg_sys::RangeTblEntry>::from_pg(q.rtable);
    if rtable.len() != 1 {
        return None;
    }
    let rte = rtable.get_ptr(0)?;
    if (*rte).rtekind != pg_sys::RTEKind::RTE_RELATION || (*rte).securityQuals.is_null() {
        return None;
    }
    let func = current_tenant_oid();
    let relid = (*rte).relid;
    if func == pg_sys::InvalidOid || !pg_sys::ffi::pg_guard_ffi_boundary(|| (s.is_citus_table)(relid)) {
        return None;
    }
    let key = pg_sys::ffi::pg_guard_ffi_boundary(|| (s.partition_column)(relid, 1));
    if key.is_null() {
        return None;
    }
    // The policy's own comparison, `<tenant column> = levqor.current_tenant()`.
    let attno = (*key).varattno;
    // An UPDATE that sets the tenant column: Citus refuses it, and on its
    // fast path (13.2) crashes while refusing; the other path refuses cleanly.
    if q.commandType == pg_sys::CmdType::CMD_UPDATE {
        let targets = pgrx::PgList::<pg_sys::TargetEntry>::from_pg(q.targetList);
        if targets.iter_ptr().any(|t| (*t).resno == attno) {
            return None;
        }
    }
    // Likewise whatever else Citus may refuse in a write (functions it must
    // evaluate first): those stay on the path that refuses cleanly.
    if q.commandType != pg_sys::CmdType::CMD_SELECT
        && (pg_sys::contain_mutable_functions(q.targetList as *mut pg_sys::Node)
            || pg_sys::contain_mutable_functions(q.returningList as *mut pg_sys::Node))
    {
        return None;
    }
    let quals = pgrx::PgList::<pg_sys::Node>::from_pg((*rte).securityQuals);
    let template = quals.iter_ptr().find_map(|q| find_key_comparison(q, attno, func));
    let template = template?;
    let k = max_param(query) + 1;
    let param = pg_sys::palloc0(std::mem::size_of::<pg_sys::Param>()) as *mut pg_sys::Param;
    (*param).xpr.type_ = pg_sys::NodeTag::T_Param;
    (*param).paramkind = pg_sys::ParamKind::PARAM_EXTERN;
    (*param).paramid = k;
    (*param).paramtype = pg_sys::UUIDOID;
    (*param).paramtypmod = -1;
    (*param).location = -1;
    let op = pg_sys::copyObjectImpl(template as *const c_void) as *mut pg_sys::OpExpr;
    let args = pgrx::PgList::<pg_sys::Node>::from_pg((*op).args);
    let mut list = pgrx::PgList::<pg_sys::Node>::new();
    for a in args.iter_ptr() {
        list.push(if (*a).type_ == pg_sys::NodeTag::T_FuncExpr { param as *mut pg_sys::Node } else { a });
    }
    (*op).args = list.into_pg();
    let jt = &mut *q.jointree;
    jt.quals = if jt.quals.is_null() { op as *mut pg_sys::Node } else { pg_sys::make_and_qual(jt.quals, op as *mut pg_sys::Node) };
    Some(k)
}

/// `(<column attno> = <func>())` inside a policy qual (or an AND of them).
unsafe fn find_key_comparison(node: *mut pg_sys::Node, attno: i16, func: pg_sys::Oid) -> Option<*mut pg_sys::OpExpr> {
    if node.is_null() {
        return None;
    }
    match (*node).type_ {
        pg_sys::NodeTag::T_BoolExpr if (*(node as *mut pg_sys::BoolExpr)).boolop == pg_sys::BoolExprType::AND_EXPR => {
            let args = pgrx::PgList::<pg_sys::Node>::from_pg((*(node as *mut pg_sys::BoolExpr)).args);
            let found = args.iter_ptr().find_map(|a| find_key_comparison(a, attno, func));
            found
        }
        pg_sys::NodeTag::T_OpExpr => {
            let op = node as *mut pg_sys::OpExpr;
            let args = pgrx::PgList::<pg_sys::Node>::from_pg((*op).args);
            if args.len() != 2 {
                return None;
            }
            let (l, r) = (args.get_ptr(0)?, args.get_ptr(1)?);
            let key = (*l).type_ == pg_sys::NodeTag::T_Var
                && (*(l as *mut pg_sys::Var)).varattno == attno
                && (*(l as *mut pg_sys::Var)).varlevelsup == 0;
            let ours = (*r).type_ == pg_sys::NodeTag::T_FuncExpr && (*(r as *mut pg_sys::FuncExpr)).funcid == func;
            (key && ours).then_some(op)
        }
        _ => None,
    }
}

/// The highest external parameter number a query uses (0: none).
unsafe fn max_param(query: *mut pg_sys::Query) -> i32 {
    #[pg_guard]
    unsafe extern "C-unwind" fn visit(node: *mut pg_sys::Node, ctx: *mut c_void) -> bool {
        if node.is_null() {
            return false;
        }
        match (*node).type_ {
            pg_sys::NodeTag::T_Param => {
                let p = node as *mut pg_sys::Param;
                if (*p).paramkind == pg_sys::ParamKind::PARAM_EXTERN {
                    let max = &mut *(ctx as *mut i32);
                    *max = (*max).max((*p).paramid);
                }
                false
            }
            pg_sys::NodeTag::T_Query => pg_sys::query_tree_walker(node as *mut pg_sys::Query, Some(visit), ctx, 0),
            _ => pg_sys::expression_tree_walker(node, Some(visit), ctx),
        }
    }
    let mut max = 0i32;
    pg_sys::query_tree_walker(query, Some(visit), &mut max as *mut i32 as *mut c_void, 0);
    max
}

/// From the ExecutorStart hook: a plan routed by a parameter gets the
/// current tenant as that parameter (NULL without a context: no shard, no
/// rows), beside the statement's own parameters.
pub unsafe fn supply_tenant(query: *mut pg_sys::QueryDesc) {
    if symbols().is_none() || query.is_null() || (*query).plannedstmt.is_null() {
        return;
    }
    let items = pgrx::PgList::<pg_sys::PlanInvalItem>::from_pg((*(*query).plannedstmt).invalItems);
    let Some(k) = items.iter_ptr().find(|i| (**i).cacheId == TENANT_PARAM_MARK).map(|i| (*i).hashValue as i32) else {
        return;
    };
    let old = (*query).params;
    // The statement's own values, fetched if they are dynamic.
    let own = if old.is_null() { std::ptr::null_mut() } else { pg_sys::copyParamList(old) };
    let have = if own.is_null() { 0 } else { (*own).numParams };
    let list = pg_sys::makeParamList(have.max(k));
    let dst = (*list).params.as_mut_slice(have.max(k) as usize);
    if have > 0 {
        let src = (*own).params.as_slice(have as usize);
        dst[..have as usize].copy_from_slice(src);
    }
    let slot = &mut dst[(k - 1) as usize];
    match context::current() {
        Some(c) => {
            let bytes = pg_sys::palloc(16) as *mut u8;
            std::ptr::copy_nonoverlapping(c.tenant.as_bytes().as_ptr(), bytes, 16);
            *slot = pg_sys::ParamExternData { value: pg_sys::Datum::from(bytes), isnull: false, pflags: pg_sys::PARAM_FLAG_CONST as u16, ptype: pg_sys::UUIDOID };
        }
        None => {
            *slot = pg_sys::ParamExternData { value: pg_sys::Datum::from(0), isnull: true, pflags: pg_sys::PARAM_FLAG_CONST as u16, ptype: pg_sys::UUIDOID };
        }
    }
    (*query).params = list;
}

struct Walker {
    s: Symbols,
    func: pg_sys::Oid,
    tenant: Option<uuid::Uuid>,
    changed: bool,
}

unsafe fn walk_query(w: &mut Walker, query: *mut pg_sys::Query) {
    let rtable = pgrx::PgList::<pg_sys::RangeTblEntry>::from_pg((*query).rtable);
    for (i, rte) in rtable.iter_ptr().enumerate() {
        match (*rte).rtekind {
            pg_sys::RTEKind::RTE_RELATION if !(*rte).securityQuals.is_null() => {
                let relid = (*rte).relid;
                let is_citus = pg_sys::ffi::pg_guard_ffi_boundary(|| (w.s.is_citus_table)(relid));
                if !is_citus {
                    continue;
                }
                let key = pg_sys::ffi::pg_guard_ffi_boundary(|| (w.s.partition_column)(relid, (i + 1) as u32));
                if key.is_null() {
                    continue;
                }
                let attno = (*key).varattno;
                let quals = pgrx::PgList::<pg_sys::Node>::from_pg((*rte).securityQuals);
                for q in quals.iter_ptr() {
                    replace_in(w, q, attno);
                }
            }
            pg_sys::RTEKind::RTE_SUBQUERY if !(*rte).subquery.is_null() => walk_query(w, (*rte).subquery),
            _ => {}
        }
    }
    let ctes = pgrx::PgList::<pg_sys::CommonTableExpr>::from_pg((*query).cteList);
    for cte in ctes.iter_ptr() {
        let q = (*cte).ctequery;
        if !q.is_null() && (*q).type_ == pg_sys::NodeTag::T_Query {
            walk_query(w, q as *mut pg_sys::Query);
        }
    }
    // Sub-selects in WHERE and the target list.
    if (*query).hasSubLinks {
        sublinks(w, (*query).jointree as *mut pg_sys::Node);
        sublinks(w, (*query).targetList as *mut pg_sys::Node);
    }
}

unsafe fn sublinks(w: &mut Walker, node: *mut pg_sys::Node) {
    #[pg_guard]
    unsafe extern "C-unwind" fn visit(node: *mut pg_sys::Node, ctx: *mut c_void) -> bool {
        if node.is_null() {
            return false;
        }
        if (*node).type_ == pg_sys::NodeTag::T_SubLink {
            let sub = (*(node as *mut pg_sys::SubLink)).subselect;
            if !sub.is_null() && (*sub).type_ == pg_sys::NodeTag::T_Query {
                walk_query(&mut *(ctx as *mut Walker), sub as *mut pg_sys::Query);
            }
        }
        pg_sys::expression_tree_walker(node, Some(visit), ctx)
    }
    if !node.is_null() {
        visit(node, w as *mut Walker as *mut c_void);
    }
}

/// In a policy qual, `(<tenant column> = levqor.current_tenant())` becomes
/// `(<tenant column> = '<tenant>'::uuid)` (NULL without a context: no shard).
unsafe fn replace_in(w: &mut Walker, node: *mut pg_sys::Node, attno: i16) {
    if node.is_null() {
        return;
    }
    match (*node).type_ {
        pg_sys::NodeTag::T_BoolExpr => {
            let args = pgrx::PgList::<pg_sys::Node>::from_pg((*(node as *mut pg_sys::BoolExpr)).args);
            for a in args.iter_ptr() {
                replace_in(w, a, attno);
            }
        }
        pg_sys::NodeTag::T_OpExpr => {
            let op = node as *mut pg_sys::OpExpr;
            let args = pgrx::PgList::<pg_sys::Node>::from_pg((*op).args);
            if args.len() != 2 {
                return;
            }
            let (l, r) = (args.get_ptr(0).unwrap(), args.get_ptr(1).unwrap());
            let is_key = |n: *mut pg_sys::Node| {
                (*n).type_ == pg_sys::NodeTag::T_Var && (*(n as *mut pg_sys::Var)).varattno == attno && (*(n as *mut pg_sys::Var)).varlevelsup == 0
            };
            let is_ours = |n: *mut pg_sys::Node| {
                (*n).type_ == pg_sys::NodeTag::T_FuncExpr && (*(n as *mut pg_sys::FuncExpr)).funcid == w.func
            };
            let slot = if is_key(l) && is_ours(r) {
                1
            } else if is_ours(l) && is_key(r) {
                0
            } else {
                return;
            };
            let value = tenant_const(w.tenant);
            let mut list = pgrx::PgList::<pg_sys::Node>::new();
            for (k, a) in args.iter_ptr().enumerate() {
                list.push(if k == slot { value } else { a });
            }
            (*op).args = list.into_pg();
            w.changed = true;
        }
        _ => {}
    }
}

unsafe fn tenant_const(tenant: Option<uuid::Uuid>) -> *mut pg_sys::Node {
    let (datum, isnull) = match tenant {
        Some(t) => {
            let bytes = pg_sys::palloc(16) as *mut u8;
            std::ptr::copy_nonoverlapping(t.as_bytes().as_ptr(), bytes, 16);
            (pg_sys::Datum::from(bytes), false)
        }
        None => (pg_sys::Datum::from(0), true),
    };
    pg_sys::makeConst(pg_sys::UUIDOID, -1, pg_sys::InvalidOid, 16, datum, isnull, false) as *mut pg_sys::Node
}

thread_local! {
    static CURRENT_TENANT_OID: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
}

/// The oid of levqor.current_tenant() (InvalidOid while levqor is not
/// installed in this database).
fn current_tenant_oid() -> pg_sys::Oid {
    let known = CURRENT_TENANT_OID.with(Cell::get);
    if known != pg_sys::InvalidOid {
        return known;
    }
    let oid = unsafe {
        if pg_sys::get_extension_oid(c"levqor".as_ptr(), true) == pg_sys::InvalidOid {
            return pg_sys::InvalidOid;
        }
        let name = pgrx::PgList::<pg_sys::Node>::new();
        let mut name = name;
        name.push(pg_sys::makeString(pg_sys::pstrdup(c"levqor".as_ptr())) as *mut pg_sys::Node);
        name.push(pg_sys::makeString(pg_sys::pstrdup(c"current_tenant".as_ptr())) as *mut pg_sys::Node);
        pg_sys::LookupFuncName(name.into_pg(), 0, std::ptr::null(), true)
    };
    CURRENT_TENANT_OID.with(|c| c.set(oid));
    oid
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    fn sample() -> (Context, Forwarded) {
        (
            Context {
                tenant: uuid::Uuid::from_u128(7),
                user: Some(uuid::Uuid::from_u128(9)),
                role: Some(MemberRole::Admin),
                source: context::Source::ApiKey,
            },
            Forwarded {
                role: Some(MemberRole::Operator),
                read_only: true,
                storage_exceeded: false,
                txn: ended::Txn { initiator: 0, number: 42, stamp: 1_000_000 },
                expires: 2000,
            },
        )
    }

    #[pg_test]
    fn a_forwarded_context_round_trips_and_every_change_is_refused() {
        let secret = b"0123456789abcdef0123456789abcdef".to_vec();
        let (ctx, fwd) = sample();
        let v = encode(&ctx, &fwd, "app", &secret);
        assert_eq!(decode(&v, &secret, "app"), Ok((ctx, fwd)));
        assert!(decode(&v, &secret, "other").unwrap_err().contains("another database role"));
        assert!(decode(&v, b"another secret, also 32 bytes long!!", "app").unwrap_err().contains("signature"));
        let forged = v.replacen("00000000-0000-0000-0000-000000000007", "00000000-0000-0000-0000-000000000008", 1);
        assert!(decode(&forged, &secret, "app").unwrap_err().contains("signature"));
        let later = v.replacen(".2000.", ".9999.", 1);
        assert!(v.contains(".1000000.2000."), "{v}");
        assert!(decode(&later, &secret, "app").unwrap_err().contains("signature"));
        assert!(!v.contains('\'') && !v.contains(' '), "nothing to quote: {v}");
    }
}

//! Quota counters in shared memory.
//!
//! One slot per (database, tenant, metric), in a fixed open-addressed table
//! sized by `levqor.quota_slots`. A slot's numbers sit behind a spinlock held
//! for a handful of instructions, so tenants' transactions never queue on a
//! row lock (the hot-row `UPDATE counters SET used = used + 1` that a table
//! would need is held until commit). Slots are never removed, so lookups need
//! no lock; inserting one takes the tranche's LWLock.
//!
//! Counting is transactional: a reservation made by `consume()` or a
//! row-limited insert is undone if its (sub)transaction aborts and becomes
//! billable ("unflushed") when it commits; a deleted row frees room only when
//! the delete commits. See [`Pending`].
//!
//! Durability: the sealing/flushing worker copies slots to
//! `levqor.usage_counters` and the ledger every `levqor.quota_flush_interval`.
//! On a clean shutdown the postmaster, after every backend has exited, writes
//! the counter slots to `pg_stat/levqor_quota.stat` and reads them back at the
//! next start, so nothing is lost. After a crash the file is absent (it is
//! removed when read, and never written on a crash): what was committed since
//! the last flush is lost, which under-counts and never over-bills.

use std::cell::{RefCell, UnsafeCell};
use std::ffi::{c_void, CStr};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU32, Ordering};

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::prelude::*;

static QUOTA_SLOTS: GucSetting<i32> = GucSetting::<i32>::new(16384);

const TRANCHE: &CStr = c"levqor_quota";
const SHMEM_NAME: &CStr = c"levqor quota counters";
const STATE_FILE: &str = "pg_stat/levqor_quota.stat";
const STATE_MAGIC: u32 = 0x4c51_5401; // "LQT" v1

/// The window of a metric that never resets (TimestampTz -infinity).
pub const NO_WINDOW: i64 = i64::MIN;

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Key {
    pub db: u32,
    pub metric: u32,
    pub tenant: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Data {
    /// Start of the current window (µs since 2000-01-01 UTC), or NO_WINDOW.
    pub window: i64,
    /// Used in the current window, counting open transactions' reservations.
    pub used: i64,
    /// Open transactions' reservations in the current window.
    pub inflight: i64,
    /// Committed consumption not yet written to the ledger (any window).
    pub unflushed: i64,
    /// Open transactions' billable reservations, of any window: what will
    /// join `unflushed` when they commit. Kept so that a reservation is
    /// refused before `unflushed` could pass i64::MAX.
    pub billing: i64,
    /// Bumped on every change; the flush remembers what it wrote.
    pub version: u64,
    pub flushed_version: u64,
}

#[repr(C)]
pub struct Slot {
    ready: AtomicU32,
    spin: AtomicU32,
    /// 1 for row-count slots (a cache of count(*), never dumped).
    rows: UnsafeCell<u32>,
    key: UnsafeCell<Key>,
    data: UnsafeCell<Data>,
}

// Shared between processes; every access goes through the spinlock or the
// publish-once `ready` flag.
unsafe impl Sync for Slot {}

impl Slot {
    /// Run `f` on the slot's numbers under its spinlock. `f` must not raise.
    pub fn with<R>(&self, f: impl FnOnce(&mut Data) -> R) -> R {
        while self.spin.compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed).is_err() {
            std::hint::spin_loop();
        }
        let r = f(unsafe { &mut *self.data.get() });
        self.spin.store(0, Ordering::Release);
        r
    }

    pub fn key(&self) -> Key {
        unsafe { *self.key.get() }
    }

    pub fn is_rows(&self) -> bool {
        unsafe { *self.rows.get() == 1 }
    }
}

#[repr(C)]
struct Header {
    nslots: u32,
    _pad: u32,
}

static mut HEADER: *mut Header = std::ptr::null_mut();
static mut LOCK: *mut pg_sys::LWLock = std::ptr::null_mut();
static mut PREV_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP: pg_sys::shmem_startup_hook_type = None;

fn shmem_size(nslots: usize) -> usize {
    std::mem::size_of::<Header>() + nslots * std::mem::size_of::<Slot>()
}

/// Called from _PG_init. Shared memory exists only when levqor is preloaded.
pub fn init() {
    unsafe {
        if !pg_sys::process_shared_preload_libraries_in_progress {
            return;
        }
        GucRegistry::define_int_guc(
            c"levqor.quota_slots",
            c"Number of (tenant, metric) counters levqor keeps in shared memory",
            c"Each takes about 80 bytes; takes effect at server start.",
            &QUOTA_SLOTS,
            64,
            4_194_304,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        PREV_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(shmem_request);
        PREV_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
        pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(subxact_callback), std::ptr::null_mut());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    if let Some(prev) = PREV_REQUEST {
        prev();
    }
    pg_sys::RequestAddinShmemSpace(shmem_size(QUOTA_SLOTS.get() as usize));
    pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), 1);
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    if let Some(prev) = PREV_STARTUP {
        prev();
    }
    let nslots = QUOTA_SLOTS.get() as usize;
    let (base, lock) = crate::shmem::attach(SHMEM_NAME, TRANCHE, shmem_size(nslots), |base| {
        (*base.cast::<Header>()).nslots = nslots as u32;
    });
    HEADER = base.cast();
    LOCK = lock;
    // In the postmaster (not in a backend of an EXEC_BACKEND build): restore
    // what the last clean shutdown saved, and save again at the next one.
    if !pg_sys::IsUnderPostmaster {
        load_state();
        pg_sys::on_shmem_exit(Some(save_state), pg_sys::Datum::from(0));
    }
}

/// Whether the counters exist (levqor preloaded).
pub fn available() -> bool {
    unsafe { !HEADER.is_null() }
}

fn slots() -> &'static [Slot] {
    unsafe {
        let n = (*HEADER).nslots as usize;
        let first = HEADER.cast::<u8>().add(std::mem::size_of::<Header>()).cast::<Slot>();
        std::slice::from_raw_parts(first, n)
    }
}

fn hash(key: &Key) -> usize {
    // FNV-1a over the key's bytes.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = key.db.to_le_bytes().into_iter().chain(key.metric.to_le_bytes()).chain(key.tenant);
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as usize
}

enum Probe {
    Found(&'static Slot),
    Empty(usize),
    Full,
}

fn probe(key: &Key) -> Probe {
    let slots = slots();
    let n = slots.len();
    let start = hash(key) % n;
    for i in 0..n {
        let s = &slots[(start + i) % n];
        if s.ready.load(Ordering::Acquire) == 0 {
            return Probe::Empty((start + i) % n);
        }
        if s.key() == *key {
            return Probe::Found(s);
        }
    }
    Probe::Full
}

pub fn find(key: &Key) -> Option<&'static Slot> {
    match probe(key) {
        Probe::Found(s) => Some(s),
        _ => None,
    }
}

/// The slot for `key`, created with `init()`'s numbers if absent. `init` may
/// run queries: it runs before the lock is taken, and loses to a concurrent
/// creator.
pub fn find_or_create(key: &Key, rows: bool, init: impl FnOnce() -> Data) -> &'static Slot {
    if let Some(s) = find(key) {
        return s;
    }
    let data = init();
    unsafe { pg_sys::LWLockAcquire(LOCK, pg_sys::LWLockMode::LW_EXCLUSIVE) };
    let slot = match probe(key) {
        Probe::Found(s) => Some(s),
        Probe::Empty(i) => Some(publish(i, key, rows, Data { version: 1, ..data })),
        Probe::Full => None,
    };
    unsafe { pg_sys::LWLockRelease(LOCK) };
    slot.unwrap_or_else(|| {
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            "levqor's quota counters are full",
            Some("Raise levqor.quota_slots (one per tenant and metric in use) and restart PostgreSQL."),
        )
    })
}

/// Fill the empty slot `i` and make it visible to lock-free readers (the
/// caller holds the lock, or is the postmaster before any backend exists).
fn publish(i: usize, key: &Key, rows: bool, data: Data) -> &'static Slot {
    let s = &slots()[i];
    unsafe {
        *s.key.get() = *key;
        *s.rows.get() = rows as u32;
        *s.data.get() = data;
    }
    s.ready.store(1, Ordering::Release);
    s
}

/// Every ready slot of the current database.
pub fn in_this_database() -> impl Iterator<Item = &'static Slot> {
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    slots().iter().filter(move |s| s.ready.load(Ordering::Acquire) == 1 && s.key().db == db)
}

// ---------------------------------------------------------------------------
// Transactional bookkeeping.

#[derive(Clone, Copy)]
enum What {
    /// consume() or a row-limited insert: undone on abort.
    Reserve { billable: bool },
    /// A deleted row: frees room on commit.
    Release,
    /// A flush wrote these numbers: clear them on commit.
    Flushed { version: u64 },
}

struct Pending {
    slot: &'static Slot,
    amount: i64,
    window: i64,
    subxact: pg_sys::SubTransactionId,
    what: What,
}

thread_local! {
    static PENDING: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
}

fn push(slot: &'static Slot, amount: i64, window: i64, what: What) {
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    PENDING.with(|p| p.borrow_mut().push(Pending { slot, amount, window, subxact, what }));
}

/// Why a reservation was refused.
pub enum Refusal {
    /// It would pass the limit; `used` is what the window holds.
    Limit { used: i64 },
    /// The counter cannot hold it (i64): `used` in the window, `unbilled`
    /// committed or reserved but not yet in the ledger.
    Overflow { used: i64, unbilled: i64 },
}

/// Reserve `amount` in the window starting at `window` unless that would pass
/// `limit` or overflow a counter. Returns what is used afterwards.
pub fn reserve(slot: &'static Slot, window: i64, amount: i64, limit: Option<i64>, billable: bool) -> Result<i64, Refusal> {
    let r = slot.with(|d| {
        if window > d.window {
            // A new window: start from zero (reservations of the old one
            // still commit into `unflushed`, and abort without effect).
            d.window = window;
            d.used = 0;
            d.inflight = 0;
        }
        // Every number a commit will add to is checked now, so that settling
        // (which must not fail) never wraps: used and inflight in the window,
        // and unflushed + billing, the ledger's next quantity.
        let unbilled = d.unflushed.saturating_add(d.billing);
        let (Some(used), Some(inflight)) = (d.used.checked_add(amount), d.inflight.checked_add(amount)) else {
            return Err(Refusal::Overflow { used: d.used, unbilled });
        };
        let billing = if billable {
            match d.unflushed.checked_add(d.billing).and_then(|u| u.checked_add(amount)) {
                Some(_) => d.billing + amount,
                None => return Err(Refusal::Overflow { used: d.used, unbilled }),
            }
        } else {
            d.billing
        };
        if limit.is_some_and(|l| used > l) {
            return Err(Refusal::Limit { used: d.used });
        }
        d.used = used;
        d.inflight = inflight;
        d.billing = billing;
        d.version += 1;
        // Another backend may already count in a later window.
        Ok((d.used, d.window))
    })?;
    push(slot, amount, r.1, What::Reserve { billable });
    Ok(r.0)
}

/// A row went away: room is freed when the transaction commits.
pub fn release(slot: &'static Slot, amount: i64) {
    push(slot, amount, NO_WINDOW, What::Release);
}

/// Numbers a flush is about to write; cleared when its transaction commits.
pub fn flushed(slot: &'static Slot, unflushed: i64, version: u64) {
    push(slot, unflushed, NO_WINDOW, What::Flushed { version });
}

fn settle(p: &Pending, committed: bool) {
    p.slot.with(|d| {
        match (p.what, committed) {
            (What::Reserve { billable }, true) => {
                if d.window == p.window {
                    d.inflight -= p.amount;
                }
                if billable {
                    // reserve() checked that unflushed + billing fits.
                    d.billing -= p.amount;
                    d.unflushed += p.amount;
                }
            }
            (What::Reserve { billable }, false) => {
                if d.window == p.window {
                    d.inflight -= p.amount;
                    d.used -= p.amount;
                }
                if billable {
                    d.billing -= p.amount;
                }
            }
            (What::Release, true) => d.used = (d.used - p.amount).max(0),
            (What::Release, false) => {}
            (What::Flushed { version }, true) => {
                d.unflushed -= p.amount;
                d.flushed_version = d.flushed_version.max(version);
            }
            (What::Flushed { .. }, false) => {}
        }
        d.version += 1;
    });
}

#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    use pg_sys::XactEvent::*;
    let committed = match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => true,
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => false,
        XACT_EVENT_PRE_PREPARE => {
            if PENDING.with(|p| !p.borrow().is_empty()) {
                crate::errors::raise(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    "cannot PREPARE a transaction that consumed a levqor quota",
                    Some("Commit it instead: quota reservations belong to the session."),
                );
            }
            return;
        }
        _ => return,
    };
    let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    for p in &pending {
        settle(p, committed);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn subxact_callback(
    event: pg_sys::SubXactEvent::Type,
    my: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    _arg: *mut c_void,
) {
    use pg_sys::SubXactEvent::*;
    match event {
        SUBXACT_EVENT_COMMIT_SUB => PENDING.with(|p| {
            for e in p.borrow_mut().iter_mut().filter(|e| e.subxact == my) {
                e.subxact = parent;
            }
        }),
        SUBXACT_EVENT_ABORT_SUB => {
            let undone = PENDING.with(|p| {
                let mut p = p.borrow_mut();
                let (undone, kept) = std::mem::take(&mut *p).into_iter().partition(|e| e.subxact == my);
                *p = kept;
                undone
            });
            for e in &undone as &Vec<Pending> {
                settle(e, false);
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------
// Clean-shutdown persistence (postmaster only).

const RECORD: usize = 4 + 4 + 16 + 8 + 8 + 8;

unsafe extern "C-unwind" fn save_state(code: i32, _arg: pg_sys::Datum) {
    // After a crash the numbers may be torn: keep nothing rather than guess.
    if code != 0 || HEADER.is_null() {
        return;
    }
    let records: Vec<(Key, Data)> = slots()
        .iter()
        .filter(|s| s.ready.load(Ordering::Acquire) == 1 && !s.is_rows())
        .map(|s| (s.key(), s.with(|d| *d)))
        .collect();
    let mut buf = Vec::with_capacity(8 + records.len() * RECORD);
    buf.extend(STATE_MAGIC.to_le_bytes());
    buf.extend((records.len() as u32).to_le_bytes());
    for (k, d) in &records {
        buf.extend(k.db.to_le_bytes());
        buf.extend(k.metric.to_le_bytes());
        buf.extend(k.tenant);
        buf.extend(d.window.to_le_bytes());
        buf.extend((d.used - d.inflight).to_le_bytes());
        buf.extend(d.unflushed.to_le_bytes());
    }
    let tmp = format!("{STATE_FILE}.tmp");
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&buf).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, STATE_FILE));
    if let Err(e) = written {
        // The postmaster is exiting; stderr reaches the server log.
        eprintln!("levqor: could not save quota counters to {STATE_FILE}: {e}");
    }
}

fn load_state() {
    let Ok(mut f) = std::fs::File::open(STATE_FILE) else { return };
    let mut buf = Vec::new();
    let read = f.read_to_end(&mut buf);
    // Read once: a later crash must not bring these numbers back.
    let _ = std::fs::remove_file(STATE_FILE);
    if read.is_err() || buf.len() < 8 || buf[0..4] != STATE_MAGIC.to_le_bytes() {
        return;
    }
    let n = u32::from_le_bytes(buf[4..8].try_into().unwrap()) as usize;
    let body = &buf[8..];
    if body.len() != n * RECORD {
        return;
    }
    let i64_at = |r: &[u8], at: usize| i64::from_le_bytes(r[at..at + 8].try_into().unwrap());
    for r in body.chunks_exact(RECORD) {
        let key = Key {
            db: u32::from_le_bytes(r[0..4].try_into().unwrap()),
            metric: u32::from_le_bytes(r[4..8].try_into().unwrap()),
            tenant: r[8..24].try_into().unwrap(),
        };
        if let Probe::Empty(i) = probe(&key) {
            let data = Data { window: i64_at(r, 24), used: i64_at(r, 32), unflushed: i64_at(r, 40), version: 1, ..Data::default() };
            publish(i, &key, false, data);
        }
    }
}

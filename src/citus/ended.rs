//! The Citus distributed transactions that have ended on this node, so that
//! a forwarded context captured from one cannot be replayed after it. (A
//! client connected straight to a worker can call Citus's
//! `assign_distributed_transaction_id()` with any numbers, so being inside
//! "the" distributed transaction proves nothing once it is over.)
//!
//! Every backend that was handed a forwarded context records, when its local
//! transaction ends, the distributed transaction the context names; from then
//! on this node refuses contexts of that transaction. An entry is kept while
//! a context of its transaction could still be accepted (until the latest
//! expiry seen, and at least `levqor.node_context_lifetime` from its end);
//! then its slot is free again.
//!
//! A distributed transaction is known by its initiator node, number and start
//! time: Citus numbers them from 1 again after a coordinator restarts.
//!
//! Fixed shared memory: `levqor.citus_ended_transactions` slots of 32 bytes,
//! open addressing with a bounded probe. When every slot a transaction could
//! use is taken, the one that expires soonest gives way and the node's
//! *horizon* moves up to its expiry: contexts expiring by then are refused,
//! since they might belong to the forgotten transaction. A load that outruns
//! the table therefore shortens how long a transaction may keep opening new
//! connections to this node; it never re-opens a replay.

use std::ffi::CStr;

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;

static SLOTS: GucSetting<i32> = GucSetting::<i32>::new(65536);

const TRANCHE: &CStr = c"levqor_citus_ended";
const SHMEM_NAME: &CStr = c"levqor ended Citus transactions";
/// Slots one transaction may use, from its hash on.
const PROBE: usize = 16;

/// A Citus distributed transaction, as its coordinator assigned it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Txn {
    pub initiator: i32,
    pub number: u64,
    /// When it started on its coordinator (TimestampTz).
    pub stamp: i64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Slot {
    txn: Txn,
    /// Unix seconds; the slot is free when this has passed (0: never used).
    keep_until: i64,
}

#[repr(C)]
struct Header {
    nslots: u32,
    _pad: u32,
    /// Contexts expiring at or before this (unix seconds) are refused.
    horizon: i64,
}

static mut HEADER: *mut Header = std::ptr::null_mut();
static mut LOCK: *mut pg_sys::LWLock = std::ptr::null_mut();
static mut PREV_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP: pg_sys::shmem_startup_hook_type = None;

/// What this node knows of a distributed transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Not ended here (as far as this node can tell).
    Open,
    /// Ended on this node.
    Ended,
    /// Older than what this node still remembers.
    Forgotten,
}

fn shmem_size(nslots: usize) -> usize {
    std::mem::size_of::<Header>() + nslots * std::mem::size_of::<Slot>()
}

/// From _PG_init, when Citus is loaded: only a preloaded levqor has the table.
pub fn init() {
    unsafe {
        if !pg_sys::process_shared_preload_libraries_in_progress {
            return;
        }
        GucRegistry::define_int_guc(
            c"levqor.citus_ended_transactions",
            c"How many ended Citus distributed transactions each node remembers, to refuse replays of their forwarded contexts",
            c"32 bytes each; takes effect at server start. Size it for the transactions a node ends in levqor.node_context_lifetime.",
            &SLOTS,
            1024,
            16_777_216,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        PREV_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(shmem_request);
        PREV_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    if let Some(prev) = PREV_REQUEST {
        prev();
    }
    pg_sys::RequestAddinShmemSpace(shmem_size(SLOTS.get() as usize));
    pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), 1);
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    if let Some(prev) = PREV_STARTUP {
        prev();
    }
    let nslots = SLOTS.get() as usize;
    let (base, lock) = crate::shmem::attach(SHMEM_NAME, TRANCHE, shmem_size(nslots), |base| {
        (*base.cast::<Header>()).nslots = nslots as u32;
    });
    HEADER = base.cast();
    LOCK = lock;
}

/// Whether the table exists (levqor preloaded beside Citus).
pub fn available() -> bool {
    unsafe { !HEADER.is_null() }
}

/// The slots of `txn`'s probe sequence.
unsafe fn probe(txn: &Txn) -> impl Iterator<Item = *mut Slot> {
    let n = (*HEADER).nslots as usize;
    let first = HEADER.cast::<u8>().add(std::mem::size_of::<Header>()).cast::<Slot>();
    let mix = txn.number ^ ((txn.initiator as u32 as u64) << 40) ^ (txn.stamp as u64).rotate_left(17);
    let h = mix.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let start = (h >> 20) as usize % n;
    (0..PROBE.min(n)).map(move |i| first.add((start + i) % n))
}

struct Held;
impl Drop for Held {
    fn drop(&mut self) {
        unsafe { pg_sys::LWLockRelease(LOCK) };
    }
}

unsafe fn lock(mode: pg_sys::LWLockMode::Type) -> Held {
    pg_sys::LWLockAcquire(LOCK, mode);
    Held
}

/// Record that `txn` ended here; contexts of it are refused until
/// `keep_until` (unix seconds). Never raises: it runs as transactions end.
pub fn record(txn: Txn, keep_until: i64, now: i64) {
    if !available() {
        return;
    }
    unsafe {
        let _held = lock(pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut free = None;
        let mut soonest: Option<*mut Slot> = None;
        for s in probe(&txn) {
            if (*s).keep_until > now && (*s).txn == txn {
                (*s).keep_until = (*s).keep_until.max(keep_until);
                return;
            }
            if (*s).keep_until <= now {
                free.get_or_insert(s);
            } else if soonest.is_none_or(|o| (*o).keep_until > (*s).keep_until) {
                soonest = Some(s);
            }
        }
        let slot = match (free, soonest) {
            (Some(s), _) => s,
            (None, Some(s)) => {
                (*HEADER).horizon = (*HEADER).horizon.max((*s).keep_until);
                s
            }
            (None, None) => return,
        };
        *slot = Slot { txn, keep_until };
    }
}

/// What this node knows of `txn`, for a context of it that expires at
/// `expires` (None: do not compare with the horizon).
pub fn state(txn: &Txn, expires: Option<i64>, now: i64) -> State {
    if !available() {
        return State::Forgotten;
    }
    unsafe {
        let _held = lock(pg_sys::LWLockMode::LW_SHARED);
        let ended = probe(txn).any(|s| (*s).keep_until > now && (*s).txn == *txn);
        if ended {
            State::Ended
        } else if expires.is_some_and(|e| e <= (*HEADER).horizon) {
            State::Forgotten
        } else {
            State::Open
        }
    }
}

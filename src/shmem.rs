//! Attaching a fixed table of levqor's to shared memory, the same way for
//! every table (quota counters, Citus's ended transactions).

use std::ffi::CStr;

use pgrx::pg_sys;

/// From a shmem_startup hook: the named region of `size` bytes (created
/// zeroed, then `init` run on it, when this is its first attach) and the one
/// LWLock of `tranche` (requested in the shmem_request hook).
pub unsafe fn attach(name: &CStr, tranche: &CStr, size: usize, init: impl FnOnce(*mut u8)) -> (*mut u8, *mut pg_sys::LWLock) {
    // AddinShmemInitLock is a macro in C: the 22nd of the main LWLocks.
    let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
    pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
    let mut found = false;
    let base = pg_sys::ShmemInitStruct(name.as_ptr(), size, &mut found).cast::<u8>();
    let lock = &raw mut (*pg_sys::GetNamedLWLockTranche(tranche.as_ptr())).lock;
    if !found {
        std::ptr::write_bytes(base, 0, size);
        init(base);
    }
    pg_sys::LWLockRelease(init_lock);
    (base, lock)
}

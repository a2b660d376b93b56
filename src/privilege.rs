//! Running a catalog lookup with the extension's authority.
//!
//! `authenticate()` and friends must read `levqor.tenant_keys`, which no
//! application role may read, and must then set the context in the *caller's*
//! transaction. A `SECURITY DEFINER` function with `SET search_path` would undo
//! that setting when it returns (PostgreSQL pops every GUC change made under a
//! function's own `SET` clause), so these functions stay invoker functions and
//! do what `SECURITY DEFINER` does only around the lookup: switch to the
//! bootstrap superuser (the role that owns the catalog), pin the search path
//! to `pg_catalog`, run fixed, parameterised, schema-qualified SQL, and
//! switch back.

use std::ffi::CString;

use pgrx::pg_sys;

struct Restore {
    user: pg_sys::Oid,
    sec_context: i32,
}

impl Drop for Restore {
    fn drop(&mut self) {
        unsafe {
            // On an error the transaction's abort pops the override itself
            // (and would complain about a second pop).
            if !std::thread::panicking() {
                pg_sys::PopOverrideSearchPath();
            }
            pg_sys::SetUserIdAndSecContext(self.user, self.sec_context);
        }
    }
}

/// Run `f` as the catalog owner with the search path pinned to `pg_catalog`
/// alone (no temporary schema). The pin is PostgreSQL's override search path (what
/// the plan cache itself compares against), not a setting change: cheap
/// enough for every audited row, and saved plans made under it are never
/// re-planned because a caller's search_path differs.
pub fn as_catalog_owner<R>(f: impl FnOnce() -> R) -> R {
    let mut user = pg_sys::InvalidOid;
    let mut sec_context = 0;
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut sec_context);
        pg_sys::SetUserIdAndSecContext(
            pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID),
            sec_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
        let mut path = pg_sys::OverrideSearchPath {
            schemas: std::ptr::null_mut(),
            addCatalog: true,
            addTemp: false,
            generation: 0,
        };
        // PushOverrideSearchPath copies what it is given.
        pg_sys::PushOverrideSearchPath(&mut path);
    }
    let _restore = Restore { user, sec_context };
    f()
}

/// Whether this session is restoring a dump: a superuser session with
/// `row_security = off`, as pg_dump's scripts and pg_restore run. Its writes
/// are the dump's rows, audited and counted when they were first written;
/// sql/catalog.sql ("References") says why levqor must know.
pub fn restoring() -> bool {
    let lxid = unsafe { (*pg_sys::MyProc).lxid };
    RESTORING.with(|r| r.get() == Some(lxid))
        || unsafe { !pg_sys::row_security && pg_sys::superuser_arg(pg_sys::GetSessionUserId()) }
}

thread_local! {
    /// The local transaction that levqor.backup_context(…, restore => true) marked.
    static RESTORING: std::cell::Cell<Option<pg_sys::LocalTransactionId>> = const { std::cell::Cell::new(None) };
}

/// The sidecar's restore transaction (levqor_backup only, auth.rs).
pub fn restoring_in_this_transaction() {
    let lxid = unsafe { (*pg_sys::MyProc).lxid };
    RESTORING.with(|r| r.set(Some(lxid)));
}

/// Whether `user` has the privileges of `role` (superusers always do).
fn role_has(user: pg_sys::Oid, role: &str) -> bool {
    let Ok(name) = CString::new(role) else { return false };
    unsafe {
        if pg_sys::superuser_arg(user) {
            return true;
        }
        let oid = pg_sys::get_role_oid(name.as_ptr(), true);
        oid != pg_sys::InvalidOid && pg_sys::has_privs_of_role(user, oid)
    }
}

/// Whether the current role has the privileges of `role`.
pub fn current_role_has(role: &str) -> bool {
    role_has(unsafe { pg_sys::GetUserId() }, role)
}

/// Whether the role that called into levqor (outside any SECURITY DEFINER
/// function: the session's role, after SET ROLE) has the privileges of
/// `role`. Definer functions ask this to decide what to show: inside them,
/// current_user is the function's owner.
#[pgrx::pg_extern(stable, parallel_safe)]
fn _caller_has(role: &str) -> bool {
    role_has(unsafe { pg_sys::GetOuterUserId() }, role)
}

/// The role that called into levqor (see `_caller_has`), for definer
/// functions that check what the caller owns.
#[pgrx::pg_extern(stable, parallel_safe)]
fn _caller() -> pg_sys::Oid {
    unsafe { pg_sys::GetOuterUserId() }
}

/// `_caller_has('levqor_admin')`.
#[pgrx::pg_extern(stable, parallel_safe)]
fn _caller_is_admin() -> bool {
    _caller_has("levqor_admin")
}

//! Running a catalog lookup with the extension's authority.
//!
//! `authenticate()` and friends must read `levqor.tenant_keys`, which no
//! application role may read, and must then set the context in the *caller's*
//! transaction. A `SECURITY DEFINER` function with `SET search_path` would undo
//! that setting when it returns (PostgreSQL pops every GUC change made under a
//! function's own `SET` clause), so these functions stay invoker functions and
//! do what `SECURITY DEFINER` does only around the lookup: switch to the
//! bootstrap superuser (the role that owns the catalog), pin `search_path` to
//! `pg_catalog, pg_temp`, run fixed, parameterised SQL, and switch back.

use std::ffi::CString;

use pgrx::pg_sys;

struct Restore {
    user: pg_sys::Oid,
    sec_context: i32,
    nest: i32,
}

impl Drop for Restore {
    fn drop(&mut self) {
        unsafe {
            // On an error the transaction's abort already unwinds the GUC
            // nest level; popping it here twice would be wrong.
            if !std::thread::panicking() {
                pg_sys::AtEOXact_GUC(true, self.nest);
            }
            pg_sys::SetUserIdAndSecContext(self.user, self.sec_context);
        }
    }
}

/// Run `f` as the catalog owner with a pinned `search_path`.
pub fn as_catalog_owner<R>(f: impl FnOnce() -> R) -> R {
    let mut user = pg_sys::InvalidOid;
    let mut sec_context = 0;
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut sec_context);
        pg_sys::SetUserIdAndSecContext(
            pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID),
            sec_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
    }
    let nest = unsafe { pg_sys::NewGUCNestLevel() };
    let _restore = Restore { user, sec_context, nest };
    crate::guc::set(c"search_path", Some(c"pg_catalog, pg_temp"), crate::guc::Scope::Nested, false);
    f()
}

/// Whether the current role has the privileges of `role` (superusers always do).
pub fn current_role_has(role: &str) -> bool {
    let name = CString::new(role).expect("role names have no NUL");
    unsafe {
        if pg_sys::superuser() {
            return true;
        }
        let oid = pg_sys::get_role_oid(name.as_ptr(), true);
        oid != pg_sys::InvalidOid && pg_sys::has_privs_of_role(pg_sys::GetUserId(), oid)
    }
}

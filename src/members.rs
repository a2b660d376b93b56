//! The database, not the credential, decides who a member is.
//!
//! A context that names a user (a key issued for a user, a token's `sub`,
//! `set_tenant(…, user_id => …)`) acts with the role `levqor.members` gives
//! that user: in the context's tenant, or else in the nearest tenant above
//! it where the user is a member (a member of a tenant acts in every
//! organization below it, as `levqor.member_reach` says). The credential's
//! own role can only narrow that ([`meet`]): a key issued as `viewer` for an
//! admin stays a viewer; a key issued as `admin` for a member demoted to
//! `viewer` is a viewer from the next statement on. A user who is not (or no
//! longer) a member gets no context, and loses the one it has (lifecycle.rs
//! re-checks contexts when the catalog changes).
//!
//! Memberships are cached per backend and dropped with the rest of
//! [`crate::cache`] when `levqor.members` or `levqor.tenants` change, so the
//! effective role costs a hash lookup.

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::prelude::*;
use uuid::Uuid;

use crate::context::{from_uuid, Context, MemberRole};
use crate::privilege::as_catalog_owner;

thread_local! {
    static MEMBERSHIPS: RefCell<HashMap<(Uuid, Uuid), Option<MemberRole>>> = RefCell::new(HashMap::new());
}

pub fn forget_all() {
    MEMBERSHIPS.with(|m| m.borrow_mut().clear());
}

const NEAREST: &str = "
    SELECT m.role, 'levqor.members'::regclass::oid
      FROM levqor.tenant_tree c JOIN levqor.members m ON m.tenant_id = c.ancestor AND m.user_id = $2
     WHERE c.descendant = $1
     ORDER BY c.depth LIMIT 1";

/// The role `user` has in `tenant`: as a member of it, or of the nearest
/// tenant above it. None: not a member.
pub fn membership(tenant: Uuid, user: Uuid) -> Option<MemberRole> {
    if let Some(known) = MEMBERSHIPS.with(|m| m.borrow().get(&(tenant, user)).copied()) {
        return known;
    }
    let found = as_catalog_owner(|| {
        Spi::connect(|client| {
            let table = client
                .select(NEAREST, Some(1), &[from_uuid(tenant).into(), from_uuid(user).into()])
                .expect("levqor membership lookup runs");
            let row = table.into_iter().next()?;
            if let Ok(Some(oid)) = row.get::<pgrx::pg_sys::Oid>(2) {
                crate::cache::remember_members(oid);
            }
            MemberRole::parse(&row.get::<String>(1).ok()??)
        })
    });
    MEMBERSHIPS.with(|m| {
        let mut m = m.borrow_mut();
        if m.len() >= 10_000 {
            m.clear();
        }
        m.insert((tenant, user), found);
    });
    found
}

/// What each role may do, as sets: owner ⊇ admin ⊇ operator, auditor ⊇ viewer;
/// operator (writes) and auditor (reads the audit trail) are apart.
fn rank(r: MemberRole) -> (u8, u8) {
    // (may write, may read the audit trail), plus admin and owner above both.
    match r {
        MemberRole::Owner => (4, 4),
        MemberRole::Admin => (3, 3),
        MemberRole::Operator => (2, 0),
        MemberRole::Auditor => (0, 2),
        MemberRole::Viewer => (0, 0),
    }
}

/// The most a holder of both roles may do: the narrower one, or viewer when
/// neither contains the other (operator and auditor).
pub fn meet(a: MemberRole, b: MemberRole) -> MemberRole {
    let (ra, rb) = (rank(a), rank(b));
    if ra.0 <= rb.0 && ra.1 <= rb.1 {
        a
    } else if rb.0 <= ra.0 && rb.1 <= ra.1 {
        b
    } else {
        MemberRole::Viewer
    }
}

/// The member role a context acts with now.
pub fn effective_role(ctx: &Context) -> Option<MemberRole> {
    // On a Citus worker: decided by the coordinator, which has levqor.members.
    if let Some(f) = crate::context::forwarded() {
        return f.role;
    }
    match ctx.user {
        None => ctx.role,
        Some(user) => {
            let member = membership(ctx.tenant, user)?;
            Some(ctx.role.map_or(member, |cap| meet(cap, member)))
        }
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn a_credential_narrows_a_membership_and_never_widens_it() {
        use MemberRole::*;
        assert_eq!(meet(Viewer, Admin), Viewer);
        assert_eq!(meet(Admin, Viewer), Viewer);
        assert_eq!(meet(Owner, Admin), Admin);
        assert_eq!(meet(Operator, Auditor), Viewer, "apart: only what both may do");
        assert_eq!(meet(Auditor, Admin), Auditor);
        assert_eq!(meet(Operator, Owner), Operator);
        for a in MemberRole::ALL {
            assert_eq!(meet(a, a), a);
            for b in MemberRole::ALL {
                assert_eq!(meet(a, b), meet(b, a));
            }
        }
    }
}

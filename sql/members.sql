-- Members of a tenant or organization and their roles (docs/hierarchy.md).
-- levqor does not log users in: the application does, and tells levqor who
-- acts (a key issued for a user and role, set_tenant, a signed token). This
-- table is what the application and levqor.accessible_orgs read.

CREATE TABLE levqor.members (
    tenant_id  uuid NOT NULL REFERENCES levqor.tenants (id) ON DELETE CASCADE,
    user_id    uuid NOT NULL,
    role       text NOT NULL
               CONSTRAINT members_role_check CHECK (role IN ('owner', 'admin', 'operator', 'auditor', 'viewer')),
    -- The user's id at the tenant's identity provider, if it has one.
    sso_id     text CONSTRAINT members_sso_id_format CHECK (length(sso_id) BETWEEN 1 AND 255 AND sso_id !~ '[[:cntrl:]]'),
    added_at   timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id)
);
CREATE INDEX members_user_idx ON levqor.members (user_id);
CREATE UNIQUE INDEX members_sso_id_key ON levqor.members (tenant_id, sso_id) WHERE sso_id IS NOT NULL;
SELECT pg_catalog.pg_extension_config_dump('levqor.members', '');

CREATE FUNCTION levqor._check_member_role(role text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF role IS NULL OR role NOT IN ('owner', 'admin', 'operator', 'auditor', 'viewer') THEN
        RAISE EXCEPTION 'unknown member role %', coalesce(quote_literal(role), 'NULL')
            USING ERRCODE = '22023', HINT = 'Member roles are owner, admin, operator, auditor and viewer.';
    END IF;
END
$fn$;

-- The tenant keeps at least one owner once it has one (callers hold the
-- tenant row locked, so two concurrent removals cannot both pass).
CREATE FUNCTION levqor._keep_an_owner(t levqor.tenants, leaving uuid) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM levqor.members m
                    WHERE m.tenant_id = t.id AND m.role = 'owner' AND m.user_id <> leaving) THEN
        RAISE EXCEPTION 'tenant % must keep at least one owner', t.slug USING ERRCODE = '55000',
            HINT = 'Make another member owner first (levqor.set_member_role).';
    END IF;
END
$fn$;

CREATE FUNCTION levqor.add_member(tenant text, user_id uuid, role text, sso_id text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t levqor.tenants := levqor._tenant_for_update(tenant);
BEGIN
    PERFORM levqor._check_member_role(role);
    IF user_id IS NULL THEN
        RAISE EXCEPTION 'a member needs a user id' USING ERRCODE = '22023';
    END IF;
    BEGIN
        INSERT INTO levqor.members (tenant_id, user_id, role, sso_id) VALUES (t.id, user_id, role, sso_id);
    EXCEPTION WHEN unique_violation THEN
        RAISE EXCEPTION 'user % is already a member of % (or that sso id is taken)', user_id, t.slug
            USING ERRCODE = '23505', HINT = 'levqor.set_member_role() changes a member''s role.';
    END;
    PERFORM levqor._log_event(t.id, 'member_added', jsonb_build_object('user_id', user_id, 'role', role, 'sso_id', sso_id));
END
$fn$;

CREATE FUNCTION levqor.set_member_role(tenant text, user_id uuid, role text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t   levqor.tenants := levqor._tenant_for_update(tenant);
    was text;
BEGIN
    PERFORM levqor._check_member_role(role);
    SELECT m.role INTO was FROM levqor.members m WHERE m.tenant_id = t.id AND m.user_id = user_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'user % is not a member of %', user_id, t.slug USING ERRCODE = '42704';
    END IF;
    IF was = role THEN
        RETURN;
    END IF;
    IF was = 'owner' THEN
        PERFORM levqor._keep_an_owner(t, user_id);
    END IF;
    UPDATE levqor.members m SET role = role, updated_at = now() WHERE m.tenant_id = t.id AND m.user_id = user_id;
    PERFORM levqor._log_event(t.id, 'member_role_changed', jsonb_build_object('user_id', user_id, 'from', was, 'to', role));
END
$fn$;

CREATE FUNCTION levqor.remove_member(tenant text, user_id uuid) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t   levqor.tenants := levqor._tenant_for_update(tenant);
    was text;
BEGIN
    SELECT m.role INTO was FROM levqor.members m WHERE m.tenant_id = t.id AND m.user_id = user_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'user % is not a member of %', user_id, t.slug USING ERRCODE = '42704';
    END IF;
    IF was = 'owner' THEN
        PERFORM levqor._keep_an_owner(t, user_id);
    END IF;
    DELETE FROM levqor.members m WHERE m.tenant_id = t.id AND m.user_id = user_id;
    PERFORM levqor._log_event(t.id, 'member_removed', jsonb_build_object('user_id', user_id, 'role', was));
END
$fn$;

-- The tenants and organizations a user may act in: where they are a member,
-- and everything below those. A levqor_admin sees every user's; anyone else
-- only the user of their own context. (A view, for the same reason as
-- levqor.tree.)
CREATE VIEW levqor.member_reach WITH (security_barrier = true) AS
SELECT m.user_id, c.descendant AS tenant_id, m.tenant_id AS through, m.role
  FROM levqor.members m JOIN levqor.tenant_tree c ON c.ancestor = m.tenant_id
 WHERE pg_has_role(current_user, 'levqor_admin', 'USAGE') OR m.user_id = levqor.current_user_id();

CREATE FUNCTION levqor.accessible_orgs(user_id uuid) RETURNS SETOF uuid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT DISTINCT r.tenant_id FROM levqor.member_reach r WHERE r.user_id = $1
$fn$;

-- 100 tenants under one platform, each with 32 organizations, each of those
-- with 32 more: 105,600 organizations, three levels below the platform. One
-- million agents owned by random organizations: 90 % organization scope,
-- 9.9 % tenant scope, 0.1 % platform scope. Two identical copies of the
-- agents: one protected by levqor, one by the seed's hand-written functions
-- and policy over its own organizations table. Run as a superuser.
\set QUIET on
\set ON_ERROR_STOP on
CREATE EXTENSION IF NOT EXISTS levqor;
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'bench_app') THEN
    CREATE ROLE bench_app LOGIN IN ROLE levqor_app, levqor_context_admin;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'bench_ops') THEN
    CREATE ROLE bench_ops LOGIN IN ROLE levqor_admin;
  END IF;
END $$;

SELECT levqor.create_platform('platform', 'Platform') AS platform_id \gset
-- Bulk: straight into levqor.tenants (the hierarchy triggers keep the closure).
INSERT INTO levqor.tenants (slug, name, parent, kind)
SELECT 't' || g, 'Tenant ' || g, :'platform_id', 'tenant' FROM generate_series(1, 100) g;
INSERT INTO levqor.tenants (slug, name, parent, kind)
SELECT 't' || g || '-o' || h, 'Org', t.id, 'organization'
  FROM generate_series(1, 100) g, generate_series(1, 32) h, levqor.tenants t WHERE t.slug = 't' || g;
INSERT INTO levqor.tenants (slug, name, parent, kind)
SELECT p.slug || '-' || h, 'Org', p.id, 'organization'
  FROM levqor.tenants p, generate_series(1, 32) h WHERE p.slug ~ '^t[0-9]+-o[0-9]+$';
ANALYZE levqor.tenants, levqor.tenant_tree;

-- levqor's agents.
CREATE TABLE agents (id bigserial PRIMARY KEY, name text NOT NULL, owner_org uuid NOT NULL);
CREATE INDEX ON agents (owner_org);
SELECT levqor.enable_tenancy('agents', 'owner_org', 'sharing_scope');
CREATE TEMP TABLE orgs AS SELECT row_number() OVER () AS n, id FROM levqor.tenants WHERE kind = 'organization';
INSERT INTO agents (name, owner_org, sharing_scope)
SELECT 'agent ' || g, o.id,
       CASE WHEN g % 1000 = 0 THEN 'platform' WHEN g % 10 = 0 THEN 'tenant' ELSE 'organization' END
  FROM generate_series(1, 1000000) g JOIN orgs o ON o.n = 1 + (g::bigint * 7919) % (SELECT count(*) FROM orgs);
-- Platform-scope agents belong to the platform.
UPDATE agents SET owner_org = :'platform_id' WHERE sharing_scope = 'platform';
GRANT SELECT ON agents TO bench_app;

-- The seed's way: its own organizations table, membership table, recursive
-- helper functions and a policy calling them (VITAL checklist, phase 3).
CREATE TABLE organizations (id uuid PRIMARY KEY, parent_organization_id uuid, organization_type text NOT NULL);
INSERT INTO organizations SELECT id, parent, kind FROM levqor.tenants WHERE slug = 'platform' OR slug ~ '^t[0-9]';
CREATE INDEX ON organizations (parent_organization_id);
CREATE TABLE user_organizations (user_id uuid, organization_id uuid, is_active boolean DEFAULT true, PRIMARY KEY (user_id, organization_id));
CREATE TABLE seed_agents (LIKE agents INCLUDING DEFAULTS);
ALTER TABLE seed_agents ALTER COLUMN id DROP DEFAULT;
INSERT INTO seed_agents SELECT * FROM agents;
ALTER TABLE seed_agents ADD PRIMARY KEY (id);
CREATE INDEX ON seed_agents (owner_org);
CREATE INDEX ON seed_agents (sharing_scope);
ANALYZE agents, seed_agents, organizations;

CREATE FUNCTION get_organization_tenant(org_id uuid) RETURNS uuid LANGUAGE sql STABLE AS $$
    WITH RECURSIVE up AS (
        SELECT id, parent_organization_id, organization_type FROM organizations WHERE id = org_id
        UNION ALL
        SELECT o.id, o.parent_organization_id, o.organization_type FROM organizations o JOIN up ON o.id = up.parent_organization_id)
    SELECT id FROM up WHERE organization_type = 'tenant' LIMIT 1
$$;
CREATE FUNCTION get_organization_hierarchy(org_id uuid) RETURNS TABLE (id uuid, organization_type text, depth int)
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE up AS (
        SELECT o.id, o.parent_organization_id, o.organization_type, 0 AS depth FROM organizations o WHERE o.id = org_id
        UNION ALL
        SELECT o.id, o.parent_organization_id, o.organization_type, up.depth + 1 FROM organizations o JOIN up ON o.id = up.parent_organization_id)
    SELECT up.id, up.organization_type, up.depth FROM up WHERE up.depth > 0 ORDER BY up.depth
$$;
CREATE FUNCTION get_user_accessible_organizations(uid uuid) RETURNS SETOF uuid LANGUAGE sql STABLE AS $$
    WITH RECURSIVE down AS (
        SELECT organization_id AS id FROM user_organizations WHERE user_id = uid AND is_active
        UNION
        SELECT o.id FROM organizations o JOIN down ON o.parent_organization_id = down.id)
    SELECT id FROM down
$$;
ALTER TABLE seed_agents ENABLE ROW LEVEL SECURITY;
CREATE POLICY users_view_accessible_agents ON seed_agents FOR SELECT TO PUBLIC USING (
    sharing_scope = 'platform'
    OR (sharing_scope = 'tenant' AND get_organization_tenant(owner_org) IN (
          SELECT get_organization_tenant(organization_id) FROM user_organizations
           WHERE user_id = current_setting('app.user_id')::uuid AND is_active))
    OR (sharing_scope = 'organization' AND owner_org IN (
          SELECT organization_id FROM user_organizations WHERE user_id = current_setting('app.user_id')::uuid AND is_active)));
GRANT SELECT ON seed_agents, organizations, user_organizations TO bench_app;

-- The user measured: a member of one second-level organization.
INSERT INTO user_organizations SELECT '00000000-0000-0000-0000-00000000000a', id FROM levqor.tenants WHERE slug = 't42-o7';
SELECT levqor.add_member('t42-o7', '00000000-0000-0000-0000-00000000000a', 'operator');

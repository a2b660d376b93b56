-- The policy engine (docs/policy.md): may the current context do `action`
-- to `resource`? Decided from the tenant's plan (its features), the member
-- role in the context, and JSON policy documents; default deny; every deny
-- recorded.

CREATE TABLE levqor.policies (
    name       text PRIMARY KEY CONSTRAINT policies_name_format CHECK (name ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    document   jsonb NOT NULL,
    builtin    boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by name NOT NULL DEFAULT session_user
);
SELECT pg_catalog.pg_extension_config_dump('levqor.policies', 'WHERE NOT builtin');

-- Where a document is wrong, as "$.path: what", or NULL when it is right.
-- A document: {"effect": "allow"|"deny", "actions": [pattern, …],
-- "resources": [pattern, …], "roles": [role, …], "features": [feature, …],
-- "plans": [plan, …], "description": text}; effect and actions required;
-- a pattern is text where * matches anything.
CREATE FUNCTION levqor._policy_error(doc jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    k   text;
    v   jsonb;
    i   int;
BEGIN
    IF jsonb_typeof(doc) IS DISTINCT FROM 'object' THEN
        RETURN '$: expected an object';
    END IF;
    FOR k, v IN SELECT e.key, e.value FROM jsonb_each(doc) e LOOP
        CASE k
        WHEN 'effect' THEN
            IF v NOT IN ('"allow"', '"deny"') THEN
                RETURN '$.effect: expected "allow" or "deny"';
            END IF;
        WHEN 'description' THEN
            IF jsonb_typeof(v) <> 'string' THEN
                RETURN '$.description: expected a string';
            END IF;
        WHEN 'actions', 'resources', 'roles', 'features', 'plans' THEN
            IF jsonb_typeof(v) <> 'array' OR jsonb_array_length(v) = 0 THEN
                RETURN format('$.%s: expected a non-empty array of strings', k);
            END IF;
            FOR i IN 0 .. jsonb_array_length(v) - 1 LOOP
                IF jsonb_typeof(v -> i) <> 'string' OR length(v ->> i) NOT BETWEEN 1 AND 200 THEN
                    RETURN format('$.%s[%s]: expected a string of 1 to 200 characters', k, i);
                END IF;
                IF k = 'roles' AND (v ->> i) NOT IN ('owner', 'admin', 'operator', 'auditor', 'viewer') THEN
                    RETURN format('$.roles[%s]: unknown member role "%s"', i, v ->> i);
                END IF;
            END LOOP;
        ELSE
            RETURN format('$.%s: unknown key', k);
        END CASE;
    END LOOP;
    IF NOT doc ? 'effect' THEN
        RETURN '$.effect: missing';
    END IF;
    IF NOT doc ? 'actions' THEN
        RETURN '$.actions: missing';
    END IF;
    RETURN NULL;
END
$fn$;

CREATE FUNCTION levqor._check_policy() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    problem text := levqor._policy_error(NEW.document);
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'invalid policy %: %', NEW.name, problem USING ERRCODE = '22023',
            HINT = 'docs/policy.md describes a policy document.';
    END IF;
    RETURN NEW;
END
$fn$;
CREATE TRIGGER levqor_check_policy BEFORE INSERT OR UPDATE ON levqor.policies
    FOR EACH ROW EXECUTE FUNCTION levqor._check_policy();

-- The v8 spec's policies.json, as documents: features come with plans,
-- owners and admins administer, viewers and auditors never change anything.
INSERT INTO levqor.policies (name, document, builtin) VALUES
  ('default-read-docs', '{"effect": "allow", "actions": ["read:docs"], "description": "Anyone in a tenant reads the docs."}', true),
  ('default-deny-admin', '{"effect": "deny", "actions": ["admin:*"], "roles": ["operator", "auditor", "viewer"], "description": "Administration is for owners and admins."}', true),
  ('owners-administer', '{"effect": "allow", "actions": ["admin:*"], "roles": ["owner", "admin"], "description": "Owners and admins administer their tenant."}', true),
  ('read-only-roles', '{"effect": "deny", "actions": ["*:create", "*:update", "*:delete", "*:write", "*:install", "*:buy"], "roles": ["auditor", "viewer"], "description": "Viewers and auditors change nothing."}', true),
  ('auditors-read-audit', '{"effect": "allow", "actions": ["audit:read"], "roles": ["owner", "admin", "auditor"], "description": "The audit trail is for owners, admins and auditors."}', true),
  ('feature-templates', '{"effect": "allow", "actions": ["templates:*"], "features": ["templates"], "description": "Plans with templates use them."}', true),
  ('feature-packs', '{"effect": "allow", "actions": ["packs:*"], "features": ["packs"], "description": "Plans with packs use them."}', true),
  ('feature-marketplace', '{"effect": "allow", "actions": ["marketplace:*"], "features": ["marketplace"], "description": "Plans with the marketplace use it."}', true),
  ('feature-sso', '{"effect": "allow", "actions": ["sso:*"], "roles": ["owner", "admin"], "features": ["sso"], "description": "Plans with SSO configure it (owners and admins)."}', true),
  ('feature-rbac', '{"effect": "allow", "actions": ["rbac:*"], "roles": ["owner", "admin"], "features": ["rbac"], "description": "Plans with RBAC manage roles (owners and admins)."}', true),
  ('feature-audit-stream', '{"effect": "allow", "actions": ["audit_stream:*"], "roles": ["owner", "admin"], "features": ["audit_stream"], "description": "Plans with audit streaming configure it."}', true),
  ('feature-db-per-tenant', '{"effect": "allow", "actions": ["db_per_tenant:*"], "roles": ["owner", "admin"], "features": ["db_per_tenant"], "description": "Plans with a database per tenant request one."}', true);

-- Whether `value` matches one of the patterns (* matches anything). No SET
-- clause, so that PostgreSQL inlines it into _decide (whose search_path is
-- pinned); it is not a definer function.
CREATE FUNCTION levqor._matches(patterns jsonb, value text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT EXISTS (SELECT 1 FROM pg_catalog.jsonb_array_elements_text($1) AS p(pattern)
                    WHERE $2 OPERATOR(pg_catalog.~~) pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(
                              pg_catalog.replace(p.pattern, '\', '\\'), '%', '\%'), '_', '\_'), '*', '%'))
$fn$;

-- The decision for a tenant, role, action and resource: a matching deny
-- wins, else a matching allow, else the default deny. The rule that decided
-- and why, in words.
-- (PL/pgSQL rather than SQL: its plan is prepared once per session, where a
-- SQL function's would be planned on every call.)
CREATE FUNCTION levqor._decide(tenant uuid, role text, action text, resource text)
RETURNS TABLE (allowed boolean, rule text, rationale text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY
    WITH ctx AS (
        SELECT t.plan, p.features FROM levqor.tenants t JOIN levqor.plans p ON p.name = t.plan WHERE t.id = $1
    ), matching AS (
        SELECT po.name, po.document ->> 'effect' AS effect, po.document
          FROM levqor.policies po, ctx
         WHERE levqor._matches(po.document -> 'actions', $3)
           AND levqor._matches(coalesce(po.document -> 'resources', '["*"]'), coalesce($4, '*'))
           AND (NOT po.document ? 'roles' OR po.document -> 'roles' ? coalesce($2, ''))
           AND (NOT po.document ? 'features'
                OR ARRAY(SELECT jsonb_array_elements_text(po.document -> 'features')) <@ ctx.features)
           AND (NOT po.document ? 'plans' OR po.document -> 'plans' ? ctx.plan)
    ), decided AS (
        SELECT m.effect = 'allow' AS allowed, m.name AS rule,
               format('policy %s %ss %s on %s%s%s', m.name, m.effect, $3, coalesce($4, '*'),
                      CASE WHEN $2 IS NULL THEN ' (no member role)' ELSE format(' for role %s', $2) END,
                      CASE WHEN m.document ? 'features' THEN format(' (plan %s has %s)', ctx.plan,
                           (SELECT string_agg(f, ', ') FROM jsonb_array_elements_text(m.document -> 'features') f)) ELSE '' END)
               AS rationale
          FROM matching m, ctx
         ORDER BY m.effect = 'deny' DESC, m.name
         LIMIT 1
    )
    SELECT d.allowed, d.rule, d.rationale FROM decided d
    UNION ALL
    SELECT false, 'default-deny',
           CASE WHEN NOT EXISTS (SELECT 1 FROM ctx) THEN 'no tenant context: everything is denied'
                ELSE format('no policy allows %s on %s for %s on plan %s', $3, coalesce($4, '*'),
                            coalesce('role ' || $2, 'a context without a member role'), (SELECT ctx.plan FROM ctx)) END
     WHERE NOT EXISTS (SELECT 1 FROM decided);
END
$fn$;

-- The decision with its reasons, for the current context. Records nothing.
CREATE FUNCTION levqor.explain(action text, resource text DEFAULT '*') RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT jsonb_build_object('allowed', d.allowed, 'rule', d.rule, 'rationale', d.rationale,
                              'action', $1, 'resource', $2, 'tenant_id', levqor.current_tenant(),
                              'user_id', levqor.current_user_id(), 'member_role', levqor.current_member_role())
      FROM levqor._decide(levqor.current_tenant(), levqor.current_member_role(), $1, $2) d
$fn$;

-- Record a deny in the audit log (levqor.authorize, in src/policy.rs, calls
-- it once per transaction and (action, resource)); a read-only transaction
-- cannot write, so there it goes to the server log instead.
CREATE FUNCTION levqor._record_deny(action text, resource text, rule text, rationale text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    detail jsonb := jsonb_build_object('action', action, 'resource', resource, 'rule', rule, 'rationale', rationale,
                                       'user_id', levqor.current_user_id(), 'member_role', levqor.current_member_role());
BEGIN
    IF current_setting('transaction_read_only') = 'on' THEN
        RAISE LOG 'levqor: policy_denied %', detail::text;
    ELSE
        PERFORM levqor._log_event(levqor.current_tenant(), 'policy_denied', detail);
    END IF;
END
$fn$;

-- levqor.authorize(action, resource) is in the library (src/policy.rs): the
-- decision of _decide, cached per backend, plus _record_deny for denies.

-- Write or replace a policy (levqor_admin). The document is text so that a
-- malformed one is refused with a clear message.
CREATE FUNCTION levqor.put_policy(name text, document text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    doc jsonb;
BEGIN
    BEGIN
        doc := document::jsonb;
    EXCEPTION WHEN invalid_text_representation THEN
        RAISE EXCEPTION 'invalid policy %: not JSON', name USING ERRCODE = '22023',
            DETAIL = SQLERRM, HINT = 'docs/policy.md describes a policy document.';
    END;
    INSERT INTO levqor.policies AS p (name, document) VALUES (name, doc)
    ON CONFLICT ON CONSTRAINT policies_pkey DO UPDATE
       SET document = EXCLUDED.document, builtin = false, updated_at = now(), updated_by = session_user;
    PERFORM levqor._log_event(NULL, 'policy_written', jsonb_build_object('name', name, 'document', doc));
END
$fn$;

CREATE FUNCTION levqor.drop_policy(name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
BEGIN
    DELETE FROM levqor.policies p WHERE p.name = name;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM levqor._log_event(NULL, 'policy_dropped', jsonb_build_object('name', name));
    RETURN true;
END
$fn$;

-- Members of a tenant or organization and their roles (docs/hierarchy.md).
-- levqor does not log users in: the application does, and tells levqor who
-- acts (a key issued for a user and role, set_tenant, a signed token). This
-- table is what the application and levqor.accessible_orgs read.

CREATE TABLE levqor.members (
    tenant_id  uuid NOT NULL,   -- levqor.tenants (id), deleted with it (sql/catalog.sql, "References")
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
CREATE TRIGGER levqor_reference_tenant AFTER INSERT OR UPDATE OF tenant_id ON levqor.members
    FOR EACH ROW EXECUTE FUNCTION levqor._check_reference('tenant_id', 'levqor.tenants', 'id', 'uuid');
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

-- A member's role, for a change to it: 42704 if not a member, and the
-- tenant's last owner may not leave the role.
CREATE FUNCTION levqor._leaving_role(t levqor.tenants, user_id uuid) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    was text;
BEGIN
    SELECT m.role INTO was FROM levqor.members m WHERE m.tenant_id = t.id AND m.user_id = user_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'user % is not a member of %', user_id, t.slug USING ERRCODE = '42704';
    END IF;
    IF was = 'owner' THEN
        PERFORM levqor._keep_an_owner(t, user_id);
    END IF;
    RETURN was;
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
    IF EXISTS (SELECT 1 FROM levqor.members m WHERE m.tenant_id = t.id AND m.user_id = user_id AND m.role = role) THEN
        RETURN;
    END IF;
    was := levqor._leaving_role(t, user_id);
    UPDATE levqor.members m SET role = role, updated_at = now() WHERE m.tenant_id = t.id AND m.user_id = user_id;
    PERFORM levqor._log_event(t.id, 'member_role_changed', jsonb_build_object('user_id', user_id, 'from', was, 'to', role));
END
$fn$;

-- Removing a member also revokes the keys issued for that user in that
-- tenant, so that none is left to reuse should the user be added back.
CREATE FUNCTION levqor.remove_member(tenant text, user_id uuid) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t   levqor.tenants := levqor._tenant_for_update(tenant);
    was text;
    k   record;
BEGIN
    was := levqor._leaving_role(t, user_id);
    DELETE FROM levqor.members m WHERE m.tenant_id = t.id AND m.user_id = user_id;
    PERFORM levqor._log_event(t.id, 'member_removed', jsonb_build_object('user_id', user_id, 'role', was));
    FOR k IN UPDATE levqor.tenant_keys x SET revoked_at = now()
              WHERE x.tenant_id = t.id AND x.user_id = user_id AND x.revoked_at IS NULL
             RETURNING x.key_id LOOP
        PERFORM levqor._log_event(t.id, 'key_revoked',
            jsonb_build_object('key_id', k.key_id, 'user_id', user_id, 'reason', 'member_removed'));
    END LOOP;
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

-- Per-tenant single sign-on settings, for the application's login flow:
-- levqor stores and validates them; it does not speak SAML or OIDC itself.
-- The client secret is never readable by levqor_app: only a trusted server
-- (levqor_context_admin), which exchanges codes with the identity provider,
-- reads it.
CREATE TABLE levqor.tenant_sso (
    tenant_id       uuid PRIMARY KEY,   -- levqor.tenants (id), deleted with it
    protocol        text NOT NULL CONSTRAINT tenant_sso_protocol_check CHECK (protocol IN ('oidc', 'saml')),
    issuer          text,      -- OIDC
    client_id       text,      -- OIDC
    client_secret   text,      -- OIDC; never shown to levqor_app
    metadata_url    text,      -- SAML
    metadata_xml    xml,       -- SAML
    entity_id       text,      -- SAML: the identity provider's entityID
    allowed_domains text[] NOT NULL DEFAULT '{}',
    updated_at      timestamptz NOT NULL DEFAULT now(),
    updated_by      name NOT NULL DEFAULT session_user,
    CONSTRAINT tenant_sso_oidc CHECK (protocol <> 'oidc' OR (issuer IS NOT NULL AND client_id IS NOT NULL)),
    CONSTRAINT tenant_sso_saml CHECK (protocol <> 'saml' OR ((metadata_url IS NOT NULL OR metadata_xml IS NOT NULL) AND entity_id IS NOT NULL))
);
SELECT pg_catalog.pg_extension_config_dump('levqor.tenant_sso', '');
CREATE TRIGGER levqor_reference_tenant AFTER INSERT OR UPDATE OF tenant_id ON levqor.tenant_sso
    FOR EACH ROW EXECUTE FUNCTION levqor._check_reference('tenant_id', 'levqor.tenants', 'id', 'uuid');

CREATE FUNCTION levqor._sso_tenant(tenant text) RETURNS levqor.tenants
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    t levqor.tenants := levqor._tenant_for_update(tenant);
BEGIN
    IF NOT EXISTS (SELECT 1 FROM levqor.plans p WHERE p.name = t.plan AND 'sso' = ANY (p.features)) THEN
        RAISE EXCEPTION 'plan % of tenant % does not include single sign-on', t.plan, t.slug USING ERRCODE = '55000',
            HINT = 'SSO comes with plans whose features include sso (enterprise).';
    END IF;
    RETURN t;
END
$fn$;

CREATE FUNCTION levqor._check_url(what text, url text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF url IS NULL OR url !~ '^https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[^[:space:][:cntrl:]]*)?$' OR length(url) > 2000 THEN
        RAISE EXCEPTION '% must be an https URL, not %', what, coalesce(quote_literal(left(url, 100)), 'NULL')
            USING ERRCODE = '22023';
    END IF;
END
$fn$;

CREATE FUNCTION levqor._check_domains(domains text[]) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    d text;
BEGIN
    FOREACH d IN ARRAY coalesce(domains, '{}') LOOP
        IF d IS NULL OR d !~ '^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$' THEN
            RAISE EXCEPTION 'invalid email domain %', coalesce(quote_literal(d), 'NULL') USING ERRCODE = '22023';
        END IF;
    END LOOP;
END
$fn$;

CREATE FUNCTION levqor.set_sso_oidc(tenant text, issuer text, client_id text, client_secret text,
                                    allowed_domains text[] DEFAULT '{}') RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t levqor.tenants := levqor._sso_tenant(tenant);
BEGIN
    PERFORM levqor._check_url('the OIDC issuer', issuer);
    IF client_id IS NULL OR client_id !~ '^[[:graph:]]{1,255}$' THEN
        RAISE EXCEPTION 'the OIDC client id must be 1 to 255 printable characters' USING ERRCODE = '22023';
    END IF;
    IF client_secret IS NULL OR length(client_secret) NOT BETWEEN 16 AND 1000 OR client_secret ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'the OIDC client secret must be 16 to 1000 characters' USING ERRCODE = '22023';
    END IF;
    PERFORM levqor._check_domains(allowed_domains);
    INSERT INTO levqor.tenant_sso AS s (tenant_id, protocol, issuer, client_id, client_secret, allowed_domains)
    VALUES (t.id, 'oidc', issuer, client_id, client_secret, coalesce(allowed_domains, '{}'))
    ON CONFLICT ON CONSTRAINT tenant_sso_pkey DO UPDATE
       SET protocol = 'oidc', issuer = EXCLUDED.issuer, client_id = EXCLUDED.client_id,
           client_secret = EXCLUDED.client_secret, metadata_url = NULL, metadata_xml = NULL, entity_id = NULL,
           allowed_domains = EXCLUDED.allowed_domains, updated_at = now(), updated_by = session_user;
    PERFORM levqor._log_event(t.id, 'sso_configured', jsonb_build_object('protocol', 'oidc', 'issuer', issuer,
        'client_id', client_id, 'allowed_domains', to_jsonb(allowed_domains)));
END
$fn$;

-- SAML: the identity provider's metadata, as XML or an https URL, and its entityID.
CREATE FUNCTION levqor.set_sso_saml(tenant text, entity_id text, metadata_xml text DEFAULT NULL,
                                    metadata_url text DEFAULT NULL, allowed_domains text[] DEFAULT '{}') RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t   levqor.tenants := levqor._sso_tenant(tenant);
    doc xml;
BEGIN
    IF entity_id IS NULL OR entity_id !~ '^[[:graph:]]+$' OR length(entity_id) > 1024 THEN
        RAISE EXCEPTION 'the SAML entity id must be 1 to 1024 printable characters' USING ERRCODE = '22023';
    END IF;
    IF (metadata_xml IS NULL) = (metadata_url IS NULL) THEN
        RAISE EXCEPTION 'give the SAML metadata either as XML or as a URL' USING ERRCODE = '22023';
    END IF;
    IF metadata_url IS NOT NULL THEN
        PERFORM levqor._check_url('the SAML metadata URL', metadata_url);
    ELSE
        IF length(metadata_xml) > 1000000 OR NOT xml_is_well_formed_document(metadata_xml) THEN
            RAISE EXCEPTION 'the SAML metadata is not a well-formed XML document' USING ERRCODE = '22023';
        END IF;
        doc := xmlparse(DOCUMENT metadata_xml);
        IF NOT xpath_exists('/*[local-name()="EntityDescriptor"]/@entityID', doc) THEN
            RAISE EXCEPTION 'the SAML metadata has no EntityDescriptor with an entityID' USING ERRCODE = '22023';
        END IF;
        IF (xpath('string(/*[local-name()="EntityDescriptor"]/@entityID)', doc))[1]::text <> entity_id THEN
            RAISE EXCEPTION 'the SAML metadata describes entity %, not %',
                (xpath('string(/*[local-name()="EntityDescriptor"]/@entityID)', doc))[1]::text, entity_id
                USING ERRCODE = '22023';
        END IF;
    END IF;
    PERFORM levqor._check_domains(allowed_domains);
    INSERT INTO levqor.tenant_sso AS s (tenant_id, protocol, entity_id, metadata_xml, metadata_url, allowed_domains)
    VALUES (t.id, 'saml', entity_id, doc, metadata_url, coalesce(allowed_domains, '{}'))
    ON CONFLICT ON CONSTRAINT tenant_sso_pkey DO UPDATE
       SET protocol = 'saml', issuer = NULL, client_id = NULL, client_secret = NULL,
           entity_id = EXCLUDED.entity_id, metadata_xml = EXCLUDED.metadata_xml, metadata_url = EXCLUDED.metadata_url,
           allowed_domains = EXCLUDED.allowed_domains, updated_at = now(), updated_by = session_user;
    PERFORM levqor._log_event(t.id, 'sso_configured', jsonb_build_object('protocol', 'saml', 'entity_id', entity_id,
        'metadata_url', metadata_url, 'allowed_domains', to_jsonb(allowed_domains)));
END
$fn$;

CREATE FUNCTION levqor.clear_sso(tenant text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t levqor.tenants := levqor._tenant_for_update(tenant);
BEGIN
    DELETE FROM levqor.tenant_sso s WHERE s.tenant_id = t.id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM levqor._log_event(t.id, 'sso_cleared', '{}');
    RETURN true;
END
$fn$;

-- The settings a login page needs, without the secret: for the context's
-- tenant (any role), or any tenant for a trusted server or a levqor_admin.
CREATE FUNCTION levqor.sso_settings(tenant text DEFAULT NULL)
RETURNS TABLE (tenant_id uuid, protocol text, issuer text, client_id text, metadata_url text,
               metadata_xml xml, entity_id text, allowed_domains text[], has_client_secret boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    tid uuid := CASE WHEN tenant IS NULL THEN levqor.current_tenant() ELSE levqor._tenant_id(tenant) END;
BEGIN
    IF tid IS DISTINCT FROM levqor.current_tenant() AND NOT levqor._caller_is_admin()
       AND NOT levqor._caller_has('levqor_context_admin') THEN
        RAISE EXCEPTION 'only a trusted server or a levqor_admin reads another tenant''s SSO settings'
            USING ERRCODE = '42501';
    END IF;
    RETURN QUERY SELECT s.tenant_id, s.protocol, s.issuer, s.client_id, s.metadata_url, s.metadata_xml, s.entity_id,
                        s.allowed_domains, s.client_secret IS NOT NULL
                   FROM levqor.tenant_sso s WHERE s.tenant_id = tid;
END
$fn$;

-- The OIDC client secret, for the trusted server that exchanges codes.
CREATE FUNCTION levqor.sso_client_secret(tenant text) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT s.client_secret FROM levqor.tenant_sso s WHERE s.tenant_id = levqor._tenant_id($1)
$fn$;

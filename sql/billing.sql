-- Per-tenant billing through Stripe (docs/billing.md). The sidecar does the
-- talking to Stripe; the database keeps what it needs to do so exactly once:
-- which customer and subscription belong to which tenant, how far the usage
-- ledger has been metered, which entries Stripe refused, and which webhook
-- events were already applied. The sidecar works through the functions below
-- (granted to levqor_sidecar, sql/grants.sql), never on tenants' rows.

-- One row per billed tenant (kind 'tenant'), kept after the tenant is purged
-- as its billing tombstone (so no reference to levqor.tenants).
CREATE TABLE levqor.tenant_billing (
    tenant_id           uuid PRIMARY KEY,
    slug                text NOT NULL,
    customer_id         text CONSTRAINT tenant_billing_customer_key UNIQUE,
    subscription_id     text CONSTRAINT tenant_billing_subscription_key UNIQUE,
    subscription_status text,
    -- The plan the subscription's items were last set for, and its items
    -- (price id -> subscription item id).
    plan                text,
    items               jsonb NOT NULL DEFAULT '{}' CONSTRAINT tenant_billing_items_object CHECK (jsonb_typeof(items) = 'object'),
    failed_payments     integer NOT NULL DEFAULT 0,
    -- The `created` time of the last subscription event applied: older ones
    -- arriving late are not applied over it.
    last_event_at       timestamptz,
    -- Bumped with every change asked of Stripe: part of its idempotency keys.
    version             integer NOT NULL DEFAULT 0,
    cancelled_at        timestamptz,
    last_sync           timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('levqor.tenant_billing', '');

-- Ledger entries Stripe would not take (a 400 for that entry, or older than
-- its 35-day window): set aside with Stripe's message, so that one bad entry
-- never holds the ledger up. `retry`: a levqor_admin asked to send it again.
CREATE TABLE levqor.billing_parked (
    ledger_id  bigint PRIMARY KEY,
    tenant_id  uuid NOT NULL,
    metric     text NOT NULL,
    quantity   bigint NOT NULL,
    reason     text NOT NULL,
    message    text,
    retry      boolean NOT NULL DEFAULT false,
    parked_at  timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('levqor.billing_parked', '');

-- Stripe webhook events already applied (or deliberately not): each event id
-- is processed once, however often Stripe delivers it.
CREATE TABLE levqor.stripe_events (
    id          text PRIMARY KEY,
    type        text NOT NULL,
    created     timestamptz NOT NULL,
    tenant_id   uuid,
    outcome     text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('levqor.stripe_events', '');

-- Wakes the sidecar's provisioning when a tenant is created, changes plan or
-- status. No payload: any session may LISTEN (docs/quotas.md, notifications).
CREATE FUNCTION levqor._billing_wake() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM pg_notify('levqor_billing', '');
    RETURN NULL;
END
$fn$;
CREATE TRIGGER levqor_billing_wake AFTER INSERT OR DELETE OR UPDATE OF plan, status ON levqor.tenants
    FOR EACH STATEMENT EXECUTE FUNCTION levqor._billing_wake();

-- What the sidecar must do in Stripe, oldest tenant first: create a
-- customer, create a subscription, move one to the tenant's current plan, or
-- cancel one (an offboarded or purged tenant).
CREATE FUNCTION levqor.billing_pending(max_tenants integer DEFAULT 100)
RETURNS TABLE (tenant_id uuid, slug text, plan text, action text, customer_id text, subscription_id text,
               billed_plan text, items jsonb, version integer)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT x.tenant_id, x.slug, x.plan, x.action, x.customer_id, x.subscription_id, x.billed_plan, x.items, x.version
      FROM (
        SELECT t.id AS tenant_id, t.slug, t.plan, b.customer_id, b.subscription_id, b.plan AS billed_plan,
               coalesce(b.items, '{}') AS items, coalesce(b.version, 0) AS version, t.created_at AS since,
               CASE WHEN t.status = 'offboarded' THEN
                         CASE WHEN b.subscription_id IS NOT NULL AND b.cancelled_at IS NULL THEN 'cancel' END
                    WHEN b.customer_id IS NULL THEN 'create_customer'
                    WHEN b.subscription_id IS NULL THEN 'create_subscription'
                    WHEN b.cancelled_at IS NULL AND b.plan IS DISTINCT FROM t.plan THEN 'change_plan'
               END AS action
          FROM levqor.tenants t LEFT JOIN levqor.tenant_billing b ON b.tenant_id = t.id
         WHERE t.kind = 'tenant'
        UNION ALL
        -- Purged: the tenant is gone, its subscription must go too.
        SELECT b.tenant_id, b.slug, NULL, b.customer_id, b.subscription_id, b.plan, b.items, b.version, b.created_at, 'cancel'
          FROM levqor.tenant_billing b
         WHERE b.subscription_id IS NOT NULL AND b.cancelled_at IS NULL
           AND NOT EXISTS (SELECT 1 FROM levqor.tenants t WHERE t.id = b.tenant_id)
      ) x
     WHERE x.action IS NOT NULL
     ORDER BY x.since, x.tenant_id
     LIMIT max_tenants
$fn$;

-- The sidecar records what Stripe answered. Each call is in the tenant's
-- audit trail; ids that do not look like Stripe's are refused.
CREATE FUNCTION levqor._billing_row(tenant uuid) RETURNS levqor.tenant_billing
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    b levqor.tenant_billing;
BEGIN
    INSERT INTO levqor.tenant_billing AS x (tenant_id, slug)
    SELECT t.id, t.slug FROM levqor.tenants t WHERE t.id = tenant
    ON CONFLICT (tenant_id) DO NOTHING;
    SELECT * INTO b FROM levqor.tenant_billing x WHERE x.tenant_id = tenant FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'tenant % is not billed', tenant USING ERRCODE = '42704';
    END IF;
    RETURN b;
END
$fn$;

CREATE FUNCTION levqor.billing_customer(tenant uuid, customer_id text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    b levqor.tenant_billing := levqor._billing_row(tenant);
BEGIN
    IF customer_id IS NULL OR customer_id !~ '^cus_[A-Za-z0-9]{1,250}$' THEN
        RAISE EXCEPTION 'not a Stripe customer id: %', coalesce(quote_literal(left(customer_id, 60)), 'NULL') USING ERRCODE = '22023';
    END IF;
    IF b.customer_id IS NOT DISTINCT FROM customer_id THEN
        RETURN;
    END IF;
    UPDATE levqor.tenant_billing x SET customer_id = customer_id, last_sync = now(), updated_at = now()
     WHERE x.tenant_id = tenant;
    PERFORM levqor._log_event(tenant, 'billing_customer_created', jsonb_build_object('customer_id', customer_id));
END
$fn$;

-- A subscription created, or moved to a plan (items: price id -> item id).
CREATE FUNCTION levqor.billing_subscription(tenant uuid, subscription_id text, status text, plan text, items jsonb)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    b levqor.tenant_billing := levqor._billing_row(tenant);
BEGIN
    IF subscription_id IS NULL OR subscription_id !~ '^sub_[A-Za-z0-9]{1,250}$' THEN
        RAISE EXCEPTION 'not a Stripe subscription id: %', coalesce(quote_literal(left(subscription_id, 60)), 'NULL') USING ERRCODE = '22023';
    END IF;
    IF jsonb_typeof(items) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'items must be a JSON object of price id -> subscription item id' USING ERRCODE = '22023';
    END IF;
    UPDATE levqor.tenant_billing x
       SET subscription_id = subscription_id, subscription_status = status, plan = plan, items = items,
           version = x.version + 1, last_sync = now(), updated_at = now()
     WHERE x.tenant_id = tenant;
    PERFORM levqor._log_event(tenant, CASE WHEN b.subscription_id IS NULL THEN 'billing_subscription_created'
                                           ELSE 'billing_subscription_changed' END,
        jsonb_build_object('subscription_id', subscription_id, 'plan', plan, 'from_plan', b.plan, 'status', status));
END
$fn$;

CREATE FUNCTION levqor.billing_cancelled(tenant uuid, status text DEFAULT 'canceled') RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
BEGIN
    UPDATE levqor.tenant_billing x SET cancelled_at = coalesce(x.cancelled_at, now()), subscription_status = status,
           version = x.version + 1, last_sync = now(), updated_at = now()
     WHERE x.tenant_id = tenant;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'tenant % is not billed', tenant USING ERRCODE = '42704';
    END IF;
    PERFORM levqor._log_event(tenant, 'billing_subscription_cancelled', jsonb_build_object('status', status));
END
$fn$;

-- Ledger entries the meter has not taken yet, oldest first: after the
-- consumer's cursor (but not parked), and parked ones an admin asked to retry.
-- An organization's usage is billed to the tenant above it. customer_id
-- NULL: that tenant has no Stripe customer yet (the meter waits for it);
-- billable false: nobody will ever be billed for it (a platform's usage, or
-- a purged tenant's that never had a customer).
CREATE FUNCTION levqor.billing_ledger(consumer text, max_entries integer DEFAULT 1000)
RETURNS TABLE (id bigint, tenant_id uuid, slug text, metric text, quantity bigint, period_end timestamptz,
               customer_id text, billable boolean, retry boolean)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $fn$
#variable_conflict use_variable
DECLARE
    pos bigint;
BEGIN
    IF max_entries IS NULL OR max_entries < 1 THEN
        RAISE EXCEPTION 'max_entries must be at least 1' USING ERRCODE = '22023';
    END IF;
    INSERT INTO levqor.ledger_cursors AS c (consumer) VALUES (consumer) ON CONFLICT DO NOTHING;
    SELECT c.position INTO pos FROM levqor.ledger_cursors c WHERE c.consumer = consumer;
    RETURN QUERY
    WITH todo AS (
        SELECT l.*, false AS retry FROM levqor.usage_ledger l
         WHERE l.id > pos AND NOT EXISTS (SELECT 1 FROM levqor.billing_parked p WHERE p.ledger_id = l.id)
         ORDER BY l.id LIMIT max_entries
    ), again AS (
        SELECT l.*, true AS retry FROM levqor.billing_parked p JOIN levqor.usage_ledger l ON l.id = p.ledger_id
         WHERE p.retry ORDER BY l.id LIMIT max_entries
    )
    SELECT l.id, l.tenant_id, coalesce(t.slug, b.slug), l.metric, l.quantity, l.period_end,
           coalesce(b.customer_id, ab.customer_id), (b.tenant_id IS NOT NULL OR a.id IS NOT NULL), l.retry
      FROM (SELECT * FROM todo UNION ALL SELECT * FROM again) l
      LEFT JOIN levqor.tenants t ON t.id = l.tenant_id
      LEFT JOIN levqor.tenant_billing b ON b.tenant_id = l.tenant_id
      -- The tenant above an organization, looked up only for entries whose
      -- own tenant is not billed (index lookups whatever the statistics).
      LEFT JOIN LATERAL (SELECT c.ancestor AS id FROM levqor.tenant_tree c
                          WHERE b.tenant_id IS NULL AND c.descendant = l.tenant_id
                            AND (SELECT x.kind FROM levqor.tenants x WHERE x.id = c.ancestor) = 'tenant'
                          ORDER BY c.depth LIMIT 1) a ON true
      LEFT JOIN levqor.tenant_billing ab ON ab.tenant_id = a.id
     ORDER BY l.retry, l.id;
END
$fn$;

-- Set an entry aside (Stripe refused it); the cursor may then move past it.
CREATE FUNCTION levqor.billing_park(ledger_id bigint, reason text, message text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    l levqor.usage_ledger;
BEGIN
    SELECT * INTO l FROM levqor.usage_ledger x WHERE x.id = ledger_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no ledger entry %', ledger_id USING ERRCODE = '42704';
    END IF;
    INSERT INTO levqor.billing_parked AS p (ledger_id, tenant_id, metric, quantity, reason, message)
    VALUES (l.id, l.tenant_id, l.metric, l.quantity, reason, left(message, 2000))
    ON CONFLICT ON CONSTRAINT billing_parked_pkey DO UPDATE
       SET reason = EXCLUDED.reason, message = EXCLUDED.message, retry = false, parked_at = now();
    PERFORM levqor._log_event(l.tenant_id, 'billing_entry_parked',
        jsonb_build_object('ledger_id', l.id, 'metric', l.metric, 'quantity', l.quantity, 'reason', reason, 'message', left(message, 500)));
END
$fn$;

-- A parked entry Stripe finally took (after a retry).
CREATE FUNCTION levqor.billing_unparked(ledger_id bigint) RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    DELETE FROM levqor.billing_parked p WHERE p.ledger_id = $1;
$fn$;

-- A levqor_admin asks for a parked entry to be sent again (after fixing what
-- Stripe refused, say a meter that did not exist yet).
CREATE FUNCTION levqor.billing_retry(ledger_id bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
BEGIN
    UPDATE levqor.billing_parked p SET retry = true WHERE p.ledger_id = ledger_id;
    RETURN FOUND;
END
$fn$;

-- A Stripe webhook event, already verified and parsed by the sidecar, applied
-- in one transaction: once per event id; subscription events older than the
-- last one applied are not applied over it; changes go through the lifecycle
-- functions, so each is in the tenant's audit trail. `plan`: the levqor plan
-- the subscription's prices map to (NULL: none does). Returns the outcome.
CREATE FUNCTION levqor.billing_webhook(event_id text, event_type text, created timestamptz, customer_id text,
                                       plan text DEFAULT NULL, subscription_status text DEFAULT NULL,
                                       force_plan_change boolean DEFAULT false, suspend_after integer DEFAULT 1)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    b       levqor.tenant_billing;
    t       levqor.tenants;
    outcome text;
BEGIN
    IF event_id IS NULL OR event_id !~ '^evt_[A-Za-z0-9_]{1,250}$' THEN
        RAISE EXCEPTION 'not a Stripe event id: %', coalesce(quote_literal(left(event_id, 60)), 'NULL') USING ERRCODE = '22023';
    END IF;
    IF EXISTS (SELECT 1 FROM levqor.stripe_events e WHERE e.id = event_id) THEN
        RETURN 'duplicate';
    END IF;
    SELECT * INTO b FROM levqor.tenant_billing x WHERE x.customer_id = billing_webhook.customer_id FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'unknown customer';
    ELSE
        SELECT * INTO t FROM levqor.tenants x WHERE x.id = b.tenant_id FOR UPDATE;
        IF NOT FOUND THEN
            outcome := 'tenant purged';
        ELSIF event_type IN ('customer.subscription.updated', 'customer.subscription.deleted')
              AND b.last_event_at IS NOT NULL AND created < b.last_event_at THEN
            outcome := 'stale';
        ELSIF event_type = 'customer.subscription.updated' THEN
            UPDATE levqor.tenant_billing x SET last_event_at = created, subscription_status = coalesce(billing_webhook.subscription_status, x.subscription_status),
                   updated_at = now() WHERE x.tenant_id = b.tenant_id;
            IF plan IS NULL THEN
                outcome := 'no plan for these prices';
            ELSIF plan = t.plan OR t.status = 'offboarded' THEN
                outcome := 'unchanged';
            ELSE
                BEGIN
                    PERFORM levqor.change_plan(t.id::text, plan, force_plan_change);
                    -- The subscription already has this plan's prices.
                    UPDATE levqor.tenant_billing x SET plan = billing_webhook.plan WHERE x.tenant_id = b.tenant_id;
                    outcome := 'plan changed';
                EXCEPTION WHEN check_violation THEN
                    outcome := 'plan change refused: ' || SQLERRM;
                END;
            END IF;
        ELSIF event_type = 'customer.subscription.deleted' THEN
            UPDATE levqor.tenant_billing x SET last_event_at = created, subscription_status = 'canceled',
                   cancelled_at = coalesce(x.cancelled_at, now()), updated_at = now() WHERE x.tenant_id = b.tenant_id;
            IF t.status IN ('active', 'trial') THEN
                PERFORM levqor.suspend_tenant(t.id::text, 'subscription_deleted', 'read_only');
                outcome := 'suspended';
            ELSE
                outcome := 'unchanged';
            END IF;
        ELSIF event_type = 'invoice.payment_failed' THEN
            UPDATE levqor.tenant_billing x SET failed_payments = x.failed_payments + 1, updated_at = now()
             WHERE x.tenant_id = b.tenant_id RETURNING * INTO b;
            IF b.failed_payments >= greatest(suspend_after, 1) AND t.status IN ('active', 'trial') THEN
                PERFORM levqor.suspend_tenant(t.id::text, 'payment_failed', 'read_only');
                outcome := 'suspended';
            ELSE
                outcome := format('payment failure %s of %s', b.failed_payments, greatest(suspend_after, 1));
            END IF;
        ELSIF event_type = 'invoice.paid' THEN
            UPDATE levqor.tenant_billing x SET failed_payments = 0, updated_at = now() WHERE x.tenant_id = b.tenant_id;
            -- Only a tenant suspended for a failed payment: not one an
            -- operator suspended for another reason.
            IF t.status = 'suspended' AND t.suspension_reason = 'payment_failed' THEN
                PERFORM levqor.resume_tenant(t.id::text);
                outcome := 'resumed';
            ELSE
                outcome := 'unchanged';
            END IF;
        ELSE
            outcome := 'ignored';
        END IF;
    END IF;
    INSERT INTO levqor.stripe_events (id, type, created, tenant_id, outcome) VALUES (event_id, event_type, created, b.tenant_id, outcome);
    IF b.tenant_id IS NOT NULL AND outcome NOT IN ('ignored', 'duplicate') THEN
        PERFORM levqor._log_event(b.tenant_id, 'billing_webhook',
            jsonb_build_object('event_id', event_id, 'type', event_type, 'outcome', outcome));
    END IF;
    RETURN outcome;
END
$fn$;

-- Ledger totals per billed tenant and metric for [since, until) by the time
-- each entry is metered at (its period_end, to the second), split by where
-- each entry is: sent (at or behind the cursor), pending (after it) or
-- parked. An organization's usage counts for the tenant above it, whose
-- customer Stripe bills (as billing_ledger sends it); usage nobody is billed
-- for (a platform's) is left out.
CREATE FUNCTION levqor.billing_totals(consumer text, since timestamptz, until timestamptz)
RETURNS TABLE (tenant_id uuid, slug text, customer_id text, metric text, sent numeric, pending numeric, parked numeric)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $fn$
    WITH entries AS (
        SELECT l.id, l.metric, l.quantity, p.ledger_id IS NOT NULL AS is_parked, coalesce(b.tenant_id, a.id) AS billed
          FROM levqor.usage_ledger l
          LEFT JOIN levqor.billing_parked p ON p.ledger_id = l.id
          LEFT JOIN levqor.tenant_billing b ON b.tenant_id = l.tenant_id
          LEFT JOIN LATERAL (SELECT c.ancestor AS id FROM levqor.tenant_tree c
                              WHERE b.tenant_id IS NULL AND c.descendant = l.tenant_id
                                AND (SELECT x.kind FROM levqor.tenants x WHERE x.id = c.ancestor) = 'tenant'
                              ORDER BY c.depth LIMIT 1) a ON true
         WHERE date_trunc('second', l.period_end) >= $2 AND date_trunc('second', l.period_end) < $3
    )
    SELECT e.billed, coalesce(b.slug, t.slug), b.customer_id, e.metric,
           coalesce(sum(e.quantity) FILTER (WHERE NOT e.is_parked AND e.id <= coalesce(c.position, 0)), 0),
           coalesce(sum(e.quantity) FILTER (WHERE NOT e.is_parked AND e.id > coalesce(c.position, 0)), 0),
           coalesce(sum(e.quantity) FILTER (WHERE e.is_parked), 0)
      FROM entries e
      LEFT JOIN levqor.ledger_cursors c ON c.consumer = $1
      LEFT JOIN levqor.tenant_billing b ON b.tenant_id = e.billed
      LEFT JOIN levqor.tenants t ON t.id = e.billed
     WHERE e.billed IS NOT NULL
     GROUP BY 1, 2, 3, 4
     ORDER BY 2, 4
$fn$;

-- How far a consumer is behind the ledger: entries after its cursor and the
-- age of the oldest of them, in seconds (the sidecar's lag metrics).
CREATE FUNCTION levqor.ledger_lag(consumer text)
RETURNS TABLE (entries bigint, seconds double precision)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT count(*), coalesce(extract(epoch FROM now() - min(l.recorded_at)), 0)::double precision
      FROM levqor.usage_ledger l
     WHERE l.id > coalesce((SELECT c.position FROM levqor.ledger_cursors c WHERE c.consumer = $1), 0)
$fn$;

-- Numbers for the sidecar's /metrics: every tenant's status and plan, and
-- its usage against its limits (what levqor.usage shows a levqor_admin).
CREATE FUNCTION levqor.sidecar_tenant_metrics()
RETURNS TABLE (slug text, status text, plan text, metric text, used bigint, quota bigint, percent numeric)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT t.slug, t.status, t.plan, u.metric, u.used, u."limit", u.percent
      FROM levqor.tenants t LEFT JOIN levqor.usage u ON u.tenant_id = t.id
     ORDER BY t.slug, u.metric
$fn$;

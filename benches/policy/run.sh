#!/usr/bin/env bash
# The policy engine's cost: levqor.authorize() per call, against the plain
# boolean column check an application would otherwise write
# (SELECT templates_enabled FROM tenant_flags WHERE tenant_id = …), both
# in-server in one loop, as the application role with a tenant context.
# Usage: benches/policy/run.sh [calls, default 20000]
set -euo pipefail
cd "$(dirname "$0")/../.."
CALLS=${1:-20000}
PORT=${LEVQOR_BENCH_PORT:-28823}
. benches/common.sh

start_bench_cluster bench-policy "$PORT"
sql() { scripts/cluster.sh psql bench-policy -v ON_ERROR_STOP=1 -qAt "$@"; }
sql -c "CREATE DATABASE bench" >/dev/null
sql -d bench >/dev/null <<'SQL'
CREATE EXTENSION levqor;
CREATE ROLE bench_app LOGIN IN ROLE levqor_app, levqor_context_admin;
SELECT levqor.create_tenant('acme', 'Acme', plan => 'starter');
CREATE TABLE tenant_flags (tenant_id uuid PRIMARY KEY, templates_enabled boolean NOT NULL);
INSERT INTO tenant_flags SELECT id, true FROM levqor.tenants WHERE slug = 'acme';
GRANT SELECT ON tenant_flags TO bench_app;
SQL
result=$("$BIN/psql" -X -h 127.0.0.1 -p "$PORT" -U bench_app -d bench -v ON_ERROR_STOP=1 -qAt <<SQL
BEGIN;
SELECT levqor.set_tenant('acme', member_role => 'operator') IS NOT NULL;
CREATE FUNCTION pg_temp.us(q text, n int) RETURNS numeric LANGUAGE plpgsql AS \$\$
DECLARE t0 timestamptz; ok boolean;
BEGIN
    EXECUTE q INTO ok;  -- warm-up, and the plan is cached below
    t0 := clock_timestamp();
    FOR i IN 1 .. n LOOP
        EXECUTE q INTO ok;
    END LOOP;
    RETURN round(extract(epoch FROM clock_timestamp() - t0) * 1000000 / n, 2);
END \$\$;
SELECT pg_temp.us('SELECT true', $CALLS);
SELECT pg_temp.us('SELECT templates_enabled FROM tenant_flags WHERE tenant_id = levqor.current_tenant()', $CALLS);
SELECT pg_temp.us('SELECT levqor.authorize(''templates:use'')', $CALLS);
SELECT pg_temp.us('SELECT levqor.authorize(''marketplace:buy'')', $CALLS);
SELECT levqor.authorize('templates:use'), levqor.authorize('marketplace:buy');
COMMIT;
SQL
)
read -r _ base flag allow deny decisions <<<"$(tr '\n' ' ' <<<"$result")"
printf '\nresults (%s calls each, microseconds per call, in-server; "SELECT true" is the loop itself: %s us)\n' "$CALLS" "$base"
net() { awk -v x="$1" -v b="$base" 'BEGIN { printf "%.2f", x - b }'; }
printf '  boolean column check       %6s us  (%s net)\n' "$flag" "$(net "$flag")"
printf '  authorize(), allowed       %6s us  (%s net)  %.0f calls/s\n' "$allow" "$(net "$allow")" "$(awk -v x="$allow" -v b="$base" 'BEGIN { print 1000000 / (x - b) }')"
printf '  authorize(), denied        %6s us  (%s net; recorded once per transaction)\n' "$deny" "$(net "$deny")"
printf '  authorize() / column check = %.1fx (net)\n' "$(awk -v a="$allow" -v f="$flag" -v b="$base" 'BEGIN { print (a - b) / (f - b) }')"
printf '  decisions (allowed, denied): %s\n' "$decisions"

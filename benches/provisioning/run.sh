#!/usr/bin/env bash
# Provisioning at scale: N shared tenants and M schema tenants (10-table
# template), time per tenant of each kind, the catalog's size, and the time
# for migrate_in_batches() to add a column in every schema tenant.
# Usage: benches/provisioning/run.sh [shared, default 10000] [schema, default 2000]
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${1:-10000}
SCHEMA=${2:-2000}
PORT=${LEVQOR_BENCH_PORT:-28818}
HERE=benches/provisioning
. benches/common.sh

start_bench_cluster provisioning "$PORT"
psql() { scripts/cluster.sh psql provisioning -d bench -v ON_ERROR_STOP=1 -qAt "$@"; }
scripts/cluster.sh psql provisioning -c "CREATE DATABASE bench" >/dev/null
psql -c "CREATE EXTENSION levqor" 2>/dev/null
psql -f "$HERE/template.sql"

catalog() { psql -c "SELECT (SELECT count(*) FROM pg_class) || ' relations, database ' || pg_size_pretty(pg_database_size(current_database()))"; }
echo "before: $(catalog)"

t0=$(date +%s.%N)
psql -c "SELECT count(*) FROM generate_series(1, $SHARED) g, LATERAL levqor.create_tenant('shared-' || g, 'Shared ' || g) c" >/dev/null
t1=$(date +%s.%N)
echo "$SHARED shared tenants: $(awk -v a="$t0" -v b="$t1" -v n="$SHARED" 'BEGIN { printf "%.1f s, %.3f ms per tenant", b - a, (b - a) * 1000 / n }')"

# One statement (and transaction) per schema tenant, as provisioning does.
t0=$(date +%s.%N)
psql -c "SELECT format('SELECT 1 FROM levqor.create_tenant(%L, %L, isolation => %L);', 'schema-' || g, 'Schema ' || g, 'schema')
           FROM generate_series(1, $SCHEMA) g" | psql >/dev/null
t1=$(date +%s.%N)
echo "$SCHEMA schema tenants (10 tables each): $(awk -v a="$t0" -v b="$t1" -v n="$SCHEMA" 'BEGIN { printf "%.1f s, %.1f ms per tenant", b - a, (b - a) * 1000 / n }')"
echo "after: $(catalog)"

t0=$(date +%s.%N)
psql -c "CALL levqor.migrate_in_batches('bench-add-column', 'ALTER TABLE tasks ADD COLUMN due date', batch => 200)" 2>/dev/null
t1=$(date +%s.%N)
done=$(psql -c "SELECT count(*) FROM levqor.migrations WHERE name = 'bench-add-column' AND status = 'done'")
echo "migrate (add a column) across $done schemas: $(awk -v a="$t0" -v b="$t1" -v n="$done" 'BEGIN { printf "%.1f s, %.2f ms per schema", b - a, (b - a) * 1000 / n }')"

#!/usr/bin/env bash
# Backup and restore of one tenant, levqor against pg_dump/pg_restore of the
# whole tables, on the bench cluster started by benches/sidecar/run.sh.
#   benches/sidecar/backup.sh PORT [rows per tenant, default 1000000]
set -euo pipefail
cd "$(dirname "$0")/../.."
PORT=${1:?port}
ROWS=${2:-1000000}
HALF=$((ROWS / 2))
BIN=/usr/lib/postgresql/15/bin
SIDECAR=target/release/levqor-sidecar
work=$(mktemp -d /tmp/levqor-bench-backup.XXXXXX)
trap 'rm -rf "$work"' EXIT
sql() { PGOPTIONS='-c client_min_messages=warning' "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres "$@"; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
size() { du -m "$1" | cut -f1; }
fresh() {  # a database with levqor, as a restore target
  sql -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" -c "CREATE DATABASE $1" >/dev/null
  sql -d "$1" -c "SET client_min_messages = error" -c "CREATE EXTENSION levqor" -c "GRANT CREATE ON SCHEMA public TO bench_backup" -c "GRANT CREATE ON DATABASE $1 TO bench_backup" >/dev/null
}

echo "loading: 3 shared tenants x $ROWS rows (orders + events), a schema tenant of $ROWS rows…"
sql -c "DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'bench_backup') THEN CREATE ROLE bench_backup LOGIN; END IF; END \$\$" >/dev/null
fresh bench_backup
sql -c "GRANT levqor_backup TO bench_backup" >/dev/null
sql -d bench_backup >/dev/null <<SQL
CREATE TABLE orders (id bigserial PRIMARY KEY, tenant_id uuid NOT NULL, customer text NOT NULL, total numeric(12,2) NOT NULL,
                     status text NOT NULL, created_at timestamptz NOT NULL);
CREATE TABLE events (id bigserial PRIMARY KEY, tenant_id uuid NOT NULL, kind text NOT NULL, payload jsonb, at timestamptz NOT NULL);
CREATE INDEX ON orders (tenant_id, created_at);
CREATE INDEX ON events (tenant_id, at);
SELECT levqor.enable_tenancy('orders');
SELECT levqor.enable_tenancy('events');
CREATE TABLE levqor_template.orders (id bigserial PRIMARY KEY, customer text NOT NULL, total numeric(12,2) NOT NULL,
                                     status text NOT NULL, created_at timestamptz NOT NULL);
CREATE TABLE levqor_template.events (id bigserial PRIMARY KEY, kind text NOT NULL, payload jsonb, at timestamptz NOT NULL);
SELECT levqor.create_tenant(s, s, 'enterprise') FROM (VALUES ('big-a'), ('big-b'), ('big-c')) v(s);
SELECT levqor.create_tenant('schema-s', 'schema-s', 'enterprise', isolation => 'schema');
INSERT INTO orders (tenant_id, customer, total, status, created_at)
SELECT t.id, 'customer ' || (i % 5000), (i % 100000) / 100.0, (ARRAY['open','paid','shipped'])[1 + i % 3], now() - i * interval '1 second'
  FROM levqor.tenants t, generate_series(1, $HALF) i WHERE t.slug LIKE 'big-%';
INSERT INTO events (tenant_id, kind, payload, at)
SELECT t.id, 'page_view', jsonb_build_object('path', '/p/' || (i % 777), 'ms', i % 997), now() - i * interval '1 second'
  FROM levqor.tenants t, generate_series(1, $HALF) i WHERE t.slug LIKE 'big-%';
INSERT INTO tenant_schema_s.orders (customer, total, status, created_at)
SELECT 'customer ' || (i % 5000), (i % 100000) / 100.0, 'paid', now() - i * interval '1 second' FROM generate_series(1, $HALF) i;
INSERT INTO tenant_schema_s.events (kind, payload, at)
SELECT 'page_view', jsonb_build_object('path', '/p/' || (i % 777)), now() - i * interval '1 second' FROM generate_series(1, $HALF) i;
VACUUM ANALYZE;
SQL
cat >"$work/sidecar.toml" <<TOML
[database]
url = "host=127.0.0.1 port=$PORT dbname=bench_backup user=bench_backup"
[backup]
dir = "$work/archives"
encryption_key_env = "LEVQOR_BACKUP_KEY"
TOML
export LEVQOR_SIDECAR_LOG=warn
export LEVQOR_BACKUP_KEY=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')

row() { printf '| %s | %s s | %s MiB | %s s |\n' "$1" "$2" "$3" "$4"; }
echo
echo "| what | backup | size | restore into a fresh database |"
echo "|---|---:|---:|---:|"
# The shared tenant: levqor.
t0=$(now); a=$($SIDECAR backup --config "$work/sidecar.toml" --tenant big-a | tail -1); t1=$(now)
fresh bench_restore_a
sed "s/dbname=bench_backup/dbname=bench_restore_a/" "$work/sidecar.toml" >"$work/restore.toml"
t2=$(now); $SIDECAR restore --config "$work/restore.toml" --tenant big-a --from "$a" >/dev/null; t3=$(now)
row "levqor, shared tenant big-a ($ROWS of $((3 * ROWS)) rows)" "$(secs "$t0" "$t1")" "$(size "$a")" "$(secs "$t2" "$t3")"
lb=$(secs "$t0" "$t1")
# What people do today: pg_dump of the whole tables, pg_restore.
t0=$(now); "$BIN/pg_dump" -h 127.0.0.1 -p "$PORT" -U postgres -Fc -t orders -t events -f "$work/tables.dump" bench_backup; t1=$(now)
fresh bench_restore_b
t2=$(now); "$BIN/pg_restore" -h 127.0.0.1 -p "$PORT" -U postgres -d bench_restore_b "$work/tables.dump" 2>/dev/null || true; t3=$(now)
row "pg_dump -Fc of the whole tables ($((3 * ROWS)) rows)" "$(secs "$t0" "$t1")" "$(size "$work/tables.dump")" "$(secs "$t2" "$t3")"
pb=$(secs "$t0" "$t1")
# The schema tenant.
t0=$(now); s=$($SIDECAR backup --config "$work/sidecar.toml" --tenant schema-s | tail -1); t1=$(now)
fresh bench_restore_c
sed "s/dbname=bench_backup/dbname=bench_restore_c/" "$work/sidecar.toml" >"$work/restore_c.toml"
t2=$(now); $SIDECAR restore --config "$work/restore_c.toml" --tenant schema-s --from "$s" >/dev/null; t3=$(now)
row "levqor, schema tenant schema-s ($ROWS rows)" "$(secs "$t0" "$t1")" "$(size "$s")" "$(secs "$t2" "$t3")"
t0=$(now); "$BIN/pg_dump" -h 127.0.0.1 -p "$PORT" -U postgres -Fc -n tenant_schema_s -f "$work/schema.dump" bench_backup; t1=$(now)
fresh bench_restore_d
t2=$(now); "$BIN/pg_restore" -h 127.0.0.1 -p "$PORT" -U postgres -d bench_restore_d "$work/schema.dump" 2>/dev/null || true; t3=$(now)
row "pg_dump -Fc -n of the tenant's schema ($ROWS rows)" "$(secs "$t0" "$t1")" "$(size "$work/schema.dump")" "$(secs "$t2" "$t3")"
echo
awk -v a="$lb" -v b="$pb" 'BEGIN { printf "shared tenant backup: levqor %.1f s vs pg_dump of the whole tables %.1f s (%.2fx; target: faster, each under 60 s)\n", a, b, b / a }'
for d in bench_restore_a bench_restore_b bench_restore_c bench_restore_d; do sql -c "DROP DATABASE $d WITH (FORCE)" >/dev/null; done

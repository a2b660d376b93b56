#!/usr/bin/env bash
# Audit cost, side by side in one run: single-row insert transactions at N
# clients (with fsync on, PostgreSQL's default, then off) and one bulk
# INSERT … SELECT of 100,000 rows (fsync off), for
#   none      no audit
#   plpgsql   the classic PL/pgSQL trigger writing to_jsonb(OLD/NEW) to a table
#   plpgsql_ix the same, its log indexed by (tenant_id, id) as levqor's is
#   classic   the same, its log indexed as the classic audit-trigger's is
#   levqor    levqor.enable_audit, with the sealing worker chaining as it runs
#   pgaudit   pgaudit's write logging (to the server log), as a reference
# then verify_audit over ENTRIES sealed entries.
# Usage: benches/audit/run.sh [seconds per run, default 15] [clients, default 2] [entries, default 1000000]
#        [single-row rounds, default 5]
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-15}
CLIENTS=${2:-2}
ENTRIES=${3:-1000000}
# Rounds of single-row samples per setting: each round runs every variant
# once, rotated. One 10 s sample on these VMs moves by up to ±30 %, so the
# median wants more than three.
ROUNDS=${4:-5}
PORT=${LEVQOR_BENCH_PORT:-28819}
HERE=benches/audit
. benches/common.sh

dpkg-query -W -f='${Status}' postgresql-15-pgaudit 2>/dev/null | grep -q "install ok installed" \
  || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15-pgaudit >/dev/null
start_bench_cluster audit "$PORT"
conf=/tmp/levqor-clusters/audit/data/postgresql.conf
{
  echo "shared_preload_libraries = 'levqor,pgaudit'"
  echo "levqor.audit_database = 'bench'"
  echo "levqor.audit_seal_interval = 200"
  echo "shared_buffers = '1GB'"
  echo "max_wal_size = '4GB'"
} | runuser -u postgres -- tee -a "$conf" >/dev/null
runuser -u postgres -- "$BIN/pg_ctl" -D /tmp/levqor-clusters/audit/data -w restart -l /tmp/levqor-clusters/audit/server.log >/dev/null
psql() { scripts/cluster.sh psql audit -v ON_ERROR_STOP=1 -qAt "$@"; }
psql -c "CREATE DATABASE bench" -c "CREATE DATABASE bench_pgaudit" >/dev/null
psql -d bench -f "$HERE/setup.sql"
psql -d bench_pgaudit -c "CREATE EXTENSION pgaudit" \
  -c "CREATE TABLE t_none (id bigserial PRIMARY KEY, body text NOT NULL, n int NOT NULL DEFAULT 0)" \
  -c "ALTER DATABASE bench_pgaudit SET pgaudit.log = 'write'" >/dev/null

tmp=$(mktemp -d)
for v in none plpgsql plpgsql_ix classic levqor; do echo "INSERT INTO t_$v (body) VALUES ('a fairly ordinary row of text');" >"$tmp/$v.sql"; done
echo "INSERT INTO t_none (body) VALUES ('a fairly ordinary row of text');" >"$tmp/pgaudit.sql"
run() {  # variant -> tps
  local db=bench; [ "$1" = pgaudit ] && db=bench_pgaudit
  "$BIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -n -M prepared -c "$CLIENTS" -j "$CLIENTS" -T "$SECS" \
    -f "$tmp/$1.sql" "$db" 2>&1 | sed -n 's/^tps = \([0-9.]*\).*/\1/p'
}
median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{ x[NR] = $1 } END { print (NR % 2) ? x[(NR + 1) / 2] : (x[NR / 2] + x[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v x="$1" -v y="$2" 'BEGIN { print x / y }'; }

VARIANTS=(none plpgsql plpgsql_ix classic levqor pgaudit)
NV=${#VARIANTS[@]}
declare -A tps bulk
# Single rows twice: with PostgreSQL's default durability (fsync on, each
# commit waits for its WAL flush: what an audited application sees) and with
# fsync off (the throwaway cluster's setting), where the CPU cost of
# auditing is all there is to measure. The targets are read with fsync on;
# the CPU-bound ratios are reported beside them.
setfsync() { psql -c "ALTER SYSTEM SET fsync = $1" >/dev/null; psql -c "SELECT pg_reload_conf()" >/dev/null; sleep 1; }
for fs in on off; do
  setfsync "$fs"
  echo "single-row insert transactions, fsync $fs, $CLIENTS clients, $ROUNDS rotated rounds of ${SECS}s…"
  for ((r = 0; r < ROUNDS; r++)); do
    for ((i = 0; i < NV; i++)); do
      v=${VARIANTS[$(((i + r) % NV))]}
      t=$(run "$v"); echo "  $v: $t tps"; tps[$fs,$v]="${tps[$fs,$v]:-} $t"
    done
  done
done
echo "bulk: INSERT … SELECT of 100,000 rows, 3 rounds…"
for r in 0 1 2; do
  for v in "${VARIANTS[@]}"; do
    db=bench; tbl=t_$v; [ "$v" = pgaudit ] && { db=bench_pgaudit; tbl=t_none; }
    ms=$(psql -d "$db" -c "SELECT extract(epoch FROM clock_timestamp()) * 1000" \
             -c "INSERT INTO $tbl (body, n) SELECT 'bulk row ' || g, g FROM generate_series(1, 100000) g" \
             -c "SELECT extract(epoch FROM clock_timestamp()) * 1000" | awk 'NR == 1 { a = $1 } END { printf "%.0f", $1 - a }')
    echo "  $v: $ms ms"; bulk[$v]="${bulk[$v]:-} $ms"
  done
done

echo "verify_audit over $ENTRIES entries…"
have=$(psql -d bench -c "SELECT count(*) FROM levqor.audit_log")
if [ "$have" -lt "$ENTRIES" ]; then
  psql -d bench -c "INSERT INTO t_levqor (body, n) SELECT 'verify row ' || g, g FROM generate_series(1, $ENTRIES - $have) g" >/dev/null
fi
# The worker may hold the sealing lock; wait until everything is sealed.
until [ "$(psql -d bench -c "SELECT count(*) FROM levqor.audit_trail WHERE seq IS NULL")" = 0 ]; do
  psql -d bench -c "SELECT levqor.seal_audit(100000000)" >/dev/null; sleep 1
done
verify=$(psql -d bench -c "SELECT extract(epoch FROM clock_timestamp())" -c "SELECT checked FROM levqor.verify_audit()" \
                       -c "SELECT extract(epoch FROM clock_timestamp())" | awk 'NR == 1 { a = $1 } NR == 2 { n = $1 } END { printf "%d %.1f", n, $1 - a }')
read -r vn vs <<<"$verify"

printf '\nresults (medians: %s single-row rounds, 3 bulk)\n' "$ROUNDS"
for fs in on off; do
  n=$(median "${tps[$fs,none]}"); p=$(median "${tps[$fs,plpgsql]}"); px=$(median "${tps[$fs,plpgsql_ix]}")
  c=$(median "${tps[$fs,classic]}"); l=$(median "${tps[$fs,levqor]}"); g=$(median "${tps[$fs,pgaudit]}")
  printf '  single-row inserts, fsync %s: none %s, plpgsql %s, plpgsql_ix %s, classic %s, levqor %s, pgaudit %s tps\n' \
    "$fs" "$n" "$p" "$px" "$c" "$l" "$g"
  # The targets are read with PostgreSQL's default durability: what an
  # audited application runs (benches/README.md, "How the targets are read").
  if [ "$fs" = on ]; then t1=' (target >= 1.0)'; t7=' (target >= 0.7)'; else t1=''; t7=' (CPU-bound, reported)'; fi
  printf '    levqor / plpgsql = %.3f%s, levqor / none = %.3f%s\n' \
    "$(ratio "$l" "$p")" "$t1" "$(ratio "$l" "$n")" "$t7"
  printf '    levqor / plpgsql_ix = %.3f (like for like: both logs indexed by tenant), levqor / classic = %.3f\n' \
    "$(ratio "$l" "$px")" "$(ratio "$l" "$c")"
  printf '    plpgsql / none = %.3f, classic / none = %.3f\n' "$(ratio "$p" "$n")" "$(ratio "$c" "$n")"
done
bn=$(median "${bulk[none]}"); bp=$(median "${bulk[plpgsql]}"); bpx=$(median "${bulk[plpgsql_ix]}")
bc=$(median "${bulk[classic]}"); bl=$(median "${bulk[levqor]}"); bg=$(median "${bulk[pgaudit]}")
printf '  bulk 100,000 rows: none %s, plpgsql %s, plpgsql_ix %s, classic %s, levqor %s, pgaudit %s ms\n' \
  "$bn" "$bp" "$bpx" "$bc" "$bl" "$bg"
printf '    levqor / plpgsql time = %.3f, levqor / classic time = %.3f, levqor / none time = %.3f\n' \
  "$(ratio "$bl" "$bp")" "$(ratio "$bl" "$bc")" "$(ratio "$bl" "$bn")"
printf '  verify_audit: %s entries in %s s = %.0f entries/s\n' "$vn" "$vs" "$(awk -v n="$vn" -v s="$vs" 'BEGIN { print n / s }')"

#!/usr/bin/env bash
# levqor on Citus against hand-written tenant routing, one run, same rows:
#   (a) no RLS: the application resolves the tenant from its key and adds
#       WHERE tenant_id = $1 (what activerecord-multi-tenant and
#       django-multitenant generate);
#   (b) levqor: authenticate() per transaction, a table protected and
#       distributed with levqor.distribute, no tenant in the SQL.
# Read transactions (point read + top-10 list) and write transactions (one
# UPDATE), through the coordinator of a coordinator and two workers on this
# machine. Needs Citus installed (docs/citus.md); it is not built here.
# Usage: benches/citus/run.sh [seconds per run, default 15] [clients, default 4]
# LEVQOR_BENCH_ROUNDS (default 3) rounds, each in a rotated order.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-15}
CLIENTS=${2:-4}
BASE=${LEVQOR_BENCH_PORT:-28840}
HERE=benches/citus
BIN=/usr/lib/postgresql/15/bin
if [ ! -f "$("$BIN/pg_config" --pkglibdir)/citus.so" ]; then
  echo "Citus is not installed: nothing to measure (docs/citus.md)" >&2
  exit 2
fi
scripts/bootstrap.sh >/dev/null
echo "building levqor (release) and installing…"
cargo pgrx install --release --pg-config "$BIN/pg_config" >/dev/null 2>&1
trap 'for n in 0 1 2; do scripts/cluster.sh stop citus$n-bench; done' EXIT
for n in 0 1 2; do
  scripts/cluster.sh start "citus$n-bench" $((BASE + n)) citus >/dev/null
  echo "shared_buffers = '512MB'" >> "/tmp/levqor-clusters/citus$n-bench/data/postgresql.conf"
  runuser -u postgres -- "$BIN/pg_ctl" -D "/tmp/levqor-clusters/citus$n-bench/data" -w restart -l "/tmp/levqor-clusters/citus$n-bench/server.log" >/dev/null
done
psql_on() { "$BIN/psql" -X -q -h 127.0.0.1 -p "$1" -U postgres -d postgres -v ON_ERROR_STOP=1 "${@:2}"; }
for n in 1 2 0; do psql_on $((BASE + n)) -c "CREATE EXTENSION citus"; done
psql_on "$BASE" -c "SELECT citus_set_coordinator_host('127.0.0.1', $BASE)" \
  -c "SELECT citus_add_node('127.0.0.1', $((BASE + 1)))" -c "SELECT citus_add_node('127.0.0.1', $((BASE + 2)))" \
  -c "SET client_min_messages = error" -c "CREATE EXTENSION levqor" >/dev/null
echo "loading 200 tenants x 500 rows into two distributed tables…"
psql_on "$BASE" -f "$HERE/setup.sql"

run() {  # script mode -> tps
  "$BIN/pgbench" -h 127.0.0.1 -p "$BASE" -U bench_app -n -M "$2" -c "$CLIENTS" -j 2 \
    -T "$SECS" -f "$HERE/$1.sql" postgres 2>&1 | sed -n 's/^tps = \([0-9.]*\).*/\1/p'
}
stats() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{ x[NR] = $1 } END { m = (NR % 2) ? x[(NR + 1) / 2] : (x[NR / 2] + x[NR / 2 + 1]) / 2; printf "%.1f %.1f %.1f", m, x[1], x[NR] }'; }

# One task per query, for the record (as the application role: a superuser
# bypasses row level security and so every policy).
key=$(psql_on "$BASE" -At -c "SELECT api_key FROM bench_keys WHERE n = 1")
tasks=$("$BIN/psql" -X -q -h 127.0.0.1 -p "$BASE" -U bench_app -d postgres -At <<SQL
BEGIN;
SELECT levqor.authenticate('$key') IS NULL AS ignored \gset
EXPLAIN (COSTS OFF) SELECT body FROM items_levqor WHERE id = 1;
COMMIT;
SQL
)
echo "levqor plan: $(grep -o 'Task Count: [0-9]*' <<<"$tasks")"

VARIANTS=(a_read_plain b_read_levqor c_write_plain d_write_levqor)
ROUNDS=${LEVQOR_BENCH_ROUNDS:-3}
declare -A samples
for mode in prepared extended; do
  echo "warming up ($mode, 5 s each, not counted)…"
  for v in "${VARIANTS[@]}"; do S=$SECS; SECS=5; run "$v" "$mode" >/dev/null; SECS=$S; done
  for ((r = 0; r < ROUNDS; r++)); do
    for ((i = 0; i < ${#VARIANTS[@]}; i++)); do
      v=${VARIANTS[$(((i + r) % ${#VARIANTS[@]}))]}
      t=$(run "$v" "$mode")
      echo "  $mode round $((r + 1)) $v: $t tps"
      samples[$mode.$v]="${samples[$mode.$v]:-} $t"
    done
  done
done

printf '\nresults (%s clients, %s rounds of %ss, median [min-max])\n' "$CLIENTS" "$ROUNDS" "$SECS"
for mode in prepared extended; do
  read -r ra ramin ramax <<<"$(stats "${samples[$mode.a_read_plain]}")"
  read -r rb rbmin rbmax <<<"$(stats "${samples[$mode.b_read_levqor]}")"
  read -r wa wamin wamax <<<"$(stats "${samples[$mode.c_write_plain]}")"
  read -r wb wbmin wbmax <<<"$(stats "${samples[$mode.d_write_levqor]}")"
  printf ' pgbench -M %s\n' "$mode"
  printf '  read,  hand-written WHERE tenant_id  %8.1f tps [%s-%s]\n' "$ra" "$ramin" "$ramax"
  printf '  read,  levqor                        %8.1f tps [%s-%s]   ratio %.3f (target >= 0.9)\n' "$rb" "$rbmin" "$rbmax" "$(awk -v x="$rb" -v y="$ra" 'BEGIN { print x / y }')"
  printf '  write, hand-written WHERE tenant_id  %8.1f tps [%s-%s]\n' "$wa" "$wamin" "$wamax"
  printf '  write, levqor                        %8.1f tps [%s-%s]   ratio %.3f (target >= 0.9)\n' "$wb" "$wbmin" "$wbmax" "$(awk -v x="$wb" -v y="$wa" 'BEGIN { print x / y }')"
done

#!/usr/bin/env bash
# Quotas side by side, one run, one tenant hammered by every client:
#   consume()  levqor's counter in shared memory
#   hotrow     UPDATE counters SET used = used + 1 ... RETURNING (one row per tenant)
# each per transaction after the same context statement (authenticate), at 2
# and 8 clients, with production durability (fsync on) and, for reference,
# fsync off. Totals are checked exactly after every run (ledger or counter row
# against pgbench's count of transactions).
# Then the cost of a row limit: INSERT into a table under limit_rows vs an
# identical unlimited one, 2 clients.
# Usage: benches/quota/run.sh [seconds per run, default 15] [rounds, default 3]
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-15}
ROUNDS=${2:-3}
PORT=${LEVQOR_BENCH_PORT:-28818}
HERE=benches/quota
. benches/common.sh

start_bench_cluster bench-quota "$PORT"
sql() { scripts/cluster.sh psql bench-quota -v ON_ERROR_STOP=1 -qAt "$@"; }
sql -c "CREATE DATABASE bench" >/dev/null
sql -d bench -f "$HERE/setup.sql" >/dev/null
KEY=$(sql -d bench -c "SELECT api_key FROM bench_keys")

durability() {  # on|off
  sql -c "ALTER SYSTEM SET fsync = $1" -c "SELECT pg_reload_conf()" >/dev/null
}

run() {  # script clients -> tps (exits if the totals disagree)
  # A fresh metric per run (run is called in a subshell: no shared counter).
  local script=$1 clients=$2 metric="bench_calls_$(date +%s%N)" before=0 out tps processed total
  sql -d bench -c "SELECT levqor.define_metric('$metric')" -c "UPDATE counters SET used = 0" >/dev/null
  case $script in insert_*) before=$(sql -d bench -c "SELECT count(*) FROM ${script/insert_/items_}") ;; esac
  out=$("$BIN/pgbench" -h 127.0.0.1 -p "$PORT" -U bench_app -n -M prepared -c "$clients" -j "$clients" \
        -T "$SECS" -D key="$KEY" -D metric="$metric" -f "$HERE/$script.sql" bench 2>&1)
  tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out")
  processed=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
  case $script in
    consume) total=$(sql -d bench -c "SELECT levqor.flush_usage()" \
                         -c "SELECT coalesce(sum(quantity), 0) FROM levqor.usage_ledger WHERE metric = '$metric'" | tail -1) ;;
    hotrow) total=$(sql -d bench -c "SELECT used FROM counters") ;;
    insert_*) total=$(($(sql -d bench -c "SELECT count(*) FROM ${script/insert_/items_}") - before)) ;;
  esac
  if [ "$total" != "$processed" ]; then
    echo "TOTALS DIFFER: $script at $clients clients committed $processed transactions but counted $total" >&2
    exit 1
  fi
  echo "$tps"
}

stats() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{ x[NR] = $1 } END { m = (NR % 2) ? x[(NR + 1) / 2] : (x[NR / 2] + x[NR / 2 + 1]) / 2; printf "%.1f %.1f %.1f", m, x[1], x[NR] }'; }
declare -A samples
pair() {  # label clients scriptA scriptB: ROUNDS rounds, alternating which goes first
  local label=$1 clients=$2 a=$3 b=$4
  for ((r = 0; r < ROUNDS; r++)); do
    local first=$a second=$b
    ((r % 2)) && { first=$b; second=$a; }
    for s in $first $second; do
      t=$(run "$s" "$clients")
      echo "  $label $s: $t tps"
      samples["$label $s"]="${samples["$label $s"]:-} $t"
    done
  done
}

echo "warming up (not counted)…"
SECS_SAVE=$SECS; SECS=3
run consume 2 >/dev/null; run hotrow 2 >/dev/null; run insert_plain 2 >/dev/null; run insert_limited 2 >/dev/null
SECS=$SECS_SAVE

for fs in on off; do
  durability "$fs"
  for c in 2 8; do pair "fsync=$fs c=$c" "$c" consume hotrow; done
done
durability on
pair "fsync=on c=2" 2 insert_plain insert_limited

printf '\nresults (%s rounds of %ss, median [min-max], pgbench -M prepared, one tenant; totals exact in every run)\n' "$ROUNDS" "$SECS"
for fs in on off; do
  for c in 2 8; do
    read -r x xmin xmax <<<"$(stats "${samples["fsync=$fs c=$c consume"]}")"
    read -r y ymin ymax <<<"$(stats "${samples["fsync=$fs c=$c hotrow"]}")"
    printf '  fsync=%-3s %s clients: consume() %9.1f tps [%s-%s]  hot row %9.1f tps [%s-%s]  ratio %.2fx%s\n' \
      "$fs" "$c" "$x" "$xmin" "$xmax" "$y" "$ymin" "$ymax" "$(awk -v a="$x" -v b="$y" 'BEGIN { print a / b }')" \
      "$([ "$fs" = on ] && echo '  (target >= 5x)' || echo '  (reference)')"
  done
done
read -r p pmin pmax <<<"$(stats "${samples["fsync=on c=2 insert_plain"]}")"
read -r l lmin lmax <<<"$(stats "${samples["fsync=on c=2 insert_limited"]}")"
printf '  insert, 2 clients: unlimited %9.1f tps [%s-%s]  limit_rows %9.1f tps [%s-%s]  overhead %.1f%%  (target < 10%%)\n' \
  "$p" "$pmin" "$pmax" "$l" "$lmin" "$lmax" "$(awk -v a="$p" -v b="$l" 'BEGIN { print (a - b) / a * 100 }')"

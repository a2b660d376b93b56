#!/usr/bin/env bash
# Side-by-side benchmark of tenant isolation, one run, same data, same client:
#   (a) no RLS, key looked up by the app, hand-written WHERE tenant_id = $1
#   (b) hand-written RLS policy on current_setting('app.tenant') + set_config
#   (c) levqor: authenticate() per transaction, levqor policies
# Each transaction: one context statement + point read + top-10 list + update.
# Usage: benches/isolation/run.sh [seconds per run, default 20] [clients, default 2]
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-20}
CLIENTS=${2:-2}
PORT=${LEVQOR_BENCH_PORT:-28817}
BIN=/usr/lib/postgresql/15/bin
HERE=benches/isolation

scripts/bootstrap.sh >/dev/null
echo "building levqor (release) and installing…"
cargo pgrx install --release --pg-config "$BIN/pg_config" >/dev/null
trap 'scripts/cluster.sh stop bench' EXIT
scripts/cluster.sh start bench "$PORT" preload
echo "shared_buffers = '1GB'" >> /tmp/levqor-clusters/bench/data/postgresql.conf
runuser -u postgres -- "$BIN/pg_ctl" -D /tmp/levqor-clusters/bench/data -w restart -l /tmp/levqor-clusters/bench/server.log >/dev/null
scripts/cluster.sh psql bench -c "CREATE DATABASE bench" >/dev/null
echo "loading 1,000 tenants x 200 rows into three identical tables…"
scripts/cluster.sh psql bench -d bench -f "$HERE/setup.sql"

run() {  # variant -> tps
  "$BIN/pgbench" -h 127.0.0.1 -p "$PORT" -U bench_app -n -M prepared -c "$CLIENTS" -j "$CLIENTS" \
    -T "$SECS" -f "$HERE/$1.sql" bench 2>&1 | sed -n 's/^tps = \([0-9.]*\).*/\1/p'
}

declare -A tps
for v in a_plain b_setting c_levqor; do tps[$v]=0; done
# Two rounds in opposite orders, so drift on a shared machine hits all alike.
for order in "a_plain b_setting c_levqor" "c_levqor b_setting a_plain"; do
  for v in $order; do
    t=$(run "$v")
    echo "  $v: $t tps"
    tps[$v]=$(awk -v x="${tps[$v]}" -v y="$t" 'BEGIN { print x + y / 2 }')
  done
done

calls=$(scripts/cluster.sh psql bench -d bench -At -F ' ' -f "$HERE/calls.sql")
read -r setcfg auth <<<"$calls"

a=${tps[a_plain]}; b=${tps[b_setting]}; c=${tps[c_levqor]}
printf '\nresults (%s clients, %ss per run, mean of 2 runs, pgbench -M prepared)\n' "$CLIENTS" "$SECS"
printf '  (a) no RLS, app lookup + WHERE tenant_id  %10.1f tps\n' "$a"
printf '  (b) RLS on current_setting + set_config   %10.1f tps\n' "$b"
printf '  (c) levqor authenticate + levqor policies %10.1f tps\n' "$c"
printf '  ratio c/a = %.3f   (target >= 0.9)\n' "$(awk -v x="$c" -v y="$a" 'BEGIN { print x / y }')"
printf '  ratio c/b = %.3f   (target >= 1.0)\n' "$(awk -v x="$c" -v y="$b" 'BEGIN { print x / y }')"
printf '  one set_config() call   %8s us\n' "$setcfg"
printf '  one authenticate() call %8s us   (%.1fx set_config)\n' "$auth" "$(awk -v x="$auth" -v y="$setcfg" 'BEGIN { print x / y }')"

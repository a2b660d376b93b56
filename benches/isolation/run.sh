#!/usr/bin/env bash
# Side-by-side benchmark of tenant isolation, one run, same data, same client:
#   (a) no RLS, key looked up by the app, hand-written WHERE tenant_id = $1
#   (b) hand-written RLS policy on current_setting('app.tenant') + set_config
#   (c) levqor: authenticate() per transaction, levqor policies
#   (d) levqor with a member user's key (membership checked)
# Each transaction: one context statement + point read + top-10 list + update.
# Usage: benches/isolation/run.sh [seconds per run, default 20] [clients, default 2]
# LEVQOR_BENCH_ROUNDS (default 4) rounds, each running the three in a rotated order.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-20}
CLIENTS=${2:-2}
PORT=${LEVQOR_BENCH_PORT:-28817}
HERE=benches/isolation
. benches/common.sh

start_bench_cluster bench "$PORT"
echo "shared_buffers = '1GB'" >> /tmp/levqor-clusters/bench/data/postgresql.conf
runuser -u postgres -- "$BIN/pg_ctl" -D /tmp/levqor-clusters/bench/data -w restart -l /tmp/levqor-clusters/bench/server.log >/dev/null
scripts/cluster.sh psql bench -c "CREATE DATABASE bench" >/dev/null
echo "loading 1,000 tenants x 200 rows into three identical tables…"
scripts/cluster.sh psql bench -d bench -f "$HERE/setup.sql"

run() {  # variant -> tps
  "$BIN/pgbench" -h 127.0.0.1 -p "$PORT" -U bench_app -n -M prepared -c "$CLIENTS" -j "$CLIENTS" \
    -T "$SECS" -f "$HERE/$1.sql" bench 2>&1 | sed -n 's/^tps = \([0-9.]*\).*/\1/p'
}

VARIANTS=(a_plain b_setting c_levqor d_levqor_user)
ROUNDS=${LEVQOR_BENCH_ROUNDS:-4}
echo "warming up (5 s each, not counted)…"
for v in "${VARIANTS[@]}"; do SECS_SAVE=$SECS; SECS=5; run "$v" >/dev/null; SECS=$SECS_SAVE; done

declare -A samples
# Rounds rotate the order, so drift on a shared 2-core machine hits all alike.
for ((r = 0; r < ROUNDS; r++)); do
  for ((i = 0; i < ${#VARIANTS[@]}; i++)); do
    v=${VARIANTS[$(((i + r) % ${#VARIANTS[@]}))]}
    t=$(run "$v")
    echo "  round $((r + 1)) $v: $t tps"
    samples[$v]="${samples[$v]:-} $t"
  done
done

# median, min and max of a list of numbers
stats() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{ x[NR] = $1 } END { m = (NR % 2) ? x[(NR + 1) / 2] : (x[NR / 2] + x[NR / 2 + 1]) / 2; printf "%.1f %.1f %.1f", m, x[1], x[NR] }'; }

echo "in-server cost per statement, (b) vs (c)…"
statements=$(scripts/cluster.sh psql bench -d bench -f "$HERE/statements.sql")
calls=$(scripts/cluster.sh psql bench -d bench -At -F ' ' -f "$HERE/calls.sql")
read -r setcfg auth authuser <<<"$calls"

read -r a amin amax <<<"$(stats "${samples[a_plain]}")"
read -r b bmin bmax <<<"$(stats "${samples[b_setting]}")"
read -r c cmin cmax <<<"$(stats "${samples[c_levqor]}")"
read -r d dmin dmax <<<"$(stats "${samples[d_levqor_user]}")"
printf '\nresults (%s clients, %s rounds of %ss, median [min-max], pgbench -M prepared)\n' "$CLIENTS" "$ROUNDS" "$SECS"
printf '  (a) no RLS, app lookup + WHERE tenant_id  %8.1f tps [%s-%s]\n' "$a" "$amin" "$amax"
printf '  (b) RLS on current_setting + set_config   %8.1f tps [%s-%s]\n' "$b" "$bmin" "$bmax"
printf '  (c) levqor authenticate + levqor policies %8.1f tps [%s-%s]\n' "$c" "$cmin" "$cmax"
printf '  (d) levqor, a member user'"'"'s key          %8.1f tps [%s-%s]\n' "$d" "$dmin" "$dmax"
printf '  ratio c/a = %.3f   (target >= 0.9)\n' "$(awk -v x="$c" -v y="$a" 'BEGIN { print x / y }')"
printf '  ratio c/b = %.3f   (target >= 1.0)\n' "$(awk -v x="$c" -v y="$b" 'BEGIN { print x / y }')"
printf '  ratio d/a = %.3f   (a member'"'"'s key: membership read from levqor.members)\n' "$(awk -v x="$d" -v y="$a" 'BEGIN { print x / y }')"
printf '  one set_config() call   %8s us\n' "$setcfg"
printf '  one authenticate() call %8s us   (%.1fx set_config)\n' "$auth" "$(awk -v x="$auth" -v y="$setcfg" 'BEGIN { print x / y }')"
printf '  one authenticate() call, a member'"'"'s key %8s us\n' "$authuser"
printf '\nin-server microseconds per statement (ctx = the context-setting statement)\n%s\n' "$statements"

#!/usr/bin/env bash
# The hierarchy, side by side in one run (issue 4's benchmark):
#   levqor   enable_tenancy(agents, owner_org, sharing_scope), closure table
#   seed     the VITAL checklist's organizations table, recursive helper
#            functions and the RLS policy that calls them per row
# 105,600 organizations three levels deep, 1,000,000 agents; one user, a
# member of one organization. Measures the accessible-agents query (same
# rows, checked), its plan, and the hierarchy helpers' latency.
# Usage: benches/hierarchy/run.sh [repetitions, default 5]
set -euo pipefail
cd "$(dirname "$0")/../.."
REPS=${1:-5}
PORT=${LEVQOR_BENCH_PORT:-28822}
HERE=benches/hierarchy
. benches/common.sh

start_bench_cluster bench-hier "$PORT"
echo "shared_buffers = '1GB'" | runuser -u postgres -- tee -a /tmp/levqor-clusters/bench-hier/data/postgresql.conf >/dev/null
runuser -u postgres -- "$BIN/pg_ctl" -D /tmp/levqor-clusters/bench-hier/data -w restart -l /tmp/levqor-clusters/bench-hier/server.log >/dev/null
sql() { scripts/cluster.sh psql bench-hier -v ON_ERROR_STOP=1 -qAt "$@"; }
as_app() { "$BIN/psql" -X -h 127.0.0.1 -p "$PORT" -U bench_app -d bench -v ON_ERROR_STOP=1 -qAt "$@"; }
sql -c "CREATE DATABASE bench" >/dev/null
echo "loading 105,600 organizations and 1,000,000 agents (twice)…"
start=$(date +%s)
sql -d bench -f "$HERE/setup.sql" >/dev/null
echo "  loaded in $(($(date +%s) - start)) s"
USER_ID=00000000-0000-0000-0000-00000000000a

median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{ x[NR] = $1 } END { print (NR % 2) ? x[(NR + 1) / 2] : (x[NR / 2] + x[NR / 2 + 1]) / 2 }'; }
# timings (ms) of REPS runs of a query, after one warm-up, in one transaction
times() {  # context-statement query reps
  local script="BEGIN; $1 \\timing on"
  for ((i = 0; i <= $3; i++)); do script+=$'\n'"$2"; done
  script+=$'\n'"COMMIT;"
  # the first timing is the warm-up, the last the COMMIT
  as_app <<<"$script" 2>&1 | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | head -n "$(($3 + 1))" | tail -n "$3" | tr '\n' ' '
}
count_levqor=$(as_app -c "BEGIN" -c "SELECT levqor.set_tenant('t42-o7')" -c "SELECT count(*) FROM agents" -c "COMMIT" | tail -1)
count_seed=$(as_app -c "SET app.user_id = '$USER_ID'" -c "SELECT count(*) FROM seed_agents" | tail -1)
echo "accessible agents: levqor $count_levqor, seed $count_seed"
[ "$count_levqor" = "$count_seed" ] || { echo "the two disagree on what the user may see" >&2; exit 1; }

echo "accessible-agents query, $REPS runs each…"
lq=$(times "SELECT levqor.set_tenant('t42-o7');" "SELECT count(*) FROM agents;" "$REPS")
sq=$(times "SET LOCAL app.user_id = '$USER_ID';" "SELECT count(*) FROM seed_agents;" "$REPS")
echo "  levqor: $lq"
echo "  seed:   $sq"
plan=$(as_app -c "BEGIN" -c "SELECT levqor.set_tenant('t42-o7')" -c "EXPLAIN (COSTS OFF) SELECT count(*) FROM agents" -c "COMMIT" | tail -n +2)
seed_plan=$(as_app -c "SET app.user_id = '$USER_ID'" -c "EXPLAIN (COSTS OFF) SELECT count(*) FROM seed_agents")

echo "hierarchy helpers: 2,000 random organizations, the 100 tenants, 3 passes (the first warms up)…"
helpers=$(sql -d bench <<'SQL' 2>&1 | sed -n 's/^NOTICE:  //p' | tail -5
CREATE TEMP TABLE sample AS SELECT id FROM levqor.tenants WHERE kind = 'organization' ORDER BY random() LIMIT 2000;
CREATE TEMP TABLE tsample AS SELECT id FROM levqor.tenants WHERE kind = 'tenant';
DO $$
DECLARE t0 timestamptz; r record; n int; c bigint; u uuid; res text[];
BEGIN
  FOR pass IN 1 .. 3 LOOP
    res := '{}';
    n := 0; t0 := clock_timestamp();
    FOR r IN SELECT id FROM sample LOOP SELECT count(*) INTO c FROM levqor.ancestors(r.id); n := n + 1; END LOOP;
    res := res || format('levqor.ancestors(organization): %s', round(extract(epoch FROM clock_timestamp() - t0) * 1000000 / n, 1));
    n := 0; t0 := clock_timestamp();
    FOR r IN SELECT id FROM sample LOOP u := levqor.tenant_of(r.id); n := n + 1; END LOOP;
    res := res || format('levqor.tenant_of(organization): %s', round(extract(epoch FROM clock_timestamp() - t0) * 1000000 / n, 1));
    n := 0; t0 := clock_timestamp();
    FOR r IN SELECT id FROM tsample LOOP SELECT count(*) INTO c FROM levqor.descendants(r.id); n := n + 1; END LOOP;
    res := res || format('levqor.descendants(tenant), 1,056 rows: %s', round(extract(epoch FROM clock_timestamp() - t0) * 1000000 / n, 1));
    n := 0; t0 := clock_timestamp();
    FOR r IN SELECT id FROM sample LOOP SELECT count(*) INTO c FROM get_organization_hierarchy(r.id); n := n + 1; END LOOP;
    res := res || format('seed get_organization_hierarchy: %s', round(extract(epoch FROM clock_timestamp() - t0) * 1000000 / n, 1));
    n := 0; t0 := clock_timestamp();
    FOR r IN SELECT id FROM sample LOOP u := get_organization_tenant(r.id); n := n + 1; END LOOP;
    res := res || format('seed get_organization_tenant: %s', round(extract(epoch FROM clock_timestamp() - t0) * 1000000 / n, 1));
  END LOOP;
  FOR i IN 1 .. cardinality(res) LOOP RAISE NOTICE '%', res[i]; END LOOP;  -- the last pass
END $$;
SQL
)

l=$(median "$lq"); s=$(median "$sq")
printf '\nresults (median of %s)\n' "$REPS"
printf '  accessible agents (%s rows): levqor %s ms, seed recursive functions %s ms: %.0fx faster (target >= 5x)\n' \
  "$count_levqor" "$l" "$s" "$(awk -v a="$s" -v b="$l" 'BEGIN { print a / b }')"
printf '  helpers, microseconds per call (target < 1,000):\n'
sed 's/^/    /' <<<"$helpers"
printf '  levqor plan:\n%s\n' "$(sed 's/^/    /' <<<"$plan")"
grep -q "Seq Scan on agents" <<<"$plan" && echo "  NOTE: levqor's plan scans agents sequentially" || echo "  levqor's plan: index scans only on agents"
printf '  seed plan:\n%s\n' "$(sed 's/^/    /' <<<"$seed_plan")"

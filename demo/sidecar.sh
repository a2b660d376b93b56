#!/usr/bin/env bash
# The sidecar part of the demo (run by scripts/demo.sh after the
# walkthrough, against the same throwaway cluster): a fake Stripe and a Splunk
# HEC receiver on loopback (levqor-peers), the daemon billing the tenants,
# metering their usage and streaming an audit trail, then the one-shot
# commands: reconcile, backup, verify-backup, dr-drill.
#   demo/sidecar.sh PORT
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${1:?usage: demo/sidecar.sh PORT}
STRIPE=127.0.0.1:${LEVQOR_DEMO_STRIPE_PORT:-28891}
HEC=127.0.0.1:${LEVQOR_DEMO_HEC_PORT:-28892}
HTTP=127.0.0.1:${LEVQOR_DEMO_SIDECAR_PORT:-28893}
BIN=target/debug
step() { printf '\n== %s\n' "$*"; }
sql() { scripts/cluster.sh psql demo -d demo -v ON_ERROR_STOP=1 -X -q "$@"; }
# Polls a query until it answers t (at most 30 s).
wait_for() {
  for _ in $(seq 300); do
    [ "$(sql -Atc "$2")" = t ] && return 0
    sleep 0.1
  done
  echo "timed out waiting for $1" >&2
  return 1
}

echo "building levqor-sidecar and the demo's peers…"
cargo build -q -p levqor-sidecar -p levqor-peers
work=$(mktemp -d /tmp/levqor-demo-sidecar.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# Secrets come from the environment, never from the file.
export STRIPE_SECRET_KEY=sk_test_levqor_demo_4242 STRIPE_WEBHOOK_SECRET=whsec_levqor_demo
export LEVQOR_BACKUP_KEY=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
LEVQOR_PEER_SECRET=unused $BIN/levqor-peers stripe --listen "$STRIPE" --meters api_calls >"$work/stripe.log" 2>&1 &
pids+=($!)
LEVQOR_PEER_SECRET=hec-demo-token-1234 $BIN/levqor-peers siem --kind splunk_hec --listen "$HEC" >"$work/hec.log" 2>&1 &
pids+=($!)

step "9. The sidecar's login roles: levqor_sidecar (billing, streams) and levqor_backup"
sql <<SQL
CREATE ROLE demo_sidecar LOGIN IN ROLE levqor_sidecar;
CREATE ROLE demo_backup LOGIN IN ROLE levqor_backup;
SET client_min_messages = warning;
\o /dev/null
SELECT levqor.enable_audit('projects');
-- Audit streams come with plans that have the audit_stream feature.
SELECT levqor.change_plan('globex', 'enterprise');
\o
SELECT levqor.add_audit_stream('globex', 'splunk_hec', 'http://$HEC/services/collector/event', 'hec-demo-token-1234') AS stream_id;
SQL
cat >"$work/levqor-sidecar.toml" <<TOML
[database]
url = "host=127.0.0.1 port=$PORT dbname=demo user=demo_sidecar"

[http]
listen = "$HTTP"

[stripe]
api_base = "http://$STRIPE"
api_key_env = "STRIPE_SECRET_KEY"
webhook_secret_env = "STRIPE_WEBHOOK_SECRET"
sweep_seconds = 2
meter_interval_seconds = 1

[stripe.plans.free]
prices = ["price_free_base"]
[stripe.plans.starter]
prices = ["price_starter_base", "price_api_calls"]
[stripe.plans.professional]
prices = ["price_pro_base", "price_api_calls"]
[stripe.plans.enterprise]
prices = ["price_enterprise_base", "price_api_calls"]

[stripe.meters]
api_calls_per_15min = "api_calls"

[audit]
poll_seconds = 1

[backup]
database_url = "host=127.0.0.1 port=$PORT dbname=demo user=demo_backup"
dir = "$work/backups"
encryption_key_env = "LEVQOR_BACKUP_KEY"
admin_url = "host=127.0.0.1 port=$PORT dbname=demo user=postgres"
TOML
$BIN/levqor-sidecar check-config --config "$work/levqor-sidecar.toml"

step "10. The daemon: every tenant gets a Stripe customer and a subscription"
$BIN/levqor-sidecar run --config "$work/levqor-sidecar.toml" 2>"$work/sidecar.log" &
sidecar=$!
pids+=($sidecar)
wait_for "subscriptions" "SELECT count(*) = 2 FROM levqor.tenant_billing WHERE subscription_id IS NOT NULL"
sql -c "SELECT slug, plan, customer_id, subscription_status FROM levqor.tenant_billing ORDER BY slug"

step "11. Usage is metered into Stripe, exactly once"
for t in acme:42 globex:7 acme:8; do
  key=$(sql -Atc "SELECT levqor.issue_key('${t%%:*}', label => 'demo usage')")
  sql -c "SET ROLE demo_app; BEGIN; SELECT levqor.authenticate('$key') IS NOT NULL AS acting; SELECT levqor.consume('api_calls_per_15min', ${t##*:}) AS remaining; COMMIT;" >/dev/null
  sql -Atc "SELECT levqor.flush_usage()" >/dev/null
done
wait_for "metering" "SELECT (SELECT position FROM levqor.ledger_cursors WHERE consumer = 'stripe') >= (SELECT max(id) FROM levqor.usage_ledger)"
$BIN/levqor-sidecar reconcile --config "$work/levqor-sidecar.toml"

step "12. globex's audit trail, sealed, streamed to its SIEM in chain order"
sql -Atc "SELECT levqor.seal_audit()" >/dev/null   # the worker does this where levqor.audit_database names the database
wait_for "delivery" "SELECT lag = 0 AND delivered_seq > 0 FROM levqor.audit_streams"
sql -c "SELECT tenant, kind, state, delivered_seq, lag FROM levqor.audit_streams"
echo "the receiver holds $(curl -s "http://$HEC/_fake/events" | grep -o '"seq":' | wc -l) events"
curl -s "http://$HTTP/metrics" | grep -E '^levqor_(tenant_usage|sidecar_meter_events_sent|sidecar_stream_delivered)' | head -6

step "13. A tenant's backup, verified, and a timed DR drill"
archive=$($BIN/levqor-sidecar backup --config "$work/levqor-sidecar.toml" --tenant acme 2>/dev/null | tail -1)
$BIN/levqor-sidecar verify-backup --config "$work/levqor-sidecar.toml" --from "$archive"
$BIN/levqor-sidecar dr-drill --config "$work/levqor-sidecar.toml" --tenant acme 2>/dev/null

kill -TERM "$sidecar"
wait "$sidecar" || true
echo "sidecar stopped (SIGTERM); its log: $work/sidecar.log"

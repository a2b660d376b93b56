#!/usr/bin/env bash
# The levqor demo: build, install into a throwaway local cluster, run the
# walkthrough (two tenants that cannot see or touch each other's rows), then
# the sidecar (Stripe billing, an audit stream, a backup and a DR drill, all
# against local peers), stop.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PORT=${LEVQOR_DEMO_PORT:-28814}

scripts/bootstrap.sh
echo "building and installing levqor…"
cargo pgrx install --pg-config "$PG_CONFIG" >/dev/null
trap 'scripts/cluster.sh stop demo' EXIT
scripts/cluster.sh start demo "$PORT" preload
scripts/cluster.sh psql demo -c "CREATE DATABASE demo" >/dev/null
scripts/cluster.sh psql demo -d demo -f demo/walkthrough.sql
demo/sidecar.sh "$PORT"
echo
echo "demo done; the cluster is stopped and can be deleted: rm -rf /tmp/levqor-clusters/demo"

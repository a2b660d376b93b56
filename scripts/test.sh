#!/usr/bin/env bash
# Every levqor test, on a fresh Debian 12 machine or a warm one:
#   1. installs what is missing (scripts/bootstrap.sh),
#   2. #[pg_test] units inside a real PostgreSQL 15 (cargo pgrx test),
#   3. installs the extension and starts three throwaway clusters (with and
#      without shared_preload_libraries, and one the durability test crashes),
#   4. the end-to-end suite (as non-superuser roles over TCP) and the sidecar's
#      (the real binary against the clusters and HTTP peers on loopback: a
#      fake Stripe, Splunk HEC, Datadog and webhook receivers).
# The clusters are stopped whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
export RUST_BACKTRACE=${RUST_BACKTRACE:-0}
export LEVQOR_E2E_PORT=${LEVQOR_E2E_PORT:-28815}
export LEVQOR_E2E_NOPRELOAD_PORT=${LEVQOR_E2E_NOPRELOAD_PORT:-28816}
export LEVQOR_E2E_RESTART_PORT=${LEVQOR_E2E_RESTART_PORT:-28817}

step() { printf '\n\033[1;34m== %s\033[0m\n' "$*"; }

step "bootstrap"
scripts/bootstrap.sh

step "unit tests inside PostgreSQL (cargo pgrx test)"
mkdir -p /tmp/levqor-pgdata && chown postgres:postgres /tmp/levqor-pgdata
cargo pgrx test pg15 --runas postgres --pgdata /tmp/levqor-pgdata/data

step "install the extension into PostgreSQL 15"
cargo pgrx install --pg-config "$PG_CONFIG" >/dev/null
# Earlier releases' install scripts, for the upgrade tests.
cp sql/archive/levqor--*.sql "$("$PG_CONFIG" --sharedir)/extension/"

step "throwaway clusters"
cleanup() {
  scripts/cluster.sh stop e2e || true
  scripts/cluster.sh stop e2e-nopreload || true
  scripts/cluster.sh stop e2e-restart || true
  # Started by tests/e2e/tests/citus.rs, when Citus is installed.
  for n in 0 1 2; do scripts/cluster.sh stop "citus$n-e2e" 2>/dev/null || true; done
}
trap cleanup EXIT
scripts/cluster.sh start e2e "$LEVQOR_E2E_PORT" preload
scripts/cluster.sh start e2e-nopreload "$LEVQOR_E2E_NOPRELOAD_PORT" nopreload
# Restarted and crashed by the durability tests and the sidecar's restart
# tests (one test binary at a time), so nothing else uses it.
scripts/cluster.sh start e2e-restart "$LEVQOR_E2E_RESTART_PORT" preload

step "end-to-end suite and sidecar"
if [ -f "$("$PG_CONFIG" --pkglibdir)/citus.so" ]; then
  echo "Citus found: tests/e2e/tests/citus.rs starts a coordinator and two workers"
else
  echo "Citus not installed: the Citus tests are skipped (they say so); docs/citus.md"
fi
cargo test -p levqor-e2e -p levqor-sidecar

#!/usr/bin/env bash
# The sidecar's benchmarks, side by side with what people do today, in one
# run each (benches/README.md, "Sidecar"):
#   billing  meter events/s: levqor-sidecar vs a loop of one request at a
#            time, same ledger, same fake Stripe; 10,000 tenants x 3 metrics
#            synced; the daemon's peak RSS
#   streams  audit events/s to a local Splunk HEC: batched vs one request per
#            event, same 100,000-entry backlog; commit-to-receipt latency idle
#   backup   a shared tenant of 1,000,000 rows in tables of 3,000,000, and a
#            schema tenant of 1,000,000: levqor's backup and restore vs
#            pg_dump/pg_restore of the whole tables (or schema)
# Usage: benches/sidecar/run.sh [billing|streams|backup|all] (default all)
set -euo pipefail
cd "$(dirname "$0")/../.."
WHAT=${1:-all}
PORT=${LEVQOR_BENCH_PORT:-28819}
. benches/common.sh

echo "building levqor-sidecar and the bench driver (release)…"
cargo build -q --release -p levqor-sidecar -p levqor-peers
start_bench_cluster bench-sidecar "$PORT"
DRIVER="target/release/levqor-bench-sidecar --port $PORT --sidecar target/release/levqor-sidecar"

if [ "$WHAT" = all ] || [ "$WHAT" = billing ]; then
  echo; echo "== billing"
  $DRIVER billing
fi
if [ "$WHAT" = all ] || [ "$WHAT" = streams ]; then
  echo; echo "== streams"
  $DRIVER streams
fi
if [ "$WHAT" = all ] || [ "$WHAT" = backup ]; then
  echo; echo "== backup"
  benches/sidecar/backup.sh "$PORT"
fi

#!/usr/bin/env bash
# Throwaway PostgreSQL 15 clusters for the demo, the end-to-end tests and the
# benchmarks. They run as the postgres OS user (initdb refuses root), listen
# on 127.0.0.1 and a private socket directory, and trust local connections:
# never point this at anything but a scratch directory.
#
#   scripts/cluster.sh start NAME PORT [preload|nopreload|citus]
# (citus: a node of a Citus cluster, with citus loaded before levqor; needs
# Citus installed, which nothing here does for you.)
#   scripts/cluster.sh stop NAME
#   scripts/cluster.sh psql NAME [psql args...]
set -euo pipefail

BIN=/usr/lib/postgresql/15/bin
ROOT=${LEVQOR_CLUSTER_ROOT:-/tmp/levqor-clusters}
cmd=${1:?usage: cluster.sh start|stop|psql NAME ...}
name=${2:?cluster name}
dir="$ROOT/$name"

as_pg() { runuser -u postgres -- "$@"; }

case "$cmd" in
start)
  port=${3:?port}
  preload=${4:-preload}
  mkdir -p "$ROOT" && chown postgres:postgres "$ROOT"
  if [ -f "$dir/data/postmaster.pid" ]; then
    as_pg "$BIN/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  fi
  rm -rf "$dir"
  as_pg mkdir -p "$dir/sock"
  as_pg "$BIN/initdb" -D "$dir/data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C.UTF-8 >"$dir.initdb.log" 2>&1 \
    || { cat "$dir.initdb.log"; exit 1; }
  {
    echo "port = $port"
    echo "listen_addresses = '127.0.0.1'"
    echo "unix_socket_directories = '$dir/sock'"
    echo "fsync = off"
    echo "max_connections = 200"
    echo "max_worker_processes = 16"
    echo "max_parallel_workers = 8"
    echo "log_min_messages = warning"
    if [ "$preload" = citus ]; then
      # LEVQOR_EXTRA_PRELOAD: more libraries after levqor (the Citus tests
      # add pg_stat_statements, to check what it shows).
      echo "shared_preload_libraries = 'citus,levqor${LEVQOR_EXTRA_PRELOAD:+,$LEVQOR_EXTRA_PRELOAD}'"
      echo "citus.propagate_set_commands = 'local'"
      echo "levqor.cluster_secret = 'e2e-cluster-secret-please-change-0123456789'"
      # Short, so that the Citus tests see contexts expire and get re-signed.
      echo "levqor.node_context_lifetime = 10"
      echo "max_prepared_transactions = 100"
      echo "citus.node_conninfo = 'sslmode=disable'"
      echo "wal_level = logical"
    fi
    if [ "$preload" = preload ]; then
      echo "shared_preload_libraries = 'levqor'"
      # levqor's workers, for the databases the worker test uses.
      echo "levqor.audit_database = 'levqor_sealer, levqor_sealer2, levqor_dropped, levqor_streams'"
      echo "levqor.audit_seal_interval = 200"
    fi
    echo "levqor.token_secret = 'e2e-token-secret-please-change-0123456789'"
  } | as_pg tee -a "$dir/data/postgresql.conf" >/dev/null
  as_pg "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null \
    || { cat "$dir/server.log"; exit 1; }
  if [ "$preload" = preload ]; then
    # The databases levqor's workers serve exist from the start.
    as_pg "$BIN/createdb" -h "$dir/sock" -p "$port" levqor_sealer
    as_pg "$BIN/createdb" -h "$dir/sock" -p "$port" levqor_sealer2
  fi
  echo "cluster $name: port $port, socket $dir/sock ($preload)"
  ;;
stop)
  if [ -f "$dir/data/postmaster.pid" ]; then
    as_pg "$BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
  fi
  ;;
psql)
  shift 2
  port=$(sed -n 's/^port = //p' "$dir/data/postgresql.conf" | tail -1)
  exec "$BIN/psql" -X -h "$dir/sock" -p "$port" -U postgres "$@"
  ;;
*)
  echo "unknown command $cmd" >&2; exit 2 ;;
esac

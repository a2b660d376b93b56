# Sourced by the benchmark scripts: build levqor in release mode, install it,
# and start a throwaway cluster NAME on PORT (stopped when the script exits).
# Usage: start_bench_cluster NAME PORT
BIN=/usr/lib/postgresql/15/bin

start_bench_cluster() {
  local name=$1 port=$2
  scripts/bootstrap.sh >/dev/null
  echo "building levqor (release) and installing…"
  cargo pgrx install --release --pg-config "$BIN/pg_config" >/dev/null
  trap "scripts/cluster.sh stop $name" EXIT
  scripts/cluster.sh start "$name" "$port" preload
}

#!/usr/bin/env bash
# Install everything levqor needs on a fresh Debian 12 machine (run as root).
# Idempotent: every step checks first, so a second run takes seconds.
set -euo pipefail

PGRX_VERSION=0.18.0
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config

log() { printf '\033[1;34m[bootstrap]\033[0m %s\n' "$*"; }

need_pkgs=()
for p in postgresql-15 postgresql-server-dev-15 postgresql-contrib libclang-dev clang sudo pkg-config libssl-dev pgbouncer; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
  log "installing Debian packages: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
else
  log "Debian packages present"
fi

if ! cargo pgrx --version 2>/dev/null | grep -q " ${PGRX_VERSION}\$"; then
  log "installing cargo-pgrx ${PGRX_VERSION} (takes about 6 minutes once)"
  cargo install cargo-pgrx --version "${PGRX_VERSION}" --locked
else
  log "cargo-pgrx ${PGRX_VERSION} present"
fi

if ! grep -q "^pg15 *= *\"${PG_CONFIG}\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml" 2>/dev/null; then
  log "cargo pgrx init against ${PG_CONFIG}"
  cargo pgrx init --pg15 "${PG_CONFIG}"
else
  log "pgrx initialised for pg15"
fi

# The extension installs into the system PostgreSQL's directories; let the
# tests (which run as root) write there. Nothing else to do.
log "done"

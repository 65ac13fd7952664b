#!/usr/bin/env bash
# Quick start on a fresh Debian 12 machine (run as root): installs what is needed,
# builds and installs cmk_lakebase, creates an encrypted cluster with the local key
# provider, starts it on port ${CMK_DEMO_PORT:-5499} and shows cmk_status().
# Idempotent: run it again and it reuses the cluster (starting it if it is stopped).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "quickstart: run as root (it installs packages and the extension): sudo bash $0" >&2
    exit 1
fi

bash scripts/install_deps.sh
make -s
make -s install

PORT=${CMK_DEMO_PORT:-5499}
PGBIN=$(pg_config --bindir)
HOME_PG=$(getent passwd postgres | cut -d: -f6)
DEMO=${CMK_DEMO_DIR:-$HOME_PG/cmk_demo}
DATA=$DEMO/data
KEYS=$DEMO/keys          # the local provider's key store: outside the data directory
SOCK=/var/run/postgresql
install -d -o postgres -g postgres -m 700 "$DEMO"
install -d -o postgres -g postgres -m 2775 "$SOCK"

as_pg() { runuser -u postgres -- "$@"; }

if [ ! -f "$DATA/cmk_lakebase/keyring.json" ]; then
    as_pg "$PGBIN/pg_cmk" initdb -D "$DATA" --key-store "$KEYS" -- \
        --auth-local=peer --auth-host=scram-sha-256 -U postgres
fi
if ! as_pg "$PGBIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    as_pg "$PGBIN/pg_ctl" -D "$DATA" -l "$DEMO/server.log" -w \
        -o "-p $PORT -k $SOCK -c listen_addresses=''" start
fi
as_pg "$PGBIN/psql" -h "$SOCK" -p "$PORT" -d postgres -X -q -v ON_ERROR_STOP=1 <<'SQL'
CREATE EXTENSION IF NOT EXISTS cmk_lakebase;
\x on
SELECT * FROM cmk_lakebase.cmk_status();
SQL
cat <<TXT

An encrypted cluster is running:
  data directory  $DATA
  key store       $KEYS   (local provider; pg_cmk key list --key-store $KEYS)
  connect         runuser -u postgres -- psql -h $SOCK -p $PORT
  stop            runuser -u postgres -- $PGBIN/pg_ctl -D $DATA stop
TXT

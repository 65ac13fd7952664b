#!/usr/bin/env bash
# Runs the pg_regress tests (test/sql/, test/expected/) against a temporary ENCRYPTED instance:
# a new local-provider key store, "pg_cmk initdb", a server on a private Unix socket,
# pg_regress, then the server is always stopped. On failure the diffs are printed and
# the scratch directory is kept.
#
# Usage: test/run_regress.sh [TEST...]     (default: cmk_status cmk_lifecycle)
# Run as a non-root user (initdb refuses root). Needs pg_cmk installed in the
# PostgreSQL bindir. CMK_TEST_PLAIN=1 uses a stock initdb instead (harness check only).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bindir=${PG_BINDIR:-/usr/lib/postgresql/15/bin}
pg_regress=${PG_REGRESS:-/usr/lib/postgresql/15/lib/pgxs/src/test/regress/pg_regress}
export PATH="$bindir:$PATH"
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(cmk_status cmk_lifecycle)

if [ "$(id -u)" -eq 0 ]; then
	echo "run_regress.sh: run as a non-root user (initdb refuses root)" >&2
	exit 1
fi

tmp=$(mktemp -d /tmp/cmk_regress.XXXXXX)
data=$tmp/data
keys=$tmp/keys
status=1

cleanup() {
	if [ -f "$data/postmaster.pid" ]; then
		pg_ctl -D "$data" -m fast -w stop >/dev/null 2>&1 ||
			pg_ctl -D "$data" -m immediate -w stop >/dev/null 2>&1 || true
	fi
	if [ "$status" -eq 0 ]; then
		rm -rf "$tmp"
	else
		echo "run_regress.sh: kept $tmp for inspection" >&2
	fi
}
trap cleanup EXIT

mkdir -m 700 "$keys"
initdb_args=(-A trust -N -U "$(id -un)" --locale=C -E UTF8)
if [ "${CMK_TEST_PLAIN:-}" = 1 ]; then
	initdb -D "$data" -k "${initdb_args[@]}" >"$tmp/initdb.log" 2>&1 || {
		cat "$tmp/initdb.log" >&2
		exit 1
	}
else
	pg_cmk initdb -D "$data" --key-store "$keys" -- "${initdb_args[@]}" \
		>"$tmp/initdb.log" 2>&1 || {
		echo "run_regress.sh: pg_cmk initdb failed:" >&2
		cat "$tmp/initdb.log" >&2
		exit 1
	}
fi

# The server listens only on a Unix socket in $tmp, so a port only has to be free of
# other servers using the same socket directory: pick one and retry on failure.
started=0
for attempt in 1 2 3 4 5; do
	port=$((54000 + RANDOM % 1000))
	cat >>"$data/postgresql.conf" <<EOF

# Added by test/run_regress.sh
port = $port
unix_socket_directories = '$tmp'
listen_addresses = ''
fsync = off
log_line_prefix = '%m [%p] %q%a '
EOF
	if pg_ctl -D "$data" -l "$tmp/server.log" -w -t 120 start >/dev/null 2>&1; then
		started=1
		break
	fi
	echo "run_regress.sh: server did not start on port $port (attempt $attempt)" >&2
done
if [ "$started" -ne 1 ]; then
	echo "run_regress.sh: could not start the server; log:" >&2
	cat "$tmp/server.log" >&2
	exit 1
fi

rc=0
"$pg_regress" --bindir="$bindir" --host="$tmp" --port="$port" \
	--inputdir="$root/test" --outputdir="$tmp/regress" \
	--dbname=contrib_regression "${tests[@]}" || rc=$?

if [ "$rc" -ne 0 ]; then
	if [ -f "$tmp/regress/regression.diffs" ]; then
		echo "===== regression.diffs =====" >&2
		cat "$tmp/regress/regression.diffs" >&2
	fi
	echo "===== server log (last 50 lines) =====" >&2
	tail -n 50 "$tmp/server.log" >&2
fi
status=$rc
exit "$rc"

#!/bin/bash
# The conversion rate of `pg_cmk encrypt` (issue 17 item 4) beside a plain `cp -a` of
# the same data directory, on this machine. Not a test: prints numbers.
#
# As root after `make install` (the clusters are made and converted as the postgres OS
# user through runuser), or as the cluster's owner with pg_cmk on the PATH:
#   bash bench/encrypt_rate.sh                 # pgbench scale 70: ~2 GB with its WAL
#   ENC_SCALE=130 bash bench/encrypt_rate.sh   # ~3 GB
#   ENC_PG_CMK=build/pg_cmk CMK_LAKEBASE_LAYER=build/libcmk_lakebase_fs.so bash bench/encrypt_rate.sh
#                                              # a work tree's build instead of the installed one
# Needs about 3 x the cluster's size free under ENC_DIR (default: a new /tmp directory).
#
# Both copies read the same directory with its pages warm in the OS cache (cp runs
# first, then pg_cmk encrypt). `cp -a` does not fsync; "cp -a + sync" adds a sync of
# the file system afterwards, which is what pg_cmk encrypt's durability costs at least
# (it fsyncs each file, and the layer makes each new DEK durable in the key map
# before the file's first byte).
set -euo pipefail

SCALE=${ENC_SCALE:-70}
BINDIR=${PG_BINDIR:-/usr/lib/postgresql/15/bin}
export PATH="$BINDIR:$PATH"

PG_CMK=${ENC_PG_CMK:-pg_cmk}
[ "$PG_CMK" = pg_cmk ] || PG_CMK=$(realpath "$PG_CMK")
[ -z "${CMK_LAKEBASE_LAYER:-}" ] || export CMK_LAKEBASE_LAYER=$(realpath "$CMK_LAKEBASE_LAYER")

if [ "$(id -u)" = 0 ]; then
	dir=${ENC_DIR:-$(mktemp -d /tmp/cmk_encrypt_rate.XXXXXX)}
	chown postgres "$dir"
	exec runuser -u postgres -- env ENC_DIR="$dir" ENC_SCALE="$SCALE" PG_BINDIR="$BINDIR" ENC_PG_CMK="$PG_CMK" \
		${CMK_LAKEBASE_LAYER:+CMK_LAKEBASE_LAYER="$CMK_LAKEBASE_LAYER"} bash "$0"
fi

dir=${ENC_DIR:-$(mktemp -d /tmp/cmk_encrypt_rate.XXXXXX)}
data="$dir/data"
port=${ENC_PORT:-54388}
export CMK_LAKEBASE_KEY_STORE="$dir/keys"
trap 'pg_ctl -D "$data" -m immediate stop >/dev/null 2>&1 || true' EXIT

echo "== plaintext cluster, pgbench scale $SCALE, in $dir"
initdb -D "$data" -A trust -U postgres --locale=C -k >/dev/null
pg_ctl -D "$data" -o "-p $port -k $dir -c max_wal_size=4GB" -l "$dir/server.log" -w start >/dev/null
pgbench -h "$dir" -p "$port" -U postgres -i -s "$SCALE" -q postgres 2>&1 | tail -1
pg_ctl -D "$data" -m fast -w stop >/dev/null
bytes=$(du -sb "$data" | cut -f1)
files=$(find "$data" -type f | wc -l)
mb=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1e6 }')
echo "   $mb MB in $files files"

rate() { awk -v b="$bytes" -v s="$1" 'BEGIN { printf "%.1f", b / 1e6 / s }'; }
now() { date +%s.%N; }

sync
t0=$(now)
cp -a "$data" "$dir/copy"
t1=$(now)
sync
t2=$(now)
cp_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
cps_s=$(awk -v a="$t0" -v b="$t2" 'BEGIN { printf "%.2f", b - a }')
rm -rf "$dir/copy"
sync

t0=$(now)
out=$("$PG_CMK" encrypt -D "$data" --key-store "$dir/keys")   # the original is kept: its removal is not conversion
t1=$(now)
echo "$out" | grep -E "^pg_cmk: encrypted"
enc_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')

# the result starts and serves the rows
pg_ctl -D "$data" -o "-p $port -k $dir" -l "$dir/server.log" -w start >/dev/null
rows=$(psql -h "$dir" -p "$port" -U postgres -Atc "SELECT count(*) FROM pgbench_accounts" postgres)
pg_ctl -D "$data" -m fast -w stop >/dev/null

echo
printf "%-28s %8s s %10s MB/s\n" "cp -a" "$cp_s" "$(rate "$cp_s")"
printf "%-28s %8s s %10s MB/s\n" "cp -a + sync" "$cps_s" "$(rate "$cps_s")"
printf "%-28s %8s s %10s MB/s\n" "pg_cmk encrypt" "$enc_s" "$(rate "$enc_s")"
echo "($mb MB, $files files; the converted cluster started and counted $rows rows in pgbench_accounts)"
rm -rf "$dir"

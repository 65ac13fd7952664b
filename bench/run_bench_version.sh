#!/usr/bin/env bash
# Runs bench/run_bench.sh against another PostgreSQL major version, inside the Debian
# root filesystem that carries Debian's server of that version (scripts/pg_rootfs.sh
# builds it once per machine under /var/cache/cmk_lakebase/rootfs and reuses it; the
# same one test/run_version.sh uses).
#
# Usage (root): bench/run_bench_version.sh VERSION        e.g. 17, 18
#
# Steps: make or reuse the rootfs; copy this source tree (without .git and build
# products) to /build/cmk_bench in it; there (scripts/pg_chroot.sh: private mount and
# PID namespaces) build and install cmk_lakebase against that version's PGXS and run
# bench/run_bench.sh with PG_BINDIR=/usr/lib/postgresql/VERSION/bin. Every BENCH_*
# variable of the caller's environment is passed on (BENCH_PG_SETTINGS="io_method = sync"
# for PostgreSQL 18's synchronous I/O, for instance). results.json (and chart.png, if
# the rootfs has gnuplot; it does not by default) is copied to BENCH_OUT on the host,
# default bench/latest-pgVERSION. The summary is printed as by run_bench.sh.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
version=${1:-}
if [ $# -ne 1 ] || ! [[ $version =~ ^[0-9]+$ ]]; then
	echo "usage: $0 VERSION (a major version number: 17, 18, ...)" >&2
	exit 2
fi
[ "$(id -u)" -eq 0 ] || { echo "run_bench_version.sh: must run as root (root filesystems, chroot)" >&2; exit 1; }
out=${BENCH_OUT:-$root/bench/latest-pg$version}

bash "$root/scripts/pg_rootfs.sh" "$version"
rootfs=$(bash "$root/scripts/pg_rootfs.sh" --path "$version")
dest=$rootfs/build/cmk_bench
rm -rf --one-file-system "$dest"
mkdir -p "$dest"
tar -C "$root" --exclude=./.git --exclude='*.o' --exclude='*.so' --exclude=./build --exclude=./tmp_check \
	--exclude='./bench/latest*' -cf - . | tar -C "$dest" -xf -

# The caller's BENCH_* settings, except where the results go (inside, then copied out).
passed=()
while IFS='=' read -r name _; do
	[[ $name == BENCH_* && $name != BENCH_OUT && $name != BENCH_DIR ]] && passed+=("$name=${!name}")
done < <(env)

pgconfig=/usr/lib/postgresql/$version/bin/pg_config
set +e
bash "$root/scripts/pg_chroot.sh" "$version" -- env -i \
	PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
	"${passed[@]}" BENCH_OUT=/build/cmk_bench/out PG_BINDIR="/usr/lib/postgresql/$version/bin" \
	bash -c "cd /build/cmk_bench && make -s -j2 PG_CONFIG=$pgconfig >/tmp/bench_build.log 2>&1 &&
		make -s install PG_CONFIG=$pgconfig >>/tmp/bench_build.log 2>&1 ||
		{ tail -n 30 /tmp/bench_build.log >&2; echo 'run_bench_version.sh: build failed' >&2; exit 1; }
		bash bench/run_bench.sh" </dev/null
rc=$?
set -e
if [ -f "$dest/out/results.json" ]; then
	mkdir -p "$out"
	cp "$dest/out/results.json" "$out/"
	[ ! -f "$dest/out/chart.png" ] || cp "$dest/out/chart.png" "$out/"
	echo "run_bench_version.sh: PostgreSQL $version results in $out"
fi
exit "$rc"

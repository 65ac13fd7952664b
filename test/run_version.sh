#!/usr/bin/env bash
# Builds and tests cmk_lakebase against another PostgreSQL major version, inside a
# Debian root filesystem that carries Debian's own server of that version
# (scripts/pg_rootfs.sh builds it once per machine and reuses it).
#
# Usage (root): test/run_version.sh VERSION      e.g. 17, 18, 19 (19: release candidate)
#
# Steps: make or reuse the rootfs; copy this source tree (without .git and build
# products) to /build/cmk_lakebase in it; run test/run_all.sh there (through
# scripts/pg_chroot.sh: private mount and PID namespaces) with CMK_PG_VERSION=VERSION,
# which builds with -Werror against that server's PGXS, installs into the rootfs (never
# the host's /usr/lib/postgresql), and runs pg_regress and the matrix's TAP files as
# the rootfs's "postgres" user. Its last line is run_all.sh's "N passed, M failed".
#
# Knobs: CMK_MATRIX_TESTS (the TAP files, default below), CMK_SKIP_REGRESS, MAKEFLAGS, CMK_TAP_TIMEOUT,
# CMK_KEEP_SCRATCH (kept files are under the rootfs's /tmp), CMK_ROOTFS_DIR.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ $# -eq 1 ] || {
	echo "usage: $0 VERSION" >&2
	exit 2
}
version=$1
if [ "$(id -u)" -ne 0 ]; then
	echo "run_version.sh: must run as root (root filesystems, chroot)" >&2
	exit 1
fi

# What the matrix runs on every version besides pg_regress: the tools, crash recovery,
# the marker scan, the watchdog (kill switch) and rotation on the local provider; one
# KMS provider end to end (062: Vault Transit against the loopback Vault; 060 KMIP runs on 15 only, see pg_rootfs.sh); 090 the version's own
# I/O (vectored I/O, fallocate, io_method); 089 incremental backups (17+); the Google
# identity routes (102 impersonation, 104 workload identity federation) and 105, their
# peer checked by Google's own client (google-auth 2.x exists from Debian 13 on only).
# The hung provider tests (051 a KMS, 053 a local key store on FUSE) run on 15 only.
default_tests="test/t/020_tools.pl test/t/030_crash_recovery.pl test/t/040_marker_scan.pl
test/t/050_watchdog.pl test/t/062_vault.pl test/t/070_rotation.pl test/t/087_basebackup.pl test/t/089_incremental.pl test/t/090_versions.pl
test/t/043_extension_files.pl test/t/088_encrypt.pl test/t/096_upgrade.pl
test/t/102_gcp_impersonation.pl test/t/104_gcp_workload_identity.pl test/t/105_gcp_google_auth.pl"
tests=${CMK_MATRIX_TESTS:-$default_tests}

t0=$(date +%s)
bash "$root/scripts/pg_rootfs.sh" "$version"
rootfs=$(bash "$root/scripts/pg_rootfs.sh" --path "$version")
t_rootfs=$(($(date +%s) - t0))

# A fresh copy of the tree each run: objects built for another server must not leak in.
dest=$rootfs/build/cmk_lakebase
rm -rf --one-file-system "$dest"
mkdir -p "$dest"
tar -C "$root" --exclude=./.git --exclude='*.o' --exclude='*.so' --exclude=./build --exclude=./tmp_check -cf - . | tar -C "$dest" -xf -

# The old side of the upgrade test (TAP 096): the rootfs carries Debian 12's PostgreSQL
# 15 (scripts/pg_rootfs.sh); the extension's 15 build of this tree (the host's) goes
# into it, under the paths it was built for. One make at a time in this tree.
if [ "$version" != 15 ] && [ -x "$rootfs/usr/lib/postgresql/15/bin/postgres" ] &&
	[ -x /usr/lib/postgresql/15/bin/pg_config ]; then
	flock /tmp/cmk_build15.lock make -C "$root" -s install DESTDIR="$rootfs" \
		PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config >/dev/null
fi

t1=$(date +%s)
log=$(mktemp /tmp/cmk_run_version_$version.XXXXXX)
set +e
bash "$root/scripts/pg_chroot.sh" "$version" -- env -i \
	PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
	CMK_IN_ROOTFS=1 CMK_PG_VERSION="$version" CMK_SKIP_DEPS=1 CMK_SKIP_UNIT=1 CMK_SKIP_FUZZ=1 \
	CMK_TESTS="$(echo $tests)" CMK_TAP_TIMEOUT="${CMK_TAP_TIMEOUT:-900}" \
	CMK_KEEP_SCRATCH="${CMK_KEEP_SCRATCH:-0}" CMK_SKIP_REGRESS="${CMK_SKIP_REGRESS:-0}" \
	CMK_UPSTREAM_REGRESS="${CMK_UPSTREAM_REGRESS:-0}" \
	MAKEFLAGS="${MAKEFLAGS:--j2}" \
	bash /build/cmk_lakebase/test/run_all.sh </dev/null | tee "$log"
rc=${PIPESTATUS[0]}
set -e
counts=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | tail -n 1 || true)
rm -f "$log"
[ -n "$counts" ] || counts="0 passed, 1 failed" # the inner run did not get to its summary
echo "run_version.sh: PostgreSQL $version: root filesystem ${t_rootfs}s, build and tests $(($(date +%s) - t1))s (rootfs $rootfs)"
echo "PG $version: $counts"
exit "$rc"

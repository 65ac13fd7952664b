#!/usr/bin/env bash
# Builds (once per machine) a Debian root filesystem that carries Debian's stock
# PostgreSQL VERSION and what cmk_lakebase needs to build and test against it, so that
# one Debian 12 machine can build and test the extension on every supported major
# version. Debian 12 cannot install the newer servers itself; its debootstrap can make
# a root filesystem of the release that ships them, from the same archive:
#
#   15  bookworm      (the host's own release; a rootfs is still possible, for symmetry)
#   17  trixie        (Debian 13)
#   18  sid           (unstable; forky carries it too, sid is what debootstrap knows)
#   19  sid + experimental  (postgresql-19 release candidates: not a release)
#
# Usage: scripts/pg_rootfs.sh VERSION        prints the rootfs path on its last line
#        scripts/pg_rootfs.sh --path VERSION  prints the path only, builds nothing
#
# Cache: $CMK_ROOTFS_DIR/<version> (default /var/cache/cmk_lakebase/rootfs/<version>).
# A rootfs is reused when its stamp file (.cmk_rootfs_stamp) equals what this script
# would build now (suite, mirror, package list, script revision); otherwise it is
# rebuilt from scratch. The host's apt sources are never touched: debootstrap fetches
# with its own configuration, and the rootfs's sources.list is its own.
# Mirror: $CMK_DEBIAN_MIRROR, else the host's Debian mirror from /etc/apt/sources.list*.
#
# Inside the rootfs no service ever starts (policy-rc.d says 101) and no "main" cluster
# is created (postgresql-common's createcluster.conf). Commands run in it through
# scripts/pg_chroot.sh, which mounts /proc, /dev and /dev/shm in a private mount and
# PID namespace (unshare), so the mounts and any process left behind vanish with it.
set -euo pipefail

# Bump when the way the rootfs is built changes (part of the stamp).
rootfs_revision=1

usage() {
	echo "usage: $0 [--path] VERSION    (VERSION: 15, 17, 18, 19)" >&2
	exit 2
}
path_only=0
if [ "${1:-}" = --path ]; then
	path_only=1
	shift
fi
[ $# -eq 1 ] || usage
version=$1

case "$version" in
15) suite=bookworm extra_suite= ;;
17) suite=trixie extra_suite= ;;
18) suite=sid extra_suite= ;;
19) suite=sid extra_suite=experimental ;;
*) usage ;;
esac

cache=${CMK_ROOTFS_DIR:-/var/cache/cmk_lakebase/rootfs}
rootfs=$cache/$version
stamp=$rootfs/.cmk_rootfs_stamp
if [ "$path_only" -eq 1 ]; then
	echo "$rootfs"
	exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
	echo "pg_rootfs.sh: must run as root (debootstrap, chroot)" >&2
	exit 1
fi
if ! command -v debootstrap >/dev/null; then
	echo "pg_rootfs.sh: debootstrap is missing (bash scripts/install_deps.sh installs it)" >&2
	exit 1
fi

# The host's Debian mirror: the first URI of a source that serves "bookworm" (deb822 or
# one-line format), not the security archive.
host_mirror() {
	local f line
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		awk 'BEGIN{RS=""} /Suites:[^\n]*bookworm([ \n]|$)/ && !/security/ {
			for (i = 1; i <= NF; i++) if ($i == "URIs:") { print $(i + 1); exit } }' "$f"
	done
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[ -f "$f" ] || continue
		while read -r line; do
			case "$line" in
			deb\ *bookworm*) [[ "$line" == *security* ]] || echo "$line" | awk '{
				for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' ;;
			esac
		done <"$f"
	done
}
# One build of a version at a time: a second caller (.ci/run builds the root
# filesystems in the background while the host's tests run; test/run_version.sh asks
# again later) waits here, then finds the stamp and reuses the result.
mkdir -p "$cache"
exec 9>"$cache/.$version.lock"
flock 9

mirror=${CMK_DEBIAN_MIRROR:-$(host_mirror | head -n 1)}
mirror=${mirror:-http://deb.debian.org/debian}

# What the rootfs holds: the server and its development files (PGXS, pg_regress, the
# TAP modules ship in the server-dev and client packages), the build dependencies, and
# what the matrix's TAP files use there: IPC::Run and prove, ps, nm (TAP 090), and the
# one KMS peer of the matrix, the loopback Vault of TAP 062 (python3-cryptography, and
# python3-hvac for its fidelity check; openssl for the throwaway CA; curl, with which
# the test drives the peer), and Google's own client for TAP 105, the fidelity check of
# the loopback Cloud KMS/STS/IAM Credentials peer (python3-google-auth: Debian 12's 1.5.1
# has neither impersonated nor external_account credentials, Debian 13's 2.28 and sid's
# both; python3-jwt for the peer's own token checks). The other
# providers' peers run on the host's 15 only: PyKMIP on Debian 13+'s Python answers a
# Revoke or Create after 30 s or not at all, which fails 060's kill-latency checks
# there (our server is not involved).
packages=(
	"postgresql-$version" "postgresql-client-$version" "postgresql-server-dev-$version"
	g++ make
	libkrb5-dev # gssapi/gssapi.h, included by the server's libpq/libpq-be.h
	libssl-dev libcurl4-openssl-dev rapidjson-dev
	libipc-run-perl perl procps binutils
	python3 python3-cryptography python3-hvac openssl curl
	python3-google-auth python3-requests python3-jwt
	xz-utils bzip2 # scripts/pg_upstream_regress.sh: the Sources index, the source tarball
	xfsprogs       # test/run_all.sh: XFS with reflinks on a loop device for TAP 096's --clone
)

# The newer versions' root filesystems also carry Debian 12's PostgreSQL 15 server (from
# bookworm, the host's own release, through a source pinned below every other so that
# nothing else comes from it): the old version of the major-version upgrade test
# (TAP 096, pg_cmk upgrade with pg_upgrade needs both servers in one filesystem). The
# extension's 15 build is installed into it from the host by test/run_version.sh.
old_pkgs=()
[ "$version" = 15 ] || old_pkgs=(postgresql-15 postgresql-client-15)

# The stamp: its first line names the base system (what debootstrap made), its second
# the package list. Another base is a rebuild from scratch; the same base with another
# package list only runs the package step again in place (apt-get install is
# idempotent), so adding a package to the list costs a minute, not a debootstrap.
base_stamp="revision=$rootfs_revision suite=$suite extra_suite=$extra_suite mirror=$mirror"
want_stamp=$(printf '%s\npackages=%s%s\n' "$base_stamp" "${packages[*]}" "${old_pkgs[*]:+ old:${old_pkgs[*]}}")
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want_stamp" ]; then
	echo "pg_rootfs.sh: reusing $rootfs (PostgreSQL $version, $suite${extra_suite:+ + $extra_suite})"
	echo "$rootfs"
	exit 0
fi

t0=$(date +%s)
new=$rootfs.new
# (The base is read field by field: an older stamp had one field a line.)
stamp_base=
[ ! -f "$stamp" ] || stamp_base=$(grep -E '^(revision|suite|extra_suite|mirror)=' "$stamp" | tr '\n' ' ' | sed 's/ *$//')
if [ "$stamp_base" = "$base_stamp" ]; then
	echo "pg_rootfs.sh: $rootfs: same base system, package list changed: installing in place"
	work=$rootfs
else
	echo "pg_rootfs.sh: building $rootfs: $suite${extra_suite:+ + $extra_suite} from $mirror"
	work=$new
	rm -rf --one-file-system "$rootfs"
	# A base system that debootstrap finished for the same suite and mirror (an earlier
	# run stopped while installing packages) is taken up again: debootstrap is most of
	# the time.
	if [ -f "$new/.cmk_debootstrap_done" ] && [ "$(cat "$new/.cmk_debootstrap_done")" = "$base_stamp" ]; then
		echo "pg_rootfs.sh: taking up the base system debootstrap made in $new"
	else
		rm -rf --one-file-system "$new"
		mkdir -p "$cache"
		# minbase: apt, dpkg and the essential set only; the rest comes through apt with
		# --no-install-recommends (debootstrap's own resolver would pull recommends).
		debootstrap --variant=minbase --include=ca-certificates "$suite" "$new" "$mirror" \
			>"$cache/debootstrap-$version.log" 2>&1 || {
			tail -n 40 "$cache/debootstrap-$version.log" >&2
			echo "pg_rootfs.sh: debootstrap failed (log: $cache/debootstrap-$version.log)" >&2
			exit 1
		}
		echo "$base_stamp" >"$new/.cmk_debootstrap_done"
		echo "pg_rootfs.sh: debootstrap done in $(($(date +%s) - t0))s"
	fi
fi

# The rootfs's own apt configuration (its sources.list and apt.conf.d, used by the apt
# that runs chrooted in it); the host's /etc/apt is never read or written.
{
	echo "deb $mirror $suite main"
	[ -z "$extra_suite" ] || echo "deb $mirror $extra_suite main"
	[ ${#old_pkgs[@]} -eq 0 ] || echo "deb $mirror bookworm main"
} >"$work/etc/apt/sources.list"
rm -f "$work/etc/apt/sources.list.d/bookworm.list" "$work/etc/apt/preferences.d/bookworm"
if [ ${#old_pkgs[@]} -gt 0 ]; then
	mkdir -p "$work/etc/apt/preferences.d"
	printf 'Package: *\nPin: release n=bookworm\nPin-Priority: 100\n' >"$work/etc/apt/preferences.d/cmk-bookworm"
fi
cp /etc/resolv.conf "$work/etc/resolv.conf" 2>/dev/null || true
# The archive a machine reaches may be a frozen copy, whose unstable and experimental
# Release files are past their Valid-Until date (apt then refuses them). Signatures are
# still checked; only the freshness check is off, and only inside the rootfs.
echo 'Acquire::Check-Valid-Until "false";' >"$work/etc/apt/apt.conf.d/99cmk-archive-copy"
# No daemon starts inside the rootfs, and no "main" cluster is made.
printf '#!/bin/sh\nexit 101\n' >"$work/usr/sbin/policy-rc.d"
chmod 755 "$work/usr/sbin/policy-rc.d"
mkdir -p "$work/etc/postgresql-common"
echo "create_main_cluster = false" >"$work/etc/postgresql-common/createcluster.conf"

# The server packages come from the extra suite (experimental) when there is one.
pg_pkgs=("${packages[@]:0:3}")
other_pkgs=("${packages[@]:3}")
target=()
[ -z "$extra_suite" ] || target=(-t "$extra_suite")
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
apt_opts=(-y -q --no-install-recommends -o Dpkg::Options::=--force-confold)
if ! bash "$here/pg_chroot.sh" --rootfs "$work" -- env DEBIAN_FRONTEND=noninteractive sh -c "
	set -e
	apt-get update -q
	apt-get install ${apt_opts[*]} ${other_pkgs[*]}
	apt-get install ${apt_opts[*]} ${target[*]} ${pg_pkgs[*]}
	${old_pkgs[*]:+apt-get install ${apt_opts[*]} -t bookworm ${old_pkgs[*]}}
	apt-get clean
	rm -rf /var/lib/apt/lists/*
" >"$cache/apt-$version.log" 2>&1; then
	tail -n 40 "$cache/apt-$version.log" >&2
	echo "pg_rootfs.sh: installing packages failed (log: $cache/apt-$version.log)" >&2
	exit 1
fi
if [ ! -x "$work/usr/lib/postgresql/$version/bin/pg_config" ]; then
	echo "pg_rootfs.sh: no /usr/lib/postgresql/$version/bin/pg_config in $work" >&2
	exit 1
fi

rm -f "$work/.cmk_debootstrap_done"
echo "$want_stamp" >"$work/.cmk_rootfs_stamp"
[ "$work" = "$rootfs" ] || mv "$new" "$rootfs"
server=$(chroot "$rootfs" "/usr/lib/postgresql/$version/bin/pg_config" --version)
echo "pg_rootfs.sh: ready $rootfs ($server, $(du -sh --one-file-system "$rootfs" | cut -f1)) in $(($(date +%s) - t0))s"
echo "$rootfs"

#!/usr/bin/env bash
# Runs one command inside a root filesystem made by scripts/pg_rootfs.sh, as root.
#
# Usage: scripts/pg_chroot.sh VERSION -- COMMAND [ARGS]
#        scripts/pg_chroot.sh --rootfs DIR -- COMMAND [ARGS]
#
# Why unshare and not a plain chroot: the command runs in a private mount namespace and
# a PID namespace of its own. /proc (of that PID namespace), /dev (bound from the host)
# and a fresh /dev/shm (PostgreSQL's dynamic shared memory) are mounted there only, so
# nothing is left mounted on the host whatever happens, and every process the command
# leaves behind (a server a test did not stop) ends when it returns. systemd-nspawn
# would do the same but is not on a minimal Debian 12; unshare is in util-linux.
# Exit status: the command's.
set -euo pipefail

usage() {
	echo "usage: $0 VERSION|--rootfs DIR -- COMMAND [ARGS]" >&2
	exit 2
}
[ $# -ge 3 ] || usage
if [ "$1" = --rootfs ]; then
	rootfs=$2
	shift 2
else
	rootfs=$(bash "$(dirname "${BASH_SOURCE[0]}")/pg_rootfs.sh" --path "$1")
	shift
fi
[ "$1" = -- ] || usage
shift
if [ "$(id -u)" -ne 0 ]; then
	echo "pg_chroot.sh: must run as root" >&2
	exit 1
fi
if [ ! -x "$rootfs/bin/sh" ]; then
	echo "pg_chroot.sh: $rootfs is not a root filesystem (build it with scripts/pg_rootfs.sh)" >&2
	exit 1
fi

# PID 1 of the new namespace is this inner bash (not exec'd: it reaps orphans, and
# when it returns the kernel ends whatever is left in the namespace).
unshare --mount --pid --fork --propagation private -- bash -c '
	set -e
	r=$1
	shift
	mount -t proc proc "$r/proc"
	mount --rbind /dev "$r/dev"
	mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$r/dev/shm"
	set +e
	chroot "$r" "$@"
	exit $?
' pg_chroot "$rootfs" "$@"

#!/usr/bin/env bash
# Runs every test of cmk_lakebase: installs the packages, builds with -Werror, installs
# the extension, then runs the GoogleTest units, pg_regress (on a temporary encrypted
# instance, test/run_regress.sh) and the TAP tests (test/t/*.pl, prove) as the
# "postgres" OS user (initdb refuses root). Prints a summary; the last line is
# "N passed, M failed", counting GoogleTest tests, pg_regress tests and TAP
# assertions (a TAP file that dies or bails out counts at least one failure; a step
# that cannot run at all, e.g. the build, counts one failure). Exits non-zero if
# anything failed.
#
# As root (CI):       bash test/run_all.sh
# As another user:    CMK_SKIP_INSTALL=1 bash test/run_all.sh
#                     (packages and the product must already be installed; builds and
#                      runs the unit tests in the work tree, runs the rest as you)
# Other knobs:        CMK_TESTS="test/t/010_refusals.pl ..." runs only those TAP files;
#                     CMK_KEEP_SCRATCH=1 keeps the scratch directory even on success;
#                     CMK_SKIP_UNIT=1 / CMK_SKIP_FUZZ=1 / CMK_SKIP_REGRESS=1 skip those
#                     stages (for quick runs of a few TAP files; CI runs everything);
#                     CMK_FUZZ_SECONDS (default 20) is each fuzz target's time;
#                     CMK_UPSTREAM_REGRESS=1 adds PostgreSQL's own regression suite on
#                     an encrypted and a plaintext cluster (scripts/pg_upstream_regress.sh).
# Versions:           the host's PostgreSQL 15 runs everything above; each other major
#                     version in CMK_VERSIONS (default "15 17 18"; "15" for a quick run)
#                     then runs its matrix subset in a Debian root filesystem of its own
#                     (test/run_version.sh, scripts/pg_rootfs.sh), one summary line per
#                     version; CMK_VERSION_JOBS (default 2) of them side by side.
#                     CMK_PG_VERSION=NN (or PG_CONFIG=...) builds and tests
#                     against another installed major version instead of 15: that is
#                     how test/run_version.sh runs this script inside a rootfs;
#                     CMK_SKIP_DEPS=1 skips the package installation there.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

t_start=$(date +%s)
export PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/${CMK_PG_VERSION:-15}/bin/pg_config}
pg_version=$("$PG_CONFIG" --version | sed -n 's/^PostgreSQL \([0-9][0-9]*\).*/\1/p')
pg_bindir=$("$PG_CONFIG" --bindir)
pgxs_root=$(dirname "$(dirname "$(dirname "$("$PG_CONFIG" --pgxs)")")") # .../lib/pgxs
pgxs_perl=$pgxs_root/src/test/perl
pg_regress=$pgxs_root/src/test/regress/pg_regress
echo "== PostgreSQL $("$PG_CONFIG" --version | awk '{print $2}') ($PG_CONFIG)"
tap_timeout=${CMK_TAP_TIMEOUT:-900}

total_pass=0
total_fail=0
summary=()

record() { # record NAME PASSED FAILED [NOTE]
	total_pass=$((total_pass + $2))
	total_fail=$((total_fail + $3))
	local verdict=PASS
	[ "$3" -eq 0 ] || verdict=FAIL
	summary+=("$(printf '%-4s %-34s %5d passed %5d failed  %s' "$verdict" "$1" "$2" "$3" "${4:-}")")
}

finish() {
	local elapsed=$(($(date +%s) - t_start))
	echo
	echo "============ cmk_lakebase test summary (PostgreSQL $pg_version) ============"
	local line
	for line in "${summary[@]}"; do echo "$line"; done
	echo "total time: ${elapsed}s"
	echo "${total_pass} passed, ${total_fail} failed"
	[ "$total_fail" -eq 0 ]
	exit $?
}

# Prints a log, shortened in the middle when it is very long (keeps CI logs readable).
show_log() {
	local n
	n=$(wc -l <"$1")
	if [ "$n" -gt 4000 ]; then
		head -n 2000 "$1"
		echo "... [run_all.sh: $((n - 3000)) lines omitted] ..."
		tail -n 1000 "$1"
	else
		cat "$1"
	fi
}

is_root=0
[ "$(id -u)" -eq 0 ] && is_root=1
if [ "$is_root" -eq 0 ] && [ "${CMK_SKIP_INSTALL:-0}" != 1 ]; then
	echo "run_all.sh: run as root (it installs packages and the extension)," >&2
	echo "            or set CMK_SKIP_INSTALL=1 to test an installed product as yourself" >&2
	exit 1
fi

logdir=$(mktemp -d /tmp/cmk_run_all_logs.XXXXXX)
chmod 755 "$logdir"

# --- 1. dependencies, build, install
if [ "$is_root" -eq 1 ] && [ "${CMK_SKIP_INSTALL:-0}" != 1 ] && [ "${CMK_SKIP_DEPS:-0}" != 1 ]; then
	echo "== installing packages"
	if ! bash scripts/install_deps.sh; then
		record "install packages" 0 1
		finish
	fi
fi

echo "== include rule (scripts/check_layers.sh)"
if bash scripts/check_layers.sh; then
	record "include rule" 1 0
else
	record "include rule" 0 1 "see check_layers output above"
fi

echo "== make WERROR=-Werror"
if ! make PG_CONFIG="$PG_CONFIG" WERROR=-Werror >"$logdir/make.log" 2>&1; then
	tail -n 80 "$logdir/make.log"
	record "build (-Werror)" 0 1 "see make output above"
	finish
fi
record "build (-Werror)" 1 0

if [ "$is_root" -eq 1 ] && [ "${CMK_SKIP_INSTALL:-0}" != 1 ]; then
	echo "== make install"
	if ! make PG_CONFIG="$PG_CONFIG" install >"$logdir/install.log" 2>&1; then
		tail -n 40 "$logdir/install.log"
		record "make install" 0 1
		finish
	fi
	record "make install" 1 0
fi

# --- 2. GoogleTest units: the pure C++ core, then the file layer preloaded by itself
run_gtest() { # name binary
	local name=$1 bin=$2 log rc p f
	log="$logdir/$(basename "$bin").log"
	set +e
	timeout -k 10 600 "$bin" >"$log" 2>&1
	rc=$?
	set -e
	show_log "$log"
	p=$(sed -n 's/^\[  PASSED  \] \([0-9][0-9]*\) test.*/\1/p' "$log" | tail -n 1)
	f=$(sed -n 's/^\[  FAILED  \] \([0-9][0-9]*\) test.*/\1/p' "$log" | tail -n 1)
	p=${p:-0}
	f=${f:-0}
	if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
		f=1 # crashed or timed out before its summary
	fi
	record "$name" "$p" "$f" "exit $rc"
}
echo "== unit tests (GoogleTest)"
if [ "${CMK_SKIP_UNIT:-0}" = 1 ]; then
	echo "(skipped: CMK_SKIP_UNIT=1)"
elif make PG_CONFIG="$PG_CONFIG" WERROR=-Werror unit >"$logdir/unit_build.log" 2>&1; then
	run_gtest "unit tests (GoogleTest)" build/cmk_unit_tests
	run_gtest "file layer tests (GoogleTest, preloaded)" build/cmk_layer_tests
	if make PG_CONFIG="$PG_CONFIG" WERROR=-Werror unit-sanitize >"$logdir/sanitize_build.log" 2>&1; then
		run_gtest "unit tests under ASan+UBSan" build/sanitize/cmk_unit_tests
	else
		tail -n 40 "$logdir/sanitize_build.log"
		record "unit tests under ASan+UBSan: build" 0 1
	fi
else
	tail -n 80 "$logdir/unit_build.log"
	record "unit tests: build" 0 1
fi

# --- 2b. libFuzzer targets (fuzz/): each parser of untrusted bytes for a bounded time
# (CMK_FUZZ_SECONDS per target, default 20), regressions first; a target counts as one
# test, passed or failed.
echo "== fuzzing (libFuzzer, test/run_fuzz.sh)"
if [ "${CMK_SKIP_FUZZ:-0}" = 1 ]; then
	echo "(skipped: CMK_SKIP_FUZZ=1)"
else
	set +e
	timeout -k 10 900 bash test/run_fuzz.sh >"$logdir/fuzz.log" 2>&1
	fuzz_rc=$?
	set -e
	show_log "$logdir/fuzz.log"
	fuzz_p=$(grep -c '^PASS ' "$logdir/fuzz.log" || true)
	fuzz_f=$(grep -c '^FAIL ' "$logdir/fuzz.log" || true)
	if [ "$fuzz_rc" -ne 0 ] && [ "$fuzz_f" -eq 0 ]; then
		fuzz_f=1 # the script itself failed or timed out
	fi
	record "fuzzing (libFuzzer)" "$fuzz_p" "$fuzz_f" "exit $fuzz_rc"
fi

# --- 3. scratch directory for the server tests, writable by the test user
if [ "$is_root" -eq 1 ]; then
	test_user=postgres
	as_user() { runuser -u postgres -- "$@"; }
else
	test_user=$(id -un)
	as_user() { "$@"; }
fi
scratch=$(mktemp -d /tmp/cmk_tests.XXXXXX)
chmod 755 "$scratch"
cp -a test sql "$scratch/"
[ "$is_root" -eq 1 ] && chown -R postgres: "$scratch" "$logdir"
cd "$scratch"

test_env=(env -u PGPORT -u PGHOST -u PGDATA -u PGDATABASE -u PGUSER
	PATH="$pg_bindir:$PATH"
	PERL5LIB="$pgxs_perl:$scratch/test/perl"
	PG_REGRESS="$pg_regress"
	PG_BINDIR="$pg_bindir"
	TESTDIR="$scratch"
	TESTDATADIR="$scratch/tmp_check"  # 17+: else tmp_check and log are relative paths
	TESTLOGDIR="$scratch/tmp_check/log"
	HOME="$(getent passwd "$test_user" | cut -d: -f6)")

# Stops any server a test left running under the scratch directory.
stop_leftovers() {
	local pidfile
	while IFS= read -r pidfile; do
		as_user "${test_env[@]}" pg_ctl -D "$(dirname "$pidfile")" -m immediate -w stop \
			>/dev/null 2>&1 || true
	done < <(find "$scratch" -name postmaster.pid 2>/dev/null)
}

# --- 4. pg_regress on an encrypted instance
echo "== pg_regress (encrypted instance)"
if [ "${CMK_SKIP_REGRESS:-0}" = 1 ]; then
	echo "(skipped: CMK_SKIP_REGRESS=1)"
else
set +e
as_user "${test_env[@]}" timeout -k 10 600 bash "$scratch/test/run_regress.sh" \
	>"$logdir/regress.log" 2>&1
regress_rc=$?
set -e
show_log "$logdir/regress.log"
r_total=$(grep -Eo 'All [0-9]+ tests passed' "$logdir/regress.log" | grep -Eo '[0-9]+' | tail -n 1 || true)
if [ -n "$r_total" ]; then
	r_pass=$r_total
	r_fail=0
else
	r_fail=$(grep -Eo '[0-9]+ of [0-9]+ tests failed' "$logdir/regress.log" | head -n 1 || true)
	if [ -n "$r_fail" ]; then
		r_all=$(echo "$r_fail" | awk '{print $3}')
		r_fail=$(echo "$r_fail" | awk '{print $1}')
		r_pass=$((r_all - r_fail))
	else
		r_pass=0
		r_fail=1
	fi
fi
if [ "$regress_rc" -ne 0 ] && [ "$r_fail" -eq 0 ]; then
	r_fail=1
fi
record "pg_regress" "$r_pass" "$r_fail" "exit $regress_rc"
fi

# --- 4b. PostgreSQL's own regression suite, encrypted against plaintext (optional:
# CMK_UPSTREAM_REGRESS=1; about 5 minutes a version; scripts/pg_upstream_regress.sh)
if [ "${CMK_UPSTREAM_REGRESS:-0}" = 1 ] && [ "$is_root" -eq 1 ]; then
	echo "== PostgreSQL's own regression suite, encrypted and plaintext (scripts/pg_upstream_regress.sh)"
	set +e
	bash "$root/scripts/pg_upstream_regress.sh" "$pg_version" >"$logdir/upstream_regress.log" 2>&1 </dev/null
	u_rc=$?
	set -e
	show_log "$logdir/upstream_regress.log"
	if [ "$u_rc" -eq 0 ]; then
		record "upstream regression (same lists)" 1 0 "exit 0"
	elif [ "$u_rc" -eq 3 ]; then
		record "upstream regression (no source)" 0 0 "blocked: the archive serves no source tarball"
	else
		record "upstream regression (same lists)" 0 1 "exit $u_rc"
	fi
fi

# --- 5. TAP
if [ -n "${CMK_TESTS:-}" ]; then
	read -r -a tap_files <<<"$CMK_TESTS"
else
	tap_files=(test/t/*.pl)
fi

# Mounts made as root for a TAP file, undone on any exit (cleanup_mounts, also called
# after the TAP files).
reflink_mounted=0
hang_pid=
hang_dir=
cleanup_mounts() {
	if [ "$reflink_mounted" -eq 1 ]; then
		umount "$scratch/reflink" 2>/dev/null || true
		rm -f "$scratch/reflink.img"
		reflink_mounted=0
	fi
	if [ -n "$hang_dir" ]; then
		local d=$hang_dir p=$hang_pid
		hang_dir= # once only, even if a step below fails
		hang_pid=
		rm -f "$d/control/hang" # release anything held, then stop it (SIGTERM unmounts)
		if [ -n "$p" ] && kill "$p" 2>/dev/null; then
			for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
			kill -9 "$p" 2>/dev/null || true
		fi
		# /proc/mounts, not mountpoint(1): a mount whose daemon died fails its stat
		if grep -qF " $d/mnt " /proc/mounts; then
			fusermount3 -u -z "$d/mnt" 2>/dev/null || umount -l "$d/mnt" || true
		fi
		if ! grep -qF " $d/mnt " /proc/mounts; then
			rm -rf "$d" || true
		fi
	fi
}
trap cleanup_mounts EXIT

# A FUSE file system that can hang for TAP 053 (a local key store on a hung NFS mount,
# test/kms/hang_fs.py): mounted as root (here /dev/fuse is root's only) with
# allow_other, its backing directory, mount point and control directory owned by the
# test user, outside the scratch directory (so that no find or rm walks a held mount).
# If it cannot be mounted, 053 skips with the reason given in CMK_TEST_HANG_FS_SKIP.
if printf '%s\n' "${tap_files[@]}" | grep -q 053_local_store_hang; then
	hang_why=
	if [ "$is_root" -ne 1 ]; then
		hang_why="run_all.sh is not root (only root mounts FUSE here)"
	elif [ ! -c /dev/fuse ]; then
		hang_why="no /dev/fuse (FUSE module missing?)"
	elif ! /usr/bin/python3 -c 'import fuse' 2>/dev/null; then
		hang_why="python3-fuse is not installed (scripts/install_deps.sh)"
	else
		hang_dir=$(mktemp -d /tmp/cmk_hang_fs.XXXXXX)
		chmod 755 "$hang_dir"
		mkdir -m 700 "$hang_dir/backing" "$hang_dir/mnt" "$hang_dir/control"
		chown "$test_user": "$hang_dir/backing" "$hang_dir/mnt" "$hang_dir/control"
		/usr/bin/python3 "$root/test/kms/hang_fs.py" --backing "$hang_dir/backing" \
			--mountpoint "$hang_dir/mnt" --control "$hang_dir/control/hang" \
			--lifetime $((tap_timeout + 300)) --log "$logdir/hang_fs.log" \
			>"$logdir/hang_fs.out" 2>&1 </dev/null &
		hang_pid=$!
		for _ in $(seq 100); do
			mountpoint -q "$hang_dir/mnt" && break
			kill -0 "$hang_pid" 2>/dev/null || break
			sleep 0.1
		done
		if ! mountpoint -q "$hang_dir/mnt"; then
			hang_why="FUSE could not be mounted: $(tr '\n' ' ' <"$logdir/hang_fs.out" | cut -c1-200)"
			cleanup_mounts
		fi
	fi
	if [ -z "$hang_why" ]; then
		echo "== a FUSE file system that can hang for TAP 053 at $hang_dir/mnt (test/kms/hang_fs.py)"
		test_env+=(CMK_TEST_HANG_FS="$hang_dir/mnt" CMK_TEST_HANG_CONTROL="$hang_dir/control/hang")
	else
		echo "== no FUSE file system for TAP 053: $hang_why"
		test_env+=(CMK_TEST_HANG_FS_SKIP="$hang_why")
	fi
fi

# A filesystem with reflinks for TAP 096's pg_cmk upgrade --clone (the scratch
# filesystem, ext4, has none): XFS on a loop device, made as root only when 096 runs on
# a version newer than 15, unmounted on exit. Inside a version's root filesystem
# (test/run_version.sh) the mount lives in pg_chroot.sh's private mount namespace and
# vanishes with it anyway. If it cannot be made, 096 says so and skips that part.
if [ "$is_root" -eq 1 ] && [ "$pg_version" != 15 ] && printf '%s\n' "${tap_files[@]}" | grep -q 096_upgrade; then
	if command -v mkfs.xfs >/dev/null && mkdir -p "$scratch/reflink" &&
		truncate -s 4G "$scratch/reflink.img" && mkfs.xfs -q -m reflink=1 "$scratch/reflink.img" &&
		mount -o loop "$scratch/reflink.img" "$scratch/reflink" 2>"$logdir/reflink_mount.log"; then
		reflink_mounted=1
		chown postgres: "$scratch/reflink"
		test_env+=(CMK_TEST_REFLINK_DIR="$scratch/reflink")
		echo "== a filesystem with reflinks for TAP 096: XFS on a loop device at $scratch/reflink"
	else
		echo "== no filesystem with reflinks (mkfs.xfs or a loop device missing): TAP 096 skips --clone"
		rm -f "$scratch/reflink.img"
	fi
fi

for f in "${tap_files[@]}"; do
	[ -e "$f" ] || continue
	name=$(basename "$f" .pl)
	echo "== TAP $f"
	t0=$(date +%s)
	set +e
	as_user "${test_env[@]}" timeout -k 10 "$tap_timeout" prove -v --timer "$f" \
		>"$logdir/tap_$name.log" 2>&1
	tap_rc=$?
	set -e
	stop_leftovers
	show_log "$logdir/tap_$name.log"
	tests=$(sed -n 's/^Files=[0-9]*, Tests=\([0-9]*\),.*/\1/p' "$logdir/tap_$name.log" | tail -n 1)
	tests=${tests:-0}
	failed=$(sed -n 's/.*Failed \([0-9]*\)\/[0-9]* subtests.*/\1/p' "$logdir/tap_$name.log" | tail -n 1)
	failed=${failed:-0}
	if [ "$tap_rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
		failed=1 # died, bailed out, bad plan or timed out
	fi
	passed=$((tests - failed))
	[ "$passed" -ge 0 ] || passed=0
	if [ "$tap_rc" -ne 0 ]; then
		echo "---- $name failed: last lines of its logs ----"
		for lf in "$scratch/tmp_check/log/regress_log_$name" "$scratch"/tmp_check/log/"${name}"_*.log; do
			[ -f "$lf" ] || continue
			echo "---- $lf"
			tail -n 120 "$lf"
		done
	fi
	record "TAP $name" "$passed" "$failed" "exit $tap_rc, $(($(date +%s) - t0))s"
done
cleanup_mounts

# --- 6. the other major versions, each in a Debian root filesystem of its own
# They run side by side (CMK_VERSION_JOBS, default 2): most of a matrix run is TAP
# files waiting on servers, crashes and watchdog intervals, so two overlap well on two
# cores; each is in its own mount and PID namespace, and the nodes pick free ports.
if [ -z "${CMK_IN_ROOTFS:-}" ]; then
	versions=()
	for v in ${CMK_VERSIONS-15 17 18}; do
		[ "$v" != "$pg_version" ] || continue
		if [ "$is_root" -ne 1 ]; then
			echo "== PG $v: skipped (root filesystems need root)"
			continue
		fi
		versions+=("$v")
	done
	declare -A v_pid v_t0
	running=0
	for v in "${versions[@]}"; do
		if [ "$running" -ge "${CMK_VERSION_JOBS:-2}" ]; then
			wait -n || true
			running=$((running - 1))
		fi
		echo "== PG $v: test/run_version.sh in its own Debian root filesystem (log shown when it ends)"
		v_t0[$v]=$(date +%s)
		bash "$root/test/run_version.sh" "$v" >"$logdir/version_$v.log" 2>&1 </dev/null &
		v_pid[$v]=$!
		running=$((running + 1))
	done
	for v in "${versions[@]}"; do
		set +e
		wait "${v_pid[$v]}"
		v_rc=$?
		set -e
		echo "== PG $v: run_version.sh output"
		show_log "$logdir/version_$v.log"
		v_line=$(grep -E "^PG $v: [0-9]+ passed, [0-9]+ failed$" "$logdir/version_$v.log" | tail -n 1 || true)
		v_pass=$(echo "$v_line" | awk '{print $3}')
		v_fail=$(echo "$v_line" | awk '{print $5}')
		v_pass=${v_pass:-0}
		v_fail=${v_fail:-0}
		if [ "$v_rc" -ne 0 ] && [ "$v_fail" -eq 0 ]; then
			v_fail=1
		fi
		record "PG $v (matrix in its rootfs)" "$v_pass" "$v_fail" \
			"exit $v_rc, $(($(date +%s) - v_t0[$v]))s"
	done
fi

cd "$root"
if [ "$total_fail" -eq 0 ] && [ "${CMK_KEEP_SCRATCH:-0}" != 1 ]; then
	rm -rf "$scratch" "$logdir"
else
	echo "run_all.sh: test files kept in $scratch, logs in $logdir"
fi
finish

#!/usr/bin/env bash
# PostgreSQL's own regression suite (src/test/regress, installcheck with its
# parallel_schedule) on an encrypted cluster and on a plaintext one of the same
# version, side by side: prints both lists of failing tests and their difference, and
# exits 0 only when the two lists are the same (issue 17: "passes on an encrypted
# cluster exactly as on a plaintext one"). Tests that fail on both fail for reasons of
# the environment (locale, settings of a throwaway cluster), not of the encryption.
#
# Usage (as root: the servers run as the "postgres" OS user):
#   scripts/pg_upstream_regress.sh [VERSION]       default: 15 (the host's)
# Newer versions run inside their root filesystem:
#   bash scripts/pg_chroot.sh 18 -- bash /build/cmk_lakebase/scripts/pg_upstream_regress.sh 18
# (test/run_version.sh copies the tree to /build/cmk_lakebase; CMK_UPSTREAM_REGRESS=1 makes
# test/run_all.sh run this script as one of its steps, on every version).
#
# The suite comes from Debian's source package of that major version: the .orig
# tarball listed in the archive's Sources index (checked against its SHA-256 there),
# cached in $CMK_SRC_DIR (default /var/cache/cmk_lakebase/src). The installed server's
# own upstream version is taken when the archive serves it, else the newest the archive
# serves of the same major (printed). regress.so is built from the tarball's
# regress.c against the installed server headers; autoinc and refint are the installed
# contrib modules.
set -euo pipefail

version=${1:-15}
bindir=/usr/lib/postgresql/$version/bin
pg_config=$bindir/pg_config
[ -x "$pg_config" ] || {
	echo "pg_upstream_regress.sh: PostgreSQL $version is not installed here ($pg_config)" >&2
	exit 2
}
[ "$(id -u)" -eq 0 ] || {
	echo "pg_upstream_regress.sh: run as root (the servers run as the postgres OS user)" >&2
	exit 2
}
for tool in curl xz bzip2 gcc sha256sum runuser; do
	command -v "$tool" >/dev/null || {
		echo "pg_upstream_regress.sh: $tool is missing (scripts/install_deps.sh, scripts/pg_rootfs.sh install it)" >&2
		exit 2
	}
done
cache=${CMK_SRC_DIR:-/var/cache/cmk_lakebase/src}
mkdir -p "$cache"

# --- the source tarball
mirror=${CMK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${mirror%/debian}/debian-security
installed=$(dpkg-query -W -f='${Version}' "postgresql-$version" 2>/dev/null | sed 's/-[^-]*$//') || true
# "sha256 size name directory base" for every orig tarball of postgresql-$version the
# archive lists, the installed upstream version first.
candidates() {
	local base suite
	for spec in "$mirror bookworm" "$mirror trixie" "$mirror sid" "$mirror experimental" \
		"$security bookworm-security" "$security trixie-security"; do
		set -- $spec
		base=$1 suite=$2
		curl -fsS -m 120 "$base/dists/$suite/main/source/Sources.xz" 2>/dev/null | xz -dc 2>/dev/null |
			awk -v pkg="postgresql-$version" -v base="$base" 'BEGIN { RS = "" }
				$0 ~ "(^|\n)Package: " pkg "\n" {
					dir = ""; n = split($0, l, "\n")
					for (i = 1; i <= n; i++) if (l[i] ~ /^Directory: /) dir = substr(l[i], 12)
					ins = 0
					for (i = 1; i <= n; i++) {
						if (l[i] ~ /^Checksums-Sha256:/) { ins = 1; continue }
						if (ins && l[i] !~ /^ /) ins = 0
						if (ins && l[i] ~ /\.orig\.tar\./) { split(l[i], f, " "); print f[1], f[2], f[3], dir, base }
					}
				}' || true
	done | sort -u | awk -v want="postgresql-${version}_${installed}.orig" '
		{ line[NR] = $0; first = index($3, want) == 1 ? NR : first }
		END { if (first) print line[first]; for (i = NR; i >= 1; i--) if (i != first) print line[i] }'
}
tarball=
while read -r sha size name dir base; do
	[ -n "$name" ] || continue
	if [ ! -f "$cache/$name" ]; then
		curl -fsS -m 600 -o "$cache/$name.part" "$base/$dir/$name" 2>/dev/null || {
			rm -f "$cache/$name.part"
			echo "pg_upstream_regress.sh: $base/$dir/$name: not served by this archive"
			continue
		}
		mv "$cache/$name.part" "$cache/$name"
	fi
	if [ "$(sha256sum "$cache/$name" | cut -d' ' -f1)" != "$sha" ]; then
		echo "pg_upstream_regress.sh: $name does not match the SHA-256 of the Sources index: removed" >&2
		rm -f "$cache/$name"
		continue
	fi
	tarball=$cache/$name
	break
done < <(candidates)
if [ -z "$tarball" ]; then
	echo "pg_upstream_regress.sh: BLOCKED: the Debian archive reachable here serves no source tarball of" \
		"postgresql-$version (its Sources index lists one, the pool does not have the file)" >&2
	exit 3
fi
src_version=$(basename "$tarball" | sed -E 's/^postgresql-[0-9]+_(.*)\.orig\.tar\..*$/\1/')
echo "== PostgreSQL $version: installed $installed, regression suite of $src_version ($(basename "$tarball"))"

work=$(mktemp -d /tmp/cmk_upstream_regress.XXXXXX)
chown postgres: "$work"
servers=()
cleanup() {
	for d in "${servers[@]}"; do
		runuser -u postgres -- "$bindir/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1 || true
	done
	if [ "${CMK_KEEP_SCRATCH:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

tar -C "$work" -xjf "$tarball" --strip-components=1 --wildcards '*/src/test/regress/*'
regress=$work/src/test/regress
dl=$work/dl
mkdir -p "$dl"
gcc -O2 -fPIC -shared -I"$("$pg_config" --includedir-server)" -o "$dl/regress.so" "$regress/regress.c"
for m in autoinc refint; do ln -s "$("$pg_config" --pkglibdir)/$m.so" "$dl/$m.so"; done
pg_regress=$("$pg_config" --pkglibdir)/pgxs/src/test/regress/pg_regress
chown -R postgres: "$work"

# --- one cluster per mode, the suite against each
run_suite() {
	local mode=$1 data=$work/$1/data sock=$work/$1 port
	mkdir -p "$work/$mode"
	chown postgres: "$work/$mode"
	if [ "$mode" = encrypted ]; then
		mkdir -p "$work/keys"
		chmod 700 "$work/keys"
		chown postgres: "$work/keys"
		runuser -u postgres -- "$bindir/pg_cmk" initdb -D "$data" --key-store "$work/keys" -- \
			--locale=C -E UTF8 -k >"$work/$mode/initdb.log" 2>&1
	else
		runuser -u postgres -- "$bindir/initdb" -D "$data" --locale=C -E UTF8 -k >"$work/$mode/initdb.log" 2>&1
	fi
	port=$(( (RANDOM % 10000) + 40000 ))
	cat >>"$data/postgresql.conf" <<-EOF
		listen_addresses = ''
		unix_socket_directories = '$sock'
		port = $port
		max_prepared_transactions = 10
		fsync = off
	EOF
	servers+=("$data")
	runuser -u postgres -- "$bindir/pg_ctl" -D "$data" -l "$work/$mode/server.log" -w start >/dev/null
	set +e
	(cd "$work/$mode" && runuser -u postgres -- env PGHOST="$sock" PGPORT="$port" "$pg_regress" \
		--inputdir="$regress" --bindir="$bindir" --dlpath="$dl" --host="$sock" --port="$port" \
		--schedule="$regress/parallel_schedule" --max-concurrent-tests=20 --outputdir="$work/$mode/out" \
		>"$work/$mode/pg_regress.out" 2>&1)
	set -e
	# "ok 12 + name ..." / "not ok 12 + name ..." (16+), "test name ... ok|FAILED" (15)
	sed -nE 's/^not ok +[0-9]+ +[-+] +([A-Za-z0-9_]+).*/\1/p; s/^ *(test +)?([A-Za-z0-9_]+) +\.\.\. +FAILED.*/\2/p' \
		"$work/$mode/pg_regress.out" | sort -u >"$work/$mode.failed"
	sed -nE 's/^(not )?ok +[0-9]+ +[-+] +([A-Za-z0-9_]+).*/\2/p; s/^ *(test +)?([A-Za-z0-9_]+) +\.\.\. +(ok|FAILED).*/\2/p' \
		"$work/$mode/pg_regress.out" | sort -u >"$work/$mode.ran"
	runuser -u postgres -- "$bindir/pg_ctl" -D "$data" -m fast -w stop >/dev/null
	if [ "$mode" = encrypted ]; then
		# The suite ran against ciphertext: the regression database's files hold none of
		# the suite's plaintext (a row of tenk1, loaded by the suite from its data files).
		if grep -rqa --exclude-dir=cmk_lakebase 'AAAAxx' "$data/base"; then
			echo "pg_upstream_regress.sh: plaintext rows of tenk1 found in the encrypted cluster's files" >&2
			echo "1" >"$work/leak"
		fi
	fi
}

t0=$(date +%s)
run_suite plaintext
t1=$(date +%s)
run_suite encrypted
t2=$(date +%s)

n_plain=$(wc -l <"$work/plaintext.ran")
n_enc=$(wc -l <"$work/encrypted.ran")
echo "plaintext: $n_plain tests ran in $((t1 - t0))s, $(wc -l <"$work/plaintext.failed") failed: $(tr '\n' ' ' <"$work/plaintext.failed")"
echo "encrypted: $n_enc tests ran in $((t2 - t1))s, $(wc -l <"$work/encrypted.failed") failed: $(tr '\n' ' ' <"$work/encrypted.failed")"
only_enc=$(comm -13 "$work/plaintext.failed" "$work/encrypted.failed" | tr '\n' ' ')
only_plain=$(comm -23 "$work/plaintext.failed" "$work/encrypted.failed" | tr '\n' ' ')
echo "difference: failing only encrypted: ${only_enc:-none}; failing only plaintext: ${only_plain:-none}"
status=0
if [ "$n_plain" -lt 100 ] || [ "$n_plain" -ne "$n_enc" ]; then
	echo "pg_upstream_regress.sh: the suite did not run fully (plaintext $n_plain tests, encrypted $n_enc)" >&2
	tail -n 20 "$work/encrypted/pg_regress.out" >&2
	status=1
fi
[ -z "$only_enc$only_plain" ] || status=1
[ ! -f "$work/leak" ] || status=1
if [ "$status" -ne 0 ]; then
	for t in $only_enc; do
		echo "--- diff of $t (encrypted)"
		sed -n "/^diff .*\/$t\.out/,/^diff /p" "$work/encrypted/out/regression.diffs" | head -n 40
	done
fi
echo "PG $version upstream regression: $([ "$status" -eq 0 ] && echo same || echo DIFFERENT) on encrypted and plaintext"
exit "$status"

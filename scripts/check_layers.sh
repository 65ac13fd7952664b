#!/usr/bin/env bash
# Checks the include rule (docs/architecture.md): dependencies go one way,
#   core/base  <-  core/kms  <-  core/keys  <-  fs  <-  cli, pg
# core includes nothing above it, fs nothing of pg or cli, and no file outside src/pg
# includes a PostgreSQL server header. Every project include ("...") outside src/pg
# must be on its room's list; a server header is also caught by name when pg_config
# is there. Prints each breach and exits 1; prints one line and exits 0 when clean.
# Run by test/run_all.sh (and so by CI); by hand: bash scripts/check_layers.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# room -> allowed prefixes of quoted includes ("local" = a header in the same folder)
allowed() {
	case $1 in
	include/cmk_lakebase/base | src/core/base) echo "cmk_lakebase/base/ local" ;;
	include/cmk_lakebase/kms | src/core/kms) echo "cmk_lakebase/base/ cmk_lakebase/kms/ local" ;;
	include/cmk_lakebase/keys | src/core/keys) echo "cmk_lakebase/base/ cmk_lakebase/kms/ cmk_lakebase/keys/ local" ;;
	include/cmk_lakebase/fs | src/fs | src/cli | test/layer)
		echo "cmk_lakebase/base/ cmk_lakebase/kms/ cmk_lakebase/keys/ cmk_lakebase/fs/ local" ;;
	test/unit) echo "cmk_lakebase/base/ cmk_lakebase/kms/ cmk_lakebase/keys/ core/kms/ local" ;;
	*) echo "" ;;
	esac
}

server_dir=""
if command -v "${PG_CONFIG:-pg_config}" >/dev/null 2>&1; then
	server_dir=$("${PG_CONFIG:-pg_config}" --includedir-server 2>/dev/null || true)
fi

breaches=0
checked=0
while IFS= read -r f; do
	room=$(dirname "$f")
	[[ $room == src/pg ]] && continue
	rules=$(allowed "$room")
	if [ -z "$rules" ]; then
		echo "check_layers: $f: folder $room has no rule; add it to scripts/check_layers.sh"
		breaches=$((breaches + 1))
		continue
	fi
	checked=$((checked + 1))
	while IFS= read -r line; do
		inc=$(sed -E 's/^[[:space:]]*#[[:space:]]*include[[:space:]]*["<]([^">]+)[">].*/\1/' <<<"$line")
		quoted=0
		[[ $line == *'"'* ]] && quoted=1
		if [ -n "$server_dir" ] && [ -f "$server_dir/$inc" ] && [ ! -f "/usr/include/$inc" ]; then
			echo "check_layers: $f includes the server header $inc (only src/pg may)"
			breaches=$((breaches + 1))
			continue
		fi
		[ "$quoted" -eq 1 ] || continue
		ok=0
		for r in $rules; do
			if [ "$r" = local ]; then
				[[ $inc != */* ]] && [ -f "$room/$inc" ] && ok=1
			elif [[ $inc == "$r"* ]]; then
				ok=1
			fi
		done
		if [ "$ok" -eq 0 ]; then
			echo "check_layers: $f includes \"$inc\": not allowed in $room (allowed: $rules)"
			breaches=$((breaches + 1))
		fi
	done < <(grep -E '^[[:space:]]*#[[:space:]]*include' "$f" || true)
done < <(find include src test/unit test/layer -type f \( -name '*.cpp' -o -name '*.hpp' -o -name '*.h' \) | sort)

if [ "$breaches" -ne 0 ]; then
	echo "check_layers: $breaches breach(es) of the include rule"
	exit 1
fi
echo "check_layers: include rule holds in $checked files (src/pg alone sees the server)"

#!/usr/bin/env bash
# Runs each libFuzzer target of fuzz/ (built by `make fuzz` into build/fuzz/) for a
# bounded time on a scratch copy of its seed corpus (fuzz/corpus/<target>/), after
# replaying every input kept in fuzz/regressions/<target>/ (crashes found earlier). One
# line per target: "PASS <target>: <runs> runs, <cov> edges" or "FAIL <target>: ...";
# the last line is "N passed, M failed". A crash, a sanitizer report, a timeout or
# running out of memory fails the target; its input is left under the scratch
# directory, named in the output, to be kept under fuzz/regressions/ once fixed.
#
# Knobs: CMK_FUZZ_SECONDS (default 20) per target; CMK_FUZZ_TARGETS="fuzz_answers ..."
# runs only those; CMK_FUZZ_KEEP=1 keeps the scratch directory.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
seconds=${CMK_FUZZ_SECONDS:-20}

if ! make -j"$(nproc)" fuzz >/tmp/cmk_fuzz_build.$$.log 2>&1; then
	tail -n 40 /tmp/cmk_fuzz_build.$$.log
	rm -f /tmp/cmk_fuzz_build.$$.log
	echo "FAIL build: make fuzz"
	echo "0 passed, 1 failed"
	exit 1
fi
rm -f /tmp/cmk_fuzz_build.$$.log

if [ -n "${CMK_FUZZ_TARGETS:-}" ]; then
	read -r -a targets <<<"$CMK_FUZZ_TARGETS"
else
	targets=()
	for f in fuzz/fuzz_*.cpp; do
		targets+=("$(basename "$f" .cpp)")
	done
fi

scratch=$(mktemp -d /tmp/cmk_fuzz_run.XXXXXX)
pass=0
fail=0
for t in "${targets[@]}"; do
	bin=build/fuzz/$t
	work=$scratch/$t
	mkdir -p "$work/corpus" "$work/artifacts" "$work/tmp"
	[ -d "fuzz/corpus/$t" ] && cp -a "fuzz/corpus/$t/." "$work/corpus/"
	opts=(-max_len=65536 -rss_limit_mb=2048 -timeout=10 -artifact_prefix="$work/artifacts/")
	log=$work/log
	# Regressions first: each kept input must now run clean.
	if [ -d "fuzz/regressions/$t" ] && [ -n "$(ls -A "fuzz/regressions/$t")" ]; then
		if ! TMPDIR=$work/tmp "$bin" "${opts[@]}" -runs=0 "fuzz/regressions/$t"/* >"$work/regressions.log" 2>&1; then
			tail -n 30 "$work/regressions.log"
			echo "FAIL $t: a kept regression input fails again (fuzz/regressions/$t)"
			fail=$((fail + 1))
			continue
		fi
	fi
	TMPDIR=$work/tmp timeout -k 10 $((seconds + 60)) "$bin" "${opts[@]}" -max_total_time="$seconds" \
		-print_final_stats=1 "$work/corpus" >"$log" 2>&1
	rc=$?
	runs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
	cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | awk '{print $2}')
	if [ "$rc" -eq 0 ]; then
		echo "PASS $t: ${runs:-?} runs in ${seconds}s, ${cov:-?} edges"
		pass=$((pass + 1))
	else
		grep -E 'ERROR: |SUMMARY: |runtime error|Test unit written' "$log" | head -n 10
		seed=$(sed -n 's/^INFO: Seed: \([0-9]*\).*/\1/p' "$log" | head -n 1)
		echo "FAIL $t: exit $rc after ${runs:-?} runs, -seed=${seed:-?} (log and input in $work)"
		fail=$((fail + 1))
		CMK_FUZZ_KEEP=1
	fi
done

if [ "${CMK_FUZZ_KEEP:-0}" = 1 ]; then
	echo "run_fuzz.sh: scratch kept in $scratch"
else
	rm -rf "$scratch"
fi
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]

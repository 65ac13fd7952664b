#!/usr/bin/env bash
# Draws the chart of a bench/run_bench.sh results file: one bar per judged figure (its
# ratio: median of the rounds, best-of-N for the cipher; green PASS, red MISS, orange
# NOISY), a whisker from the lowest to the highest round, the target as a black dash.
# run_bench.sh calls it after writing results.json; it also redraws a committed run.
#
# Usage: bench/chart.sh RESULTS_JSON [CHART_PNG]   (default: chart.png beside the JSON)
# Needs gnuplot (Debian: gnuplot-nox) and python3 (to read the JSON).
set -euo pipefail
[ $# -ge 1 ] && [ $# -le 2 ] || {
	echo "usage: $0 RESULTS_JSON [CHART_PNG]" >&2
	exit 2
}
json=$1
png=${2:-$(dirname "$json")/chart.png}
command -v gnuplot >/dev/null || {
	echo "chart.sh: gnuplot not found (Debian: apt-get install gnuplot-nox)" >&2
	exit 1
}
dat=$(mktemp /tmp/cmk_bench_chart.XXXXXX)
trap 'rm -f "$dat" "$dat.err"' EXIT

# The data rows, then one last line: "#" ymin ymax title.
python3 - "$json" >"$dat" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
colors = {"PASS": "0x2ca02c", "NOISY": "0xff7f0e"}
ymin, ymax = 0.6, 1.15
for i, r in enumerate(d["results"]):
    ratio, lo, hi = (float(r.get(k) or 0) for k in ("ratio", "min", "max"))
    ymin, ymax = min(ymin, lo - 0.05), max(ymax, hi + 0.05)
    label = str(r["label"]).replace('"', "")
    print(f'{i} "{label}" {ratio} {lo} {hi} {r["target"]} {colors.get(r["verdict"], "0xd62728")}')
h = d["host"]
quick = ", QUICK SMOKE RUN: not a measurement" if d["settings"].get("quick") else ""
extra = d["settings"].get("pg_settings") or ""
title = (f'cmk_lakebase: encrypted / plaintext ({d["date"][:10]}, {h["cpus"]} CPUs, {h["cpu_model"]}, '
         f'{h["postgresql"].split(" (")[0]}{", " + extra if extra else ""}{quick})').replace('"', "")
print(f"# {max(ymin, 0):.3f} {ymax:.3f} {title}")
PY
read -r _ ymin ymax title < <(tail -n 1 "$dat")
n=$(($(wc -l <"$dat") - 1))
if ! gnuplot <<EOF 2>"$dat.err"; then
set terminal pngcairo size 1400,700 font ",10"
set output "$png.tmp"
set termoption noenhanced
set title "$title\nbar: median of the rounds (cipher: best of N); whisker: min-max of the rounds; black dash: target\ngreen PASS, red MISS, orange NOISY (spread straddles the target)"
set ylabel "encrypted / plaintext (1.0 = no cost)"
set bmargin 9
set yrange [$ymin:$ymax]
set xrange [-0.7:$n - 0.3]
set grid ytics
set xtics rotate by 35 right nomirror
set key off
set boxwidth 0.6
set style fill solid 0.75 border -1
plot "$dat" using 1:3:7:xtic(2) with boxes lc rgb variable, \
     "" using 1:3:4:5 with yerrorbars lc rgb "#333333" pt -1, \
     "" using 1:6:(\$1-0.38):(\$1+0.38) with xerrorbars lc rgb "black" lw 2 pt -1, \
     1.0 with lines lc rgb "#888888" dt 2
EOF
	cat "$dat.err" >&2
	rm -f "$png.tmp"
	echo "chart.sh: gnuplot failed; no chart" >&2
	exit 1
fi
mv "$png.tmp" "$png"
echo "chart:   $png"

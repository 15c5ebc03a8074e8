#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Runs the Switch-loss benchmarks of an existing build and prints every figure as a ratio to a
# copy of the same bytes, then the PyTorch comparison. Builds nothing.
#
#   bench/run_all.sh BUILD_DIR [--no-pytorch] [--benchmark_* flags for moebal_bench ...]
#
# e.g. bench/run_all.sh /tmp/bench-build --benchmark_repetitions=3 \
#          --benchmark_report_aggregates_only=true
# The JSON goes to $MOEBAL_BENCH_OUT (default BUILD_DIR/moebal_bench.json).
# Python: /usr/bin/python3 (Debian's, with python3-torch), standard library only for the summary.
set -euo pipefail

usage() {
  sed -n '4,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

[[ $# -ge 1 ]] || usage
build_dir=$1
shift
run_pytorch=1
bench_args=()
for arg in "$@"; do
  case $arg in
    --no-pytorch) run_pytorch=0 ;;
    --benchmark_*) bench_args+=("$arg") ;;
    -h | --help) usage ;;
    *) echo "run_all.sh: unknown argument '$arg'" >&2; usage ;;
  esac
done

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=/usr/bin/python3
exe=
for candidate in "$build_dir/bench/moebal_bench" "$build_dir/moebal_bench"; do
  if [[ -x $candidate ]]; then exe=$candidate; break; fi
done
if [[ -z $exe ]]; then
  echo "run_all.sh: no moebal_bench under '$build_dir' (configure with" \
       "-DMOEBAL_BUILD_BENCHMARKS=ON and build the moebal_bench target first)" >&2
  exit 1
fi
out=${MOEBAL_BENCH_OUT:-$build_dir/moebal_bench.json}

echo "== $(date -u '+%Y-%m-%d %H:%M UTC'), $(lscpu | sed -n 's/^Model name: *//p' | head -n1)," \
     "$(nproc) CPUs"
echo "== $exe ${bench_args[*]:-}"
"$exe" --benchmark_format=console --benchmark_out_format=json --benchmark_out="$out" \
  "${bench_args[@]}"

echo
echo "== Summary of $out (ratios to BM_Copy of the same T, N and type; median if repeated)"
summary_status=0
"$python" - "$out" <<'PYTHON' || summary_status=$?
import json
import re
import statistics
import sys

UNIT = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
NAME = re.compile(r"^(BM_\w+)<(\w+)>/T:(\d+)/N:(\d+)(?:/k:(\d+))?")

with open(sys.argv[1]) as f:
    data = json.load(f)

runs = {}  # (bench, dtype, T, N, k) -> {"median": ms} or {"samples": [ms...]} or {"error": msg}
for b in data["benchmarks"]:
    m = NAME.match(b.get("run_name", b["name"]))
    if not m:
        continue
    bench, dtype, tokens, experts, k = m.groups()
    key = (bench, dtype, int(tokens), int(experts), int(k) if k else None)
    entry = runs.setdefault(key, {"samples": []})
    if b.get("error_occurred"):
        entry["error"] = b.get("error_message", "error")
        continue
    ms = b["real_time"] * UNIT[b.get("time_unit", "ns")]
    if b.get("run_type") == "aggregate":
        if b.get("aggregate_name") == "median":
            entry["median"] = ms
    else:
        entry["samples"].append(ms)


def time_of(bench, dtype, tokens, experts, k):
    entry = runs.get((bench, dtype, tokens, experts, k))
    if entry is None or "error" in entry:
        return None
    if "median" in entry:
        return entry["median"]
    return statistics.median(entry["samples"]) if entry["samples"] else None


shapes = sorted({key[1:] for key in runs if key[4] is not None},
                key=lambda s: (s[0] != "float", s[1] * s[2], s[1], s[2], s[3]))
columns = [("fwd", "BM_Moebal_Forward"), ("f+b", "BM_Moebal_ForwardBackward"),
           ("f,b", "BM_Moebal_ForwardThenBackward"), ("naive fwd", "BM_NaiveEigen_Forward"),
           ("naive f+b", "BM_NaiveEigen_ForwardBackward")]
header = f"{'type':6} {'T':>7} {'N':>4} {'k':>2} {'copy ms':>8}" + "".join(
    f" | {label:>9} ms {'x copy':>6}" for label, _ in columns) + f" | {'f+b ns/tok':>10}"
print(header)
print("-" * len(header))
for dtype, tokens, experts, k in shapes:
    copy = time_of("BM_Copy", dtype, tokens, experts, None)
    line = f"{dtype:6} {tokens:>7} {experts:>4} {k:>2} " + (
        f"{copy:8.3f}" if copy else f"{'n/a':>8}")
    for _, bench in columns:
        t = time_of(bench, dtype, tokens, experts, k)
        if t is None:
            error = runs.get((bench, dtype, tokens, experts, k), {}).get("error")
            line += f" | {'ERROR' if error else 'n/a':>12} {'':>6}"
        else:
            ratio = f"{t / copy:6.1f}" if copy else f"{'n/a':>6}"
            line += f" | {t:12.3f} {ratio}"
    fb = time_of("BM_Moebal_ForwardBackward", dtype, tokens, experts, k)
    line += f" | {fb * 1e6 / tokens:10.1f}" if fb else f" | {'n/a':>10}"
    print(line)

errors = [(key, e["error"]) for key, e in runs.items() if "error" in e]
for key, message in errors:
    print(f"ERROR {key[0]}<{key[1]}> T={key[2]} N={key[3]} k={key[4]}: {message}")
print("fwd = forward, f+b = forward_backward, f,b = forward then backward (recompute path);"
      " naive = the Eigen reference")
sys.exit(1 if errors else 0)
PYTHON

if [[ $run_pytorch -eq 1 ]]; then
  echo
  echo "== PyTorch ($python $bench_dir/compare_pytorch.py)"
  "$python" "$bench_dir/compare_pytorch.py"
fi
exit "$summary_status"

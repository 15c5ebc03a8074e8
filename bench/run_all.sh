#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Runs moebal's benchmarks of an existing build and prints every figure as a ratio to a copy of
# the same bytes, then the PyTorch comparison side by side. Builds nothing.
#
#   bench/run_all.sh BUILD_DIR [--full] [--no-pytorch] [--benchmark_* flags for moebal_bench]
#
# --full runs the whole grid (T 4096..1048576 x N 8, 64, 256 x k 1, 2, 8 x float, double x
# 1 and 2 threads: hours); the default is the subset the README quotes (about 10 minutes).
# e.g. bench/run_all.sh /tmp/bench-build --benchmark_repetitions=3 \
#          --benchmark_report_aggregates_only=true
# The JSON goes to $MOEBAL_BENCH_OUT (default BUILD_DIR/moebal_bench.json), PyTorch's to
# the same name with .pytorch.json. Python: /usr/bin/python3 (Debian's, with python3-torch).
set -euo pipefail

usage() {
  sed -n '4,15p' "$0" | sed 's/^# \{0,1\}//' >&2
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
    --full) bench_args+=("--grid=full") ;;
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
echo "== $exe ${bench_args[*]:-} (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
"$exe" --benchmark_format=console --benchmark_out_format=json --benchmark_out="$out" \
  "${bench_args[@]}"
echo "== done $(date -u '+%H:%M UTC') (load average: $(cut -d' ' -f1-3 /proc/loadavg))"

echo
echo "== Summary of $out (ratios to BM_Copy of the same T, N, type and threads; medians)"
summary_status=0
"$python" "$bench_dir/summarize.py" "$out" || summary_status=$?

if [[ $run_pytorch -eq 1 ]]; then
  echo
  echo "== PyTorch ($python $bench_dir/compare_pytorch.py), side by side with $out"
  "$python" "$bench_dir/compare_pytorch.py" --threads 1 2 --moebal-json "$out" \
    --json-out "${out%.json}.pytorch.json"
fi
exit "$summary_status"

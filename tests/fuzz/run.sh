#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Builds moebal's libFuzzer targets (the standalone project in tests/fuzz) and runs each for a
# while on a fresh copy of its seed corpus. Exits nonzero if any target finds a crash (a
# sanitizer report, a failed check, a timeout or running out of memory) or fails to build.
#
# Usage:
#   tests/fuzz/run.sh BUILD_DIR [SECONDS] [TARGET...]
#     BUILD_DIR  where to configure and build (e.g. build-fuzz); the corpus copies go to
#                BUILD_DIR/corpus/<target>, crash files to BUILD_DIR/artifacts/<target>/,
#                logs to BUILD_DIR/logs/<target>.log
#     SECONDS    fuzzing time per target (default 60)
#     TARGET     fuzz_npy and/or fuzz_api (default both)
#   Environment:
#     CXX                    the Clang C++ compiler (default clang++)
#     JOBS                   parallel build jobs (default 2)
#     KEEP_CORPUS=1          keep BUILD_DIR/corpus/<target> from the last run (it grows with
#                            what the fuzzer learns) instead of starting from the seeds
#     FUZZ_ARGS              extra libFuzzer flags, e.g. "-jobs=2 -workers=2" or "-dict=..."
#     MOEBAL_FUZZ_SKIP_KNOWN=1  fuzz_api: do not report the known library bugs listed in
#                            tests/fuzz/README.md (to look for new ones while they are open)
#
# Examples:
#   tests/fuzz/run.sh build-fuzz                   # 60 s each
#   tests/fuzz/run.sh build-fuzz 3600 fuzz_api     # one hour of the API target
#   build-fuzz/fuzz_api build-fuzz/artifacts/fuzz_api/crash-<sha1>   # reproduce a crash
set -u

if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '4,27p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build="$1"
seconds="${2:-60}"
shift $(( $# >= 2 ? 2 : 1 ))
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(fuzz_npy fuzz_api)

case "$seconds" in
  ''|*[!0-9]*) echo "run.sh: SECONDS must be a whole number, got '$seconds'" >&2; exit 2 ;;
esac
for t in "${targets[@]}"; do
  case "$t" in
    fuzz_npy|fuzz_api) ;;
    *) echo "run.sh: unknown target '$t' (fuzz_npy or fuzz_api)" >&2; exit 2 ;;
  esac
done

echo "== configure and build ($build)"
cmake -S "$here" -B "$build" -DCMAKE_CXX_COMPILER="${CXX:-clang++}" -DMOEBAL_BUILD_FUZZERS=ON \
  || { echo "run.sh: configure failed" >&2; exit 1; }
cmake --build "$build" -j "${JOBS:-2}" --target "${targets[@]}" \
  || { echo "run.sh: build failed" >&2; exit 1; }
build="$(cd "$build" && pwd)"
mkdir -p "$build/logs"

status=0
# The reproducers of fixed bugs (tests/fuzz/crashes/, every file but the .cpp) must pass first.
for t in "${targets[@]}"; do
  [ "$t" = fuzz_api ] || continue
  repro=()
  for f in "$here"/crashes/*; do [ "${f##*.}" = cpp ] || repro+=("$f"); done
  [ ${#repro[@]} -eq 0 ] && continue
  echo "== $t: replaying ${#repro[@]} reproducers of fixed bugs (tests/fuzz/crashes)"
  if ! "$build/$t" "${repro[@]}" >"$build/logs/$t.replay.log" 2>&1; then
    status=1
    echo "== $t: a fixed bug is back; the report:"
    grep -E "CHECK FAILED|ERROR:|runtime error|SUMMARY|Running:" "$build/logs/$t.replay.log" | head -20 | sed 's/^/   /'
  else
    echo "   all pass"
  fi
done
for t in "${targets[@]}"; do
  name="${t#fuzz_}"  # corpus folder: npy or api
  corpus="$build/corpus/$t"
  artifacts="$build/artifacts/$t"
  log="$build/logs/$t.log"
  mkdir -p "$artifacts" "$build/logs"
  if [ "${KEEP_CORPUS:-0}" != "1" ] || [ ! -d "$corpus" ]; then
    rm -rf "$corpus"
    mkdir -p "$corpus"
    cp "$here/corpus/$name/"* "$corpus/"
  fi
  before=$(ls "$artifacts" | wc -l)
  echo "== $t: ${seconds} s on a copy of tests/fuzz/corpus/$name (log: $log)"
  # shellcheck disable=SC2086  # FUZZ_ARGS is a list of flags
  "$build/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$artifacts/" -print_final_stats=1 ${FUZZ_ARGS:-} "$corpus" >"$log" 2>&1
  rc=$?
  after=$(ls "$artifacts" | wc -l)
  grep -E "^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)" "$log" | sed 's/^/   /'
  grep -E "(DONE|INITED) +cov:" "$log" | tail -1 | sed 's/^/   /'
  if [ $rc -ne 0 ] || [ "$after" -gt "$before" ]; then
    status=1
    echo "== $t: FAILED (libFuzzer exit status $rc); the report:"
    grep -E "CHECK FAILED|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error|SUMMARY" \
      -A 3 "$log" | head -40 | sed 's/^/   /'
    ls -t "$artifacts" | head -5 | sed "s|^|   crash file: $artifacts/|"
    echo "   reproduce: $build/$t <crash file>"
  else
    echo "== $t: no crash"
  fi
done
exit $status

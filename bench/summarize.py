#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""Summarizes moebal_bench's JSON output: every figure as a ratio to the copy of the same bytes.

  bench/summarize.py BENCH.json                       console tables (what run_all.sh prints)
  bench/summarize.py BENCH.json --markdown [--pytorch PYTORCH.json] [--note TEXT]
                                                      the README's Performance table (Markdown)

Times are medians: the `median` aggregate when the run was repeated
(--benchmark_repetitions), else the median of the samples. "x copy" divides by BM_Copy of the
same T, N, type and thread count (the copy is split over the same threads). PYTORCH.json is
what `compare_pytorch.py --json-out` writes (PyTorch eager, float32, same machine and run).
Exits 1 if a benchmark reported an error (the naive reference disagreeing with moebal).
Standard library only.
"""

import argparse
import json
import re
import statistics
import sys

UNIT_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
NAME = re.compile(r"^(BM_\w+)<(\w+)>/T:(\d+)/N:(\d+)(?:/k:(\d+))?/th:(\d+)")


def load(path):
    """Returns ({key: median ms}, {key: error}, context); key = (bench, dtype, T, N, k, th)."""
    with open(path) as f:
        data = json.load(f)
    samples, medians, errors = {}, {}, {}
    for b in data["benchmarks"]:
        m = NAME.match(b.get("run_name", b["name"]))
        if not m:
            continue
        bench, dtype, tokens, experts, k, threads = m.groups()
        key = (bench, dtype, int(tokens), int(experts), int(k) if k else None, int(threads))
        if b.get("error_occurred"):
            errors[key] = b.get("error_message", "error")
            continue
        ms = b["real_time"] * UNIT_MS[b.get("time_unit", "ns")]
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                medians[key] = ms
        else:
            samples.setdefault(key, []).append(ms)
    times = {key: statistics.median(v) for key, v in samples.items()}
    times.update(medians)
    return times, errors, data.get("context", {})


class Table:
    def __init__(self, times):
        self.times = times

    def get(self, bench, dtype, tokens, experts, k, threads):
        return self.times.get((bench, dtype, tokens, experts, k, threads))

    def copy(self, dtype, tokens, experts, threads):
        return self.get("BM_Copy", dtype, tokens, experts, None, threads)

    def shapes(self):
        keys = {key[1:] for key in self.times if key[0] == "BM_Moebal_ForwardBackward"}
        return sorted(keys, key=lambda s: (s[0] != "float", s[1] * s[2], s[1], s[2], s[3], s[4]))


def fmt_ms(ms):
    if ms is None:
        return "n/a"
    return f"{ms:.3f} ms" if ms < 1 else f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


def ratio(t, base):
    return f"{t / base:.1f}x" if t is not None and base else "n/a"


CONSOLE_COLUMNS = [
    ("fwd", "BM_Moebal_Forward"), ("f+b", "BM_Moebal_ForwardBackward"),
    ("f,b", "BM_Moebal_ForwardThenBackward"), ("HF f+b", "BM_SwitchHF_ForwardBackward"),
    ("1st f+b", "BM_SwitchFirst_ForwardBackward"), ("z f+b", "BM_ZLoss_ForwardBackward"),
    ("S+z f+b", "BM_CombinedSZ_ForwardBackward"), ("all4 f+b", "BM_Combined_ForwardBackward"),
    ("seq f+b", "BM_Sequence_ForwardBackward"), ("global f+b", "BM_GlobalBatch_ForwardBackward"),
    ("router f+b", "BM_Router_ForwardBackward"), ("naive f+b", "BM_NaiveEigen_ForwardBackward"),
]


def console(table):
    header = f"{'type':6} {'T':>7} {'N':>4} {'k':>2} {'th':>2} {'copy ms':>8}" + "".join(
        f" | {label:>10} {'x':>5}" for label, _ in CONSOLE_COLUMNS) + f" | {'ns/(t*e)':>8}"
    print(header)
    print("-" * len(header))
    for dtype, tokens, experts, k, threads in table.shapes():
        copy = table.copy(dtype, tokens, experts, threads)
        line = f"{dtype:6} {tokens:>7} {experts:>4} {k:>2} {threads:>2} " + (
            f"{copy:8.3f}" if copy else f"{'n/a':>8}")
        for _, bench in CONSOLE_COLUMNS:
            # The naive reference runs on one thread; read it against the same-thread copy.
            th = 1 if bench == "BM_NaiveEigen_ForwardBackward" else threads
            t = table.get(bench, dtype, tokens, experts, k, th)
            base = table.copy(dtype, tokens, experts, th)
            line += f" | {t:10.3f} {t / base:5.1f}" if t is not None and base else \
                f" | {'n/a':>10} {'':>5}"
        fb = table.get("BM_Moebal_ForwardBackward", dtype, tokens, experts, k, threads)
        line += f" | {fb * 1e6 / (tokens * experts):8.3f}" if fb else f" | {'n/a':>8}"
        print(line)
    print("x = ratio to BM_Copy of the same T, N, type and thread count (naive: one thread);"
          " ns/(t*e) = Switch f+b nanoseconds per token x expert")


def markdown(table, context, pytorch, note):
    date = context.get("date", "")[:16].replace("T", " ")
    threads_run = sorted({key[5] for key in table.times})
    host = context.get("host_name", "")
    cpus = context.get("num_cpus", "")
    print(f"Measured by `bench/run_all.sh` and `bench/summarize.py --markdown` on {date} "
          f"({cpus} CPUs{', ' + host if host else ''}{'; ' + note if note else ''}). Medians; "
          f"\"x copy\" is the ratio to a memcpy of the same T x N bytes split over the same "
          f"number of threads, measured in the same run. Megatron convention, softmax. "
          f"Thread counts: {', '.join(map(str, threads_run))}.")
    print()
    torch_rows = {}
    if pytorch:
        for row in pytorch["rows"]:
            torch_rows[(row["T"], row["N"], row["k"], row["threads"])] = row
    header = ["type", "T", "N", "k", "threads", "copy", "Switch fwd", "Switch fwd+bwd",
              "naive fwd+bwd (1 thread)", "Switch + z fwd+bwd", "router fwd+bwd",
              "ns per token x expert"]
    if pytorch:
        header += ["PyTorch eager fwd+bwd", "PyTorch / moebal"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for dtype, tokens, experts, k, threads in table.shapes():
        copy = table.copy(dtype, tokens, experts, threads)
        cells = [dtype, str(tokens), str(experts), str(k), str(threads), fmt_ms(copy)]
        fb = table.get("BM_Moebal_ForwardBackward", dtype, tokens, experts, k, threads)
        for bench, th in (("BM_Moebal_Forward", threads), ("BM_Moebal_ForwardBackward", threads),
                          ("BM_NaiveEigen_ForwardBackward", 1),
                          ("BM_CombinedSZ_ForwardBackward", threads),
                          ("BM_Router_ForwardBackward", threads)):
            t = table.get(bench, dtype, tokens, experts, k, th)
            base = table.copy(dtype, tokens, experts, th)
            cells.append(f"{fmt_ms(t)} ({ratio(t, base)})" if t is not None else "n/a")
        cells.append(f"{fb * 1e6 / (tokens * experts):.2f}" if fb else "n/a")
        if pytorch:
            row = torch_rows.get((tokens, experts, k, threads)) if dtype == "float" else None
            if row and fb:
                cells.append(f"{fmt_ms(row['fwd_bwd_ms'])} "
                             f"({row['fwd_bwd_ms'] / row['copy_ms']:.0f}x its copy)")
                cells.append(f"{row['fwd_bwd_ms'] / fb:.0f}x")
            else:
                cells += ["", ""]
        print("| " + " | ".join(cells) + " |")
    # The other losses of the list, same shapes and runs.
    print()
    others = [("z-loss fwd+bwd", "BM_ZLoss_ForwardBackward"),
              ("combined, all four terms, fwd+bwd", "BM_Combined_ForwardBackward"),
              ("sequence-level fwd+bwd", "BM_Sequence_ForwardBackward"),
              ("global batch (count + sync + fwd+bwd)", "BM_GlobalBatch_ForwardBackward"),
              ("router fwd", "BM_Router_Forward")]
    header = ["type", "T", "N", "k", "threads", "copy"] + [label for label, _ in others]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for dtype, tokens, experts, k, threads in table.shapes():
        copy = table.copy(dtype, tokens, experts, threads)
        cells = [dtype, str(tokens), str(experts), str(k), str(threads), fmt_ms(copy)]
        for _, bench in others:
            t = table.get(bench, dtype, tokens, experts, k, threads)
            cells.append(f"{fmt_ms(t)} ({ratio(t, copy)})" if t is not None else "n/a")
        print("| " + " | ".join(cells) + " |")
    if pytorch:
        print()
        print(f"PyTorch {pytorch['torch']} eager on the CPU (Debian `python3-torch`), measured by "
              f"`bench/compare_pytorch.py` on {pytorch['date']}: the Megatron-core formulation "
              f"(softmax, topk, scattered routing map, counts, loss) with autograd, best of 7, "
              f"at the same thread count; \"its copy\" is PyTorch's own `copy_` in the same "
              f"process.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json")
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    parser.add_argument("--pytorch", help="compare_pytorch.py --json-out file")
    parser.add_argument("--note", default="", help="text added to the table's first line")
    args = parser.parse_args()
    times, errors, context = load(args.bench_json)
    table = Table(times)
    if args.markdown:
        pytorch = None
        if args.pytorch:
            with open(args.pytorch) as f:
                pytorch = json.load(f)
        markdown(table, context, pytorch, args.note)
    else:
        console(table)
    for key, message in sorted(errors.items(), key=str):
        print(f"ERROR {key[0]}<{key[1]}> T={key[2]} N={key[3]} k={key[4]} th={key[5]}: {message}",
              file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

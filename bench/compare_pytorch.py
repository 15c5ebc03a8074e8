#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""PyTorch (CPU) reference timings for the Switch load-balancing loss, read as ratios to a copy.

For the shapes of bench_switch.cpp (float32 logits, random normal, row-major T x N) it times:
  copy   dst.copy_(src) of the same T x N bytes (the memory-traffic reference)
  fwd    the Megatron-style Switch loss forward, with logits.requires_grad (as in training):
           probs = softmax(logits); top = topk(probs, k).indices
           routing_map = zeros(T, N, bool).scatter(1, top, True)
           tokens_per_expert = routing_map.sum(0)
           loss = sum(probs.sum(0) * tokens_per_expert) * N / (k T^2)
  fwd+bwd  the same, then loss.backward() (autograd gradient into logits.grad)
Each figure is the best over several repetitions after a warm-up; each repetition runs enough
calls to last about 20 ms. Run with the Debian interpreter: /usr/bin/python3 compare_pytorch.py.
Thread counts: 1, the default (torch.get_num_threads() at start-up) and os.cpu_count().

With --moebal-json BENCH.json (moebal_bench's JSON output) the table also shows moebal's
forward+backward (BM_Moebal_ForwardBackward<float>, median if repeated) at the same shape and
thread count, its ratio to moebal's own copy (BM_Copy<float> at that thread count) and the
speed-up PyTorch / moebal. --json-out PATH writes the PyTorch figures for bench/readme_table.py.
"""

import argparse
import json
import os
import sys
import time

try:
    import torch
except ImportError:  # pragma: no cover - depends on the machine
    sys.exit("compare_pytorch.py needs PyTorch: run it with /usr/bin/python3 (Debian "
             "python3-torch), not another interpreter")

SHAPES = [(4096, 8, 2), (65536, 64, 2), (262144, 64, 1), (262144, 64, 2), (262144, 64, 8),
          (65536, 256, 8)]

# moebal_bench's JSON is read by the table script's own reader (same folder).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summarize import load as load_moebal_json  # noqa: E402


def read_moebal(path):
    """(bench, dtype, T, N, k, threads) -> median milliseconds, from moebal_bench's JSON
    (benchmarks that reported an error are left out)."""
    return load_moebal_json(path)[0]


def switch_loss(logits, k):
    """Megatron-core style Switch loss (f = c / (T k), coefficient 1)."""
    tokens, experts = logits.shape
    probs = torch.softmax(logits, dim=-1)
    top = torch.topk(probs, k, dim=-1).indices
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top, True)
    tokens_per_expert = routing_map.sum(dim=0)
    return torch.sum(probs.sum(dim=0) * tokens_per_expert) * experts / (k * tokens * tokens)


def self_check():
    """The autograd gradient equals the analytic (N/T) p (f - sum_i f_i p_i) on a small case."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = 2
    loss = switch_loss(x, k)
    loss.backward()
    with torch.no_grad():
        p = torch.softmax(x, dim=-1)
        top = torch.topk(p, k, dim=-1).indices
        f = torch.zeros(8, dtype=torch.float64).index_add_(
            0, top.reshape(-1), torch.ones(top.numel(), dtype=torch.float64)) / (64 * k)
        expected_loss = 8 * torch.dot(f, p.mean(0))
        expected = (8 / 64) * p * (f - (p * f).sum(1, keepdim=True))
    assert torch.allclose(loss, expected_loss, rtol=1e-12), (loss, expected_loss)
    assert torch.allclose(x.grad, expected, rtol=1e-10, atol=1e-14), "autograd gradient mismatch"


def best_time(fn, repetitions, target_seconds=0.02):
    """Best time of one call, in seconds: warm-up, then `repetitions` timed batches."""
    for _ in range(2):
        fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    calls = max(1, int(target_seconds / once))
    best = float("inf")
    for _ in range(repetitions):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def measure(tokens, experts, k, repetitions):
    gen = torch.Generator().manual_seed(tokens * 1000 + experts)
    src = torch.randn(tokens, experts, generator=gen, dtype=torch.float32)
    dst = torch.empty_like(src)
    logits = src.clone().requires_grad_(True)

    def copy():
        dst.copy_(src)

    def forward():
        switch_loss(logits, k)

    def forward_backward():
        logits.grad = None
        switch_loss(logits, k).backward()

    return {
        "copy": best_time(copy, repetitions),
        "fwd": best_time(forward, repetitions),
        "fwd+bwd": best_time(forward_backward, repetitions),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=7, help="timed batches per figure")
    parser.add_argument("--threads", type=int, nargs="*",
                        help="thread counts to run (default: 1, the default, os.cpu_count())")
    parser.add_argument("--moebal-json", help="moebal_bench JSON output to compare with")
    parser.add_argument("--json-out", help="write the PyTorch figures to this JSON file")
    args = parser.parse_args()

    self_check()
    moebal = read_moebal(args.moebal_json) if args.moebal_json else {}
    default_threads = torch.get_num_threads()
    threads = args.threads or sorted({1, default_threads, os.cpu_count() or 1})
    print(f"PyTorch {torch.__version__}, float32, CPU; default threads "
          f"{default_threads}, cpu_count {os.cpu_count()}; best of {args.repetitions}")
    header = (f"{'threads':>7} {'T':>7} {'N':>4} {'k':>2} | {'copy ms':>8} | {'fwd ms':>8} "
              f"{'fwd/copy':>8} | {'f+b ms':>8} {'f+b/copy':>8}")
    if moebal:
        header += f" | {'moebal f+b':>10} {'x copy':>6} | {'torch/moebal':>12}"
    print(header)
    print("-" * len(header))
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        for tokens, experts, k in SHAPES:
            t = measure(tokens, experts, k, args.repetitions)
            line = (f"{n:>7} {tokens:>7} {experts:>4} {k:>2} | {t['copy'] * 1e3:8.3f} | "
                    f"{t['fwd'] * 1e3:8.3f} {t['fwd'] / t['copy']:8.1f} | "
                    f"{t['fwd+bwd'] * 1e3:8.3f} {t['fwd+bwd'] / t['copy']:8.1f}")
            if moebal:
                fb = moebal.get(("BM_Moebal_ForwardBackward", "float", tokens, experts, k, n))
                copy = moebal.get(("BM_Copy", "float", tokens, experts, None, n))
                if fb is None:
                    line += f" | {'n/a':>10} {'':>6} | {'n/a':>12}"
                else:
                    ratio = f"{fb / copy:6.1f}" if copy else f"{'n/a':>6}"
                    line += f" | {fb:10.3f} {ratio} | {t['fwd+bwd'] * 1e3 / fb:11.1f}x"
            print(line, flush=True)
            rows.append({"threads": n, "T": tokens, "N": experts, "k": k,
                         "copy_ms": t["copy"] * 1e3, "fwd_ms": t["fwd"] * 1e3,
                         "fwd_bwd_ms": t["fwd+bwd"] * 1e3})
    torch.set_num_threads(default_threads)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                          time.gmtime()),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

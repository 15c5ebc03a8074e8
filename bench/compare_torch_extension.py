#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""Times the moebal_torch extension against the same losses written in PyTorch eager.

In one process, at one thread count (torch.set_num_threads, default 2), for router logits of
T x N (N = 64, k = 2; float32 at T = 4096, 65536, 262144 and bfloat16 at T = 65536), each a
forward + backward into logits.grad:

  copy            logits.clone(): the memory-traffic reference every time is divided by
  eager switch    the Megatron-core Switch loss in PyTorch eager with autograd:
                    probs = softmax(logits.float()); top = topk(probs, k).indices
                    counts = zeros(T, N).scatter_(1, top, 1).sum(0)      (constants)
                    loss = N * sum(counts / (T k) * probs.mean(0))
  moebal switch   moebal_torch.switch_aux_loss(logits, k) (same value; analytic gradient)
  eager z         (torch.logsumexp(logits.float(), -1) ** 2).mean()
  moebal z        moebal_torch.z_loss(logits)

It prints a markdown table: the median time in ms over the repetitions, the ratio to the copy,
and the speed-up of moebal over eager (eager time / moebal time). Before timing it checks that
the eager and moebal values agree (relative difference printed under the table).

Usage (Debian's python3-torch; the extension built with
`cmake --build <build> --target moebal_torch`):
    PYTHONPATH=<build>/examples/torch /usr/bin/python3 bench/compare_torch_extension.py \
        [--threads 2] [--repeats 15] [--min-time 0.05] [--sizes 4096,65536,262144]
"""

import argparse
import os
import statistics
import sys
import time

try:
    import torch
except ImportError:  # pragma: no cover
    sys.exit("compare_torch_extension.py needs PyTorch: run it with /usr/bin/python3")
try:
    import moebal_torch
except ImportError as error:  # pragma: no cover
    sys.exit("cannot import moebal_torch (%s): put <build>/examples/torch on PYTHONPATH" % error)

N = 64
K = 2


def eager_switch(logits, k):
    """Megatron-core convention Switch loss in PyTorch eager (f = c / (T k), coefficient 1)."""
    x = logits.float()
    tokens, experts = x.shape
    probs = torch.softmax(x, dim=-1)
    top = torch.topk(probs, k, dim=-1).indices
    counts = torch.zeros_like(probs).scatter_(1, top, 1.0).sum(0)      # no gradient
    return experts * torch.sum(counts / (tokens * k) * probs.mean(0))


def eager_z(logits):
    lse = torch.logsumexp(logits.float(), dim=-1)
    return (lse * lse).mean()


def timed(fn, repeats, min_time):
    """Median seconds per call: each repetition runs enough calls to last >= min_time."""
    fn()
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    calls = max(1, int(min_time / once))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def forward_backward(loss_fn, x):
    def run():
        x.grad = None
        loss_fn(x).backward()
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description="moebal_torch vs PyTorch eager timings")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--min-time", type=float, default=0.05,
                        help="seconds per repetition (calls are repeated to reach it)")
    parser.add_argument("--sizes", default="4096,65536,262144",
                        help="comma-separated T for float32")
    parser.add_argument("--bf16-size", type=int, default=65536,
                        help="T for the bfloat16 row (0 to skip)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    cases = [(torch.float32, int(t)) for t in args.sizes.split(",") if t]
    if args.bf16_size:
        cases.append((torch.bfloat16, args.bf16_size))

    rows = []
    checks = []
    for dtype, tokens in cases:
        gen = torch.Generator().manual_seed(tokens)
        base = torch.randn(tokens, N, generator=gen, dtype=torch.float32)
        base += torch.linspace(0.5, -0.5, N)          # an uneven router
        x = base.to(dtype).requires_grad_(True)
        copy_s = timed(lambda: x.detach().clone(), args.repeats, args.min_time)

        with torch.no_grad():
            ev, mv = eager_switch(x, K).item(), moebal_torch.switch_aux_loss(x, K).item()
            checks.append(("switch", dtype, tokens, abs(ev - mv) / abs(ev)))
            ev, mv = eager_z(x).item(), moebal_torch.z_loss(x).item()
            checks.append(("z", dtype, tokens, abs(ev - mv) / abs(ev)))

        for name, eager, moebal in (
                ("switch_aux_loss", lambda v: eager_switch(v, K),
                 lambda v: moebal_torch.switch_aux_loss(v, K)),
                ("z_loss", eager_z, moebal_torch.z_loss)):
            eager_s = timed(forward_backward(eager, x), args.repeats, args.min_time)
            moebal_s = timed(forward_backward(moebal, x), args.repeats, args.min_time)
            rows.append((name, dtype, tokens, copy_s, eager_s, moebal_s))

    print("PyTorch %s, %d thread(s), N = %d, k = %d, forward + backward, median of %d" % (
        torch.__version__, torch.get_num_threads(), N, K, args.repeats))
    print()
    print("| loss | dtype | T | copy ms | eager ms (x copy) | moebal ms (x copy) | "
          "moebal speed-up |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, dtype, tokens, copy_s, eager_s, moebal_s in rows:
        print("| %s | %s | %d | %.3f | %.2f (%.1fx) | %.2f (%.1fx) | %.2fx |" % (
            name, str(dtype).replace("torch.", ""), tokens, copy_s * 1e3,
            eager_s * 1e3, eager_s / copy_s, moebal_s * 1e3, moebal_s / copy_s,
            eager_s / moebal_s))
    print()
    print("value check (|eager - moebal| / |eager|): " + ", ".join(
        "%s %s T=%d: %.1e" % (n, str(d).replace("torch.", ""), t, r) for n, d, t, r in checks))
    print("(bfloat16 rows tie often: torch.topk's tie order is unspecified, moebal's is the "
          "lower index, so the eager and moebal Switch values may differ slightly there.)")
    print("load average at the end: %.2f %.2f %.2f (other work on the machine skews timings)"
          % os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())

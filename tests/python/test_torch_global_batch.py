# SPDX-License-Identifier: Apache-2.0
"""moebal_torch.GlobalBatchBalance: the global-batch balance phases (count every micro-batch,
synchronize, one share of the loss per micro-batch, backward) against PyTorch autograd on the
written definition (include/moebal/losses/global_batch.hpp), in one process and over two
torch.distributed (gloo) processes.

With weighting "tokens" the shares of every micro-batch on every rank sum to the Switch loss of
the concatenated global batch, and each micro-batch's gradient rows are that loss's rows.

Run: PYTHONPATH=<build>/examples/torch /usr/bin/python3 -m unittest -v test_torch_global_batch
(this file also runs as a worker process: test_torch_global_batch.py --worker ...).
"""

import datetime
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

import torch

import moebal_reference as R

mt = R.load_extension()

N = 8
K = 2
WORLD = 2

# Configurations run over two ranks: (options, dtype).
DISTRIBUTED_CONFIGS = [
    (dict(), torch.float64),
    (dict(convention="hf", score="sigmoid", coeff=0.5), torch.float64),
    (dict(convention="first-choice", weighting="micro-batch-mean", micro_batch_weight=0.01,
          coeff=2.0), torch.float64),
    (dict(convention="megatron", coeff=1e-2), torch.float32),
]


def micro_batches(rank, step, dtype, seed_base=0):
    """The micro-batches of one rank for one optimizer step: different sizes, a mask, 3-D."""
    seed = 1000 * step + 100 * rank + seed_base
    sizes = [(20 + 7 * rank, N), (33, N), (2, 6 + rank, N)]
    out = []
    for j, shape in enumerate(sizes):
        x = R.margin_logits(shape, K, dtype, seed=seed + j, skew=1.5 if rank == 0 else -1.5)
        mask = None
        if j == 1:
            mask = R.random_mask(shape[0], seed=seed + 50, dtype=torch.int64)
        out.append((x, mask))
    return out


def run_step(balance, batches, group=None, distributed=False):
    """Phases 1 and 2 for one rank: returns (shares, gradients, total)."""
    for x, mask in batches:
        balance.count(x, mask=mask)
    if distributed:
        balance.synchronize(group=group)
    else:
        balance.synchronize()
    leaves = [x.detach().clone().requires_grad_(True) for x, _ in batches]
    shares = [balance.loss(leaf, mask=mask) for leaf, (_, mask) in zip(leaves, batches)]
    total = sum(shares)
    total.backward()   # every share's backward after every forward
    return [s.detach() for s in shares], [leaf.grad for leaf in leaves], total.detach()


def reference_step(all_batches, options, dtype):
    """Reference shares and gradients for every micro-batch of every rank (flattened list)."""
    cdt = R.compute_dtype(dtype)
    leaves = [x.detach().to(cdt).requires_grad_(True) for x, _ in all_batches]
    opts = dict(options)
    if "weighting" in opts:
        opts["weighting"] = "tokens" if opts["weighting"] == "tokens" else "micro-batch-mean"
    shares, counts, tokens, fbar = R.global_batch_shares(
        [(leaf, mask) for leaf, (_, mask) in zip(leaves, all_batches)], K, **opts)
    sum(shares).backward()
    return ([s.detach() for s in shares], [leaf.grad for leaf in leaves], counts, tokens, fbar)


def concatenated_switch(all_batches, options, dtype):
    """The Switch loss of the concatenated global batch and its gradient, split back."""
    cdt = R.compute_dtype(dtype)
    rows = [R.as_rows(x.detach()).to(cdt) for x, _ in all_batches]
    masks = [torch.ones(r.shape[0]) if m is None else m.reshape(-1).to(torch.float64)
             for r, (_, m) in zip(rows, all_batches)]
    x = torch.cat(rows).requires_grad_(True)
    loss = R.switch_aux_loss(x, K, convention=options.get("convention", "megatron"),
                             score=options.get("score", "softmax"),
                             coeff=options.get("coeff", 1.0), mask=torch.cat(masks))
    loss.backward()
    grads = torch.split(x.grad, [r.shape[0] for r in rows])
    return loss.detach(), [g.reshape(b[0].shape) for g, b in zip(grads, all_batches)]


class GlobalBatchSingleProcessTest(unittest.TestCase):

    def check_step(self, options, dtype, ranks=2, step=0):
        """One process holding the micro-batches of `ranks` simulated ranks."""
        batches = [mb for r in range(ranks) for mb in micro_batches(r, step, dtype)]
        balance = mt.GlobalBatchBalance(N, K, **options)
        shares, grads, total = run_step(balance, batches)
        ref_shares, ref_grads, counts, tokens, fbar = reference_step(batches, options, dtype)
        what = "%s %s" % (options, dtype)
        for j, (s, rs) in enumerate(zip(shares, ref_shares)):
            self.assertEqual(s.dim(), 0)
            self.assertEqual(s.dtype, R.compute_dtype(dtype))
            R.assert_value_close(self, s.item(), rs.item(), R.VALUE_RTOL[dtype],
                                 "%s share %d" % (what, j))
        for j, (g, rg, (x, mask)) in enumerate(zip(grads, ref_grads, batches)):
            self.assertEqual(g.dtype, dtype)
            R.assert_close_scaled(self, g, rg, R.GRAD_RTOL[dtype], "%s gradient %d" % (what, j))
            if mask is not None:
                self.assertTrue(bool((R.as_rows(g)[mask.reshape(-1) == 0] == 0).all()))
        # The attributes after synchronize.
        self.assertEqual(balance.global_counts.dtype, torch.float64)
        self.assertEqual(tuple(balance.global_counts.shape), (N,))
        self.assertEqual(balance.global_counts.tolist(), counts.double().tolist())
        self.assertIsInstance(balance.global_tokens, float)
        self.assertEqual(balance.global_tokens, float(tokens))
        self.assertEqual(balance.global_f.dtype, torch.float64)
        R.assert_close_scaled(self, balance.global_f, fbar.double(), 1e-12, what + " global_f")
        return balance, batches, shares, grads, total

    def test_tokens_weighting_sums_to_the_switch_loss(self):
        for convention, score, dtype in itertools.product(
                ("megatron", "hf", "first-choice"), ("softmax", "sigmoid"),
                (torch.float64, torch.float32, torch.bfloat16)):
            with self.subTest(convention=convention, score=score, dtype=dtype):
                options = dict(convention=convention, score=score, coeff=0.75)
                _, batches, _, grads, total = self.check_step(options, dtype)
                loss, switch_grads = concatenated_switch(batches, options, dtype)
                R.assert_value_close(self, total.item(), loss.item(), R.VALUE_RTOL[dtype],
                                     "sum of shares == Switch loss of the global batch")
                for g, sg in zip(grads, switch_grads):
                    R.assert_close_scaled(self, g, sg, R.GRAD_RTOL[dtype], "gradient rows")

    def test_micro_batch_mean_and_micro_batch_weight(self):
        for weighting, weight, dtype in itertools.product(
                ("micro-batch-mean", "micro_batch_mean", "tokens"), (0.0, 0.01, 1.0),
                (torch.float64, torch.float32)):
            with self.subTest(weighting=weighting, weight=weight, dtype=dtype):
                self.check_step(dict(weighting=weighting, micro_batch_weight=weight,
                                     convention="hf"), dtype)

    def test_default_options(self):
        self.check_step(dict(), torch.float64)
        self.check_step(dict(convention="megatron", score="softmax", coeff=1.0,
                             weighting="tokens", micro_batch_weight=0.0), torch.float64)

    def test_reset_starts_the_next_step(self):
        balance, *_ = self.check_step(dict(), torch.float64, step=0)
        balance.reset()
        batches = [mb for r in range(2) for mb in micro_batches(r, 1, torch.float64)]
        shares, grads, _ = run_step(balance, batches)
        ref_shares, ref_grads, counts, _, _ = reference_step(batches, {}, torch.float64)
        self.assertEqual(balance.global_counts.tolist(), counts.tolist())
        for s, rs in zip(shares, ref_shares):
            R.assert_value_close(self, s.item(), rs.item(), 1e-10, "after reset")
        for g, rg in zip(grads, ref_grads):
            R.assert_close_scaled(self, g, rg, 1e-10, "after reset, gradient")

    def test_one_micro_batch_is_the_switch_loss(self):
        x = R.margin_logits((64, N), K, torch.float64, seed=3)
        for convention in ("megatron", "hf", "first-choice"):
            balance = mt.GlobalBatchBalance(N, K, convention=convention)
            balance.count(x)
            balance.synchronize()
            share = balance.loss(x)
            R.assert_value_close(self, share.item(),
                                 mt.switch_aux_loss(x, K, convention=convention).item(), 1e-12,
                                 "one micro-batch")

    def test_count_has_no_gradient_and_loss_works_without_requires_grad(self):
        x = R.margin_logits((16, N), K, torch.float32, seed=4).requires_grad_(True)
        balance = mt.GlobalBatchBalance(N, K)
        self.assertIsNone(balance.count(x))
        balance.synchronize()
        value = balance.loss(x.detach())
        self.assertFalse(value.requires_grad)


# ---------------------------------------------------------------------------------------------
# Two processes


def worker(rank, world, init_method, out_path):
    """One rank: runs every DISTRIBUTED_CONFIGS step, then the error protocol; saves results."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=40))
    results = {"steps": []}
    for index, (options, dtype) in enumerate(DISTRIBUTED_CONFIGS):
        balance = mt.GlobalBatchBalance(N, K, **options)
        steps = []
        for step in range(2):        # two optimizer steps: reset in between
            batches = micro_batches(rank, step + 10 * index, dtype)
            shares, grads, total = run_step(balance, batches, distributed=True)
            steps.append({"shares": shares, "grads": grads,
                          "global_counts": balance.global_counts.clone(),
                          "global_tokens": balance.global_tokens,
                          "global_f": balance.global_f.clone()})
            balance.reset()
        results["steps"].append(steps)
    # An explicit process group is accepted too.
    group = dist.new_group([0, 1])
    balance = mt.GlobalBatchBalance(N, K)
    shares, grads, total = run_step(balance, micro_batches(rank, 99, torch.float64),
                                    group=group, distributed=True)
    results["group"] = {"shares": shares, "grads": grads}
    # Error protocol: a NaN micro-batch on rank 1 only makes synchronize raise on every rank.
    balance = mt.GlobalBatchBalance(N, K)
    balance.count(R.margin_logits((8, N), K, torch.float64, seed=5))
    error = None
    try:
        if rank == 1:
            balance.count(torch.full((4, N), float("nan"), dtype=torch.float64))
        balance.synchronize()
    except ValueError as e:
        error = str(e)
    results["error"] = error
    torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


class GlobalBatchTwoProcessTest(unittest.TestCase):

    def test_two_gloo_ranks_equal_one_process_holding_every_micro_batch(self):
        tmp = tempfile.mkdtemp(prefix="moebal_gloo_")
        try:
            init_method = "file://" + os.path.join(tmp, "rendezvous")
            env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
            here = os.path.dirname(os.path.abspath(__file__))
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
            procs = []
            outputs = []
            start = time.time()
            for rank in range(WORLD):
                out = os.path.join(tmp, "rank%d.pt" % rank)
                outputs.append(out)
                procs.append(subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--worker", str(rank),
                     str(WORLD), init_method, out],
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
            logs = []
            for p in procs:
                remaining = max(1.0, 90.0 - (time.time() - start))
                try:
                    log, _ = p.communicate(timeout=remaining)
                except subprocess.TimeoutExpired:
                    for q in procs:
                        if q.poll() is None:
                            q.kill()
                    log, _ = p.communicate()
                    self.fail("a rank did not finish within 90 s (hang in synchronize?):\n" +
                              log.decode(errors="replace")[-3000:])
                logs.append(log.decode(errors="replace"))
            for rank, p in enumerate(procs):
                self.assertEqual(p.returncode, 0, "rank %d failed:\n%s" % (rank, logs[rank][-4000:]))
            results = [torch.load(out) for out in outputs]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

        for index, (options, dtype) in enumerate(DISTRIBUTED_CONFIGS):
            for step in range(2):
                with self.subTest(options=options, dtype=dtype, step=step):
                    per_rank = [micro_batches(r, step + 10 * index, dtype) for r in range(WORLD)]
                    everything = [mb for batches in per_rank for mb in batches]
                    ref_shares, ref_grads, counts, tokens, fbar = reference_step(
                        everything, options, dtype)
                    got = [results[r]["steps"][index][step] for r in range(WORLD)]
                    shares = [s for g in got for s in g["shares"]]
                    grads = [x for g in got for x in g["grads"]]
                    for r in range(WORLD):
                        self.assertEqual(got[r]["global_counts"].tolist(), counts.tolist())
                        self.assertEqual(got[r]["global_tokens"], float(tokens))
                        R.assert_close_scaled(self, got[r]["global_f"], fbar.double(), 1e-12,
                                              "global_f rank %d" % r)
                    for j, (s, rs) in enumerate(zip(shares, ref_shares)):
                        R.assert_value_close(self, s.item(), rs.item(), R.VALUE_RTOL[dtype],
                                             "share %d" % j)
                    for j, (g, rg) in enumerate(zip(grads, ref_grads)):
                        R.assert_close_scaled(self, g, rg, R.GRAD_RTOL[dtype], "gradient %d" % j)
                    if options.get("weighting", "tokens") == "tokens" and \
                            options.get("micro_batch_weight", 0.0) == 0.0:
                        loss, switch_grads = concatenated_switch(everything, options, dtype)
                        R.assert_value_close(self, sum(s.item() for s in shares), loss.item(),
                                             R.VALUE_RTOL[dtype], "sum of shares over ranks")
                        for g, sg in zip(grads, switch_grads):
                            R.assert_close_scaled(self, g, sg, R.GRAD_RTOL[dtype],
                                                  "gradient rows == global Switch rows")
        with self.subTest(case="explicit group"):
            everything = [mb for r in range(WORLD) for mb in micro_batches(r, 99, torch.float64)]
            loss, switch_grads = concatenated_switch(everything, {}, torch.float64)
            shares = [s for r in range(WORLD) for s in results[r]["group"]["shares"]]
            grads = [g for r in range(WORLD) for g in results[r]["group"]["grads"]]
            R.assert_value_close(self, sum(s.item() for s in shares), loss.item(), 1e-10,
                                 "explicit group")
            for g, sg in zip(grads, switch_grads):
                R.assert_close_scaled(self, g, sg, 1e-10, "explicit group gradient")
        with self.subTest(case="a bad micro-batch on one rank raises on every rank"):
            for r in range(WORLD):
                self.assertIsNotNone(results[r]["error"], "rank %d did not raise" % r)
                self.assertIn("logits", results[r]["error"])


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        unittest.main()

# SPDX-License-Identifier: Apache-2.0
"""torch.autograd.gradcheck (central differences in float64) of every differentiable function of
moebal_torch, on inputs whose top-k margins are far wider than the finite-difference step.

Run: PYTHONPATH=<build>/examples/torch /usr/bin/python3 -m unittest -v test_torch_gradcheck
"""

import itertools
import unittest

import torch

import moebal_reference as R

mt = R.load_extension()


def gradcheck(case, fn, x, what):
    x = x.detach().clone().requires_grad_(True)
    ok = torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6, raise_exception=False)
    case.assertTrue(ok, "gradcheck failed: " + what)
    # Once more with the exception, for its report, if it failed.
    if not ok:  # pragma: no cover
        torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


class GradcheckTest(unittest.TestCase):

    def test_switch_aux_loss(self):
        mask = R.random_mask(30, seed=2, dtype=torch.int64)
        for convention, score, use_mask in itertools.product(
                ("megatron", "hf", "first-choice"), ("softmax", "sigmoid"), (False, True)):
            with self.subTest(convention=convention, score=score, mask=use_mask):
                x = R.margin_logits((30, 6), 2, torch.float64, seed=1)
                m = mask if use_mask else None
                gradcheck(self, lambda v: mt.switch_aux_loss(v, 2, convention=convention,
                                                             score=score, coeff=0.7, mask=m),
                          x, "switch %s %s mask=%s" % (convention, score, use_mask))

    def test_switch_aux_loss_three_dimensional(self):
        x = R.margin_logits((3, 8, 6), 2, torch.float64, seed=3)
        mask = R.random_mask(24, seed=4, shape=(3, 8))
        gradcheck(self, lambda v: mt.switch_aux_loss(v, 2, mask=mask), x, "switch 3-D")

    def test_z_loss(self):
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(20, 6, generator=gen, dtype=torch.float64) * 2
        mask = R.random_mask(20, seed=6, dtype=torch.float32)
        gradcheck(self, lambda v: mt.z_loss(v, coeff=0.3), x, "z")
        gradcheck(self, lambda v: mt.z_loss(v, coeff=0.3, mask=mask), x, "z masked")
        gradcheck(self, lambda v: mt.z_loss(v.reshape(4, 5, 6)), x, "z 3-D")

    def test_seq_aux_loss(self):
        mask = R.random_mask(32, seed=8)
        for layout, score, use_mask in itertools.product(
                ("batch-major", "seq-major"), ("softmax", "sigmoid"), (False, True)):
            with self.subTest(layout=layout, score=score, mask=use_mask):
                x = R.margin_logits((32, 6), 2, torch.float64, seed=7)
                m = mask if use_mask else None
                gradcheck(self, lambda v: mt.seq_aux_loss(v, 2, 8, layout=layout, score=score,
                                                          coeff=1.3, mask=m),
                          x, "seq %s %s mask=%s" % (layout, score, use_mask))

    def test_cv2_importance_loss(self):
        for k in (1, 2):
            x = R.margin_logits((24, 6), k, torch.float64, seed=9)
            gradcheck(self, lambda v: mt.cv2_importance_loss(v, k, coeff=2.0), x, "cv2 k=%d" % k)

    def test_route(self):
        from test_torch_route import CASES, repaired_logits
        for name, k, n, options in CASES:
            with self.subTest(case=name):
                # Margins far wider than eps = 1e-6 (top-k order and kept groups fixed).
                x = repaired_logits((12, n), k, torch.float64, options, seed=11, min_gap=1e-3)
                gradcheck(self, lambda v: mt.route(v, k, **options)[1], x, "route " + name)

    def test_global_batch_balance_share(self):
        # The share of one micro-batch, counts fixed after synchronize.
        for weighting in ("tokens", "micro-batch-mean"):
            with self.subTest(weighting=weighting):
                xs = [R.margin_logits((16, 6), 2, torch.float64, seed=s) for s in (12, 13)]
                balance = mt.GlobalBatchBalance(6, 2, weighting=weighting, micro_batch_weight=0.1)
                for x in xs:
                    balance.count(x)
                balance.synchronize()
                gradcheck(self, lambda v: balance.loss(v), xs[1], "global share " + weighting)


if __name__ == "__main__":
    unittest.main()

# SPDX-License-Identifier: Apache-2.0
"""moebal_torch.switch_aux_loss against PyTorch autograd on the written definition.

Run: PYTHONPATH=<build>/examples/torch /usr/bin/python3 -m unittest -v test_torch_switch
"""

import itertools
import unittest

import torch

import moebal_reference as R

mt = R.load_extension()

CONVENTIONS = ["megatron", "hf", "huggingface", "first-choice", "first_choice"]
SCORES = ["softmax", "sigmoid"]


class SwitchAuxLossTest(unittest.TestCase):

    def check(self, x, k, mask=None, what="", grad_scale=1.25, **options):
        real = None if mask is None else R.real_rows(mask, R.as_rows(x).shape[0])
        return R.check_loss(
            self,
            lambda xm: mt.switch_aux_loss(xm, k, mask=mask, **options),
            lambda xr: R.switch_aux_loss(xr, k, mask=mask, **options),
            x, grad_scale=grad_scale, real=real,
            what="switch_aux_loss(%s, k=%d, %s, mask %s) %s" % (
                x.dtype, k, options, None if mask is None else mask.dtype, what))

    def test_every_convention_score_and_dtype(self):
        for convention, score, dtype in itertools.product(CONVENTIONS, SCORES, R.ALL_DTYPES):
            for k in (1, 2, 3):
                with self.subTest(convention=convention, score=score, dtype=dtype, k=k):
                    x = R.margin_logits((96, 8), k, dtype, seed=10 + k)
                    self.check(x, k, convention=convention, score=score)

    def test_default_arguments_are_megatron_softmax_coeff_1(self):
        x = R.margin_logits((64, 8), 2, torch.float64, seed=3)
        self.check(x, 2)
        a = mt.switch_aux_loss(x, 2)
        b = mt.switch_aux_loss(x, 2, convention="megatron", score="softmax", coeff=1.0, mask=None)
        self.assertEqual(a.item(), b.item())

    def test_keyword_and_positional_arguments(self):
        x = R.margin_logits((32, 8), 2, torch.float64, seed=4)
        a = mt.switch_aux_loss(x, 2, "hf", "sigmoid", 0.5)
        b = mt.switch_aux_loss(logits=x, k=2, convention="hf", score="sigmoid", coeff=0.5)
        self.assertEqual(a.item(), b.item())

    def test_huggingface_is_k_times_megatron(self):
        x = R.margin_logits((128, 16), 4, torch.float64, seed=5)
        hf = mt.switch_aux_loss(x, 4, convention="hf")
        megatron = mt.switch_aux_loss(x, 4, convention="megatron")
        R.assert_value_close(self, hf.item(), 4 * megatron.item(), 1e-12, "hf = k megatron")

    def test_masks(self):
        for mask_dtype, dtype, convention in itertools.product(
                (torch.bool, torch.int64, torch.int32, torch.uint8, torch.float32,
                 torch.float64),
                (torch.float64, torch.float32, torch.bfloat16),
                ("megatron", "hf", "first-choice")):
            with self.subTest(mask_dtype=mask_dtype, dtype=dtype, convention=convention):
                x = R.margin_logits((80, 8), 2, dtype, seed=20)
                mask = R.random_mask(80, seed=21, dtype=mask_dtype)
                # Padding rows hold values that would change the loss if they were read.
                real = R.real_rows(mask, 80)
                x = x.clone()
                x[~real] = torch.tensor([9.0, 8.5, -3, -3, -3, -3, -3, -3]).to(dtype)
                value, _ = self.check(x, 2, mask=mask, convention=convention)
                # Same as the real rows alone.
                alone = mt.switch_aux_loss(x[real], 2, convention=convention)
                R.assert_value_close(self, value.item(), alone.item(), R.VALUE_RTOL[dtype],
                                     "masked == real rows alone")

    def test_mask_all_padding_gives_zero(self):
        for dtype in (torch.float64, torch.float32):
            x = R.margin_logits((16, 8), 2, dtype, seed=22).requires_grad_(True)
            mask = torch.zeros(16, dtype=torch.bool)
            value = mt.switch_aux_loss(x, 2, mask=mask)
            value.backward()
            self.assertEqual(value.item(), 0.0)
            self.assertTrue(bool((x.grad == 0).all()))

    def test_coefficients(self):
        for coeff in (0.0, 0.01, 2.5, -1.0):
            for dtype in (torch.float64, torch.float32):
                with self.subTest(coeff=coeff, dtype=dtype):
                    x = R.margin_logits((64, 8), 2, dtype, seed=23)
                    value, grad = self.check(x, 2, coeff=coeff, convention="hf")
                    if coeff == 0.0:
                        self.assertEqual(value.item(), 0.0)
                        self.assertTrue(bool((grad == 0).all()))

    def test_three_dimensional_logits_and_mask(self):
        for dtype, score in itertools.product(R.ALL_DTYPES, SCORES):
            with self.subTest(dtype=dtype, score=score):
                x = R.margin_logits((4, 24, 8), 2, dtype, seed=24)
                self.check(x, 2, score=score)
                mask = R.random_mask(96, seed=25, shape=(4, 24), dtype=torch.int64)
                value, _ = self.check(x, 2, mask=mask, score=score)
                # 3-D == its 2-D rows (token b * S + s) with the flattened mask.
                flat = mt.switch_aux_loss(x.reshape(96, 8), 2, score=score,
                                          mask=mask.reshape(96))
                R.assert_value_close(self, value.item(), flat.item(), 1e-12, "3-D == 2-D")

    def test_non_contiguous_logits(self):
        base = R.margin_logits((64, 8), 2, torch.float64, seed=28)
        transposed = base.t().contiguous().t()          # same values, column-major strides
        self.assertFalse(transposed.is_contiguous())
        strided = torch.zeros(64, 16, dtype=torch.float64)
        strided[:, ::2] = base
        sliced = strided[:, ::2]
        self.assertFalse(sliced.is_contiguous())
        for x in (transposed, sliced):
            xm = x.detach().requires_grad_(True)
            value = mt.switch_aux_loss(xm, 2)
            value.backward()
            xr = base.clone().requires_grad_(True)
            expected = R.switch_aux_loss(xr, 2)
            expected.backward()
            R.assert_value_close(self, value.item(), expected.item(), 1e-10, "non-contiguous")
            R.assert_close_scaled(self, xm.grad, xr.grad, 1e-10, "non-contiguous gradient")

    def test_non_contiguous_three_dimensional_logits_and_mask(self):
        # A [B, S, N] view of [S, B, N] memory: tokens are b * S + s of the logical tensor.
        storage = R.margin_logits((12, 3, 8), 2, torch.float32, seed=34)
        x = storage.transpose(0, 1)
        self.assertFalse(x.is_contiguous())
        mask = R.random_mask(36, seed=35, shape=(12, 3)).t()        # [3, 12], non-contiguous
        self.assertFalse(mask.is_contiguous())
        xm = x.detach().requires_grad_(True)
        value = mt.switch_aux_loss(xm, 2, mask=mask)
        value.backward()
        xr = x.contiguous().requires_grad_(True)
        expected = R.switch_aux_loss(xr, 2, mask=mask.contiguous())
        expected.backward()
        R.assert_value_close(self, value.item(), expected.item(), 1e-5, "3-D view")
        R.assert_close_scaled(self, xm.grad, xr.grad, 1e-5, "3-D view gradient")

    def test_two_calls_before_one_backward(self):
        # Each call keeps its own gradient: two losses in one graph, one backward.
        a = R.margin_logits((40, 8), 2, torch.float64, seed=36)
        b = R.margin_logits((24, 8), 2, torch.float64, seed=37)
        am, bm = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        (mt.switch_aux_loss(am, 2) + 2 * mt.switch_aux_loss(bm, 2, convention="hf")).backward()
        ar, br = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        (R.switch_aux_loss(ar, 2) + 2 * R.switch_aux_loss(br, 2, convention="hf")).backward()
        R.assert_close_scaled(self, am.grad, ar.grad, 1e-10, "first call's gradient")
        R.assert_close_scaled(self, bm.grad, br.grad, 1e-10, "second call's gradient")
        # The same logits used twice: gradients add.
        x = a.clone().requires_grad_(True)
        (mt.switch_aux_loss(x, 2) + mt.switch_aux_loss(x, 2)).backward()
        R.assert_close_scaled(self, x.grad, 2 * ar.grad, 1e-10, "used twice")

    def test_kept_gradient_is_never_shared(self):
        # With grad_output exactly 1, backward hands PyTorch the kept gradient itself: it must
        # never alias logits.grad while the graph can still be run again, nor be changed by
        # what the caller does to logits.grad afterwards.
        for dtype in (torch.float32, torch.float64):
            x = R.margin_logits((40, 8), 2, dtype, seed=39)
            xr = x.clone().requires_grad_(True)
            R.switch_aux_loss(xr, 2).backward()
            expected = xr.grad
            tol = 1e-10 if dtype == torch.float64 else 1e-5
            with self.subTest(dtype=dtype, what="retain_graph"):
                xm = x.clone().requires_grad_(True)
                value = mt.switch_aux_loss(xm, 2)
                value.backward(retain_graph=True)
                R.assert_close_scaled(self, xm.grad, expected, tol, "first backward")
                xm.grad.mul_(10.0)  # the caller's in-place change to logits.grad
                value.backward(retain_graph=True)
                R.assert_close_scaled(self, xm.grad, 11 * expected, tol, "second backward")
                xm.grad = None
                value.backward()
                R.assert_close_scaled(self, xm.grad, expected, tol, "third backward")
            with self.subTest(dtype=dtype, what="grad accumulation over steps"):
                xm = x.clone().requires_grad_(True)
                for step in range(3):
                    mt.switch_aux_loss(xm, 2).backward()
                    R.assert_close_scaled(self, xm.grad, (step + 1) * expected, tol,
                                          "after step %d" % step)
                xm.grad.zero_()
                mt.switch_aux_loss(xm, 2).backward()
                R.assert_close_scaled(self, xm.grad, expected, tol, "after zero_")
            with self.subTest(dtype=dtype, what="non-leaf logits"):
                h = x.clone().requires_grad_(True)
                mid = h * 1.0
                (mt.switch_aux_loss(mid, 2) + (mid * 0.0).sum()).backward()
                R.assert_close_scaled(self, h.grad, expected, tol, "through a multiply")

    def test_under_no_grad(self):
        x = R.margin_logits((16, 8), 2, torch.float32, seed=38).requires_grad_(True)
        with torch.no_grad():
            value = mt.switch_aux_loss(x, 2)
        self.assertFalse(value.requires_grad)

    def test_without_requires_grad(self):
        x = R.margin_logits((32, 8), 2, torch.float32, seed=29)
        value = mt.switch_aux_loss(x, 2)
        self.assertFalse(value.requires_grad)
        expected = R.switch_aux_loss(x, 2)
        R.assert_value_close(self, value.item(), expected.item(), 1e-5, "no grad")

    def test_gradient_through_a_linear_router(self):
        # The loss inside a graph: d loss / d W of logits = h W^T, against the reference.
        gen = torch.Generator().manual_seed(30)
        h = torch.randn(128, 16, generator=gen, dtype=torch.float64)
        w = torch.randn(8, 16, generator=gen, dtype=torch.float64) * 0.5
        wm = w.clone().requires_grad_(True)
        wr = w.clone().requires_grad_(True)
        logits = h @ w.t()
        R.check_margins(logits, (1, 2), 1e-6)
        loss_m = 3.0 * mt.switch_aux_loss(h @ wm.t(), 2) + (wm ** 2).sum()
        loss_r = 3.0 * R.switch_aux_loss(h @ wr.t(), 2) + (wr ** 2).sum()
        loss_m.backward()
        loss_r.backward()
        R.assert_close_scaled(self, wm.grad, wr.grad, 1e-10, "router weight gradient")

    def test_grad_output_scales_the_gradient(self):
        x = R.margin_logits((48, 8), 2, torch.float64, seed=31)
        for scale in (0.0, -2.0, 1e3):
            with self.subTest(scale=scale):
                self.check(x, 2, grad_scale=scale, convention="first-choice")

    def test_disabled_experts_minus_infinity(self):
        # -Inf logits (disabled experts) are finite-score-zero experts, not errors.
        for dtype in (torch.float64, torch.float32):
            x = R.margin_logits((40, 8), 2, dtype, seed=32).clone()
            x[::3, 7] = float("-inf")
            x[1::5, 6] = float("-inf")
            self.check(x, 2)

    def test_ties_go_to_the_lower_index(self):
        # Dedicated tie test: equal scores select the lower expert index, for the top-k
        # counts and for the first choice. Expected counts are written out by hand.
        n = 6
        rows = [
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],   # all tied: top-2 {0, 1}, first 0
            [0.0, 2.0, 2.0, 2.0, 0.0, 0.0],   # top-2 {1, 2}, first 1
            [3.0, 0.0, 0.0, 0.0, 0.0, 3.0],   # top-2 {0, 5}, first 0
            [0.0, 0.0, 0.0, 0.0, 1.0, 1.0],   # top-2 {4, 5}, first 4
            [0.5, 0.0, 0.5, 0.0, 0.5, 0.0],   # top-2 {0, 2}, first 0
        ]
        counts = torch.tensor([3, 2, 2, 0, 1, 2], dtype=torch.float64)
        first = torch.tensor([3, 1, 0, 0, 1, 0], dtype=torch.float64)
        for dtype, convention in itertools.product(
                (torch.float64, torch.float32, torch.bfloat16), ("megatron", "first-choice")):
            with self.subTest(dtype=dtype, convention=convention):
                x = torch.tensor(rows, dtype=dtype)
                self.check(x, 2, convention=convention)
                # Independent of the reference's top-k: the closed-form loss with hand counts.
                t = len(rows)
                f = counts / (t * 2) if convention == "megatron" else first / t
                p = torch.softmax(torch.tensor(rows, dtype=torch.float64), -1).mean(0)
                expected = n * (f * p).sum().item()
                value = mt.switch_aux_loss(x, 2, convention=convention)
                R.assert_value_close(self, value.item(), expected, R.VALUE_RTOL[dtype],
                                     "tie value")
                # The gradient reveals which experts were counted: (N/T) q (f - f.q).
                xm = x.clone().requires_grad_(True)
                mt.switch_aux_loss(xm, 2, convention=convention).backward()
                q = torch.softmax(torch.tensor(rows, dtype=torch.float64), -1)
                grad = (n / t) * q * (f - (q * f).sum(1, keepdim=True))
                R.assert_close_scaled(self, xm.grad, grad, R.GRAD_RTOL[dtype], "tie gradient")

    def test_saturated_sigmoid_ties_in_float32(self):
        # sigmoid(20) and sigmoid(21) are both 1.0f: they tie and the lower index wins.
        x = torch.tensor([[20.0, 21.0, 0.0, -1.0], [0.0, 21.0, 20.0, -1.0]],
                         dtype=torch.float32)
        xm = x.clone().requires_grad_(True)
        value = mt.switch_aux_loss(xm, 1, score="sigmoid")
        value.backward()
        xr = x.clone().requires_grad_(True)
        expected = R.switch_aux_loss(xr, 1, score="sigmoid")
        expected.backward()
        counts, _ = R.routing_counts(R.loss_scores(x, "sigmoid"), 1)
        self.assertEqual(counts.tolist(), [1.0, 1.0, 0.0, 0.0])
        R.assert_value_close(self, value.item(), expected.item(), 1e-6, "saturated value")
        R.assert_close_scaled(self, xm.grad, xr.grad, 1e-5, "saturated gradient")

    def test_larger_batch_float32(self):
        x = R.margin_logits((4096, 64), 2, torch.float32, seed=33, margin=0.2)
        self.check(x, 2)
        self.check(x, 2, convention="hf", score="sigmoid", coeff=0.01)


if __name__ == "__main__":
    unittest.main()

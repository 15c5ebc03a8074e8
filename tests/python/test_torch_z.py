# SPDX-License-Identifier: Apache-2.0
"""moebal_torch.z_loss against PyTorch autograd on coeff * mean_t logsumexp(x_t)^2.

Run: PYTHONPATH=<build>/examples/torch /usr/bin/python3 -m unittest -v test_torch_z
"""

import itertools
import unittest

import torch

import moebal_reference as R

mt = R.load_extension()


class ZLossTest(unittest.TestCase):

    def check(self, x, mask=None, what="", grad_scale=1.25, reference_dtype=None, **options):
        real = None if mask is None else R.real_rows(mask, R.as_rows(x).shape[0])
        return R.check_loss(
            self,
            lambda xm: mt.z_loss(xm, mask=mask, **options),
            lambda xr: R.z_loss(xr, mask=mask, **options),
            x, grad_scale=grad_scale, real=real, reference_dtype=reference_dtype,
            what="z_loss(%s, %s, mask %s) %s" % (
                x.dtype, options, None if mask is None else mask.dtype, what))

    def random(self, shape, dtype, seed, scale=2.0):
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    def test_dtypes_and_coefficients(self):
        for dtype, coeff in itertools.product(R.ALL_DTYPES, (1.0, 1e-3, 7.5, 0.0)):
            with self.subTest(dtype=dtype, coeff=coeff):
                self.check(self.random((96, 8), dtype, seed=1), coeff=coeff)

    def test_default_coefficient_is_one(self):
        x = self.random((32, 8), torch.float64, seed=2)
        self.assertEqual(mt.z_loss(x).item(), mt.z_loss(x, coeff=1.0).item())
        self.assertEqual(mt.z_loss(x, 0.5).item(), mt.z_loss(x, coeff=0.5).item())

    def test_masks(self):
        for mask_dtype, dtype in itertools.product(
                (torch.bool, torch.int64, torch.int32, torch.float32, torch.float64),
                (torch.float64, torch.float32, torch.bfloat16, torch.float16)):
            with self.subTest(mask_dtype=mask_dtype, dtype=dtype):
                x = self.random((64, 16), dtype, seed=3).clone()
                mask = R.random_mask(64, seed=4, dtype=mask_dtype)
                real = R.real_rows(mask, 64)
                x[~real] = 30.0   # would dominate the loss if read
                value, _ = self.check(x, mask=mask, coeff=0.1)
                alone = mt.z_loss(x[real], coeff=0.1)
                R.assert_value_close(self, value.item(), alone.item(), R.VALUE_RTOL[dtype],
                                     "masked == real rows alone")

    def test_all_padding(self):
        x = self.random((8, 4), torch.float64, seed=5).requires_grad_(True)
        value = mt.z_loss(x, mask=torch.zeros(8))
        value.backward()
        self.assertEqual(value.item(), 0.0)
        self.assertTrue(bool((x.grad == 0).all()))

    def test_three_dimensional(self):
        for dtype in R.ALL_DTYPES:
            with self.subTest(dtype=dtype):
                x = self.random((3, 20, 8), dtype, seed=6)
                self.check(x)
                mask = R.random_mask(60, seed=7, shape=(3, 20), dtype=torch.float32)
                self.check(x, mask=mask)

    def test_large_logits_are_stable(self):
        # Logits near 500: lse^2 ~ 2.5e5. PyTorch's own float32 logsumexp gradient is only good
        # to ~1e-5 relative here, so the reference is the float64 one (the exact answer for
        # these float32 values); moebal's float32 result must match it to float32 precision.
        for dtype in (torch.float64, torch.float32):
            x = self.random((16, 8), dtype, seed=8, scale=1.0) + 500.0
            self.check(x, reference_dtype=torch.float64)

    def test_disabled_experts_minus_infinity(self):
        for dtype in (torch.float64, torch.float32):
            x = self.random((24, 8), dtype, seed=9).clone()
            x[::2, 3] = float("-inf")
            x[::3, 0] = float("-inf")
            _, grad = self.check(x)
            self.assertTrue(bool(torch.isfinite(grad).all()))
            self.assertTrue(bool((grad[::2, 3] == 0).all()))

    def test_non_contiguous(self):
        base = self.random((40, 8), torch.float64, seed=10)
        x = base.t().contiguous().t().detach().requires_grad_(True)
        self.assertFalse(x.is_contiguous())
        value = mt.z_loss(x)
        value.backward()
        xr = base.clone().requires_grad_(True)
        expected = R.z_loss(xr)
        expected.backward()
        R.assert_value_close(self, value.item(), expected.item(), 1e-10, "value")
        R.assert_close_scaled(self, x.grad, xr.grad, 1e-10, "gradient")


if __name__ == "__main__":
    unittest.main()

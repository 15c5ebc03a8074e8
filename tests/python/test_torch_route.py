# SPDX-License-Identifier: Apache-2.0
"""moebal_torch.route against a PyTorch router written from RouterOptions' definition
(include/moebal/routers/router.hpp): indices exactly, weights to the dtype's precision, and the
gradient of the weights through a random upstream d loss / d weights.

Run: PYTHONPATH=<build>/examples/torch /usr/bin/python3 -m unittest -v test_torch_route
"""

import itertools
import math
import unittest

import torch

import moebal_reference as R

mt = R.load_extension()

N8 = 8
N16 = 16


def bias(n, seed=7, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen, dtype=torch.float64) * scale


# (name, k, N, options): the framework each mimics in parentheses.
CASES = [
    ("default scores", 2, N8, dict()),
    ("post-softmax (Megatron)", 2, N8, dict(weights="softmax_of_selected", select_on_logits=True)),
    ("softmax of selected on scores", 3, N8, dict(weights="softmax_of_selected")),
    ("normalized (Mixtral)", 2, N8, dict(normalize=True)),
    ("normalized + eps add", 2, N8, dict(normalize=True, normalize_epsilon=0.1)),
    ("normalized + eps clamp active", 2, 32,
     dict(normalize=True, normalize_epsilon=0.9, epsilon_mode="clamp")),
    ("normalized + float eps clamp (DeepSpeed)", 2, N8,
     dict(normalize=True, normalize_epsilon=1.1920928955078125e-07, epsilon_mode="clamp",
          select_on_logits=True)),
    ("scaled", 2, N8, dict(scaling_factor=2.5)),
    ("HF DeepSeek-V3", 4, N16,
     dict(score="sigmoid", normalize=True, normalize_epsilon=1e-20, scaling_factor=2.5,
          num_groups=4, group_topk=2, group_score="sum_top2", group_fill="zero",
          expert_bias=bias(N16))),
    ("DeepSeek-V3 official (max)", 4, N16,
     dict(score="sigmoid", normalize=True, num_groups=4, group_topk=2, group_score="max")),
    ("groups, sum of top k/g (Megatron)", 4, N16,
     dict(num_groups=4, group_topk=2, group_score="sum_top_k_over_groups")),
    ("groups on logits, one group kept", 2, N16,
     dict(score="sigmoid", select_on_logits=True, num_groups=4, group_topk=1,
          group_fill="negative_infinity", normalize=True, normalize_epsilon=1e-20)),
    ("sqrt softplus + bias", 3, N8,
     dict(score="sqrt_softplus", normalize=True, normalize_epsilon=1e-20,
          expert_bias=bias(N8, seed=8), scaling_factor=1.5)),
    ("bias on logits", 2, N8, dict(select_on_logits=True, expert_bias=bias(N8, seed=9))),
    ("sigmoid unnormalized + bias", 2, N8,
     dict(score="sigmoid", expert_bias=bias(N8, seed=10))),
]


def repaired_logits(shape, k, dtype, options, seed, min_gap=2e-3, attempts=200):
    """Random logits, every token's decisive margins (top-k order, kept groups) >= min_gap in the
    reference computed in the compute dtype; failing tokens are redrawn."""
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    rows = (torch.randn(int(torch.tensor(shape[:-1]).prod()), n, generator=gen,
                        dtype=torch.float64) * 1.5).to(dtype)
    for _ in range(attempts):
        gaps = []
        R.route(rows.to(R.compute_dtype(dtype)), k, gaps=gaps, **options)
        gap = torch.stack(gaps).min(0).values if gaps else torch.full((rows.shape[0],), math.inf)
        bad = gap < min_gap
        if not bool(bad.any()):
            return rows.reshape(shape)
        fresh = (torch.randn(int(bad.sum()), n, generator=gen, dtype=torch.float64) * 1.5)
        rows[bad] = fresh.to(dtype)
    raise AssertionError("could not draw logits with clear routing margins")


class RouteTest(unittest.TestCase):

    def check(self, x, k, what="", **options):
        dtype = x.dtype
        cdt = R.compute_dtype(dtype)
        xm = x.detach().clone().requires_grad_(True)
        indices, weights = mt.route(xm, k, **options)
        out_shape = tuple(x.shape[:-1]) + (k,)
        self.assertEqual(indices.dtype, torch.int64, what)
        self.assertEqual(tuple(indices.shape), out_shape, what)
        self.assertEqual(weights.dtype, cdt, what)
        self.assertEqual(tuple(weights.shape), out_shape, what)
        gen = torch.Generator().manual_seed(99)
        upstream = torch.randn(*out_shape, generator=gen, dtype=torch.float64).to(cdt)
        (weights * upstream).sum().backward()
        self.assertIsNotNone(xm.grad, what + ": no gradient")
        self.assertEqual(xm.grad.dtype, dtype, what)

        xr = x.detach().to(cdt).requires_grad_(True)
        ref_indices, ref_weights = R.route(xr, k, **options)
        (ref_weights * upstream).sum().backward()
        if not torch.equal(indices, ref_indices):
            rows = (indices != ref_indices).reshape(-1, k).any(1).nonzero().reshape(-1)[:3]
            self.fail("%s: indices differ at tokens %s: got %s, expected %s" % (
                what, rows.tolist(), indices.reshape(-1, k)[rows].tolist(),
                ref_indices.reshape(-1, k)[rows].tolist()))
        R.assert_close_scaled(self, weights, ref_weights, R.VALUE_RTOL[dtype], what + " weights")
        R.assert_close_scaled(self, xm.grad, xr.grad, R.GRAD_RTOL[dtype], what + " gradient")
        return indices, weights.detach(), xm.grad

    def test_option_combinations(self):
        for (name, k, n, options), dtype in itertools.product(CASES, R.ALL_DTYPES):
            with self.subTest(case=name, dtype=dtype):
                x = repaired_logits((64, n), k, dtype, options, seed=len(name))
                self.check(x, k, "route %s %s" % (name, dtype), **options)

    def test_three_dimensional(self):
        for name, k, n, options in CASES[:1] + CASES[8:9]:
            with self.subTest(case=name):
                x = repaired_logits((3, 10, n), k, torch.float64, options, seed=3)
                self.check(x, k, "route 3-D " + name, **options)

    def test_default_options(self):
        x = repaired_logits((32, 8), 2, torch.float64, {}, seed=4)
        i1, w1 = mt.route(x, 2)
        i2, w2 = mt.route(x, 2, score="softmax", weights="scores", select_on_logits=False,
                          normalize=False, normalize_epsilon=0.0, epsilon_mode="add",
                          scaling_factor=1.0, num_groups=1, group_topk=1,
                          group_score="sum_top_k_over_groups", group_fill="negative_infinity",
                          expert_bias=None)
        self.assertTrue(torch.equal(i1, i2))
        self.assertTrue(torch.equal(w1, w2))
        # Default: the softmax scores of the top 2, by decreasing score.
        q = torch.softmax(x, -1)
        self.assertTrue(torch.equal(i1, torch.sort(q, -1, descending=True).indices[:, :2]))
        R.assert_close_scaled(self, w1, torch.sort(q, -1, descending=True).values[:, :2], 1e-12,
                              "default weights")

    def test_option_string_spellings(self):
        x = repaired_logits((32, N16), 4, torch.float64,
                            dict(score="sigmoid", num_groups=4, group_topk=2,
                                 group_score="sum_top2", group_fill="zero"), seed=5)
        base = mt.route(x, 4, score="sqrt_softplus", weights="softmax_of_selected",
                        num_groups=4, group_topk=2, group_score="sum_top2",
                        group_fill="negative_infinity", normalize=True,
                        normalize_epsilon=0.01, epsilon_mode="add")
        alias = mt.route(x, 4, score="sqrt-softplus", weights="softmax-of-selected",
                         num_groups=4, group_topk=2, group_score="sum-top2",
                         group_fill="negative-infinity", normalize=True,
                         normalize_epsilon=0.01, epsilon_mode="add")
        self.assertTrue(torch.equal(base[0], alias[0]))
        self.assertTrue(torch.equal(base[1], alias[1]))
        a = mt.route(x, 4, num_groups=4, group_topk=2, group_score="sum_top_k_over_groups")
        b = mt.route(x, 4, num_groups=4, group_topk=2, group_score="sum-top-k-over-groups")
        self.assertTrue(torch.equal(a[0], b[0]))

    def test_bias_changes_selection_not_weights(self):
        x = repaired_logits((40, 8), 2, torch.float64, {}, seed=6)
        b = torch.zeros(8, dtype=torch.float64)
        b[7] = 10.0       # expert 7 always selected first, with its own (unbiased) score
        indices, weights, _ = self.check(x, 2, "big bias", expert_bias=b)
        self.assertTrue(bool((indices[:, 0] == 7).all()))
        q = torch.softmax(x, -1)
        R.assert_close_scaled(self, weights[:, 0], q[:, 7], 1e-12, "unbiased weight")
        # A float32 bias tensor is accepted too.
        i32, w32 = mt.route(x, 2, expert_bias=b.to(torch.float32))
        self.assertTrue(torch.equal(i32, indices))

    def test_gradient_through_a_linear_router(self):
        gen = torch.Generator().manual_seed(12)
        h = torch.randn(64, 12, generator=gen, dtype=torch.float64)
        w = torch.randn(8, 12, generator=gen, dtype=torch.float64) * 0.5
        options = dict(normalize=True, weights="softmax_of_selected", select_on_logits=True)
        gaps = []
        R.route(h @ w.t(), 2, gaps=gaps, **options)
        self.assertGreater(torch.stack(gaps).min().item(), 1e-6)
        upstream = torch.randn(64, 2, generator=gen, dtype=torch.float64)
        wm, wr = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
        (mt.route(h @ wm.t(), 2, **options)[1] * upstream).sum().backward()
        (R.route(h @ wr.t(), 2, **options)[1] * upstream).sum().backward()
        R.assert_close_scaled(self, wm.grad, wr.grad, 1e-10, "router weight gradient")

    def test_ties_go_to_the_lower_index(self):
        rows = torch.tensor([
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],   # -> 0, 1
            [0.0, 3.0, 0.0, 3.0, 0.0, 3.0, 0.0, 0.0],   # -> 1, 3
            [2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0],   # -> 0, 6
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0],   # -> 7, 0
        ])
        expected = torch.tensor([[0, 1], [1, 3], [0, 6], [7, 0]])
        for dtype, options in itertools.product(
                (torch.float64, torch.float32, torch.bfloat16),
                (dict(), dict(select_on_logits=True), dict(score="sigmoid", normalize=True),
                 dict(weights="softmax_of_selected", select_on_logits=True))):
            with self.subTest(dtype=dtype, options=options):
                indices, _, _ = self.check(rows.to(dtype), 2, "ties %s" % options, **options)
                self.assertTrue(torch.equal(indices, expected), indices.tolist())

    def test_group_ties_go_to_the_lower_group(self):
        # Groups {0,1}, {2,3}, {4,5}, {6,7} with equal maxima: groups 0 and 1 are kept.
        rows = torch.tensor([[1.0, 0.0, 0.5, 1.0, 1.0, 0.9, 1.0, 0.95]], dtype=torch.float64)
        indices, _, _ = self.check(rows, 2, "group ties", select_on_logits=True, num_groups=4,
                                   group_topk=2, group_score="max")
        self.assertEqual(indices.tolist(), [[0, 3]])

    def test_dropped_groups_filled_with_zero_can_win(self):
        # HF fill 0: with negative biased values in the kept groups, a dropped expert (0) can
        # outrank them; with -Inf it cannot.
        rows = torch.tensor([[0.2, 0.1, -5.0, -5.0, -6.0, -7.0, -6.0, -6.5]], dtype=torch.float64)
        b = torch.full((8,), -1.0, dtype=torch.float64)
        zero, _, _ = self.check(rows, 2, "fill zero", select_on_logits=True, num_groups=4,
                                group_topk=1, group_score="max", group_fill="zero", expert_bias=b)
        inf, _, _ = self.check(rows, 2, "fill -inf", select_on_logits=True, num_groups=4,
                               group_topk=1, group_score="max", expert_bias=b)
        self.assertEqual(inf.tolist(), [[0, 1]])
        self.assertEqual(zero.tolist(), [[2, 3]])


if __name__ == "__main__":
    unittest.main()

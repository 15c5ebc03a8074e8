# SPDX-License-Identifier: Apache-2.0
"""Every bad input listed in notes/torch_python_api.md raises ValueError whose message names the
argument: integer logits, rank other than 2/3, k out of range, NaN/+Inf logits, a mask of the
wrong length, an unknown option string (and a CUDA tensor, when CUDA exists).

Run: PYTHONPATH=<build>/examples/torch /usr/bin/python3 -m unittest -v test_torch_errors
"""

import unittest

import torch

import moebal_reference as R

mt = R.load_extension()

T, N = 24, 8


def good(shape=(T, N), dtype=torch.float32):
    return R.margin_logits(shape, 2, dtype, seed=1)


# Each function as f(logits, k, mask, **options) so that one table drives every check.
FUNCTIONS = {
    "switch_aux_loss": lambda x, k=2, mask=None, **o: mt.switch_aux_loss(x, k, mask=mask, **o),
    "z_loss": lambda x, k=2, mask=None, **o: mt.z_loss(x, mask=mask, **o),
    "seq_aux_loss": lambda x, k=2, mask=None, **o: mt.seq_aux_loss(
        x, k, x.shape[1] if x.dim() == 3 else 6, mask=mask, **o),
    "cv2_importance_loss": lambda x, k=2, mask=None, **o: mt.cv2_importance_loss(x, k, **o),
    "route": lambda x, k=2, mask=None, **o: mt.route(x, k, **o),
}
TAKES_K = ("switch_aux_loss", "seq_aux_loss", "cv2_importance_loss", "route")
TAKES_MASK = ("switch_aux_loss", "z_loss", "seq_aux_loss")
OPTION_STRINGS = {
    "switch_aux_loss": ("convention", "score"),
    "seq_aux_loss": ("layout", "score"),
    "route": ("score", "weights", "epsilon_mode", "group_score", "group_fill"),
}


class ErrorsTest(unittest.TestCase):

    def assert_value_error(self, argument, fn, *args, **kwargs):
        """fn(*args, **kwargs) raises ValueError naming `argument` (a name or a tuple of names)."""
        names = (argument,) if isinstance(argument, str) else argument
        with self.assertRaises(ValueError) as caught:
            fn(*args, **kwargs)
        message = str(caught.exception)
        self.assertTrue(any(name in message for name in names),
                        "ValueError message %r does not name %s" % (message, names))
        return message

    def test_integer_logits(self):
        for name, fn in FUNCTIONS.items():
            for dtype in (torch.int64, torch.int32, torch.uint8, torch.bool):
                with self.subTest(function=name, dtype=dtype):
                    x = torch.ones(T, N, dtype=dtype)
                    self.assert_value_error("logits", fn, x)

    def test_rank_other_than_two_or_three(self):
        for name, fn in FUNCTIONS.items():
            for shape in ((N,), (2, 2, 6, N), ()):
                with self.subTest(function=name, shape=shape):
                    x = torch.randn(*shape) if shape else torch.tensor(1.0)
                    self.assert_value_error("logits", fn, x)

    def test_k_out_of_range(self):
        for name in TAKES_K:
            for k in (0, -1, N + 1):
                with self.subTest(function=name, k=k):
                    self.assert_value_error("k", FUNCTIONS[name], good(), k)

    def test_nan_and_positive_infinity(self):
        for name, fn in FUNCTIONS.items():
            for value in (float("nan"), float("inf")):
                for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
                    with self.subTest(function=name, value=value, dtype=dtype):
                        x = good(dtype=dtype).clone()
                        x[5, 3] = value
                        self.assert_value_error("logits", fn, x)

    def test_mask_of_the_wrong_length(self):
        for name in TAKES_MASK:
            for length in (T - 1, T + 1, 1):
                with self.subTest(function=name, length=length):
                    self.assert_value_error("mask", FUNCTIONS[name], good(), 2,
                                            torch.ones(length, dtype=torch.bool))
            with self.subTest(function=name, shape="3-D"):
                x = good((4, 6, N))
                self.assert_value_error("mask", FUNCTIONS[name], x, 2,
                                        torch.ones(4, 5, dtype=torch.bool))

    def test_unknown_option_strings(self):
        for name, options in OPTION_STRINGS.items():
            for option in options:
                for bad in ("no-such-option", "", "Megatron "):
                    with self.subTest(function=name, option=option, value=bad):
                        self.assert_value_error(option, FUNCTIONS[name], good(), 2,
                                                **{option: bad})

    def test_mask_with_nan(self):
        # moebal rejects NaN in a mask (README: "masks of the wrong length or with NaN").
        mask = torch.ones(T)
        mask[3] = float("nan")
        for name in TAKES_MASK:
            with self.subTest(function=name):
                self.assert_value_error("mask", FUNCTIONS[name], good(), 2, mask)

    def test_non_finite_coefficients(self):
        # moebal checks every coefficient; its message names options.coefficient ("coeff...").
        for name in ("switch_aux_loss", "z_loss", "seq_aux_loss", "cv2_importance_loss"):
            for coeff in (float("nan"), float("inf")):
                with self.subTest(function=name, coeff=coeff):
                    self.assert_value_error("coeff", FUNCTIONS[name], good(), 2, coeff=coeff)

    def test_router_options(self):
        # RouterOptions' own checks (include/moebal/routers/router.hpp check_router_options).
        x = good((T, 16))
        cases = [
            ("expert_bias", dict(expert_bias=torch.zeros(15))),
            ("expert_bias", dict(expert_bias=torch.full((16,), float("nan")))),
            ("num_groups", dict(num_groups=3)),
            ("num_groups", dict(num_groups=0)),
            ("group_topk", dict(num_groups=4, group_topk=5)),
            ("group_topk", dict(num_groups=4, group_topk=0)),
            ("group_topk", dict(num_groups=4, group_topk=3)),     # 3 does not divide k = 2
            ("normalize_epsilon", dict(normalize=True, normalize_epsilon=-1.0)),
            ("normalize_epsilon", dict(normalize=True, normalize_epsilon=float("nan"))),
            ("scaling_factor", dict(scaling_factor=float("inf"))),
        ]
        for argument, options in cases:
            with self.subTest(argument=argument, options=options):
                self.assert_value_error(argument, mt.route, x, 2, **options)
        # k larger than the experts of the kept groups; softmax of one selected logit.
        self.assert_value_error("k", mt.route, x, 5, num_groups=4, group_topk=1,
                                group_score="max")
        self.assert_value_error("k", mt.route, x, 1, weights="softmax_of_selected")

    def test_sequence_length_checks(self):
        # 3-D logits: seq_len must equal S and the layout must be batch-major.
        x = good((4, 6, N))
        self.assert_value_error("seq_len", mt.seq_aux_loss, x, 2, 3)
        self.assert_value_error("layout", mt.seq_aux_loss, x, 2, 6, layout="seq-major")
        # 2-D: S must divide T (moebal's check names the layout it builds from seq_len).
        self.assert_value_error(("seq_len", "layout"), mt.seq_aux_loss, good(), 2, 5)
        self.assert_value_error(("seq_len", "layout"), mt.seq_aux_loss, good(), 2, 0)

    def test_global_batch_balance(self):
        self.assert_value_error("k", mt.GlobalBatchBalance, N, 0)
        self.assert_value_error("k", mt.GlobalBatchBalance, N, N + 1)
        self.assert_value_error("convention", mt.GlobalBatchBalance, N, 2, convention="nope")
        self.assert_value_error("score", mt.GlobalBatchBalance, N, 2, score="nope")
        self.assert_value_error("weighting", mt.GlobalBatchBalance, N, 2, weighting="nope")
        # A bad micro-batch (NaN, wrong N, bad mask) is reported by count or, at the latest,
        # by synchronize (moebal defers count's errors so that no rank is left waiting).
        for bad, mask, argument in (
                (good().clone().fill_(float("nan")), None, "logits"),
                (torch.randn(T, N + 1), None, "logits"),
                (good(), torch.ones(T - 2), "mask")):
            with self.subTest(argument=argument):
                balance = mt.GlobalBatchBalance(N, 2)
                with self.assertRaises(ValueError) as caught:
                    balance.count(good())
                    balance.count(bad, mask=mask)
                    balance.synchronize()
                self.assertIn(argument, str(caught.exception))
        # loss before synchronize.
        balance = mt.GlobalBatchBalance(N, 2)
        balance.count(good())
        with self.assertRaises(ValueError):
            balance.loss(good())

    @unittest.skipUnless(torch.cuda.is_available(), "no CUDA device on this machine")
    def test_cuda_tensor(self):  # pragma: no cover - needs CUDA
        for name, fn in FUNCTIONS.items():
            with self.subTest(function=name):
                self.assert_value_error("logits", fn, good().cuda())

    def test_valid_inputs_do_not_raise(self):
        # The same calls with good arguments work (so the failures above are the checks').
        for name, fn in FUNCTIONS.items():
            with self.subTest(function=name):
                fn(good())
                fn(good((4, 6, N)))


if __name__ == "__main__":
    unittest.main()

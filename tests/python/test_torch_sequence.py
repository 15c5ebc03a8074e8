# SPDX-License-Identifier: Apache-2.0
"""moebal_torch.seq_aux_loss against PyTorch autograd on the written definition: the mean over
sequences (with at least one real token) of the Megatron-convention Switch loss within each.

Run: PYTHONPATH=<build>/examples/torch /usr/bin/python3 -m unittest -v test_torch_sequence
"""

import itertools
import unittest

import torch

import moebal_reference as R

mt = R.load_extension()

BATCH_MAJOR = ("batch-major", "batch_major")
SEQ_MAJOR = ("seq-major", "sequence-major", "sequence_major")


class SequenceAuxLossTest(unittest.TestCase):

    def check(self, x, k, seq_len, mask=None, what="", **options):
        real = None if mask is None else R.real_rows(mask, R.as_rows(x).shape[0])
        reference_options = dict(options)
        if "layout" in reference_options:
            reference_options["layout"] = ("batch-major" if options["layout"] in BATCH_MAJOR
                                           else "seq-major")
        return R.check_loss(
            self,
            lambda xm: mt.seq_aux_loss(xm, k, seq_len, mask=mask, **options),
            lambda xr: R.seq_aux_loss(xr, k, seq_len, mask=mask, **reference_options),
            x, real=real,
            what="seq_aux_loss(%s, k=%d, seq_len=%d, %s, mask %s) %s" % (
                x.dtype, k, seq_len, options, None if mask is None else mask.dtype, what))

    def test_layouts_scores_dtypes(self):
        for layout, score, dtype in itertools.product(BATCH_MAJOR + SEQ_MAJOR,
                                                      ("softmax", "sigmoid"), R.ALL_DTYPES):
            with self.subTest(layout=layout, score=score, dtype=dtype):
                x = R.margin_logits((96, 8), 2, dtype, seed=1)
                self.check(x, 2, 16, layout=layout, score=score)

    def test_default_layout_is_batch_major(self):
        x = R.margin_logits((60, 8), 2, torch.float64, seed=2)
        self.check(x, 2, 12)
        a = mt.seq_aux_loss(x, 2, 12).item()
        b = mt.seq_aux_loss(x, 2, 12, layout="batch-major").item()
        c = mt.seq_aux_loss(x, 2, 12, layout="seq-major").item()
        self.assertEqual(a, b)
        self.assertNotAlmostEqual(a, c, places=6)

    def test_layouts_agree_after_the_permutation(self):
        # Batch-major [B, S] rows transposed to [S, B] give the same loss under seq-major.
        b, s, n = 5, 12, 8
        x = R.margin_logits((b, s, n), 2, torch.float64, seed=3)
        batch_major = mt.seq_aux_loss(x.reshape(b * s, n), 2, s, layout="batch-major")
        seq_major = mt.seq_aux_loss(x.transpose(0, 1).reshape(b * s, n), 2, s,
                                    layout="seq-major")
        R.assert_value_close(self, batch_major.item(), seq_major.item(), 1e-12, "permutation")

    def test_one_sequence_is_the_switch_loss(self):
        x = R.margin_logits((64, 8), 2, torch.float64, seed=4)
        seq = mt.seq_aux_loss(x, 2, 64)
        switch = mt.switch_aux_loss(x, 2)
        R.assert_value_close(self, seq.item(), switch.item(), 1e-12, "one sequence")

    def test_masks_and_coefficients(self):
        for layout, mask_dtype, dtype in itertools.product(
                ("batch-major", "seq-major"), (torch.bool, torch.int64, torch.float32),
                (torch.float64, torch.float32, torch.bfloat16)):
            with self.subTest(layout=layout, mask_dtype=mask_dtype, dtype=dtype):
                x = R.margin_logits((72, 8), 2, dtype, seed=5, ks=(1, 2, 3)).clone()
                mask = R.random_mask(72, seed=6, dtype=mask_dtype, fraction_real=0.6)
                x[~R.real_rows(mask, 72)] = 12.0
                self.check(x, 2, 9, mask=mask, layout=layout, coeff=0.3, score="softmax")
                self.check(x, 3, 9, mask=mask, layout=layout, coeff=2.0, score="sigmoid")

    def test_a_fully_padded_sequence_is_not_averaged(self):
        # Sequence 1 (batch-major rows 8..15) is all padding: the mean is over 2 sequences.
        x = R.margin_logits((24, 8), 2, torch.float64, seed=7)
        mask = torch.ones(24, dtype=torch.bool)
        mask[8:16] = False
        value, _ = self.check(x, 2, 8, mask=mask)
        expected = (mt.switch_aux_loss(x[:8], 2).item() + mt.switch_aux_loss(x[16:], 2).item()) / 2
        R.assert_value_close(self, value.item(), expected, 1e-12, "mean over 2 sequences")
        # Seq-major: sequence b holds rows b, b + B, ...: pad every row of sequence 0.
        mask = torch.ones(24, dtype=torch.bool)
        mask[0::3] = False
        self.check(x, 2, 8, mask=mask, layout="seq-major")

    def test_all_padding(self):
        x = R.margin_logits((16, 8), 2, torch.float64, seed=8).requires_grad_(True)
        value = mt.seq_aux_loss(x, 2, 4, mask=torch.zeros(16, dtype=torch.int64))
        value.backward()
        self.assertEqual(value.item(), 0.0)
        self.assertTrue(bool((x.grad == 0).all()))

    def test_three_dimensional(self):
        for dtype, score in itertools.product(R.ALL_DTYPES, ("softmax", "sigmoid")):
            with self.subTest(dtype=dtype, score=score):
                x = R.margin_logits((4, 16, 8), 2, dtype, seed=9)
                self.check(x, 2, 16, score=score)
                self.check(x, 2, 16, layout="batch-major", score=score)
                mask = R.random_mask(64, seed=10, shape=(4, 16))
                self.check(x, 2, 16, mask=mask, score=score, coeff=0.5)


if __name__ == "__main__":
    unittest.main()

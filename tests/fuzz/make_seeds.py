#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes the seed corpora of the fuzz targets (standard library only):

  corpus/api/  byte strings for fuzz_api, at least one reaching each API branch and option
               group (the input format is documented at the top of fuzz_api.cpp);
  corpus/npy/  a few small valid and invalid .npy files: copies of numpy-written fixtures from
               tests/fixtures/npy/ plus hand-made headers.

Run from anywhere: python3 tests/fuzz/make_seeds.py (it replaces both folders' contents).
"""

import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
API_DIR = os.path.join(HERE, "corpus", "api")
NPY_DIR = os.path.join(HERE, "corpus", "npy")
FIXTURES = os.path.join(HERE, "..", "fixtures", "npy")

# Header byte offsets (see fuzz_api.cpp).
API, TYPE, T, N, K, CONV, SCORE, COEF, MASK, MASKPAT, SCALE, SEED = range(12)
DOUBLE, FLOAT, BF16 = 0, 1, 2
SWITCH, Z, CV2, SEQ, COMBINED, DEVICE, ROUTE, CAPACITY, GLOBAL, EXPERT_CHOICE = range(10)


def header(api, type_=DOUBLE, tokens=16, experts=8, k=2, seed=1, **fields):
    h = [0] * 32
    h[API], h[TYPE], h[T], h[N], h[K] = api, type_, tokens - 1, experts - 1, k
    h[SCALE], h[SEED] = 3, seed  # logits uniform in [-1, 1)
    for offset, value in fields.items():
        h[int(offset[1:])] = value  # fields given as b12=..., b31=...
    return bytes(h)


def edit(position, code):
    return struct.pack("<HB", position, code)


NAN, PINF, NINF, ROW_NINF = 0, 1, 2, 3


def api_seeds():
    s = {}
    # Switch loss: plain, masked bfloat16 with the object and with-counts checks, HF + sigmoid
    # in float, first choice, NaN (must throw), k out of range (must throw).
    s["switch_double"] = header(SWITCH)
    s["switch_bf16_mask_object"] = header(SWITCH, BF16, b8=3, b9=2, b31=6)
    s["switch_float_hf_sigmoid"] = header(SWITCH, FLOAT, b5=1, b6=1, b7=1, b31=4)
    s["switch_first_choice_mask_int64"] = header(SWITCH, b5=2, b8=4, b9=4, b31=6)
    s["switch_nan"] = header(SWITCH) + edit(5, NAN)
    s["switch_k_too_large"] = header(SWITCH, k=9)
    # z-loss: plain; float with a -Inf logit, a row of -Inf in a padded token and a float mask.
    s["z_double"] = header(Z, b7=6)
    s["z_float_ninf_mask"] = header(Z, FLOAT, b8=5, b9=2) + edit(3, NINF) + edit(40, ROW_NINF)
    # Importance CV^2: dense, top-k gates, unbiased; the load metric.
    s["cv2_dense"] = header(CV2)
    s["cv2_topk_sigmoid"] = header(CV2, FLOAT, b6=1, b28=1)
    s["cv2_unbiased_bf16"] = header(CV2, BF16, b28=0x11)
    s["cv2_load"] = header(CV2, b31=8)
    # Sequence-level: batch-major S = 4, sequence-major, packed segments, S = 5 (must throw).
    s["seq_batch_major"] = header(SEQ, b12=9, b13=0)
    s["seq_seq_major_mask_megatron"] = header(SEQ, b12=9, b13=1 | 0x10, b8=3, b9=2)
    s["seq_segments_float"] = header(SEQ, FLOAT, b12=5, b13=2)
    s["seq_not_dividing"] = header(SEQ, b12=16, b13=0)
    # Combined: every term on (layout S = 4); without the sequence term in bfloat16.
    s["combined_all_terms"] = header(COMBINED, b12=9, b14=0x0F)
    s["combined_bf16_no_seq"] = header(COMBINED, BF16, b14=0x1B)
    # DeepSeek device (D = 4) and communication (D = 4, M = 2) losses.
    s["device_d4"] = header(DEVICE, b12=8)
    s["communication_d4_m2"] = header(DEVICE, FLOAT, b12=8, b28=0x80)
    # Routers: default; post-softmax Megatron-like (select on logits, softmax of the selected,
    # normalized); grouped sigmoid with a bias (DeepSeek-V3-like); bfloat16 sqrt-softplus.
    s["route_default"] = header(ROUTE)
    s["route_post_softmax"] = header(ROUTE, b16=1 | 4 | 8)
    s["route_groups_bias_sigmoid"] = header(ROUTE, b15=1, b16=8, b17=1, b18=1, b19=5, b20=1,
                                            b21=0x01, b22=4)
    s["route_bf16_sqrt_softplus"] = header(ROUTE, BF16, b15=2, b16=8 | 0x10, b17=2)
    # Capacity: Megatron by weight; Tutel by position; DeepSpeed random with renormalization
    # and padding; an index out of range (must throw).
    s["capacity_megatron"] = header(CAPACITY)
    s["capacity_tutel_position"] = header(CAPACITY, b23=2 | (1 << 4), b24=2)
    s["capacity_deepspeed_random_pad"] = header(CAPACITY, FLOAT, b23=1 | (3 << 4), b24=2,
                                                b25=32 | 64 | 1)
    s["capacity_bad_index"] = header(CAPACITY, b25=128)
    # Global batch: one micro-batch; three on two identical ranks; running (Megatron parity);
    # misuse (forward before synchronize); a disagreeing rank (must throw).
    s["global_single"] = header(GLOBAL)
    s["global_three_two_ranks_mask"] = header(GLOBAL, b26=2 | 16, b8=3, b9=2)
    s["global_running_bf16"] = header(GLOBAL, BF16, b26=64 | 2 | 8)
    s["global_misuse"] = header(GLOBAL, b26=48 | 1)
    s["global_disagreeing_rank"] = header(GLOBAL, b26=32)
    # Expert choice: c = 1 and c = 2.
    s["expert_choice_c1"] = header(EXPERT_CHOICE)
    s["expert_choice_c2_float"] = header(EXPERT_CHOICE, FLOAT, b27=1)
    return s


def npy_bytes(header_text, data=b"", major=1):
    text = header_text.encode("latin-1")
    prefix_len = 10 if major == 1 else 12
    total = prefix_len + len(text) + 1
    text += b" " * ((64 - total % 64) % 64) + b"\n"
    length = struct.pack("<H" if major == 1 else "<I", len(text))
    return b"\x93NUMPY" + bytes([major, 0]) + length + text + data


def npy_seeds():
    s = {}
    for name in ["f4_3x4_c", "f8_2x3x4_f", "f2_special", "int_i8be", "mask_bool", "scalar_0d",
                 "empty_0x3", "f4_3x4_v3", "truncated", "bad_header", "structured", "overflow",
                 "negative_dim"]:
        with open(os.path.join(FIXTURES, name + ".npy"), "rb") as f:
            s[name] = f.read()
    # Hand-made: double quotes, a trailing comma, Python-2 long, big-endian uint16, Fortran
    # order of rank 3, a duplicate key and a (5) shape.
    s["hand_dquote_long"] = npy_bytes('{"descr": ">u2", "fortran_order": False, "shape": (2L, 3L)}',
                                      struct.pack(">6H", 1, 2, 3, 65535, 0, 7))
    s["hand_fortran_rank3"] = npy_bytes("{'descr': '<f8', 'fortran_order': True, 'shape': (2, 1, 2), }",
                                        struct.pack("<4d", 1.0, -0.0, float("inf"), 2.5), major=2)
    s["hand_duplicate_key"] = npy_bytes("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,)}",
                                        b"\0\0\0\0")
    s["hand_paren_int"] = npy_bytes("{'descr': '|b1', 'fortran_order': False, 'shape': (5)}", b"\1" * 5)
    return s


def write(folder, seeds):
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    for name, data in sorted(seeds.items()):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    write(API_DIR, api_seeds())
    write(NPY_DIR, {name + ".npy": data for name, data in npy_seeds().items()})
    print("wrote", API_DIR, "and", NPY_DIR)

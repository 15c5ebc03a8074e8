# SPDX-License-Identifier: Apache-2.0
"""Independent PyTorch references for the tests of the `moebal_torch` extension.

Every function here is written from the definitions in notes/torch_python_api.md and the doc
comments of include/moebal/{losses,routers}/*.hpp, with plain PyTorch operations, so that
autograd gives the reference gradient. Nothing here calls moebal.

Conventions shared by the references:
  * `x` is a floating tensor that may require grad; the references compute in float64 for
    float64 input and in float32 otherwise (half-precision inputs are upcast first, as
    Megatron-core's `moe_router_dtype=fp32` and Hugging Face's `.float()` do).
  * 3-D logits [B, S, N] are the T = B * S rows in memory order (token b * S + s).
  * A mask is any tensor with T elements (or [B, S]); nonzero = real token.
  * The top-k is the k largest values, ties to the lower expert index, computed by explicit
    rank counting (not torch.topk, whose tie order is unspecified).
"""

import math
import os
import sys

import torch

# ---------------------------------------------------------------------------------------------
# Loading the extension


def load_extension():
    """Imports moebal_torch (after torch, as the API requires) with a helpful message."""
    try:
        import moebal_torch
    except ImportError as error:  # pragma: no cover - depends on the build
        raise ImportError(
            "cannot import moebal_torch: build the target moebal_torch and put its folder "
            "(<build>/examples/torch) on PYTHONPATH; interpreter %s, PYTHONPATH=%s (%s)"
            % (sys.executable, os.environ.get("PYTHONPATH", ""), error)) from error
    return moebal_torch


# ---------------------------------------------------------------------------------------------
# Dtypes and tolerances

HALF_DTYPES = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def compute_dtype(dtype):
    """The dtype the reference (and the loss value) is computed in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Relative tolerance of a value or gradient, relative to the largest magnitude of the
# reference (so that tiny entries are compared to the scale of the whole tensor).
VALUE_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5,
              torch.float16: 1e-5}
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2,
             torch.float16: 2e-3}


def max_abs_error(got, expected):
    got = got.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    if got.numel() == 0:
        return 0.0, 0.0
    return (got - expected).abs().max().item(), expected.abs().max().item()


def assert_close_scaled(case, got, expected, rtol, what=""):
    """|got - expected| <= rtol * max(max|expected|, tiny) elementwise, with a readable report."""
    case.assertEqual(tuple(got.shape), tuple(expected.shape),
                     "%s: shape %s, expected %s" % (what, tuple(got.shape), tuple(expected.shape)))
    err, scale = max_abs_error(got, expected)
    bound = rtol * max(scale, 1e-30)
    if not err <= bound:
        diff = (got.detach().double() - expected.detach().double()).abs()
        where = divmod(int(diff.argmax()), got.shape[-1]) if got.dim() >= 1 and got.numel() else ()
        case.fail("%s: max |got - expected| = %.3e > %.1e * max|expected| (= %.3e), worst element "
                  "%s: got %r, expected %r" % (
                      what, err, rtol, scale, where,
                      got.detach().double().reshape(-1)[int(diff.argmax())].item(),
                      expected.detach().double().reshape(-1)[int(diff.argmax())].item()))


def assert_value_close(case, got, expected, rtol, what=""):
    got = float(got)
    expected = float(expected)
    bound = rtol * max(abs(expected), 1e-300)
    if not abs(got - expected) <= bound:
        case.fail("%s: got %.17g, expected %.17g (|diff| = %.3e > %.1e relative)" % (
            what, got, expected, abs(got - expected), rtol))


# ---------------------------------------------------------------------------------------------
# Inputs with clear top-k margins


def margin_logits(shape, k, dtype=torch.float64, seed=0, margin=0.3, skew=1.0, scale=1.0,
                  ks=None):
    """Random logits whose top-k sets (for every k in `ks`, default {1, k}) are unambiguous.

    Rows are random normal plus a per-expert skew (so that the load is uneven); then, for
    every k' in `ks`, the k' largest entries of each row are raised by `margin` (which keeps
    their order and opens a gap of at least `margin` below them). Softmax and the normalized
    sigmoid are increasing, so the top-k of the scores is the top-k of the logits. The values
    are rounded to `dtype` and the margins are checked again after rounding.
    """
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    x = x + skew * torch.linspace(1.0, -1.0, n, dtype=torch.float64)
    flat = x.reshape(-1, n)
    for kk in sorted(set(ks if ks is not None else (1, k))):
        if kk >= n:
            continue
        order = torch.argsort(flat, dim=1, descending=True)
        bump = torch.zeros_like(flat).scatter(1, order[:, :kk], margin)
        flat = flat + bump
    x = flat.reshape(shape).to(dtype)
    check_margins(x, ks if ks is not None else (1, k), margin / 2)
    return x


def check_margins(x, ks, min_gap):
    """Asserts that for every k' in ks the k'-th and (k'+1)-th largest logits differ by >= min_gap."""
    flat = x.detach().to(torch.float64).reshape(-1, x.shape[-1])
    srt = torch.sort(flat, dim=1, descending=True).values
    for kk in ks:
        if kk < flat.shape[1]:
            gap = (srt[:, kk - 1] - srt[:, kk]).min().item()
            assert gap >= min_gap, "test input without a clear top-%d margin (%g)" % (kk, gap)


def random_mask(tokens, seed, fraction_real=0.75, dtype=torch.bool, shape=None):
    gen = torch.Generator().manual_seed(seed)
    real = torch.rand(tokens, generator=gen) < fraction_real
    real[0] = True
    if dtype == torch.bool:
        mask = real
    elif dtype.is_floating_point:
        # Nonzero means real: use values other than 1 to check that.
        mask = torch.where(real, torch.rand(tokens, generator=gen) + 0.5,
                           torch.zeros(tokens)).to(dtype)
    else:
        mask = real.to(dtype) * 3
    return mask.reshape(shape) if shape is not None else mask


# ---------------------------------------------------------------------------------------------
# Building blocks


def as_rows(x):
    """[T, N] view of 2-D or 3-D logits (memory order)."""
    return x.reshape(-1, x.shape[-1])


def real_rows(mask, tokens):
    """Bool [T]: which tokens are real."""
    if mask is None:
        return torch.ones(tokens, dtype=torch.bool)
    m = mask.reshape(-1)
    assert m.numel() == tokens
    return m != 0


def topk_ranks(values):
    """rank[t, j] = #{i : v_ti > v_tj} + #{i < j : v_ti == v_tj}: a permutation of 0..N-1 per
    row; the top-k (ties to the lower index) are the entries with rank < k."""
    v = values.detach()
    n = v.shape[-1]
    greater = v.unsqueeze(1) > v.unsqueeze(2)           # [t, j, i]: v_ti > v_tj
    equal = v.unsqueeze(1) == v.unsqueeze(2)
    ar = torch.arange(n)
    lower = ar.unsqueeze(0) < ar.unsqueeze(1)            # [j, i]: i < j
    return (greater | (equal & lower)).sum(-1)


def topk_indices(values, k):
    """[T, k] indices of the k largest values per row, by decreasing value, ties to lower index."""
    ranks = topk_ranks(values)
    return torch.argsort(ranks, dim=1)[:, :k]


def loss_scores(x, score):
    """q = softmax(x) or the normalized sigmoid s / (sum s + 1e-20) (the losses' ScoreFunction)."""
    if score == "softmax":
        return torch.softmax(x, dim=-1)
    if score == "sigmoid":
        s = torch.sigmoid(x)
        return s / (s.sum(dim=-1, keepdim=True) + 1e-20)
    raise ValueError(score)


CONVENTIONS = {"megatron": "megatron", "hf": "huggingface", "huggingface": "huggingface",
               "first-choice": "first_choice", "first_choice": "first_choice"}


def load_fraction(convention, counts, first, tokens, k):
    convention = CONVENTIONS[convention]
    if convention == "megatron":
        return counts / (tokens * k)
    if convention == "huggingface":
        return counts / tokens
    return first / tokens


def routing_counts(q, k):
    """(top-k counts c [N], first-choice counts [N]) of score rows q [T, N], as constants."""
    ranks = topk_ranks(q)
    counts = (ranks < k).sum(0).to(q.dtype)
    first = (ranks == 0).sum(0).to(q.dtype)
    return counts.detach(), first.detach()


# ---------------------------------------------------------------------------------------------
# The losses


def switch_aux_loss(x, k, convention="megatron", score="softmax", coeff=1.0, mask=None):
    """L = coeff N sum_i f_i P_i over the real tokens (see SwitchConvention)."""
    rows = as_rows(x)
    n = rows.shape[1]
    real = real_rows(mask, rows.shape[0])
    q = loss_scores(rows, score)[real]
    tokens = q.shape[0]
    if tokens == 0:
        return (rows * 0).sum()
    counts, first = routing_counts(q, k)
    f = load_fraction(convention, counts, first, tokens, k)
    p = q.sum(0) / tokens
    return coeff * n * (f * p).sum()


def z_loss(x, coeff=1.0, mask=None):
    """coeff * mean over real tokens of logsumexp(x_t)^2."""
    rows = as_rows(x)
    real = real_rows(mask, rows.shape[0])
    lse = torch.logsumexp(rows[real], dim=-1)
    if lse.numel() == 0:
        return (rows * 0).sum()
    return coeff * (lse * lse).sum() / lse.numel()


def sequence_ids(tokens, seq_len, layout):
    batch = tokens // seq_len
    t = torch.arange(tokens)
    if layout in ("batch-major", "batch_major"):
        return t // seq_len, batch
    return t % batch, batch


def seq_aux_loss(x, k, seq_len, layout="batch-major", score="softmax", coeff=1.0, mask=None):
    """Mean over the sequences with at least one real token of the Megatron-convention Switch
    loss computed within each sequence (own-length mask mode)."""
    rows = as_rows(x)
    tokens = rows.shape[0]
    real = real_rows(mask, tokens)
    ids, batch = sequence_ids(tokens, seq_len, layout)
    total = None
    counted = 0
    for b in range(batch):
        members = (ids == b) & real
        if int(members.sum()) == 0:
            continue
        counted += 1
        part = switch_aux_loss(rows[members], k, "megatron", score, coeff)
        total = part if total is None else total + part
    if counted == 0:
        return (rows * 0).sum()
    return total / counted


def cv2_importance_loss(x, k, coeff=1.0, gates="dense"):
    """coeff Var(I) / Mean(I)^2 (population variance), I_i = sum_t g_ti.

    gates "dense": g = softmax(x) (moebal's default Cv2Options); "topk": g = the softmax
    renormalized over each token's top-k (Shazeer's G(x)), 0 elsewhere."""
    rows = as_rows(x)
    q = torch.softmax(rows, dim=-1)
    if gates == "dense":
        g = q
    else:
        selected = (topk_ranks(q) < k).to(q.dtype)
        gq = q * selected
        g = gq / gq.sum(-1, keepdim=True)
    importance = g.sum(0)
    mu = importance.mean()
    var = ((importance - mu) ** 2).mean()
    return coeff * var / (mu * mu)


# ---------------------------------------------------------------------------------------------
# The router


def router_scores(x, score):
    if score == "softmax":
        return torch.softmax(x, dim=-1)
    if score == "sigmoid":
        return torch.sigmoid(x)
    if score in ("sqrt_softplus", "sqrt-softplus"):
        return torch.sqrt(torch.nn.functional.softplus(x))
    raise ValueError(score)


def route(x, k, score="softmax", weights="scores", select_on_logits=False, normalize=False,
          normalize_epsilon=0.0, epsilon_mode="add", scaling_factor=1.0, num_groups=1,
          group_topk=1, group_score="sum_top_k_over_groups", group_fill="negative_infinity",
          expert_bias=None, gaps=None):
    """(indices [T, k] int64, weights [T, k]) per RouterOptions (include/moebal/routers/router.hpp);
    3-D input gives [B, S, k]. Differentiable in x through the weights.

    `gaps`: if a list, receives per token the smallest margin that decides the output: between
    consecutive selection values among the top k + 1 (the order of the indices matters) and
    between the group_topk-th and next group score."""
    rows = as_rows(x)
    tokens, n = rows.shape
    s = router_scores(rows, score)
    v = (rows if select_on_logits else s).detach().clone()
    if expert_bias is not None:
        v = v + expert_bias.to(v.dtype)
    if num_groups > 1:
        size = n // num_groups
        grouped = v.reshape(tokens, num_groups, size)
        if group_score == "max":
            gscore = grouped.max(dim=-1).values
        else:
            top = min(2, size) if group_score == "sum_top2" else k // group_topk
            gscore = torch.sort(grouped, dim=-1, descending=True).values[..., :top].sum(-1)
        keep = topk_ranks(gscore) < group_topk                      # [T, G]
        if gaps is not None and group_topk < num_groups:
            srt = torch.sort(gscore, dim=-1, descending=True).values
            gaps.append(srt[:, group_topk - 1] - srt[:, group_topk])
        fill = 0.0 if group_fill == "zero" else -math.inf
        keep_expert = keep.unsqueeze(-1).expand(tokens, num_groups, size).reshape(tokens, n)
        v = torch.where(keep_expert, v, torch.full_like(v, fill))
    indices = topk_indices(v, k)
    if gaps is not None:
        srt = torch.sort(v, dim=-1, descending=True).values[:, :min(k + 1, n)]
        if srt.shape[1] > 1:
            diff = srt[:, :-1] - srt[:, 1:]
            diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
            gaps.append(diff.min(dim=1).values)
    if weights == "scores":
        u = torch.gather(s, 1, indices)
    else:
        u = torch.softmax(torch.gather(rows, 1, indices), dim=-1)
    if normalize:
        total = u.sum(-1, keepdim=True)
        if epsilon_mode == "add":
            u = u / (total + normalize_epsilon)
        else:
            u = u / torch.clamp(total, min=normalize_epsilon)
    u = u * scaling_factor
    out_shape = tuple(x.shape[:-1]) + (k,)
    return indices.reshape(out_shape), u.reshape(out_shape)


# ---------------------------------------------------------------------------------------------
# Global-batch balance


def global_batch_shares(micro_batches, k, convention="megatron", score="softmax", coeff=1.0,
                        weighting="tokens", micro_batch_weight=0.0):
    """Shares L_j of every micro-batch (x_j, mask_j) of the global batch (all ranks), each
    differentiable in its own x_j (include/moebal/losses/global_batch.hpp):
      tokens:           L_j = a N sum_i fbar_i S_i^j / Tbar
      micro-batch-mean: L_j = a N sum_i fbar_i P_i^j / Mbar,  P^j = S^j / T_j
    plus micro_batch_weight N sum_i f_i^j P_i^j (micro-batch f in the same convention)."""
    scored = []
    total_counts = total_first = None
    total_tokens = 0
    for x, mask in micro_batches:
        rows = as_rows(x)
        real = real_rows(mask, rows.shape[0])
        q = loss_scores(rows, score)[real]
        counts, first = routing_counts(q, k)
        scored.append((q, counts, first))
        total_counts = counts if total_counts is None else total_counts + counts
        total_first = first if total_first is None else total_first + first
        total_tokens += q.shape[0]
    n = scored[0][0].shape[1]
    mbar = len(micro_batches)
    fbar64 = load_fraction(convention, total_counts.double(), total_first.double(),
                           total_tokens, k)
    fbar = fbar64.to(scored[0][0].dtype)
    shares = []
    for (x, _), (q, counts, first) in zip(micro_batches, scored):
        tokens = q.shape[0]
        if tokens == 0 or total_tokens == 0:
            shares.append((x * 0).sum().to(q.dtype))
            continue
        sums = q.sum(0)
        if weighting in ("tokens",):
            share = coeff * n * (fbar * sums).sum() / total_tokens
        else:
            share = coeff * n * (fbar * sums).sum() / (mbar * tokens)
        if micro_batch_weight != 0.0:
            f = load_fraction(convention, counts, first, tokens, k)
            share = share + micro_batch_weight * n * (f * sums).sum() / tokens
        shares.append(share)
    return shares, total_counts.double(), total_tokens, fbar64


# ---------------------------------------------------------------------------------------------
# The comparison every loss test makes


def check_loss(case, module_fn, reference_fn, x, grad_scale=1.25, real=None, what="",
               reference_dtype=None):
    """Runs module_fn on a copy of x (any dtype) and reference_fn on x upcast to its compute
    dtype; compares the 0-d values (VALUE_RTOL) and d(grad_scale * loss)/dx (GRAD_RTOL of x's
    dtype, relative to the reference's largest entry). `real`: bool [T] of the real tokens;
    padded rows of the module's gradient must be exactly zero. `reference_dtype` overrides the
    reference's dtype (float64 where float32 PyTorch itself is not accurate enough).
    Returns (value, grad)."""
    dtype = x.dtype
    cdt = compute_dtype(dtype)
    xm = x.detach().clone().requires_grad_(True)
    value = module_fn(xm)
    case.assertIsInstance(value, torch.Tensor, what)
    case.assertEqual(value.dim(), 0, "%s: the loss must be a 0-d tensor" % what)
    case.assertEqual(value.dtype, cdt, "%s: loss dtype" % what)
    (value * grad_scale).backward()
    case.assertIsNotNone(xm.grad, "%s: no gradient reached the logits" % what)
    case.assertEqual(xm.grad.dtype, dtype, "%s: gradient dtype" % what)
    case.assertEqual(tuple(xm.grad.shape), tuple(x.shape), "%s: gradient shape" % what)

    xr = x.detach().to(reference_dtype or cdt).requires_grad_(True)
    expected = reference_fn(xr)
    (expected * grad_scale).backward()
    assert_value_close(case, value.item(), expected.item(), VALUE_RTOL[dtype], what + " value")
    assert_close_scaled(case, xm.grad, xr.grad, GRAD_RTOL[dtype], what + " gradient")
    if real is not None:
        padded = ~real.reshape(-1)
        rows = as_rows(xm.grad)[padded]
        case.assertTrue(bool((rows == 0).all()),
                        "%s: padded rows must get an exactly zero gradient" % what)
    return value.detach(), xm.grad.detach()

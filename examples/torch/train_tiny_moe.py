#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""Trains a tiny Mixture-of-Experts classifier on CPU with moebal's balance losses.

The model: a linear router over 8 experts, top-2 routing with the two softmax scores
renormalized (Mixtral's router), each expert a two-layer MLP. The data: points from four
domains (Gaussian clusters) of unequal frequency (55%, 25%, 12%, 8%), each domain with its own
labelling rule, so experts have something to specialize on and the frequent domain pulls the
router towards a few experts. The objective:

    cross-entropy + coeff * moebal_torch.switch_aux_loss(router_logits, k)
                  + z_coeff * moebal_torch.z_loss(router_logits)

switch_aux_loss is the Megatron-core Switch loss N sum_i f_i P_i (f_i = c_i / (T k)) with its
analytic gradient; it replaces the usual hand-written

    probs = softmax(logits); f = one_hot(topk(probs)).sum(0) / (T k); aux = N (f * probs.mean(0)).sum()

Every `--print-every` steps it prints the task loss, the aux loss, the z-loss, the accuracy and
the load per expert (share of the T k top-2 slots, in units of the even share 1/N; 1.00 is
perfect balance) with max/mean load.

Usage (Debian's python3-torch; moebal_torch built into <build>/examples/torch):
    PYTHONPATH=<build>/examples/torch /usr/bin/python3 examples/torch/train_tiny_moe.py
        [--steps 600] [--coeff 1.0] [--z-coeff 0.001] [--seed 0] [--threads 1] [--check]
--check (used by CTest) exits with status 1 unless the final max/mean load over a fresh
evaluation batch is below 1.25 and the accuracy above 0.8. With the defaults the run takes a few
seconds on one core (the model is too small for more threads to help). Measured: seeds 0 to 5
end at 1.09 to 1.16 x the even load with accuracy 0.88 to 0.93; with --coeff 0 the busiest
expert keeps 2.3 to 2.9 x the even load and the check fails. (The coefficient is large next to
the 0.01 of big models because this task loss is small and the run is short.)
"""

import argparse
import sys
import time

import torch

try:
    import moebal_torch
except ImportError as error:  # pragma: no cover - depends on the build
    sys.exit("cannot import moebal_torch (%s): put <build>/examples/torch on PYTHONPATH and run "
             "with /usr/bin/python3" % error)

INPUT = 16
CLASSES = 4
EXPERTS = 8
K = 2
HIDDEN = 32
DOMAIN_WEIGHTS = [0.55, 0.25, 0.12, 0.08]

# Check thresholds (--check), measured with the defaults: see the report at the end of a run.
CHECK_MAX_LOAD = 1.25
CHECK_ACCURACY = 0.8


class Data:
    """Four Gaussian domains, each labelling its points with its own random linear rule."""

    def __init__(self, seed):
        gen = torch.Generator().manual_seed(seed)
        domains = len(DOMAIN_WEIGHTS)
        self.centers = torch.randn(domains, INPUT, generator=gen) * 2.0
        self.rules = torch.randn(domains, INPUT, CLASSES, generator=gen)
        self.weights = torch.tensor(DOMAIN_WEIGHTS)
        self.gen = gen

    def batch(self, size):
        domain = torch.multinomial(self.weights, size, replacement=True, generator=self.gen)
        noise = torch.randn(size, INPUT, generator=self.gen)
        x = self.centers[domain] + noise
        labels = torch.einsum("bi,bic->bc", noise, self.rules[domain]).argmax(-1)
        return x, labels, domain


class TinyMoE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.router = torch.nn.Linear(INPUT, EXPERTS, bias=False)
        scale1 = INPUT ** -0.5
        scale2 = HIDDEN ** -0.5
        self.w1 = torch.nn.Parameter(torch.randn(EXPERTS, INPUT, HIDDEN) * scale1)
        self.b1 = torch.nn.Parameter(torch.zeros(EXPERTS, HIDDEN))
        self.w2 = torch.nn.Parameter(torch.randn(EXPERTS, HIDDEN, CLASSES) * scale2)
        self.b2 = torch.nn.Parameter(torch.zeros(EXPERTS, CLASSES))

    def forward(self, x):
        logits = self.router(x)                                       # [T, N] router logits
        probs = torch.softmax(logits, dim=-1)
        top = torch.topk(probs, K, dim=-1)
        gates = top.values / top.values.sum(-1, keepdim=True)         # Mixtral renormalization
        combine = torch.zeros_like(probs).scatter(1, top.indices, gates)   # [T, N], k nonzero
        # Every expert on every token (tiny sizes: cheaper than dispatching), then the mix.
        hidden = torch.relu(torch.einsum("ti,eih->eth", x, self.w1) + self.b1[:, None, :])
        out = torch.einsum("eth,ehc->etc", hidden, self.w2) + self.b2[:, None, :]
        y = torch.einsum("te,etc->tc", combine, out)
        return y, logits, top.indices


def load_per_expert(indices):
    """Share of the T k top-k slots per expert, in units of the even share 1 / N."""
    counts = torch.bincount(indices.reshape(-1), minlength=EXPERTS).double()
    return counts / counts.sum() * EXPERTS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--coeff", type=float, default=1.0,
                        help="coefficient of switch_aux_loss (0 disables it)")
    parser.add_argument("--z-coeff", type=float, default=1e-3,
                        help="coefficient of z_loss (0 disables it)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--print-every", type=int, default=100)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless the final load and accuracy meet the bounds")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = Data(args.seed + 1)
    model = TinyMoE()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    print("tiny MoE: %d experts, top-%d, %d domains %s, %d steps of %d tokens, aux coeff %g, "
          "z coeff %g, %d threads" % (EXPERTS, K, len(DOMAIN_WEIGHTS), DOMAIN_WEIGHTS,
                                     args.steps, args.batch, args.coeff, args.z_coeff,
                                     torch.get_num_threads()))
    print("%6s %10s %10s %10s %6s  %-47s %8s" % ("step", "task", "aux", "z", "acc",
                                                  "load per expert (1.00 = even)", "max/mean"))
    start = time.time()
    for step in range(1, args.steps + 1):
        x, labels, _ = data.batch(args.batch)
        y, router_logits, indices = model(x)
        task = torch.nn.functional.cross_entropy(y, labels)
        aux = moebal_torch.switch_aux_loss(router_logits, K)   # the balance loss, coefficient 1
        z = moebal_torch.z_loss(router_logits)
        loss = task + args.coeff * aux + args.z_coeff * z
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.print_every == 0 or step == 1 or step == args.steps:
            load = load_per_expert(indices)
            acc = (y.argmax(-1) == labels).double().mean().item()
            print("%6d %10.4f %10.4f %10.4f %6.3f  %-47s %8.3f" % (
                step, task.item(), aux.item(), z.item(), acc,
                " ".join("%.2f" % v for v in load.tolist()), load.max().item()))
    elapsed = time.time() - start

    # Final evaluation on a fresh batch: load, accuracy and which experts each domain uses.
    with torch.no_grad():
        x, labels, domain = data.batch(8192)
        y, router_logits, indices = model(x)
        load = load_per_expert(indices)
        acc = (y.argmax(-1) == labels).double().mean().item()
        aux = moebal_torch.switch_aux_loss(router_logits, K).item()
    print("\nfinal (8192 fresh tokens): accuracy %.3f, aux loss %.4f (balanced: 1), "
          "max/mean load %.3f, trained in %.1f s" % (acc, aux, load.max().item(), elapsed))
    print("tokens per expert for each domain (top-%d):" % K)
    for d in range(len(DOMAIN_WEIGHTS)):
        rows = indices[domain == d].reshape(-1)
        counts = torch.bincount(rows, minlength=EXPERTS).tolist()
        print("  domain %d (%2d%%): %s" % (d, round(100 * DOMAIN_WEIGHTS[d]),
                                         " ".join("%5d" % c for c in counts)))
    if args.check:
        ok = load.max().item() < CHECK_MAX_LOAD and acc > CHECK_ACCURACY
        print("check %s: max/mean load %.3f (< %.2f required), accuracy %.3f (> %.2f required)"
              % ("passed" if ok else "FAILED", load.max().item(), CHECK_MAX_LOAD, acc,
                 CHECK_ACCURACY))
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

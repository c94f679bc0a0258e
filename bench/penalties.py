"""EWC penalty overhead: training-step time with no penalty, diag, rank-1, rank-5 and full after 4 tasks.

    python bench/penalties.py [--steps 30] [--rounds 5] [--batch 128] [--tasks 4] [--threads 1] [--full-rows 256]

A step is the training loop's step (small3 at 16 px, batch 128: DDPM loss + penalty, backward,
Adam). Penalties are the continual runner's: the EWC term of geomprobe.continual.strategies over
geomprobe.fisher.penalty.StackedPenalty (flat parameter view, anchors and Fisher rows stacked
across tasks). "full" is a GramFisher of ``--full-rows`` per-sample gradients per task. References
in the same run:

- diag, "per-parameter loop": the textbook EWC implementation, a Python loop over named
  parameters and tasks: sum_k sum_name (F_k[name] * (p - p*_k)^2).sum();
- rank-1 / rank-5, "Fisher objects": sum over tasks of the fisher package's own
  ``FisherMatrix.penalty(theta, theta*_k, lambda)`` on the concatenated parameters.

Variants are timed in interleaved rounds (the machine is shared); the table shows the median
seconds per step and the overhead relative to no penalty. The penalty term alone (forward +
backward of just the penalty) is also timed. Fisher values are random: the cost depends only on
the shapes. "% of a step" is the penalty term alone relative to the median step without a
penalty: the steadier of the two measures on a shared machine. No result is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from geomprobe.continual.strategies import PenaltyTerm, flat_parameters
from geomprobe.diffusion import per_sample_loss
from geomprobe.fisher import DiagonalFisher, GramFisher, LowRankFisher, Rank1Fisher
from geomprobe.fisher.penalty import StackedPenalty
from geomprobe.models import build_scheduler, build_unet, count_parameters
from geomprobe.probe import select_parameters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="steps per timing")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--tasks", type=int, default=4, help="earlier tasks in the penalty")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    ap.add_argument(
        "--full-rows", type=int, default=256, help="per-sample gradients per task of the full (Gram) Fisher"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    unet = build_unet("small3", 16, 1, 10)
    scheduler = build_scheduler()
    ac = scheduler.alphas_cumprod
    names = select_parameters(unet)
    theta0 = flat_parameters(unet, names).detach()
    P = theta0.numel()
    g = torch.Generator().manual_seed(1)
    anchors = [theta0 + 0.01 * torch.randn(P, generator=g) for _ in range(args.tasks)]
    fishers = {
        "diag": [DiagonalFisher(torch.rand(P, generator=g)) for _ in range(args.tasks)],
        "rank1": [Rank1Fisher(torch.randn(P, generator=g) * 1e-3, 2.0) for _ in range(args.tasks)],
        "rank5": [
            LowRankFisher(torch.rand(5, generator=g), torch.linalg.qr(torch.randn(P, 5, generator=g))[0])
            for _ in range(args.tasks)
        ],
        "full": [GramFisher(torch.randn(args.full_rows, P, generator=g) * 1e-3) for _ in range(args.tasks)],
    }
    ours = {
        kind: PenaltyTerm(names, StackedPenalty(15000.0, pairs=list(zip(fs, anchors)))) for kind, fs in fishers.items()
    }

    params = dict(unet.named_parameters())
    slices, start = {}, 0
    for n in names:
        slices[n] = slice(start, start + params[n].numel())
        start += params[n].numel()
    diag_named = [{n: f.diagonal[slices[n]].view_as(params[n]) for n in names} for f in fishers["diag"]]
    anchor_named = [{n: a[slices[n]].view_as(params[n]) for n in names} for a in anchors]

    def loop_diag(model, step):
        total = 0.0
        for F, A in zip(diag_named, anchor_named):
            for n, p in model.named_parameters():
                total = total + (F[n] * (p - A[n]).pow(2)).sum()
        return {"ewc": 0.5 * 15000.0 * total}

    def objects(kind):
        def term(model, step):
            theta = flat_parameters(model, names)
            return {"ewc": sum(f.penalty(theta, a, 15000.0) for f, a in zip(fishers[kind], anchors))}

        return term

    variants = {
        "none": None,
        "diag (ours)": ours["diag"],
        "diag (per-parameter loop)": loop_diag,
        "rank1 (ours)": ours["rank1"],
        "rank1 (Fisher objects)": objects("rank1"),
        "rank5 (ours)": ours["rank5"],
        "rank5 (Fisher objects)": objects("rank5"),
        "full (ours)": ours["full"],
    }
    opt = torch.optim.Adam(unet.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(args.batch, 1, 16, 16, generator=gen) * 2 - 1
    y = torch.randint(0, 10, (args.batch,), generator=gen)

    def run(term, steps):
        start = time.perf_counter()
        for _ in range(steps):
            t = torch.randint(0, 1000, (args.batch,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            terms = {"denoise": per_sample_loss(unet, x0, noise, t, y, ac).mean()}
            if term is not None:
                terms.update(term(unet, 0))
            loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - start) / steps

    def penalty_only(term, reps=200):
        start = time.perf_counter()
        for _ in range(reps):
            v = term(unet, 0)["ewc"]
            v.backward()
        unet.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) / reps

    for term in variants.values():
        run(term, 3)  # warm-up
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, term in variants.items():
            times[k].append(run(term, args.steps))
    alone = {k: penalty_only(term) for k, term in variants.items() if term is not None}

    base = statistics.median(times["none"])
    load = os.getloadavg()[0]
    print(
        f"small3 16px, P={count_parameters(unet):,}, batch {args.batch}, {args.tasks} earlier tasks, "
        f"{args.threads} thread(s), median of {args.rounds} rounds x {args.steps} steps, load {load:.2f}"
    )
    print(f"{'variant':28s} {'s/step':>9s} {'overhead':>9s} {'penalty fwd+bwd':>16s} {'% of a step':>12s}")
    for k in variants:
        med = statistics.median(times[k])
        extra = f"{alone[k] * 1e3:13.3f} ms {100 * alone[k] / base:11.1f}%" if k in alone else f"{'-':>16s} {'-':>12s}"
        print(f"{k:28s} {med:9.4f} {100 * (med / base - 1):+8.1f}% {extra}")


if __name__ == "__main__":
    main()

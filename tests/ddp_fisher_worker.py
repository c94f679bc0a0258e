"""Run by tests/test_ddp.py: the task Fisher of every kind of a tiny UNet, under torchrun or alone.

[torchrun --nproc-per-node K] tests/ddp_fisher_worker.py OUT.pt
"""

import sys

import torch

from geomprobe.continual.estimate import estimate_task_fisher
from geomprobe.data import load_dataset
from geomprobe.distributed import close_dist, dist_info, init_dist
from geomprobe.models import build_scheduler, build_unet
from geomprobe.probe.grads import select_parameters
from geomprobe.timesteps import parse_timesteps


def main(out: str) -> None:
    rank, world = dist_info()
    init_dist(world, torch.device("cpu"))
    torch.manual_seed(0)
    unet = build_unet("small1", 8, 1, 10)  # the tiny_unet of conftest.py
    data = load_dataset("digits", "train", 8).subset([0, 1])
    ac, names, spec = build_scheduler().alphas_cumprod, select_parameters(unet), parse_timesteps("all")
    result = {}
    for kind, method in (("diag", ""), ("rank1", ""), ("rankk", "power"), ("rankk", "lanczos"), ("full", "")):
        fisher = estimate_task_fisher(
            kind,
            unet,
            names,
            data,
            ac,
            spec,
            20,
            torch.Generator().manual_seed(5),
            rank=2,
            method=method or "power",
            batch_size=8,
        )
        kind = f"{kind}-{method}" if method else kind
        # every kind as its action on a fixed probe matrix (P, 3), plus its own numbers
        probe = torch.randn(fisher.P, 3, generator=torch.Generator().manual_seed(1))
        result[kind] = {"n": fisher.info.n, "mv": fisher.mv(probe)}
        if kind == "diag":
            result[kind]["d"] = fisher.diagonal
        if kind == "rank1":
            result[kind].update(mu=fisher.mu, c=fisher.c_star)
    if rank == 0:
        torch.save(result, out)
    close_dist()


if __name__ == "__main__":
    main(sys.argv[1])

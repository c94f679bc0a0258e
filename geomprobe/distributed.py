"""torch.distributed under torchrun: the process group, rank slices of a batch, and rank agreement.

Every multi-process command (``grads``, ``spectrum --ckpt``, ``train``, ``continual``) runs under
PyTorch's own launcher, ``torchrun --nproc-per-node K -m geomprobe ...``; geomprobe has no launcher
of its own. The process group is gloo on CPU and NCCL (CUDA tensors) + gloo (CPU tensors) on CUDA. A plain process is rank 0 of a world of 1, and
every helper here is then a no-op, so the single-process path runs exactly as without torchrun.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from geomprobe.errors import DataError


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


PROCESS_GROUP_TIMEOUT_MINUTES = 60  # rank 0 may train the FID classifier while the others wait


def init_dist(world: int, device: torch.device) -> bool:
    """Initialise the process group under torchrun; True if we did.

    On CPU the backend is gloo. On CUDA it is ``cpu:gloo,cuda:nccl`` (NCCL for CUDA tensors, gloo
    for the CPU tensors that torchmetrics and the small agreement reductions use), and this rank's
    GPU ``cuda:LOCAL_RANK`` is made current before any collective.
    """
    if world <= 1:
        return False
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(minutes=PROCESS_GROUP_TIMEOUT_MINUTES)
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return True


def close_dist() -> None:
    """Destroy the process group if one exists (its gloo threads abort the process when left at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device, world: int) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for CUDA under torchrun (made current), else ``device``."""
    if world <= 1 or device.type != "cuda":
        return device
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(local)
    return local


def barrier(world: int) -> None:
    """Wait for every rank (nothing in a world of 1)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _reduce_device() -> torch.device:
    """Where small all-reduced tensors live: NCCL reduces CUDA tensors only, gloo CPU ones."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_ok(world: int, ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank (so one rank's error stops all without a hang)."""
    if world <= 1:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([0 if ok else 1], device=_reduce_device())
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def any_rank(world: int, flag: bool) -> bool:
    """True on every rank iff ``flag`` on some rank (e.g. a Ctrl-C that reached one rank first)."""
    return not all_ok(world, not flag)


def on_every_rank(world: int, step: Callable[[], Any], other_failed: str) -> Any:
    """``step()`` on this rank; if it fails here or on another rank, raise on every rank.

    So one rank's error stops all without a hang: each rank raises its own error, or a
    :class:`DataError` ``other_failed``.
    """
    error: Exception | None = None
    value = None
    try:
        value = step()
    except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
        error = exc
    if not all_ok(world, error is None):
        raise error if error is not None else DataError(other_failed)
    return value


def group_world() -> int:
    """The world size of the initialised torch.distributed process group; 1 without one."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the ranks of the process group, in float64, on the CPU (``x`` itself without one)."""
    if group_world() <= 1:
        return x.double().cpu()
    import torch.distributed as dist

    total = x.detach().to(_reduce_device(), torch.float64)
    dist.all_reduce(total)
    return total.cpu()


def mean_over_ranks(world: int, values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (in float64; ``values`` itself in a world of 1)."""
    if world <= 1:
        return values
    flat = sum_over_ranks(torch.tensor(list(values.values()), dtype=torch.float64))
    return dict(zip(values, (flat / world).tolist(), strict=True))


def rank_slice(batch: tuple[torch.Tensor, ...], rank: int, world: int) -> tuple[torch.Tensor, ...]:
    """This rank's rows ``[rank::world]`` of a global batch (the batch itself in a world of 1).

    Every rank draws the same global batch from the same seeded generator and keeps its slice, so
    the data order (and the generator state a checkpoint saves) does not depend on the world size.
    """
    if world <= 1:
        return batch
    return tuple(v[rank::world] for v in batch)


def group_rank() -> int:
    """This process's rank in the initialised process group; 0 without one."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def my_rows(n: int) -> range:
    """This rank's contiguous share of ``n`` rows (``torch.tensor_split`` sizes; all of them without a group)."""
    world, rank = group_world(), group_rank()
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def gather_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """The (n, ...) concatenation over ranks of each rank's rows :func:`my_rows` ``(n)`` of a tensor, on every rank.

    ``x`` is this rank's share, (len(my_rows(n)), ...) on the CPU; without a process group it is returned.
    """
    world = group_world()
    if world <= 1:
        return x
    import torch.distributed as dist

    longest = -(-n // world)
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=_reduce_device())
    padded[: len(x)] = x.to(padded.device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    sizes = [n // world + (r < n % world) for r in range(world)]
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).cpu()

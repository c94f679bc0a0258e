"""Where a direction lives: shares of ||mu||^2, ||v1||^2 and tr F per parameter tensor and UNet block.

For a (P,) vector x laid out as the store's parameters (names, slices), the share of tensor j is
sum_{p in j} x_p^2 / sum_p x_p^2 (for tr F: sum_{p in j} diag F_p / tr F). A *block* is the UNet
module prefix (``time_embedding``, ``class_embedding``, ``conv_in``, ``down_blocks.0`` ...,
``mid_block``, ``up_blocks.k``, ``conv_norm_out``, ``conv_out``); blocks partition the parameters,
so their shares sum to 1. ``norm_layers`` is the share of every tensor whose name contains
``norm`` (it overlaps the blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from geomprobe.errors import DataError

NESTED_BLOCKS = ("down_blocks", "up_blocks")


def block_of(name: str) -> str:
    """The UNet block of a parameter name: ``down_blocks.1.resnets.0.conv1.weight`` -> ``down_blocks.1``."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in NESTED_BLOCKS and len(parts) > 2 else parts[0]


def tensor_sums(values: np.ndarray, slices: Sequence[tuple[int, int]]) -> np.ndarray:
    """Per-tensor sums of a (P,) nonnegative vector (e.g. mu^2 or diag F): (num_tensors,)."""
    return np.array([float(values[a:b].sum()) for a, b in slices], dtype=np.float64)


def group_shares(per_tensor: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Shares of per-tensor masses: {"tensors": [...], "blocks": {block: share}, "norm_layers": share}.

    Args:
        per_tensor: (num_tensors,) nonnegative masses (sums of x_p^2 over each tensor).
        names: the tensors' parameter names, in the same order.

    Returns:
        Shares of the total (all nan when the total is 0); blocks in order of first appearance.
    """
    total = float(per_tensor.sum())
    share = per_tensor / total if total > 0 else np.full(per_tensor.shape, np.nan)
    blocks: dict[str, float] = {}
    for name, s in zip(names, share, strict=True):
        blocks[block_of(name)] = blocks.get(block_of(name), 0.0) + float(s)
    norm = float(sum(s for name, s in zip(names, share, strict=True) if "norm" in name))
    return {"tensors": [float(s) for s in share], "blocks": blocks, "norm_layers": norm}


def direction_shares(
    names: Sequence[str],
    slices: Sequence[tuple[int, int]],
    mu: np.ndarray,
    diag_fisher: np.ndarray,
    v1: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """Shares of ||mu||^2, tr F (= sum diag F) and, when given, ||v1||^2 per tensor and block.

    Args:
        names: parameter names of the layout.
        slices: their (start, stop) in the (P,) vectors.
        mu: (P,) mean gradient.
        diag_fisher: (P,) diag F.
        v1: (P,) top eigenvector of F, or None.

    Returns:
        {"mu": group_shares, "trace": group_shares, "v1": group_shares (if v1 is given)}.
    """
    out = {
        "mu": group_shares(tensor_sums(mu * mu, slices), names),
        "trace": group_shares(tensor_sums(diag_fisher, slices), names),
    }
    if v1 is not None:
        out["v1"] = group_shares(tensor_sums(v1 * v1, slices), names)
    return out


def fisher_file_shares(path: str | Path) -> dict[str, Any]:
    """Block shares of ||mu||^2 of a rank-1 EWC Fisher file (what rank-1 EWC holds still).

    Returns:
        {"path", "t_range", "names", "mu": group_shares}.

    Raises:
        DataError: the file is not a rank-1 Fisher or has no parameter layout.
    """
    from geomprobe.fisher import load_fisher

    fisher = load_fisher(path)
    if fisher.kind != "rank1":
        raise DataError(f"{path} holds a {fisher.kind!r} Fisher; block shares of mu need a rank1 file")
    info = fisher.info
    names, shapes = list(info.param_names or []), list(info.param_shapes or [])
    if not names:
        raise DataError(f"{path} has no parameter layout (param_names); cannot split mu by block")
    sizes = [int(np.prod(s)) for s in shapes]
    bounds = np.cumsum([0] + sizes)
    slices = list(zip(bounds[:-1], bounds[1:], strict=True))
    mu = fisher.mu.double().numpy()
    if bounds[-1] != mu.shape[0]:
        raise DataError(f"{path}: the parameter layout covers {bounds[-1]} values but mu has {mu.shape[0]}")
    return {
        "path": str(path),
        "t_range": info.t_range,
        "names": names,
        "mu": group_shares(tensor_sums(mu * mu, slices), names),
    }

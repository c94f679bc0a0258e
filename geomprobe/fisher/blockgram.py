"""The exact Gram statistics of a model's per-sample gradients without storing G (docs/design.md §11).

K = G G^T / n = sum_b G_b G_b^T / n over column blocks b of the flat parameter vector: for each
block, the per-sample gradients of just that block's parameters are computed for all n probe
rows (chunk by chunk, :func:`geomprobe.probe.per_sample_grads`), held as an (n, P_b) float32
matrix, and their Gram matrix is added to K in float64. The column sums and sums of squares
(-> mu, diag F) come from the same matrices. The result is a :class:`GramStatistics`, so every
spectrum number (:func:`geomprobe.fisher.spectrum.fisher_spectrum`) follows exactly as from a
stored G.

Under ``torchrun`` each rank adds a disjoint share of the blocks and :func:`all_reduce_statistics`
sums them, so K ranks make about 1/K of the passes each.

Memory: the (n, P_b) float32 block, K (n x n float64) and three (P,) float64 vectors fit in
``max_memory``. Passes over the data (one forward + backward of the n rows each) = number of
blocks = ceil(P / P_b) with

    P_b = (max_memory - 8 n^2 - 24 P) / (4 n)       (about max_memory / (4 n) values)

Blocks hold whole parameter tensors when that takes no extra pass; each chunk of per-sample
gradients of a CPU model is then written straight into the block's rows (a CUDA model's chunk is
computed on the device and copied). Otherwise tensors are cut into column
ranges (a cut tensor's per-sample gradient is computed once per range and its chunk, sized by the
same budget, comes on top of the block).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from geomprobe.errors import UsageError
from geomprobe.fisher.rows import GramStatistics, add_column_statistics, gram_product
from geomprobe.io import DEFAULT_MAX_MEMORY


@dataclass(frozen=True)
class ParameterBlock:
    """Columns of the flat parameter vector: ``pieces`` = [(name, start, stop)] flat ranges within each tensor.

    ``columns`` = (first, last + 1) in the layout of all selected parameters.
    """

    pieces: tuple[tuple[str, int, int], ...]
    columns: tuple[int, int]

    @property
    def size(self) -> int:
        """P_b, the number of columns."""
        return self.columns[1] - self.columns[0]

    @property
    def names(self) -> list[str]:
        """The parameters whose gradients the block needs (each once, in layout order)."""
        return list(dict.fromkeys(name for name, _, _ in self.pieces))


def block_columns(n: int, P: int, max_memory: int) -> int:
    """P_b: the widest block whose (n, P_b) float32 rows, K and (P,) vectors fit in ``max_memory``.

    Raises:
        UsageError: not even one column fits (names the budget needed).
    """
    reserved = 8 * n * n + 24 * P
    per_column = 4 * n + 1
    width = (int(max_memory) - reserved) // per_column
    if width < 1:
        need = (reserved + 64 * per_column) / 2**20
        raise UsageError(
            f"--max-memory {max_memory / 2**20:.0f} MiB is too small for n={n} rows: the n x n Gram "
            f"matrix alone needs {8 * n * n / 2**20:.0f} MiB; give at least {need:.0f} MiB"
        )
    return int(width)


def parameter_blocks(names: Sequence[str], sizes: Sequence[int], width: int) -> list[ParameterBlock]:
    """Cut the flat layout of ``names`` (tensor sizes ``sizes``) into consecutive blocks of <= ``width`` columns.

    Whole tensors per block when that takes no more blocks than cutting tensors would (then a block's
    per-sample gradients are written straight into its rows, :func:`block_rows`); otherwise blocks of
    exactly ``width`` columns that cut tensors into column ranges.
    """
    whole = _whole_tensor_blocks(names, sizes, width)
    if whole is not None and len(whole) <= -(-int(sum(sizes)) // width):
        return whole
    return _column_blocks(names, sizes, width)


def _whole_tensor_blocks(names: Sequence[str], sizes: Sequence[int], width: int) -> list[ParameterBlock] | None:
    """Greedy blocks of whole tensors (the fewest such blocks), or None if one tensor exceeds ``width``."""
    blocks: list[ParameterBlock] = []
    pieces: list[tuple[str, int, int]] = []
    first = column = 0
    for name, size in zip(names, sizes, strict=True):
        if size > width:
            return None
        if column + size - first > width:
            blocks.append(ParameterBlock(tuple(pieces), (first, column)))
            pieces, first = [], column
        pieces.append((name, 0, size))
        column += size
    if pieces:
        blocks.append(ParameterBlock(tuple(pieces), (first, column)))
    return blocks


def _column_blocks(names: Sequence[str], sizes: Sequence[int], width: int) -> list[ParameterBlock]:
    """Blocks of exactly ``width`` columns (the last may be shorter), cutting tensors where needed."""
    blocks: list[ParameterBlock] = []
    pieces: list[tuple[str, int, int]] = []
    first = column = filled = 0
    for name, size in zip(names, sizes, strict=True):
        start = 0
        while start < size:
            take = min(size - start, width - filled)
            pieces.append((name, start, start + take))
            start, filled, column = start + take, filled + take, column + take
            if filled == width:
                blocks.append(ParameterBlock(tuple(pieces), (first, column)))
                pieces, first, filled = [], column, 0
    if pieces:
        blocks.append(ParameterBlock(tuple(pieces), (first, column)))
    return blocks


GradientChunks = Callable[[list[str], "torch.Tensor | None"], Iterator[tuple[int, torch.Tensor]]]
"""``gradients(names, out)`` yields (first row, (b, sum of the tensors' sizes) float32 per-sample gradients).

``out`` is None or the (n, sum of sizes) float32 destination of all rows: a callback may write the
rows into ``out[first:first + b]`` and yield that view (nothing is then copied), or ignore it.
"""


def block_rows(
    block: ParameterBlock, gradients: GradientChunks, layout_sizes: dict[str, int], out: torch.Tensor
) -> torch.Tensor:
    """Fill ``out`` (n, P_b) float32 with G_b, the block's columns of each chunk of per-sample gradients.

    A block of whole tensors is handed to ``gradients`` as the destination; otherwise (a tensor cut
    into column ranges) each chunk's columns are copied out. Only the block and one chunk are held.

    Raises:
        UsageError: the chunks do not cover the n rows.
    """
    n = out.shape[0]
    whole = all(a == 0 and b == layout_sizes[name] for name, a, b in block.pieces)
    offsets, start = {}, 0
    for name in block.names:
        offsets[name] = start
        start += layout_sizes[name]
    filled = 0
    for first, rows in gradients(block.names, out if whole else None):
        filled += rows.shape[0]
        if rows.shape[0] == 0 or (whole and rows.data_ptr() == out[first].data_ptr()):
            continue  # nothing, or written in place
        column = 0
        for name, a, b in block.pieces:
            out[first : first + rows.shape[0], column : column + b - a] = rows[:, offsets[name] + a : offsets[name] + b]
            column += b - a
    if filled != n:
        raise UsageError(f"the per-sample gradients cover {filled} rows, expected {n}")
    return out


def accumulate_block(
    G_b: torch.Tensor, K: np.ndarray, column_sum: np.ndarray, column_sumsq: np.ndarray, columns: tuple[int, int]
) -> None:
    """K += G_b G_b^T and the block's column sums and sums of squares.

    The product is :func:`~geomprobe.fisher.rows.gram_product` (float32 slabs, float64 sums); the
    column statistics are :func:`~geomprobe.fisher.rows.add_column_statistics` (float64, exact squares).
    """
    a, b = columns
    K += gram_product(G_b, G_b)
    add_column_statistics(G_b, torch.from_numpy(column_sum)[a:b], torch.from_numpy(column_sumsq)[a:b])


def block_gram_statistics(
    gradients: GradientChunks,
    names: Sequence[str],
    sizes: Sequence[int],
    n: int,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: Callable[[int, int], None] | None = None,
    blocks: Sequence[ParameterBlock] | None = None,
) -> GramStatistics:
    """K = G G^T / n, G^T 1 and column sums of G^2 of n rows, accumulated over parameter blocks.

    Args:
        gradients: ``gradients(block_names)`` yields (first row, (b, sum of their sizes) float32
            per-sample gradients of the parameters ``block_names``, in that order), covering rows 0..n-1.
        names: the selected parameters in layout order.
        sizes: the number of values of each parameter in ``names`` (same length and order).
        n: rows.
        max_memory: bytes (see the module docstring for what must fit).
        progress: called as ``progress(blocks done, blocks)``.
        blocks: the blocks to add (default: all, :func:`parameter_blocks`); a subset gives the
            partial sums one torchrun rank contributes.

    Returns:
        GramStatistics (float64); the column vectors are zero outside the given blocks.
    """
    P = int(sum(sizes))
    if blocks is None:
        blocks = parameter_blocks(names, sizes, block_columns(n, P, max_memory))
    K = np.zeros((n, n))
    # zero-filled now (torch.zeros touches its pages): numpy's lazily mapped np.zeros would take its
    # page faults one small slab at a time in add_column_statistics, 0.5 s per vector at P = 35.7M
    column_sum, column_sumsq = (torch.zeros(P, dtype=torch.float64).numpy() for _ in range(2))
    layout_sizes = dict(zip(names, sizes, strict=True))
    buffer = torch.empty(n * max((b.size for b in blocks), default=0), dtype=torch.float32)  # reused: no page faults
    for done, block in enumerate(blocks, 1):
        G_b = block_rows(block, gradients, layout_sizes, buffer[: n * block.size].view(n, block.size))
        accumulate_block(G_b, K, column_sum, column_sumsq, block.columns)
        if progress is not None:
            progress(done, len(blocks))
    K /= max(n, 1)
    return GramStatistics(K=K, column_sum=column_sum, column_sumsq=column_sumsq, n=n, P=P)


def model_gradients(
    unet: torch.nn.Module, batches: Sequence, alphas_cumprod: torch.Tensor, max_memory: int = DEFAULT_MAX_MEMORY
) -> GradientChunks:
    """The ``gradients`` callback of :func:`block_gram_statistics` for a UNet on probe batches (rows in order).

    Rows per per-sample-gradient call: :func:`~geomprobe.probe.memory.chunk_size_for` of the block's
    parameters within ``max_memory``, from the model's activation size measured once.
    """
    from geomprobe.probe import per_sample_grads
    from geomprobe.probe.memory import activation_bytes_per_sample, chunk_size_for
    from geomprobe.probe.params import device_of

    device = device_of(unet)
    params = dict(unet.named_parameters())
    sample_shape = tuple(batches[0].x0.shape[1:]) if batches else ()
    activations = activation_bytes_per_sample(unet, sample_shape) if batches else 0

    def chunks(names: list[str], out: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        P = sum(params[n].numel() for n in names)
        rows_per_call = chunk_size_for(unet, P, sample_shape, max_memory, activation_bytes=activations)
        first = 0
        for b in batches:
            dest = out[first : first + len(b)] if out is not None and out.device == device else None
            rows = per_sample_grads(
                unet, names, b.x0, b.noise, b.t, b.y, alphas_cumprod, b.target, chunk_size=rows_per_call, out=dest
            )
            yield first, rows.cpu()
            first += len(b)

    return chunks


def all_reduce_statistics(stats: GramStatistics) -> GramStatistics:
    """Sum the partial statistics of all torchrun ranks (each added its own blocks); a no-op in one process.

    K, the column sums and the column sums of squares are additive over disjoint column blocks,
    so the sum is the statistics of all blocks (float64; the order of the additions differs from
    one process by the all-reduce only, ~1e-16 relative).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    parts = [torch.from_numpy(stats.K), torch.from_numpy(stats.column_sum), torch.from_numpy(stats.column_sumsq)]
    for part in parts:
        dist.all_reduce(part)
    return GramStatistics(
        K=parts[0].numpy(), column_sum=parts[1].numpy(), column_sumsq=parts[2].numpy(), n=stats.n, P=stats.P
    )

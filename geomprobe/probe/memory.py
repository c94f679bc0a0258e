"""How many samples one per-sample-gradient call may hold within a memory budget (bytes).

The budget is an int in bytes, default :data:`geomprobe.io.DEFAULT_MAX_MEMORY` (fixed, so chunk
sizes, hence stored bytes, do not depend on the machine's free RAM); text such as ``"2G"`` is
parsed once at the entry point with :func:`geomprobe.io.parse_memory`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from geomprobe.diffusion import conditioning
from geomprobe.io import DEFAULT_MAX_MEMORY
from geomprobe.probe.params import device_of

# Peak memory of vmap(grad) per sample relative to (activations + one gradient row). Measured on
# small3/base at 16 and 32 px on CPU: the vmap backward keeps roughly 3 copies of the activations
# plus the per-sample weight-gradient buffers.
_ACTIVATION_FACTOR = 3.0
_GRAD_FACTOR = 2.0


def activation_bytes_per_sample(unet: torch.nn.Module, sample_shape: Sequence[int]) -> int:
    """Bytes of module outputs for one sample of shape (C, H, W).

    Measured by one batch-1 forward with hooks; callers that loop over batches compute it once, as
    :func:`geomprobe.probe.extract_gradients` does.
    """
    total = 0

    def hook(_mod, _inp, out):
        nonlocal total
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for o in outs:
            if isinstance(o, torch.Tensor):
                total += o.numel() * o.element_size()

    device = device_of(unet)
    handles = [m.register_forward_hook(hook) for m in unet.modules() if len(list(m.children())) == 0]
    try:
        with torch.no_grad():
            x = torch.zeros(1, *sample_shape, device=device)
            t = torch.zeros(1, dtype=torch.long, device=device)
            unet(x, t, **conditioning(unet, torch.zeros(1, dtype=torch.long, device=device)))
    finally:
        for h in handles:
            h.remove()
    return total


def chunk_size_for(
    unet: torch.nn.Module,
    P: int,
    sample_shape: Sequence[int],
    max_memory: int | None = DEFAULT_MAX_MEMORY,
    cap: int = 256,
    activation_bytes: int | None = None,
) -> int:
    """How many samples one ``vmap(grad)`` call may hold within ``max_memory`` bytes (>= 1).

    Estimate per sample: ``3 x activations + 2 x P x 4 bytes`` (see the module constants).
    ``max_memory=None`` means :data:`~geomprobe.io.DEFAULT_MAX_MEMORY`. ``activation_bytes``: the
    model's :func:`activation_bytes_per_sample` when the caller knows it (else one batch-1 forward
    measures it).
    """
    budget = DEFAULT_MAX_MEMORY if max_memory is None else int(max_memory)
    if activation_bytes is None:
        activation_bytes = activation_bytes_per_sample(unet, sample_shape)
    per = _ACTIVATION_FACTOR * activation_bytes + _GRAD_FACTOR * 4 * P
    return int(max(1, min(cap, budget // max(1, int(per)))))


def reproducible_chunk(
    unet: torch.nn.Module, P: int, sample_shape: Sequence[int], max_memory: int = DEFAULT_MAX_MEMORY
) -> tuple[int, str | None]:
    """Rows per per-sample-gradient call, chosen so that the stored rows do not depend on the budget.

    Kernels (oneDNN convolutions) may round differently at different batch sizes, so the rows of a
    store would change at float rounding with the chunk size. The chunk is therefore the one the
    *default* budget allows (a function of the model alone, the same on every machine); a smaller
    ``max_memory`` shrinks it and returns a one-line note saying that the rows then differ from a
    default-budget run at float rounding (about 1e-7 relative).

    Returns:
        (rows per call, note or None).
    """
    chunk = chunk_size_for(unet, P, sample_shape, DEFAULT_MAX_MEMORY)
    allowed = chunk_size_for(unet, P, sample_shape, max_memory)
    if allowed >= chunk:
        return chunk, None
    return allowed, (
        f"--max-memory {int(max_memory) / 2**20:.0f} MiB computes {allowed} rows per call instead of "
        f"{chunk}: the rows differ from a default-budget run at float rounding (~1e-7 relative)"
    )

"""Two CPU kernel limits that attention UNets hit in reverse- and forward-mode products, worked around.

1. **Group norm on channels-last input.** diffusers' attention processors return
   ``hidden_states.transpose(-1, -2).reshape(B, C, H, W)``, a view with channels-last strides, and
   every later ResNet group norm sees such an input. On CPU (torch 2.13) the group-norm backward
   kernel for channels-last input writes through the undefined input gradient when only the weight
   and bias gradients are asked for, and crashes the process (SIGSEGV, exit 139) — reached by any
   gradient over a *subset* of parameters (e.g. ``mean_gradient`` over ``mid_block``). Minimal
   reproducer, no diffusers::

       x = torch.randn(2, 64, 4, 4).contiguous(memory_format=torch.channels_last)
       w = torch.ones(64, requires_grad=True); b = torch.zeros(64, requires_grad=True)
       torch.autograd.grad(torch.nn.functional.group_norm(x, 32, w, b).pow(2).sum(), [w, b])  # SIGSEGV

   The same strides break group norm's forward-mode derivative (a ``.view`` of its input:
   "view size is not compatible with input tensor's size and stride"). Fix: a forward pre-hook
   that makes every group norm's input contiguous (a copy of the few channels-last activations;
   no effect on any value).
2. **Flash attention has no forward-mode or double-backward derivative on CPU.** Forward-mode AD
   through ``scaled_dot_product_attention``'s CPU flash kernel raises NotImplementedError. Fix: the
   math backend (``sdpa_kernel(SDPBackend.MATH)``) for forward-mode products; it is exact (float64
   agreement 1e-14 with an explicit per-sample loop, tests/test_attention_products.py).

:func:`autodiff_safe` applies both for the duration of one product.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


@contextmanager
def autodiff_safe(unet: torch.nn.Module, forward_mode: bool = False) -> Iterator[None]:
    """Group-norm inputs made contiguous (always) and, for forward-mode AD, the math attention backend.

    Args:
        unet: the model whose forward runs inside the block.
        forward_mode: also select ``SDPBackend.MATH`` for scaled-dot-product attention.
    """
    handles = [
        m.register_forward_pre_hook(_contiguous_input) for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)
    ]
    try:
        if forward_mode:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = sdpa_kernel(SDPBackend.MATH)
        else:
            backend = nullcontext()
        with backend:
            yield
    finally:
        for h in handles:
            h.remove()

"""Per-sample gradients of the per-sample DDPM loss, with ``torch.func`` (paper section 3.2).

The loss of sample i is ``l_i(theta) = 1/2 ||target_i - eps_theta(x_t_i, t_i, y_i)||^2`` summed over
pixels (:func:`geomprobe.diffusion.per_sample_loss`), with ``x_t_i = sqrt(abar) x0_i +
sqrt(1 - abar) noise_i`` and ``target_i = noise_i`` (empirical Fisher) or a user-given target
(the "true Fisher" probe: ``eps_theta(x_t).detach() + xi``, see :func:`true_fisher_target`).

Shapes used throughout (B samples, P selected parameters):

- ``x0``, ``noise``, ``target``: (B, C, H, W) float32
- ``t``: (B,) int64 scheduler indices in 0..N-1 (every row may have its own t)
- ``y``: (B,) int64 class labels
- ``alphas_cumprod``: (N,) float tensor (``scheduler.alphas_cumprod``)
- a gradient row: (P,) float32, the selected parameters flattened and concatenated in the order
  of ``names`` (see :func:`param_layout` for the slices).

Only the parameters named in ``names`` are differentiated; every other parameter and every buffer
enters :func:`torch.func.functional_call` as a constant.

Two engines compute the same rows (:func:`per_sample_grads`, ``engine=``): ``vmap`` is
``torch.func.vmap(grad_and_value(loss))`` over ``functional_call`` and works for any model;
``layerwise`` (the default where it applies: every selected parameter in a Conv2d, Linear, GroupNorm
or Embedding, as in all presets) runs one batched forward and one backward to the module outputs and
forms the per-sample weight gradients in closed form. On 2 CPU cores it is 1.1-1.3x a batched
forward+backward against 1.5-2.2x for vmap (bench/README.md; measured under the ``geomprobe``
command's allocator setting, :mod:`geomprobe.allocator`, with the (B, P) result buffer reused).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch.func import functional_call, grad_and_value, jvp, vmap

from geomprobe.diffusion import add_noise
from geomprobe.errors import UsageError

# Peak memory of vmap(grad) per sample relative to (activations + one gradient row). Measured on
# small3/base at 16 and 32 px on CPU: the vmap backward keeps roughly 3 copies of the activations
# plus the per-sample weight-gradient buffers.
_ACTIVATION_FACTOR = 3.0
_GRAD_FACTOR = 2.0


# --------------------------------------------------------------------------- parameters


def select_parameters(unet: torch.nn.Module, regex: str | None = None) -> list[str]:
    """Names of the parameters whose name matches ``regex`` (``re.search``), in model order.

    ``None`` or an empty string selects every parameter that requires grad. A malformed regex or
    one that selects nothing is a :class:`UsageError`.
    """
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    if not regex:
        return names
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise UsageError(f"malformed --params regex {regex!r}: {exc}") from None
    chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        sample = ", ".join(names[:4])
        raise UsageError(f"--params {regex!r} selects no parameter (names look like: {sample}, ...)")
    return chosen


@dataclass(frozen=True)
class ParamLayout:
    """How a flat gradient row maps back to named tensors.

    ``names[k]`` occupies ``row[slices[k][0]:slices[k][1]]`` reshaped to ``shapes[k]``; ``P`` is the
    row length.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    slices: tuple[tuple[int, int], ...]

    @property
    def P(self) -> int:
        return self.slices[-1][1] if self.slices else 0

    def view(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a row (P,) into ``{name: tensor of the parameter's shape}`` (views, no copy)."""
        if row.shape[-1] != self.P:
            raise UsageError(f"row has {row.shape[-1]} entries, the parameter layout has P={self.P}")
        return {n: row[a:b].view(s) for n, s, (a, b) in zip(self.names, self.shapes, self.slices)}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`view`: concatenate ``tensors[name]`` in layout order to (P,) float32."""
        return torch.cat([tensors[n].reshape(-1).float() for n in self.names])


def param_layout(unet: torch.nn.Module, names: Sequence[str]) -> ParamLayout:
    """The :class:`ParamLayout` of ``names`` in ``unet`` (rows concatenate them in this order)."""
    params = dict(unet.named_parameters())
    shapes, slices, start = [], [], 0
    for n in names:
        if n not in params:
            raise UsageError(f"model has no parameter named {n!r}")
        shape = tuple(params[n].shape)
        size = math.prod(shape)
        shapes.append(shape)
        slices.append((start, start + size))
        start += size
    return ParamLayout(tuple(names), tuple(shapes), tuple(slices))


def _split_state(unet: torch.nn.Module, names: Sequence[str]):
    """(selected params {name: detached tensor}, constants {name: tensor} incl. buffers)."""
    chosen = set(names)
    params = dict(unet.named_parameters())
    selected = {n: params[n].detach() for n in names}
    constants = {n: p.detach() for n, p in params.items() if n not in chosen}
    constants.update({n: b for n, b in unet.named_buffers()})
    return selected, constants


def _flat(grads: dict[str, torch.Tensor], names: Sequence[str], batched: bool) -> torch.Tensor:
    if batched:
        b = next(iter(grads.values())).shape[0]
        return torch.cat([grads[n].reshape(b, -1) for n in names], dim=1)
    return torch.cat([grads[n].reshape(-1) for n in names])


# --------------------------------------------------------------------------- memory budget


def parse_memory(text: str | int | None) -> int:
    """Bytes from ``'2G'``, ``'512M'``, ``'1.5GB'``, ``'100000'`` or an int; ``None``: the default.

    The default is a quarter of the machine's available RAM (at least 256 MiB).
    """
    if text is None or text == "" or text == "auto":
        return default_memory_budget()
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
        if not m:
            raise UsageError(f"malformed memory size {text!r}; use e.g. 512M, 2G or a number of bytes")
        scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
        value = int(float(m.group(1)) * scale)
    if value < 2**20:
        raise UsageError(f"memory budget {text!r} is below 1 MiB")
    return value


def default_memory_budget() -> int:
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 4 * 2**30
    return max(256 * 2**20, int(avail) // 4)


def activation_bytes_per_sample(unet: torch.nn.Module, sample_shape: Sequence[int]) -> int:
    """Bytes of module outputs for one sample of shape (C, H, W) (one batch-1 forward with hooks;
    callers that loop over batches compute it once, as :func:`geomprobe.probe.extract_gradients` does)."""
    total = 0

    def hook(_mod, _inp, out):
        nonlocal total
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for o in outs:
            if isinstance(o, torch.Tensor):
                total += o.numel() * o.element_size()

    device = next(unet.parameters()).device
    handles = [m.register_forward_hook(hook) for m in unet.modules() if len(list(m.children())) == 0]
    try:
        with torch.no_grad():
            x = torch.zeros(1, *sample_shape, device=device)
            t = torch.zeros(1, dtype=torch.long, device=device)
            kwargs = {}
            if getattr(unet.config, "num_class_embeds", None):
                kwargs["class_labels"] = torch.zeros(1, dtype=torch.long, device=device)
            unet(x, t, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return total


def chunk_size_for(
    unet: torch.nn.Module, P: int, sample_shape: Sequence[int], max_memory: int | None = None, cap: int = 256
) -> int:
    """How many samples one ``vmap(grad)`` call may hold within ``max_memory`` bytes (>= 1).

    Estimate per sample: ``3 x activations + 2 x P x 4 bytes`` (see the module constants).
    """
    budget = parse_memory(max_memory) if not isinstance(max_memory, int) else max_memory
    per = _ACTIVATION_FACTOR * activation_bytes_per_sample(unet, sample_shape) + _GRAD_FACTOR * 4 * P
    return int(max(1, min(cap, budget // max(1, int(per)))))


# --------------------------------------------------------------------------- loss pieces


def _loss_fn(unet: torch.nn.Module, constants: dict[str, torch.Tensor]):
    """loss(params, x_t, t, y, target) for ONE sample (no batch dim) -> scalar."""
    has_labels = bool(getattr(unet.config, "num_class_embeds", None))

    def loss(params, x_t, t, y, target):
        kwargs = {"class_labels": y.unsqueeze(0)} if has_labels else {}
        out = functional_call(unet, (params, constants), (x_t.unsqueeze(0), t.unsqueeze(0)), kwargs)
        eps_hat = out.sample if hasattr(out, "sample") else out[0]
        return 0.5 * (target.unsqueeze(0) - eps_hat).pow(2).sum()

    return loss


def _batched_losses(unet, params, constants, x_t, t, y, target) -> torch.Tensor:
    """(B,) per-sample losses with ``params`` substituted (one batched forward)."""
    has_labels = bool(getattr(unet.config, "num_class_embeds", None))
    kwargs = {"class_labels": y} if has_labels else {}
    eps_hat = functional_call(unet, (params, constants), (x_t, t), kwargs).sample
    return 0.5 * (target - eps_hat).pow(2).flatten(1).sum(1)


def _prepare(x0, noise, t, alphas_cumprod, target):
    x_t = add_noise(x0, noise, t, alphas_cumprod)
    tgt = noise if target is None else target
    return x_t.detach(), tgt.detach()


def _device_of(unet: torch.nn.Module) -> torch.device:
    return next(unet.parameters()).device


def _to(device, *tensors):
    return [None if x is None else x.to(device) for x in tensors]


# --------------------------------------------------------------------------- public functions


def _output_buffer(out: torch.Tensor | None, B: int, P: int, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(B, P, dtype=torch.float32, device=device)
    if out.shape != (B, P) or out.dtype != torch.float32 or out.device != device:
        raise UsageError(f"out buffer must be ({B}, {P}) float32 on {device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def per_sample_grads(
    unet: torch.nn.Module,
    names: Sequence[str],
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    target: torch.Tensor | None = None,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
    return_losses: bool = False,
    engine: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients G: (B, P) float32; row i is grad_theta l_i over the parameters ``names``.

    Columns are the parameters in ``names`` order, each flattened (see :func:`param_layout`).
    Computed with ``vmap(grad(loss))`` over :func:`functional_call`, in chunks of ``chunk_size``
    samples (default: as many as fit in ``max_memory`` bytes, :func:`chunk_size_for`). The result
    lives on the model's device. ``target`` (B, C, H, W) replaces ``noise`` as the regression target.
    With ``return_losses`` also returns the (B,) per-sample losses (free: ``grad_and_value``).
    ``out``: an optional preallocated (B, P) float32 buffer on the model's device (reused across
    calls it saves the page faults of a fresh B x P allocation).

    ``engine``: ``"vmap"`` is ``torch.func.vmap(grad_and_value(loss))`` over ``functional_call``
    (any model). ``"layerwise"`` does one batched forward and one backward to the outputs of the
    modules owning the selected parameters (no weight gradients), then forms each per-sample weight
    gradient in closed form (Conv2d: one grouped weight-gradient call with the batch folded into
    the groups; Linear: outer products; GroupNorm: grad . x_hat; Embedding: scatter); it needs
    every selected parameter to belong to an
    ``nn.Conv2d`` (zero padding), ``nn.Linear``, ``nn.GroupNorm`` or ``nn.Embedding``
    used once per forward. ``"auto"`` (default) takes layerwise when it applies, else vmap. Both are
    checked against an explicit loop of single-sample backward passes in the tests.
    """
    device = _device_of(unet)
    x0, noise, t, y, target = _to(device, x0, noise, t, y, target)
    names = list(names)
    layout = param_layout(unet, names)
    P = layout.P
    if chunk_size is None:
        chunk_size = chunk_size_for(unet, P, tuple(x0.shape[1:]), max_memory)
    x_t, tgt = _prepare(x0, noise, t, alphas_cumprod.to(device), target)
    if engine not in ("auto", "vmap", "layerwise"):
        raise UsageError(f"unknown per-sample gradient engine {engine!r}; expected auto, vmap or layerwise")
    if engine != "vmap":
        owners = _layerwise_owners(unet, names)
        if owners is None and engine == "layerwise":
            raise UsageError("the layerwise engine supports Conv2d, Linear, GroupNorm and Embedding parameters only")
        if owners is not None:
            out = _output_buffer(out, x0.shape[0], P, device)
            losses = torch.empty(x0.shape[0], dtype=torch.float32, device=device)
            offsets = dict(zip(names, layout.slices))
            params = dict(unet.named_parameters())
            frozen = [params[n] for n in names if not params[n].requires_grad]
            for p in frozen:  # the backward must reach the selected modules' outputs
                p.requires_grad_(True)
            try:
                for a in range(0, x0.shape[0], chunk_size):
                    b = min(a + chunk_size, x0.shape[0])
                    losses[a:b] = _layerwise_chunk(unet, owners, offsets, x_t[a:b], t[a:b], y[a:b], tgt[a:b], out[a:b])
                return (out, losses) if return_losses else out
            except _LayerwiseUnsupported as exc:
                if engine == "layerwise":
                    raise UsageError(f"the layerwise engine cannot handle this model: {exc}") from None
            finally:
                for p in frozen:
                    p.requires_grad_(False)
    selected, constants = _split_state(unet, names)
    gfn = vmap(grad_and_value(_loss_fn(unet, constants)), in_dims=(None, 0, 0, 0, 0))
    out = _output_buffer(out, x0.shape[0], P, device)
    losses = torch.empty(x0.shape[0], dtype=torch.float32, device=device)
    for a in range(0, x0.shape[0], chunk_size):
        b = min(a + chunk_size, x0.shape[0])
        g, losses[a:b] = gfn(selected, x_t[a:b], t[a:b], y[a:b], tgt[a:b])
        col = 0
        for n in names:
            k = selected[n].numel()
            out[a:b, col : col + k] = g[n].reshape(b - a, k)
            col += k
        del g
    return (out, losses) if return_losses else out


# --------------------------------------------------------------------------- layerwise engine

class _LayerwiseUnsupported(Exception):
    """The model does something the layerwise engine cannot see through (the vmap engine can)."""


_LAYERWISE_TYPES = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.Embedding)


def _layerwise_owners(unet: torch.nn.Module, names: Sequence[str]) -> dict[str, tuple[torch.nn.Module, dict[str, str]]] | None:
    """{module name: (module, {"weight"|"bias": parameter name})} for the selected parameters, or None
    when a selected parameter lives in a module type (or configuration) the layerwise engine cannot do."""
    modules = dict(unet.named_modules())
    owners: dict[str, tuple[torch.nn.Module, dict[str, str]]] = {}
    for n in names:
        mname, _, attr = n.rpartition(".")
        m = modules.get(mname)
        if type(m) not in _LAYERWISE_TYPES or attr not in ("weight", "bias"):
            return None
        if isinstance(m, torch.nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
            return None
        if isinstance(m, torch.nn.Embedding) and (m.max_norm is not None or m.padding_idx is not None):
            return None
        owners.setdefault(mname, (m, {}))[1][attr] = n
    return owners


def _layerwise_chunk(unet, owners, offsets, x_t, t, y, tgt, out) -> torch.Tensor:
    """Fill ``out`` (b, P) with per-sample gradients for one chunk; return the (b,) losses."""
    records: dict[str, list] = {m: [] for m in owners}

    def make_hook(mname):
        def hook(mod, inputs, output):
            # a group norm's saved statistics must be read now: the backward frees them
            stats = _saved_group_norm_stats(output) if isinstance(mod, torch.nn.GroupNorm) else None
            records[mname].append((inputs[0], output, stats))
        return hook

    handles = [module.register_forward_hook(make_hook(mname)) for mname, (module, _) in owners.items()]
    has_labels = bool(getattr(unet.config, "num_class_embeds", None))
    try:
        with torch.enable_grad():
            eps_hat = unet(x_t, t, **({"class_labels": y} if has_labels else {})).sample
            losses = 0.5 * (tgt - eps_hat).pow(2).flatten(1).sum(1)
            outputs = [rec[1] for m in owners for rec in records[m]]
            if any(not o.requires_grad for o in outputs):
                raise _LayerwiseUnsupported("a selected module's output does not require grad")
            grads_out = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():  # closed-form per-sample gradients: nothing below needs autograd
        for k, (mname, (m, attrs)) in enumerate(owners.items()):
            recs = records[mname]
            if len(recs) != 1:
                raise _LayerwiseUnsupported(f"module {mname} ran {len(recs)} times in one forward")
            inp, output, stats = recs[0]
            gout = grads_out[k] if grads_out[k] is not None else torch.zeros_like(output)
            gw, gb = _module_grads(m, inp, gout, "weight" in attrs, "bias" in attrs, stats)
            for attr, g in (("weight", gw), ("bias", gb)):
                if attr in attrs:
                    a, b = offsets[attrs[attr]]
                    # copy straight into the strided view: reshape() of a permuted g would copy twice
                    out[:, a:b].view(g.shape).copy_(g)
    return losses.detach().float()


def _conv_weight_grads(x: torch.Tensor, gout: torch.Tensor, m: torch.nn.Conv2d) -> torch.Tensor:
    """Per-sample Conv2d weight gradients (B, Cout, Cin/groups, kh, kw) from ONE weight-gradient call.

    Folding the batch into the channels turns the B samples into B convolution groups: with input
    (1, B*Cin, H, W), output gradient (1, B*Cout, Ho, Wo) and groups = B * m.groups, the ordinary
    weight gradient of that grouped convolution has shape (B*Cout, Cin/groups, kh, kw) and its
    block b is sample b's gradient. On CPU (oneDNN) this costs about as much as the batched
    weight gradient, and it comes out in the parameter's own layout (no transposition).
    """
    B = x.shape[0]
    Cout = gout.shape[1]
    if m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0) and m.groups == 1:
        # oneDNN has no fast grouped 1x1 weight gradient (it loops over groups); a bmm is direct
        return torch.bmm(gout.flatten(2), x.flatten(2).transpose(1, 2)).view(B, *m.weight.shape)
    if m.groups == 1 and min(x.shape[1], Cout) == 1:
        return _conv_weight_grads_by_correlation(x, gout, m)
    weight = torch.empty(B * Cout, *m.weight.shape[1:], dtype=x.dtype, device=x.device)
    _, gw, _ = torch.ops.aten.convolution_backward(
        gout.reshape(1, B * Cout, *gout.shape[2:]),
        x.reshape(1, B * x.shape[1], *x.shape[2:]),
        weight, None, list(m.stride), list(m.padding), list(m.dilation), False, [0, 0], B * m.groups,
        [False, True, False],
    )
    return gw.view(B, *m.weight.shape)


def _conv_weight_grads_by_correlation(x: torch.Tensor, gout: torch.Tensor, m: torch.nn.Conv2d) -> torch.Tensor:
    """Per-sample Conv2d weight gradients (B, Cout, Cin, kh, kw) as ONE depthwise forward convolution.

    For a layer with one input or one output channel (the image-side ``conv_in``/``conv_out`` of a
    grey-scale UNet), ``dW[b, o, i] = x[b, i] (cross-correlated with) gout[b, o]``: the padded input
    channel is the image and the output gradient (dilated by the layer's stride) the kernel, with the
    layer's dilation as the stride. With ``groups = B * Cin`` every (sample, input channel) pair is
    its own group holding the Cout kernels of its sample. oneDNN's grouped weight gradient runs such
    thin groups one by one (4x a batched weight gradient for Cout = 1 at 16 px); this runs as fast as
    a forward pass. Only the output gradient is replicated over Cin, so it is used when Cin or Cout
    is 1 (no copy at all when Cin = 1).
    """
    B, Cin = x.shape[:2]
    Cout = gout.shape[1]
    kh, kw = m.kernel_size
    kernels = gout.unsqueeze(1).expand(B, Cin, Cout, *gout.shape[2:]).reshape(B * Cin * Cout, 1, *gout.shape[2:])
    corr = torch.nn.functional.conv2d(
        x.reshape(1, B * Cin, *x.shape[2:]), kernels, None,
        stride=m.dilation, padding=m.padding, dilation=m.stride, groups=B * Cin,
    )  # (1, B*Cin*Cout, >= kh, >= kw): rows beyond the kernel come from the stride's remainder
    return corr[0, :, :kh, :kw].reshape(B, Cin, Cout, kh, kw).transpose(1, 2)


def _saved_group_norm_stats(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, rstd), each (B, G), that autograd saved for a group norm's backward, or None.

    Reading them (``grad_fn._saved_result1/2``, autograd's documented saved-tensor attributes)
    spares the group-norm recomputation, a pass over the activations with a fresh buffer.
    """
    node = output.grad_fn
    mean, rstd = getattr(node, "_saved_result1", None), getattr(node, "_saved_result2", None)
    if type(node).__name__ != "NativeGroupNormBackward0" or mean is None or rstd is None:
        return None
    return mean, rstd


def _module_grads(
    m: torch.nn.Module, x: torch.Tensor, gout: torch.Tensor, want_w: bool, want_b: bool,
    group_norm_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Per-sample (weight grad (B, *W.shape) | None, bias grad (B, *b.shape) | None) of one module.

    ``group_norm_stats``: the forward's (mean, rstd) (B, G) of a GroupNorm, when known.
    """
    B = x.shape[0]
    gw = gb = None
    if isinstance(m, torch.nn.Conv2d):
        if want_w:
            gw = _conv_weight_grads(x.contiguous(), gout.contiguous(), m)
        if want_b:
            gb = gout.sum(dim=(2, 3))
    elif isinstance(m, torch.nn.Linear):
        if want_w:
            if x.dim() == 2:
                gw = gout.unsqueeze(2) * x.unsqueeze(1)
            else:
                gw = torch.bmm(gout.reshape(B, -1, gout.shape[-1]).transpose(1, 2), x.reshape(B, -1, x.shape[-1]))
        if want_b:
            gb = gout if gout.dim() == 2 else gout.reshape(B, -1, gout.shape[-1]).sum(1)
    elif isinstance(m, torch.nn.GroupNorm):
        C, G = x.shape[1], m.num_groups
        gflat = gout.reshape(B * C, 1, -1)
        gb = gflat.sum(-1).view(B, C)
        if want_w and group_norm_stats is not None and x.dtype in (torch.float32, torch.float64):
            # (float16/bfloat16 would round sum g*x before the mean term cancels: recompute there)
            # dgamma_bc = sum_hw gout * (x - mean_bg) * rstd_bg = (sum_hw gout * x - mean_bg * dbeta_bc) * rstd_bg
            mean, rstd = (s.view(B, G, 1) for s in group_norm_stats)
            gx = torch.bmm(gflat, x.reshape(B * C, -1, 1)).view(B, G, C // G)
            gw = ((gx - mean * gb.view(B, G, C // G)) * rstd).view(B, C)
        elif want_w:
            # dgamma_bc = sum_hw gout * x_hat: x_hat from the fused group-norm kernel without affine
            # (torch.var_mean is many times slower here), then one batched dot product
            xhat = torch.nn.functional.group_norm(x, G, None, None, m.eps)
            gw = torch.bmm(gflat, xhat.reshape(B * C, -1, 1)).view(B, C)
    elif isinstance(m, torch.nn.Embedding):
        idx = x.reshape(B, -1)
        g = gout.reshape(B, idx.shape[1], -1)
        gw = torch.zeros(B, m.num_embeddings, m.embedding_dim, dtype=g.dtype, device=g.device)
        gw.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, m.embedding_dim), g)
    return gw, gb


def per_sample_losses(
    unet: torch.nn.Module,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) float32 per-sample losses l_i, without gradients."""
    device = _device_of(unet)
    x0, noise, t, y, target = _to(device, x0, noise, t, y, target)
    x_t, tgt = _prepare(x0, noise, t, alphas_cumprod.to(device), target)
    _, constants = _split_state(unet, [])
    with torch.no_grad():
        return _batched_losses(unet, {}, constants, x_t, t, y, tgt).float()


@dataclass
class ProbeBatch:
    """One batch of probe inputs: x0, noise, target (B, C, H, W); t, y (B,) int64.

    ``target`` is ``None`` for the empirical Fisher (the target is ``noise``).
    """

    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.x0.shape[0])


def _as_batches(batches) -> Iterable[ProbeBatch]:
    for b in batches:
        if isinstance(b, ProbeBatch):
            yield b
        else:
            yield ProbeBatch(*b)


def mean_gradient(
    unet: torch.nn.Module,
    names: Sequence[str],
    x0: torch.Tensor | Iterable[ProbeBatch] | Iterable[tuple],
    noise: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    alphas_cumprod: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """mu = (1/n) sum_i grad l_i: (P,) float32, from one batched backward of the mean loss per batch.

    Either pass one batch (``x0, noise, t, y, alphas_cumprod[, target]`` as tensors), or pass an
    iterable of :class:`ProbeBatch` (or tuples ``(x0, noise, t, y[, target])``) as ``x0`` together with
    ``alphas_cumprod=``; batches are weighted by their size, so the result is the mean over all
    samples. Equals ``per_sample_grads(...).mean(0)`` without forming G (O(P) memory).
    """
    if alphas_cumprod is None:
        raise UsageError("mean_gradient needs alphas_cumprod")
    if isinstance(x0, torch.Tensor):
        batches: Iterable[ProbeBatch] = [ProbeBatch(x0, noise, t, y, target)]
    else:
        batches = _as_batches(x0)
    device = _device_of(unet)
    names = list(names)
    selected, constants = _split_state(unet, names)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in selected.items()}
    n_total = 0
    ac = alphas_cumprod.to(device)
    for b in batches:
        bx0, bnoise, bt, by, btarget = _to(device, b.x0, b.noise, b.t, b.y, b.target)
        x_t, tgt = _prepare(bx0, bnoise, bt, ac, btarget)
        params = {n: p.clone().requires_grad_(True) for n, p in selected.items()}
        loss_sum = _batched_losses(unet, params, constants, x_t, bt, by, tgt).sum()
        grads = torch.autograd.grad(loss_sum, [params[n] for n in names])
        for n, g in zip(names, grads):
            acc[n] += g.float()
        n_total += bx0.shape[0]
    if n_total == 0:
        raise UsageError("mean_gradient got no samples")
    return _flat(acc, names, batched=False) / n_total


def directional_derivatives(
    unet: torch.nn.Module,
    names: Sequence[str],
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    v: torch.Tensor,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """All v^T g_i: (B,) float32, from ONE forward-mode ``torch.func.jvp`` of the (B,) loss vector.

    ``v``: (P,) in the layout of ``names`` (:func:`param_layout`). Equals ``per_sample_grads(...) @ v``
    without forming G: O(P) memory and about the cost of two forward passes.
    """
    device = _device_of(unet)
    x0, noise, t, y, target = _to(device, x0, noise, t, y, target)
    names = list(names)
    selected, constants = _split_state(unet, names)
    layout = param_layout(unet, names)
    if v.shape != (layout.P,):
        raise UsageError(f"direction v has shape {tuple(v.shape)}, expected ({layout.P},)")
    tangents = {n: tv.to(device=device, dtype=selected[n].dtype) for n, tv in layout.view(v.detach()).items()}
    x_t, tgt = _prepare(x0, noise, t, alphas_cumprod.to(device), target)

    def losses(params):
        return _batched_losses(unet, params, constants, x_t, t, y, tgt)

    _, dots = jvp(losses, (selected,), (tangents,))
    return dots.float()


@torch.no_grad()
def true_fisher_target(
    unet: torch.nn.Module,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    xi: torch.Tensor,
) -> torch.Tensor:
    """The "true Fisher" target eps_theta(x_t, t, y).detach() + xi: (B, C, H, W) (DESIGN section 6).

    ``xi`` (B, C, H, W) ~ N(0, I) is drawn by the caller so it can be stored and replayed.
    """
    device = _device_of(unet)
    x0, noise, t, y, xi = _to(device, x0, noise, t, y, xi)
    x_t = add_noise(x0, noise, t, alphas_cumprod.to(device))
    has_labels = bool(getattr(unet.config, "num_class_embeds", None))
    eps_hat = unet(x_t, t, **({"class_labels": y} if has_labels else {})).sample
    return eps_hat + xi

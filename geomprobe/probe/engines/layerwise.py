"""The ``layerwise`` engine: per-sample weight gradients in closed form.

One batched forward (hooks record each selected module's input and output) and one backward to
those outputs (no weight gradients), then per module: Conv2d by one grouped weight-gradient call with
the batch folded into the groups (or a depthwise correlation, or a bmm for 1x1), Linear by outer
products, GroupNorm by grad . x_hat (from autograd's saved statistics when it can), Embedding by a
scatter. Needs every selected parameter to belong to an ``nn.Conv2d`` (zero padding),
``nn.Linear``, ``nn.GroupNorm`` or ``nn.Embedding`` used once per forward
(:func:`layerwise_owners`); otherwise :class:`LayerwiseUnsupported` / ``None`` and the caller falls
back to the vmap engine.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from geomprobe.diffusion import denoising_loss, predict_noise
from geomprobe.probe.losses import NoisedBatch
from geomprobe.probe.params import ParamLayout

Owners = dict[str, tuple[torch.nn.Module, dict[str, str]]]


class LayerwiseUnsupported(Exception):
    """The model does something the layerwise engine cannot see through (the vmap engine can)."""


_LAYERWISE_TYPES = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.Embedding)


def layerwise_owners(unet: torch.nn.Module, names: Sequence[str]) -> Owners | None:
    """The modules owning the selected parameters, or None if the layerwise engine cannot do one of them.

    Returns {module name: (module, {"weight"|"bias": parameter name})} for the selected parameters, or
    None when a selected parameter lives in a module type (or configuration) the layerwise engine cannot do.
    """
    modules = dict(unet.named_modules())
    owners: Owners = {}
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


def layerwise_grads(
    unet: torch.nn.Module,
    owners: Owners,
    layout: ParamLayout,
    batch: NoisedBatch,
    chunk_size: int,
    out: torch.Tensor,
    losses: torch.Tensor,
) -> None:
    """Fill ``out`` (B, P) and ``losses`` (B,), ``chunk_size`` samples per forward+backward.

    Raises :class:`LayerwiseUnsupported` when the forward does something the engine cannot see through.
    """
    offsets = dict(zip(layout.names, layout.slices, strict=True))
    params = dict(unet.named_parameters())
    with requiring_grad([params[n] for n in layout.names]):  # the backward must reach the selected modules
        for a in range(0, batch.n, chunk_size):
            b = min(a + chunk_size, batch.n)
            losses[a:b] = _layerwise_chunk(unet, owners, offsets, batch.rows(a, b), out[a:b])


@contextmanager
def requiring_grad(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """The frozen ones among ``params`` require grad inside the block and are frozen again after it."""
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _forward_backward_to_outputs(unet, owners: Owners, batch: NoisedBatch, params: Sequence[torch.Tensor] = ()):
    """One batched forward with hooks on the owner modules and one backward of sum_i l_i to their outputs.

    Returns (losses (b,), {module name: (input, output, group-norm stats)}, [d sum l / d output per
    owner, in ``owners`` order], [d sum l / d p for each of ``params`` (the same backward)]). Samples
    do not interact in the UNet, so row i of each output gradient is sample i's own.
    """
    records: dict[str, list] = {m: [] for m in owners}

    def make_hook(mname):
        def hook(mod, inputs, output):
            # a group norm's saved statistics must be read now: the backward frees them
            stats = _saved_group_norm_stats(output) if isinstance(mod, torch.nn.GroupNorm) else None
            records[mname].append((inputs[0], output, stats))

        return hook

    handles = [module.register_forward_hook(make_hook(mname)) for mname, (module, _) in owners.items()]
    try:
        with torch.enable_grad():
            losses = denoising_loss(predict_noise(unet, batch.x_t, batch.t, batch.y), batch.target)
            outputs = [rec[1] for m in owners for rec in records[m]]
            if any(not o.requires_grad for o in outputs):
                raise LayerwiseUnsupported("a selected module's output does not require grad")
            grads = torch.autograd.grad(losses.sum(), [*outputs, *params], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    for mname, recs in records.items():
        if len(recs) != 1:
            raise LayerwiseUnsupported(f"module {mname} ran {len(recs)} times in one forward")
    single = {mname: recs[0] for mname, recs in records.items()}
    grads_out = [g if g is not None else torch.zeros_like(single[m][1]) for m, g in zip(owners, grads, strict=False)]
    grads_params = [
        g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads[len(owners) :], strict=True)
    ]
    return losses, single, grads_out, grads_params


def _layerwise_chunk(unet, owners: Owners, offsets, batch: NoisedBatch, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` (b, P) with per-sample gradients for one chunk; return the (b,) losses."""
    losses, records, grads_out, _ = _forward_backward_to_outputs(unet, owners, batch)
    with torch.no_grad():  # closed-form per-sample gradients: nothing below needs autograd
        for gout, (mname, (m, attrs)) in zip(grads_out, owners.items(), strict=True):
            inp, _, stats = records[mname]
            gw, gb = _module_grads(m, inp, gout, "weight" in attrs, "bias" in attrs, stats)
            for attr, g in (("weight", gw), ("bias", gb)):
                if attr in attrs:
                    a, b = offsets[attrs[attr]]
                    # copy straight into the strided view: reshape() of a permuted g would copy twice
                    out[:, a:b].view(g.shape).copy_(g)
    return losses.detach().float()


def layerwise_directional(unet, owners: Owners, batch: NoisedBatch, tangents: dict[str, torch.Tensor]) -> torch.Tensor:
    """All v^T g_i, (b,): one forward + one backward to the owners' outputs, no forward-mode AD.

    Sample i's weight gradient of a layer is bilinear in (its input x_i, its output gradient
    gout_i), so v^T g_i = sum over layers of <gout_i, layer(x_i) with its parameters replaced by the
    direction v>: one extra convolution / matmul / normalisation per layer. First-order only, so it
    runs through any attention kernel. ``tangents``: {parameter name: direction of its shape}.
    """
    return directional_from_records(owners, layer_records(unet, owners, batch)[1], tangents)


@dataclass
class LayerRecords:
    """What one batched forward + backward leaves for the products of its samples' gradients.

    ``inputs``: each owner module's input; ``grads_out``: d sum_i l_i / d (its output), in ``owners``
    order (row i is sample i's own).
    """

    inputs: list[torch.Tensor]
    grads_out: list[torch.Tensor]

    def nbytes(self) -> int:
        """Bytes held (each storage counted once: modules may share an input)."""
        storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in [*self.inputs, *self.grads_out]}
        return int(sum(storages.values()))


def layer_records(
    unet, owners: Owners, batch: NoisedBatch, params: Sequence[torch.Tensor] = ()
) -> tuple[list[torch.Tensor], LayerRecords]:
    """One forward + backward: (d sum_i l_i / d p for each of ``params``, the owners' :class:`LayerRecords`)."""
    _, records, grads_out, grads_params = _forward_backward_to_outputs(unet, owners, batch, params)
    inputs = [records[mname][0] for mname in owners]
    return grads_params, LayerRecords([x.detach() for x in inputs], [g.detach() for g in grads_out])


def directional_from_records(owners: Owners, records: LayerRecords, tangents: dict[str, torch.Tensor]) -> torch.Tensor:
    """All v^T g_i, (b,) float32, from a batch's :class:`LayerRecords` (see :func:`layerwise_directional`)."""
    dots = None
    with torch.no_grad():
        for inp, gout, (m, attrs) in zip(records.inputs, records.grads_out, owners.values(), strict=True):
            vw, vb = tangents.get(attrs.get("weight", "")), tangents.get(attrs.get("bias", ""))
            term = (_module_with(m, inp, vw, vb) * gout).flatten(1).sum(1, dtype=torch.float64)
            dots = term if dots is None else dots + term
    return dots.float()


def _module_with(m: torch.nn.Module, x: torch.Tensor, vw: torch.Tensor | None, vb: torch.Tensor | None) -> torch.Tensor:
    """The module's output on ``x`` with its weight replaced by ``vw`` and its bias by ``vb`` (None: 0)."""
    F = torch.nn.functional
    if isinstance(m, torch.nn.Conv2d):
        vw = vw if vw is not None else torch.zeros_like(m.weight)
        return F.conv2d(x, vw, vb, m.stride, m.padding, m.dilation, m.groups)
    if isinstance(m, torch.nn.Linear):
        return F.linear(x, vw if vw is not None else torch.zeros_like(m.weight), vb)
    if isinstance(m, torch.nn.GroupNorm):
        C = x.shape[1]
        shape = (1, C) + (1,) * (x.dim() - 2)
        xhat = F.group_norm(x, m.num_groups, None, None, m.eps)
        out = xhat * (vw.view(shape) if vw is not None else 0.0)
        return out + (vb.view(shape) if vb is not None else 0.0)
    if isinstance(m, torch.nn.Embedding):
        return F.embedding(x, vw) if vw is not None else torch.zeros(*x.shape, m.embedding_dim, device=x.device)
    raise LayerwiseUnsupported(f"no directional route for {type(m).__name__}")


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
        weight,
        None,
        list(m.stride),
        list(m.padding),
        list(m.dilation),
        False,
        [0, 0],
        B * m.groups,
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
        x.reshape(1, B * Cin, *x.shape[2:]),
        kernels,
        None,
        stride=m.dilation,
        padding=m.padding,
        dilation=m.stride,
        groups=B * Cin,
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
    m: torch.nn.Module,
    x: torch.Tensor,
    gout: torch.Tensor,
    want_w: bool,
    want_b: bool,
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

"""Which route for G v (all v^T g_i) on an attention UNet on CPU: the survey behind geomprobe/probe/autodiff.py.

Builds the DDPM CIFAR-10 architecture (diffusers ``UNet2DModel``, 35.7M parameters, unconditional,
attention at 16x16) with random weights, writes it as a diffusers pipeline directory
(``unet/`` + ``scheduler/`` (DDPMScheduler default config) + ``model_index.json``) into a temp
dir, loads the UNet back from there, and times on CPU, each route in a FRESH subprocess (so the
peak RSS, ``ru_maxrss``, is that route's own):

- ``fwdbwd``   one batched forward + backward of the mean loss (the reference, all parameters)
- ``mu``       the mean gradient by functional_call + autograd.grad (as probe.grads.mean_gradient)
- ``gtw``      G^T w = grad of sum_i w_i l_i (one backward, as fisher.model.weighted_gradient)
- ``gv_*``     G v = all v^T g_i, one route each (see ROUTES below)
- ``fv``       F v = G^T (G v) / n (jvp under the SDPA math kernel, then one backward)
- ``mu_cstar`` mu and all mu^T g_i (what rank-1 c* needs): mean gradient + one G v
- ``*_layerwise`` G v, F v, mu + c* from ONE forward + ONE backward to the Conv2d/Linear/GroupNorm outputs:
  v^T g_i = sum over layers <grad_out_i, layer_v(x_i)> (the layer applied with weight v), and G^T w is each
  layer's weight gradient with grad_out_i scaled by w_i. No forward AD, no double backward, flash SDPA is fine.

Every model gets the GroupNorm "contiguous input" pre-hook (geomprobe/probe/autodiff.py): without it
torch 2.13's CPU group norm crashes (backward, dX not requested) or fails (forward AD, ``view``)
on the channels-last activations diffusers' attention produces.

Usage::

    OMP_NUM_THREADS=1 python bench/attention_routes.py                 # B = 8 and 32 at 32 px, all routes
    python bench/attention_routes.py --batch 8 --routes fwdbwd,gv_jvp_math --reps 3
    python bench/attention_routes.py --check                           # float64 agreement on a small model

Nothing is downloaded (HF_HUB_OFFLINE=1 is set before diffusers is imported).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from real_model import CIFAR_CONFIG  # noqa: E402  (bench/real_model.py, the same directory)

# --------------------------------------------------------------------------- model + fixes


def _contiguous_input(module, args):
    x = args[0]
    if isinstance(x, torch.Tensor) and not x.is_contiguous():
        return (x.contiguous(),) + tuple(args[1:])
    return None


def add_group_norm_fix(unet):
    """GroupNorm pre-hooks that make a channels-last input contiguous (geomprobe/probe/autodiff.py)."""
    return [m.register_forward_pre_hook(_contiguous_input) for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]


class PlainAttnProcessor:
    """diffusers' spatial self-attention with matmul + softmax only (forward AD and double backward)."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            B, C, H, W = hidden_states.shape
            hidden_states = hidden_states.view(B, C, H * W).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        b, n, _ = q.shape
        hd = q.shape[-1] // attn.heads
        q, k, v = (z.view(b, -1, attn.heads, hd).transpose(1, 2) for z in (q, k, v))
        w = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)
        out = (w @ v).transpose(1, 2).reshape(b, n, attn.heads * hd)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(B, C, H, W).contiguous()
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def set_plain_attention(unet):
    from diffusers.models.attention_processor import Attention

    for m in unet.modules():
        if isinstance(m, Attention):
            m.set_processor(PlainAttnProcessor())


def write_pipeline(root: str, seed: int = 0, **overrides) -> str:
    """A diffusers pipeline directory with a random-weight DDPM CIFAR-10 UNet; returns ``root``."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**{**CIFAR_CONFIG, **overrides})
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(root)  # unet/ scheduler/ model_index.json
    return root


def load_unet(root: str):
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(os.path.join(root, "unet"), local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(os.path.join(root, "scheduler"), local_files_only=True)
    return unet, scheduler


# --------------------------------------------------------------------------- losses and routes


def _kwargs(unet, y):
    from geomprobe.diffusion import conditioning

    return conditioning(unet, y)


def _split(unet, names):
    params = dict(unet.named_parameters())
    chosen = set(names)
    selected = {n: params[n].detach() for n in names}
    constants = {n: p.detach() for n, p in params.items() if n not in chosen}
    constants.update(dict(unet.named_buffers()))
    return selected, constants


def _losses_fn(unet, constants, x_t, t, y, target):
    from torch.func import functional_call

    from geomprobe.diffusion import denoising_loss

    def losses(params):
        eps = functional_call(unet, (params, constants), (x_t, t), _kwargs(unet, y)).sample
        return denoising_loss(eps, target)

    return losses


def _math_sdpa():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def gv_jvp(unet, names, batch, tangents, ctx=None):
    """torch.func.jvp of the (B,) loss vector (one forward with tangents)."""
    selected, constants = _split(unet, names)
    with ctx or contextlib.nullcontext():
        return torch.func.jvp(_losses_fn(unet, constants, *batch), (selected,), (tangents,))[1]


def gv_forward_ad(unet, names, batch, tangents, ctx=None):
    """torch.autograd.forward_ad dual tensors (same forward-mode formulas as torch.func.jvp)."""
    import torch.autograd.forward_ad as fwAD

    selected, constants = _split(unet, names)
    with ctx or contextlib.nullcontext(), fwAD.dual_level():
        duals = {n: fwAD.make_dual(selected[n], tangents[n]) for n in names}
        return fwAD.unpack_dual(_losses_fn(unet, constants, *batch)(duals)).tangent.clone()


def gv_double_backward(unet, names, batch, tangents, ctx=None):
    """G v = d/du <grad_theta sum_i u_i l_i, v> at u = 1: backward with create_graph, then backward to u."""
    selected, constants = _split(unet, names)
    params = {n: p.clone().requires_grad_(True) for n, p in selected.items()}
    with ctx or contextlib.nullcontext():
        losses = _losses_fn(unet, constants, *batch)(params)
        u = torch.ones_like(losses, requires_grad=True)
        w = torch.autograd.grad((u * losses).sum(), [params[n] for n in names], create_graph=True)
        s = sum((wi * tangents[n]).sum() for wi, n in zip(w, names))
        return torch.autograd.grad(s, u)[0]


def gv_linearize(unet, names, batch, tangents, ctx=None):
    """torch.func.linearize (traces the jvp graph with make_fx on every call here)."""
    selected, constants = _split(unet, names)
    with ctx or contextlib.nullcontext():
        _, f = torch.func.linearize(_losses_fn(unet, constants, *batch), selected)
        return f(tangents)


def weighted_grad(unet, names, batch, w):
    selected, constants = _split(unet, names)
    params = {n: p.clone().requires_grad_(True) for n, p in selected.items()}
    losses = _losses_fn(unet, constants, *batch)(params)
    return [g for g in torch.autograd.grad((w * losses).sum(), [params[n] for n in names])]


def fwd_bwd(unet, batch):
    from geomprobe.diffusion import denoising_loss

    x_t, t, y, target = batch
    unet.zero_grad(set_to_none=True)
    denoising_loss(unet(x_t, t, **_kwargs(unet, y)).sample, target).mean().backward()


def _as_dict(unet, names, flat):
    params = dict(unet.named_parameters())
    out, a = {}, 0
    for n in names:
        k = params[n].numel()
        out[n] = flat[a : a + k].view(params[n].shape)
        a += k
    return out


# --------------------------------------------------------------------------- layerwise G v / G^T w

_LW_TYPES = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm)


def lw_capture(unet, batch):
    """One forward + one backward of sum_i l_i to the OUTPUTS of every Conv2d/Linear/GroupNorm (no weight
    gradients, first-order only, so CPU flash SDPA is fine). Returns ({name: module}, {name: (input, grad_out)}).

    Per sample, grad_out_i is the gradient of l_i alone (samples do not interact in the UNet)."""
    x_t, t, y, target = batch
    from geomprobe.diffusion import denoising_loss

    mods = {n: m for n, m in unet.named_modules() if isinstance(m, _LW_TYPES)}
    rec = {}
    handles = [m.register_forward_hook(lambda m, i, o, n=n: rec.__setitem__(n, (i[0], o))) for n, m in mods.items()]
    try:
        with torch.enable_grad():
            losses = denoising_loss(unet(x_t, t, **_kwargs(unet, y)).sample, target)
            names = list(rec)
            gouts = torch.autograd.grad(losses.sum(), [rec[n][1] for n in names], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return mods, {n: (rec[n][0].detach(), g) for n, g in zip(names, gouts) if g is not None}


@torch.no_grad()
def lw_gv(mods, cache, v):
    """G v: for each layer, <grad_out_i, layer(x_i) with the weight replaced by v> (one extra forward per layer).

    v: {parameter name: tensor}; parameters missing from v count as 0."""
    import torch.nn.functional as F

    dots = 0
    for n, (x, g) in cache.items():
        m, vw, vb = mods[n], v.get(n + ".weight"), v.get(n + ".bias")
        B = x.shape[0]
        if isinstance(m, torch.nn.Conv2d):
            if vw is not None:
                dots = dots + (g * F.conv2d(x, vw, None, m.stride, m.padding, m.dilation, m.groups)).flatten(1).sum(1)
            if vb is not None:
                dots = dots + g.flatten(2).sum(2) @ vb
        elif isinstance(m, torch.nn.Linear):
            if vw is not None:
                dots = dots + (g * F.linear(x, vw)).reshape(B, -1).sum(1)
            if vb is not None:
                dots = dots + g.reshape(B, -1, g.shape[-1]).sum(1) @ vb
        else:  # GroupNorm: out = x_hat * gamma + beta
            gs = g.flatten(2)
            if vw is not None:
                dots = dots + (gs * F.group_norm(x, m.num_groups, None, None, m.eps).flatten(2)).sum(2) @ vw
            if vb is not None:
                dots = dots + gs.sum(2) @ vb
    return dots


@torch.no_grad()
def lw_gtw(mods, cache, w):
    """G^T w = sum_i w_i g_i from the same cache: each layer's weight gradient with grad_out_i scaled by w_i."""
    import torch.nn.functional as F

    out = {}
    for n, (x, g) in cache.items():
        m = mods[n]
        gw = g * w.view(-1, *([1] * (g.dim() - 1))).to(g.dtype)
        if isinstance(m, torch.nn.Conv2d):
            has_b = m.bias is not None
            _, dW, db = torch.ops.aten.convolution_backward(
                gw,
                x,
                m.weight,
                [m.out_channels] if has_b else None,
                list(m.stride),
                list(m.padding),
                list(m.dilation),
                False,
                [0, 0],
                m.groups,
                [False, True, has_b],
            )
            out[n + ".weight"] = dW
            if has_b:
                out[n + ".bias"] = db
        elif isinstance(m, torch.nn.Linear):
            g2, x2 = gw.reshape(-1, gw.shape[-1]), x.reshape(-1, x.shape[-1])
            out[n + ".weight"] = g2.T @ x2
            if m.bias is not None:
                out[n + ".bias"] = g2.sum(0)
        else:
            gs = gw.flatten(2)
            out[n + ".weight"] = (gs * F.group_norm(x, m.num_groups, None, None, m.eps).flatten(2)).sum((0, 2))
            out[n + ".bias"] = gs.sum((0, 2))
    return out


def lw_gv_streaming(unet, batch, v):
    """G v like :func:`lw_gv`, but each layer's dot product is taken in a tensor hook as the backward
    reaches its output, so no grad_out is kept: peak memory ~ a plain fwd+bwd. The backward goes to
    x_t and to the time-projection output (the time-embedding branch does not lead to x_t)."""
    import torch.nn.functional as F

    from geomprobe.diffusion import denoising_loss

    x_t, t, y, target = batch
    B = x_t.shape[0]
    dots = torch.zeros(B, dtype=x_t.dtype)

    def layer_dot(m, n, x, g):
        vw, vb = v.get(n + ".weight"), v.get(n + ".bias")
        d = torch.zeros(B, dtype=g.dtype)
        if isinstance(m, torch.nn.Conv2d):
            if vw is not None:
                d += (g * F.conv2d(x, vw, None, m.stride, m.padding, m.dilation, m.groups)).flatten(1).sum(1)
            if vb is not None:
                d += g.flatten(2).sum(2) @ vb
        elif isinstance(m, torch.nn.Linear):
            if vw is not None:
                d += (g * F.linear(x, vw)).reshape(B, -1).sum(1)
            if vb is not None:
                d += g.reshape(B, -1, g.shape[-1]).sum(1) @ vb
        else:
            gs = g.flatten(2)
            if vw is not None:
                d += (gs * F.group_norm(x, m.num_groups, None, None, m.eps).flatten(2)).sum(2) @ vw
            if vb is not None:
                d += gs.sum(2) @ vb
        return d

    def fwd_hook(n):
        def hook(m, inp, out):
            x = inp[0].detach()

            def grad_hook(g):
                nonlocal dots
                with torch.no_grad():
                    dots += layer_dot(m, n, x, g)

            out.register_hook(grad_hook)

        return hook

    leaves = []

    def new_leaf(m, inp, out):
        out = out.detach().requires_grad_(True)
        leaves.append(out)
        return out

    handles = [m.register_forward_hook(fwd_hook(n)) for n, m in unet.named_modules() if isinstance(m, _LW_TYPES)]
    handles += [
        m.register_forward_hook(new_leaf) for n, m in unet.named_modules() if n in ("time_proj", "class_embedding")
    ]
    try:
        with torch.enable_grad():
            x_in = x_t.detach().requires_grad_(True)
            leaves.append(x_in)
            losses = denoising_loss(unet(x_in, t, **_kwargs(unet, y)).sample, target)
            torch.autograd.grad(losses.sum(), leaves)
    finally:
        for h in handles:
            h.remove()
    return dots


def make_route(name, unet, names, batch, v):
    """A zero-argument callable running route ``name`` once."""
    B = batch[0].shape[0]
    math = _math_sdpa
    if name == "fwdbwd":
        return lambda: fwd_bwd(unet, batch)
    if name == "mu":
        return lambda: weighted_grad(unet, names, batch, torch.full((B,), 1.0 / B))
    if name == "gtw":
        w = torch.randn(B)
        return lambda: weighted_grad(unet, names, batch, w)
    if name == "gv_jvp_math":
        return lambda: gv_jvp(unet, names, batch, v, math())
    if name == "gv_fwad_math":
        return lambda: gv_forward_ad(unet, names, batch, v, math())
    if name == "gv_dbl_math":
        return lambda: gv_double_backward(unet, names, batch, v, math())
    if name == "gv_linearize_math":
        return lambda: gv_linearize(unet, names, batch, v, math())
    if name in ("gv_jvp_plain", "gv_dbl_plain"):
        set_plain_attention(unet)
        f = gv_jvp if name == "gv_jvp_plain" else gv_double_backward
        return lambda: f(unet, names, batch, v)
    if name == "gv_jvp_flash":  # the default processor: expected to fail (no forward AD for CPU flash SDPA)
        return lambda: gv_jvp(unet, names, batch, v)
    if name == "fv":

        def fv():
            gv = gv_jvp(unet, names, batch, v, math())
            return weighted_grad(unet, names, batch, gv / B)

        return fv
    if name == "mu_cstar":

        def mu_cstar():
            mu = torch.cat([g.reshape(-1) for g in weighted_grad(unet, names, batch, torch.full((B,), 1.0 / B))])
            return gv_jvp(unet, names, batch, _as_dict(unet, names, mu), math())

        return mu_cstar
    if name == "gv_layerwise":
        return lambda: lw_gv(*lw_capture(unet, batch), v)
    if name == "gv_layerwise_stream":
        return lambda: lw_gv_streaming(unet, batch, v)
    if name == "fv_layerwise":

        def fv_lw():
            mods, cache = lw_capture(unet, batch)
            return lw_gtw(mods, cache, lw_gv(mods, cache, v) / B)

        return fv_lw
    if name == "mu_cstar_layerwise":

        def mu_cstar_lw():
            mu = torch.cat([g.reshape(-1) for g in weighted_grad(unet, names, batch, torch.full((B,), 1.0 / B))])
            return lw_gv(*lw_capture(unet, batch), _as_dict(unet, names, mu))

        return mu_cstar_lw
    if name == "idle":
        return lambda: None
    raise SystemExit(f"unknown route {name}")


ALL_ROUTES = [
    "idle",
    "fwdbwd",
    "mu",
    "gtw",
    "gv_jvp_math",
    "gv_jvp_plain",
    "gv_fwad_math",
    "gv_dbl_math",
    "gv_dbl_plain",
    "gv_linearize_math",
    "fv",
    "mu_cstar",
    "gv_layerwise",
    "gv_layerwise_stream",
    "fv_layerwise",
    "mu_cstar_layerwise",
]


def make_batch(unet, scheduler, B, seed=1, dtype=torch.float32):
    from geomprobe.diffusion import add_noise

    g = torch.Generator().manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    x0 = torch.randn(B, c, s, s, generator=g, dtype=dtype)
    noise = torch.randn(B, c, s, s, generator=g, dtype=dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (B,), generator=g)
    y = torch.randint(0, 10, (B,), generator=g)
    x_t = add_noise(x0, noise, t, scheduler.alphas_cumprod.to(dtype)).to(dtype)
    return x_t, t, y, noise


# --------------------------------------------------------------------------- measurement


def run_one(root, route, B, reps):
    """Child process: time ``route`` (min over reps after one warm-up) and report peak RSS."""
    torch.set_num_threads(1)
    unet, scheduler = load_unet(root)
    add_group_norm_fix(unet)
    names = [n for n, _ in unet.named_parameters()]
    batch = make_batch(unet, scheduler, B)
    g = torch.Generator().manual_seed(2)
    v = _as_dict(unet, names, torch.randn(sum(p.numel() for p in unet.parameters()), generator=g))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn = make_route(route, unet, names, batch, v)
    times, cpu, err = [], [], None
    try:
        for _ in range(reps + 1):
            start, cstart = time.perf_counter(), time.process_time()
            fn()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cstart)
    except Exception as exc:  # a route that does not work on this model
        err = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    first = times[0] if times else None
    best = min(times[1:]) if len(times) > 1 else None
    cpu_best = min(cpu[1:]) if len(cpu) > 1 else None
    return dict(
        route=route,
        B=B,
        seconds=best,
        cpu_seconds=cpu_best,
        first=first,
        rss_mib=rss / 1024,
        rss_before_mib=rss0 / 1024,
        error=err,
    )


def check(dtype=torch.float64):
    """Every route's G v against an explicit G @ v on a small attention UNet in float64."""
    from diffusers import UNet2DModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet = UNet2DModel(
        **{**CIFAR_CONFIG, "block_out_channels": (32, 64, 64, 64), "norm_num_groups": 8, "sample_size": 16}
    ).to(dtype)
    add_group_norm_fix(unet)
    from diffusers import DDPMScheduler

    batch = make_batch(unet, DDPMScheduler(), 4, dtype=dtype)
    names = [n for n, _ in unet.named_parameters()]
    rows = []
    for i in range(4):
        unet.zero_grad(set_to_none=True)
        fwd_bwd(unet, tuple(z[i : i + 1] for z in batch))
        rows.append(torch.cat([p.grad.reshape(-1) for p in unet.parameters()]))
    G = torch.stack(rows)
    v_flat = torch.randn(G.shape[1], dtype=dtype, generator=torch.Generator().manual_seed(2))
    ref = G @ v_flat
    v = _as_dict(unet, names, v_flat)
    print(f"check: small CIFAR-style UNet, P={G.shape[1]}, B=4, {dtype}")
    for label, fn in [
        ("jvp + SDPA math", lambda: gv_jvp(unet, names, batch, v, _math_sdpa())),
        ("forward_ad + SDPA math", lambda: gv_forward_ad(unet, names, batch, v, _math_sdpa())),
        ("double backward + SDPA math", lambda: gv_double_backward(unet, names, batch, v, _math_sdpa())),
        ("linearize + SDPA math", lambda: gv_linearize(unet, names, batch, v, _math_sdpa())),
        ("layerwise (fwd + bwd to outputs)", lambda: lw_gv(*lw_capture(unet, batch), v)),
        ("layerwise streaming (hooks)", lambda: lw_gv_streaming(unet, batch, v)),
        ("jvp, default SDPA (flash)", lambda: gv_jvp(unet, names, batch, v)),
    ]:
        try:
            r = fn()
            print(f"  {label:30s} max rel err {float(((r - ref).abs() / ref.abs()).max()):.1e}")
        except Exception as exc:
            print(f"  {label:30s} FAILS {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
    gtw = torch.cat([g.reshape(-1) for g in weighted_grad(unet, names, batch, ref)])
    print(
        f"  {'G^T w (one backward)':30s} max rel err {float((gtw - G.T @ ref).abs().max() / (G.T @ ref).abs().max()):.1e}"
    )
    mods, cache = lw_capture(unet, batch)
    lw = lw_gtw(mods, cache, ref)
    lw = torch.cat([lw[n].reshape(-1) for n in names])
    print(
        f"  {'G^T w layerwise (same cache)':30s} max rel err {float((lw - G.T @ ref).abs().max() / (G.T @ ref).abs().max()):.1e}"
    )


def print_table(results, B, reps):
    """Wall and CPU seconds (1 thread: CPU time is the robust number on a loaded machine), ratios to fwdbwd."""
    ref = results.get("fwdbwd", {})
    idle = results.get("idle", {}).get("rss_mib")
    print(f"\nB={B} at {CIFAR_CONFIG['sample_size']} px (min of {reps} after a warm-up; ratio = time / fwdbwd)")
    print(
        f"{'route':18s} {'wall s':>7s} {'ratio':>6s} {'cpu s':>7s} {'ratio':>6s} {'1st call':>8s} {'peak RSS MiB':>12s} {'over idle':>9s} {'load':>5s}  error"
    )
    for r in results.values():
        cells = []
        for key in ("seconds", "cpu_seconds"):
            s, s0 = r.get(key), ref.get(key)
            cells.append(f"{s:7.2f}" if s is not None else "      -")
            cells.append(f"{s / s0:6.2f}" if s and s0 else "     -")
        rss = r.get("rss_mib")
        over = f"{rss - idle:9.0f}" if rss and idle else "        -"
        first = r.get("first")
        print(
            f"{r['route']:18s} {' '.join(cells)} {first if first is not None else float('nan'):8.2f} "
            f"{rss or float('nan'):12.0f} {over} {r['load']:5.2f}  {r.get('error') or ''}"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="8,32", help="comma-separated batch sizes")
    ap.add_argument("--routes", default=",".join(ALL_ROUTES))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--root", default=None, help="existing pipeline dir (default: a fresh temp dir)")
    ap.add_argument("--json", default=None, help="append one JSON line per measurement here")
    ap.add_argument("--check", action="store_true", help="float64 agreement of the G v routes instead")
    ap.add_argument("--_child", nargs=3, metavar=("ROOT", "ROUTE", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        root, route, B = args._child
        print(json.dumps(run_one(root, route, int(B), args.reps)))
        return
    if args.check:
        check()
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or write_pipeline(os.path.join(tmp, "ddpm-cifar10-random"))
        unet, _ = load_unet(root)
        P = sum(p.numel() for p in unet.parameters())
        print(f"model: DDPM CIFAR-10 UNet2DModel, P={P:,}, random weights, from {root} ({sorted(os.listdir(root))})")
        print(
            f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
            f"torch threads in children: 1, load before: {os.getloadavg()}"
        )
        del unet
        for B in [int(b) for b in args.batch.split(",")]:
            results = {}
            for route in args.routes.split(","):
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--reps",
                    str(args.reps),
                    "--_child",
                    root,
                    route,
                    str(B),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                if proc.returncode != 0 or not lines:
                    results[route] = dict(
                        route=route,
                        B=B,
                        seconds=None,
                        rss_mib=None,
                        error=f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}",
                    )
                else:
                    results[route] = json.loads(lines[-1])
                results[route]["load"] = os.getloadavg()[0]
                if args.json:
                    with open(args.json, "a") as fh:
                        fh.write(json.dumps(results[route]) + "\n")
            print_table(results, B, args.reps)


if __name__ == "__main__":
    main()

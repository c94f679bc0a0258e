"""Per-sample gradients, mean gradient, directional derivatives and the random projection,
each against an independent reference (explicit loop, dense G, closed-form JL bound)."""

from __future__ import annotations

import pytest
import torch
from conftest import micro_unet

from geomprobe.diffusion import per_sample_loss
from geomprobe.errors import UsageError
from geomprobe.models import build_scheduler
from geomprobe.probe import (
    RandomProjection,
    directional_derivatives,
    mean_gradient,
    param_layout,
    per_sample_grads,
    select_parameters,
    true_fisher_target,
)


@pytest.fixture(scope="module")
def setup():
    unet = micro_unet()
    ac = build_scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(1)
    B = 6
    x0 = torch.rand(B, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(B, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 250, 500, 700, 999])  # every row its own t, as in a band
    y = torch.randint(0, 10, (B,), generator=g)
    return unet, ac, x0, noise, t, y


def loop_grads(unet, names, x0, noise, t, y, ac, target=None):
    """Reference: one ordinary backward pass per sample (B, P)."""
    params = dict(unet.named_parameters())
    rows = []
    for i in range(len(x0)):
        unet.zero_grad(set_to_none=True)
        tgt = None if target is None else target[i : i + 1]
        per_sample_loss(
            unet, x0[i : i + 1], noise[i : i + 1], t[i : i + 1], y[i : i + 1], ac, target=tgt
        ).sum().backward()
        rows.append(torch.cat([params[n].grad.reshape(-1) for n in names]))
    unet.zero_grad(set_to_none=True)
    return torch.stack(rows)


def rel_err(a, b):
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


@pytest.mark.parametrize("regex", [None, r"conv_in|class_embedding|up_blocks\.0\.resnets\.0\.norm1"])
@pytest.mark.parametrize("engine", ["vmap", "layerwise"])
def test_rows_equal_explicit_loop(setup, regex, engine):
    unet, ac, x0, noise, t, y = setup
    names = select_parameters(unet, regex)
    G = per_sample_grads(unet, names, x0, noise, t, y, ac, engine=engine)
    assert G.dtype == torch.float32 and G.shape == (len(x0), param_layout(unet, names).P)
    assert rel_err(G, loop_grads(unet, names, x0, noise, t, y, ac)) < 1e-5


@pytest.mark.parametrize("engine", ["vmap", "layerwise"])
def test_true_fisher_target_rows_equal_loop(setup, engine):
    unet, ac, x0, noise, t, y = setup
    names = select_parameters(unet)
    xi = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    target = true_fisher_target(unet, x0, noise, t, y, ac, xi)
    G = per_sample_grads(unet, names, x0, noise, t, y, ac, target=target, engine=engine)
    assert rel_err(G, loop_grads(unet, names, x0, noise, t, y, ac, target=target)) < 1e-5


def test_engines_agree_on_a_preset_and_losses():
    """small1 at 8 px (every module type of the presets): layerwise rows == vmap rows; losses equal."""
    from geomprobe.models import build_unet

    torch.manual_seed(0)
    unet = build_unet("small1", 8, 1, 10)
    ac = build_scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(5, 1, 8, 8, generator=g), torch.randn(5, 1, 8, 8, generator=g)
    t, y = torch.tensor([3, 200, 450, 800, 990]), torch.tensor([0, 9, 4, 4, 1])
    names = select_parameters(unet)
    Gv, lv = per_sample_grads(unet, names, x0, noise, t, y, ac, engine="vmap", return_losses=True)
    Gl, ll = per_sample_grads(unet, names, x0, noise, t, y, ac, engine="layerwise", return_losses=True, chunk_size=2)
    assert rel_err(Gl, Gv) < 1e-5
    torch.testing.assert_close(ll, lv, rtol=1e-5, atol=1e-6)


def test_chunking_and_losses(setup):
    unet, ac, x0, noise, t, y = setup
    names = select_parameters(unet)
    G1, l1 = per_sample_grads(unet, names, x0, noise, t, y, ac, chunk_size=1, return_losses=True)
    G4 = per_sample_grads(unet, names, x0, noise, t, y, ac, chunk_size=4)
    assert rel_err(G4, G1) < 1e-5
    with torch.no_grad():
        ref = per_sample_loss(unet, x0, noise, t, y, ac)
    torch.testing.assert_close(l1, ref, rtol=1e-5, atol=1e-6)


def test_mean_gradient_equals_mean_of_rows(setup):
    unet, ac, x0, noise, t, y = setup
    names = select_parameters(unet)
    G = per_sample_grads(unet, names, x0, noise, t, y, ac)
    mu = mean_gradient(unet, names, x0, noise, t, y, ac)
    assert mu.shape == (G.shape[1],)
    assert ((mu - G.mean(0)).norm() / G.mean(0).norm()).item() < 1e-5
    # the same mean from unequal batches, weighted by size
    batches = [(x0[:2], noise[:2], t[:2], y[:2]), (x0[2:], noise[2:], t[2:], y[2:])]
    mu2 = mean_gradient(unet, names, batches, alphas_cumprod=ac)
    assert ((mu2 - G.mean(0)).norm() / G.mean(0).norm()).item() < 1e-5


def test_directional_derivatives_equal_G_v(setup):
    unet, ac, x0, noise, t, y = setup
    names = select_parameters(unet, r"^(conv_in|conv_out|time_embedding)")
    G = per_sample_grads(unet, names, x0, noise, t, y, ac)
    v = torch.randn(G.shape[1], generator=torch.Generator().manual_seed(3))
    dots = directional_derivatives(unet, names, x0, noise, t, y, ac, v)
    ref = G.double() @ v.double()
    assert dots.shape == (len(x0),)
    assert ((dots.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
    with pytest.raises(UsageError):
        directional_derivatives(unet, names, x0, noise, t, y, ac, v[:-1])


def test_param_layout_round_trip(setup):
    unet = setup[0]
    names = select_parameters(unet, "conv")
    layout = param_layout(unet, names)
    params = dict(unet.named_parameters())
    flat = layout.flatten({n: params[n].detach() for n in names})
    assert flat.shape == (layout.P,)
    for n, tensor in layout.view(flat).items():
        assert torch.equal(tensor, params[n].detach())
    assert names == [n for n, _ in unet.named_parameters() if "conv" in n]


def test_select_parameters_errors(setup):
    unet = setup[0]
    with pytest.raises(UsageError, match="malformed"):
        select_parameters(unet, "(")
    with pytest.raises(UsageError, match="selects no parameter"):
        select_parameters(unet, "no_such_layer")


def test_projection_preserves_inner_products():
    """JL: for R (K, P) ~ N(0, 1/K), |<Ra, Rb> - <a, b>| <= c sqrt(2/K) ||a|| ||b|| w.h.p.; c = 4 here."""
    P, K = 3000, 400
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(12, P, generator=gen) + 0.3 * torch.randn(1, P, generator=gen)
    proj = RandomProjection(P, K, seed=7, block=1000)
    Z = proj.project(A)
    R = proj.matrix()
    torch.testing.assert_close(Z, A @ R.T, rtol=1e-4, atol=1e-4)
    exact, approx = A @ A.T, Z @ Z.T
    norms = A.norm(dim=1)
    bound = 4 * (2 / K) ** 0.5 * torch.outer(norms, norms)
    assert ((approx - exact).abs() <= bound).all()
    # seeded: the same R whatever the row batching
    torch.testing.assert_close(RandomProjection(P, K, seed=7, block=1000).project(A[:3]), Z[:3])
    with pytest.raises(UsageError):
        RandomProjection(P, P, seed=0)


def test_frozen_model_and_engine_fallback(setup):
    """A frozen model (requires_grad False) gives the same rows; 'auto' falls back to vmap when a
    module runs twice in one forward (the layerwise engine cannot attribute its gradient)."""
    unet, ac, x0, noise, t, y = setup
    names = select_parameters(unet, "conv_in|time_embedding")
    ref = per_sample_grads(unet, names, x0, noise, t, y, ac, engine="vmap")
    unet.requires_grad_(False)
    try:
        G = per_sample_grads(unet, names, x0, noise, t, y, ac, engine="layerwise")
    finally:
        unet.requires_grad_(True)
    assert rel_err(G, ref) < 1e-5
    assert all(p.requires_grad for p in unet.parameters())

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)
            self.config = type("C", (), {"num_class_embeds": None})()

        def forward(self, x, t):
            return type("O", (), {"sample": self.lin(self.lin(x))})()

    torch.manual_seed(0)
    model = Twice()
    xs, ns = torch.randn(4, 1, 1, 3), torch.randn(4, 1, 1, 3)
    ts, ys = torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    ac1 = torch.full((1,), 0.5)
    names = select_parameters(model)
    G_auto = per_sample_grads(model, names, xs, ns, ts, ys, ac1)
    G_vmap = per_sample_grads(model, names, xs, ns, ts, ys, ac1, engine="vmap")
    assert rel_err(G_auto, G_vmap) < 1e-6
    with pytest.raises(UsageError, match="layerwise"):
        per_sample_grads(model, names, xs, ns, ts, ys, ac1, engine="layerwise")


@pytest.mark.parametrize("engine", ["vmap", "layerwise"])
def test_attention_unet_rows_equal_loop(engine):
    """A UNet with attention blocks (as the cl preset): token-wise Linear layers in both engines."""
    unet = micro_unet(attention=True)
    ac = build_scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    t, y = torch.tensor([5, 500, 950]), torch.tensor([1, 2, 3])
    names = select_parameters(unet, "attentions|mid_block|conv_in")
    G = per_sample_grads(unet, names, x0, noise, t, y, ac, engine=engine)
    assert rel_err(G, loop_grads(unet, names, x0, noise, t, y, ac)) < 1e-5


@pytest.mark.parametrize(
    "cin,cout,kernel,stride,padding,dilation,groups,channels_last",
    [
        (1, 5, 3, 1, 1, 1, 1, False),
        (4, 1, 3, 1, 1, 1, 1, False),
        (3, 1, 3, 2, 1, 1, 1, False),
        (1, 4, 3, 2, 0, 1, 1, False),
        (2, 1, 3, 1, 2, 2, 1, False),
        (1, 3, (3, 2), (2, 1), (1, 0), (1, 2), 1, False),
        (3, 4, 3, 2, 1, 1, 1, False),
        (4, 6, 1, 1, 0, 1, 1, False),
        (1, 2, 2, 5, 0, 1, 1, False),
        (3, 1, 1, 3, 1, 1, 1, False),
        (4, 6, 3, 1, 1, 1, 2, False),
        (4, 1, 3, 1, 1, 1, 1, True),
    ],
)
def test_conv_weight_grads_every_route_equal_loop(cin, cout, kernel, stride, padding, dilation, groups, channels_last):
    """Each per-sample Conv2d route (correlation for Cin or Cout = 1, grouped weight gradient,
    1x1 bmm) against one autograd backward per sample, on odd sizes, strides (also larger than
    the kernel), dilations, groups and a channels-last input."""
    from geomprobe.probe.engines.layerwise import _module_grads

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups)
    x = torch.randn(5, cin, 9, 7)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    gout = torch.randn_like(conv(x))
    gw, gb = _module_grads(conv, x, gout, True, True)
    for b in range(len(x)):
        conv.zero_grad()
        (conv(x[b : b + 1]) * gout[b : b + 1]).sum().backward()
        torch.testing.assert_close(gw[b], conv.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gb[b], conv.bias.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_group_norm_grads_from_saved_stats_equal_loop(offset):
    """GroupNorm per-sample gradients from autograd's saved (mean, rstd) and from recomputation,
    against a float64 backward per sample (relative error < 1e-5). ``offset`` moves the input mean
    to 30 standard deviations: the saved-stats formula (sum g*x - mean * sum g) * rstd cancels
    there, as torch's own group-norm backward does (measured: 3.4e-6 saved stats, 1.4e-6
    recomputed, 3.3e-6 torch's float32 backward)."""
    from geomprobe.probe.engines.layerwise import _module_grads, _saved_group_norm_stats

    torch.manual_seed(0)
    gn = torch.nn.GroupNorm(2, 6)
    torch.nn.init.normal_(gn.weight)
    x = (torch.randn(4, 6, 5, 5) + offset).requires_grad_(True)
    out = gn(x)
    stats = _saved_group_norm_stats(out)
    assert stats is not None and stats[0].shape == (4, 2)
    gout = torch.randn_like(out)
    gn64 = torch.nn.GroupNorm(2, 6).double()
    gn64.load_state_dict(gn.state_dict())
    ref_w, ref_b = [], []
    for b in range(len(x)):
        gn64.zero_grad()
        (gn64(x[b : b + 1].detach().double()) * gout[b : b + 1].double()).sum().backward()
        ref_w.append(gn64.weight.grad.clone())
        ref_b.append(gn64.bias.grad.clone())
    ref_w, ref_b = torch.stack(ref_w), torch.stack(ref_b)
    for route_stats in (stats, None):
        gw, gb = _module_grads(gn, x.detach(), gout, True, True, route_stats)
        assert ((gw.double() - ref_w).norm() / ref_w.norm()).item() < 1e-5
        assert ((gb.double() - ref_b).norm() / ref_b.norm()).item() < 1e-6


def test_group_norm_grads_in_bfloat16_avoid_the_cancelling_formula():
    """In bfloat16 the saved-stats formula would round sum g*x before the mean term cancels
    (measured 7.7e-2 relative error at an input mean of 30 std); the engine recomputes x_hat
    there instead (2e-3). Reference: a float64 backward per sample; tolerance 1e-2."""
    from geomprobe.probe.engines.layerwise import _module_grads, _saved_group_norm_stats

    torch.manual_seed(0)
    gn = torch.nn.GroupNorm(2, 6)
    torch.nn.init.normal_(gn.weight)
    x = torch.randn(4, 6, 5, 5) + 30.0
    gout = torch.randn(4, 6, 5, 5)
    gn16 = torch.nn.GroupNorm(2, 6).bfloat16()
    gn16.load_state_dict(gn.state_dict())
    x16 = x.bfloat16().requires_grad_(True)
    stats = _saved_group_norm_stats(gn16(x16))
    gw, _ = _module_grads(gn16, x16.detach(), gout.bfloat16(), True, True, stats)
    gn64 = torch.nn.GroupNorm(2, 6).double()
    gn64.load_state_dict(gn.state_dict())
    ref = []
    for b in range(len(x)):
        gn64.zero_grad()
        (gn64(x16[b : b + 1].detach().double()) * gout[b : b + 1].bfloat16().double()).sum().backward()
        ref.append(gn64.weight.grad.clone())
    ref = torch.stack(ref)
    assert ((gw.double() - ref).norm() / ref.norm()).item() < 1e-2

"""Matrix-free products on an attention UNet (diffusers AttnDownBlock2D/AttnUpBlock2D), unconditional.

Two CPU kernel limits are worked around in geomprobe/probe/autodiff.py: the group-norm backward on
channels-last input (a SIGSEGV for gradients over a parameter subset after an attention block) and
flash attention's missing forward-mode derivative. Reference: per-sample gradients from the
per-sample engines (checked against an explicit loop elsewhere), F in float64; float32 tolerances.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from geomprobe.fisher import ImplicitFisher
from geomprobe.models import build_scheduler
from geomprobe.probe import ProbeBatch, directional_derivatives, mean_gradient, per_sample_grads, select_parameters
from tests.test_fisher import check_against_dense

SUBSET = r"^mid_block\.attentions\.0\.(group_norm|to_q\.bias|to_k\.bias|to_v\.bias)"

BUILD = """
import torch
from diffusers import UNet2DModel
torch.manual_seed(0)
unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                   norm_num_groups=8, attention_head_dim=8)
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def attention_probe():
    scope: dict = {}
    exec(BUILD, scope)  # the same model the subprocess test builds
    unet: UNet2DModel = scope["unet"]
    ac = build_scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(3)
    batches = [
        ProbeBatch(
            torch.randn(6, 1, 8, 8, generator=g),
            torch.randn(6, 1, 8, 8, generator=g),
            torch.tensor([50, 200, 400, 600, 800, 950]),
            torch.zeros(6, dtype=torch.long),
        )
    ]
    return unet, ac, batches


def test_subset_gradient_after_attention_does_not_crash():
    """The minimal model-level reproducer of the SIGSEGV, in a subprocess so a regression cannot kill pytest."""
    code = BUILD + textwrap.dedent("""
        from geomprobe.models import build_scheduler
        from geomprobe.probe import mean_gradient, select_parameters
        names = select_parameters(unet, r"^(mid_block|up_blocks\\.0)")
        x = torch.randn(2, 1, 8, 8)
        mu = mean_gradient(unet, names, x, torch.randn(2, 1, 8, 8), torch.tensor([100, 700]), torch.zeros(2, dtype=torch.long),
                           build_scheduler().alphas_cumprod)
        print(float(mu.norm()))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr[-500:]}"
    assert float(res.stdout.strip()) > 0


def test_mean_and_directional_derivatives_match_per_sample_rows(attention_probe):
    unet, ac, (b,) = attention_probe
    names = select_parameters(unet, r"^(mid_block|up_blocks\.0)")
    G = per_sample_grads(unet, names, b.x0, b.noise, b.t, b.y, ac).double()
    mu = mean_gradient(unet, names, b.x0, b.noise, b.t, b.y, ac).double()
    torch.testing.assert_close(mu, G.mean(0), rtol=1e-4, atol=1e-6 * G.abs().max().item())
    v = torch.randn(G.shape[1], generator=torch.Generator().manual_seed(0))
    dots = directional_derivatives(unet, names, b.x0, b.noise, b.t, b.y, ac, v).double()
    torch.testing.assert_close(dots, G @ v.double(), rtol=1e-4, atol=1e-5 * (G @ v.double()).abs().max().item())


def test_implicit_fisher_of_an_attention_unet_matches_its_dense_reference(attention_probe):
    unet, ac, batches = attention_probe
    names = select_parameters(unet, SUBSET)
    b = batches[0]
    G = per_sample_grads(unet, names, b.x0, b.noise, b.t, b.y, ac).double().numpy()
    assert G.shape[1] < 400
    fisher = ImplicitFisher.from_model(unet, names, batches, ac)
    check_against_dense(fisher, G.T @ G / G.shape[0], rtol=2e-4, eig_rtol=1e-3, vec_atol=1e-2, dense=False)
    assert np.isfinite(fisher.to_rank1().c_star)


@pytest.mark.parametrize(
    "budget, second_passes", [(2**30, 0), (0, 2), ("one batch", 1)]
)  # records kept for all, none, the first batch only
@pytest.mark.parametrize("conditional", [False, True])
def test_mean_and_projections_equal_the_rows_mean_and_products(budget, second_passes, conditional, monkeypatch):
    """mu and all mu^T g_i from one pass (layer records reused) == a float64 explicit per-sample loop.

    The batches whose records exceed the budget take a second pass (counted); frozen parameters
    (the down blocks here) are differentiated and frozen again.
    """
    from conftest import micro_unet

    from geomprobe.diffusion import per_sample_loss
    from geomprobe.probe import mean_and_projections, products
    from geomprobe.probe.engines.layerwise import layer_records, layerwise_owners
    from geomprobe.probe.losses import probe_inputs

    unet = micro_unet(num_classes=3 if conditional else None, attention=True)
    ac = build_scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(5)
    batches = [
        ProbeBatch(
            torch.randn(b, 1, 8, 8, generator=g),
            torch.randn(b, 1, 8, 8, generator=g),
            torch.randint(0, 1000, (b,), generator=g),
            torch.randint(0, 3, (b,), generator=g),
        )
        for b in (3, 4)
    ]
    names = select_parameters(unet)  # all parameters, then the down blocks frozen
    for p in unet.down_blocks.parameters():
        p.requires_grad_(False)
    calls = []
    second_pass = products.directional_derivatives
    monkeypatch.setattr(products, "directional_derivatives", lambda *a, **k: calls.append(1) or second_pass(*a, **k))
    if budget == "one batch":
        b0 = batches[0]
        owners = layerwise_owners(unet, names)
        budget = layer_records(unet, owners, probe_inputs(unet, b0.x0, b0.noise, b0.t, b0.y, ac))[1].nbytes()
    mu, dots = mean_and_projections(unet, names, batches, ac, budget)
    assert len(calls) == second_passes
    assert [p.requires_grad for p in unet.down_blocks.parameters()] == [False] * len(
        list(unet.down_blocks.parameters())
    )

    unet64 = micro_unet(num_classes=3 if conditional else None, attention=True).double()
    params = dict(unet64.named_parameters())
    rows = []
    for b in batches:
        for i in range(len(b)):
            unet64.zero_grad(set_to_none=True)
            s = slice(i, i + 1)
            per_sample_loss(unet64, b.x0[s].double(), b.noise[s].double(), b.t[s], b.y[s], ac.double()).sum().backward()
            rows.append(torch.cat([params[n].grad.reshape(-1) for n in names]))
    G = torch.stack(rows)
    ref_mu = G.mean(0)
    torch.testing.assert_close(mu.double(), ref_mu, rtol=1e-4, atol=1e-5 * ref_mu.abs().max().item())
    ref_dots = G @ ref_mu
    torch.testing.assert_close(dots.double(), ref_dots, rtol=1e-4, atol=1e-5 * ref_dots.abs().max().item())
    assert all(p.requires_grad for p in unet.up_blocks.parameters())

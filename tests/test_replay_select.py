"""Replay selection rules (issue 13): each rule picks what it says on constructed data.

References: hand-chosen energies/features whose answers are written out; the pre-``--replay-select``
replay code (one randperm per class), copied here, for the default rule.
"""

from __future__ import annotations

import types

import pytest
import torch

from geomprobe.continual.config import ContinualConfig
from geomprobe.continual.replay import replay_pool_real, select_exemplars
from geomprobe.data import ImageDataset
from geomprobe.energy import sample_energy
from geomprobe.errors import UsageError
from geomprobe.models import build_scheduler

# class 0: rows 0..5, class 1: rows 6..9 (interleaved below to check row bookkeeping)
LABELS = torch.tensor([0, 1, 0, 0, 1, 0, 1, 0, 1, 0])
ENERGY = torch.tensor([5.0, 1.0, 3.0, 9.0, 4.0, 1.0, 2.0, 7.0, 8.0, 0.5])
# class 0 rows and energies: 0:5, 2:3, 3:9, 5:1, 7:7, 9:0.5 -> ascending 9, 5, 2, 0, 7, 3
# class 1 rows and energies: 1:1, 4:4, 6:2, 8:8 -> ascending 1, 6, 4, 8


def test_energy_rules_pick_by_energy():
    pick = lambda rule, k: select_exemplars(rule, LABELS, [0, 1], k, energy=ENERGY).tolist()  # noqa: E731
    assert pick("high-energy", 2) == [3, 7, 8, 4]
    assert pick("low-energy", 2) == [9, 5, 1, 6]
    # stratified: the middle row of each of k equal energy-quantile bins
    assert pick("stratified", 3) == [5, 0, 3, 1, 4, 8]  # class 0 sorted positions 1, 3, 5; class 1: 0, 2, 3
    assert pick("stratified", 2) == [5, 7, 6, 8]  # positions 1, 4 of 6; 1, 3 of 4
    assert pick("high-energy", 10) == [3, 7, 0, 2, 5, 9, 8, 4, 6, 1]  # budget above the class: all rows
    assert select_exemplars("high-energy", LABELS, [1], 1, energy=ENERGY).tolist() == [8]


def test_stratified_spreads_over_quantiles():
    labels = torch.zeros(100, dtype=torch.long)
    energy = torch.randperm(100, generator=torch.Generator().manual_seed(0)).double()
    rows = select_exemplars("stratified", labels, [0], 5, energy=energy)
    assert sorted(energy[rows].tolist()) == [10.0, 30.0, 50.0, 70.0, 90.0]  # one per quintile, at its middle


def test_similarity_picks_nearest_to_class_mean():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    feats = torch.tensor([[0.0, 0.0], [4.0, 0.0], [1.0, 1.0], [3.0, -1.0], [10.0, 10.0], [12.0, 10.0], [20.0, 10.0]])
    # class 0 mean (2, 0): distances^2 4, 4, 2, 2 -> rows 2, 3 (ties by row); class 1 mean (14, 10): row 5
    assert select_exemplars("similarity", labels, [0, 1], 2, features=feats).tolist() == [2, 3, 5, 4]
    assert select_exemplars("similarity", labels, [1], 1, features=feats).tolist() == [5]


def test_random_rule_is_the_old_replay_draw_for_draw():
    labels = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(11)
    old = torch.cat(
        [
            torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()), generator=gen)[:7]]
            for c in (1, 3)
        ]
    )
    new = select_exemplars("random", labels, [1, 3], 7, torch.Generator().manual_seed(11))
    assert torch.equal(old, new)


def test_selection_bad_input():
    with pytest.raises(UsageError, match="unknown --replay-select 'newest'"):
        select_exemplars("newest", LABELS, [0], 2, energy=ENERGY)
    with pytest.raises(UsageError, match="needs energies"):
        select_exemplars("high-energy", LABELS, [0], 2)
    with pytest.raises(UsageError, match="needs features"):
        select_exemplars("similarity", LABELS, [0], 2)
    with pytest.raises(UsageError, match="another dataset"):
        select_exemplars("low-energy", LABELS, [0], 2, energy=ENERGY[:5])


def test_config_replay_select():
    assert ContinualConfig().replay_select == "random"
    with pytest.raises(UsageError, match="unknown --replay-select"):
        ContinualConfig(replay="real", replay_select="oldest").validate()
    with pytest.raises(UsageError, match="needs --replay real"):
        ContinualConfig(replay="generative", replay_select="high-energy").validate()
    assert ContinualConfig(replay="real").strategy == "replay-real"
    assert ContinualConfig(replay="real", replay_select="high-energy").strategy == "replay-real-high-energy"


def _dataset(n=24):
    g = torch.Generator().manual_seed(5)
    return ImageDataset("toy", "train", torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.arange(n) % 3, 3)


def test_real_pool_random_unchanged_and_high_energy_uses_the_model(tiny_unet, one_thread):
    train = _dataset()
    x, y = replay_pool_real(train, [0, 2], 3, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    ref = [
        train.batch(torch.nonzero(train.labels == c).flatten()[torch.randperm(8, generator=gen)[:3]]) for c in (0, 2)
    ]
    assert torch.equal(x, torch.cat([r[0] for r in ref])) and torch.equal(y, torch.cat([r[1] for r in ref]))

    sched = build_scheduler()
    x, y = replay_pool_real(train, [0, 2], 3, torch.Generator().manual_seed(1), "high-energy", tiny_unet, sched)
    rows = torch.nonzero(torch.isin(train.labels, torch.tensor([0, 2]))).flatten()
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(1)))
    xa, ya = train.batch(rows)
    energy, _ = sample_energy(tiny_unet, xa, ya, sched.alphas_cumprod, seed=seed, sample_index=rows.numpy())
    expected = [rows[ya == c][torch.argsort(energy[ya == c], descending=True)[:3]] for c in (0, 2)]
    assert torch.equal(x, train.batch(torch.cat(expected))[0])
    assert y.tolist() == [0, 0, 0, 2, 2, 2]
    with pytest.raises(UsageError, match="previous task's model"):
        replay_pool_real(train, [0], 3, torch.Generator(), "low-energy")


# ---------------------------------------------------------------- compact replay (PCA codes)


def test_pca_code_round_trip_is_the_projection_and_bytes_are_counted():
    from geomprobe.continual.compact import PCACode, compact_pool

    g = torch.Generator().manual_seed(2)
    fit = torch.rand(40, 1, 4, 4, generator=g) * 2 - 1
    x = torch.rand(6, 1, 4, 4, generator=g) * 2 - 1
    pool = compact_pool(fit, x, torch.arange(6), budget_bytes=22)  # k = 22 // 4 = 5
    code = pool.code
    assert code.k == 5 and code.code_bytes == 20
    # reference: projection onto the top-5 right singular vectors of the centred fit data (numpy, float64)
    import numpy as np

    f = fit.flatten(1).double().numpy()
    mu = f.mean(0)
    v = np.linalg.svd(f - mu, full_matrices=False)[2][:5]
    proj = mu + ((x.flatten(1).double().numpy() - mu) @ v.T) @ v
    np.testing.assert_allclose(code.decode(code.encode(x)).flatten(1).numpy(), proj, atol=1e-5)
    # memory accounting = the bytes actually stored
    assert pool.codes.shape == (6, 5) and pool.codes.dtype == torch.float32
    assert pool.stored_bytes == 6 * code.code_bytes == pool.codes.untyped_storage().nbytes()
    assert code.basis_bytes == code.mean.untyped_storage().nbytes() + code.components.untyped_storage().nbytes()
    assert pool.images().min() >= -1 and pool.images().max() <= 1
    full = PCACode.fit(fit, 16)  # k = D: lossless
    torch.testing.assert_close(full.decode(full.encode(x)), x, atol=1e-5, rtol=0)


def test_compact_bad_input_and_config():
    from geomprobe.continual.compact import compact_pool

    x = torch.zeros(4, 1, 2, 2)
    with pytest.raises(UsageError, match="smaller than one code"):
        compact_pool(x, x, torch.zeros(4), budget_bytes=3)
    with pytest.raises(UsageError, match="unknown --code"):
        compact_pool(x, x, torch.zeros(4), budget_bytes=8, code="jpeg")
    with pytest.raises(UsageError, match="smaller than one code"):
        ContinualConfig(replay="compact").validate()
    with pytest.raises(UsageError, match="unknown --code"):
        ContinualConfig(replay="compact", budget_bytes=64, replay_code="vae").validate()
    cfg = ContinualConfig(replay="compact", budget_bytes=64)
    cfg.validate()
    assert cfg.strategy == "replay-compact-pca64B"


def test_compact_replay_pool(tiny_unet):
    from geomprobe.continual.compact import compact_pool
    from geomprobe.continual.replay import replay_pool

    train = _dataset()
    cfg = ContinualConfig(replay="compact", budget_bytes=12, replay_per_class=2, image_size=8)
    x, y = replay_pool(cfg, train, tiny_unet, build_scheduler(), [0, 1], torch.Generator().manual_seed(4))
    ex, ey = replay_pool_real(train, [0, 1], 2, torch.Generator().manual_seed(4))
    fit = train.batch(torch.nonzero(train.labels < 2).flatten())[0]
    assert torch.equal(y, ey)
    torch.testing.assert_close(x, compact_pool(fit, ex, ey, 12).images())


# ---------------------------------------------------------------- compact replay (thumbnails, UNet decoder)


def test_lowres_code_is_the_block_mean_quantised_and_bytes_are_counted():
    import numpy as np

    from geomprobe.continual.compact import LowResCode, compact_pool

    g = torch.Generator().manual_seed(3)
    x = torch.rand(5, 2, 8, 8, generator=g) * 2 - 1
    pool = compact_pool(x[:0], x, torch.arange(5), budget_bytes=40, code="lowres")  # r = isqrt(40 // 2) = 4
    code = pool.code
    assert code.side == 4 and code.code_bytes == 2 * 16 and code.basis_bytes == 0
    # reference: numpy mean over 2x2 blocks, mapped to 0..255 and rounded
    blocks = x.double().numpy().reshape(5, 2, 4, 2, 4, 2).mean(axis=(3, 5))
    np.testing.assert_array_equal(pool.codes.numpy(), np.round((blocks + 1) * 127.5).astype(np.uint8))
    assert pool.codes.dtype == torch.uint8 and pool.stored_bytes == 5 * code.code_bytes
    assert pool.stored_bytes == pool.codes.untyped_storage().nbytes()
    # a full-size thumbnail decodes to the image, up to the uint8 step (1/127.5)
    full = LowResCode.for_budget(10**6, (2, 8, 8))
    assert full.side == 8
    torch.testing.assert_close(full.decode(full.encode(x)), x, atol=0.5 / 127.5 + 1e-6, rtol=0)
    with pytest.raises(UsageError, match="smaller than one code"):
        compact_pool(x, x, torch.zeros(5), budget_bytes=1, code="lowres")
    with pytest.raises(UsageError, match=r"smaller than one code \(lowres-unet: 3 bytes"):
        ContinualConfig(dataset="cifar10", replay="compact", replay_code="lowres-unet", budget_bytes=2).validate()


class _PointMassDenoiser(torch.nn.Module):
    """The exact noise predictor when all data is the one image ``a``: eps = (x_t - sqrt(abar) a) / sqrt(1 - abar)."""

    def __init__(self, a: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.a, self.ac = a, alphas_cumprod
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = types.SimpleNamespace(sample_size=a.shape[-1], in_channels=a.shape[0], num_class_embeds=None)

    def forward(self, x_t, t, **_):
        abar = self.ac[t].view(-1, 1, 1, 1)
        return types.SimpleNamespace(sample=(x_t - abar.sqrt() * self.a) / (1 - abar).sqrt())


@pytest.mark.parametrize("t_start", [100, 300, 999])
def test_ddim_refine_lands_on_the_data_under_the_exact_denoiser(t_start):
    # closed form: with the exact eps of a point mass at a, every DDIM step predicts x0 = a, so any start ends at a
    from geomprobe.diffusion import ddim_refine, ddim_sample

    sched = build_scheduler()
    a = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    oracle = _PointMassDenoiser(a, sched.alphas_cumprod)
    start = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = ddim_refine(oracle, sched, start, torch.zeros(3, dtype=torch.long), t_start, 20, torch.Generator())
    torch.testing.assert_close(out, a.expand(3, -1, -1, -1), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        ddim_sample(oracle, sched, torch.zeros(2), 20), a.expand(2, -1, -1, -1), atol=1e-4, rtol=0
    )


def test_lowres_unet_replay_pool_is_the_thumbnail_refined_by_the_model(tiny_unet):
    from geomprobe.continual.compact import UNET_DECODE_T, compact_pool
    from geomprobe.continual.replay import replay_pool
    from geomprobe.diffusion import ddim_refine

    train, sched = _dataset(), build_scheduler()
    cfg = ContinualConfig(replay="compact", replay_code="lowres-unet", budget_bytes=16, replay_per_class=2)
    cfg.image_size, cfg.sample_steps = 8, 10
    x, y = replay_pool(cfg, train, tiny_unet, sched, [0, 1], torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    ex, ey = replay_pool_real(train, [0, 1], 2, g)
    thumbs = compact_pool(ex[:0], ex, ey, 16, "lowres").images()
    assert torch.equal(y, ey) and thumbs.shape == x.shape
    torch.testing.assert_close(x, ddim_refine(tiny_unet, sched, thumbs, ey, UNET_DECODE_T, 10, g))
    assert not torch.allclose(x, thumbs, atol=1e-3)  # the model changed the upsampled thumbnail


def test_ddim_refine_starts_at_the_first_ddim_timestep_below_t_start():
    # the first model call sees x_t0 = sqrt(abar_t0) x0 + sqrt(1 - abar_t0) eps at t0 = the largest DDIM t <= t_start
    from geomprobe.diffusion import add_noise, ddim_refine

    sched = build_scheduler()
    calls = []

    class Recorder(_PointMassDenoiser):
        def forward(self, x_t, t, **kw):
            calls.append((x_t.clone(), t.clone()))
            return super().forward(x_t, t, **kw)

    x0 = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    oracle = Recorder(torch.zeros(1, 4, 4), sched.alphas_cumprod)
    ddim_refine(oracle, sched, x0, torch.zeros(2, dtype=torch.long), 300, 30, torch.Generator().manual_seed(9))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    t0 = 297  # 30 DDIM steps of 1000: 0, 33, ..., 297, 330, ... (leading spacing)
    assert calls[0][1].tolist() == [t0, t0] and len(calls) == 10
    torch.testing.assert_close(calls[0][0], add_noise(x0, eps, torch.tensor([t0, t0]), sched.alphas_cumprod))

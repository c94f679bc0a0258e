"""Per-sample energy (seed 004): closed forms, a modern Hopfield network, Spearman + bootstrap, file, CLI.

References: the closed-form loss of a linear denoiser eps_hat = x_t / sqrt(1 - a_t) (noise-free:
1/2 a_t / (1 - a_t) ||x0||^2); a modern Hopfield network written here; scipy.stats.spearmanr.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats
import torch
from scipy.special import logsumexp
from typer.testing import CliRunner

from geomprobe.energy import (
    DEFAULT_ENERGY_T,
    EnergyResult,
    read_energy,
    sample_energy,
    spearman,
    spearman_interval,
    write_energy,
)
from geomprobe.errors import DataError, UsageError
from geomprobe.models import build_scheduler


class _Out:
    def __init__(self, sample):
        self.sample = sample


class LinearDenoiser(torch.nn.Module):
    """eps_hat(x_t, t) = c_t x_t; no config, so labels are ignored (``conditioning`` gives {})."""

    def __init__(self, coef: torch.Tensor):
        super().__init__()
        self.coef = torch.nn.Parameter(coef.clone(), requires_grad=False)

    def forward(self, x, t):
        return _Out(self.coef[t].view(-1, 1, 1, 1) * x)


def test_linear_denoiser_energy_equals_closed_form():
    sched = build_scheduler()
    a = sched.alphas_cumprod.double()
    # c_t = 1/sqrt(1 - a_t): eps_hat = sqrt(a_t/(1-a_t)) x0 + eps, so the loss is 1/2 a_t/(1-a_t) ||x0||^2
    model = LinearDenoiser((1.0 / (1.0 - a).sqrt()).float())
    x0 = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    energy, per_t = sample_energy(model, x0, None, sched.alphas_cumprod, draws=3, seed=7)
    ts = torch.tensor(DEFAULT_ENERGY_T)
    expected = 0.5 * (a[ts] / (1 - a[ts]))[None, :] * x0.double().pow(2).flatten(1).sum(1)[:, None]
    assert per_t.shape == (5, len(DEFAULT_ENERGY_T))
    torch.testing.assert_close(per_t.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(energy.double(), expected.mean(1), rtol=1e-4, atol=1e-4)


def test_energy_noise_is_standard_and_independent_of_batching():
    sched = build_scheduler()
    model = LinearDenoiser(torch.zeros(1000))  # eps_hat = 0: loss = 1/2 ||eps||^2, mean D/2
    x0 = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    idx = np.arange(100, 164)
    e, per_t = sample_energy(model, x0, None, sched.alphas_cumprod, draws=8, seed=3, sample_index=idx)
    assert abs(float(per_t.mean()) - 8.0) < 0.3  # D = 16: E = 8, se ~ 0.07
    e_small, _ = sample_energy(
        model, x0[5:9], None, sched.alphas_cumprod, draws=8, seed=3, sample_index=idx[5:9], batch_size=8
    )
    torch.testing.assert_close(e_small, e[5:9])
    e_other, _ = sample_energy(model, x0, None, sched.alphas_cumprod, draws=8, seed=4, sample_index=idx)
    assert not torch.allclose(e_other, e)


def test_energy_bad_input():
    sched = build_scheduler()
    model = LinearDenoiser(torch.zeros(1000))
    x0 = torch.zeros(2, 1, 4, 4)
    with pytest.raises(UsageError, match="outside"):
        sample_energy(model, x0, None, sched.alphas_cumprod, timesteps=[1000])
    with pytest.raises(UsageError, match="draw"):
        sample_energy(model, x0, None, sched.alphas_cumprod, draws=0)


# ---------------------------------------------------------------- modern Hopfield network (seed 004)

D, BETA, R = 32, 2.0, 2.0


def _hopfield_energy(X: np.ndarray, xi: np.ndarray) -> float:
    """E(xi) = -1/beta log sum_i exp(beta x_i^T xi) + 1/2 ||xi||^2."""
    return float(-logsumexp(BETA * X @ xi) / BETA + 0.5 * xi @ xi)


def _sphere(z: np.ndarray) -> np.ndarray:
    return R * z / np.linalg.norm(z, axis=1, keepdims=True)


def _hopfield_task_change(seed: int = 0):
    """Two clusters (20 each) and 4 outliers stored; then each memory slot is partly overwritten by a
    second task's pattern (fixed capacity: x_j <- normalise((1 - a) x_j + a p_j), a = 0.3).
    Returns (kind: 0 cluster / 1 outlier, energy before, energy after) of the first task's patterns."""
    rng = np.random.default_rng(seed)
    e = np.eye(D)
    clusters = [_sphere(e[k] + 0.15 * rng.standard_normal((20, D))) for k in (0, 1)]
    outliers = _sphere(rng.standard_normal((4, D)))
    X1 = np.vstack([*clusters, outliers])
    kind = np.array([0] * 40 + [1] * 4)
    P = _sphere(e[2] + 0.5 * rng.standard_normal((len(X1), D)))
    X2 = _sphere(0.7 * X1 + 0.3 * P)
    before = np.array([_hopfield_energy(X1, x) for x in X1])
    after = np.array([_hopfield_energy(X2, x) for x in X1])
    return kind, before, after


def test_hopfield_outliers_have_high_energy_and_forget_more():
    kind, before, after = _hopfield_task_change()
    rise = after - before
    assert before[kind == 1].min() > before[kind == 0].max()  # outliers are the high-energy memories
    assert (rise > 0).all()  # intrinsic forgetting: every memory's energy rises
    assert rise[kind == 1].mean() > rise[kind == 0].mean()  # ... outliers' more (seed 004's theorem)
    rho = spearman(before, rise)
    assert rho == pytest.approx(scipy.stats.spearmanr(before, rise).statistic, abs=1e-12)
    assert rho > 0
    rho2, lo, hi = spearman_interval(before, rise, replicates=300, seed=1)
    assert rho2 == rho and lo <= rho <= hi and lo < hi
    # the bootstrap replicates are scipy's rho of resampled pairs, drawn from the documented stream
    rng = np.random.default_rng(np.random.SeedSequence([1, 0x5BE]))
    reps = []
    for _ in range(300):
        pick = rng.integers(0, len(before), len(before))
        reps.append(scipy.stats.spearmanr(before[pick], rise[pick]).statistic)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(reps, [0.025, 0.975])), abs=1e-12)
    assert spearman_interval(before, rise, replicates=300, seed=1) == (rho2, lo, hi)  # seeded


def test_spearman_bad_input():
    assert np.isnan(spearman([1, 2], [2, 1]))
    with pytest.raises(UsageError, match="against"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(UsageError, match="level"):
        spearman_interval([1, 2, 3], [1, 2, 3], level=1.5)


# ---------------------------------------------------------------- file and CLI


def _result(checksum="abc"):
    return EnergyResult(
        sample_index=np.array([3, 5, 9]),
        labels=np.array([0, 1, 1]),
        energy=np.array([1.0, 2.0, 4.0], dtype=np.float32),
        per_t=np.ones((3, 2), dtype=np.float32),
        timesteps=np.array([50, 150]),
        attrs={"checkpoint": checksum, "draws": 4, "seed": 0},
    )


def test_energy_file_round_trip_and_checkpoint_check(tmp_path):
    path = write_energy(tmp_path / "e.h5", _result())
    back = read_energy(path, checksum="abc")
    np.testing.assert_array_equal(back.sample_index, [3, 5, 9])
    np.testing.assert_array_equal(back.energy, [1.0, 2.0, 4.0])
    assert back.attrs["draws"] == 4
    summary = back.class_summary()
    assert [r["label"] for r in summary] == [0, 1] and summary[1]["mean"] == 3.0
    with pytest.raises(DataError, match="checkpoint abc, not of this model"):
        read_energy(path, checksum="other")
    with pytest.raises(DataError, match="not an energy file"):
        read_energy(tmp_path / "missing.h5")


def test_energy_cli(tmp_path, tiny_unet, one_thread):
    from geomprobe.checkpoints import ModelInfo, checkpoint_checksum, save_checkpoint
    from geomprobe.cli import app

    ck = tmp_path / "ck"
    save_checkpoint(ck, tiny_unet, build_scheduler(), ModelInfo("small1", "digits", 8, 1, 10, seed=0, step=1))
    out = tmp_path / "energy.h5"
    args = ["energy", "--ckpt", str(ck), "--classes", "0,1", "--t", "100,500", "--draws", "1", "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--alignment-t", "300", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    back = read_energy(out, checksum=checkpoint_checksum(ck))
    doc = json.loads(res.stdout)
    assert sorted(back.alignment) == [300] and doc["alignment"][0]["t"] == 300
    assert doc["alignment"][0]["spearman"] == pytest.approx(spearman(back.energy, back.alignment[300]), abs=1e-12)
    assert set(back.labels.tolist()) == {0, 1} and back.per_t.shape == (len(back.energy), 2)
    np.testing.assert_allclose(back.energy, back.per_t.mean(1), rtol=1e-6)
    bad = CliRunner().invoke(app, ["energy", "--ckpt", str(ck), "--t", "5000", "--out", str(out)])
    assert bad.exit_code != 0 and "outside" in bad.output and "Traceback" not in bad.output


def test_forgetting_figures(tmp_path):
    import h5py

    from geomprobe.figures import make_figures
    from geomprobe.io import write_jsonl

    seed_dir = tmp_path / "run" / "seed-0"
    seed_dir.mkdir(parents=True)
    kind, before, after = _hopfield_task_change()
    with h5py.File(seed_dir / "energy-task1.h5", "w") as f:
        f["energy_before"], f["energy_after"], f["labels"] = before, after, kind
    rho, lo, hi = spearman_interval(before, after - before, replicates=50)
    row = {"seed": 0, "strategy": "replay-real", "after_task": 1, "spearman": rho, "spearman_ci": [lo, hi]}
    write_jsonl(seed_dir / "intrinsic_forgetting.jsonl", [row])
    report = make_figures([tmp_path / "run"], tmp_path / "fig")
    made = {f.name for f in report.made}
    assert {"fig_energy_correlation", "fig_energy_forgetting"} <= made
    assert (tmp_path / "fig" / "fig_energy_forgetting.png").is_file()


def test_gradient_alignment_matches_autograd_loop(tiny_unet, one_thread):
    from geomprobe.diffusion import per_sample_loss
    from geomprobe.energy import gradient_alignment
    from geomprobe.io import derived_seed, torch_generator

    sched = build_scheduler()
    x0 = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = torch.tensor([0, 1, 2, 3])
    cos = gradient_alignment(
        tiny_unet, x0, y, sched.alphas_cumprod, timesteps=[300], seed=5, sample_index=[7, 8, 9, 10]
    )
    grads = []
    for i, row in enumerate([7, 8, 9, 10]):  # reference: one backward per sample, float64 cosine
        noise = torch.randn((1, 8, 8), generator=torch_generator(derived_seed(5, 0xC05, row, 300)))[None]
        tiny_unet.zero_grad()
        per_sample_loss(
            tiny_unet, x0[i : i + 1], noise, torch.tensor([300]), y[i : i + 1], sched.alphas_cumprod
        ).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in tiny_unet.parameters()]).double())
    g = torch.stack(grads)
    mu = g.mean(0)
    expected = ((g @ mu).abs() / (g.norm(dim=1) * mu.norm())).numpy()
    np.testing.assert_allclose(cos[300], expected, rtol=1e-4)

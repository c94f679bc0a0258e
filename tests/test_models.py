"""Presets, checkpoints (bitwise round-trip, diffusers-loadable, no pickle) and the DDPM loss."""

import json

import pytest
import torch
from diffusers import UNet2DModel

from geomprobe.checkpoints import ModelInfo, load_checkpoint, save_checkpoint
from geomprobe.diffusion import add_noise, ddim_sample, per_sample_loss
from geomprobe.errors import DataError, UsageError
from geomprobe.models import build_scheduler, build_unet, count_parameters, resolve_device


def test_preset_sizes_match_design():
    # docs/design.md §10: Small-3 at 16 px has 95,873 parameters.
    assert count_parameters(build_unet("small3", 16, 1, 10)) == 95873
    assert count_parameters(build_unet("small1", 16, 1, 10)) < count_parameters(build_unet("base", 16, 1, 10))


def test_unknown_preset_and_bad_size():
    with pytest.raises(UsageError, match="unknown model preset"):
        build_unet("huge", 16, 1, 10)
    with pytest.raises(UsageError, match="divisible"):
        build_unet("small3", 10, 1, 10)
    with pytest.raises(UsageError):
        resolve_device("tpu")


def test_checkpoint_round_trip_bitwise(tmp_path, tiny_unet):
    info = ModelInfo("small1", "digits", 8, 1, 10, seed=3, step=7)
    save_checkpoint(tmp_path / "ck", tiny_unet, build_scheduler(), info)
    loaded = load_checkpoint(tmp_path / "ck")
    a, b = tiny_unet.state_dict(), loaded.unet.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert loaded.info.seed == 3 and loaded.info.step == 7
    # plain diffusers loads it too
    plain = UNet2DModel.from_pretrained(tmp_path / "ck" / "unet")
    assert torch.equal(plain.state_dict()["conv_in.weight"], a["conv_in.weight"])
    # no pickle anywhere in the checkpoint
    files = sorted(p.name for p in (tmp_path / "ck").rglob("*") if p.is_file())
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for f in files), files
    json.loads((tmp_path / "ck" / "geomprobe.json").read_text())


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a geomprobe checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_add_noise_matches_diffusers():
    sched = build_scheduler()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(
        add_noise(x0, eps, t, sched.alphas_cumprod), sched.add_noise(x0, eps, t), rtol=1e-5, atol=1e-6
    )


def test_per_sample_loss_equals_explicit_computation(tiny_unet):
    """Reference: an explicit per-sample loop of 1/2 * sum over pixels of (eps - eps_hat)^2."""
    sched = build_scheduler()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    t, y = torch.tensor([5, 400, 900]), torch.tensor([0, 4, 9])
    ours = per_sample_loss(tiny_unet, x0, eps, t, y, sched.alphas_cumprod).detach()
    for i in range(3):
        ab = float(sched.alphas_cumprod[t[i]])
        xt = ab**0.5 * x0[i : i + 1] + (1 - ab) ** 0.5 * eps[i : i + 1]
        with torch.no_grad():
            eps_hat = tiny_unet(xt, t[i : i + 1], class_labels=y[i : i + 1]).sample
        ref = 0.5 * float(((eps[i : i + 1] - eps_hat) ** 2).sum())
        assert float(ours[i]) == pytest.approx(ref, rel=1e-5)


def test_ddim_sample_shape_range_and_determinism(tiny_unet):
    sched = build_scheduler()
    labels = torch.tensor([0, 1, 2])
    a = ddim_sample(tiny_unet, sched, labels, num_inference_steps=5, generator=torch.Generator().manual_seed(0))
    b = ddim_sample(tiny_unet, sched, labels, num_inference_steps=5, generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, 1, 8, 8) and float(a.abs().max()) <= 1.0
    assert torch.equal(a, b)


def test_interrupted_checkpoint_write_recovers(tmp_path, tiny_unet):
    """A staging area without its COMPLETE marker is discarded; with it, it is rolled forward."""
    sched = build_scheduler()
    save_checkpoint(tmp_path / "ck", tiny_unet, sched, ModelInfo("small1", "digits", 8, 1, 10, seed=0, step=1))
    (tmp_path / "ck" / "train_log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    # uncommitted staging (crash mid-write): ignored
    (tmp_path / "ck" / ".staging").mkdir()
    (tmp_path / "ck" / ".staging" / "geomprobe.json").write_text("{broken")
    assert load_checkpoint(tmp_path / "ck").info.step == 1
    assert not (tmp_path / "ck" / ".staging").exists()
    # committed staging (crash after the marker): finished on load
    save_checkpoint(tmp_path / "ck2", tiny_unet, sched, ModelInfo("small1", "digits", 8, 1, 10, seed=0, step=2))
    staging = tmp_path / "ck" / ".staging"
    (tmp_path / "ck2").rename(staging)
    (staging / "COMPLETE").write_text("")
    assert load_checkpoint(tmp_path / "ck").info.step == 2
    assert (tmp_path / "ck" / "train_log.jsonl").exists()  # other files survive checkpoint writes

"""FID Inception-v3 (geomprobe.continual.inception): shapes, weight loading and its errors,
the TF1 bilinear resize against an explicit numpy reference, the published architecture's size,
and an end-to-end FID through torchmetrics.

No real weights are available offline: the network is tested with seeded random weights
(He-scaled convolutions, random BatchNorm statistics) saved to tmp files. Every forward runs at
299x299 (~0.2 s per image on one thread), so the image counts are kept small.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from geomprobe.continual.inception import (
    FIDInceptionV3,
    load_inception_weights,
    resize_bilinear_tf1,
)
from geomprobe.continual.metrics import frechet_distance, inception_feature_net
from geomprobe.errors import DataError, GeomprobeError, UsageError

# Derived once from torch-fidelity 0.4.0's FeatureExtractorInceptionV3 (its module file imported
# with a stub package so torchvision was not needed) built on the same state dict: identical key
# list, 566 state-dict entries (94 BatchNorms x 5 + conv weights + fc weight/bias), 472 without
# the 94 ``num_batches_tracked`` counters, 23,850,960 parameters (= torchvision's Inception3
# without AuxLogits, 23,834,568 for 1000 classes, + 8 * 2049 for the graph's 1008 logits).
# The same check showed bit-identical (N, 2048) outputs to torch-fidelity for uint8 inputs.
N_STATE_KEYS = 566
N_BN = 94
N_PARAMETERS = 23_850_960


def _random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with activations of moderate scale through all layers (unlike default init)."""
    net = FIDInceptionV3()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in net.state_dict().items():
        v = value.clone()
        if key.endswith("conv.weight"):
            v = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        elif key.endswith(("running_var", "bn.weight")):
            v = torch.rand(v.shape, generator=g) + 0.5
        elif key.endswith(("running_mean", "bn.bias")):
            v = torch.randn(v.shape, generator=g) * 0.1
        elif key.startswith("fc."):
            v = torch.randn(v.shape, generator=g) * 0.01
        state[key] = v.contiguous()
    return state


@pytest.fixture(scope="module")
def state():
    return _random_state()


@pytest.fixture(scope="module")
def reference_net(state):
    net = FIDInceptionV3()
    net.load_state_dict(state, strict=True)
    return net


@pytest.fixture(scope="module")
def weight_files(state, tmp_path_factory):
    d = tmp_path_factory.mktemp("inception")
    st, pth = d / "w.safetensors", d / "w.pth"
    save_file(state, str(st))
    torch.save(state, pth)
    return st, pth


def _images(n, c, size, seed):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _assert_one_line_naming(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg and msg.strip() == msg
    for needle in needles:
        assert needle in msg, msg


# -- architecture -----------------------------------------------------------------------------


def test_architecture_matches_published_fid_inception():
    net = FIDInceptionV3()
    keys = list(net.state_dict())
    assert len(keys) == N_STATE_KEYS
    assert sum(k.endswith("num_batches_tracked") for k in keys) == N_BN
    assert sum(p.numel() for p in net.parameters()) == N_PARAMETERS
    assert keys[:2] == ["Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.weight"]
    assert keys[-2:] == ["fc.weight", "fc.bias"]
    assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in keys
    assert net.num_features == 2048 and not net.training
    assert not any(p.requires_grad for p in net.parameters())


def test_features_equal_torch_fidelity_golden_values(reference_net):
    """Independent reference: torch-fidelity 0.4.0's FeatureExtractorInceptionV3 (module file
    imported with a stub package, no torchvision) run once on the seed-0 state of
    ``_random_state`` and the uint8 image of this seeded input; the values below are its output
    (features 0, 1, 7, 100, 511, 1024, 2047, the row sums and norms). Tolerance 1e-5 relative."""
    g = torch.Generator().manual_seed(123)
    x = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    features = reference_net(x).double()
    idx = [0, 1, 7, 100, 511, 1024, 2047]
    expected = torch.tensor(
        [
            [0.0, 0.0183712859, 1.03179216, 5.39141512, 2.03464532, 5.24955988, 1.90656853],
            [0.0, 0.0137995044, 1.00482345, 5.50287724, 2.28846931, 5.38476419, 1.69594502],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(features[:, idx], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        features.sum(1), torch.tensor([3313.91185093, 3480.70703335], dtype=torch.float64), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        features.norm(dim=1), torch.tensor([125.983014491, 132.196751999], dtype=torch.float64), rtol=1e-5, atol=0
    )


def test_forward_shapes_and_channels(reference_net):
    grey = _images(2, 1, 16, seed=1)
    f_grey = reference_net(grey)
    f_rgb = reference_net(_images(2, 3, 32, seed=2))
    for f in (f_grey, f_rgb):
        assert f.shape == (2, 2048) and f.dtype == torch.float32
        assert torch.isfinite(f).all() and f.std() > 0
    assert not torch.allclose(f_grey[0], f_grey[1])
    # grey is replicated to 3 channels before the network
    assert torch.equal(reference_net(grey.repeat(1, 3, 1, 1)), f_grey)
    with pytest.raises(ValueError):
        reference_net(torch.zeros(1, 2, 8, 8))
    assert reference_net(torch.zeros(0, 3, 8, 8)).shape == (0, 2048)


def test_preprocess_quantises_resizes_and_scales():
    x = _images(1, 3, 8, seed=3)
    pre = FIDInceptionV3.preprocess(x)
    assert pre.shape == (1, 3, 299, 299)
    u8 = ((x + 1) * 127.5).round()
    # TF1 resize with scale 8/299: output pixel 0 samples input pixel 0 exactly
    assert torch.equal(pre[..., 0, 0], (u8[..., 0, 0] - 128) / 128)
    assert pre.min() >= -1 and pre.max() <= 127 / 128


def test_internal_batching_matches_one_batch(state):
    small = FIDInceptionV3(batch_size=2)
    small.load_state_dict(state)
    big = FIDInceptionV3(batch_size=64)
    big.load_state_dict(state)
    x = _images(3, 1, 12, seed=4)
    torch.testing.assert_close(small(x), big(x), rtol=1e-5, atol=1e-5)


# -- TF1-compatible resize ----------------------------------------------------------------------


def _tf1_resize_bilinear_numpy(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 resize_bilinear, align_corners=False, half_pixel_centers=False, written out per pixel.

    img (H, W); source coordinate = dst * in / out, lower = floor, upper = min(lower + 1, in - 1).
    """
    in_h, in_w = img.shape
    out = np.empty((out_h, out_w))
    for i in range(out_h):
        sy = i * (in_h / out_h)
        y0 = int(np.floor(sy))
        y1 = min(y0 + 1, in_h - 1)
        fy = sy - y0
        for j in range(out_w):
            sx = j * (in_w / out_w)
            x0 = int(np.floor(sx))
            x1 = min(x0 + 1, in_w - 1)
            fx = sx - x0
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


@pytest.mark.parametrize("in_hw,out_hw", [((5, 7), (13, 11)), ((16, 16), (299, 299)), ((32, 20), (13, 9))])
def test_tf1_resize_matches_numpy_reference(in_hw, out_hw):
    rng = np.random.default_rng(0)
    img = rng.random((2, 3) + in_hw).astype(np.float32)
    ours = resize_bilinear_tf1(torch.from_numpy(img), out_hw).numpy()
    assert ours.shape == (2, 3) + out_hw
    for n in range(2):
        for c in range(3):
            ref = _tf1_resize_bilinear_numpy(img[n, c].astype(np.float64), *out_hw)
            np.testing.assert_allclose(ours[n, c], ref, atol=1e-5, rtol=0)


def test_tf1_resize_differs_from_half_pixel_resize():
    # the FID graph's resize is not torch's (half-pixel) bilinear: guard against a silent swap
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    torch_bilinear = torch.nn.functional.interpolate(x, size=(19, 19), mode="bilinear", align_corners=False)
    assert not torch.allclose(resize_bilinear_tf1(x, (19, 19)), torch_bilinear, atol=1e-3)


# -- loading weights ----------------------------------------------------------------------------


def test_round_trip_safetensors_and_pth(weight_files, reference_net):
    x = _images(2, 3, 20, seed=6)
    expected = reference_net(x)
    for path in weight_files:
        net = load_inception_weights(path)
        assert torch.equal(net(x), expected), path
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        assert net.weights_sha256 == sha
        assert net.name == f"inception-v3-fid@{sha[:12]}"
        assert not net.training and net.num_features == 2048


def test_num_batches_tracked_is_optional(state, tmp_path):
    slim = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "slim.pth"
    torch.save(slim, path)
    net = load_inception_weights(path)
    assert torch.equal(net.Mixed_6b.branch7x7_2.conv.weight, state["Mixed_6b.branch7x7_2.conv.weight"])


def _save(state, path):
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_renamed_key_is_named(state, tmp_path, suffix):
    bad = dict(state)
    bad["Mixed_6c.branch_pool.conv.weightX"] = bad.pop("Mixed_6c.branch_pool.conv.weight")
    path = tmp_path / f"renamed{suffix}"
    _save(bad, path)
    with pytest.raises(UsageError) as e:
        load_inception_weights(path)
    _assert_one_line_naming(e, str(path), "'Mixed_6c.branch_pool.conv.weight'", "Mixed_6c.branch_pool.conv.weightX")


def _drop_key(state):
    del state["Mixed_5b.branch5x5_2.bn.running_mean"]


def _add_key(state):
    state["AuxLogits.fc.weight"] = torch.zeros(3)


def _reshape_key(state):
    state["Mixed_7a.branch3x3_2.conv.weight"] = torch.zeros(320, 192, 1, 1)


@pytest.mark.parametrize(
    "corrupt,name,needles",
    [
        (_drop_key, "missing.safetensors", ["missing key 'Mixed_5b.branch5x5_2.bn.running_mean'"]),
        (_add_key, "extra.pt", ["unexpected key 'AuxLogits.fc.weight'"]),
        (
            _reshape_key,
            "shape.safetensors",
            ["'Mixed_7a.branch3x3_2.conv.weight'", "(320, 192, 1, 1)", "(320, 192, 3, 3)"],
        ),
    ],
)
def test_bad_state_dict_names_the_key(state, tmp_path, corrupt, name, needles):
    """A missing, unexpected or wrongly shaped entry: one-line UsageError naming file and key."""
    bad = dict(state)
    corrupt(bad)
    path = tmp_path / name
    _save(bad, path)
    with pytest.raises(UsageError) as e:
        load_inception_weights(path)
    _assert_one_line_naming(e, str(path), *needles)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(UsageError) as e:
        load_inception_weights(path)
    _assert_one_line_naming(e, str(path), "not found")
    with pytest.raises(UsageError) as e:
        inception_feature_net(str(path))
    _assert_one_line_naming(e, str(path))


@pytest.mark.parametrize("name", ["garbage.pth", "garbage.pt", "garbage.safetensors"])
def test_garbage_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00\x01 this is not a weights file \xff" * 50)
    with pytest.raises(DataError) as e:
        load_inception_weights(path)
    _assert_one_line_naming(e, str(path))


class _NotATensor:
    pass


def test_pth_with_arbitrary_objects_is_refused(tmp_path):
    # weights_only loading: a pickle that needs a non-tensor class is rejected, not executed
    path = tmp_path / "objects.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": _NotATensor()}, path)
    with pytest.raises(DataError) as e:
        load_inception_weights(path)
    _assert_one_line_naming(e, str(path))


def test_non_dict_and_bad_suffix(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(DataError) as e:
        load_inception_weights(path)
    _assert_one_line_naming(e, str(path), "list")
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(UsageError) as e:
        load_inception_weights(path)
    _assert_one_line_naming(e, str(path), ".npz")
    assert issubclass(DataError, GeomprobeError)


# -- end to end ---------------------------------------------------------------------------------


def test_fid_end_to_end(weight_files):
    net = inception_feature_net(str(weight_files[0]))
    assert net.num_features == 2048 and net.name.startswith("inception-v3-fid@")
    real = _images(4, 1, 16, seed=7)
    fake = _images(4, 1, 16, seed=8)
    same = frechet_distance(real, real.clone(), net)
    assert np.isfinite(same) and abs(same) < 1e-3
    different = frechet_distance(real, fake, net)
    assert np.isfinite(different) and different > 1.0


@pytest.mark.slow
def test_cli_continual_with_inception_features(tmp_path, monkeypatch):
    """`geomprobe continual --fid-features inception --inception-weights F` end to end (random
    weights): metric rows name the network by the file's hash and every FID is finite."""
    import json

    from typer.testing import CliRunner

    from geomprobe.cli import app

    weights = tmp_path / "inception.safetensors"
    _save(_random_state(), weights)
    monkeypatch.setenv("GEOMPROBE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "o"
    result = CliRunner().invoke(
        app,
        [
            "continual",
            "--out",
            str(out),
            "--model",
            "small1",
            "--image-size",
            "8",
            "--tasks",
            "2",
            "--steps",
            "3",
            "--n-generated",
            "8",
            "--sample-steps",
            "2",
            "--fid-features",
            "inception",
            "--inception-weights",
            str(weights),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    fid_rows = [r for r in rows if "fid" in r]
    assert len(fid_rows) == 3 and all(r["feature_net"] == f"inception-v3-fid@{sha}" for r in fid_rows)
    assert all(math.isfinite(r["fid"]) for r in fid_rows)

"""Any diffusers UNet as input (issue 11): the three directory layouts, conditional or not.

Tiny random UNet2DModels are saved as a geomprobe checkpoint, a diffusers pipeline directory and a
bare UNet directory; ``grads`` (with ``--dataset digits --resize``) and ``sample`` run on each, and
bad inputs give one line of error. ``socket.socket`` raises in every test: nothing may touch the
network.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from typer.testing import CliRunner

from geomprobe.checkpoints import ModelInfo, checkpoint_checksum, load_model, save_checkpoint
from geomprobe.cli import app
from geomprobe.data import load_digits, resize_images
from geomprobe.errors import DataError
from geomprobe.models import build_scheduler
from geomprobe.probe import GradientStore, per_sample_grads
from geomprobe.timesteps import parse_timesteps, snr

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("geomprobe tried to open a network socket")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # offline mode must not be what keeps us off the hub


def _unet(kind: str) -> UNet2DModel:
    """attn: unconditional RGB 16 px with attention (the DDPM CIFAR-10 shape, tiny); uncond: grey 12 px;
    cond: grey 8 px with 10 class embeddings."""
    torch.manual_seed({"attn": 0, "uncond": 1, "cond": 2}[kind])
    common = dict(layers_per_block=1, norm_num_groups=4, block_out_channels=(4, 8))
    if kind == "attn":
        return UNet2DModel(
            sample_size=16,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=4,
            **common,
        )
    size, classes = (12, None) if kind == "uncond" else (8, 10)
    return UNet2DModel(
        sample_size=size,
        in_channels=1,
        out_channels=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False,
        num_class_embeds=classes,
        **common,
    )


def _save(unet: UNet2DModel, layout: str, directory, scheduler=None):
    """Write ``unet`` in ``layout``: geomprobe, pipeline (unet/ + scheduler/ + model_index.json) or unet."""
    scheduler = scheduler or DDPMScheduler()
    if layout == "geomprobe":
        cfg = unet.config
        info = ModelInfo("external", "digits", cfg.sample_size, cfg.in_channels, cfg.num_class_embeds, seed=0, step=0)
        save_checkpoint(directory, unet, scheduler, info)
    elif layout == "pipeline":
        unet.save_pretrained(directory / "unet")
        scheduler.save_pretrained(directory / "scheduler")
        index = {
            "_class_name": "DDPMPipeline",
            "_diffusers_version": "0.42.1",
            "scheduler": ["diffusers", type(scheduler).__name__],
            "unet": ["diffusers", "UNet2DModel"],
        }
        (directory / "model_index.json").write_text(json.dumps(index))
    else:
        unet.save_pretrained(directory)
    return directory


def _one_line(result) -> str:
    text = (result.stderr if result.stderr_bytes is not None else result.output).strip()
    assert result.exit_code != 0, text
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    return text


def _grads(ckpt, out, t="100", *extra, samples=4, dataset="digits"):
    """``geomprobe grads`` through the CLI runner (CPU, quiet)."""
    args = ["grads", "--ckpt", str(ckpt), "--t", t, "--samples", str(samples), "--out", str(out), "--device", "cpu"]
    return runner.invoke(app, [*args, *(["--dataset", dataset] if dataset else []), "--quiet", *extra])


@pytest.mark.parametrize("kind", ["attn", "uncond", "cond"])
@pytest.mark.parametrize("layout", ["geomprobe", "pipeline", "unet"])
def test_grads_on_every_layout(tmp_path, layout, kind):
    unet = _unet(kind)
    ckpt = _save(unet, layout, tmp_path / "model")
    out = tmp_path / "grads"
    r = _grads(ckpt, out, "100,700", "--resize", samples=16)
    assert r.exit_code == 0, r.output
    assert ("bare UNet2DModel directory" in r.output) == (layout == "unet")  # the default-scheduler note

    st = GradientStore(out)
    assert st.manifest["dataset"]["name"] == "digits" and st.checkpoint["checksum"] == checkpoint_checksum(ckpt)
    size, channels = unet.config.sample_size, unet.config.in_channels
    digits = load_digits("train", size if size in (8, 16, 32) else 8)
    for t in (100, 700):
        b = st.inputs(t)
        rows = st.sample_index(t)
        # the stored x0 is the dataset image brought to the model (bilinear + grey -> RGB); labels are the dataset's
        torch.testing.assert_close(b.x0, resize_images(digits.images[rows], size, channels))
        assert torch.equal(st.labels(t), digits.labels[rows])
        G = per_sample_grads(unet, st.param_names, b.x0, b.noise, b.t, b.y, DDPMScheduler().alphas_cumprod)
        ref = st.load(t)
        assert ((G - ref).norm(dim=1) / ref.norm(dim=1)).max() < 1e-5
        if kind != "cond":  # an unconditional model never sees a label: any labels give the same rows
            G2 = per_sample_grads(
                unet, st.param_names, b.x0, b.noise, b.t, torch.full_like(b.y, 123), DDPMScheduler().alphas_cumprod
            )
            torch.testing.assert_close(G, G2)


@pytest.mark.parametrize("kind", ["attn", "cond"])
def test_sample_conditional_and_unconditional(tmp_path, kind):
    from PIL import Image

    ckpt = _save(_unet(kind), "pipeline", tmp_path / "model")
    png = tmp_path / "g.png"
    extra = ["--rows", "3"] if kind == "attn" else ["--classes", "0,1,2"]
    r = runner.invoke(
        app, ["sample", "--ckpt", str(ckpt), "--n", "2", "--steps", "2", "--out", str(png), "--device", "cpu", *extra]
    )
    assert r.exit_code == 0, r.output
    size = 16 if kind == "attn" else 8
    assert Image.open(png).size == ((2 * (size + 1) + 1) * 4, (3 * (size + 1) + 1) * 4)
    assert "6 samples" in r.output
    wrong = ["--classes", "0,1"] if kind == "attn" else ["--rows", "2"]
    text = _one_line(runner.invoke(app, ["sample", "--ckpt", str(ckpt), "--out", str(png), "--device", "cpu", *wrong]))
    assert ("unconditional" if kind == "attn" else "class-conditional") in text


def test_bad_inputs_give_one_line(tmp_path):
    def grads(ckpt):
        return _grads(ckpt, tmp_path / "g")

    # geomprobe.json whose channels disagree with the UNet
    save_checkpoint(tmp_path / "lying", _unet("cond"), build_scheduler(), ModelInfo("small1", "digits", 8, 3, 10, 0, 0))
    assert "geomprobe.json says channels=3" in _one_line(grads(tmp_path / "lying"))
    # a .bin pickle only
    _unet("cond").save_pretrained(tmp_path / "pickle", safe_serialization=False)
    assert "convert it" in _one_line(grads(tmp_path / "pickle"))
    # nothing recognisable
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.pt").write_bytes(b"x")
    assert "not a geomprobe checkpoint, diffusers pipeline or UNet2DModel directory" in _one_line(
        grads(tmp_path / "junk")
    )
    # image size (12 px model, 8 px digits) and channels (RGB model, grey digits) without --resize
    for kind, shape in (("uncond", "1x12x12"), ("attn", "3x16x16")):
        text = _one_line(grads(_save(_unet(kind), "unet", tmp_path / kind)))
        assert f"model expects {shape}" in text and "--resize" in text
    # no --dataset for a model that does not record one
    r = _grads(tmp_path / "uncond", tmp_path / "g", dataset=None)
    assert "--dataset" in _one_line(r)
    # a v-prediction model
    v = _save(_unet("cond"), "pipeline", tmp_path / "v", DDPMScheduler(prediction_type="v_prediction"))
    assert "epsilon" in _one_line(grads(v))
    # a pipeline whose UNet is not a UNet2DModel
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    assert "UNet2DModel only" in _one_line(grads(tmp_path / "sd"))


def test_missing_scheduler_uses_default_with_one_note(tmp_path):
    ckpt = _save(_unet("cond"), "pipeline", tmp_path / "model")
    for p in (ckpt / "scheduler").iterdir():
        p.unlink()
    (ckpt / "scheduler").rmdir()
    model = load_model(ckpt)
    assert model.layout == "pipeline" and len(model.notes) == 1 and "DDPM default" in model.notes[0]
    torch.testing.assert_close(model.scheduler.alphas_cumprod, build_scheduler().alphas_cumprod)
    assert model.info.num_classes == 10 and model.info.image_size == 8 and model.info.channels == 1
    r = _grads(ckpt, tmp_path / "g", "500")
    assert r.exit_code == 0, r.output
    notes = [line for line in (r.stderr if r.stderr_bytes is not None else r.output).splitlines() if "note:" in line]
    assert len(notes) == 1 and "DDPM default" in notes[0]


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_cosine_schedules_load_and_set_the_bands(tmp_path, cls):
    sched = cls(beta_schedule="squaredcos_cap_v2")
    ckpt = _save(_unet("uncond"), "pipeline", tmp_path / "model", sched)
    model = load_model(ckpt)
    assert model.info.num_classes is None
    torch.testing.assert_close(model.scheduler.alphas_cumprod, sched.alphas_cumprod)
    r = _grads(ckpt, tmp_path / "g", "low-snr", "--resize")
    assert r.exit_code == 0, r.output
    st = GradientStore(tmp_path / "g")
    ac = sched.alphas_cumprod.double().numpy()
    band = parse_timesteps("low-snr", alphas_cumprod=ac).timesteps
    assert band != parse_timesteps("low-snr").timesteps  # the cosine band is not the linear one
    ts = st.row_timesteps("low-snr").numpy()
    assert set(ts) <= set(band) and (snr(ac)[ts] < 0.01).all()
    assert st.meta("low-snr")["t_min"] == min(band)


def test_checksum_and_legacy_names(tmp_path):
    unet = _unet("cond")
    a = checkpoint_checksum(_save(unet, "geomprobe", tmp_path / "a"))
    assert (
        a
        == checkpoint_checksum(_save(unet, "pipeline", tmp_path / "b"))
        == checkpoint_checksum(_save(unet, "unet", tmp_path / "c"))
    )
    with pytest.raises(DataError, match="not found"):
        checkpoint_checksum(tmp_path / "missing")
    unet.save_pretrained(tmp_path / "sharded", max_shard_size="10KB")  # index + shards
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    model = load_model(tmp_path / "sharded")
    assert all(torch.equal(x, y) for x, y in zip(unet.state_dict().values(), model.unet.state_dict().values()))
    assert len(checkpoint_checksum(tmp_path / "sharded")) == 16

"""The gradient store: extraction, reader, reproducibility, resume, refusal, corruption, CLI errors,
and the 2-process torchrun run against the single-process one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from geomprobe.checkpoints import checkpoint_checksum
from geomprobe.cli import app
from geomprobe.data import load_dataset
from geomprobe.errors import DataError, UsageError
from geomprobe.models import build_scheduler
from geomprobe.probe import (
    ExtractConfig,
    GradientStore,
    RandomProjection,
    extract_gradients,
    per_sample_grads,
    true_fisher_target,
)

MEM = "256M"


@pytest.fixture(scope="module")
def ckpt(micro_ckpt):
    """A micro UNet checkpoint for digits at 8 px (conftest.micro_ckpt)."""
    return micro_ckpt


def extract(ckpt, out, overwrite=False, progress=None, **kw):
    cfg = dict(ckpt=str(ckpt), t="100,700", samples=24, shard_rows=10, seed=3)
    cfg.update(kw)
    return extract_gradients(
        ExtractConfig(**cfg),
        out,
        overwrite=overwrite,
        device="cpu",
        max_memory=MEM,
        progress=progress,
        command=["test"],
    )


@pytest.fixture(scope="module")
def store_dir(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "base"
    extract(ckpt, out)
    return out


def test_reader_layout_and_metadata(ckpt, store_dir):
    st = GradientStore(store_dir)
    assert st.timesteps == [100, 700]
    assert st.n(700) == st.n("t100") == 24
    assert st.P == sum(np.prod(s) for s in st.param_shapes) == st.manifest["P"]
    m = st.meta(700)
    ac = build_scheduler().alphas_cumprod.double()
    assert m["t"] == 700 and abs(m["alpha_bar"] - ac[700].item()) < 1e-7
    assert abs(m["snr"] - ac[700].item() / (1 - ac[700].item())) < 1e-9
    assert st.checkpoint["checksum"] == checkpoint_checksum(ckpt)
    man = st.manifest
    for field in ("version", "command", "seed", "config", "created", "shards"):
        assert field in man
    assert [s["rows"] for s in man["shards"]] == [[0, 10], [10, 20], [20, 24]]
    with h5py.File(store_dir / "shard-00000.h5") as f:
        ds = f["grads/t700"]
        assert ds.fletcher32 and ds.chunks is not None and ds.dtype == np.float32
        assert f["grads/t700"].attrs["t"] == 700
        for name in ("labels", "sample_index", "loss", "x0", "noise"):
            assert f"meta/t700/{name}" in f
        for attr in ("target", "param_names", "param_shapes", "param_slices", "projection", "checkpoint"):
            assert attr in f.attrs
    # labels and inputs are the dataset's rows
    ds = load_dataset("digits", "train", image_size=8)
    idx = st.sample_index(700)
    x0, y = ds.batch(idx.numpy())
    assert torch.equal(st.labels(700), y)
    assert torch.equal(st.inputs(700).x0, x0)
    assert torch.equal(st.sample_index(100), idx)
    # blocks stream in row order with bounded size
    blocks = list(st.iter_blocks(700, rows=4))
    assert max(len(b) for b in blocks) <= 4
    torch.testing.assert_close(torch.cat(blocks), st.load(700), rtol=0, atol=0)
    view = st.param_view(st.load(700)[0])
    assert list(view) == st.param_names and tuple(view[st.param_names[0]].shape) == st.param_shapes[0]
    with pytest.raises(UsageError):
        st.load(300)
    st.verify()


def test_rows_reproducible_from_store_alone(ckpt, store_dir):
    """Recompute rows from the stored x0, noise, label and t and the checkpoint."""
    from geomprobe.checkpoints import load_checkpoint

    st = GradientStore(store_dir)
    ck = load_checkpoint(ckpt)
    b = st.inputs(100, 5, 15)
    G = per_sample_grads(ck.unet, st.param_names, b.x0, b.noise, b.t, b.y, ck.scheduler.alphas_cumprod)
    ref = st.load(100)[5:15]
    assert ((G - ref).norm(dim=1) / ref.norm(dim=1)).max() < 1e-5
    assert torch.equal(st.losses(100), st.losses(100))


def test_true_target_band_float16_and_projection(ckpt, tmp_path):
    from geomprobe.checkpoints import load_checkpoint

    out = tmp_path / "band"
    extract(ckpt, out, t="low-snr", target="true", dtype="float16", samples=12)
    st = GradientStore(out)
    assert st.timesteps == ["band-low-snr"]
    ts = st.row_timesteps("low-snr")
    assert ts.min() >= 674 and len(set(ts.tolist())) > 1
    ck = load_checkpoint(ckpt)
    b = st.inputs("band-low-snr")
    ac = ck.scheduler.alphas_cumprod
    target = true_fisher_target(ck.unet, b.x0, b.noise, b.t, b.y, ac, b.target)
    G = per_sample_grads(ck.unet, st.param_names, b.x0, b.noise, b.t, b.y, ac, target=target)
    rows = st.load("low-snr")
    assert rows.dtype == torch.float32
    assert ((G - rows).norm(dim=1) / G.norm(dim=1)).max() < 2e-3  # float16 storage

    outp = tmp_path / "proj"
    extract(ckpt, outp, t="100", samples=12, project=64, projection="gaussian")
    sp = GradientStore(outp)
    assert sp.P == 64 and sp.projection["K"] == 64
    extract(ckpt, tmp_path / "full", t="100", samples=12)
    full = GradientStore(tmp_path / "full").load(100)
    R = RandomProjection(full.shape[1], 64, seed=3)
    torch.testing.assert_close(sp.load(100), R.project(full), rtol=1e-4, atol=1e-5)
    with pytest.raises(UsageError):
        sp.param_view(sp.load(100)[0])


def test_killed_run_resumes_to_the_same_store(ckpt, store_dir, tmp_path):
    out = tmp_path / "killed"

    def die(done, total, **_):
        if done >= 25:  # in the middle of shard 1 (rows 10..19), after shard 0 is complete
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(ckpt, out, progress=die)
    assert (out / "shard-00000.h5").exists()  # the interrupted shard's temporary is removed
    assert not (out / "shard-00001.h5").exists() and not list(out.glob("*.tmp"))
    assert not (out / "geomprobe.lock").exists()
    with pytest.raises(DataError, match="incomplete"):
        GradientStore(out)
    result = extract(ckpt, out)
    assert result.shards_skipped == 1 and result.shards_written == 2
    a, b = GradientStore(out), GradientStore(store_dir)
    for t in (100, 700):
        assert torch.equal(a.load(t), b.load(t))
        assert torch.equal(a.meta_array(t, "noise"), b.meta_array(t, "noise"))
    # a rerun of a complete store skips everything
    assert extract(ckpt, out).shards_skipped == 3


def test_different_command_refused_unless_overwrite(ckpt, tmp_path):
    out = tmp_path / "s"
    extract(ckpt, out, samples=10)
    with pytest.raises(UsageError, match="different command"):
        extract(ckpt, out, samples=10, t="200")
    extract(ckpt, out, samples=10, t="200", overwrite=True)
    assert GradientStore(out).timesteps == [200]
    other = tmp_path / "notastore"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a gradient store"):
        extract(ckpt, other, samples=10, overwrite=True)
    assert (other / "notes.txt").exists()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_flipped_byte_gives_clear_error(ckpt, store_dir, tmp_path):
    out = _copy(store_dir, tmp_path / "flip")
    path = out / "shard-00001.h5"
    with h5py.File(path) as f:
        chunk = f["grads/t700"].id.get_chunk_info(0)
        offset = chunk.byte_offset + chunk.size // 2
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    st = GradientStore(out)
    with pytest.raises(DataError, match="shard-00001"):
        st.load(700)
    with pytest.raises(DataError, match="corrupt"):
        st.verify()
    with pytest.raises(DataError, match="corrupt"):  # resume refuses it
        extract(ckpt, out)


def test_truncated_shard_gives_clear_error(ckpt, store_dir, tmp_path):
    out = _copy(store_dir, tmp_path / "trunc")
    path = out / "shard-00002.h5"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="shard-00002"):  # its header is checked when the store is opened
        GradientStore(out)
    st = GradientStore(out, verify=False)
    with pytest.raises(DataError, match="shard-00002"):
        list(st.iter_blocks(100))
    with pytest.raises(DataError):
        extract(ckpt, out)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--t", "100..50"], "reversed"),
        (["--t", "100", "--params", "("], "malformed --params"),
        (["--t", "100", "--params", "nothing_matches"], "selects no parameter"),
        (["--t", "100", "--target", "oracle"], "--target"),
        (["--t", "100", "--samples", "100000"], "--samples"),
        (["--t", "100", "--classes", "0,42"], "class 42"),
        (["--t", "100", "--max-memory", "lots"], "memory"),
        (["--t", "100", "--project", "0"], "--project"),
        (["--t", "100", "--ckpt", "{tmp}/none"], "not found"),
    ],
)
def test_cli_bad_input_one_line(ckpt, tmp_path, args, needle):
    argv = ["grads", "--ckpt", str(ckpt), "--out", str(tmp_path / "g"), "--samples", "4", "--quiet"]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    text = (result.stderr if result.stderr_bytes is not None else result.output).strip()
    assert "Traceback" not in text and needle in text and len(text.splitlines()) == 1, text


def test_cli_grads_writes_store_and_table(ckpt, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        [
            "grads",
            "--ckpt",
            str(ckpt),
            "--t",
            "300",
            "--samples",
            "6",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--max-memory",
            MEM,
        ],
    )
    assert result.exit_code == 0, result.output
    st = GradientStore(out)
    assert st.n(300) == 6 and isinstance(st.manifest["command"], list)
    assert "300" in result.output


def test_torchrun_two_processes_equal_single_process(ckpt, tmp_path):
    """2 ranks with gloo on CPU write the same shards (same rows, same order) as one process."""
    torchrun = Path(sys.executable).with_name("torchrun")
    out2 = tmp_path / "ranks2"
    args = [
        "--ckpt",
        str(ckpt),
        "--t",
        "100,700",
        "--samples",
        "24",
        "--shard-rows",
        "10",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--max-memory",
        MEM,
        "--quiet",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            str(torchrun),
            "--nproc-per-node",
            "2",
            "--master-port",
            str(29500 + os.getpid() % 1000),
            "-m",
            "geomprobe",
            "grads",
            *args,
            "--out",
            str(out2),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out1 = tmp_path / "ranks1"  # one process, one thread as each rank: the same float operations
    proc = subprocess.run(
        [sys.executable, "-m", "geomprobe", "grads", *args, "--out", str(out1)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = GradientStore(out1), GradientStore(out2)
    assert b.manifest["world_size"] == 2 and b.manifest["complete"]
    assert [s["rows"] for s in a.manifest["shards"]] == [s["rows"] for s in b.manifest["shards"]]
    for t in (100, 700):
        # same rows in the same order, bit for bit
        assert torch.equal(a.load(t), b.load(t))
        assert torch.equal(a.meta_array(t, "loss"), b.meta_array(t, "loss"))
        assert torch.equal(a.labels(t), b.labels(t))
        assert torch.equal(a.sample_index(t), b.sample_index(t))
        assert torch.equal(a.meta_array(t, "noise"), b.meta_array(t, "noise"))


def test_probe_batches_mean_gradient_equals_store_mean(ckpt, store_dir):
    """mean_gradient over probe_batches (no G) == the mean of the stored rows; inputs equal the store's."""
    from geomprobe.checkpoints import load_checkpoint
    from geomprobe.probe import mean_gradient, probe_batches
    from geomprobe.timesteps import parse_timesteps

    st = GradientStore(store_dir)
    ck = load_checkpoint(ckpt)
    ds = load_dataset("digits", "train", image_size=8)
    rows = st.sample_index(700).numpy()
    batches = list(probe_batches(ds, rows, parse_timesteps("100,700"), "t700", seed=3, batch_size=7))
    assert torch.equal(torch.cat([b.noise for b in batches]), st.meta_array(700, "noise"))
    mu = mean_gradient(ck.unet, st.param_names, batches, alphas_cumprod=ck.scheduler.alphas_cumprod)
    ref = st.load(700).mean(0)
    assert ((mu - ref).norm() / ref.norm()).item() < 1e-5

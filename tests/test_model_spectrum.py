"""``spectrum --ckpt`` (no stored G) against ``spectrum --grads`` on the same rows, and its pieces.

Reference: the store route (tested against dense float64 F in test_analysis_store.py) on a store
written by ``grads`` with the same options. The block-Gram route accumulates K in float64 from
float32 per-sample gradients, the store route multiplies float32 rows: they agree to 1e-5
relative. A --max-memory that forces many blocks (and splits tensors) must give the same numbers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from geomprobe.analysis.means import MeanGradients
from geomprobe.cli import app
from geomprobe.fisher.blockgram import ParameterBlock, block_gram_statistics, parameter_blocks
from geomprobe.fisher.spectrum import mean_cosine_matrix

PARAM_REGEX = r"^(conv_in|conv_out|class_embedding)|norm"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt_and_store(tmp_path_factory):
    from geomprobe.checkpoints import ModelInfo, save_checkpoint
    from geomprobe.models import build_scheduler, build_unet
    from geomprobe.probe import ExtractConfig, extract_gradients

    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    info = ModelInfo(preset="small1", dataset="digits", image_size=8, channels=1, num_classes=10, seed=0, step=0)
    save_checkpoint(root / "ckpt", build_unet("small1", 8, 1, 10), build_scheduler(), info)
    config = ExtractConfig(ckpt=str(root / "ckpt"), t="100,800", samples=24, params=PARAM_REGEX, shard_rows=16)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract_gradients(config, root / "grads", device="cpu")
    finally:
        torch.set_num_threads(before)
    return root / "ckpt", root / "grads"


def _spectrum(args, tmp_path, name):
    res = CliRunner().invoke(app, ["spectrum", *args, "--top-k", "3", "--out", str(tmp_path / name), "--quiet"])
    assert res.exit_code == 0, res.output
    return json.loads((tmp_path / name / "spectrum.json").read_text())


@pytest.mark.parametrize("budget", ["64M", "1200K"], ids=["one-block", "many-blocks"])
def test_spectrum_from_the_model_equals_spectrum_from_its_store(ckpt_and_store, tmp_path, budget):
    ckpt, store = ckpt_and_store
    ref = _spectrum(["--grads", str(store), "--no-model"], tmp_path, "store")
    ours = _spectrum(
        ["--ckpt", str(ckpt), "--t", "100,800", "--samples", "24", "--params", PARAM_REGEX, "--max-memory", budget],
        tmp_path,
        "model",
    )
    for a, b in zip(ref["rows"], ours["rows"], strict=True):
        assert a["t"] == b["t"] and a["n"] == b["n"] and a["P"] == b["P"]
        for key in (
            "trace",
            "frobenius",
            "mu_norm",
            "c_star",
            "rel_err_diag",
            "rel_err_rank1",
            "cos_v1_mu",
            "lambda2_over_lambda1",
            "lambda1_over_trace",
        ):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), key
        np.testing.assert_allclose(b["eigenvalues"], a["eigenvalues"], rtol=1e-5)
        assert b["cos_to_mean"]["median"] == pytest.approx(a["cos_to_mean"]["median"], rel=1e-5)
        assert b["scaled_identity_mse"] is not None
    np.testing.assert_allclose(ours["mu_cosine"]["matrix"], ref["mu_cosine"]["matrix"], rtol=1e-5, atol=1e-6)


def test_parameter_blocks_cover_every_column_once():
    blocks = parameter_blocks(["a", "b", "c"], [5, 12, 3], width=4)
    assert all(b.size <= 4 for b in blocks)
    columns = [c for b in blocks for c in range(*b.columns)]
    assert columns == list(range(20))
    pieces = [(n, i) for b in blocks for n, lo, hi in b.pieces for i in range(lo, hi)]
    assert pieces == [("a", i) for i in range(5)] + [("b", i) for i in range(12)] + [("c", i) for i in range(3)]


def test_block_gram_statistics_equal_the_dense_gram_matrix():
    """Explicit G (float64 reference): K, column sums and sums of squares from blocks that split tensors."""
    rng = np.random.default_rng(0)
    sizes, names = [7, 10, 4], ["a", "b", "c"]
    G = rng.standard_normal((9, sum(sizes))).astype(np.float32)
    starts = dict(zip(names, np.cumsum([0, *sizes[:-1]]), strict=True))

    def gradients(block_names, out=None):  # two chunks of rows, like a model's probe batches (ignores out)
        rows = np.concatenate([G[:, starts[n] : starts[n] + sizes[names.index(n)]] for n in block_names], 1)
        yield 0, torch.from_numpy(rows[:5])
        yield 5, torch.from_numpy(rows[5:])

    blocks = parameter_blocks(names, sizes, width=3)
    assert any(isinstance(b, ParameterBlock) and len(b.pieces) > 1 for b in blocks)
    stats = block_gram_statistics(gradients, names, sizes, 9, blocks=blocks)
    G64 = G.astype(np.float64)
    np.testing.assert_allclose(stats.K, G64 @ G64.T / 9, rtol=1e-5, atol=1e-6)  # float32 products of float32 rows
    np.testing.assert_allclose(stats.column_sum, G64.sum(0), rtol=1e-12)
    np.testing.assert_allclose(stats.column_sumsq, (G64**2).sum(0), rtol=1e-12)


def test_parameter_blocks_keep_tensors_whole_when_that_costs_no_extra_pass():
    blocks = parameter_blocks(["a", "b", "c", "d"], [3, 4, 2, 5], width=7)  # 14 columns: 2 blocks either way
    assert [b.pieces for b in blocks] == [(("a", 0, 3), ("b", 0, 4)), (("c", 0, 2), ("d", 0, 5))]
    assert [b.columns for b in blocks] == [(0, 7), (7, 14)]
    cut = parameter_blocks(["a", "b", "c"], [4, 4, 4], width=6)  # whole tensors: 3 blocks; cut: 2
    assert len(cut) == 2 and cut[0].pieces == (("a", 0, 4), ("b", 0, 2))


@pytest.mark.parametrize(
    "width", [2502, 20_000, 97]
)  # whole-tensor blocks (5 or 1, rows written in place); cut tensors
def test_block_gram_statistics_of_a_model_equal_a_float64_per_sample_loop(width):
    """model_gradients + block_gram_statistics == K, column sums, sums of squares of an explicit float64 loop."""
    from conftest import micro_unet

    from geomprobe.diffusion import per_sample_loss
    from geomprobe.fisher.blockgram import model_gradients
    from geomprobe.models import build_scheduler
    from geomprobe.probe import ProbeBatch, select_parameters

    unet = micro_unet(num_classes=None, attention=True)
    ac = build_scheduler(1000).alphas_cumprod
    g = torch.Generator().manual_seed(3)
    batches = [
        ProbeBatch(
            torch.randn(b, 1, 8, 8, generator=g),
            torch.randn(b, 1, 8, 8, generator=g),
            torch.randint(0, 1000, (b,), generator=g),
            torch.zeros(b, dtype=torch.long),
        )
        for b in (3, 2)
    ]
    names = select_parameters(unet)
    params = dict(unet.named_parameters())
    sizes = [params[n].numel() for n in names]
    blocks = parameter_blocks(names, sizes, width)
    assert (width == 97) == any(a != 0 or b != params[n].numel() for blk in blocks for n, a, b in blk.pieces)
    written_in_place = []

    def gradients(block_names, out=None):  # model_gradients, recording whether each chunk landed in ``out``
        for first, rows in model_gradients(unet, batches, ac)(block_names, out):
            written_in_place.append(out is not None and rows.data_ptr() == out[first].data_ptr())
            yield first, rows

    stats = block_gram_statistics(gradients, names, sizes, 5, blocks=blocks)
    assert all(written_in_place) == (width != 97) and any(written_in_place) == (width != 97)

    unet64 = micro_unet(num_classes=None, attention=True).double()
    rows = []
    for b in batches:
        for i in range(len(b)):
            unet64.zero_grad(set_to_none=True)
            sl = slice(i, i + 1)
            per_sample_loss(
                unet64, b.x0[sl].double(), b.noise[sl].double(), b.t[sl], b.y[sl], ac.double()
            ).sum().backward()
            rows.append(torch.cat([dict(unet64.named_parameters())[n].grad.reshape(-1) for n in names]))
    G = torch.stack(rows).numpy()
    np.testing.assert_allclose(stats.K, G @ G.T / 5, rtol=2e-4, atol=1e-6 * np.abs(G @ G.T).max())  # float32 rows
    np.testing.assert_allclose(stats.column_sum, G.sum(0), rtol=2e-4, atol=1e-5 * np.abs(G).max())
    np.testing.assert_allclose(stats.column_sumsq, (G**2).sum(0), rtol=2e-4, atol=1e-5 * (G**2).max())


def test_block_rows_skip_an_empty_chunk():
    """A gradients callback may yield an empty trailing chunk (first == n): nothing to copy, no IndexError."""
    from geomprobe.fisher.blockgram import block_rows

    G = torch.arange(12.0).view(3, 4)
    block = parameter_blocks(["a"], [4], width=4)[0]

    def gradients(names, out=None):
        yield 0, G
        yield 3, G[:0]

    np.testing.assert_array_equal(block_rows(block, gradients, {"a": 4}, torch.empty(3, 4)).numpy(), G.numpy())


def test_mean_gradients_spill_to_disk_and_give_the_same_cosines():
    rng = np.random.default_rng(1)
    mus = [rng.standard_normal(20_000) for _ in range(4)]
    held = MeanGradients(max_memory=2**20)  # a quarter of 1 MiB holds fewer than 4 x 20,000 float64
    for mu in mus:
        held.add(mu)
    assert held._tmp is not None
    np.testing.assert_allclose(held.cosine_matrix(), mean_cosine_matrix(mus), atol=1e-6)
    held.close()


def test_spectrum_needs_exactly_one_source(ckpt_and_store, tmp_path):
    ckpt, store = ckpt_and_store
    for args in ([], ["--grads", str(store), "--ckpt", str(ckpt)], ["--ckpt", str(ckpt), "--t", "100"]):
        res = CliRunner().invoke(app, ["spectrum", *args])
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output


def test_torchrun_two_ranks_share_the_blocks_and_equal_one_process(ckpt_and_store, tmp_path):
    """spectrum --ckpt under torchrun (2 gloo ranks, blocks split between them, K all-reduced) == 1 process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    ckpt, _ = ckpt_and_store
    args = [
        "spectrum",
        "--ckpt",
        str(ckpt),
        "--t",
        "100,800",
        "--samples",
        "24",
        "--params",
        PARAM_REGEX,
        "--max-memory",
        "1200K",
        "--top-k",
        "3",
        "--quiet",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [
            str(torchrun),
            "--nproc-per-node",
            "2",
            "--master-port",
            str(29600 + os.getpid() % 1000),
            "-m",
            "geomprobe",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    one = _spectrum(args[1:-1], tmp_path, "one")
    two = json.loads((tmp_path / "two" / "spectrum.json").read_text())
    for a, b in zip(one["rows"], two["rows"], strict=True):
        for key in ("trace", "frobenius", "c_star", "rel_err_diag", "rel_err_rank1", "lambda2_over_lambda1"):
            assert b[key] == pytest.approx(a[key], rel=1e-12), key
        np.testing.assert_allclose(b["eigenvalues"], a["eigenvalues"], rtol=1e-12)


def test_spectrum_of_an_unconditional_attention_pipeline(tmp_path):
    """spectrum --ckpt on a diffusers pipeline directory (attention, unconditional, RGB 8 px, --resize)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    args = ["--ckpt", str(tmp_path / "pipe"), "--dataset", "digits", "--resize", "--t", "100,800", "--samples", "12"]
    out = _spectrum([*args, "--max-memory", "64M"], tmp_path, "spec")
    assert [r["t"] for r in out["rows"]] == [100, 800]
    assert all(
        r["P"] == sum(p.numel() for p in unet.parameters()) and 0 < r["lambda1_over_trace"] <= 1 for r in out["rows"]
    )


def test_top_k_beyond_n_reports_the_n_eigenvalues_that_exist(ckpt_and_store, tmp_path):
    """--top-k 100 on 24 rows: 24 eigenvalues, the best rank-24 error (0), no column for a rank that does not exist."""
    _, store = ckpt_and_store
    res = CliRunner().invoke(
        app, ["spectrum", "--grads", str(store), "--no-model", "--top-k", "100", "--out", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "spectrum.json").read_text())["rows"][0]
    assert len(row["eigenvalues"]) == row["n"] == 24
    assert list(row["rel_err_rankk"]) == ["24"] and row["rel_err_rankk"]["24"] < 1e-6

"""End to end on a real (tiny) gradient store: analyze_store, spectrum.json, cosine maps, the CLI.

The store comes from the probe engine (``extract_gradients``) on an untrained small1 UNet at 8 px
with P <= 2000 selected parameters; the reference is the dense F built from ``store.load(t)``
in numpy float64. Streaming (a --max-memory that forces many row blocks) must give the same rows.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from geomprobe.analysis import analyze_store, write_spectrum
from geomprobe.cli import app
from geomprobe.errors import UsageError
from geomprobe.fisher import GramFisher, StoreRows, fisher_from_store, load_fisher

PARAM_REGEX = r"^(conv_in|conv_out|class_embedding)|norm"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on the shared 2-core machine two OpenMP threads spin against other
    jobs and made these tests 15x slower (measured: Lanczos 74 s vs 4.5 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ROW_KEYS = {
    "t",
    "snr",
    "n",
    "P",
    "eigenvalues",
    "lambda2_over_lambda1",
    "lambda1_over_trace",
    "effective_rank",
    "trace",
    "frobenius",
    "mu_norm",
    "c_star",
    "rel_err_diag",
    "rel_err_rank1",
    "rel_err_rankk",
    "cos_to_mean",
    "cos_v1_mu",
    "scaled_identity_mse",
}


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from geomprobe.checkpoints import ModelInfo, save_checkpoint
    from geomprobe.models import build_scheduler, build_unet
    from geomprobe.probe import ExtractConfig, extract_gradients

    root = tmp_path_factory.mktemp("store")
    torch.manual_seed(0)
    unet = build_unet("small1", 8, 1, 10)
    info = ModelInfo(preset="small1", dataset="digits", image_size=8, channels=1, num_classes=10, seed=0, step=0)
    save_checkpoint(root / "ckpt", unet, build_scheduler(), info)
    config = ExtractConfig(ckpt=str(root / "ckpt"), t="100,700,900", samples=40, params=PARAM_REGEX, shard_rows=16)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_torch_thread
    try:
        extract_gradients(config, root / "grads", device="cpu")
    finally:
        torch.set_num_threads(before)
    return root / "grads"


def dense_numbers(G: np.ndarray, k: int) -> dict:
    n = G.shape[0]
    F = G.T @ G / n
    mu = G.mean(0)
    w = np.linalg.eigvalsh(F)[::-1]
    norm = np.linalg.norm(F)
    c = mu @ F @ mu / (mu @ mu) ** 2
    return {
        "eigenvalues": w[:k],
        "rel_err_diag": np.linalg.norm(F - np.diag(np.diag(F))) / norm,
        "rel_err_rank1": np.linalg.norm(F - c * np.outer(mu, mu)) / norm,
        "rel_err_rankk": np.sqrt(np.sum(w[k:] ** 2)) / norm,
        "trace": np.trace(F),
        "c_star": c,
    }


def test_store_spectrum_matches_dense_and_streaming_is_identical(tiny_store, tmp_path):
    from geomprobe.probe import GradientStore

    store = GradientStore(tiny_store)
    assert store.P <= 2000
    k = 3
    full = analyze_store(store, top_k=k)
    P, n = store.P, store.n(100)
    small_budget = 8 * n * n + 24 * P + 2 * 4 * P * 5  # 5 rows per block: many block pairs
    streamed = analyze_store(store, top_k=k, max_memory=small_budget, with_model=False)
    assert [e.label for e in full.entries] == [100, 700, 900]
    for e, s in zip(full.entries, streamed.entries):
        ref = dense_numbers(store.load(e.label).double().numpy(), k)
        np.testing.assert_allclose(e.spectrum.eigenvalues, ref["eigenvalues"], rtol=1e-4)
        for key in ("rel_err_diag", "rel_err_rank1", "trace", "c_star"):
            assert getattr(e.spectrum, key) == pytest.approx(ref[key], rel=1e-4), key
        assert e.spectrum.rel_err_rankk[str(k)] == pytest.approx(ref["rel_err_rankk"], rel=1e-3, abs=1e-6)
        np.testing.assert_allclose(s.spectrum.eigenvalues, e.spectrum.eigenvalues, rtol=1e-6)
        assert e.scaled_identity_mse is not None and e.scaled_identity_mse > 0
        assert s.scaled_identity_mse is None

    json_path, maps_path = write_spectrum(full, store, tmp_path)
    report = json.loads(json_path.read_text())
    assert set(report) == {"store", "centered", "rows", "mu_cosine"}
    assert all(set(row) == ROW_KEYS for row in report["rows"])
    assert set(report["rows"][0]["cos_to_mean"]) == {"median", "p10", "p90"}
    assert report["mu_cosine"]["t"] == [100, 700, 900]
    M = np.array(report["mu_cosine"]["matrix"])
    mus = [store.load(t).double().mean(0).numpy() for t in (100, 700, 900)]
    assert M[0, 1] == pytest.approx(mus[0] @ mus[1] / np.linalg.norm(mus[0]) / np.linalg.norm(mus[1]), rel=1e-5)
    with h5py.File(maps_path) as f:
        G = store.load(700).double().numpy()
        mu = G.mean(0)
        ref_cos = G @ mu / np.linalg.norm(G, axis=1) / np.linalg.norm(mu)
        np.testing.assert_allclose(f["t700/cos_to_mean"][()], ref_cos, rtol=1e-4, atol=1e-6)
        assert f["t700/labels"].shape == (n,)


def test_band_selection_pools_the_band_timesteps(tiny_store):
    from geomprobe.probe import GradientStore

    store = GradientStore(tiny_store)
    result = analyze_store(store, t_range="low-snr", top_k=2, with_model=False)
    assert [e.label for e in result.entries] == [700, 900, "band-low-snr"]
    pooled = result.entries[-1].spectrum
    G = np.vstack([store.load(700).double().numpy(), store.load(900).double().numpy()])
    assert pooled.n == G.shape[0]
    np.testing.assert_allclose(pooled.eigenvalues, np.linalg.eigvalsh(G.T @ G / G.shape[0])[::-1][:2], rtol=1e-4)
    with pytest.raises(UsageError):
        analyze_store(store, t_range="200", with_model=False)


def test_fisher_from_store_round_trip(tiny_store, tmp_path):
    from geomprobe.probe import GradientStore

    store = GradientStore(tiny_store)
    rank1 = fisher_from_store(store, 700, "rank1")
    assert rank1.info.checkpoint["checksum"] == store.checkpoint["checksum"]
    assert rank1.info.param_names == store.param_names and rank1.info.n == store.n(700)
    loaded = load_fisher(rank1.save(tmp_path / "r1.h5"))
    assert loaded.c_star == pytest.approx(rank1.c_star)
    gram = GramFisher(StoreRows(store, 700), max_memory=2**20 + 8 * 40 * 40)
    G = store.load(700).double()
    v = torch.randn(store.P, dtype=torch.float64)
    torch.testing.assert_close(gram.mv(v), G.T @ (G @ v) / G.shape[0], rtol=1e-5, atol=1e-9)


def test_cli_spectrum_json_and_table(tiny_store, tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        app, ["spectrum", "--grads", str(tiny_store), "--top-k", "3", "--json", "--no-model", "--out", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert [r["t"] for r in report["rows"]] == [100, 700, 900]
    assert (tmp_path / "spectrum.json").is_file() and (tmp_path / "cosine_maps.h5").is_file()
    res = runner.invoke(
        app, ["spectrum", "--grads", str(tiny_store), "--t-range", "700", "--centered", "--out", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    bad = runner.invoke(app, ["spectrum", "--grads", str(tiny_store), "--max-memory", "lots", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "memory" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["spectrum", "--grads", str(tmp_path / "nowhere")])
    assert bad.exit_code == 3

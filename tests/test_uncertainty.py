"""Bootstrap intervals, the n-sweep with its null line, and block shares (issue 16)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_analysis_store import dense_numbers, one_torch_thread, tiny_store  # noqa: F401 - fixtures
from typer.testing import CliRunner

from geomprobe.analysis import analyze_store
from geomprobe.analysis.shares import block_of, direction_shares, group_shares
from geomprobe.analysis.uncertainty import UncertaintyOptions, summarize_spectra
from geomprobe.cli import app
from geomprobe.fisher.resample import bootstrap_indices, bootstrap_intervals, n_sweep, null_gram, squared_gram
from geomprobe.fisher.rows import TensorRows, gram_statistics
from geomprobe.probe import GradientStore


def percentile_interval(values: list[float]) -> list[float]:
    return list(np.percentile(np.asarray(values), [2.5, 97.5]))


def test_bootstrap_intervals_match_direct_resampling_of_G(tiny_store):  # noqa: F811 - the imported fixture
    store = GradientStore(tiny_store)
    G = store.load("t700").double().numpy()[:, :400]  # 400 columns keep the P x P reference cheap
    stats = gram_statistics(TensorRows(G))
    Q = squared_gram(TensorRows(G), 2**28)
    B, seed, k = 25, 7, 3
    ci = bootstrap_intervals(stats.K, Q, B, seed, top_k=k)
    direct: dict[str, list[float]] = {}
    for idx in bootstrap_indices(G.shape[0], B, seed):
        Gb = G[idx]
        d = dense_numbers(Gb, k)
        mu = Gb.mean(0)
        F = Gb.T @ Gb / Gb.shape[0]
        w, V = np.linalg.eigh(F)
        cos = np.abs(Gb @ mu) / (np.linalg.norm(Gb, axis=1) * np.linalg.norm(mu))
        for key, v in {
            "eigenvalues.0": d["eigenvalues"][0],
            "eigenvalues.2": d["eigenvalues"][2],
            "lambda2_over_lambda1": d["eigenvalues"][1] / d["eigenvalues"][0],
            "lambda1_over_trace": d["eigenvalues"][0] / d["trace"],
            "c_star": d["c_star"],
            "rel_err_diag": d["rel_err_diag"],
            "rel_err_rank1": d["rel_err_rank1"],
            f"rel_err_rankk.{k}": d["rel_err_rankk"],
            "cos_v1_mu": abs(V[:, -1] @ mu) / np.linalg.norm(mu),
            "cos_to_mean.median": np.median(cos),
        }.items():
            direct.setdefault(key, []).append(v)
    for key, values in direct.items():
        assert ci[key] == pytest.approx(percentile_interval(values), rel=1e-6, abs=1e-12), key


def planted(n: int, P: int, scales: tuple[float, float], noise: float, seed: int = 0) -> np.ndarray:
    """Rows s1 xi_i a + s2 eta_i b + noise: population lambda2/lambda1 = s2^2 / s1^2 (a, b orthonormal)."""
    rng = np.random.default_rng(seed)
    a, b = np.linalg.qr(rng.standard_normal((P, 2)))[0].T
    xi, eta = rng.standard_normal((2, n, 1))
    return scales[0] * xi * a + scales[1] * eta * b + noise * rng.standard_normal((n, P)) / np.sqrt(P)


def test_n_sweep_converges_to_planted_ratio_and_isotropic_tracks_null():
    n, P = 1024, 3000
    G = planted(n, P, (1.0, 0.5), noise=0.1)
    K = gram_statistics(TensorRows(G)).K
    sweep = n_sweep(K, [32, 128, 1024], P, null_replicates=3)
    errors = [abs(r["lambda2_over_lambda1"] - 0.25) for r in sweep]
    assert errors[-1] < 0.03 and errors[-1] < errors[0]
    assert all(r["lambda2_over_lambda1"] < r["null"]["lambda2_over_lambda1"] for r in sweep)

    iso = np.random.default_rng(1).standard_normal((512, P)) * np.linspace(0.5, 1.5, 512)[:, None]
    sweep = n_sweep(gram_statistics(TensorRows(iso)).K, [64, 256, 512], P, null_replicates=6, seed=3)
    for r in sweep:
        assert r["lambda2_over_lambda1"] == pytest.approx(r["null"]["lambda2_over_lambda1"], abs=0.08)
        assert r["lambda1_over_trace"] == pytest.approx(r["null"]["lambda1_over_trace"], rel=0.15)


def test_null_gram_is_exactly_the_gram_of_random_directions_in_distribution():
    """Bartlett-Wishart cosines have mean 0 and variance 1/P, like those of explicit unit vectors."""
    rng = np.random.default_rng(0)
    norms = np.linspace(1.0, 2.0, 40)
    K = null_gram(norms, 500, rng)
    assert np.diag(K) * 40 == pytest.approx(norms**2)
    C = K * 40 / np.outer(norms, norms)
    off = C[np.triu_indices(40, 1)]
    assert abs(off.mean()) < 0.01 and off.var() == pytest.approx(1 / 500, rel=0.2)


def test_block_shares_sum_to_one_and_match_dense_per_tensor(tiny_store):  # noqa: F811 - the imported fixture
    store = GradientStore(tiny_store)
    result = analyze_store(store, t_range="700", top_k=2, with_model=False, uncertainty=UncertaintyOptions(shares=True))
    shares = result.to_json()["rows"][0]["shares"]
    G = store.load("t700").double().numpy()
    mu = G.mean(0)
    w, V = np.linalg.eigh(G.T @ G / G.shape[0])
    v1 = V[:, -1]
    dense = {"mu": mu**2, "v1": v1**2, "trace": (G**2).mean(0)}
    for what, x in dense.items():
        expected = [x[a:b].sum() / x.sum() for a, b in store.param_slices]
        assert shares[what]["tensors"] == pytest.approx(expected, abs=1e-6), what
        assert sum(shares[what]["blocks"].values()) == pytest.approx(1.0)
        norm = sum(e for e, name in zip(expected, store.param_names, strict=True) if "norm" in name)
        assert shares[what]["norm_layers"] == pytest.approx(norm, abs=1e-6)


def test_block_names_and_group_shares():
    assert block_of("down_blocks.1.resnets.0.conv1.weight") == "down_blocks.1"
    assert block_of("time_embedding.linear_1.bias") == "time_embedding"
    assert block_of("conv_norm_out.weight") == "conv_norm_out"
    g = group_shares(np.array([1.0, 3.0]), ["conv_in.weight", "mid_block.resnets.0.norm1.weight"])
    assert g["blocks"] == {"conv_in": 0.25, "mid_block": 0.75} and g["norm_layers"] == 0.75
    out = direction_shares(["a.w", "b.w"], [(0, 2), (2, 3)], np.array([1.0, 1.0, 2.0]), np.ones(3))
    assert out["mu"]["tensors"] == pytest.approx([2 / 6, 4 / 6]) and "v1" not in out


def test_cli_bootstrap_n_sweep_shares_and_from(tiny_store, tmp_path):  # noqa: F811 - the imported fixture
    runner = CliRunner()
    args = ["spectrum", "--grads", str(tiny_store), "--top-k", "2", "--no-model", "--quiet"]
    res = runner.invoke(
        app, args + ["--bootstrap", "20", "--n-sweep", "10,40", "--shares", "--out", str(tmp_path / "a")]
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "a" / "spectrum.json").read_text())
    assert report["bootstrap"]["seed"] == 0 and report["bootstrap"]["replicates"] == 20
    row = report["rows"][0]
    lo, hi = row["ci"]["lambda2_over_lambda1"]
    assert lo <= hi and len(row["ci"]["eigenvalues"]) == 2 and set(row["ci"]["cos_to_mean"]) == {"median", "p10", "p90"}
    assert [s["n"] for s in row["n_sweep"]] == [10, 40] and "null" in row["n_sweep"][0]
    assert row["n_sweep"][-1]["lambda2_over_lambda1"] == pytest.approx(row["lambda2_over_lambda1"], rel=1e-6)
    assert "v1" in row["shares"]
    again = runner.invoke(app, args + ["--bootstrap", "20", "--out", str(tmp_path / "b")])
    assert again.exit_code == 0
    row_b = json.loads((tmp_path / "b" / "spectrum.json").read_text())["rows"][0]
    assert row_b["ci"] == row["ci"]  # seeded: the same intervals

    summary = summarize_spectra([tmp_path / "a", tmp_path / "b"])
    assert summary["rows"][0]["count"] == 2 and summary["rows"][0]["se"]["lambda2_over_lambda1"] == pytest.approx(0.0)
    res = runner.invoke(app, ["spectrum", "--from", str(tmp_path / "a"), "--from", str(tmp_path / "b"), "--json"])
    assert res.exit_code == 0, res.output
    bad = runner.invoke(app, args + ["--n-sweep", "5,999", "--out", str(tmp_path / "c")])
    assert bad.exit_code != 0 and "--n-sweep" in bad.output


def test_squared_gram_gives_the_diagonal_norm():
    G = torch.randn(12, 30, dtype=torch.float64)
    Q = squared_gram(TensorRows(G), 2**24)
    w = np.ones(12)
    assert w @ Q @ w / 144 == pytest.approx(float(((G**2).mean(0) ** 2).sum()))


def test_uncertainty_figures_from_spectrum_json(tiny_store, tmp_path):  # noqa: F811 - the imported fixture
    from geomprobe.analysis import write_spectrum
    from geomprobe.figures import make_figures

    store = GradientStore(tiny_store)
    options = UncertaintyOptions(bootstrap=10, n_sweep=[10, 20, 40], null_replicates=2, shares=True)
    result = analyze_store(store, top_k=2, with_model=False, uncertainty=options)
    write_spectrum(result, store, tmp_path / "run")
    report = make_figures([tmp_path / "run"], tmp_path / "figs")
    made = {f.name for f in report.made}
    assert {"fig_intervals", "fig_n_sweep", "fig_block_shares"} <= made
    assert (tmp_path / "figs" / "fig_block_shares.png").is_file()
    assert "lambda2/lambda1 [95%]" in (tmp_path / "figs" / "fig_intervals.txt").read_text()


def test_rank1_fisher_file_shares_equal_the_store_mu_shares(tiny_store, tmp_path):  # noqa: F811 - the imported fixture
    from geomprobe.analysis.shares import fisher_file_shares
    from geomprobe.fisher import fisher_from_store

    store = GradientStore(tiny_store)
    fisher_from_store(store, 700, "rank1").save(tmp_path / "fisher-task0.h5")
    shares = fisher_file_shares(tmp_path / "fisher-task0.h5")
    row = analyze_store(store, t_range="700", top_k=2, with_model=False, uncertainty=UncertaintyOptions(shares=True))
    expected = row.to_json()["rows"][0]["shares"]["mu"]
    assert shares["mu"]["tensors"] == pytest.approx(expected["tensors"], abs=1e-6)
    assert shares["names"] == store.param_names


def test_uncertainty_figures_list_nothing_without_the_keys(tmp_path):
    from geomprobe.figures.uncertainty import uncertainty_figures

    class Plain:
        rows = [{"t": 100}]

    assert uncertainty_figures([Plain(), Plain()]) == [] and uncertainty_figures([Plain()]) == []

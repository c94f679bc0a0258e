"""geomprobe audit (issue 12): closed forms of the linear-Gaussian model, the n x n forms against
explicit P x P ones, and every audit.json number recomputed from the kept stores by a dense path."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import scipy.linalg
import torch
from diffusers import UNet2DModel
from scipy.sparse.linalg import LinearOperator, eigsh
from typer.testing import CliRunner

from geomprobe.audit import AuditConfig, parse_checks, run_audit
from geomprobe.checkpoints import ModelInfo, save_checkpoint
from geomprobe.cli import app
from geomprobe.errors import UsageError
from geomprobe.fisher import audit_math as am
from geomprobe.fisher.rows import TensorRows, gram_statistics
from geomprobe.fisher.spectrum import rank1_residual_op_norm
from geomprobe.models import build_scheduler
from geomprobe.probe.store import GradientStore

# --------------------------------------------------------------------------- linear-Gaussian closed forms

D_LG, TAU, GAMMA, DELTA, N_LG = 3, 0.7, 1.0, 0.5, 800


def _linear_gaussian(target: str) -> np.ndarray:
    """Per-sample gradients (n, d^2) of 1/2 ||A x - y||^2 in vec(A), A = (gamma + delta) I, by autodiff.

    y = gamma x (empirical) or A x + xi, xi ~ N(0, I) (the true Fisher of a unit-variance Gaussian predictive).
    """
    gen = torch.Generator().manual_seed(0)
    x = TAU * torch.randn(N_LG, D_LG, generator=gen, dtype=torch.float64)
    A = (GAMMA + DELTA) * torch.eye(D_LG, dtype=torch.float64)
    y = GAMMA * x if target == "empirical" else x @ A.T + torch.randn(N_LG, D_LG, generator=gen, dtype=torch.float64)

    def loss(theta, xi, yi):
        return 0.5 * ((theta.reshape(D_LG, D_LG) @ xi - yi) ** 2).sum()

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(A.reshape(-1), x, y).numpy()


@pytest.fixture(scope="module")
def lg_empirical():
    return _linear_gaussian("empirical")


def test_linear_gaussian_gradient_is_delta_x_xT_with_cosine_one_over_sqrt_d(lg_empirical):
    # g(x) = delta x x^T (not ||x||^2 (A - gamma I)); |cos(g, mu)| = 1/sqrt(d) for every sample, mu = delta tau^2 I
    mu = DELTA * TAU**2 * np.eye(D_LG).reshape(-1)
    cos = lg_empirical @ mu / (np.linalg.norm(lg_empirical, axis=1) * np.linalg.norm(mu))
    np.testing.assert_allclose(np.abs(cos), 1 / math.sqrt(D_LG), rtol=1e-10)


def test_linear_gaussian_empirical_spectrum_matches_closed_form(lg_empirical):
    S = lg_empirical @ lg_empirical.T
    spec = am.spectrum_numbers(S, top_k=D_LG * D_LG)
    unit = DELTA**2 * TAU**4
    lam = spec["eigenvalues"]
    assert lam[0] == pytest.approx(unit * (D_LG + 2), rel=0.2)  # along vec(I)
    sym = D_LG * (D_LG + 1) // 2 - 1  # the other symmetric matrices: 2 delta^2 tau^4
    np.testing.assert_allclose(lam[1 : 1 + sym], 2 * unit, rtol=0.3)
    np.testing.assert_allclose(lam[1 + sym :], 0, atol=1e-12 * lam[0])  # antisymmetric: 0
    assert spec["lambda2_over_lambda1"] == pytest.approx(2 / (D_LG + 2), rel=0.3)
    assert spec["lambda1_over_trace"] == pytest.approx(1 / D_LG, rel=0.15)  # a small gap, yet only 1/d explained
    p = np.array([1 / D_LG] + [2 / (D_LG * (D_LG + 2))] * sym)
    assert spec["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=0.15)


def test_linear_gaussian_stability_closed_form(lg_empirical):
    # c* mu mu^T = lambda1 v1 v1^T, so R = F minus its top part: ||R||_op = lambda2 = 2 delta^2 tau^4,
    # R v1 = 0 (residual bound 0), Davis-Kahan 2/d, v1 = mu
    st = am.stability_numbers(lg_empirical @ lg_empirical.T)
    unit = DELTA**2 * TAU**4
    assert st["residual_op_norm"] == pytest.approx(2 * unit, rel=0.3)
    assert st["dk_bound"] == pytest.approx(2 / D_LG, rel=0.4)
    assert st["c_star"] == pytest.approx((D_LG + 2) / D_LG, rel=0.15)
    assert st["measured_sin"] < 0.15 and st["residual_bound"] < 0.15
    assert st["measured_sin"] <= st["residual_bound"] + 1e-9 <= st["residual_op_bound"] + 2e-9


def test_linear_gaussian_true_fisher_is_isotropic():
    G = _linear_gaussian("true")
    spec = am.spectrum_numbers(G @ G.T, top_k=D_LG * D_LG)
    np.testing.assert_allclose(spec["eigenvalues"], TAU**2, rtol=0.25)  # F = tau^2 I
    assert spec["lambda1_over_trace"] == pytest.approx(1 / D_LG**2, rel=0.3)
    assert spec["effective_rank"] == pytest.approx(D_LG**2, rel=0.05)


def test_linear_map_recovers_the_denoiser_and_its_distance_from_identity():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 6))
    fit = am.linear_map_fit(X, X * (GAMMA + DELTA))
    assert fit["residual"] < 1e-10 and fit["identity_distance"] < 1e-10 and fit["scale"] == pytest.approx(GAMMA + DELTA)
    B = np.diag([1.0, 1, 1, 1, 1, 3])
    fit = am.linear_map_fit(X, X @ B.T + 0.1 * rng.standard_normal((200, 6)))
    a = np.trace(B) / 6
    assert fit["identity_distance"] == pytest.approx(np.linalg.norm(B - a * np.eye(6)) / np.linalg.norm(B), rel=0.05)
    assert 0 < fit["residual"] < 0.2 and not fit["min_norm"]
    assert am.linear_map_fit(X[:4], X[:4])["min_norm"]


# --------------------------------------------------------------------------- n x n forms against explicit ones


def _explicit(G: np.ndarray, w: np.ndarray):
    n = G.shape[0]
    F = G.T @ (w[:, None] * G) / n
    mu = G.T @ w / n
    c = mu @ F @ mu / (mu @ mu) ** 2
    return F, mu, c, F - c * np.outer(mu, mu)


@pytest.mark.parametrize("weighted", [False, True])
def test_residual_norm_from_gram_equals_lanczos_on_explicit_residual(weighted):
    rng = np.random.default_rng(1)
    G = rng.standard_normal((30, 50)) + 0.8 * rng.standard_normal(50)
    w = rng.multinomial(30, np.full(30, 1 / 30)).astype(float) if weighted else np.ones(30)
    F, mu, c, R = _explicit(G, w)
    op = LinearOperator(R.shape, matvec=lambda v: R @ v, dtype=np.float64)
    lanczos = abs(eigsh(op, k=1, which="LM", v0=np.ones(50))[0][0])
    st = am.stability_numbers(G @ G.T, w)
    assert st["residual_op_norm"] == pytest.approx(lanczos, rel=1e-8)
    assert st["c_star"] == pytest.approx(c, rel=1e-10)
    if not weighted:
        stats = gram_statistics(TensorRows(torch.from_numpy(G)), compute_dtype=torch.float64)
        assert rank1_residual_op_norm(stats, c) == pytest.approx(lanczos, rel=1e-8)
    lam, V = np.linalg.eigh(F)
    v1 = V[:, -1]
    sin = math.sqrt(max(0.0, 1 - (v1 @ mu) ** 2 / (mu @ mu)))
    assert st["lambda1"] == pytest.approx(lam[-1], rel=1e-10) and st["lambda2"] == pytest.approx(lam[-2], rel=1e-10)
    assert st["measured_sin"] == pytest.approx(sin, abs=1e-8)
    assert st["residual_bound"] == pytest.approx(np.linalg.norm(R @ v1) / lam[-1], rel=1e-7)
    # the bounds hold: sin <= ||R v1|| / lambda1 <= ||R||_op / lambda1, and sin <= Davis-Kahan
    assert sin <= st["residual_bound"] + 1e-9 <= st["residual_op_bound"] + 2e-9
    assert sin <= st["dk_bound"] + 1e-9


def test_group_cosines_and_top_vectors_match_dense():
    rng = np.random.default_rng(2)
    G = rng.standard_normal((24, 40)) + rng.standard_normal(40)
    groups = [np.arange(0, 10), np.arange(10, 24)]
    w = rng.multinomial(24, np.full(24, 1 / 24)).astype(float) + 0.5
    z = rng.standard_normal(40)
    C, to_z = am.group_mean_cosines(G @ G.T, groups, w, G @ z, float(np.linalg.norm(z)))
    mus = [G[g].T @ w[g] / w[g].sum() for g in groups]
    cos = lambda a, b: a @ b / (np.linalg.norm(a) * np.linalg.norm(b))  # noqa: E731
    assert C[0, 1] == pytest.approx(cos(*mus), rel=1e-10) and to_z[1] == pytest.approx(cos(mus[1], z), rel=1e-10)
    V = am.group_top_vector_cosines(G @ G.T, groups, w)
    v = [np.linalg.eigh(G[g].T @ (w[g][:, None] * G[g]))[1][:, -1] for g in groups]
    assert V[0, 1] == pytest.approx(abs(v[0] @ v[1]), rel=1e-8)
    parts = am.stratified_partition(np.repeat([0, 1, 2], 8), 4, np.random.default_rng(0))
    assert sorted(np.concatenate(parts).tolist()) == list(range(24)) and {len(p) for p in parts} == {6}


def test_parse_checks_refuses_unknown_checks():
    assert parse_checks("3,1") == (1, 3)
    for bad in ("7", "", "1,x"):
        with pytest.raises(UsageError):
            parse_checks(bad)


# --------------------------------------------------------------------------- the command end to end


def _micro_checkpoint(path, seed: int):
    """A geomprobe checkpoint of a micro UNet (a few thousand parameters) for digits at 8 px."""
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), block_out_channels=(4, 8), layers_per_block=1,
        norm_num_groups=4, add_attention=False, num_class_embeds=10,
    )  # fmt: skip
    save_checkpoint(path, unet, build_scheduler(), ModelInfo("micro", "digits", 8, 1, 10, 0, 0))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _micro_checkpoint(tmp_path_factory.mktemp("ckpt") / "micro", seed=0)


@pytest.fixture(scope="module")
def audited(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "a"
    cfg = AuditConfig(
        ckpt=str(ckpt), checks=(1, 2, 3), t_range="200,900", samples=20, seeds=(0, 1), bootstrap=8, shuffles=3
    )
    return run_audit(cfg, out), out, cfg


def _G(store: GradientStore, t: int) -> np.ndarray:
    return store.load(t).double().numpy()


def test_audit_json_has_the_issue_keys(audited):
    doc, out, _ = audited
    assert set(doc) >= {
        "checkpoint",
        "t",
        "samples",
        "seeds",
        "task_dependence",
        "true_vs_empirical",
        "stability",
        "verdicts",
    }
    assert set(doc["task_dependence"]["rows"][0]) >= {
        "t",
        "snr",
        "mean_inter_task_cos",
        "ci",
        "shuffled_control",
        "cos_to_noise_direction",
        "task_cos_matrix",
        "v1_inter_task_cos",
    }
    assert set(doc["true_vs_empirical"]["rows"][0]["true"]) >= {
        "eigenvalues",
        "lambda2_over_lambda1",
        "lambda1_over_trace",
        "effective_rank",
    }
    assert set(doc["stability"]["rows"][0]) >= {
        "lambda1",
        "lambda2",
        "residual_op_norm",
        "dk_bound",
        "residual_bound",
        "measured_sin",
        "vacuous",
        "linear_map_residual",
        "identity_distance",
    }
    assert all(v["supports"] in ("paper", "critique", "neither") for v in doc["verdicts"])
    assert json.loads((out / "audit.json").read_text()) == doc


def test_audit_numbers_recomputed_densely_from_kept_stores(audited):
    doc, out, cfg = audited
    for k, t in enumerate(doc["t"]):
        # check 1: means of the task stores and the x0 = 0 direction, cosines in float64
        per_seed, noise_cos = [], []
        for s in cfg.seeds:
            stores = [GradientStore(out / f"seed-{s}" / "tasks" / f"task-{j}") for j in range(5)]
            mus = [_G(st, t).mean(0) for st in stores]
            M = np.stack(mus) / np.linalg.norm(mus, axis=1)[:, None]
            per_seed.append((M @ M.T)[np.triu_indices(5, 1)].mean())
            with h5py.File(out / f"seed-{s}" / "noise-mean.h5") as f:
                z = f[f"t{t}"][()].astype(np.float64)
            pooled = np.concatenate([_G(st, t) for st in stores]).mean(0)
            noise_cos.append(pooled @ z / (np.linalg.norm(pooled) * np.linalg.norm(z)))
        row = doc["task_dependence"]["rows"][k]
        assert row["mean_inter_task_cos"] == pytest.approx(np.mean(per_seed), rel=1e-5)
        assert row["cos_to_noise_direction"] == pytest.approx(np.mean(noise_cos), rel=1e-5)
        # checks 2 and 3: SVD of the rows (not the Gram route), explicit residual, lstsq by normal equations
        l2l1, trace_ratio, sins, r_ops, lin = [], [], [], [], []
        for s in cfg.seeds:
            Ge, Gt = (_G(GradientStore(out / f"seed-{s}" / tg), t) for tg in ("empirical", "true"))
            n = Ge.shape[0]
            sv = np.linalg.svd(Ge, compute_uv=False) ** 2 / n
            l2l1.append(sv[1] / sv[0])
            trace_ratio.append((Gt**2).sum() / (Ge**2).sum())
            _, _, Vt = np.linalg.svd(Ge, full_matrices=False)
            mu = Ge.mean(0)
            sins.append(math.sqrt(max(0.0, 1 - (Vt[0] @ mu) ** 2 / (mu @ mu))))
            c = np.mean((Ge @ mu) ** 2) / (mu @ mu) ** 2
            R = LinearOperator(
                (Ge.shape[1],) * 2,
                matvec=lambda v, G=Ge, m=mu, c=c, n=n: G.T @ (G @ v) / n - c * m * (m @ v),
                dtype=np.float64,
            )
            r_ops.append(abs(eigsh(R, k=1, which="LM", v0=np.ones(Ge.shape[1]))[0][0]))
            with h5py.File(out / f"seed-{s}" / "linear-map.h5") as f:
                X, Y = f[f"t{t}/x_t"][()].astype(np.float64), f[f"t{t}/eps_hat"][()].astype(np.float64)
            At = scipy.linalg.solve(X.T @ X, X.T @ Y, assume_a="pos")
            lin.append(np.linalg.norm(Y - X @ At) / np.linalg.norm(Y))
        tv, st = doc["true_vs_empirical"]["rows"][k], doc["stability"]["rows"][k]
        assert tv["empirical"]["lambda2_over_lambda1"] == pytest.approx(np.mean(l2l1), rel=1e-5)
        assert tv["trace_ratio"] == pytest.approx(np.mean(trace_ratio), rel=1e-5)
        assert st["measured_sin"] == pytest.approx(np.mean(sins), rel=1e-4, abs=1e-6)
        assert st["residual_op_norm"] == pytest.approx(np.mean(r_ops), rel=1e-5)
        assert st["linear_map_residual"] == pytest.approx(np.mean(lin), rel=1e-4)
        assert st["vacuous"] == (st["dk_bound"] >= 1)
        assert st["measured_sin_ci"][0] <= st["measured_sin_ci"][1]


def test_rerun_skips_finished_checks_and_other_config_is_refused(audited, ckpt):
    doc, out, cfg = audited
    before = (out / "check-1.json").stat().st_mtime_ns
    again = run_audit(cfg, out)
    assert (out / "check-1.json").stat().st_mtime_ns == before and again["task_dependence"] == doc["task_dependence"]
    result = CliRunner().invoke(
        app, ["audit", "--ckpt", str(ckpt), "--t", "200,900", "--samples", "21", "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 2 and "another configuration" in result.output
    result = CliRunner().invoke(
        app, ["audit", "--ckpt", str(ckpt), "--t", "200,1200", "--out", str(out / "x"), "--quiet"]
    )
    assert result.exit_code == 2 and "outside" in result.output and len(result.output.strip().splitlines()) == 1


def test_band_ewc_check_runs_every_band_and_figures_read_audit_json(ckpt, tmp_path, monkeypatch):
    from geomprobe.continual import ContinualConfig
    from geomprobe.figures import make_figures

    monkeypatch.setenv("GEOMPROBE_CACHE", str(tmp_path / "cache"))
    cl = ContinualConfig(model="small1", image_size=8, tasks=2, steps_per_task=2, batch_size=16, fisher_samples=8,
                         n_generated=8, sample_steps=2, replay_per_class=4, replay_batch=8, classifier_steps=20)  # fmt: skip
    cfg = AuditConfig(ckpt=str(ckpt), checks=(4,), t_range="500", samples=10, seeds=(0, 1), continual=cl)
    doc = run_audit(cfg, tmp_path / "a")
    rows = {r["band"]: r for r in doc["band_ewc"]["rows"]}
    assert set(rows) == {"high-snr", "mid-snr", "low-snr", "all"}
    for band, r in rows.items():
        summary = json.loads((tmp_path / "a" / "band-ewc" / band / "summary.json").read_text())
        assert r["afid"] == pytest.approx(summary["afid"]["2"]["mean"]) and r["afid_se"] == pytest.approx(
            summary["afid"]["2"]["stderr"]
        )
        assert r["forgetting"] == pytest.approx(summary["forgetting"]["mean"]) and r["mu_norm"] > 0
    assert rows["all"]["cos_to_all"] == pytest.approx(1.0)
    # the penalty's strength: the rank-1 Fisher's eigenvalue c* ||mu||^2 from the Fisher files, independently
    from geomprobe.fisher import load_fisher

    for band, r in rows.items():
        files = [load_fisher(tmp_path / "a" / "band-ewc" / band / f"seed-{s}" / "fisher-task0.h5") for s in (0, 1)]
        lam1 = [float(f.c_star) * float(f.mu.double().pow(2).sum()) for f in files]
        assert r["penalty_eigenvalue"] == pytest.approx(sum(lam1) / 2, rel=1e-9)
        assert r["penalty_eigenvalue_range"] == pytest.approx([min(lam1), max(lam1)], rel=1e-9)
    assert any(v["claim"].startswith("§3") for v in doc["verdicts"])
    report = make_figures([tmp_path / "a"], tmp_path / "fig")
    made = {f.name for f in report.made}
    assert "audit_band_ewc" in made and (tmp_path / "fig" / "audit_band_ewc.png").exists()
    # the band runs share one strategy name: never drawn as continual runs (Fig. 4/5/7 would mix them)
    assert not made & {"fig4_average_fid", "fig5_samples_across_tasks", "table1"}
    from geomprobe.figures.runs import runs_under

    assert runs_under(tmp_path / "a")["continual"] == []  # so figures --from AUDIT is one run
    assert (tmp_path / "fig" / "audit_band_ewc.txt").read_text().startswith("Audit check 4")


def test_figures_of_checks_1_to_3(audited, tmp_path):
    from geomprobe.figures import make_figures

    _, out, _ = audited
    report = make_figures([out], tmp_path / "fig")
    made = {f.name for f in report.made}
    assert {"audit_task_dependence", "audit_true_vs_empirical", "audit_stability"} <= made
    assert dict(report.skipped)["audit_band_ewc"].startswith(str(out / "audit.json"))
    for stem in ("audit_task_dependence", "audit_stability"):
        assert all((tmp_path / "fig" / f"{stem}.{ext}").exists() for ext in ("png", "pdf", "txt"))


def test_an_audit_directory_of_another_checkpoint_is_refused(audited, ckpt, tmp_path):
    _, out, _ = audited
    other = _micro_checkpoint(tmp_path / "other", seed=1)
    args = [
        "audit",
        "--ckpt",
        str(other),
        "--t",
        "200,900",
        "--samples",
        "20",
        "--seeds",
        "0,1",
        "--tasks",
        "5",
        "--out",
        str(out),
        "--quiet",
    ]
    result = CliRunner().invoke(app, args)
    assert (
        result.exit_code == 2
        and "checkpoint_checksum" in result.output
        and len(result.output.strip().splitlines()) == 1
    )


def test_task_groups_draw_their_own_noise(audited):
    # shared eps_r across tasks would make the low-SNR task means agree by construction
    _, out, _ = audited
    noise = [GradientStore(out / "seed-0" / "tasks" / f"task-{j}").inputs(900).noise for j in range(2)]
    assert not torch.allclose(noise[0][0], noise[1][0])

"""Continual runner: penalties vs hand computations, FID vs scipy, metrics, splits, resume, CLI errors.

References: explicit Python loops over parameters/tasks in float64 (penalties), the closed-form
gradient lambda c* mu mu^T (theta - theta*) (rank-1), scipy.linalg.sqrtm (Frechet distance),
hand-written FID matrices (AFID, forgetting), an uninterrupted run (resume).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from typer.testing import CliRunner

from geomprobe.cli import app
from geomprobe.continual.distill import DistillationTerm
from geomprobe.continual.metrics import afid, forgetting, frechet_distance, mean_and_stderr
from geomprobe.continual.runner import ContinualConfig, run_continual
from geomprobe.continual.strategies import (
    DiagonalPenalty,
    ProjectionPenalty,
    add_fisher_to_penalty,
    flat_parameters,
    make_penalty,
)
from geomprobe.data import task_splits
from geomprobe.errors import UsageError
from geomprobe.fisher import DiagonalFisher, GramFisher, LowRankFisher, Rank1Fisher

P, K, LAM = 7, 3, 15000.0


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(P, generator=g, dtype=torch.float64)
    anchors = [torch.randn(P, generator=g, dtype=torch.float64) for _ in range(K)]
    return g, theta, anchors


def _fishers(kind, g):
    out = []
    for _ in range(K):
        if kind == "diag":
            out.append(DiagonalFisher(torch.rand(P, generator=g, dtype=torch.float64)))
        elif kind == "rank1":
            out.append(
                Rank1Fisher(torch.randn(P, generator=g, dtype=torch.float64), 0.3 + float(torch.rand(1, generator=g)))
            )
        elif kind == "rankk":
            V, _ = torch.linalg.qr(torch.randn(P, 3, generator=g, dtype=torch.float64))
            out.append(LowRankFisher(torch.rand(3, generator=g, dtype=torch.float64) + 0.1, V))
        else:
            out.append(
                GramFisher(torch.randn(5, P, generator=g, dtype=torch.float64), centered=(kind == "full-centered"))
            )
    return out


def _hand_penalty(kind, fishers, theta, anchors, lam):
    """Explicit loops over tasks and parameters (docs/design.md §6 formulas), float64."""
    total = 0.0
    for F, a in zip(fishers, anchors):
        d = [float(theta[j] - a[j]) for j in range(P)]
        if kind == "diag":
            total += sum(float(F.diagonal[j]) * d[j] ** 2 for j in range(P))
        elif kind == "rank1":
            total += F.c_star * sum(float(F.mu[j]) * d[j] for j in range(P)) ** 2
        elif kind == "rankk":
            for r in range(F.rank):
                total += float(F.eigenvalues[r]) * sum(float(F.eigenvectors[j, r]) * d[j] for j in range(P)) ** 2
        else:
            G = F.source.G
            n = G.shape[0]
            total += sum(sum(float(G[i, j]) * d[j] for j in range(P)) ** 2 for i in range(n)) / n
            if kind == "full-centered":
                mu = [float(G[:, j].mean()) for j in range(P)]
                total -= sum(mu[j] * d[j] for j in range(P)) ** 2
    return 0.5 * lam * total


@pytest.mark.parametrize("kind", ["diag", "rank1", "rankk", "full", "full-centered"])
def test_penalty_matches_hand_computation_and_fisher_objects(kind):
    g, theta, anchors = _problem()
    fishers = _fishers(kind, g)
    names = ["w"]
    penalty = make_penalty("full" if kind.startswith("full") else kind, names, LAM)
    for F, a in zip(fishers, anchors):
        add_fisher_to_penalty(penalty, F, a)
    ours = float(penalty.value(theta.float()))
    hand = _hand_penalty(kind, fishers, theta, anchors, LAM)
    objects = sum(float(F.penalty(theta, a, LAM)) for F, a in zip(fishers, anchors))
    # float32 flat views vs float64 loops: relative 1e-5
    assert ours == pytest.approx(hand, rel=1e-5, abs=1e-3)
    assert objects == pytest.approx(hand, rel=1e-10)


def test_projection_penalty_pads_tasks_of_different_rank():
    g, theta, anchors = _problem(1)
    pen = ProjectionPenalty(["w"], 2.0)
    rows = [torch.randn(r, P, generator=g, dtype=torch.float64) for r in (1, 3)]
    w = [torch.rand(r, generator=g, dtype=torch.float64) for r in (1, 3)]
    for r_, w_, a in zip(rows, w, anchors):
        pen.add_task(r_, w_, a)
    hand = sum(float((w_ * (r_ @ (theta - a)) ** 2).sum()) for r_, w_, a in zip(rows, w, anchors))
    assert float(pen.value(theta.float())) == pytest.approx(hand, rel=1e-5)


def test_rank1_penalty_gradient_is_lambda_cstar_mu_mut_d():
    g, theta, anchors = _problem(2)
    mu, c = torch.randn(P, generator=g, dtype=torch.float64), 0.7
    pen = ProjectionPenalty(["w"], LAM)
    add_fisher_to_penalty(pen, Rank1Fisher(mu, c), anchors[0])
    th = theta.float().clone().requires_grad_(True)
    pen.value(th).backward()
    expected = LAM * c * mu * (mu @ (theta - anchors[0]))  # closed form, float64
    assert torch.allclose(th.grad.double(), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def test_diag_penalty_gradient_and_model_term(tiny_unet):
    names = [n for n, _ in tiny_unet.named_parameters()]
    theta0 = flat_parameters(tiny_unet, names).detach()
    Pm = theta0.numel()
    diag = torch.rand(Pm, generator=torch.Generator().manual_seed(3))
    pen = DiagonalPenalty(names, 4.0)
    pen.add_task(diag, theta0 - 0.1)
    value = pen(tiny_unet, 1)["ewc"]
    assert float(value.detach()) == pytest.approx(0.5 * 4.0 * float((diag * 0.01).sum()), rel=1e-4)
    value.backward()
    grads = torch.cat([p.grad.reshape(-1) for _, p in tiny_unet.named_parameters()])
    assert torch.allclose(grads, 4.0 * diag * 0.1, rtol=1e-4, atol=1e-6)


def test_distillation_is_zero_for_a_copy_of_the_teacher(tiny_unet):
    import copy

    from geomprobe.models import build_scheduler

    teacher = copy.deepcopy(tiny_unet)
    images, labels = torch.rand(6, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2])
    term = DistillationTerm(
        teacher, images, labels, build_scheduler().alphas_cumprod, 4, 1.0, torch.Generator().manual_seed(0)
    )
    assert float(term(tiny_unet, 1)["distill"].detach()) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        next(tiny_unet.parameters()).add_(0.5)
    assert float(term(tiny_unet, 2)["distill"].detach()) > 0


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 6))
    b = rng.standard_normal((150, 6)) @ rng.standard_normal((6, 6)) * 0.5 + 0.3
    ours = frechet_distance(torch.from_numpy(a), torch.from_numpy(b))
    assert ours == pytest.approx(_scipy_fid(a, b), rel=1e-6)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0.0, abs=1e-6)


def test_afid_and_forgetting_by_hand():
    fid = {0: {0: 10.0}, 1: {0: 20.0, 1: 5.0}, 2: {0: 30.0, 1: 9.0, 2: 4.0}}
    assert afid(fid) == {"1": 10.0, "2": 12.5, "3": pytest.approx(43.0 / 3)}
    # ((30-10) + (9-5) + (4-4)) / 3: the last task contributes 0
    assert forgetting(fid) == pytest.approx(8.0)
    m, se = mean_and_stderr([1.0, 2.0, 3.0])
    assert (m, se) == (2.0, pytest.approx(np.std([1, 2, 3], ddof=1) / np.sqrt(3)))
    assert np.isnan(mean_and_stderr([4.0])[1])


def test_task_splits_class_incremental():
    assert task_splits(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert task_splits(1000, 20)[1] == list(range(50, 100))
    with pytest.raises(UsageError, match="more than"):
        task_splits(10, 11)


@pytest.fixture
def one_thread():
    """Whole runs on one thread: on a shared 2-core machine two threads per process oversubscribe."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(**kw):
    base = dict(
        model="small1",
        image_size=8,
        tasks=2,
        steps_per_task=4,
        batch_size=16,
        fisher_samples=16,
        rank=2,
        n_generated=8,
        sample_steps=2,
        replay_per_class=4,
        replay_batch=8,
        classifier_steps=20,
    )
    base.update(kw)
    return ContinualConfig(**base)


def test_resume_gives_identical_metrics(tmp_path, one_thread):
    cache = tmp_path / "cache"
    cfg = _tiny(fisher="rank1", gd=True)
    full = run_continual(cfg, tmp_path / "full", seeds=[0], cache_dir=cache)

    class Stop(KeyboardInterrupt):
        pass

    def interrupt(done, fields):
        if fields.get("task") == 1 and done >= cfg.steps_per_task + 2:
            raise Stop()

    with pytest.raises(Stop):
        run_continual(cfg, tmp_path / "cut", seeds=[0], cache_dir=cache, progress=interrupt)
    state = json.loads((tmp_path / "cut" / "seed-0" / "state.json").read_text())
    assert state["completed_task"] == 0
    with pytest.raises(UsageError, match="--resume"):
        run_continual(cfg, tmp_path / "cut", seeds=[0], cache_dir=cache)
    with pytest.raises(UsageError, match="lam"):
        run_continual(
            _tiny(fisher="rank1", gd=True, lam=1.0), tmp_path / "cut", seeds=[0], cache_dir=cache, resume=True
        )
    resumed = run_continual(cfg, tmp_path / "cut", seeds=[0], cache_dir=cache, resume=True)
    assert resumed.seeds[0].resumed_from == 0
    assert resumed.seeds[0].fid == full.seeds[0].fid
    rows = lambda p: [line for line in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(tmp_path / "cut") == rows(tmp_path / "full")
    # the Fisher files are the fisher package's own format, loadable by load_fisher
    from geomprobe.fisher import load_fisher

    f = load_fisher(tmp_path / "cut" / "seed-0" / "fisher-task1.h5")
    assert f.kind == "rank1" and f.info.t_range == "all" and f.info.extra["task"] == 1


def test_metrics_rows_follow_design_section_9(tmp_path, one_thread):
    res = run_continual(_tiny(fisher="diag", steps_per_task=2), tmp_path / "r", seeds=[0, 1], cache_dir=tmp_path / "c")
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in lines if not r.get("summary")]
    summaries = [r for r in lines if r.get("summary")]
    assert len(rows) == 2 * 3 and len(summaries) == 2
    for r in rows:
        assert {
            "seed",
            "strategy",
            "after_task",
            "task",
            "fid",
            "accuracy",
            "n_generated",
            "n_reference",
            "feature_net",
        } <= set(r)
        assert (
            r["task"] <= r["after_task"]
            and r["strategy"] == "diag"
            and r["feature_net"].startswith("digits-classifier@")
        )
    assert set(summaries[0]["afid"]) == {"1", "2"} and "forgetting" in summaries[0]
    assert not np.isnan(res.afid["2"][1])  # two seeds: a standard error


def _error_text(result):
    return (result.stderr if result.stderr_bytes is not None else result.output).strip()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--fisher", "kfac"], "unknown strategy"),
        (["--fisher", "rank1", "--t-range", "ultra-snr"], "t-spec"),
        (["--lambda", "-3"], "--lambda"),
        (["--tasks", "12"], "more than the 10 classes"),
        (["--non-continual", "--fisher", "diag"], "--non-continual"),
        (["--seeds", "a,b"], "--seeds"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, needle):
    result = CliRunner().invoke(app, ["continual", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    text = _error_text(result)
    assert needle in text and "Traceback" not in text and len(text.splitlines()) == 1


@pytest.mark.slow
def test_cli_end_to_end_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOMPROBE_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(
        app,
        [
            "continual",
            "--out",
            str(tmp_path / "o"),
            "--model",
            "small1",
            "--image-size",
            "8",
            "--tasks",
            "2",
            "--steps",
            "3",
            "--fisher",
            "rank1",
            "--gd",
            "--n-generated",
            "8",
            "--sample-steps",
            "2",
            "--replay-per-class",
            "4",
            "--fisher-samples",
            "8",
            "--quiet",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["strategy"] == "rank1+gd"


def test_classifier_is_cached_with_its_accuracy(tmp_path, one_thread):
    from geomprobe.continual.classifier import ClassifierConfig, load_or_train_classifier

    cfg = ClassifierConfig(image_size=8, steps=5)
    first = load_or_train_classifier("digits", 8, cache_dir=tmp_path, config=cfg)
    meta = json.loads((first.path / "classifier.json").read_text())
    assert meta["checksum"] == first.checksum and 0.0 <= meta["test_accuracy"] <= 1.0
    again = load_or_train_classifier("digits", 8, cache_dir=tmp_path, config=cfg)
    assert again.name == first.name == f"digits-classifier@{first.checksum}"
    assert json.loads((first.path / "classifier.json").read_text())["train_seconds"] == meta["train_seconds"]
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    assert torch.equal(first.model.features(x), again.model.features(x)) and first.model.features(x).shape == (
        3,
        cfg.feature_dim,
    )
    (first.path / "model.safetensors").write_bytes(b"corrupt")  # a corrupt cache is retrained, not used
    assert load_or_train_classifier("digits", 8, cache_dir=tmp_path, config=cfg).checksum == first.checksum


def test_task_fisher_estimates_match_explicit_per_sample_gradients(tiny_unet, one_thread):
    """diag / rank1 / full from the runner's estimator vs G from per_sample_grads on the same probe data."""
    from geomprobe.continual.estimate import estimate_task_fisher, probe_batches
    from geomprobe.data import load_dataset
    from geomprobe.models import build_scheduler
    from geomprobe.probe.grads import per_sample_grads, select_parameters
    from geomprobe.timesteps import parse_timesteps

    data = load_dataset("digits", "train", 8).subset([0, 1])
    ac = build_scheduler().alphas_cumprod
    names = select_parameters(tiny_unet)
    spec = parse_timesteps("low-snr")
    batches = probe_batches(data, 12, spec, torch.Generator().manual_seed(5), batch_size=8)
    assert all(int(t) >= min(spec.timesteps) for b in batches for t in b.t)
    G = torch.cat([per_sample_grads(tiny_unet, names, b.x0, b.noise, b.t, b.y, ac) for b in batches]).double()
    mu = G.mean(0)

    def est(kind):
        return estimate_task_fisher(
            kind, tiny_unet, names, data, ac, spec, 12, torch.Generator().manual_seed(5), batch_size=8
        )

    diag = est("diag")
    assert torch.allclose(diag.diagonal.double(), G.pow(2).mean(0), rtol=1e-4, atol=1e-10)
    r1 = est("rank1")
    assert torch.allclose(r1.mu.double(), mu, rtol=1e-3, atol=1e-7)
    assert r1.c_star == pytest.approx(float((G @ mu).pow(2).mean() / mu.pow(2).sum() ** 2), rel=1e-3)
    full = est("full")
    d = torch.randn(G.shape[1], dtype=torch.float64)
    assert float(full.penalty(d, torch.zeros_like(d), 2.0)) == pytest.approx(float((G @ d).pow(2).mean()), rel=1e-4)
    rk = estimate_task_fisher(
        "rankk",
        tiny_unet,
        names,
        data,
        ac,
        spec,
        12,
        torch.Generator().manual_seed(5),
        rank=2,
        batch_size=8,
        power_iterations=3,
    )
    assert rk.rank == 2 and rk.info.extra["method"] == "stochastic_power_iteration"


def test_runner_stores_evaluation_samples_for_figures(tmp_path, one_thread):
    import h5py

    run_continual(_tiny(steps_per_task=2), tmp_path / "r", seeds=[0], cache_dir=tmp_path / "c")
    with h5py.File(tmp_path / "r" / "seed-0" / "samples.h5", "r") as f:
        assert sorted(f.keys()) == ["after_task0", "after_task1"]
        # two tasks of five classes: 8 samples for task 0 (classes 0-4) then 8 for task 1 (classes 5-9)
        labels = f["after_task1/labels"][()].tolist()
        assert f["after_task1/images"].shape == (16, 1, 8, 8)
        assert labels[:8] == [0, 1, 2, 3, 4, 0, 1, 2] and labels[8:] == [5, 6, 7, 8, 9, 5, 6, 7]


def test_paper_lambda_units_keep_the_penalty_to_loss_balance():
    """--lambda in paper units: with our summed loss (D/2 x the per-pixel mean MSE, so gradients
    D/2 x larger and Fisher (D/2)^2 x larger), the total gradient must be exactly D/2 times the
    paper-convention total gradient. Reference: the same objective built explicitly in float64."""
    from geomprobe.continual.runner import penalty_weight
    from geomprobe.fisher import fisher_from_rows

    gen = torch.Generator().manual_seed(0)
    D, n, P = 256, 12, 30
    G_mean = torch.randn(n, P, generator=gen, dtype=torch.float64) * 1e-3  # per-sample grads of the mean-MSE loss
    G_sum = (D / 2) * G_mean  # the same samples under 1/2 ||.||^2 summed over D pixels
    grad_loss_mean = torch.randn(P, generator=gen, dtype=torch.float64)
    theta_star = torch.randn(P, generator=gen, dtype=torch.float64)
    theta = (theta_star + 0.1 * torch.randn(P, generator=gen, dtype=torch.float64)).requires_grad_(True)
    lam = 15000.0
    assert penalty_weight(lam, D, "raw") == lam
    assert penalty_weight(lam, D) == pytest.approx(2 * lam / D)
    for kind in ("diagonal", "rank1", "dense"):
        F_mean = fisher_from_rows(G_mean, kind)
        F_sum = fisher_from_rows(G_sum, kind)
        g_paper = torch.autograd.grad(F_mean.penalty(theta, theta_star, strength=lam), theta)[0] + grad_loss_mean
        g_ours = (
            torch.autograd.grad(F_sum.penalty(theta, theta_star, strength=penalty_weight(lam, D)), theta)[0]
            + (D / 2) * grad_loss_mean
        )
        torch.testing.assert_close(g_ours, (D / 2) * g_paper, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "kw",
    [
        {"replay": "real", "replay_select": "stratified"},
        {"replay": "compact", "budget_bytes": 16},
        {"replay": "compact", "replay_code": "lowres-unet", "budget_bytes": 16},
    ],
)
def test_tiny_run_with_selected_or_compact_replay(tmp_path, kw):
    cfg = _tiny(steps_per_task=2, batch_size=8, n_generated=4, replay_per_class=3, replay_batch=4, **kw)
    cfg.validate()
    res = run_continual(cfg, tmp_path / "run", seeds=[0], cache_dir=tmp_path / "cache")
    assert res.strategy == cfg.strategy and "2" in res.afid


def test_tiny_run_energy_records(tmp_path):
    import h5py
    from scipy.stats import spearmanr

    cfg = _tiny(steps_per_task=2, batch_size=8, n_generated=4, replay="real", energy_records=True)
    res = run_continual(cfg, tmp_path / "run", seeds=[0], cache_dir=tmp_path / "cache")
    seed_dir = tmp_path / "run" / "seed-0"
    (line,) = [json.loads(x) for x in (seed_dir / "intrinsic_forgetting.jsonl").read_text().splitlines()]
    with h5py.File(seed_dir / "energy-task1.h5", "r") as f:
        before, after, labels = f["energy_before"][()], f["energy_after"][()], f["labels"][()]
    assert set(labels.tolist()) == set(task_splits(10, 2)[0]) and line["n"] == len(before)
    assert line["after_task"] == 1 and line["strategy"] == res.strategy
    assert line["spearman"] == pytest.approx(spearmanr(before, after - before).statistic, abs=1e-9)
    lo, hi = line["spearman_ci"]
    assert lo <= line["spearman"] <= hi
    assert line["mean_increase"] == pytest.approx(float(np.mean(after.astype(np.float64) - before)), rel=1e-6)
    assert len(line["increase_by_quantile"]) == 4


def test_tiny_run_in_bf16_keeps_a_float32_fisher(tmp_path):
    """--precision bf16: the training forward under bf16 autocast; the task Fisher is float32 and the
    logged losses stay within 2% of the float32 run's (the same draws; measured 1.4e-3 relative)."""
    from geomprobe.fisher import load_fisher

    logs = {}
    for precision in ("fp32", "bf16"):
        cfg = _tiny(steps_per_task=3, batch_size=8, n_generated=4, fisher="rank1", precision=precision)
        run_continual(cfg, tmp_path / precision, seeds=[0], cache_dir=tmp_path / "cache")
        logs[precision] = [json.loads(x)["loss"] for x in (tmp_path / precision / "seed-0" / "train_log.jsonl").open()]
        assert load_fisher(tmp_path / precision / "seed-0" / "fisher-task0.h5").mu.dtype == torch.float32
    assert logs["bf16"] == pytest.approx(logs["fp32"], rel=0.02)
    with pytest.raises(UsageError, match="unknown --precision"):
        _tiny(precision="fp16").validate()

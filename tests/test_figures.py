"""Figures and tables from tiny synthetic results written in the real formats (docs/design.md §9).

Each figure function must write a PNG of the expected pixel size (figsize x 150 dpi), a PDF and a
caption; missing inputs must raise DataError naming the command that produces them; tables must
carry the synthetic numbers (means and standard errors computed independently here).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from geomprobe import figures as gf
from geomprobe.errors import DataError

TIMESTEPS = [100, 500, 900]


def write_checkpoint_meta(ckpt: Path, preset: str) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    meta = {
        "preset": preset,
        "dataset": "digits",
        "image_size": 16,
        "channels": 1,
        "num_classes": 10,
        "seed": 0,
        "step": 3000,
        "version": "0.1.0",
        "extra": {},
    }
    (ckpt / "geomprobe.json").write_text(json.dumps(meta))


def write_spectrum(run: Path, preset: str = "small3", scale: float = 1.0, n: int = 50) -> Path:
    """A store manifest pointing at a checkpoint, spectrum.json (docs/design.md §9) and cosine_maps.h5."""
    write_checkpoint_meta(run / "ckpt", preset)
    store = run / "grads"
    store.mkdir(parents=True, exist_ok=True)
    (store / "manifest.json").write_text(
        json.dumps({"seed": 7, "checkpoint": {"path": str(run / "ckpt"), "checksum": "x"}})
    )
    rows = []
    for i, t in enumerate(TIMESTEPS):
        ev = [scale * 10.0 ** (2 - i) / (j + 1) ** 2 for j in range(5)]
        rows.append(
            {
                "t": t,
                "snr": [3.0, 0.1, 0.003][i],
                "n": n,
                "P": 1234,
                "eigenvalues": ev,
                "lambda2_over_lambda1": ev[1] / ev[0],
                "lambda1_over_trace": 0.8,
                "trace": sum(ev),
                "frobenius": 1.0,
                "mu_norm": 1.0,
                "c_star": 1.0,
                "rel_err_diag": 0.99,
                "rel_err_rank1": [0.5, 0.3, 0.2][i],
                "rel_err_rankk": {"5": 0.05},
                "cos_to_mean": {"median": 0.9, "p10": 0.5, "p90": 0.99},
                "cos_v1_mu": 0.99,
                "scaled_identity_mse": [0.5, 0.1, 0.01][i],
            }
        )
    matrix = [[1.0 if a == b else 0.9 for b in TIMESTEPS] for a in TIMESTEPS]
    spectrum = {"store": str(store), "centered": False, "rows": rows, "mu_cosine": {"t": TIMESTEPS, "matrix": matrix}}
    path = store / "spectrum.json"
    path.write_text(json.dumps(spectrum))
    rng = np.random.default_rng(0)
    with h5py.File(store / "cosine_maps.h5", "w") as f:
        for t in TIMESTEPS:
            g = f.create_group(f"t{t}")
            g["cos_to_mean"] = rng.uniform(-1, 1, n).astype(np.float32)  # signed, as the analysis writes it
            g["labels"] = np.arange(n) % 10
    return path


STRATEGY_AFID = {  # strategy -> seed -> AFID@1..3
    "gd": {0: [10.0, 12.0, 14.0], 1: [11.0, 13.0, 16.0]},
    "rank1+gd": {0: [10.0, 11.0, 9.0], 1: [12.0, 11.0, 11.0]},
    "rank3+gd": {0: [10.0, 13.0, 15.0], 1: [10.0, 13.0, 17.0]},
    "finetune": {0: [10.0, 40.0, 60.0], 1: [12.0, 44.0, 70.0]},
}
FORGETTING = {
    "gd": {0: 3.0, 1: 5.0},
    "rank1+gd": {0: 0.5, 1: 0.7},
    "rank3+gd": {0: 2.0, 1: 4.0},
    "finetune": {0: 50.0, 1: 54.0},
}


def write_metrics(run: Path) -> Path:
    """The --compare layout of the runner: one directory per strategy with manifest.json, metrics.jsonl
    (all seeds) and seed-{s}/metrics.jsonl (the same rows again, which must not count twice).
    Rows as docs/design.md §9: per-task FID rows, then one summary row per strategy and seed."""
    for strategy, per_seed in STRATEGY_AFID.items():
        directory = run / strategy
        all_rows = []
        for seed, afid in per_seed.items():
            rows = []
            for k in range(3):
                for i in range(k + 1):
                    rows.append(
                        {
                            "seed": seed,
                            "strategy": strategy,
                            "after_task": k,
                            "task": i,
                            "fid": afid[k] + i,
                            "accuracy": 0.9,
                            "n_generated": 64,
                            "n_reference": 64,
                            "feature_net": "digits-classifier@abc",
                        }
                    )
            rows.append(
                {
                    "seed": seed,
                    "strategy": strategy,
                    "summary": True,
                    "afid": {str(k + 1): v for k, v in enumerate(afid)},
                    "forgetting": FORGETTING[strategy][seed],
                }
            )
            (directory / f"seed-{seed}").mkdir(parents=True, exist_ok=True)
            (directory / f"seed-{seed}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            all_rows += rows
        (directory / "manifest.json").write_text(
            json.dumps(
                {"strategy": strategy, "config": {"dataset": "digits", "model": "small3"}, "seeds": list(per_seed)}
            )
        )
        (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in all_rows))
    return run


def write_samples(run: Path, strategies=("gd", "rank1+gd"), tasks: int = 3) -> None:
    """seed-0/samples.h5 per strategy: 4 samples of each class seen so far (2 classes per task), 8x8 px."""
    rng = np.random.default_rng(1)
    for strategy in strategies:
        directory = run / strategy / "seed-0"
        directory.mkdir(parents=True, exist_ok=True)
        (run / strategy / "manifest.json").write_text(
            json.dumps({"strategy": strategy, "config": {"dataset": "digits"}})
        )
        with h5py.File(directory / "samples.h5", "w") as f:
            for k in range(tasks):
                labels = np.repeat(np.arange(2 * (k + 1)), 4)
                f[f"after_task{k}/images"] = rng.uniform(-1, 1, (labels.size, 1, 8, 8)).astype(np.float32)
                f[f"after_task{k}/labels"] = labels


def assert_figure(out: Path, stem: str, size_px: tuple[int, int]) -> None:
    png, pdf, caption = out / f"{stem}.png", out / f"{stem}.pdf", out / f"{stem}.txt"
    assert png.stat().st_size > 2000, "PNG is (nearly) empty"
    with Image.open(png) as im:
        assert im.size == size_px
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 5, "PNG has no visible content"
    assert pdf.read_bytes()[:5] == b"%PDF-"
    text = caption.read_text()
    assert "data source:" in text and "model:" in text and "seeds:" in text
    assert not list(out.glob("*.tmp*")), "temporary files left behind"


@pytest.fixture(scope="module")
def spectrum_path(tmp_path_factory) -> Path:
    return write_spectrum(tmp_path_factory.mktemp("spec") / "run")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return gf.results.find_continual([write_metrics(tmp_path_factory.mktemp("cl") / "cl")])


@pytest.mark.parametrize(
    "func, stem, size",
    [
        (gf.fig1_scaled_identity_mse, "fig1_scaled_identity_mse", (960, 600)),
        (gf.fig3a_mu_cosine, "fig3a_mu_cosine", (960, 840)),
        (gf.fig3b_eigenvalues, "fig3b_eigenvalues", (960, 600)),
        (gf.fig3c_eigengap_ratio, "fig3c_eigengap_ratio", (960, 600)),
        (gf.fig3d_approximation_errors, "fig3d_approximation_errors", (960, 600)),
    ],
)
def test_spectrum_line_figures(func, stem, size, spectrum_path, tmp_path):
    result = func(spectrum_path, tmp_path)
    assert_figure(tmp_path, stem, size)
    caption = (tmp_path / f"{stem}.txt").read_text()
    assert "small3 trained on digits" in caption and "n: 50 samples per t" in caption and "seeds: 7" in caption
    assert result.png == tmp_path / f"{stem}.png"


def test_fig1_caption_carries_the_stored_values(spectrum_path, tmp_path):
    gf.fig1_scaled_identity_mse(spectrum_path, tmp_path)
    assert "t=900: 0.01" in (tmp_path / "fig1_scaled_identity_mse.txt").read_text()


def test_fig2_one_panel_per_timestep(spectrum_path, tmp_path):
    gf.fig2_cosine_maps(spectrum_path, tmp_path)
    # 3 panels of 2.0 x 2.3 in + colour bar 0.9 in + title 0.5 in, at 150 dpi
    assert_figure(tmp_path, "fig2_cosine_maps", (round((3 * 2.0 + 0.9) * 150), round((2.3 + 0.5) * 150)))
    assert gf.spectra.cosine_map_grid_shape(50) == (7, 8)


def test_fig6_needs_two_models_and_draws_a_row_each(tmp_path):
    small1 = write_spectrum(tmp_path / "small1", preset="small1", scale=0.1)
    small3 = write_spectrum(tmp_path / "small3", preset="small3")
    with pytest.raises(DataError, match="geomprobe train --model small1"):
        gf.fig6_model_sizes([small3], tmp_path / "out")
    gf.fig6_model_sizes([small1, small3], tmp_path / "out")
    assert_figure(tmp_path / "out", "fig6_model_sizes", (1500, round((2 * 3.0 + 0.4) * 150)))
    assert "small1" in (tmp_path / "out" / "fig6_model_sizes.txt").read_text()


def test_fig4_and_task_curves(runs, tmp_path):
    gf.fig4_average_fid(runs, tmp_path)
    assert_figure(tmp_path, "fig4_average_fid", (round((4.8 + 1.8) * 150), 600))
    caption = (tmp_path / "fig4_average_fid.txt").read_text()
    assert "2 seeds (0, 1)" in caption and "rank1+gd: AFID@3 = 10.00" in caption
    gf.fig_task_fid(runs["digits"], tmp_path)
    assert_figure(tmp_path, "fig7_task_fid_digits", (round((3 * 3.0 + 1.8) * 150), round((2.8 + 0.4) * 150)))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def mean_se(values):
    v = np.array(values, dtype=float)
    return v.mean(), v.std(ddof=1) / math.sqrt(v.size)


def test_fig5_from_stored_samples_and_its_absence(tmp_path):
    with pytest.raises(DataError, match="samples.h5"):
        gf.figures_samples.find_sample_grids([tmp_path])
    write_samples(tmp_path / "cl")
    samples = gf.figures_samples.find_sample_grids([tmp_path / "cl"])
    gf.fig5_samples_across_tasks(samples, tmp_path / "out")
    # 2 classes (0 from task 0, 2 from task 1) x 2 strategies, 3 task columns
    width, height = gf.figures_samples.fig5_layout(2, 2, 3)
    assert_figure(tmp_path / "out", "fig5_samples_across_tasks", (round(width * 150), round(height * 150)))
    assert "class(es) 0, 2" in (tmp_path / "out" / "fig5_samples_across_tasks.txt").read_text()


def test_table1_matches_the_synthetic_numbers(runs, tmp_path):
    gf.table1_final_afid(runs, tmp_path)
    rows = {r["strategy"]: r for r in read_csv(tmp_path / "table1.csv")}
    assert set(rows) == set(STRATEGY_AFID) and len(read_csv(tmp_path / "table1.csv")) == len(STRATEGY_AFID)
    for strategy, per_seed in STRATEGY_AFID.items():
        afid_mean, afid_se = mean_se([v[-1] for v in per_seed.values()])
        f_mean, f_se = mean_se(list(FORGETTING[strategy].values()))
        row = rows[strategy]
        assert float(row["afid_mean"]) == pytest.approx(afid_mean, rel=1e-5)
        assert float(row["afid_se"]) == pytest.approx(afid_se, rel=1e-5)
        assert float(row["forgetting_mean"]) == pytest.approx(f_mean, rel=1e-5)
        assert float(row["forgetting_se"]) == pytest.approx(f_se, rel=1e-5)
        assert row["seeds"] == "2" and row["tasks"] == "3"
    md = (tmp_path / "table1.md").read_text()
    assert "| rank1+gd | 10.00 ± 1.00 | 0.60 ± 0.10 |" in md


def test_table5_and_table6(runs, tmp_path):
    gf.table5_low_rank(runs, tmp_path)
    rows = read_csv(tmp_path / "table5.csv")
    assert [r["rank"] for r in rows] == ["1", "3"]
    assert float(rows[1]["final_fid_mean"]) == pytest.approx(16.0)
    gf.table6_finetune(runs, tmp_path)
    (row,) = read_csv(tmp_path / "table6.csv")
    assert row["dataset"] == "digits" and float(row["final_fid_mean"]) == pytest.approx(65.0)
    assert float(row["forgetting_mean"]) == pytest.approx(52.0)
    assert "| digits | 65.00 ± 5.00 | 52.00 ± 2.00 |" in (tmp_path / "table6.md").read_text()


def test_missing_inputs_name_the_producing_command(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="geomprobe spectrum --grads"):
        gf.fig1_scaled_identity_mse(empty / "spectrum.json", tmp_path)
    with pytest.raises(DataError, match="geomprobe continual"):
        gf.results.find_continual([empty])
    spectrum = write_spectrum(tmp_path / "run")
    (spectrum.parent / "cosine_maps.h5").unlink()
    with pytest.raises(DataError, match="geomprobe spectrum --grads"):
        gf.fig2_cosine_maps(spectrum, tmp_path / "out")
    data = json.loads(spectrum.read_text())
    for row in data["rows"]:
        del row["scaled_identity_mse"]
    spectrum.write_text(json.dumps(data))
    with pytest.raises(DataError, match="scaled_identity_mse.*geomprobe spectrum"):
        gf.fig1_scaled_identity_mse(spectrum, tmp_path / "out")
    with pytest.raises(DataError, match="geomprobe spectrum"):
        gf.make_figures([empty], tmp_path / "out")


def test_make_figures_discovers_everything_and_reports_what_it_skipped(tmp_path):
    write_spectrum(tmp_path / "runs" / "quick")
    write_metrics(tmp_path / "runs" / "cl")
    write_samples(tmp_path / "runs" / "cl")
    report = gf.make_figures([tmp_path / "runs"], tmp_path / "figures")
    names = {fig.name for fig in report.made}
    assert {
        "fig1_scaled_identity_mse",
        "fig2_cosine_maps",
        "fig3a_mu_cosine",
        "fig3b_eigenvalues",
        "fig3c_eigengap_ratio",
        "fig3d_approximation_errors",
        "fig4_average_fid",
        "fig7_task_fid_digits",
        "table1",
        "table5",
        "table6",
        "fig5_samples_across_tasks",
    } <= names
    skipped = dict(report.skipped)
    assert "fig6" in skipped and "geomprobe train --model small1" in skipped["fig6"]
    manifest = json.loads((tmp_path / "figures" / "manifest.json").read_text())
    assert "fig1_scaled_identity_mse.png" in manifest["files"] and "fig6" in manifest["skipped"]
    assert any(i["path"].endswith("spectrum.json") and len(i["sha256"]) == 64 for i in manifest["inputs"])


def test_cli_figures_writes_files_and_fails_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from geomprobe.cli import app

    write_spectrum(tmp_path / "a")
    runner = CliRunner()
    ok = runner.invoke(app, ["figures", "--from", str(tmp_path / "a"), "--out", str(tmp_path / "figs"), "--json"])
    assert ok.exit_code == 0, ok.output
    assert "fig3c_eigengap_ratio" in json.loads(ok.stdout)["figures"]
    (tmp_path / "empty").mkdir()
    bad = runner.invoke(app, ["figures", "--from", str(tmp_path / "empty"), "--out", str(tmp_path / "figs")])
    assert bad.exit_code == 3
    assert "geomprobe spectrum" in bad.output and "Traceback" not in bad.output


# ---------------------------------------------------------------- the figures command: where, and which run (issue 14)


def _figures_cli(args):
    from typer.testing import CliRunner

    from geomprobe.cli import app

    result = CliRunner().invoke(app, ["figures", *args])
    text = (result.stderr if result.stderr_bytes is not None else result.output).strip()
    return result.exit_code, text


def test_cli_figures_default_out_is_the_run_not_the_cwd(tmp_path, monkeypatch):
    write_spectrum(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    code, text = _figures_cli(["--from", "run", "--quiet"])
    assert code == 0, text
    assert (tmp_path / "run" / "figures" / "fig3c_eigengap_ratio.png").is_file()
    assert not (tmp_path / "figures").exists()
    code, text = _figures_cli(["--from", "run", "--from", "run"])  # several runs: say where
    assert code == 2 and "--out" in text and len(text.splitlines()) == 1, text


def test_cli_figures_refuses_a_directory_of_several_runs(tmp_path):
    write_spectrum(tmp_path / "runs" / "a")
    write_spectrum(tmp_path / "runs" / "b")
    code, text = _figures_cli(["--from", str(tmp_path / "runs"), "--out", str(tmp_path / "figs")])
    assert code == 2 and len(text.splitlines()) == 1, text
    assert "2 spectrum runs" in text and str(tmp_path / "runs" / "a") in text and str(tmp_path / "runs" / "b") in text
    assert "--from" in text and not (tmp_path / "figs").exists()
    write_metrics(tmp_path / "cls" / "one")
    write_metrics(tmp_path / "cls" / "two")
    code, text = _figures_cli(["--from", str(tmp_path / "cls"), "--out", str(tmp_path / "figs")])
    assert code == 2 and "2 continual runs" in text, text
    # one run each, named on purpose: drawn side by side
    code, text = _figures_cli(
        [
            "--from",
            str(tmp_path / "runs" / "a"),
            str(tmp_path / "runs" / "b"),
            "--out",
            str(tmp_path / "figs"),
            "--quiet",
        ]
    )
    assert code == 0, text


def test_cli_figures_takes_a_reproduce_run_with_several_models(tmp_path):
    """OUT/models/<preset>/ of `geomprobe reproduce --models a,b` is one run: Fig. 6 compares its models."""
    for preset in ("small1", "small3"):
        write_spectrum(tmp_path / "rep" / "models" / preset, preset=preset)
    write_metrics(tmp_path / "rep" / "continual")
    code, text = _figures_cli(["--from", str(tmp_path / "rep"), "--json"])
    assert code == 0, text
    assert (tmp_path / "rep" / "figures" / "fig6_model_sizes.png").is_file()

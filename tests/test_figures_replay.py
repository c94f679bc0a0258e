"""The replay comparison table (geomprobe/figures/replay.py) on constructed run directories."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from geomprobe.errors import DataError
from geomprobe.figures.replay import table_replay


def _run(root, name, replay, code="pca", budget=0, per_class=16, intrinsic=None, finished=True, seeds=(0, 1, 2)):
    """A continual run directory as the runner leaves it (only what the table reads)."""
    d = root / name
    config = dict(replay=replay, replay_code=code, budget_bytes=budget, replay_per_class=per_class)
    config.update(replay_select="random", dataset="digits", image_size=16)
    manifest = json.dumps({"tool": "geomprobe continual", "config": config})
    d.mkdir()
    (d / "manifest.json").write_text(manifest)
    (d / "metrics.jsonl").write_text("")
    for s in seeds:
        (d / f"seed-{s}").mkdir()
        (d / f"seed-{s}" / "manifest.json").write_text(manifest)  # the runner writes one per seed too
        (d / f"seed-{s}" / "metrics.jsonl").write_text("")
        if intrinsic is not None:
            rows = [{"spearman": r, "increase_by_quantile": q} for r, q in intrinsic[s]]
            (d / f"seed-{s}" / "intrinsic_forgetting.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        se = (lambda v: v) if len(seeds) > 1 else (lambda v: None)  # the runner writes null for one seed
        summary = {
            "seeds": list(seeds),
            "afid": {"1": {"mean": 30.0, "stderr": se(1.0)}, "5": {"mean": 12.5, "stderr": se(0.5)}},
            "forgetting": {"mean": -1.0, "stderr": se(0.25)},
            "final_accuracy": {"mean": 0.9, "stderr": se(0.01)},
        }
        (d / "summary.json").write_text(json.dumps(summary))
    return d


def _csv(out):
    with open(out / "table_replay.csv") as f:
        return {row["run"]: row for row in csv.DictReader(f)}


def test_memory_per_exemplar_and_the_intrinsic_forgetting_means(tmp_path):
    rng = np.random.default_rng(0)
    intrinsic = {s: [(float(rng.uniform(-1, 1)), rng.normal(size=4).tolist()) for _ in range(4)] for s in range(3)}
    runs = [
        _run(tmp_path, "real", "real", per_class=16, intrinsic=intrinsic),
        _run(tmp_path, "pca", "compact", "pca", 64, per_class=64),
        _run(tmp_path, "unet", "compact", "lowres-unet", 32, per_class=128),
        _run(tmp_path, "gd", "none"),  # not a replay run: no row
    ]
    table_replay(runs, tmp_path / "out")
    rows = _csv(tmp_path / "out")
    assert set(rows) == {"real", "pca", "unet"}
    assert (rows["real"]["bytes_per_exemplar"], rows["real"]["basis_bytes"]) == ("256", "0")  # 1 x 16 x 16 uint8
    assert (rows["pca"]["bytes_per_exemplar"], rows["pca"]["basis_bytes"]) == ("64", str(4 * 17 * 256))  # k = 16
    assert rows["unet"]["bytes_per_exemplar"] == "25"  # a 5 x 5 thumbnail: 25 <= 32 < 36
    per_seed_rho = [np.mean([r for r, _ in intrinsic[s]]) for s in range(3)]
    assert float(rows["real"]["rho_mean"]) == pytest.approx(np.mean(per_seed_rho), rel=1e-5)
    assert float(rows["real"]["rho_se"]) == pytest.approx(np.std(per_seed_rho, ddof=1) / np.sqrt(3), rel=1e-5)
    q4 = [np.mean([q[3] for _, q in intrinsic[s]]) for s in range(3)]
    assert float(rows["real"]["increase_q4_mean"]) == pytest.approx(np.mean(q4), rel=1e-5)
    assert rows["pca"]["rho_mean"] == "" and float(rows["pca"]["afid_mean"]) == 12.5  # AFID at the final task
    assert (
        "| unet | compact lowres-unet 32 B, select random | 25 | 128 | 3200 | 12.50 ± 0.50 (T = 5) |"
        in (tmp_path / "out" / "table_replay.md").read_text()
    )


def test_an_unfinished_replay_run_or_no_replay_run_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="unfinished"):
        table_replay([_run(tmp_path, "half", "real", finished=False)], tmp_path / "out")
    with pytest.raises(DataError, match="needs continual runs with replay"):
        table_replay([_run(tmp_path, "gd", "none"), tmp_path / "missing"], tmp_path / "out")


def test_one_seed_missing_values_and_a_parent_directory(tmp_path):
    """null errors (one seed), a null rho, a task change with fewer than 4 energy bins; runs found below a parent."""
    rows = {0: [(None, [0.5, None, 1.5]), (0.25, [1.0, 2.0, 3.0, 4.0])]}
    _run(tmp_path, "one", "real", intrinsic=rows, seeds=(0,))
    _run(tmp_path, "gd", "none")
    table_replay([tmp_path], tmp_path / "out")
    row = _csv(tmp_path / "out")["one"]
    assert row["afid_se"] == "" and row["seeds"] == "1"
    assert float(row["rho_mean"]) == pytest.approx(0.25)  # the null rho left out
    assert float(row["increase_q1_mean"]) == pytest.approx(0.75)
    assert float(row["increase_q2_mean"]) == pytest.approx(2.0)  # the null bin left out
    assert float(row["increase_q4_mean"]) == pytest.approx(4.0)  # the short row padded
    assert (
        "| one | real images, select random | 256 | 16 | 4096 | 12.50 (T = 5) |"
        in (tmp_path / "out" / "table_replay.md").read_text()
    )

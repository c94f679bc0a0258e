"""`geomprobe reproduce` end to end on a tiny configuration: every stage runs, then a rerun skips them all.

The quick preset is shrunk through overrides (2 training steps, 16 samples at two timesteps), so
this checks the wiring of train -> grads -> spectrum -> figures and the resume rule, not numbers.
"""

from __future__ import annotations

import json

import pytest

from geomprobe.errors import UsageError
from geomprobe.reproduce import reproduce, stage_keys

TINY = {"train_steps": 2, "samples": 16, "t_range": "100,900"}


class RecordingProgress:
    def __init__(self):
        self.started, self.finished = [], {}

    def start(self, stage, label, total):
        self.started.append(stage)

    def update(self, stage, done, total=None, info=""):
        assert stage in self.started

    def finish(self, stage, status):
        self.finished[stage] = status


def test_reproduce_runs_every_stage_then_resumes_by_skipping(tmp_path):
    progress = RecordingProgress()
    result = reproduce("quick", tmp_path / "run", device="auto", progress=progress, **TINY)  # the CLI default
    keys = [k for k, _ in stage_keys(result.preset, with_continual=False)]
    assert [s.stage for s in result.stages] == keys == ["train:small3", "grads:small3", "spectrum:small3", "figures"]
    assert all(s.status == "done" for s in result.stages)
    spectrum = json.loads((tmp_path / "run" / "models" / "small3" / "grads" / "spectrum.json").read_text())
    assert [row["t"] for row in spectrum["rows"]] == [100, 900] and spectrum["rows"][0]["n"] == 16
    made = {p.name for p in result.figures}
    assert {"fig1_scaled_identity_mse.png", "fig2_cosine_maps.png", "fig3d_approximation_errors.pdf"} <= made
    assert "fig4" in dict(result.skipped_figures)  # no continual run without --with-continual

    again = reproduce("quick", tmp_path / "run", device="cpu", progress=RecordingProgress(), **TINY)
    assert [s.status for s in again.stages] == ["skipped"] * 4
    assert {p.name for p in again.figures} == made


def test_reproduce_rejects_unknown_presets_and_settings(tmp_path):
    with pytest.raises(UsageError, match="unknown preset"):
        reproduce("huge", tmp_path)
    with pytest.raises(UsageError, match="unknown preset setting"):
        reproduce("quick", tmp_path, epochs=3)
    with pytest.raises(UsageError, match="--data-root"):
        reproduce("paper", tmp_path)


def test_cli_models_override_rejects_unknown_unet_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from geomprobe.cli import app

    result = CliRunner().invoke(app, ["reproduce", "--models", "small1,huge", "--out", str(tmp_path / "r"), "--quiet"])
    assert result.exit_code == 2
    text = result.output.strip()
    assert "unknown model preset 'huge'" in text and len(text.splitlines()) == 1 and "Traceback" not in text
    assert not (tmp_path / "r").exists()

"""Faults of checkpoints, Fisher files and continual state (issue 14): one line naming the file, never wrong data.

Each case damages a copy of a tiny checkpoint (small1 at 8 px, 2 training steps) or of a tiny finished
continual run (2 tasks, rank-1 EWC) the way the fault-injection harness did, and requires a DataError
whose one-line message names the damaged file (through the CLI: exit code 3, no traceback), or, where
the damage is an interrupted append, a resume that drops it and ends as the undamaged run.
"""

import json
import shutil
import socket

import h5py
import pytest
import torch
from typer.testing import CliRunner

from geomprobe.checkpoints import load_model
from geomprobe.cli import app
from geomprobe.errors import DataError
from geomprobe.fisher import Rank1Fisher, load_fisher
from geomprobe.training import TrainConfig, train

runner = CliRunner()


def _text(result) -> str:
    return (result.stderr if result.stderr_bytes is not None else result.output).strip()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "model"
    config = TrainConfig(model="small1", image_size=8, steps=2, batch_size=8, checkpoint_every=2, device="cpu")
    train(config, out)
    return out, config


@pytest.fixture
def ckpt(trained, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(trained[0], out)
    return out


def _edit_json(path, **changes):
    value = json.loads(path.read_text())
    value.update(changes)
    path.write_text(json.dumps(value))


def _one_line_error(args, needle):
    result = runner.invoke(app, [str(a) for a in args])
    text = _text(result)
    assert result.exit_code == 3, text
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    for part in [needle] if isinstance(needle, str) else needle:
        assert part in text, text
    return text


def _grads_and_sample(ckpt, tmp_path, needle):
    _one_line_error(
        ["grads", "--ckpt", ckpt, "--t", "100", "--samples", "4", "--out", tmp_path / "g", "--quiet"], needle
    )
    _one_line_error(
        ["sample", "--ckpt", ckpt, "--out", tmp_path / "s.png", "--steps", "2", "--n", "2", "--quiet"], needle
    )


# ---------------------------------------------------------------- checkpoints against their configs


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"layers_per_block": 2}, "the weights lack 22 tensor(s)"),  # loaded silently with random tensors before
        ({"block_out_channels": [32]}, "size mismatch for conv_in.weight"),
        ({"num_class_embeds": 12}, "size mismatch for class_embedding.weight"),
    ],
)
def test_unet_config_that_does_not_match_the_weights(ckpt, tmp_path, change, needle):
    _edit_json(ckpt / "unet" / "config.json", **change)
    config, weights = ckpt / "unet" / "config.json", ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(DataError, match=needle.replace("(", r"\(").replace(")", r"\)")) as exc:
        load_model(ckpt)
    assert f"{config} does not match {weights}" in str(exc.value)
    _grads_and_sample(ckpt, tmp_path, [str(config), needle])


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"num_classes": "ten"}, "num_classes='ten'"),
        ({"image_size": "8"}, "image_size='8' is not an int"),
        ({"seed": "x"}, "seed='x' is not an int"),
        ({"extra": []}, "extra=[] is not a dict"),
        ({"channels": 0}, "channels=0 is not positive"),
        ({"oops": 1}, "unknown key 'oops'"),
    ],
)
def test_geomprobe_json_types_and_values(ckpt, tmp_path, change, needle):
    _edit_json(ckpt / "geomprobe.json", **change)
    _grads_and_sample(ckpt, tmp_path, [str(ckpt / "geomprobe.json"), needle])


def test_image_size_disagreeing_with_the_unet_config(ckpt, tmp_path):
    _edit_json(ckpt / "geomprobe.json", image_size=16)
    _grads_and_sample(ckpt, tmp_path, ["image_size=16", str(ckpt / "unet" / "config.json"), "sample_size=8"])


def test_geomprobe_checkpoint_without_scheduler_is_refused(ckpt, tmp_path):
    shutil.rmtree(ckpt / "scheduler")
    _grads_and_sample(ckpt, tmp_path, str(ckpt / "scheduler" / "scheduler_config.json"))


def test_intermediate_checkpoint_is_used_with_a_note_by_grads_and_sample(ckpt, tmp_path):
    """As tests/test_faults.py::test_intermediate_checkpoint_loads_with_a_note, through the commands."""
    meta = json.loads((ckpt / "geomprobe.json").read_text())
    meta["extra"].update(training_complete=False)
    meta["extra"]["train_config"]["steps"] = 9
    (ckpt / "geomprobe.json").write_text(json.dumps(meta))
    for args in (
        ["grads", "--ckpt", ckpt, "--t", "100", "--samples", "4", "--out", tmp_path / "g", "--quiet"],
        ["sample", "--ckpt", ckpt, "--out", tmp_path / "s.png", "--steps", "2", "--n", "2", "--quiet"],
    ):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, _text(result)
        notes = [line for line in _text(result).splitlines() if "intermediate checkpoint at step 2 of 9" in line]
        assert len(notes) == 1, _text(result)


def test_loading_never_touches_the_network(ckpt, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert load_model(ckpt).info.image_size == 8
    shutil.rmtree(ckpt / "scheduler")
    with pytest.raises(DataError, match="scheduler_config.json is missing"):
        load_model(ckpt)
    (ckpt / "geomprobe.json").unlink()  # a pipeline directory without scheduler/: the documented default
    (ckpt / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DModel"]}))
    model = load_model(ckpt)
    assert model.layout == "pipeline" and len(model.notes) == 1 and "DDPM default" in model.notes[0]


# ---------------------------------------------------------------- resumable training state


def _resume(ckpt, trained):
    return ["train", "--out", ckpt, "--model", "small1", "--image-size", "8", "--steps", "3", "--batch-size", "8"] + [
        "--checkpoint-every",
        "2",
        "--resume",
        "--quiet",
    ]


def test_truncated_optimizer_state(ckpt, trained):
    path = ckpt / "optimizer.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _one_line_error(_resume(ckpt, trained), [str(path), "not a readable safetensors file"])


@pytest.mark.parametrize(
    "text, needle",
    [
        ("{garbage", "is not valid JSON"),
        ("[1, 2]", "is not a JSON object"),
        ('{"step": "2", "generator": "x", "param_groups": []}', "step='2'"),
        ('{"step": 2, "generator": "not base64!", "param_groups": []}', "no usable generator state"),
        ('{"step": 1, "generator": "", "param_groups": []}', "no usable generator state"),
    ],
)
def test_garbage_train_state(ckpt, trained, text, needle):
    (ckpt / "train_state.json").write_text(text)
    _one_line_error(_resume(ckpt, trained), [str(ckpt / "train_state.json"), needle])


def test_train_state_of_another_step(ckpt, trained):
    _edit_json(ckpt / "train_state.json", step=1)
    _one_line_error(_resume(ckpt, trained), [str(ckpt / "train_state.json"), "at step 1", "at step 2"])


# ---------------------------------------------------------------- Fisher files


def _rank1(P, seed, checksum="aaaa", names=("a", "b")):
    g = torch.Generator().manual_seed(seed)
    fisher = Rank1Fisher(torch.randn(P, generator=g, dtype=torch.float64), 0.5)
    fisher.info.checkpoint = {"path": "x", "checksum": checksum}
    fisher.info.param_names, fisher.info.param_shapes = list(names), [[P - 2], [2]]
    return fisher


def test_fisher_file_carries_and_checks_checkpoint_and_layout(tmp_path):
    path = _rank1(6, 0).save(tmp_path / "f.h5")
    with h5py.File(path, "r") as f:
        assert len(f.attrs["layout_digest"]) == 16 and f.attrs["P"] == 6
    standalone = load_fisher(path)  # no checks asked: usable on its own
    assert standalone.path == path and standalone.info.checkpoint["checksum"] == "aaaa"
    assert load_fisher(path, "aaaa", ["a", "b"], [[4], [2]]).P == 6
    cases = [
        (("bbbb", None, None), "estimated at checkpoint aaaa, not at the expected checkpoint bbbb"),
        ((None, ["a", "b"], [[5], [2]]), "has P=6 but the model's parameter layout has P=7"),
        ((None, ["a", "c"], [[4], [2]]), "other parameters than the model's ('b' where the model has 'c')"),
        ((None, ["a", "b"], [[2, 2], [2]]), "other parameter shapes"),
    ]
    for (checksum, names, shapes), needle in cases:
        with pytest.raises(DataError) as exc:
            load_fisher(path, checksum, names, shapes)
        assert str(path) in str(exc.value) and needle in str(exc.value), str(exc.value)
    unrecorded = _rank1(6, 0, checksum=None)
    unrecorded.info.checkpoint = {}
    with pytest.raises(DataError, match="without a checkpoint checksum"):
        load_fisher(unrecorded.save(tmp_path / "g.h5"), "aaaa")


def test_penalty_p_mismatch_names_the_file(tmp_path):
    from geomprobe.fisher.penalty import StackedPenalty

    path = _rank1(6, 0).save(tmp_path / "f.h5")
    penalty = StackedPenalty(1.0)
    with pytest.raises(DataError, match=str(path)):
        penalty.add(load_fisher(path), torch.zeros(7))


def test_garbage_fisher_file_is_one_line(tmp_path):
    (tmp_path / "f.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="cannot read Fisher file"):
        load_fisher(tmp_path / "f.h5")


# ---------------------------------------------------------------- continual runs


def _tiny():
    from geomprobe.continual.runner import ContinualConfig

    return ContinualConfig(
        model="small1",
        image_size=8,
        tasks=2,
        steps_per_task=2,
        batch_size=8,
        fisher="rank1",
        fisher_samples=8,
        n_generated=4,
        sample_steps=2,
        classifier_steps=20,
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from geomprobe.continual.runner import run_continual

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("continual")
    run_continual(_tiny(), base / "run", seeds=[0], cache_dir=base / "cache")
    return base


def _rolled_back(finished, tmp_path):
    """A copy of the finished run with task 1 undone: what a kill during task 1 leaves."""
    out = tmp_path / "run"
    shutil.copytree(finished / "run", out)
    seed = out / "seed-0"
    state = json.loads((seed / "state.json").read_text())
    state.update(completed_task=0, tasks_completed=1, complete=False)
    (seed / "state.json").write_text(json.dumps(state))
    return out


def _resume_continual(finished, out):
    from geomprobe.continual.runner import run_continual

    return run_continual(_tiny(), out, seeds=[0], cache_dir=finished / "cache", resume=True)


def test_state_json_records_how_many_tasks_finished(finished):
    state = json.loads((finished / "run" / "seed-0" / "state.json").read_text())
    assert state == {
        "completed_task": 1,
        "tasks_completed": 2,
        "tasks": 2,
        "complete": True,
        "strategy": "rank1",
        "seed": 0,
    }


def test_resume_refuses_a_fisher_file_of_another_checkpoint(finished, tmp_path):
    out = _rolled_back(finished, tmp_path)
    # a Fisher of the same architecture at other weights (here: task 1's) where task 0's belongs
    shutil.copyfile(out / "seed-0" / "fisher-task1.h5", out / "seed-0" / "fisher-task0.h5")
    with pytest.raises(DataError) as exc:
        _resume_continual(finished, out)
    assert str(out / "seed-0" / "fisher-task0.h5") in str(exc.value) and "expected checkpoint" in str(exc.value)


@pytest.mark.parametrize(
    "text, needle",
    [("{garbage", "is not valid JSON"), ('{"completed_task": "0"}', "completed_task='0'"), ("[]", "completed_task")],
)
def test_garbage_continual_state(finished, tmp_path, text, needle):
    out = _rolled_back(finished, tmp_path)
    (out / "seed-0" / "state.json").write_text(text)
    with pytest.raises(DataError) as exc:
        _resume_continual(finished, out)
    assert str(out / "seed-0" / "state.json") in str(exc.value) and needle in str(exc.value)


def test_state_naming_a_missing_task_checkpoint(finished, tmp_path):
    out = _rolled_back(finished, tmp_path)
    shutil.rmtree(out / "seed-0" / "task-0")
    with pytest.raises(DataError, match="task 0 is complete but .*task-0 is missing"):
        _resume_continual(finished, out)


def test_partial_last_metrics_line_is_dropped_on_resume(finished, tmp_path):
    out = _rolled_back(finished, tmp_path)
    seed = out / "seed-0"
    for name in ("metrics.jsonl", "train_log.jsonl", "timings.jsonl"):
        lines = (seed / name).read_text().splitlines(keepends=True)
        (seed / name).write_text("".join(lines[:-1]) + lines[-1][:7])  # the append of task 1 cut short
    _resume_continual(finished, out)
    for name in ("metrics.jsonl", "train_log.jsonl"):
        assert (seed / name).read_text() == (finished / "run" / "seed-0" / name).read_text(), name
    assert (out / "metrics.jsonl").read_text() == (finished / "run" / "metrics.jsonl").read_text()


def test_garbled_metrics_line_before_the_last_is_one_line(finished, tmp_path):
    out = _rolled_back(finished, tmp_path)
    path = out / "seed-0" / "metrics.jsonl"
    path.write_text('{"seed": 0, "after_' + "\n" + path.read_text())
    with pytest.raises(DataError, match=f"{path}: line 1 is not valid JSON"):
        _resume_continual(finished, out)
    path.write_text('{"seed": 0}\n')  # valid JSON, but not a metrics row
    with pytest.raises(DataError, match="without an integer 'after_task'"):
        _resume_continual(finished, out)


def test_garbage_samples_file_is_one_line(finished, tmp_path):
    out = _rolled_back(finished, tmp_path)
    (out / "seed-0" / "samples.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match="samples.h5 is not a readable HDF5 file"):
        _resume_continual(finished, out)


def test_figures_warn_about_an_incomplete_run(finished, tmp_path, capsys):
    from geomprobe.figures import make_figures
    from geomprobe.figures.results import find_continual

    (runs,) = find_continual([finished / "run"]).values()
    assert runs.incomplete == []
    out = tmp_path / "run"
    shutil.copytree(finished / "run", out)
    (out / "metrics.jsonl").unlink()  # the whole-run file is written only when every seed finished
    seed = out / "seed-0" / "metrics.jsonl"
    seed.write_text("".join(line for line in seed.read_text().splitlines(keepends=True) if '"after_task": 0' in line))
    (runs,) = find_continual([out]).values()
    (note,) = runs.incomplete
    assert str(seed) in note and "1 of 2 tasks finished" in note and note.endswith("--resume")
    report = make_figures([out], tmp_path / "figures")
    assert report.warnings == [note]
    err = capsys.readouterr().err
    assert f"warning: {note}" in err.splitlines()

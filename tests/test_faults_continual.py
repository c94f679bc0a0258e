"""Faults of `continual` (issue 14): seeded kills and Ctrl-C at random points, resumed to a bitwise-identical run.

Each trial runs `python -m geomprobe continual` on the tiniest configuration (small1 at 8 px, 2 tasks
of 3 steps, rank-1 EWC + distillation, about 5 s) as a subprocess, sends SIGKILL at a seeded random
point (during start-up, or after a seeded milestone: the seed directory's manifest, i.e. during task
0 before its checkpoint, a task checkpoint, a Fisher file, the evaluation samples, a completed task), resumes with the original command and ``--resume``
(SIGKILL prints nothing; what ``geomprobe.io.resume_command`` would print), in some trials kills the
resume as well, and requires the result to equal an uninterrupted run bitwise: the weights of every
task checkpoint, every dataset and attribute of every Fisher file (the checkpoint path aside, which
names the run directory), the metrics, train log, state and evaluation samples (timings and seconds
aside), with no ``*.tmp``, ``.staging`` or ``*.old`` left. 4 SIGKILL trials and 1 SIGINT trial run
by default, 20 more SIGKILL trials with ``pytest -m faults``.
"""

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ARGS = shlex.split(
    "--model small1 --image-size 8 --tasks 2 --steps 3 --fisher rank1 --gd --n-generated 8 --sample-steps 2 "
    "--replay-per-class 4 --fisher-samples 8 --classifier-steps 20 --batch-size 8 --replay-batch 4 "
    "--threads 1 --quiet"
)
# files whose appearance marks a point of the run (the kill follows after a seeded delay)
MILESTONES = (
    None,
    "seed-0/manifest.json",  # task 0 begins: replay, training, before the first checkpoint
    "seed-0/task-0/unet",
    "seed-0/fisher-task0.h5",
    "seed-0/samples.h5",
    "seed-0/state.json",
    "seed-0/task-1/unet",
    "seed-0/fisher-task1.h5",
)


def _command(out: Path) -> list[str]:
    return [sys.executable, "-m", "geomprobe", "continual", "--out", str(out), *ARGS]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")  # the feature classifier, trained once by the reference run
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GEOMPROBE_CACHE": str(cache)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run(_command(tmp_path_factory.mktemp("warm") / "run"), env=env, capture_output=True, timeout=900)
    start = time.monotonic()
    done = subprocess.run(_command(out), env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return _result(out), time.monotonic() - start


def _without_seconds(obj):
    if isinstance(obj, dict):
        return {k: _without_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_without_seconds(v) for v in obj]
    return obj


def _h5_contents(path: Path) -> dict:
    """Every dataset (as bytes) and attribute of an HDF5 file; a Fisher file's checkpoint path left out."""
    items = {}
    with h5py.File(path, "r") as f:
        for key, value in f.attrs.items():
            if key == "checkpoint":
                value = json.loads(value)["checksum"]
            items[f"@{key}"] = str(value)

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                items[name] = (obj.dtype.str, obj.shape, np.asarray(obj[()]).tobytes())

        f.visititems(visit)
    return items


def _result(out: Path) -> dict:
    seed = out / "seed-0"
    result = {
        "weights": {
            k: load_file(str(seed / f"task-{k}" / "unet" / "diffusion_pytorch_model.safetensors")) for k in range(2)
        },
        "fisher": {k: _h5_contents(seed / f"fisher-task{k}.h5") for k in range(2)},
        "samples": _h5_contents(seed / "samples.h5"),
        "summary": _without_seconds(json.loads((out / "summary.json").read_text())),
    }
    for name in ("metrics.jsonl", "seed-0/metrics.jsonl", "seed-0/train_log.jsonl", "seed-0/state.json"):
        result[name] = (out / name).read_text()
    return result


def _assert_identical(out: Path, reference: dict) -> None:
    got = _result(out)
    for k in range(2):
        ref = reference["weights"][k]
        assert got["weights"][k].keys() == ref.keys()
        for name in ref:
            assert torch.equal(got["weights"][k][name], ref[name]), (k, name)
    for key in ("fisher", "samples", "summary", "metrics.jsonl", "seed-0/metrics.jsonl", "seed-0/train_log.jsonl"):
        assert got[key] == reference[key], key
    assert got["seed-0/state.json"] == reference["seed-0/state.json"]
    leftovers = [
        p for p in out.rglob("*") if p.name.endswith((".tmp", ".old")) or ".tmp" in p.name or p.name == ".staging"
    ]
    assert not leftovers, leftovers


def _kill_at_random_point(command, out: Path, env, rng: random.Random, duration: float):
    """Start ``command``, SIGKILL it at a seeded point; returns (returncode, stderr)."""
    milestone = rng.choice(MILESTONES)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if milestone is None:  # start-up and task 0's training: before the first checkpoint, mostly
        time.sleep(rng.uniform(0.0, 0.7 * duration))
    else:
        deadline = time.monotonic() + 600
        while not (out / milestone).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    state = sorted(p.name for p in (out / "seed-0").iterdir()) if (out / "seed-0").is_dir() else []
    print(f"killed after {milestone or 'a delay'} (exit {proc.returncode}); seed-0 held {state}")  # pytest -s
    assert "Traceback" not in err, err
    assert proc.returncode in (-signal.SIGKILL, 0), err
    return proc.returncode, err


def _kill_trial(tmp_path, env, reference, seed: int) -> None:
    ref, duration = reference
    rng = random.Random(seed)
    out = tmp_path / f"run-{seed}"
    resume = _command(out) + ["--resume"]  # what the tool prints for the original command (resume_command)
    _kill_at_random_point(_command(out), out, env, rng, duration)
    if seed % 3 == 0:  # kill the resume too
        _kill_at_random_point(resume, out, env, rng, duration)
    done = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (resume, done.stderr)
    _assert_identical(out, ref)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kill_and_resume_is_bitwise_identical(tmp_path, env, reference, seed):
    _kill_trial(tmp_path, env, reference, seed)


@pytest.mark.faults
@pytest.mark.parametrize("seed", range(100, 120))
def test_kill_and_resume_many(tmp_path, env, reference, seed):
    _kill_trial(tmp_path, env, reference, seed)


def test_ctrl_c_exits_130_with_the_resume_command(tmp_path, env, reference):
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (out / "seed-0" / "task-0" / "unet").exists() and proc.poll() is None:
        time.sleep(0.002)
    time.sleep(random.Random(7).uniform(0.0, 0.3))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("interrupted") and "resume with: " in err, err
    resume = shlex.split(err.strip().split("resume with: ", 1)[1])
    assert resume[-1] == "--resume" and "continual" in resume
    done = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (resume, done.stderr)
    _assert_identical(out, reference[0])

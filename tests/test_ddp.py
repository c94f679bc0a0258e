"""`train` under torchrun with DistributedDataParallel (issue 15): gloo, 2 CPU processes, tiny UNet.

A 2-process run draws the same global batches as one process (each rank trains on rows
[rank::2]) and DDP averages the gradients, so its parameters equal the 1-process run's up to the
order of float sums: after 20 Adam steps the largest difference measured was 1.2e-7 (parameters up
to 2.7 in size); the tests allow ATOL. A 2-process run killed after its first checkpoint resumes
with 1 process (the generator state in the checkpoint is the global one) or with 2, and finishes;
its parameters after 400 steps differ from an uninterrupted 1-process run's by 4.8e-7 at most
(measured, resumed with 1 process).
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from geomprobe.errors import UsageError
from geomprobe.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
TORCHRUN = Path(sys.executable).with_name("torchrun")
ATOL = 1e-5  # parameters of the 2-process run vs the 1-process run (measured: 1.2e-7 after 20 steps)


def _args(steps, every):
    return shlex.split(
        f"--model small1 --image-size 8 --steps {steps} --checkpoint-every {every} --batch-size 8 --seed 3 "
        "--device cpu --quiet"
    )


def _one(out, steps, every, *extra):
    return [
        sys.executable,
        "-m",
        "geomprobe",
        "train",
        "--out",
        str(out),
        *_args(steps, every),
        "--threads",
        "1",
        *extra,
    ]


def _two(out, steps, every, *extra):
    port = str(29500 + (os.getpid() + steps) % 1000)
    return [str(TORCHRUN), "--nproc-per-node", "2", "--master-port", port, "-m", "geomprobe", "train"] + [
        "--out",
        str(out),
        *_args(steps, every),
        *extra,
    ]


def _run(cmd):
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _weights(out):
    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_two_processes_equal_one_process(tmp_path):
    _run(_two(tmp_path / "two", 20, 10))
    _run(_one(tmp_path / "one", 20, 10))
    two, one = tmp_path / "two", tmp_path / "one"
    assert _max_diff(_weights(two), _weights(one)) <= ATOL
    # the log holds the loss over the global batch, written once (rank 0)
    assert [r["step"] for r in _log(two)] == [r["step"] for r in _log(one)] == [10, 20]
    for a, b in zip(_log(two), _log(one), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # the generator state is the global one: the same as one process's, bit for bit
    state2, state1 = (json.loads((d / "train_state.json").read_text()) for d in (two, one))
    assert state2["generator"] == state1["generator"] and state2["step"] == 20
    assert json.loads((two / "geomprobe.json").read_text())["extra"]["training_complete"] is True
    assert not list(two.rglob("*.tmp*")) and not (two / ".staging").exists()


@pytest.mark.parametrize("processes", [1, 2])
def test_killed_two_process_run_resumes(tmp_path, processes):
    """Killed after a checkpoint, resumed with 1 process (a changed world size) or 2; it finishes."""
    steps, out = 400, tmp_path / "run"
    proc = subprocess.Popen(_two(out, steps, 5), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "train_state.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    # torchrun starts each rank in a session of its own: kill the ranks, then torchrun
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    proc.kill()
    proc.communicate(timeout=60)
    killed_at = json.loads((out / "train_state.json").read_text())["step"]
    assert 5 <= killed_at < steps, killed_at  # killed mid-run, after a checkpoint
    _run((_one, _two)[processes - 1](out, steps, 5, "--resume"))
    _run(_one(tmp_path / "ref", steps, 5))
    state = json.loads((out / "train_state.json").read_text())
    assert state["step"] == steps
    assert state["generator"] == json.loads((tmp_path / "ref" / "train_state.json").read_text())["generator"]
    assert [r["step"] for r in _log(out)] == list(range(10, steps + 1, 10))  # no step logged twice
    assert _max_diff(_weights(out), _weights(tmp_path / "ref")) <= ATOL  # measured: 4.8e-7


def test_batch_not_divisible_by_the_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    config = TrainConfig(model="small1", image_size=8, steps=2, batch_size=8, device="cpu")
    with pytest.raises(UsageError, match="not divisible by the 3"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert torch.distributed.is_available()


CONTINUAL = (
    "--model small1 --image-size 8 --tasks 2 --steps 6 --batch-size 8 --fisher rank1 --fisher-samples 16 "
    "--gd --replay generative --replay-per-class 4 --replay-batch 4 --n-generated 6 --sample-steps 3 "
    "--classifier-steps 20 --seeds 0 --device cpu --quiet"
)


def _continual(out, processes, *extra):
    args = ["continual", "--out", str(out), *shlex.split(CONTINUAL), *extra]
    if processes == 1:
        return [sys.executable, "-m", "geomprobe", *args, "--threads", "1"]
    port = str(29500 + (os.getpid() + 23 + len(extra)) % 1000)
    return [str(TORCHRUN), "--nproc-per-node", str(processes), "--master-port", port, "-m", "geomprobe", *args]


def _continual_results(out):
    from geomprobe.fisher import load_fisher

    seed = out / "seed-0"
    weights = load_file(str(seed / "task-1" / "unet" / "diffusion_pytorch_model.safetensors"))
    fishers = [load_fisher(seed / f"fisher-task{k}.h5") for k in (0, 1)]
    metrics = [json.loads(x) for x in (seed / "metrics.jsonl").read_text().splitlines()]
    return weights, fishers, metrics


CONTINUAL_ATOL = 1e-4  # a tenth of one Adam step at the default learning rate 1e-3


def test_continual_two_processes_equal_one(tmp_path):
    """rank-1 EWC + generative distillation under torchrun: each rank trains on rows [rank::2] of the
    global batch and of the distillation batch, the replay pool and the FID samples are generated in
    halves and gathered, the rank-1 Fisher from halves of the probe rows all-reduced. Everything
    equals the 1-process run up to float summation order (measured: samples 1.4e-5, FID 5.9e-7
    relative, weights after 12 Adam steps 6.9e-6: Adam's normalised steps turn float-order
    differences of near-zero gradients into parameter differences, hence CONTINUAL_ATOL)."""
    env = {**ENV, "GEOMPROBE_CACHE": str(tmp_path / "cache")}
    for n in (1, 2):
        done = subprocess.run(_continual(tmp_path / f"p{n}", n), env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    (w1, f1, m1), (w2, f2, m2) = _continual_results(tmp_path / "p1"), _continual_results(tmp_path / "p2")
    assert _max_diff(w1, w2) <= CONTINUAL_ATOL
    for a, b in zip(f1, f2, strict=True):
        assert a.info.n == b.info.n == 16
        torch.testing.assert_close(a.mu, b.mu, rtol=1e-5, atol=1e-6 * float(a.mu.abs().max()))
        assert a.c_star == pytest.approx(b.c_star, rel=1e-5)
    assert [(r.get("after_task"), r.get("task")) for r in m1] == [(r.get("after_task"), r.get("task")) for r in m2]
    import h5py

    with h5py.File(tmp_path / "p1/seed-0/samples.h5") as s1, h5py.File(tmp_path / "p2/seed-0/samples.h5") as s2:
        for key in s1:  # measured: 1.4e-5 after task 1 (float noise through 3 DDIM steps)
            np.testing.assert_allclose(s1[key]["images"][()], s2[key]["images"][()], atol=1e-4, rtol=0)
    for a, b in zip(m1, m2, strict=True):
        if "fid" in a:
            assert a["fid"] == pytest.approx(b["fid"], rel=1e-3)
    # rank 0 alone wrote: one summary row, no temporaries
    assert sum(1 for r in m2 if r.get("summary")) == 1
    assert not list((tmp_path / "p2").rglob("*.tmp*"))


@pytest.mark.parametrize("processes", [1, 2])
def test_continual_killed_under_torchrun_resumes(tmp_path, processes):
    """A 2-process continual run killed after task 0 resumes with 1 or 2 processes and finishes."""
    env = {**ENV, "GEOMPROBE_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "run"
    proc = subprocess.Popen(_continual(out, 2), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "seed-0" / "state.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
        os.kill(int(pid), signal.SIGKILL)
    proc.kill()
    proc.communicate(timeout=60)
    assert json.loads((out / "seed-0" / "state.json").read_text())["completed_task"] == 0
    done = subprocess.run(_continual(out, processes, "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "seed-0" / "state.json").read_text())["completed_task"] == 1
    assert json.loads((out / "summary.json").read_text())["seeds"] == [0]


def test_continual_batch_not_divisible_by_the_processes(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from geomprobe.cli import app

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    result = CliRunner().invoke(app, ["continual", "--out", str(tmp_path / "cl"), "--batch-size", "8", "--quiet"])
    assert result.exit_code == 2 and "--batch-size 8 is not divisible by the 3" in result.output, result.output
    assert not (tmp_path / "cl").exists()


def test_ctrl_c_under_torchrun_saves_the_step_and_resumes(tmp_path):
    """SIGINT to torchrun (what Ctrl-C in a terminal does): torchrun passes it to the ranks, which
    agree on the step, save it once, print one resume line (rank 0) and exit; the printed torchrun
    command finishes the run."""
    steps, out = 4000, tmp_path / "run"
    proc = subprocess.Popen(_two(out, steps, 50), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "train_state.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1, err[-3000:]
    step = json.loads((out / "train_state.json").read_text())["step"]
    assert f"interrupted at step {step} (checkpoint saved); resume with: " in lines[0]
    assert 50 <= step < steps
    resume = shlex.split(lines[0].split(" with: ", 1)[1])
    assert Path(resume[0]).name == "torchrun" and resume[1:3] == ["--nproc-per-node", "2"] and resume[-1] == "--resume"
    resume[3:3] = ["--master-port", str(29500 + (os.getpid() + 7) % 1000)]
    resume[resume.index("--steps") + 1] = str(step + 20)  # finish soon: --steps may change on resume
    _run(resume)
    assert json.loads((out / "train_state.json").read_text())["step"] == step + 20


def test_resume_command_of_a_torchrun_rank(monkeypatch):
    from geomprobe.io import resume_command

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    cmd = shlex.split(resume_command(["/x/geomprobe/__main__.py", "train", "--out", "a"], add_resume=True))
    assert Path(cmd[0]).name == "torchrun" and cmd[1:] == [
        "--nproc-per-node",
        "4",
        "-m",
        "geomprobe",
        "train",
        "--out",
        "a",
        "--resume",
    ]


def test_bf16_autocast_trains_float32_weights_close_to_fp32(tmp_path):
    """--precision bf16: the forward under bf16 autocast, weights and Adam in float32; the logged
    losses stay within 1% of the float32 run's over 20 steps (measured: 2e-4 relative)."""
    from geomprobe.checkpoints import load_checkpoint

    def config(precision):
        return TrainConfig(
            model="small1", image_size=8, steps=20, batch_size=8, seed=3, checkpoint_every=10, precision=precision
        )

    bf16 = train(config("bf16"), tmp_path / "bf16")
    fp32 = train(config("fp32"), tmp_path / "fp32")
    for a, b in zip(bf16.log, fp32.log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-2)
    assert all(p.dtype == torch.float32 for p in load_checkpoint(tmp_path / "bf16").unet.parameters())
    with pytest.raises(UsageError, match="--precision"):
        TrainConfig(precision="fp16").validate()


def test_task_fisher_sharded_over_two_processes_equals_one(tmp_path):
    """The task Fisher of every kind (continual/estimate.py) with the probe rows shared by 2 gloo
    ranks vs one process, 20 probe samples: measured relative differences diag 6.0e-8, mu 3.2e-7,
    c* 2.3e-8; F V for a fixed (P, 3) probe: diag 4.7e-8, rank-1 1.5e-6, rank-k (sharded power
    iteration) 5.9e-7, rank-k (Lanczos on all-reduced products) 2.6e-7, full (gathered rows) 1.5e-7;
    allowed 1e-5 of the largest entry."""
    worker = ROOT / "tests" / "ddp_fisher_worker.py"
    port = str(29500 + (os.getpid() + 11) % 1000)
    _run([str(TORCHRUN), "--nproc-per-node", "2", "--master-port", port, str(worker), str(tmp_path / "two.pt")])
    _run([sys.executable, str(worker), str(tmp_path / "one.pt")])
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["diag"]["n"] == two["diag"]["n"] == two["rank1"]["n"] == 20
    for a, b in ((one["diag"]["d"], two["diag"]["d"]), (one["rank1"]["mu"], two["rank1"]["mu"])):
        assert a.dtype == b.dtype and (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert two["rank1"]["c"] == pytest.approx(one["rank1"]["c"], rel=1e-5)
    # every kind (rank-k by sharded power iteration, full by gathered rows) acts on a probe matrix alike
    for kind in ("diag", "rank1", "rankk-power", "rankk-lanczos", "full"):
        a, b = one[kind]["mv"], two[kind]["mv"]
        assert one[kind]["n"] == two[kind]["n"] and (a - b).abs().max() <= 1e-5 * a.abs().max(), kind

"""Training loop: resume equivalence, logs, and refusal to clobber an existing run."""

import json

import pytest
import torch

from geomprobe.checkpoints import load_checkpoint
from geomprobe.errors import UsageError
from geomprobe.training import TrainConfig, read_train_log, train


def _config(steps):
    return TrainConfig(
        dataset="digits",
        model="small1",
        image_size=8,
        steps=steps,
        batch_size=16,
        lr=1e-3,
        seed=5,
        checkpoint_every=3,
        log_every=1,
        device="cpu",
    )


def test_resume_equals_uninterrupted(tmp_path):
    """Reference: one uninterrupted run of 6 steps; the other stops at 3 and resumes to 6."""
    train(_config(6), tmp_path / "full")
    train(_config(3), tmp_path / "split")
    train(_config(6), tmp_path / "split", resume=True)
    a = load_checkpoint(tmp_path / "full").unet.state_dict()
    b = load_checkpoint(tmp_path / "split").unet.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    la, lb = read_train_log(tmp_path / "full"), read_train_log(tmp_path / "split")
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, 7))
    for ra, rb in zip(la, lb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)


def test_refuses_nonempty_out_without_resume(tmp_path):
    train(_config(1), tmp_path / "run")
    with pytest.raises(UsageError, match="--resume"):
        train(_config(2), tmp_path / "run")
    cfg = _config(2)
    cfg.lr = 0.5
    with pytest.raises(UsageError, match="lr"):
        train(cfg, tmp_path / "run", resume=True)


def test_log_and_metadata(tmp_path):
    train(_config(4), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all({"step", "loss"} <= r.keys() for r in rows)
    ck = load_checkpoint(tmp_path / "run")
    assert ck.info.step == 4 and ck.info.preset == "small1" and ck.info.image_size == 8


def test_negative_steps():
    with pytest.raises(UsageError, match="steps"):
        _config(-1).validate()

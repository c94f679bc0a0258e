"""CLI errors: non-zero exit, a one-line message, no traceback; and a tiny train + sample run."""

import pytest
from typer.testing import CliRunner

from geomprobe.cli import app

runner = CliRunner()


def _error_line(result):
    text = (result.stderr if result.stderr_bytes is not None else result.output).strip()
    return text


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--out", "{tmp}/a", "--dataset", "svhn"], "unknown dataset"),
        (["train", "--out", "{tmp}/a", "--model", "huge"], "unknown model preset"),
        (["train", "--out", "{tmp}/a", "--dataset", "mnist", "--data-root", "{tmp}"], "train-images-idx3-ubyte"),
        (["train", "--out", "{tmp}/a", "--steps", "-5"], "--steps"),
        (["sample", "--ckpt", "{tmp}/none", "--out", "{tmp}/g.png"], "not found"),
    ],
)
def test_bad_input_gives_one_line(tmp_path, args, needle):
    result = runner.invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    text = _error_line(result)
    assert "Traceback" not in text
    assert needle in text
    assert len(text.splitlines()) == 1, text


def test_bad_tspec_parse_error_via_library():
    from geomprobe.errors import UsageError
    from geomprobe.timesteps import parse_timesteps

    with pytest.raises(UsageError):
        parse_timesteps("900..100")


def test_train_then_sample(tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(
        app,
        [
            "train",
            "--out",
            str(out),
            "--model",
            "small1",
            "--image-size",
            "8",
            "--steps",
            "3",
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        [
            "sample",
            "--ckpt",
            str(out),
            "--classes",
            "0,1",
            "--n",
            "2",
            "--steps",
            "3",
            "--out",
            str(tmp_path / "g.png"),
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    from PIL import Image

    img = Image.open(tmp_path / "g.png")
    # 2 rows x 2 columns of 8 px with 1 px padding, scaled by 4
    assert img.size == ((2 * 9 + 1) * 4, (2 * 9 + 1) * 4)

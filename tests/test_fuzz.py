"""The command line under generated input (issue 14): never a traceback, always one line.

Every case runs in-process through typer's CliRunner. No case can start long work: every
``--ckpt`` points at a directory that does not exist, train and continual are capped at a few steps of
the smallest preset on a dataset whose files are absent, and reproduce gets a dataset-free preset it
refuses (or a checkpoint-free ``--models`` name). Asserted for every case: no uncaught exception other
than SystemExit, no "Traceback", a failure is exactly one line on stderr, exit 2 for a UsageError.

The named regression cases below are the harness report's (issue 14); each is one id.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from geomprobe.cli import app

runner = CliRunner()
FUZZ_CASES = 320  # spread over the commands below; at least 300 in total


def run(args: list[str]):
    """Invoke the CLI in-process; (exit code, stderr text, exception). ``--threads`` is undone afterwards."""
    import torch

    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    threads = torch.get_num_threads()
    try:
        result = runner.invoke(app, args)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.set_num_threads(threads)
    text = (result.stderr if result.stderr_bytes is not None else result.output).strip()
    return result.exit_code, text, result.exception


def assert_clean(args: list[str], code: int, text: str, exc) -> None:
    """The invariant of every invocation: no traceback, and a failure says one line."""
    assert exc is None or isinstance(exc, SystemExit), f"{args}: uncaught {exc!r}"
    assert "Traceback" not in text, f"{args}:\n{text}"
    if code != 0:
        assert len(text.splitlines()) == 1, f"{args} (exit {code}):\n{text}"
        if code == 2:
            assert text.startswith(("error:", "Usage:")) or "Error" in text, f"{args}: {text}"


# ---------------------------------------------------------------- generated invocations

INTS = st.one_of(
    st.integers(-3, 3),
    st.sampled_from([0, 1, 1001, 2**31, 2**63, 2**64, -(2**63), 10**30]),
    st.integers(-(2**70), 2**70),
)
TEXT = st.one_of(
    st.sampled_from(
        ["", " ", "0", "-1", "all", "1e9", "nan", "inf", "0..9", "0..99999999999", "9..0", "a,b", ",", ".."]
    ),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12),
)
VALUE = st.one_of(INTS.map(str), TEXT)
TSPEC = st.one_of(
    st.sampled_from(["100..900", "0..99999999999", "900..100", "1..5:0", "low-snr", "all", "1000", "-5", "10,20"]),
    TEXT,
)
CLASSES = st.sampled_from(["0,1", "0..4", "0..99999999999", "99999999999", "all", "5..1", "-1", "0,,1", "x"])


@st.composite
def path_value(draw, tmp: Path):
    """An output or input path: missing, existing file or directory, device, /proc, nested under a file, empty."""
    return draw(
        st.sampled_from(
            [
                str(tmp / "new"),
                str(tmp / "file"),
                str(tmp / "dir"),
                str(tmp / "file" / "sub"),
                "/dev/null",
                "/proc/x",
                "/proc/x/y",
                "",
                str(tmp / "new" / "deep" / "er"),
            ]
        )
    )


def _options(draw, tmp: Path, spec: dict) -> list[str]:
    """Some of the command's options, each with a generated value (or none: a flag, or a missing value)."""
    args: list[str] = []
    for name in draw(st.lists(st.sampled_from(sorted(spec)), max_size=5, unique=True)):
        kind = spec[name]
        if kind == "flag":
            args.append(name)
            continue
        value = {
            "int": INTS.map(str),
            "text": TEXT,
            "t": TSPEC,
            "classes": CLASSES,
            "path": path_value(tmp),
            "value": VALUE,
        }[kind]
        args += [name, draw(value)]
    if draw(st.booleans()):
        args.append(draw(st.sampled_from(["--nope", "--help", "--threads", "--threads=0", "--max-memory=1k"])))
    return args


COMMON = {"--seed": "int", "--device": "text", "--threads": "int", "--quiet": "flag"}
COMMANDS: dict[str, tuple[list[str], dict]] = {
    # fixed arguments that keep a valid-looking case from starting work, and the options to fuzz
    "train": (
        ["--dataset", "mnist", "--data-root", "{tmp}/no-data", "--model", "small1", "--steps", "2"],
        {
            **COMMON,
            "--out": "path",
            "--batch-size": "int",
            "--lr": "value",
            "--image-size": "int",
            "--classes": "classes",
            "--checkpoint-every": "int",
            "--precision": "text",
            "--resume": "flag",
        },
    ),
    "sample": (
        ["--ckpt", "{tmp}/no-ckpt"],
        {
            **COMMON,
            "--out": "path",
            "--n": "int",
            "--rows": "int",
            "--steps": "int",
            "--scale": "int",
            "--classes": "classes",
        },
    ),
    "grads": (
        ["--ckpt", "{tmp}/no-ckpt"],
        {
            **COMMON,
            "--out": "path",
            "--t": "t",
            "--samples": "int",
            "--classes": "classes",
            "--split": "text",
            "--project": "int",
            "--dtype": "text",
            "--max-memory": "value",
            "--shard-rows": "int",
            "--params": "text",
            "--target": "text",
            "--dataset": "text",
            "--data-root": "path",
            "--overwrite": "flag",
            "--resize": "flag",
        },
    ),
    "spectrum": (
        ["--grads", "{tmp}/no-store"],
        {
            "--seed": "int",
            "--device": "text",
            "--threads": "int",
            "--quiet": "flag",
            "--out": "path",
            "--t": "t",
            "--top-k": "int",
            "--max-memory": "value",
            "--bootstrap": "int",
            "--bootstrap-seed": "int",
            "--n-sweep": "text",
            "--gram-dtype": "text",
            "--json": "flag",
            "--centered": "flag",
            "--shares": "flag",
            "--samples": "int",
            "--classes": "classes",
            "--from": "path",
            "--ckpt": "path",
        },
    ),
    "figures": (
        [],
        {"--from": "path", "--out": "path", "--json": "flag", "--quiet": "flag", "--threads": "int"},
    ),
    "reproduce": (
        ["--preset", "paper"],  # MNIST without --data-root: refused before any stage
        {
            **COMMON,
            "--out": "path",
            "--steps": "int",
            "--samples": "int",
            "--models": "text",
            "--data-root": "path",
            "--with-continual": "flag",
        },
    ),
    "continual": (
        ["--dataset", "mnist", "--data-root", "{tmp}/no-data", "--model", "small1", "--steps", "2"],
        {
            "--device": "text",
            "--threads": "int",
            "--quiet": "flag",
            "--out": "path",
            "--tasks": "int",
            "--batch-size": "int",
            "--lr": "value",
            "--fisher": "text",
            "--gd": "flag",
            "--lambda": "value",
            "--rank": "int",
            "--fisher-samples": "int",
            "--t": "t",
            "--replay": "text",
            "--replay-per-class": "int",
            "--seeds": "text",
            "--compare": "flag",
            "--resume": "flag",
            "--max-memory": "value",
            "--json": "flag",
            "--n-generated": "int",
            "--sample-steps": "int",
            "--image-size": "int",
        },
    ),
    "audit": (
        ["--ckpt", "{tmp}/no-ckpt"],
        {
            "--device": "text",
            "--threads": "int",
            "--quiet": "flag",
            "--out": "path",
            "--checks": "text",
            "--t": "t",
            "--samples": "int",
            "--seeds": "text",
            "--bootstrap": "int",
            "--tasks": "int",
            "--json": "flag",
            "--max-memory": "value",
        },
    ),
    "energy": (
        ["--ckpt", "{tmp}/no-ckpt"],
        {
            **COMMON,
            "--out": "path",
            "--t": "text",
            "--draws": "int",
            "--classes": "classes",
            "--split": "text",
            "--alignment-t": "text",
            "--dataset": "text",
            "--json": "flag",
        },
    ),
}


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "file").write_text("x")
    (tmp / "dir").mkdir()
    return tmp


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_generated_invocations(command, fuzz_dir):
    fixed, spec = COMMANDS[command]
    seen = []

    @settings(
        max_examples=-(-FUZZ_CASES // len(COMMANDS)),
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def case(data):
        args = [command, *[a.replace("{tmp}", str(fuzz_dir)) for a in fixed], *_options(data.draw, fuzz_dir, spec)]
        code, text, exc = run(args)
        seen.append(code)
        assert_clean(args, code, text, exc)

    case()
    assert len(seen) >= FUZZ_CASES // len(COMMANDS)


# ---------------------------------------------------------------- named regression cases (harness report)


def _readonly_dir(tmp: Path) -> Path:
    """A directory where nothing can be created: chmod 555, or (root ignores modes) /sys."""
    if os.geteuid() == 0:
        return Path("/sys")
    ro = tmp / "ro"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    return ro


OUT_COMMANDS = {
    # the command with everything but --out, such that a writable --out would get past the checks
    "train": ["train", "--steps", "1"],
    "spectrum": ["spectrum", "--grads", "{tmp}/no-store"],
    "figures": ["figures", "--from", "{tmp}"],
    "reproduce": ["reproduce", "--preset", "paper"],
    "continual": ["continual", "--steps", "1"],
    "sample": ["sample", "--ckpt", "{tmp}/no-ckpt"],
    "grads": ["grads", "--ckpt", "{tmp}/no-ckpt", "--t", "100"],
}
OUT_VALUES = {
    "existing-file": ("{tmp}/file", "not a directory"),
    "read-only": ("{ro}/x", "not writable"),
    "dev-null": ("/dev/null", "not a directory"),
    "proc": ("/proc/x", "not writable"),
}
OUT_CASES = [
    pytest.param(cmd, value, needle, id=f"{cmd}-out-{name}")
    for cmd in OUT_COMMANDS
    for name, (value, needle) in OUT_VALUES.items()
    if not (cmd == "sample" and name == "existing-file")  # sample --out is a PNG file: replacing one is allowed
] + [
    pytest.param("sample", "{tmp}/dir", "is a directory", id="sample-out-directory"),
    pytest.param("sample", "{tmp}/file/sub", "not a directory", id="sample-out-under-a-file"),
]


@pytest.mark.parametrize("command, out, needle", OUT_CASES)
def test_unwritable_out_is_one_line(command, out, needle, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    ro = _readonly_dir(tmp_path)
    if command == "sample" and needle == "not a directory":
        needle = "is not a regular file" if out == "/dev/null" else needle
    args = [a.replace("{tmp}", str(tmp_path)) for a in OUT_COMMANDS[command]]
    args += ["--out", out.replace("{tmp}", str(tmp_path)).replace("{ro}", str(ro))]
    code, text, exc = run(args)
    assert_clean(args, code, text, exc)
    assert code == 2 and "--out" in text and needle in text, text


REGRESSIONS = [
    ("threads-huge", ["train", "--out", "{tmp}/a", "--threads", str(10**30)], "--threads"),
    ("seed-negative", ["train", "--out", "{tmp}/a", "--seed", "-1"], "--seed"),
    ("seed-2^64", ["train", "--out", "{tmp}/a", "--seed", str(2**64)], "--seed"),
    ("seed-2^64-sample", ["sample", "--ckpt", "{tmp}/n", "--out", "{tmp}/g.png", "--seed", str(2**64)], "--seed"),
    ("seed-2^64-grads", ["grads", "--ckpt", "{tmp}/n", "--t", "1", "--out", "{tmp}/g", "--seed", str(2**64)], "--seed"),
    ("seed-2^64-spectrum", ["spectrum", "--grads", "{tmp}/n", "--seed", str(2**64)], "--seed"),
    ("bootstrap-seed-2^64", ["spectrum", "--grads", "{tmp}/n", "--bootstrap-seed", str(2**64)], "--bootstrap-seed"),
    ("seed-2^64-reproduce", ["reproduce", "--out", "{tmp}/r", "--seed", str(2**64)], "--seed"),
    ("seeds-2^64-continual", ["continual", "--out", "{tmp}/c", "--seeds", f"0,{2**64}"], "--seeds"),
    ("seeds-negative-audit", ["audit", "--ckpt", "{tmp}/n", "--out", "{tmp}/a", "--seeds", "-1"], "--seeds"),
    ("batch-size-2^63", ["train", "--out", "{tmp}/a", "--batch-size", str(2**63)], "--batch-size"),
    ("batch-size-800GB", ["train", "--out", "{tmp}/a", "--batch-size", str(2**31 - 1)], "GiB"),
    ("sample-steps-1001", ["sample", "--ckpt", "{tmp}/n", "--out", "{tmp}/g.png", "--steps", "1001"], "--steps"),
    ("grads-t-huge-range", ["grads", "--ckpt", "{tmp}/n", "--t", "0..99999999999", "--out", "{tmp}/g"], "outside"),
    (
        "grads-classes-huge",
        ["grads", "--ckpt", "{tmp}/n", "--t", "1", "--classes", "0..99999999999", "--out", "{tmp}/g"],
        "--classes",
    ),
    ("train-classes-huge", ["train", "--out", "{tmp}/a", "--classes", "0..99999999999"], "--classes"),
    (
        "sample-classes-huge",
        ["sample", "--ckpt", "{tmp}/n", "--out", "{tmp}/g.png", "--classes", "0..99999999999"],
        "--classes",
    ),
    (
        "spectrum-classes-huge",
        ["spectrum", "--ckpt", "{tmp}/n", "--out", "{tmp}/s", "--classes", "0..99999999999"],
        "--classes",
    ),
    (
        "energy-classes-huge",
        ["energy", "--ckpt", "{tmp}/n", "--out", "{tmp}/e.h5", "--classes", "0..99999999999"],
        "--classes",
    ),
    (
        "spectrum-samples-huge",
        ["spectrum", "--ckpt", "{tmp}/n", "--out", "{tmp}/s", "--samples", str(2**31 - 1)],
        "--samples",
    ),
    ("sample-n-huge", ["sample", "--ckpt", "{tmp}/n", "--out", "{tmp}/g.png", "--n", str(2**31 - 1)], "--n"),
    ("figures-from-empty", ["figures", "--from", ""], "--from is empty"),
    ("figures-out-empty", ["figures", "--from", "{tmp}", "--out", ""], "--out is empty"),
    ("figures-from-empty-positional", ["figures", "--from", "{tmp}", ""], "empty path"),
    ("spectrum-out-empty", ["spectrum", "--grads", "{tmp}/n", "--out", ""], "--out is empty"),
    ("spectrum-out-empty-equals", ["spectrum", "--grads", "{tmp}/n", "--out="], "--out is empty"),
    ("grads-ckpt-empty", ["grads", "--ckpt", "", "--t", "1", "--out", "{tmp}/g"], "--ckpt is empty"),
    ("figures-several-from-need-out", ["figures", "--from", "{tmp}", "--from", "{tmp}"], "--out"),
]


@pytest.mark.parametrize("args, needle", [pytest.param(a, n, id=i) for i, a, n in REGRESSIONS])
def test_regression_cases_are_one_line(args, needle, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, text, exc = run(args)
    assert_clean(args, code, text, exc)
    assert code == 2 and needle in text, text


def test_help_shows_no_bool_type_for_flags():
    """typer 0.29 labels flags ``<bool>`` in --help; geomprobe's command class blanks it (cli._GeomprobeCommand)."""
    import typer

    group = typer.main.get_group(app)
    for name in [None, *sorted(group.commands)]:
        code, _, exc = run([name, "--help"] if name else ["--help"])
        out = runner.invoke(app, [name, "--help"] if name else ["--help"]).output
        assert code == 0 and exc is None or isinstance(exc, SystemExit)
        assert "<bool>" not in out, f"{name} --help:\n{out}"
    assert "--gd" in runner.invoke(app, ["continual", "--help"]).output

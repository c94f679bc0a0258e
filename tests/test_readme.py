"""The README's commands run as written (issue 14).

- Every ``geomprobe`` command of a ```bash or ```console block parses: the subcommand's own parser
  (click's ``make_context``) accepts every option and value, exactly as written.
- Every ``geomprobe`` line of the other blocks (synopses with ``[--option]`` and ``a|b`` alternatives)
  names only options the command has.
- Run, on tiny settings (listed in ``RUN``): the ``geomprobe reproduce --preset quick`` of "Set up and
  run" (``--steps 2 --samples 8`` added) and the ``geomprobe train`` console example (``--steps 2
  --batch-size 8``); every ``runs/quick/...`` path the README names must then exist. Only parsed: the
  GPU / torchrun examples (CUDA, the ``cl`` preset, MNIST files), and the audit block (several gradient
  stores per seed: minutes even when shrunk; ``tests/test_audit.py`` runs the audit on a tiny model).
- What the README says every command takes (``--threads``, ``--quiet``, ``--device``, ``--seed``) holds.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from geomprobe.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
GROUP = typer.main.get_group(app)
runner = CliRunner()

# README command (prefix) -> extra arguments that make it tiny; these, and only these, are run
RUN = {
    "geomprobe reproduce --preset quick": ["--steps", "2", "--samples", "8", "--device", "cpu", "--quiet"],
    "geomprobe train --out runs/tiny --model small1 --image-size 8 --steps 200": [
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--quiet",
    ],
}


def blocks() -> list[tuple[str, str]]:
    """(info string, body) of every fenced block of the README."""
    return re.findall(r"^```(\w*)\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def commands(body: str) -> list[list[str]]:
    """The argv (after 'geomprobe') of every geomprobe command in a block body."""
    found = []
    for line in body.replace("\\\n", " ").splitlines():
        line = line.strip().removeprefix("$ ")
        for part in line.split("&&"):
            part = part.split("  #")[0].strip()
            match = re.search(r"(?:^|\s)(?:-m geomprobe|geomprobe)\s+([a-z].*)$", part)
            # a command, not prose such as the layout diagram's "geomprobe checkpoint"
            if match and part.startswith(("geomprobe ", "torchrun ", "python ")) and " --" in part:
                found.append(match.group(1))
    return found


def options_of(name: str) -> set[str]:
    cmd = GROUP.commands[name]
    return {o for p in cmd.params for o in [*p.opts, *getattr(p, "secondary_opts", [])]} | {"--help"}


RUNNABLE = [(info, c) for info, body in blocks() if info in ("bash", "console") for c in commands(body)]
SYNOPSES = [c for info, body in blocks() if info not in ("bash", "console", "python") for c in commands(body)]


def test_the_readme_has_examples_to_check():
    assert len(RUNNABLE) >= 10 and len(SYNOPSES) >= 10
    assert {shlex.split(c)[0] for _, c in RUNNABLE} >= {"reproduce", "train", "continual", "audit", "figures"}


@pytest.mark.parametrize("command", [c for _, c in RUNNABLE], ids=lambda c: c[:60])
def test_runnable_examples_parse(command):
    args = shlex.split(command)
    cmd = GROUP.commands[args[0]]
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    try:
        with cmd.make_context(args[0], args[1:]) as ctx:  # every option exists and every value converts
            assert ctx.params
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.mark.parametrize("command", SYNOPSES, ids=lambda c: c[:60])
def test_synopsis_options_exist(command):
    name = command.split()[0]
    assert name in GROUP.commands, command
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", command))
    assert named <= options_of(name), f"{command}: {sorted(named - options_of(name))}"


def test_what_every_command_takes():
    """README "Usage": --threads and --quiet everywhere; --device but in figures; --seed or --seeds where random."""
    for name in GROUP.commands:
        opts = options_of(name)
        assert {"--threads", "--quiet"} <= opts, name
        assert ("--device" in opts) == (name != "figures"), name
        expected = {"continual": "--seeds", "audit": "--seeds", "figures": None}.get(name, "--seed")
        assert expected is None or expected in opts, name


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The RUN commands, in a fresh directory (README paths are relative to where they run)."""
    where = tmp_path_factory.mktemp("readme")
    before = Path.cwd()
    os.chdir(where)
    try:
        results = {}
        for prefix, extra in RUN.items():
            matches = [c for _, c in RUNNABLE if ("geomprobe " + c).startswith(prefix)]
            assert matches, f"README no longer has {prefix!r}"
            results[prefix] = runner.invoke(app, [*shlex.split(matches[0]), *extra])
    finally:
        os.chdir(before)
    return where, results


def test_run_examples_succeed(ran):
    _, results = ran
    for prefix, result in results.items():
        assert result.exit_code == 0, f"{prefix}: {result.output}"


def test_reproduce_outputs_are_where_the_readme_says(ran):
    where, _ = ran
    named = set(re.findall(r"(?<![\w/-])(runs/quick(?:/[\w.+-]+)*)(?![\w-])", README.read_text()))
    assert {"runs/quick/models/small3", "runs/quick/models/small3/grads", "runs/quick/figures"} <= named
    missing = sorted(p for p in named if not (where / p).exists())
    assert not missing, f"README names {missing}, which `geomprobe reproduce --preset quick` does not write"
    assert (where / "runs/quick/models/small3/grads/spectrum.json").is_file()
    assert (where / "runs/tiny/geomprobe.json").is_file()

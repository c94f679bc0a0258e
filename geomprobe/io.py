"""Files, seeds and memory budgets: the small helpers every command shares (docs/design.md §2, §10).

- File names: one constant per file of the contracts in docs/design.md (manifests, results, logs).
- Atomic writes: :func:`atomic_path` (write to ``<name>.tmp``, rename on success, remove the
  temporary on failure) and the text/JSON/JSONL writers built on it.
- Seeds: :func:`torch_generator`, :func:`numpy_generator` and :func:`derived_seed` (plus
  :func:`task_seed` for continual streams); every seeded draw in the project goes through them.
- Memory budgets: :func:`parse_memory` turns ``"2G"`` into bytes once, at the CLI; the library
  takes bytes and defaults to :data:`DEFAULT_MAX_MEMORY`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from geomprobe.errors import DataError, UsageError

# ---------------------------------------------------------------- file names (docs/design.md §2, §9)
MANIFEST = "manifest.json"
SPECTRUM_JSON = "spectrum.json"
COSINE_MAPS = "cosine_maps.h5"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
STATE = "state.json"
TRAIN_LOG = "train_log.jsonl"
TIMINGS = "timings.jsonl"
SAMPLES = "samples.h5"
CHECKPOINT_META = "geomprobe.json"
TRAIN_STATE = "train_state.json"
AUDIT_JSON = "audit.json"
TMP_SUFFIX = ".tmp"


# ---------------------------------------------------------------- atomic writes


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    Args:
        path: the final file.
        suffix: appended after ``.tmp`` (e.g. ``".png"`` for writers that infer a format).

    On an exception the temporary file is removed and the exception propagates, so ``path`` is
    either its old content or the complete new one, never a partial file.
    """
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX + suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically. Returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (newline-terminated) atomically. Returns the path."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Write one JSON object per line atomically. Returns the path."""
    return write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str | Path, drop_partial_last: bool = False) -> list[dict]:
    """The JSON objects of a JSONL file ([] when it does not exist).

    Args:
        path: the file.
        drop_partial_last: leave out an unterminated last line that is not valid JSON (an append cut
            short by a kill or a full disk; what a resume does with its logs).

    Raises:
        DataError: a line is not valid JSON, or not an object (names the file and the line).
    """
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if drop_partial_last and number == len(lines) and not text.endswith("\n"):
                break
            raise DataError(f"{path}: line {number} is not valid JSON") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


# ---------------------------------------------------------------- seeds


def torch_generator(seed: int):
    """A CPU ``torch.Generator`` seeded with ``seed`` (draws are the same on CPU and CUDA runs)."""
    import torch  # here, so that file helpers (figures, the CLI's argument checks) do not load torch

    return torch.Generator().manual_seed(int(seed))


def numpy_generator(*parts: int) -> np.random.Generator:
    """A numpy ``Generator`` seeded by the integers ``parts`` (``numpy_generator(s)`` == ``default_rng(s)``)."""
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in parts]))


def derived_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers ``parts`` by numpy's ``SeedSequence`` (well mixed).

    Used for keyed streams, e.g. the inputs of row r at key k of a gradient store:
    ``derived_seed(seed, key_code, r)``.
    """
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def task_seed(seed: int, task: int, stream: int) -> int:
    """The seed of one stream (training, replay, Fisher, evaluation) of task ``task`` of a continual run.

    A fixed affine mix (kept so that stored continual runs stay reproducible).
    """
    return (seed * 1_000_003 + task * 1009 + stream * 97 + 12345) % (2**63 - 1)


# ---------------------------------------------------------------- memory budgets

DEFAULT_MAX_MEMORY = 2 * 2**30
"""The default ``--max-memory``: 2 GiB, fixed so that results never depend on the machine's free RAM."""

_MEMORY = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*")


def parse_memory(text: str | int | None) -> int:
    """Bytes from ``'2G'``, ``'512M'``, ``'1.5GB'``, ``'100000'`` or an int; ``None``: the default.

    Args:
        text: a size with an optional binary unit (k, M, G, T; powers of 1024).

    Returns:
        The budget in bytes (at least 1 MiB).

    Raises:
        UsageError: malformed, or below 1 MiB.
    """
    if text is None or text == "":
        return DEFAULT_MAX_MEMORY
    if isinstance(text, int):
        value = text
    else:
        m = _MEMORY.fullmatch(str(text))
        if not m:
            raise UsageError(f"malformed memory size {text!r}; use e.g. 512M, 2G or a number of bytes")
        scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
        value = int(float(m.group(1)) * scale)
    if value < 2**20:
        raise UsageError(f"--max-memory {text!r} is below 1 MiB")
    return value


# ---------------------------------------------------------------- interrupts (Ctrl-C)
#
# The CLI installs :func:`install_interrupt_handler`. A SIGINT then sets a flag *and* raises
# KeyboardInterrupt, except inside :func:`deferred_interrupts` (the training loop), where it only sets
# the flag and the loop stops at the end of the step, after saving a checkpoint. The flag is what makes
# Ctrl-C reliable: a KeyboardInterrupt raised while Python runs a finaliser or a weakref callback (h5py's
# object registry, torch's hooks) is printed as "Exception ignored in ..." and lost, so every progress
# update and the end of every command check :func:`raise_if_interrupted` as well. A second Ctrl-C
# always raises at once.

_interrupt = {"requested": False, "deferring": 0, "count": 0}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, stopped at a safe point; ``step``: the step of the checkpoint saved before stopping (or None)."""

    def __init__(self, step: int | None = None) -> None:
        super().__init__(step)
        self.step = step


def interrupt_requested() -> bool:
    """True once SIGINT arrived (under :func:`install_interrupt_handler`)."""
    return _interrupt["requested"]


def raise_if_interrupted() -> None:
    """Raise :class:`Interrupted` when a SIGINT arrived (a safe point); not inside :func:`deferred_interrupts`."""
    if _interrupt["requested"] and not _interrupt["deferring"]:
        raise Interrupted()


def _on_sigint(signum, frame) -> None:
    _interrupt["requested"] = True
    _interrupt["count"] += 1
    if _interrupt["deferring"] and _interrupt["count"] == 1:
        return  # the training loop saves a checkpoint and stops at the end of this step
    raise KeyboardInterrupt


def install_interrupt_handler() -> bool:
    """Route SIGINT through the flag above (main thread only; returns False elsewhere)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return False
    _interrupt.update(requested=False, deferring=0, count=0)
    signal.signal(signal.SIGINT, _on_sigint)
    return True


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Inside this block a first Ctrl-C only sets the flag; the caller polls :func:`interrupt_requested`."""
    _interrupt["deferring"] += 1
    try:
        yield
    finally:
        _interrupt["deferring"] -= 1


def resume_command(argv: list[str] | None = None, add_resume: bool = False) -> str:
    """The command line that reruns this process (``argv``, default ``sys.argv``), shell-quoted.

    ``python -m geomprobe`` when it ran as ``__main__.py`` (``torchrun --nproc-per-node K -m geomprobe``
    for a rank of a torchrun run on one machine); ``--resume`` appended when ``add_resume`` and absent.
    Printed on interrupts so that the user can copy it.
    """
    import shlex
    import shutil
    import sys

    argv = list(sys.argv if argv is None else argv)
    head = argv[0] if argv else "geomprobe"
    if head.endswith("__main__.py") or head == "-m":
        exe = Path(sys.executable).name
        python = (
            exe
            if shutil.which(exe) and Path(shutil.which(exe)).resolve() == Path(sys.executable).resolve()
            else sys.executable
        )
        prefix = [python, "-m", "geomprobe"]
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a rank under torchrun: torchrun is next to python
            torchrun = Path(python).with_name("torchrun") if os.sep in python else Path("torchrun")
            prefix = [str(torchrun), "--nproc-per-node", os.environ.get("LOCAL_WORLD_SIZE", "1"), "-m", "geomprobe"]
    else:
        prefix = [Path(head).name if shutil.which(Path(head).name) else head]
    rest = argv[1:]
    if add_resume and "--resume" not in rest:
        rest.append("--resume")
    return shlex.join(prefix + rest)


# ---------------------------------------------------------------- checks that need no torch

SEED_MAX = 2**63 - 1
"""Seeds are 0 .. 2**63 - 1 (torch.Generator.manual_seed takes up to 2**64 - 1; numpy's SeedSequence any
non-negative int; one range for all)."""


def check_seed(seed: int, option: str = "--seed") -> int:
    """``seed`` if it is in 0 .. 2**63 - 1, else a one-line UsageError."""
    if not 0 <= seed <= SEED_MAX:
        raise UsageError(f"{option} must be in 0..2**63-1, got {seed}")
    return seed


def check_count(value: int, option: str, minimum: int = 1, maximum: int = 2**31 - 1) -> int:
    """``value`` if ``minimum <= value <= maximum``, else a one-line UsageError naming ``option``."""
    if not minimum <= value <= maximum:
        raise UsageError(f"{option} must be in {minimum}..{maximum}, got {value}")
    return value


def check_output(path: str | Path, kind: str = "dir", option: str = "--out") -> Path:
    """Refuse an output path that cannot be written, before any work starts (one-line UsageError).

    ``kind="dir"``: a directory to create or reuse (not an existing file, not a device); ``"file"``: a file
    to create or replace (not a directory, not a device such as /dev/null). An empty path is refused (it
    would silently mean the current directory). The directory that would receive the output (``path``
    itself for an existing directory, else its nearest existing ancestor) must accept a new entry: this
    is tried (a temporary directory, removed at once), since permission bits do not tell a read-only
    mount, ``/proc`` or, for root, anything at all.
    """
    if str(path) == "":
        raise UsageError(f"{option} is empty; give a path ('.' for the current directory)")
    path = Path(path)
    if path.exists() or path.is_symlink():
        if kind == "dir" and not path.is_dir():
            raise UsageError(f"{option} {path} exists and is not a directory")
        if kind == "file" and not path.is_file():
            what = "a directory" if path.is_dir() else "not a regular file"
            raise UsageError(f"{option} {path} is {what}; give a file path")
        if not os.access(path, os.W_OK):
            raise UsageError(f"{option} {path} is not writable")
        if kind == "dir":
            _check_can_create_in(path, path, option)
            return path
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: {parent} is not a directory")
    _check_can_create_in(parent, path, option)
    return path


def _check_can_create_in(directory: Path, path: Path, option: str) -> None:
    """UsageError unless an entry can be created in ``directory`` (tried, then removed)."""
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".geomprobe-write-test-", dir=directory))
    except OSError as exc:
        where = "" if directory == path else f": {directory}"
        raise UsageError(f"{option} {path}{where} is not writable ({exc.strerror or exc})") from None


MAX_CLASSES = 1000
"""The most classes of any dataset geomprobe reads (imagenet32); a class list beyond it is refused early."""


def check_classes(spec: str | None, option: str = "--classes") -> str | None:
    """``spec`` if it is a class list ('0,1', '0..4', 'all', empty) within 0..MAX_CLASSES-1, else a UsageError.

    Only the syntax and the bound, without building the list (``0..99999999999`` must not allocate it);
    the dataset's own class count is checked when it is loaded.
    """
    if spec is None or spec.strip() in ("", "all"):
        return spec
    text = spec.replace(" ", "")
    ends = text.split("..") if ".." in text else text.split(",")
    if (".." in text and len(ends) != 2) or not all(e.isdigit() for e in ends):
        raise UsageError(f"malformed {option} {spec!r}; use e.g. '0,1', '0..9' or 'all'")
    big = next((int(e) for e in ends if int(e) >= MAX_CLASSES), None)
    if big is not None:
        raise UsageError(
            f"{option} {spec!r}: class {big} is outside 0..{MAX_CLASSES - 1} (no dataset has more classes)"
        )
    return spec


def physical_memory() -> int | None:
    """Bytes of RAM of this machine (None when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(count: int, bytes_each: int, option: str, what: str) -> int:
    """``count`` unless ``count * bytes_each`` (a lower bound of what the command allocates) exceeds the RAM.

    Refuses sizes that cannot fit at all, in one line, instead of a failed allocation (or the kernel's OOM
    killer) after minutes of set-up. Results never depend on this: it only rejects impossible sizes.
    """
    ram = physical_memory()
    need = count * bytes_each
    if ram is not None and need > ram:
        raise UsageError(
            f"{option} {count} needs at least {need / 2**30:,.0f} GiB for {what}, more than this machine's "
            f"{ram / 2**30:.0f} GiB of RAM; use a smaller {option}"
        )
    return count

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
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

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


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSONL file ([] when it does not exist).

    Raises:
        DataError: a line is not valid JSON (names the file and the line).
    """
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise DataError(f"{path}: line {number} is not valid JSON") from None
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

"""Finding and reading the stored results the figures are drawn from (never recomputing them).

* ``spectrum.json`` (docs/design.md §9) and ``cosine_maps.h5`` from ``geomprobe spectrum``;
* ``metrics.jsonl`` (docs/design.md §9) from ``geomprobe continual``;
* ``samples.h5`` stored by the continual runner, for Fig. 5 (read in :mod:`geomprobe.figures.samples`).

A missing or malformed input raises :class:`DataError` naming the command that produces it.
Provenance for captions (model preset, dataset, checkpoint step, seeds) is followed from
``spectrum.json`` -> gradient store ``manifest.json`` -> checkpoint ``geomprobe.json``; when a
link is missing the caption says ``unknown`` rather than guessing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geomprobe.errors import DataError
from geomprobe.io import AUDIT_JSON, CHECKPOINT_META, COSINE_MAPS, MANIFEST, METRICS, SPECTRUM_JSON

SPECTRUM_COMMAND = "geomprobe spectrum --grads STORE (after geomprobe grads --ckpt CKPT --t 100..900 --out STORE)"
CONTINUAL_COMMAND = "geomprobe continual --dataset digits --compare --out runs/cl"


# ---------------------------------------------------------------- discovery


def _ignored(path: Path) -> bool:
    """Temporary files and half-written directories are not results."""
    return any(part.endswith((".tmp", ".tmp-ckpt", ".old-ckpt")) for part in path.parts)


def find_files(run_dirs: Iterable[str | Path], name: str) -> list[Path]:
    """Every file called ``name`` under the given directories (or the files themselves), sorted."""
    found: set[Path] = set()
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        if run_dir.is_file() and run_dir.name == name:
            found.add(run_dir.resolve())
        elif run_dir.is_dir():
            found.update(p.resolve() for p in run_dir.rglob(name) if p.is_file() and not _ignored(p))
    return sorted(found)


def check_run_dirs(run_dirs: Iterable[str | Path]) -> list[Path]:
    """The run directories as paths; a missing one is a DataError (a typo should not pass silently)."""
    paths = [Path(d) for d in run_dirs]
    if not paths:
        raise DataError(
            "no run directory given; pass --from RUN_DIR (the --out of geomprobe reproduce, spectrum or continual)"
        )
    for p in paths:
        if not p.exists():
            raise DataError(f"run directory not found: {p}")
    return paths


# ---------------------------------------------------------------- provenance


@dataclass
class Provenance:
    """What a caption says about where numbers came from."""

    model: str = "unknown"
    dataset: str = "unknown"
    checkpoint: str | None = None
    checkpoint_step: int | None = None
    train_seed: int | None = None
    seeds: list[int] = field(default_factory=list)

    def model_line(self) -> str:
        step = f", checkpoint step {self.checkpoint_step}" if self.checkpoint_step is not None else ""
        step += f", training seed {self.train_seed}" if self.train_seed is not None else ""
        where = f" ({self.checkpoint})" if self.checkpoint else ""
        return f"model: {self.model} trained on {self.dataset}{step}{where}"

    def seeds_line(self) -> str:
        return "seeds: " + (", ".join(str(s) for s in self.seeds) if self.seeds else "unknown")

    @property
    def label(self) -> str:
        """Short name for legends and panel titles, e.g. ``small3``."""
        return self.model if self.model != "unknown" else "model"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def _find_key(obj: Any, names: tuple[str, ...]) -> Any:
    """First value stored under any of ``names`` in a nested dict (breadth first), else None."""
    queue = [obj]
    while queue:
        cur = queue.pop(0)
        if isinstance(cur, dict):
            for name in names:
                if name in cur and cur[name] is not None:
                    return cur[name]
            queue.extend(v for v in cur.values() if isinstance(v, dict))
    return None


def _resolve(path_text: str | None, *bases: Path) -> Path | None:
    """``path_text`` as an existing path: absolute, relative to the cwd or to one of ``bases``."""
    if not path_text:
        return None
    candidate = Path(path_text)
    if candidate.exists():
        return candidate
    for base in bases:
        if (base / candidate).exists():
            return base / candidate
    return None


def checkpoint_provenance(ckpt_dir: Path | None, into: Provenance) -> Provenance:
    """Fill model, dataset and step from a checkpoint's ``geomprobe.json`` when it exists."""
    if ckpt_dir is None or not (ckpt_dir / CHECKPOINT_META).is_file():
        return into
    meta = _read_json(ckpt_dir / CHECKPOINT_META)
    into.model = meta.get("preset", into.model)
    into.dataset = meta.get("dataset", into.dataset)
    into.checkpoint_step = meta.get("step", into.checkpoint_step)
    into.checkpoint = str(ckpt_dir)
    if meta.get("seed") is not None:
        into.train_seed = int(meta["seed"])
    return into


def store_provenance(store_dir: Path | None) -> Provenance:
    """Provenance of a gradient store: its manifest's seed and the checkpoint it came from."""
    prov = Provenance()
    if store_dir is None or not (store_dir / MANIFEST).is_file():
        return prov
    manifest = _read_json(store_dir / MANIFEST)
    seed = _find_key(manifest, ("seed",))
    if isinstance(seed, int):
        prov.seeds = [seed]
    ckpt = _find_key(manifest, ("checkpoint", "ckpt"))
    ckpt_path = ckpt.get("path") if isinstance(ckpt, dict) else ckpt
    ckpt_dir = _resolve(ckpt_path if isinstance(ckpt_path, str) else None, store_dir, store_dir.parent)
    return checkpoint_provenance(ckpt_dir, prov)


# ---------------------------------------------------------------- spectrum.json


@dataclass
class SpectrumFile:
    """One ``spectrum.json`` file as read back for figures: rows at single timesteps sorted by t, plus provenance.

    Not to be confused with :class:`geomprobe.analysis.report.SpectrumResult`, the in-memory result
    that ``geomprobe spectrum`` computes and writes into this file.
    """

    path: Path
    data: dict
    rows: list[dict]
    provenance: Provenance

    @property
    def timesteps(self) -> list[int]:
        return [int(r["t"]) for r in self.rows]

    @property
    def cosine_maps_path(self) -> Path | None:
        """``cosine_maps.h5`` next to this spectrum.json or next to / inside its store."""
        candidates = [self.path.parent / COSINE_MAPS]
        store = self.store_dir
        if store is not None:
            candidates += [store / COSINE_MAPS, store.parent / COSINE_MAPS]
        return next((c for c in candidates if c.is_file()), None)

    @property
    def store_dir(self) -> Path | None:
        return _resolve(self.data.get("store"), self.path.parent, self.path.parent.parent)

    def column(self, key: str, what: str) -> np.ndarray:
        """Per-t values of ``key`` (float64, NaN for null); DataError if no row has it."""
        missing = [r.get("t") for r in self.rows if key not in r]
        if missing:
            raise DataError(
                f"{self.path} has no '{key}' ({what}) for t={missing[0]}; it was written by an older "
                f"`geomprobe spectrum`: rerun {SPECTRUM_COMMAND}"
            )
        return np.array([np.nan if r[key] is None else float(r[key]) for r in self.rows], dtype=np.float64)

    def sample_count_line(self) -> str:
        counts = sorted({int(r["n"]) for r in self.rows if r.get("n") is not None})
        if not counts:
            return "n: unknown"
        return f"n: {counts[0]} samples per t" if len(counts) == 1 else f"n: {counts[0]}-{counts[-1]} samples per t"

    def parameter_line(self) -> str:
        ps = sorted({int(r["P"]) for r in self.rows if r.get("P") is not None})
        return f"P: {ps[0]:,} parameters in the gradients" if len(ps) == 1 else "P: " + ", ".join(f"{p:,}" for p in ps)


def read_spectrum(path: str | Path) -> SpectrumFile:
    """Read and check one ``spectrum.json``; keep the rows at single timesteps (not bands)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found; it is written by {SPECTRUM_COMMAND}")
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise DataError(f"{path} is not a spectrum.json (no 'rows' list); rerun {SPECTRUM_COMMAND}")
    rows = [
        r
        for r in data["rows"]
        if isinstance(r, dict) and isinstance(r.get("t"), (int, float)) and not isinstance(r.get("t"), bool)
    ]
    if not rows:
        raise DataError(
            f"{path} has no rows at single timesteps; run {SPECTRUM_COMMAND} on a store made with --t 100..900"
        )
    rows.sort(key=lambda r: r["t"])
    result = SpectrumFile(path=path, data=data, rows=rows, provenance=Provenance())
    result.provenance = store_provenance(result.store_dir)
    return result


def find_spectra(run_dirs: Iterable[str | Path]) -> list[SpectrumFile]:
    """Every spectrum.json under ``run_dirs``; DataError (naming ``geomprobe spectrum``) if none."""
    paths = find_files(run_dirs, SPECTRUM_JSON)
    if not paths:
        raise DataError(
            f"no {SPECTRUM_JSON} under {', '.join(map(str, run_dirs))}; it is written by {SPECTRUM_COMMAND}"
        )
    return [read_spectrum(p) for p in paths]


# ---------------------------------------------------------------- cosine_maps.h5


@dataclass
class CosineMaps:
    """Per-sample |cos(g_i, mu_t)| for each t: ``values[t]`` is a float array of shape (n,)."""

    path: Path
    values: dict[int, np.ndarray]
    labels: dict[int, np.ndarray] = field(default_factory=dict)


def read_cosine_maps(path: str | Path) -> CosineMaps:
    """Read ``cosine_maps.h5`` as written by ``geomprobe spectrum`` (geomprobe.analysis.report.write_spectrum).

    Layout: one group per timestep, ``t{t}``, holding ``cos_to_mean`` (n,) signed cos(g_i, mu)
    and ``labels`` (n,); band groups (``band-...``) and ``mu_cosine`` are not per-t maps and are
    skipped. Rows are in store order. Returned values are absolute (the paper plots |cos|).
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found; it is written next to spectrum.json by {SPECTRUM_COMMAND}")
    values: dict[int, np.ndarray] = {}
    labels: dict[int, np.ndarray] = {}
    try:
        with h5py.File(path, "r") as f:
            for key, group in f.items():
                if not (key.startswith("t") and key[1:].isdigit()) or not isinstance(group, h5py.Group):
                    continue
                if "cos_to_mean" not in group:
                    raise DataError(f"{path}: group {key} has no cos_to_mean dataset; rerun {SPECTRUM_COMMAND}")
                t = int(key[1:])
                values[t] = np.abs(np.asarray(group["cos_to_mean"][...], dtype=np.float64)).ravel()
                if "labels" in group:
                    labels[t] = np.asarray(group["labels"][...]).ravel()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}; rerun {SPECTRUM_COMMAND}") from exc
    if not values:
        raise DataError(f"{path} holds no per-timestep cosine maps (groups t{{t}}); rerun {SPECTRUM_COMMAND}")
    return CosineMaps(path=path, values=dict(sorted(values.items())), labels=labels)


# ---------------------------------------------------------------- metrics.jsonl


@dataclass
class ContinualRuns:
    """Continual-learning metrics of one dataset, pooled over files, strategies and seeds.

    ``fid[strategy][seed][(after_task, task)] = FID``; ``afid[strategy][seed][k] = AFID@k``
    (k = number of tasks seen, 1-based); ``forgetting[strategy][seed] = F``.
    """

    dataset: str
    paths: list[Path] = field(default_factory=list)
    fid: dict[str, dict[int, dict[tuple[int, int], float]]] = field(default_factory=dict)
    afid: dict[str, dict[int, dict[int, float]]] = field(default_factory=dict)
    forgetting: dict[str, dict[int, float]] = field(default_factory=dict)
    feature_nets: set[str] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    n_generated: set[int] = field(default_factory=set)
    incomplete: list[str] = field(default_factory=list)  # one line per (file, strategy, seed) that stopped early

    @property
    def strategies(self) -> list[str]:
        return order_strategies(set(self.fid) | set(self.afid))

    @property
    def seeds(self) -> list[int]:
        s: set[int] = set()
        for per_seed in list(self.fid.values()) + list(self.afid.values()):
            s.update(per_seed)
        return sorted(s)

    @property
    def num_tasks(self) -> int:
        ks = [k for per_seed in self.afid.values() for per_k in per_seed.values() for k in per_k]
        ks += [a + 1 for per_seed in self.fid.values() for cells in per_seed.values() for a, _ in cells]
        return max(ks) if ks else 0


#: Strategy order in legends and tables: the paper's Table 1 order, then anything else sorted.
STRATEGY_ORDER = (
    "non-continual",
    "finetune",
    "diag",
    "rank1",
    "full",
    "gd",
    "diag+gd",
    "full+gd",
    "rank1+gd",
)


def order_strategies(names: Iterable[str]) -> list[str]:
    """Strategies in the paper's Table 1 order; unknown names (rank5+gd, replay-real, ...) after, sorted."""
    names = set(names)

    def key(name: str):
        return (STRATEGY_ORDER.index(name) if name in STRATEGY_ORDER else len(STRATEGY_ORDER), name)

    return sorted(names, key=key)


def _number(row: dict, key: str, path: Path, line_no: int) -> float:
    value = row.get(key)
    if value is None:
        return math.nan
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise DataError(f"{path}:{line_no}: '{key}' must be a number, got {value!r}")
    return float(value)


def _run_config_value(metrics_path: Path, keys: tuple[str, ...], kind: type = str) -> Any:
    """A setting (dataset, model: ``kind`` str; tasks: int) of the run a metrics.jsonl belongs to, from a manifest beside or above it."""
    for directory in [metrics_path.parent, *metrics_path.parents][:4]:
        for name in (MANIFEST, "config.json", "run.json"):
            f = directory / name
            if f.is_file():
                try:
                    found = _find_key(json.loads(f.read_text()), keys)
                except (OSError, json.JSONDecodeError):
                    continue
                if isinstance(found, kind) and not isinstance(found, bool):
                    return found
    return None


def _incomplete_runs(path: Path, tasks_seen: dict[tuple[str, int], int], summarized: set) -> list[str]:
    """One line per (strategy, seed) of ``path`` with fewer tasks than its run's ``tasks`` (or no summary row).

    A continual run stopped early, or rolled back by a resume that has not finished, holds metrics of
    its first tasks only; drawn without a word it would pass for a run of fewer tasks.
    """
    planned = _run_config_value(path, ("tasks",), int)
    command = _run_config_value(path, ("command_line",)) or "its geomprobe continual command"
    notes = []
    for (strategy, seed), done in sorted(tasks_seen.items()):
        if (planned is not None and done < planned) or (strategy, seed) not in summarized:
            of = f" of {planned}" if planned is not None else ""
            notes.append(
                f"{path}: {strategy}, seed {seed} is incomplete ({done}{of} tasks finished); "
                f"finish it with {command.removesuffix(' --resume')} --resume"
            )
    return notes


def read_metrics(paths: Iterable[Path], dataset: str | None = None) -> dict[str, ContinualRuns]:
    """Parse metrics.jsonl files into one :class:`ContinualRuns` per dataset.

    Per-task rows need ``seed``, ``strategy``, ``after_task``, ``task``, ``fid``; summary rows
    ``seed``, ``strategy``, ``summary: true``, ``afid`` and ``forgetting`` (docs/design.md §9).
    """
    runs: dict[str, ContinualRuns] = {}
    for path in paths:
        name = dataset or _run_config_value(path, ("dataset",)) or "unknown dataset"
        run = runs.setdefault(name, ContinualRuns(dataset=name))
        run.paths.append(path)
        model = _run_config_value(path, ("model", "preset"))
        if model:
            run.models.add(model)
        tasks_seen: dict[tuple[str, int], int] = {}
        summarized: set[tuple[str, int]] = set()
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: not JSON ({exc.msg}); rerun {CONTINUAL_COMMAND}") from exc
            if not isinstance(row, dict) or "strategy" not in row or "seed" not in row:
                raise DataError(f"{path}:{line_no}: a metrics row needs 'strategy' and 'seed'")
            strategy, seed = str(row["strategy"]), int(row["seed"])
            if row.get("summary"):
                afid = row.get("afid")
                if not isinstance(afid, dict):
                    raise DataError(f"{path}:{line_no}: summary row without an 'afid' object")
                run.afid.setdefault(strategy, {})[seed] = {int(k): float(v) for k, v in afid.items() if v is not None}
                run.forgetting.setdefault(strategy, {})[seed] = _number(row, "forgetting", path, line_no)
                summarized.add((strategy, seed))
            else:
                for key in ("after_task", "task", "fid"):
                    if key not in row:
                        raise DataError(f"{path}:{line_no}: per-task metrics row without '{key}'")
                cell = (int(row["after_task"]), int(row["task"]))
                tasks_seen[strategy, seed] = max(tasks_seen.get((strategy, seed), 0), cell[0] + 1)
                run.fid.setdefault(strategy, {}).setdefault(seed, {})[cell] = _number(row, "fid", path, line_no)
                if row.get("feature_net"):
                    run.feature_nets.add(str(row["feature_net"]))
                if row.get("n_generated"):
                    run.n_generated.add(int(row["n_generated"]))
        run.incomplete.extend(_incomplete_runs(path, tasks_seen, summarized))
    return runs


def metrics_files(run_dirs: Iterable[str | Path]) -> list[Path]:
    """The metrics.jsonl of each continual run under ``run_dirs`` (not the per-seed copies below it).

    An audit's band runs (``AUDIT/band-ewc/<band>/``) are left out: they share one strategy name and
    are drawn by the audit's own figure (``audit_band_ewc``), never as continual runs.
    """
    paths = [p for p in find_files(run_dirs, METRICS) if not in_audit(p)]
    # the runner writes each seed's rows to seed-{s}/metrics.jsonl and all of them again one level up
    found = set(paths)
    return [p for p in paths if not any(parent / METRICS in found for parent in p.parents[1:])]


def in_audit(path: Path) -> bool:
    """True for a file under ``AUDIT/band-ewc/`` of a directory holding an audit.json."""
    return any(p.name == "band-ewc" and (p.parent / AUDIT_JSON).is_file() for p in path.parents)


def find_continual(run_dirs: Iterable[str | Path]) -> dict[str, ContinualRuns]:
    """All metrics.jsonl under ``run_dirs`` grouped by dataset; DataError naming the command if none."""
    run_dirs = list(run_dirs)
    paths = metrics_files(run_dirs)
    if not paths:
        raise DataError(f"no {METRICS} under {', '.join(map(str, run_dirs))}; it is written by {CONTINUAL_COMMAND}")
    return read_metrics(paths)


def mean_and_standard_error(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, standard error = sample std / sqrt(m), m) over the finite values; SE is NaN for m < 2."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
    return float(v.mean()), se, int(v.size)

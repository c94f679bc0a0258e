"""The replay comparison table (issue 13): selection rules and compact codes side by side, from stored runs.

One row per continual run directory with replay (``--replay real`` or ``--replay compact``): its
memory per exemplar and per class, AFID at the final task, average forgetting and final accuracy
(mean ± standard error over seeds, from ``summary.json``) and, for runs with ``--energy-records``,
the intrinsic forgetting: Spearman's rho of energy before a task change against its increase, and
the mean energy increase per quartile of energy before (lowest to highest), each averaged over the
task changes of a seed, then mean ± standard error over seeds (``intrinsic_forgetting.jsonl``).

Memory per exemplar: real images count one byte per pixel and channel (8-bit images, C H W);
compact codes the bytes their code holds (:mod:`geomprobe.continual.compact`: ``pca`` 4 k,
k = budget // 4; ``lowres``/``lowres-unet`` C r^2); a PCA code's shared basis (4 (k + 1) C H W
bytes) is reported apart.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geomprobe.errors import DataError, UsageError
from geomprobe.figures.continual import _format, _write_table
from geomprobe.figures.results import mean_and_standard_error, metrics_files
from geomprobe.figures.style import FigureOutput
from geomprobe.io import read_jsonl

SUMMARY = "summary.json"
REPLAY_COMMAND = "geomprobe continual --replay real|compact ... --seeds 0,1,2 --out RUN"


@dataclass
class ReplayRun:
    """One continual run with replay: its configuration, summary and per-seed intrinsic-forgetting rows."""

    path: Path
    config: dict
    shape: tuple[int, int, int]
    summary: dict
    intrinsic: dict[int, list[dict]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        c = self.config
        rule = f"select {c.get('replay_select', 'random')}"
        if c["replay"] == "compact":
            return f"compact {c['replay_code']} {c['budget_bytes']} B, {rule}"
        return f"real images, {rule}"

    def exemplar_bytes(self) -> tuple[int, int]:
        """(bytes per exemplar, bytes of the shared basis), as :mod:`geomprobe.continual.compact` stores them.

        A PCA code's rank is also capped by the number of images it was fitted on, which the run
        does not record: the table assumes at least ``budget // 4`` (true unless a task has fewer images).
        """
        from geomprobe.continual.compact import LowResCode, pca_rank_for_budget

        C, H, W = self.shape
        c = self.config
        if c["replay"] != "compact":
            return C * H * W, 0
        if c["replay_code"] == "pca":
            k = pca_rank_for_budget(int(c["budget_bytes"]), C * H * W, C * H * W)
            return 4 * k, 4 * (k + 1) * C * H * W
        return LowResCode.for_budget(int(c["budget_bytes"]), self.shape).code_bytes, 0


def _manifest_config(path: Path) -> dict | None:
    """The continual run's configuration, or None when ``path`` is not a continual run directory."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("tool") != "geomprobe continual":
        return None
    config = manifest.get("config")
    return config if isinstance(config, dict) else None


def is_replay_run(path: Path) -> bool:
    """Whether ``path`` is a continual run directory with ``--replay real`` or ``--replay compact``."""
    config = _manifest_config(path)
    return config is not None and config.get("replay") in ("real", "compact")


def replay_run_dirs(run_dirs: Iterable[str | Path]) -> list[Path]:
    """The continual runs with replay under ``run_dirs`` (each run once, not its per-seed directories)."""
    return [p.parent for p in metrics_files(run_dirs) if is_replay_run(p.parent)]


def read_replay_run(path: Path) -> ReplayRun:
    """The finished continual run with replay at ``path``.

    Raises:
        DataError: unfinished (no ``summary.json``), or a configuration the table cannot read.
    """
    config = _manifest_config(path) or {}
    if not (path / SUMMARY).is_file():
        raise DataError(
            f"{path} has no {SUMMARY}: the run is unfinished; resume it with `geomprobe continual --resume`"
        )
    try:
        from geomprobe.data import dataset_facts

        size = int(config["image_size"])
        shape = (dataset_facts(config["dataset"]).channels, size, size)
        summary = json.loads((path / SUMMARY).read_text())
    except (KeyError, TypeError, ValueError, UsageError) as exc:
        raise DataError(f"{path}: cannot read the run's configuration or {SUMMARY} ({exc})") from None
    intrinsic = {}
    for f in sorted(path.glob("seed-*/intrinsic_forgetting.jsonl")):
        intrinsic[int(f.parent.name.removeprefix("seed-"))] = read_jsonl(f)
    return ReplayRun(path, config, shape, summary, intrinsic)


QUANTILES = 4  # the runner's energy-before bins (geomprobe.energy.energy_change_summary)


def _num(x) -> float:
    return math.nan if x is None else float(x)


def intrinsic_summary(run: ReplayRun) -> dict:
    """Rho and the per-quartile energy increase: per seed the mean over task changes, then mean ± s.e. over seeds.

    Missing values (a rho or a bin the runner could not compute: null) are left out of the means.

    Raises:
        DataError: a row without ``spearman`` / ``increase_by_quantile`` or with more bins than quartiles.
    """
    rhos, quartiles = [], []
    for seed, rows in run.intrinsic.items():
        try:
            rho = [_num(r["spearman"]) for r in rows]
            bins = [[_num(v) for v in r["increase_by_quantile"]] for r in rows]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{run.path}/seed-{seed}/intrinsic_forgetting.jsonl: malformed row") from None
        if any(len(b) > QUANTILES for b in bins):
            raise DataError(f"{run.path}/seed-{seed}/intrinsic_forgetting.jsonl: more than {QUANTILES} energy bins")
        bins = [b + [math.nan] * (QUANTILES - len(b)) for b in bins]  # bins left empty at small n
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a seed whose values are all missing: NaN
            rhos.append(float(np.nanmean(rho)) if rho else math.nan)
            quartiles.append(np.nanmean(np.array(bins, dtype=np.float64), axis=0) if bins else [math.nan] * QUANTILES)
    out = {"rho": mean_and_standard_error(rhos), "quartiles": []}
    if quartiles:
        q = np.array(quartiles, dtype=np.float64)
        out["quartiles"] = [mean_and_standard_error(q[:, j]) for j in range(QUANTILES)]
    return out


def _stat(entry) -> tuple[float, float]:
    """(mean, standard error) of a summary.json entry; null (one seed) becomes NaN."""
    if not isinstance(entry, dict):
        raise DataError(f"a summary entry is {entry!r}, expected mean and stderr")
    return _num(entry.get("mean")), _num(entry.get("stderr"))


def _row(run: ReplayRun) -> tuple[list[str], list]:
    """Markdown cells and CSV values of one run."""
    s = run.summary
    try:
        per_class = int(run.config["replay_per_class"])
        final = str(max(int(k) for k in s["afid"]))
        afid, forgetting, acc = _stat(s["afid"][final]), _stat(s["forgetting"]), _stat(s["final_accuracy"])
        seeds = len(s["seeds"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{run.path}/{SUMMARY}: missing or malformed entry ({exc})") from None
    each, basis = run.exemplar_bytes()
    intrinsic = intrinsic_summary(run)
    rho, quartiles = intrinsic["rho"], intrinsic["quartiles"]
    md = [
        run.path.name,
        run.label,
        str(each),
        str(per_class),
        str(each * per_class) + (f" (+ {basis} shared basis)" if basis else ""),
        f"{_format(*afid)} (T = {final})",
        _format(*forgetting),
        _format(100 * acc[0], 100 * acc[1]),
        _format(rho[0], rho[1]) if rho[2] else "-",
        " / ".join("-" if not math.isfinite(m) else f"{m:+.3f}" for m, _, _ in quartiles) if rho[2] else "-",
    ]
    q_numbers = [v for m, se, _ in quartiles for v in (m, se)] or [math.nan] * (2 * QUANTILES)
    csv = [run.path.name, run.label, each, basis, per_class, int(final), *afid, *forgetting, *acc, rho[0], rho[1]]
    return md, [*csv, *q_numbers, seeds]


def table_replay(run_dirs: Iterable[str | Path], out_dir: str | Path, stem: str = "table_replay") -> FigureOutput:
    """The replay comparison table of the continual runs with replay under ``run_dirs`` (one row each).

    Raises:
        DataError: none of the runs replays, or one is unfinished or unreadable.
    """
    runs = [read_replay_run(p) for p in replay_run_dirs(run_dirs)]
    if not runs:
        raise DataError(f"the replay table needs continual runs with replay; they are written by `{REPLAY_COMMAND}`")
    md_rows, csv_rows = zip(*(_row(r) for r in runs), strict=True)
    seeds = sorted({int(s) for r in runs for s in r.summary["seeds"]})
    note = (
        f"AFID@T at each run's final task T and forgetting F (docs/design.md §6), final accuracy of the classifier "
        f"on the generated samples, mean ± standard error over seeds {seeds}. rho: Spearman's rho of an "
        "earlier-task image's energy before a task change against its increase (seed 004 predicts rho > 0), mean "
        "over task changes; ΔE by quartile: mean energy increase of the images in each quartile of energy before "
        "(lowest first), mean over task changes and seeds; '-' where the run has no --energy-records. Memory: "
        "bytes per exemplar (real images 8-bit C·H·W) × exemplars per class."
    )
    header = ["run", "replay", "B / exemplar", "per class", "B / class", "AFID@T ↓", "F ↓", "accuracy %", "rho"]
    header.append("ΔE by energy quartile (low → high)")
    csv_header = ["run", "replay", "bytes_per_exemplar", "basis_bytes", "per_class", "tasks", "afid_mean", "afid_se"]
    csv_header += ["forgetting_mean", "forgetting_se", "accuracy_mean", "accuracy_se", "rho_mean", "rho_se"]
    csv_header += [f"increase_q{j}_{w}" for j in range(1, QUANTILES + 1) for w in ("mean", "se")] + ["seeds"]
    paths = [r.path / SUMMARY for r in runs]
    title = "Replay: selection rules and compact codes at a memory budget"
    return _write_table(Path(out_dir), stem, title, note, header, md_rows, csv_header, csv_rows, paths)

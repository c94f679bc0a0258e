"""The replay comparison table (issue 13): selection rules and compact codes side by side, from stored runs.

One row per continual run directory with replay (``--replay real`` or ``--replay compact``): its
memory per exemplar and per class, AFID at the final task, average forgetting and final accuracy
(mean ± standard error over seeds, from ``summary.json``) and, for runs with ``--energy-records``,
the intrinsic forgetting: Spearman's rho of energy before a task change against its increase, and
the mean energy increase per quartile of energy before (lowest to highest), each averaged over the
task changes of a seed, then mean ± standard error over seeds (``intrinsic_forgetting.jsonl``).

Memory per exemplar: real images count one byte per pixel and channel (8-bit images, C H W);
compact codes the bytes their code holds (``pca``: 4 k, k = budget // 4; ``lowres``/``lowres-unet``:
C r^2); a PCA code's shared basis (4 (k + 1) C H W bytes) is reported apart.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geomprobe.errors import DataError
from geomprobe.figures.continual import _format, _write_table
from geomprobe.figures.results import mean_and_standard_error
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
        """(bytes per exemplar, bytes of the shared basis)."""
        C, H, W = self.shape
        c = self.config
        if c["replay"] != "compact":
            return C * H * W, 0
        if c["replay_code"] == "pca":
            k = min(int(c["budget_bytes"]) // 4, C * H * W)
            return 4 * k, 4 * (k + 1) * C * H * W
        side = min(H, math.isqrt(int(c["budget_bytes"]) // C))
        return C * side * side, 0


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


def read_replay_run(path: Path) -> ReplayRun | None:
    """The run at ``path`` if it is a finished continual run with replay; None for other runs.

    Raises:
        DataError: a replay run without ``summary.json`` (unfinished).
    """
    if not is_replay_run(path):
        return None
    config = _manifest_config(path)
    if not (path / SUMMARY).is_file():
        raise DataError(
            f"{path} has no {SUMMARY}: the run is unfinished; resume it with `geomprobe continual --resume`"
        )
    task0 = json.loads(next(iter(sorted(path.glob("seed-*/task-0/geomprobe.json")))).read_text())
    shape = (int(task0["channels"]), int(task0["image_size"]), int(task0["image_size"]))
    intrinsic = {}
    for f in sorted(path.glob("seed-*/intrinsic_forgetting.jsonl")):
        intrinsic[int(f.parent.name.removeprefix("seed-"))] = read_jsonl(f)
    return ReplayRun(path, config, shape, json.loads((path / SUMMARY).read_text()), intrinsic)


def intrinsic_summary(run: ReplayRun) -> dict:
    """Rho and the per-quartile energy increase: per seed the mean over task changes, then mean ± s.e. over seeds."""
    rhos, quartiles = [], []
    for rows in run.intrinsic.values():
        rhos.append(float(np.mean([r["spearman"] for r in rows])))
        quartiles.append(np.mean([r["increase_by_quantile"] for r in rows], axis=0))
    out = {"rho": mean_and_standard_error(rhos)}
    if quartiles:
        q = np.array(quartiles)
        out["quartiles"] = [mean_and_standard_error(q[:, j]) for j in range(q.shape[1])]
    return out


def _row(run: ReplayRun) -> tuple[list[str], list]:
    """Markdown cells and CSV values of one run."""
    s = run.summary
    per_class = int(run.config["replay_per_class"])
    each, basis = run.exemplar_bytes()
    final = str(max(int(k) for k in s["afid"]))
    afid, forgetting, acc = s["afid"][final], s["forgetting"], s["final_accuracy"]
    intrinsic = intrinsic_summary(run)
    rho = intrinsic["rho"]
    quartiles = intrinsic.get("quartiles", [])
    md = [
        run.label,
        str(each),
        str(per_class),
        str(each * per_class) + (f" (+ basis {basis})" if basis else ""),
        _format(afid["mean"], afid["stderr"]),
        _format(forgetting["mean"], forgetting["stderr"]),
        _format(100 * acc["mean"], 100 * acc["stderr"]),
        _format(rho[0], rho[1]) if rho[2] else "-",
        " / ".join(f"{m:+.3f}" for m, _, _ in quartiles) if quartiles else "-",
    ]
    numbers = [afid["mean"], afid["stderr"], forgetting["mean"], forgetting["stderr"], acc["mean"], acc["stderr"]]
    q_numbers = [v for m, se, _ in quartiles for v in (m, se)] + [math.nan] * (8 - 2 * len(quartiles))
    csv = [run.path.name, run.label, each, basis, per_class, *numbers, rho[0], rho[1], *q_numbers, len(s["seeds"])]
    return md, csv


def table_replay(run_dirs: list[Path], out_dir: str | Path, stem: str = "table_replay") -> FigureOutput:
    """The replay comparison table of the continual runs with replay among ``run_dirs`` (one row each).

    Raises:
        DataError: none of the runs replays, or one is unfinished.
    """
    runs = [r for r in (read_replay_run(Path(p)) for p in run_dirs) if r is not None]
    if not runs:
        raise DataError(f"the replay table needs continual runs with replay; they are written by `{REPLAY_COMMAND}`")
    md_rows, csv_rows = zip(*(_row(r) for r in runs), strict=True)
    seeds = sorted({int(s) for r in runs for s in r.summary["seeds"]})
    tasks = max(int(k) for r in runs for k in r.summary["afid"])
    note = (
        f"AFID@{tasks} and forgetting F (docs/design.md §6), final accuracy of the classifier on the generated "
        f"samples, mean ± standard error over seeds {seeds}. rho: Spearman's rho of an earlier-task image's energy "
        "before a task change against its increase (seed 004 predicts rho > 0), mean over task changes; "
        "ΔE by quartile: mean energy increase of the images in each quartile of energy before (lowest first), "
        "mean over task changes and seeds; '-' where the run has no --energy-records. Memory: bytes per exemplar "
        "(real images 8-bit C·H·W) × exemplars per class."
    )
    header = ["replay", "B / exemplar", "per class", "B / class", f"AFID@{tasks} ↓", "F ↓", "accuracy %", "rho"]
    header.append("ΔE by energy quartile (low → high)")
    csv_header = ["run", "replay", "bytes_per_exemplar", "basis_bytes", "per_class", "afid_mean", "afid_se"]
    csv_header += ["forgetting_mean", "forgetting_se", "accuracy_mean", "accuracy_se", "rho_mean", "rho_se"]
    csv_header += [f"increase_q{j}_{w}" for j in range(1, 5) for w in ("mean", "se")] + ["seeds"]
    paths = [r.path / SUMMARY for r in runs]
    title = "Replay: selection rules and compact codes at a memory budget"
    return _write_table(Path(out_dir), stem, title, note, header, md_rows, csv_header, csv_rows, paths)

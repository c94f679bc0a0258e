"""One-command reproduction (``geomprobe reproduce``): train -> grads -> spectrum -> figures [-> continual].

Every stage calls the library function behind its command (no subprocesses) and writes under
one output directory::

    OUT/models/<preset>/            checkpoint (geomprobe train)
    OUT/models/<preset>/grads/      gradient store, spectrum.json, cosine_maps.h5
    OUT/continual/                  --compare runs (with --with-continual)
    OUT/figures/                    figures, captions and tables

Resume: a stage whose output is complete is skipped (training by its saved step, the store by
its manifest, spectrum.json by its store and time, figures by their inputs' times); an
interrupted stage continues where it stopped (training from its last checkpoint, the store from
its complete shards). Rerunning the same command is therefore always safe.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Protocol

from geomprobe.errors import UsageError
from geomprobe.io import COSINE_MAPS, MANIFEST, METRICS, SPECTRUM_JSON, TRAIN_STATE


@dataclass(frozen=True)
class ReproducePreset:
    """Every setting of a reproduction run.

    ``models``: UNet presets to train and probe; the first is the main model (Fig. 1-3), all of
    them together give Fig. 6 when there are two or more.
    """

    name: str
    dataset: str
    image_size: int
    models: tuple[str, ...]
    train_steps: int
    lr: float
    batch_size: int
    t_range: str
    samples: int
    top_k: int
    continual_options: dict = field(default_factory=dict)
    description: str = ""


PRESETS: dict[str, ReproducePreset] = {
    "quick": ReproducePreset(
        name="quick",
        dataset="digits",
        image_size=16,
        models=("small3",),
        train_steps=3000,
        lr=1e-3,
        batch_size=128,
        t_range="100..900",
        samples=1024,
        top_k=5,
        continual_options={"tasks": 5},
        description="digits 16 px, Small-3, 3000 steps at lr 1e-3 (minutes on 2 CPU cores)",
    ),
    "paper": ReproducePreset(
        name="paper",
        dataset="mnist",
        image_size=32,
        models=("base", "small1", "small3"),
        # 200 epochs of 60,000 images at batch 128 (paper App. D)
        train_steps=200 * 469,
        lr=2e-4,
        batch_size=128,
        t_range="100..900",
        samples=1024,
        top_k=5,
        # paper section 4.3: the `cl` UNet, 200 epochs per task (12,000 images at batch 128), lr 2e-4
        continual_options={
            "model": "cl",
            "tasks": 5,
            "steps_per_task": 200 * 94,
            "lr": 2e-4,
            "replay_per_class": 5000,
            "n_generated": 1000,
        },
        description="MNIST 32 px (--data-root), base + Small-1 + Small-3, 200 epochs at lr 2e-4 (GPU hours)",
    ),
}


class StageProgress(Protocol):
    """What the caller's progress display receives (the CLI draws it with one rich Progress)."""

    def start(self, stage: str, label: str, total: int) -> None: ...

    def update(self, stage: str, done: int, total: int | None = None, info: str = "") -> None: ...

    def finish(self, stage: str, status: str) -> None: ...


class _Silent:
    def start(self, stage, label, total):
        pass

    def update(self, stage, done, total=None, info=""):
        pass

    def finish(self, stage, status):
        pass


@dataclass
class StageRecord:
    """One stage of a run: its key (e.g. ``train:small3``), status (done / skipped) and seconds."""

    stage: str
    status: str
    seconds: float
    output: Path


@dataclass
class ReproduceResult:
    """What a run did: its stages in order, the figure files written and the figures it had to skip (name, reason)."""

    out: Path
    preset: ReproducePreset
    stages: list[StageRecord] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    skipped_figures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        """Wall-clock seconds of all stages."""
        return sum(s.seconds for s in self.stages)


def get_preset(name: str) -> ReproducePreset:
    """The preset called ``name``; UsageError naming the choices for an unknown one."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


# ---------------------------------------------------------------- stages


def _checkpoint_step(ckpt: Path) -> int:
    """The step of a checkpoint's resumable state (0 when there is none)."""
    state = ckpt / TRAIN_STATE
    if not state.is_file():
        return 0
    try:
        return int(json.loads(state.read_text())["step"])
    except (OSError, KeyError, ValueError, json.JSONDecodeError):
        return 0


def train_stage(
    preset: ReproducePreset,
    model: str,
    ckpt: Path,
    seed: int,
    device: str,
    data_root: str | None,
    progress: StageProgress,
) -> str:
    """Train ``model`` into ``ckpt`` or resume it; 'skipped' when it already reached the preset's steps."""
    from geomprobe.training import TrainConfig, train

    key = f"train:{model}"
    progress.start(key, f"train {model}", preset.train_steps)
    done = _checkpoint_step(ckpt)
    if done >= preset.train_steps:
        progress.update(key, preset.train_steps)
        return "skipped"
    config = TrainConfig(
        dataset=preset.dataset,
        model=model,
        image_size=preset.image_size,
        steps=preset.train_steps,
        batch_size=preset.batch_size,
        lr=preset.lr,
        seed=seed,
        data_root=data_root,
        device=device,
    )
    train(config, ckpt, resume=True, progress=lambda step, loss: progress.update(key, step, info=f"loss={loss:.4g}"))
    return "done" if done == 0 else f"resumed from step {done}"


def _extract_config(preset: ReproducePreset, ckpt: Path, seed: int, data_root: str | None):
    from geomprobe.probe.extract import ExtractConfig

    return ExtractConfig(ckpt=str(ckpt), t_range=preset.t_range, samples=preset.samples, seed=seed, data_root=data_root)


def store_is_complete(store: Path, config) -> bool:
    """True when ``store`` holds a finished store of exactly ``config`` on the current checkpoint."""
    from geomprobe.checkpoints import checkpoint_checksum
    from geomprobe.probe.extract import stored_identity
    from geomprobe.probe.store import read_manifest

    manifest = read_manifest(store) if store.is_dir() else None
    return bool(
        manifest
        and manifest.get("complete")
        and stored_identity(manifest) == config.comparable(checkpoint_checksum(config.ckpt))
    )


def grads_stage(
    preset: ReproducePreset,
    model: str,
    ckpt: Path,
    store: Path,
    seed: int,
    device: str,
    data_root: str | None,
    progress: StageProgress,
) -> str:
    """Per-sample gradients at the preset's timesteps into ``store`` (resumes from complete shards)."""
    from geomprobe.probe.extract import extract_gradients

    key = f"grads:{model}"
    config = _extract_config(preset, ckpt, seed, data_root)
    progress.start(key, f"grads {model}", preset.samples)  # the probe reports the real total (rows x timesteps)
    if store_is_complete(store, config):
        progress.update(key, 1, 1)
        return "skipped"

    def on_progress(done: int, total: int, **fields) -> None:
        rate = fields.get("samples_per_s")
        progress.update(key, done, total, info=f"{rate:.0f} samples/s" if rate else "")

    extract_gradients(
        config, store, device=device, progress=on_progress, command=["geomprobe", "reproduce", "--preset", preset.name]
    )
    return "done"


def spectrum_stage(model: str, store: Path, top_k: int, device: str, progress: StageProgress) -> str:
    """spectrum.json and cosine_maps.h5 for ``store``; skipped when both are newer than the store's manifest."""
    from geomprobe.analysis import analyze_store, write_spectrum
    from geomprobe.probe import GradientStore
    from geomprobe.probe.store import read_manifest

    key = f"spectrum:{model}"
    manifest = read_manifest(store) or {}
    keys = manifest.get("keys") or [None]
    progress.start(key, f"spectrum {model}", len(keys))
    outputs = [store / SPECTRUM_JSON, store / COSINE_MAPS]
    manifest_path = store / MANIFEST
    if all(p.is_file() and p.stat().st_mtime >= manifest_path.stat().st_mtime for p in outputs):
        progress.update(key, len(keys), len(keys))
        return "skipped"
    finished: list[str] = []

    def on_progress(name: str, done: int, total: int) -> None:
        if done >= total and name not in finished:
            finished.append(name)
        progress.update(key, len(finished), len(keys), info=name)

    gradient_store = GradientStore(store)
    from geomprobe.models import resolve_device

    result = analyze_store(gradient_store, top_k=top_k, device=str(resolve_device(device)), progress=on_progress)
    write_spectrum(result, gradient_store)
    return "done"


def continual_stage(
    preset: ReproducePreset, out: Path, seed: int, device: str, data_root: str | None, progress: StageProgress
) -> str:
    """The paper's strategy comparison (``geomprobe continual --compare``) into ``out``; it resumes by itself."""
    from geomprobe.continual import COMPARE_STRATEGIES, ContinualConfig, run_compare
    from geomprobe.continual.runner import total_steps

    options = {"model": preset.models[0], **preset.continual_options}
    config = ContinualConfig(dataset=preset.dataset, image_size=preset.image_size, data_root=data_root, **options)
    config.validate()
    total = total_steps(config, [seed]) * len(COMPARE_STRATEGIES)
    progress.start("continual", "continual --compare", total)
    run_compare(
        config,
        out,
        seeds=[seed],
        resume=True,
        device=device,
        progress=lambda done, fields: progress.update(
            "continual", done, total, info=" ".join(f"{k}={v}" for k, v in fields.items())
        ),
    )
    return "done"


def _newest_input(run_dirs: list[Path]) -> float:
    from geomprobe.figures.results import find_files

    files = find_files(run_dirs, SPECTRUM_JSON) + find_files(run_dirs, METRICS)
    return max((f.stat().st_mtime for f in files), default=0.0)


def figures_stage(run_dirs: list[Path], figures_dir: Path, progress: StageProgress, result: ReproduceResult) -> str:
    """All figures the results allow; skipped when the figures' manifest is newer than every input."""
    from geomprobe.figures import make_figures

    manifest = figures_dir / MANIFEST
    progress.start("figures", "figures", 1)
    if manifest.is_file() and manifest.stat().st_mtime >= _newest_input(run_dirs):
        record = json.loads(manifest.read_text())
        if all((figures_dir / name).is_file() for name in record.get("files", [])):
            result.figures = [figures_dir / name for name in record["files"]]
            result.skipped_figures = list(record.get("skipped", {}).items())
            progress.update("figures", 1, 1)
            return "skipped"
    count = [0]

    def on_figure(name: str) -> None:
        count[0] += 1
        progress.update("figures", count[0], None, info=name)

    report = make_figures(run_dirs, figures_dir, on_figure=on_figure)
    result.figures = report.files
    result.skipped_figures = report.skipped
    progress.update("figures", count[0], count[0])
    return "done"


# ---------------------------------------------------------------- driver


def resolve_preset(preset: str | ReproducePreset, overrides: dict, data_root: str | None) -> ReproducePreset:
    """The preset by name or as given, with ``overrides`` applied; UsageError for unknown settings or missing data.

    The CLI calls it before drawing its progress display, so that a refusal is one line.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if overrides:
        unknown = set(overrides) - set(ReproducePreset.__dataclass_fields__)
        if unknown:
            raise UsageError(f"unknown preset setting(s): {', '.join(sorted(unknown))}")
        preset = replace(preset, **overrides)
    if preset.dataset != "digits" and data_root is None:
        raise UsageError(f"the {preset.name} preset trains on {preset.dataset}: pass --data-root DIR with its files")
    return preset


def _run_stage(
    result: ReproduceResult, progress: StageProgress, stage: str, output: Path, fn: Callable[[], str]
) -> None:
    """Run one stage ``fn()``, time it, report its status and record it in ``result``."""
    t0 = time.perf_counter()
    status = fn()
    seconds = time.perf_counter() - t0
    progress.finish(stage, status)
    result.stages.append(StageRecord(stage, status, seconds, output))


def reproduce(
    preset: str | ReproducePreset,
    out: str | Path,
    with_continual: bool = False,
    seed: int = 0,
    device: str = "auto",
    data_root: str | None = None,
    progress: StageProgress | None = None,
    **overrides,
) -> ReproduceResult:
    """Run (or resume) the whole pipeline of ``preset`` under ``out``; return what each stage did.

    ``overrides`` replace preset fields (e.g. ``train_steps=500`` or ``samples=256`` for a smoke run).
    """
    preset = resolve_preset(preset, overrides, data_root)
    progress = progress or _Silent()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = ReproduceResult(out=out, preset=preset)
    for model in preset.models:
        ckpt = out / "models" / model
        store = ckpt / "grads"
        train = partial(train_stage, preset, model, ckpt, seed, device, data_root, progress)
        _run_stage(result, progress, f"train:{model}", ckpt, train)
        grads = partial(grads_stage, preset, model, ckpt, store, seed, device, data_root, progress)
        _run_stage(result, progress, f"grads:{model}", store, grads)
        spectrum = partial(spectrum_stage, model, store, preset.top_k, device, progress)
        _run_stage(result, progress, f"spectrum:{model}", store, spectrum)
    run_dirs = [out / "models"]
    if with_continual:
        cl_dir = out / "continual"
        continual = partial(continual_stage, preset, cl_dir, seed, device, data_root, progress)
        _run_stage(result, progress, "continual", cl_dir, continual)
        run_dirs.append(cl_dir)
    figures_dir = out / "figures"
    _run_stage(
        result, progress, "figures", figures_dir, partial(figures_stage, run_dirs, figures_dir, progress, result)
    )
    return result


def stage_keys(preset: str | ReproducePreset, with_continual: bool) -> list[tuple[str, str]]:
    """(key, label) of every stage in run order, for a progress display that lists them up front."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    keys = []
    for model in preset.models:
        keys += [
            (f"train:{model}", f"train {model}"),
            (f"grads:{model}", f"grads {model}"),
            (f"spectrum:{model}", f"spectrum {model}"),
        ]
    if with_continual:
        keys.append(("continual", "continual --compare"))
    keys.append(("figures", "figures"))
    return keys

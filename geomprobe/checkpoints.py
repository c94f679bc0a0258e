"""Checkpoints: saving, loading the three directory layouts, and their checks (docs/design.md §8 and §11).

:func:`load_model` reads three directory layouts (README, "Directory layouts accepted"):

- a geomprobe checkpoint (below);
- a diffusers pipeline directory: ``model_index.json`` + ``unet/`` [+ ``scheduler/``];
- a bare ``UNet2DModel`` directory: ``config.json`` (``_class_name`` UNet2DModel) +
  ``diffusion_pytorch_model.safetensors``.

A geomprobe checkpoint is a directory::

    unet/                 diffusers save_pretrained (config.json + diffusion_pytorch_model.safetensors)
    scheduler/            DDPMScheduler config (scheduler_config.json)
    geomprobe.json        preset, dataset, image size, channels, classes, seed, step, version
    optimizer.safetensors optional: Adam state for resumable training
    train_state.json      optional: RNG states and step for resumable training

Nothing is ever unpickled: weights are safetensors, everything else is JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from geomprobe.errors import DataError
from geomprobe.io import CHECKPOINT_META, TRAIN_STATE
from geomprobe.lock import is_locked
from geomprobe.models import build_scheduler, resolve_device


@dataclass
class ModelInfo:
    """What ``geomprobe.json`` records about a checkpoint (derived from the UNet config for other layouts).

    ``num_classes`` is None for an unconditional model; ``dataset`` is ``""`` when the model does
    not record one (diffusers directories), ``preset`` is ``"external"`` then.
    """

    preset: str
    dataset: str
    image_size: int
    channels: int
    num_classes: int | None
    seed: int
    step: int
    version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checkpoint:
    """A loaded model: the UNet, its scheduler and its metadata.

    ``layout``: ``geomprobe``, ``pipeline`` or ``unet`` (see :func:`load_model`). ``notes``: one-line
    remarks a command prints (e.g. that the default DDPM scheduler was used).
    """

    unet: UNet2DModel
    scheduler: DDPMScheduler
    info: ModelInfo
    path: Path | None = None
    layout: str = "geomprobe"
    notes: list[str] = field(default_factory=list)


STAGING = ".staging"
STAGING_COMPLETE = "COMPLETE"
TRAINING_COMPLETE = "training_complete"
"""Key of ``geomprobe.json``'s ``extra``: True for the checkpoint of a finished ``train``, False for an
intermediate one (every ``--checkpoint-every`` steps, or saved by Ctrl-C). Loading an intermediate
checkpoint adds a one-line note naming its step (:func:`training_note`); it is not refused."""


def training_note(info: ModelInfo, directory: Path) -> str | None:
    """The note for an unfinished ``train`` checkpoint, None for a finished one or another kind of model.

    Checkpoints written before the marker existed count as unfinished when their step is below the
    ``steps`` of their ``train_config``.
    """
    config = info.extra.get("train_config")
    if not isinstance(config, dict):
        return None
    complete = info.extra.get(TRAINING_COMPLETE)
    steps = config.get("steps")
    if complete is None:
        complete = not isinstance(steps, int) or info.step >= steps
    if complete:
        return None
    return (
        f"{directory} is an intermediate checkpoint at step {info.step} of {steps} (training unfinished; "
        "`geomprobe train ... --resume` completes it)"
    )


def save_checkpoint(
    directory: str | Path,
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    info: ModelInfo,
    optimizer_state: dict[str, torch.Tensor] | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint into ``directory`` so that a crash never leaves a mixed state.

    Everything is first written to ``directory/.staging/``; a ``COMPLETE`` marker then commits
    it and the entries are moved into place. A reader finishes a committed staging area
    (roll forward) and discards an uncommitted one. Other files in ``directory`` (the
    training log, gradient stores) are left alone.
    """
    from safetensors.torch import save_file

    from geomprobe import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / STAGING
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    from safetensors import SafetensorError

    try:
        unet.save_pretrained(staging / "unet", safe_serialization=True)
        scheduler.save_pretrained(staging / "scheduler")
        info.version = __version__
        (staging / CHECKPOINT_META).write_text(json.dumps(asdict(info), indent=2))
        if optimizer_state is not None:
            save_file(
                {k: v.contiguous().cpu() for k, v in optimizer_state.items()}, str(staging / "optimizer.safetensors")
            )
        if train_state is not None:
            (staging / TRAIN_STATE).write_text(json.dumps(train_state))
    except SafetensorError as exc:  # its I/O errors (a full disk) are not OSErrors: make them one line like those
        raise OSError(f"cannot write a checkpoint in {staging}: {str(exc).splitlines()[0]}") from None
    (staging / STAGING_COMPLETE).write_text("")
    finish_staged_checkpoint(directory)
    return directory


def finish_staged_checkpoint(directory: str | Path) -> None:
    """Move a committed ``.staging`` area into place; drop an uncommitted one."""
    directory = Path(directory)
    staging = directory / STAGING
    if not staging.is_dir():
        return
    if not (staging / STAGING_COMPLETE).is_file():
        shutil.rmtree(staging)
        return
    for entry in sorted(staging.iterdir()):
        if entry.name == STAGING_COMPLETE:
            continue
        target = directory / entry.name
        old = directory / (entry.name + ".old")
        if old.exists():  # left by a crash in the middle of an earlier swap
            shutil.rmtree(old)
        if target.is_dir():
            os.replace(target, old)
            os.replace(entry, target)
            shutil.rmtree(old)
        else:
            os.replace(entry, target)
    shutil.rmtree(staging)


LAYOUTS = ("geomprobe", "pipeline", "unet")
WEIGHTS = "diffusion_pytorch_model.safetensors"
DEFAULT_SCHEDULER_NOTE = "using the DDPM default scheduler (linear betas 1e-4..0.02, 1000 steps)"


def model_layout(directory: str | Path) -> tuple[str, Path]:
    """(layout, UNet directory) of a model directory; DataError (one line) when it is none of the three.

    Layouts: ``geomprobe`` (geomprobe.json + unet/), ``pipeline`` (model_index.json + unet/),
    ``unet`` (config.json of a UNet2DModel + its weights in the directory itself).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"checkpoint directory not found: {directory}")
    if (directory / CHECKPOINT_META).is_file() or (directory / STAGING / CHECKPOINT_META).is_file():
        if is_locked(directory):  # a live train owns the directory: read its last committed checkpoint only
            if not (directory / CHECKPOINT_META).is_file():
                raise DataError(f"{directory}: its first checkpoint is still being written (geomprobe.lock)")
        else:
            finish_staged_checkpoint(directory)
        layout, unet_dir = "geomprobe", directory / "unet"
    elif (directory / "model_index.json").is_file():
        layout, unet_dir = "pipeline", directory / "unet"
        index = _read_json(directory / "model_index.json")
        cls = (index.get("unet") or [None, None])[-1]
        if cls not in (None, "UNet2DModel"):
            raise DataError(
                f"{directory / 'model_index.json'}: the pipeline's unet is a {cls}; geomprobe reads UNet2DModel only"
            )
    elif (directory / "config.json").is_file():
        layout, unet_dir = "unet", directory
    else:
        raise DataError(
            f"not a geomprobe checkpoint, diffusers pipeline or UNet2DModel directory: {directory} (expected "
            "geomprobe.json + unet/, model_index.json + unet/, or config.json + diffusion_pytorch_model.safetensors)"
        )
    config = unet_dir / "config.json"
    if not config.is_file():
        raise DataError(f"not a {layout} directory: {config} is missing")
    cls = _read_json(config).get("_class_name")
    if cls != "UNet2DModel":
        raise DataError(f"{config} describes a {cls or 'model without _class_name'}; geomprobe reads UNet2DModel only")
    _weight_files(unet_dir)  # refuse pickles and missing weights before anything is loaded
    return layout, unet_dir


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(value, dict):
        raise DataError(f"{path} is not a JSON object")
    return value


def _weight_files(unet_dir: Path) -> list[Path]:
    """The UNet's safetensors files (one file, or an index and its shards); never a pickle."""
    single, index = unet_dir / WEIGHTS, unet_dir / (WEIGHTS + ".index.json")
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (unet_dir / s).is_file()]
        if missing:
            raise DataError(f"{index} names {missing[0]}, which is missing")
        return [index] + [unet_dir / s for s in shards]
    if any(unet_dir.glob("diffusion_pytorch_model*.bin")):
        raise DataError(
            f"{unet_dir} holds only diffusion_pytorch_model.bin (a pickle, never loaded by geomprobe): convert it once, "
            "where you trust the file, with UNet2DModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)"
        )
    raise DataError(f"no UNet weights in {unet_dir}: expected {WEIGHTS}")


def load_scheduler(directory: str | Path, required: bool = False) -> tuple[DDPMScheduler, str | None]:
    """(DDPMScheduler, note): ``directory/scheduler`` read locally, else the default and a note.

    Without ``scheduler/scheduler_config.json`` the DDPM default of :func:`build_scheduler` is used
    and the one-line note says so (None otherwise); with ``required`` (a geomprobe checkpoint, whose
    writer always saves its scheduler, so a missing one is a damaged checkpoint) that is a DataError.
    Any discrete-time scheduler config with betas (DDPM, DDIM, PNDM, ...; every ``beta_schedule``)
    gives the same alphas_cumprod; models that do not predict epsilon are refused. Never touches the network.
    """
    folder = Path(directory) / "scheduler"
    config_file = folder / "scheduler_config.json"
    if not config_file.is_file():
        if required:
            raise DataError(
                f"{config_file} is missing (a geomprobe checkpoint always has its scheduler; the directory is damaged)"
            )
        return build_scheduler(), f"no scheduler/scheduler_config.json in {directory}: {DEFAULT_SCHEDULER_NOTE}"
    config = _read_json(config_file)
    if "num_train_timesteps" not in config and "beta_schedule" not in config and "trained_betas" not in config:
        raise DataError(
            f"{config_file} ({config.get('_class_name', 'unknown class')}) is not a discrete-time beta schedule"
        )
    try:
        scheduler = DDPMScheduler.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, NotImplementedError, RuntimeError) as exc:
        raise DataError(f"cannot load {config_file}: {str(exc).splitlines()[0]}") from None
    if scheduler.config.prediction_type != "epsilon":
        raise DataError(
            f"{config_file}: prediction_type {scheduler.config.prediction_type!r}; geomprobe's loss is the epsilon-prediction DDPM loss"
        )
    return scheduler, None


def _info_from_unet(unet: UNet2DModel, layout: str) -> ModelInfo:
    """ModelInfo from the UNet config: sample_size, in_channels and num_class_embeds (None if unconditional)."""
    from geomprobe.diffusion import is_label_conditioned

    cfg = unet.config
    size = cfg.sample_size
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise DataError(f"UNet sample_size {list(size)} is not square; geomprobe handles square images only")
        size = size[0]
    if not isinstance(size, int) or size <= 0:
        raise DataError(f"the UNet config has no usable sample_size ({size!r}); set it in its config.json")
    if cfg.out_channels != cfg.in_channels:
        raise DataError(
            f"the UNet has in_channels={cfg.in_channels} but out_channels={cfg.out_channels}; the DDPM loss needs them equal"
        )
    num_classes = None
    if is_label_conditioned(unet):
        if not cfg.num_class_embeds:
            raise DataError(f"class_embed_type {cfg.class_embed_type!r} without num_class_embeds is not supported")
        num_classes = int(cfg.num_class_embeds)
    return ModelInfo(
        "external", "", int(size), int(cfg.in_channels), num_classes, seed=0, step=0, extra={"layout": layout}
    )


def _check_meta(meta_file: Path, info: ModelInfo, derived: ModelInfo) -> None:
    """Check geomprobe.json against the UNet config: a one-line DataError naming the file on disagreement."""
    for name, key in (("image_size", "sample_size"), ("channels", "in_channels"), ("num_classes", "num_class_embeds")):
        mine, theirs = getattr(info, name), getattr(derived, name)
        if mine != theirs:
            raise DataError(
                f"{meta_file} says {name}={mine} but {meta_file.parent / 'unet' / 'config.json'} has {key}={theirs}; fix or remove {meta_file.name}"
            )


def _load_unet(unet_dir: Path) -> UNet2DModel:
    """The UNet of ``unet_dir`` from its config.json and safetensors weights, read locally (never the network).

    Args:
        unet_dir: a directory with ``config.json`` and the weights (:func:`_weight_files`).

    Returns:
        The UNet2DModel with every parameter taken from the weights.

    Raises:
        DataError: one line; when config.json and the weights disagree (shapes, or tensors one has and the
            other lacks, e.g. an edited ``block_out_channels`` or ``layers_per_block``) it names both files.
    """
    weights = _weight_files(unet_dir)[0]
    disagree = f"{unet_dir / 'config.json'} does not match {weights}"
    try:
        unet, loading = UNet2DModel.from_pretrained(
            unet_dir, use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False, output_loading_info=True
        )
    except RuntimeError as exc:  # torch's load_state_dict: "size mismatch for conv_in.weight: ..."
        details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise DataError(f"{disagree}: {details[0] if details else str(exc).strip()}") from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DataError(f"cannot load {unet_dir}: {str(exc).strip().splitlines()[0]}") from None
    checks = (
        ("missing_keys", "the weights lack"),
        ("unexpected_keys", "the config has no"),
        ("mismatched_keys", "shapes differ for"),
    )
    for key, what in checks:
        names = sorted(n[0] if isinstance(n, tuple) else n for n in loading.get(key) or [])
        if names:  # diffusers would initialise missing tensors at random: a silently different model
            raise DataError(f"{disagree}: {what} {len(names)} tensor(s), e.g. {names[0]}")
    return unet


_META_TYPES = {
    "preset": str,
    "dataset": str,
    "image_size": int,
    "channels": int,
    "seed": int,
    "step": int,
    "version": str,
    "extra": dict,
}


def read_model_info(meta: Path) -> ModelInfo:
    """The :class:`ModelInfo` of a geomprobe checkpoint's ``geomprobe.json``, its fields' types and values checked.

    Args:
        meta: the ``geomprobe.json`` file.

    Returns:
        ModelInfo with ``image_size``, ``channels`` > 0, ``num_classes`` > 0 or None, ``step`` >= 0.

    Raises:
        DataError: one line naming the file and the first bad field (unknown or missing keys, a string
            where a number belongs, a non-positive size).
    """
    raw = _read_json(meta)
    known = {f for f in ModelInfo.__dataclass_fields__}
    unknown = sorted(set(raw) - known)
    missing = sorted(
        k for k in ("preset", "dataset", "image_size", "channels", "num_classes", "seed", "step") if k not in raw
    )
    if unknown or missing:
        what = f"unknown key {unknown[0]!r}" if unknown else f"no {missing[0]!r}"
        raise DataError(f"{meta} is malformed: {what}")
    for key, kind in _META_TYPES.items():
        value = raw.get(key, "" if kind is str else {} if kind is dict else 0)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DataError(
                f"{meta} is malformed: {key}={value!r} is not {'an' if kind is int else 'a'} {kind.__name__}"
            )
    classes = raw["num_classes"]
    if classes is not None and (not isinstance(classes, int) or isinstance(classes, bool) or classes <= 0):
        raise DataError(f"{meta} is malformed: num_classes={classes!r} is not a positive int or null")
    for key in ("image_size", "channels"):
        if raw[key] <= 0:
            raise DataError(f"{meta} is malformed: {key}={raw[key]!r} is not positive")
    if raw["step"] < 0:
        raise DataError(f"{meta} is malformed: step={raw['step']!r} is negative")
    return ModelInfo(**raw)


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load any model directory geomprobe accepts (see :func:`model_layout`): safetensors + JSON only.

    Never touches the network. Size, channels and classes come from the UNet config; for a
    geomprobe checkpoint ``geomprobe.json`` is checked (types, values, and against the UNet config,
    :func:`read_model_info`) and ``scheduler/`` is required; config.json must match the weights
    (:func:`_load_unet`).

    Args:
        directory: the model directory.
        device: where the UNet goes.

    Returns:
        The :class:`Checkpoint` (notes: the default-scheduler note, the intermediate-checkpoint note).

    Raises:
        DataError: one line naming the file at fault.
    """
    from diffusers.utils import logging as diffusers_logging

    directory = Path(directory)
    layout, unet_dir = model_layout(directory)
    previous, bars = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()  # no multi-line advice about accelerate or unused config keys
    diffusers_logging.disable_progress_bar()  # nor a "Loading checkpoint shards" bar
    try:
        unet = _load_unet(unet_dir)
        if layout == "unet":
            scheduler, note = (
                build_scheduler(),
                f"{directory} is a bare UNet2DModel directory: {DEFAULT_SCHEDULER_NOTE}",
            )
        else:
            scheduler, note = load_scheduler(directory, required=layout == "geomprobe")
    finally:
        diffusers_logging.set_verbosity(previous)
        if bars:
            diffusers_logging.enable_progress_bar()
    derived = _info_from_unet(unet, layout)
    info = derived
    if layout == "geomprobe":
        meta = directory / CHECKPOINT_META
        info = read_model_info(meta)
        _check_meta(meta, info, derived)
    unet.to(resolve_device(device) if isinstance(device, str) else device)
    unet.eval()
    return Checkpoint(
        unet=unet,
        scheduler=scheduler,
        info=info,
        path=directory,
        layout=layout,
        notes=[n for n in (note, training_note(info, directory)) if n],
    )


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """:func:`load_model` (kept for its callers): any of the three layouts, safetensors + JSON only."""
    return load_model(directory, device)


OPTIMIZER_STATE = "optimizer.safetensors"


def load_optimizer_state(directory: str | Path) -> dict[str, torch.Tensor] | None:
    """The optimiser tensors saved with a checkpoint (``optimizer.safetensors``), or None when absent.

    Raises:
        DataError: the file is not readable safetensors (truncated, garbage); the message names it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / OPTIMIZER_STATE
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DataError(f"{path} is not a readable safetensors file: {str(exc).strip().splitlines()[0]}") from None


def load_train_state(directory: str | Path) -> dict[str, Any] | None:
    """The JSON training state saved with a checkpoint, or None when absent.

    Returns:
        ``{"step": int >= 0, "generator": base64 str, "param_groups": list, ...}``.

    Raises:
        DataError: not JSON, not an object, or a key missing or of the wrong type (names the file).
    """
    path = Path(directory) / TRAIN_STATE
    if not path.is_file():
        return None
    state = _read_json(path)
    for key, kind in (("step", int), ("generator", str), ("param_groups", list)):
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (key == "step" and value < 0):
            raise DataError(f"{path} is malformed: {key}={value!r}")
    return state


def checkpoint_checksum(directory: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of the UNet weights: identifies the model, in any of the three layouts.

    Hashes the weights file, or a sharded model's index and its shards in order.
    """
    import hashlib

    h = hashlib.sha256()
    for path in _weight_files(model_layout(directory)[1]):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]

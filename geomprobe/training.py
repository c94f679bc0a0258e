"""The training loop: one obvious loop (batch, loss, extra loss terms, step, log, checkpoint).

``train`` trains a UNet on a dataset from scratch or resumes it; ``training_loop`` is the loop
itself, reused by the continual runner, which adds loss terms (EWC penalties, distillation)
through ``extra_loss``.

Reproducibility: one CPU ``torch.Generator`` draws batch indices, timesteps and noise, so a run
is the same on CPU and CUDA up to kernel differences, and its state is saved with every
checkpoint; ``--resume`` continues bit-for-bit where the last checkpoint stopped (on CPU).

Under ``torchrun --nproc-per-node K`` (geomprobe/distributed.py) ``train`` wraps the UNet in
DistributedDataParallel: every rank draws the same global batch from that generator and trains on
its rows ``[rank::K]``; DDP averages the gradients, so with the per-sample-mean loss a step equals
the single-process step up to the order of float sums. The generator state in a checkpoint is the
global one, so a run resumes with any number of processes dividing ``--batch-size``. Rank 0 alone
writes checkpoints and the log; the other ranks wait at a barrier.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from geomprobe.checkpoints import (
    STAGING,
    TRAINING_COMPLETE,
    ModelInfo,
    finish_staged_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    load_train_state,
    save_checkpoint,
)
from geomprobe.data import DATASET_FACTS, ImageDataset, load_dataset, parse_classes
from geomprobe.diffusion import per_sample_loss
from geomprobe.distributed import (
    any_rank,
    barrier,
    dist_info,
    init_dist,
    local_device,
    mean_over_ranks,
    on_every_rank,
    rank_slice,
)
from geomprobe.errors import DataError, UsageError
from geomprobe.io import (
    CHECKPOINT_META,
    TRAIN_LOG,
    Interrupted,
    deferred_interrupts,
    interrupt_requested,
    raise_if_interrupted,
    torch_generator,
)
from geomprobe.lock import LOCK_NAME, directory_lock, print_note
from geomprobe.models import build_scheduler, build_unet, get_preset, resolve_device


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved in the checkpoint's metadata)."""

    dataset: str = "digits"
    model: str = "small3"
    image_size: int | None = None  # None: the dataset's size (geomprobe.data.DATASET_FACTS)
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    classes: str | None = None
    data_root: str | None = None
    checkpoint_every: int = 500
    log_every: int = 10
    device: str = "auto"
    precision: str = (
        "fp32"  # fp32 | bf16: bf16 autocast of the UNet's forward (weights, Adam and the loss stay float32)
    )

    def __post_init__(self) -> None:
        if self.image_size is None and self.dataset in DATASET_FACTS:
            self.image_size = DATASET_FACTS[self.dataset].image_size

    def validate(self) -> None:
        get_preset(self.model)
        if self.steps < 0:
            raise UsageError(f"--steps must be >= 0, got {self.steps}")
        if self.batch_size <= 0:
            raise UsageError(f"--batch-size must be positive, got {self.batch_size}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if self.checkpoint_every <= 0 or self.log_every <= 0:
            raise UsageError("--checkpoint-every and --log-every must be positive")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
"""``--precision`` -> the autocast dtype of the training forward (None: no autocast)."""


def generator_state_to_json(gen: torch.Generator) -> str:
    """A CPU generator's state as base64 text (for train_state.json)."""
    return base64.b64encode(gen.get_state().numpy().tobytes()).decode()


def generator_state_from_json(text: str) -> torch.Tensor:
    """The uint8 state tensor from :func:`generator_state_to_json` text."""
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """Flatten an optimizer state dict into safetensors-compatible tensors + JSON param groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            tensors[f"{pid}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, sd["param_groups"]


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    """Load saved optimiser tensors (``"<param id>.<name>"``) and param groups into ``optimizer``."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def sample_training_batch(
    data: ImageDataset, batch_size: int, num_train_timesteps: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0, y, t, noise) for one step, all drawn from ``gen`` on the CPU."""
    idx = torch.randint(0, len(data), (batch_size,), generator=gen)
    x0, y = data.batch(idx)
    t = torch.randint(0, num_train_timesteps, (batch_size,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    return x0, y, t, noise


ExtraLoss = Callable[[UNet2DModel, int], dict[str, torch.Tensor]]


def training_loop(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    optimizer: torch.optim.Optimizer,
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    start_step: int,
    end_step: int,
    extra_loss: ExtraLoss | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    log_every: int = 10,
    checkpoint_every: int = 500,
    progress: Callable[[int, float], None] | None = None,
    stop_requested: Callable[[], bool] = lambda: interrupt_requested(),
    autocast: torch.dtype | None = None,
) -> float:
    """Run steps ``start_step+1 .. end_step``; return the last step's total loss.

    Each step: batch -> mean per-sample DDPM loss -> + extra loss terms -> Adam step ->
    log (every ``log_every``) -> checkpoint (every ``checkpoint_every`` and at the end).

    Ctrl-C under the CLI's handler (geomprobe/io.py, "interrupts") stops the loop at the end of the
    current step: ``on_checkpoint(step)`` is called (unless that step was just saved) and
    :class:`geomprobe.io.Interrupted` is raised with that step (None without ``on_checkpoint``).
    Under torchrun ``unet`` is the DistributedDataParallel wrapper, ``next_batch`` gives this rank's
    rows and ``stop_requested`` is the Ctrl-C flag agreed by all ranks, so every rank stops at the same step.
    ``extra_loss`` gets the wrapped module (its forwards bypass DDP; their gradients join the one
    all-reduce of the backward, which averages terms that are equal on every rank to themselves).
    ``autocast`` (e.g. ``torch.bfloat16``): the denoising forward runs under ``torch.autocast``; its
    loss is taken in float32, and the extra terms (EWC penalties: the Fisher stays float32) are outside.
    """
    device = next(unet.parameters()).device
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    unet.train()
    loss_value = float("nan")
    raise_if_interrupted()
    with deferred_interrupts():
        for step in range(start_step + 1, end_step + 1):
            x0, y, t, noise = (v.to(device) for v in next_batch())
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                denoise = per_sample_loss(unet, x0, noise, t, y, alphas_cumprod)
            terms = {"denoise": denoise.float().mean()}
            if extra_loss is not None:
                terms.update(extra_loss(getattr(unet, "module", unet), step))  # terms run the module, not DDP
            loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
            if progress is not None:
                progress(step, loss_value)
            if on_log is not None and (step % log_every == 0 or step == end_step):
                on_log(step, {"loss": loss_value, **{k: float(v.detach()) for k, v in terms.items()}})
            saved = on_checkpoint is not None and (step % checkpoint_every == 0 or step == end_step)
            if saved:
                on_checkpoint(step)
            if stop_requested():
                if on_checkpoint is not None and not saved:
                    on_checkpoint(step)
                raise Interrupted(step if on_checkpoint is not None else None)
    return loss_value


@dataclass
class TrainResult:
    """What ``train`` returns: output directory, steps, final loss, parameter count, seconds, log rows."""

    out: Path
    steps: int
    final_loss: float
    num_parameters: int
    seconds: float
    resumed_from: int = 0
    log: list[dict] = field(default_factory=list)


def _log_rows(path: Path) -> list[tuple[str, dict]]:
    """(line, row) of a training log; a partial last line (a write cut short by a kill or a full disk) is dropped.

    Raises:
        DataError: an earlier line is not valid JSON (names the file and the line).
    """
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise DataError(f"{path}: line {number} is not valid JSON") from None
    return rows


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines past ``last_step`` (written after the checkpoint a resume restarts from) and a partial last line."""
    if not path.exists():
        return
    keep = [line for line, row in _log_rows(path) if row.get("step", 0) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


# What a run directory holds before its first checkpoint is complete: a run killed then (SIGKILL, a
# full disk) restarts from step 0 instead of being refused.
_BEFORE_FIRST_CHECKPOINT = {TRAIN_LOG, TRAIN_LOG + ".tmp", STAGING, LOCK_NAME}


def _prepare_out(out: Path, resume: bool) -> bool:
    """Decide how ``train`` uses ``out``; True when it holds a checkpoint to resume.

    A directory with no completed checkpoint and only what a training run writes before it (the log, an
    uncommitted ``.staging``) is cleared and started afresh, with or without ``--resume``; a checkpoint
    without ``--resume`` and a directory with other files are refused (one line).
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if not out.is_dir():
        return False
    finish_staged_checkpoint(out)  # roll a committed checkpoint forward, drop an uncommitted one
    entries = sorted(e.name for e in out.iterdir())
    if not set(entries) - {LOCK_NAME}:
        return False
    if (out / CHECKPOINT_META).is_file():
        if not resume:
            raise UsageError(
                f"output directory {out} holds a checkpoint; pass --resume to continue it or choose another --out"
            )
        return True
    foreign = [e for e in entries if e not in _BEFORE_FIRST_CHECKPOINT]
    if foreign:
        raise UsageError(
            f"output directory {out} is not empty ({foreign[0]}) and holds no geomprobe checkpoint; choose another --out"
        )
    for name in entries:  # a run that never finished its first checkpoint: start again (our lock stays)
        if name == LOCK_NAME:
            continue
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return False


def train(
    config: TrainConfig,
    out: str | Path,
    resume: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train (or resume) a UNet on ``config.dataset``; the checkpoint directory is ``out``.

    Under torchrun: DistributedDataParallel over the ranks (module docstring); the process group is
    created here when it does not exist yet, and destroyed at the end if it was.
    """
    config.validate()
    rank, world = dist_info()
    if config.batch_size % world:
        raise UsageError(f"--batch-size {config.batch_size} is not divisible by the {world} torchrun processes")
    device = resolve_device(config.device)
    started = init_dist(world, device)
    try:
        with directory_lock(out, rank == 0, print_note, world):  # one writer per checkpoint directory
            return _train(config, Path(out), resume, progress, rank, world, local_device(device, world))
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(config, out: Path, resume: bool, progress, rank: int, world: int, device: torch.device) -> TrainResult:
    import time

    data = _training_data(config)
    gen = torch_generator(config.seed)
    unet, scheduler, optimizer, start_step = _model_and_optimizer(config, data, out, resume, rank, world, device, gen)
    log_path = out / TRAIN_LOG
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_log(log_path, start_step)
    barrier(world)
    log_rows: list[dict] = []

    def on_log(step: int, values: dict[str, float]) -> None:
        row = {"step": step, **mean_over_ranks(world, values)}
        log_rows.append(row)
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    write_checkpoint = _checkpoint_writer(config, data, out, unet, scheduler, optimizer, gen)

    def on_checkpoint(step: int) -> None:
        if rank == 0:
            write_checkpoint(step)
        barrier(world)

    model = unet
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None)
    timesteps = scheduler.config.num_train_timesteps
    t0 = time.time()
    if start_step >= config.steps:
        final = float("nan")
        if start_step == 0:
            on_checkpoint(0)
    else:
        final = training_loop(
            model,
            scheduler,
            optimizer,
            lambda: rank_slice(sample_training_batch(data, config.batch_size, timesteps, gen), rank, world),
            start_step,
            config.steps,
            on_log=on_log,
            on_checkpoint=on_checkpoint,
            log_every=config.log_every,
            checkpoint_every=config.checkpoint_every,
            progress=progress,
            stop_requested=lambda: any_rank(world, interrupt_requested()),
            autocast=PRECISIONS[config.precision],
        )
        if world > 1:  # the last step's loss over the global batch (the last log row is that step)
            final = log_rows[-1]["loss"]
    return TrainResult(
        out, config.steps, final, sum(p.numel() for p in unet.parameters()), time.time() - t0, start_step, log_rows
    )


def _training_data(config: TrainConfig):
    """The training split of ``config.dataset`` (restricted to ``config.classes``); DataError when empty."""
    data = load_dataset(config.dataset, "train", config.image_size, config.data_root)
    classes = parse_classes(config.classes, data.num_classes)
    if classes is not None:
        data = data.subset(classes)
    if len(data) == 0:
        raise DataError("no training images selected")
    return data


def _model_and_optimizer(config: TrainConfig, data, out: Path, resume: bool, rank: int, world: int, device, gen):
    """(unet, scheduler, Adam, start step): fresh and seeded, or the checkpoint's state when resuming.

    Rank 0 alone clears or refuses ``out``; the other ranks see its decision (or its error).
    """
    torch.manual_seed(config.seed)
    unet = build_unet(config.model, data.image_size, data.channels, data.num_classes)
    scheduler = build_scheduler()
    start_step = 0
    has_checkpoint = on_every_rank(
        world, lambda: _prepare_out(out, resume) if rank == 0 else None, f"rank 0 could not use --out {out}"
    )
    if rank != 0:
        has_checkpoint = (out / CHECKPOINT_META).is_file()
    if has_checkpoint:
        unet, start_step = _resume_state(config, out, gen)
    unet.to(device)
    optimizer = torch.optim.Adam(unet.parameters(), lr=config.lr)
    if start_step > 0:
        tensors = load_optimizer_state(out)
        if tensors is None:
            raise DataError(f"{out} has no optimizer.safetensors; it cannot be resumed")
        groups = load_train_state(out)["param_groups"]
        try:
            restore_optimizer(optimizer, {k: v.to(device) for k, v in tensors.items()}, groups)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise DataError(
                f"{out / 'optimizer.safetensors'} does not fit the model and the param_groups of {out / 'train_state.json'}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
            ) from None
    return unet, scheduler, optimizer, start_step


def _checkpoint_writer(config: TrainConfig, data, out: Path, unet, scheduler, optimizer, gen: torch.Generator):
    """``on_checkpoint(step)``: save the model, scheduler, optimizer state and generator state into ``out``."""

    def on_checkpoint(step: int) -> None:
        tensors, groups = optimizer_state_tensors(optimizer)
        info = ModelInfo(
            preset=config.model,
            dataset=config.dataset,
            image_size=data.image_size,
            channels=data.channels,
            num_classes=data.num_classes,
            seed=config.seed,
            step=step,
            extra={"train_config": asdict(config), TRAINING_COMPLETE: step >= config.steps},
        )
        train_state = {"step": step, "generator": generator_state_to_json(gen), "param_groups": groups}
        save_checkpoint(out, unet, scheduler, info, optimizer_state=tensors, train_state=train_state)

    return on_checkpoint


def _resume_state(config: TrainConfig, out: Path, gen: torch.Generator) -> tuple[UNet2DModel, int]:
    """The checkpoint's UNet and step; ``gen`` set to its saved state; a changed config is refused."""
    ckpt = load_checkpoint(out)
    saved = ckpt.info.extra.get("train_config", {})
    for key in ("dataset", "model", "image_size", "batch_size", "lr", "seed", "classes"):
        if key in saved and saved[key] != getattr(config, key):
            raise UsageError(f"--resume with {key}={getattr(config, key)!r} but {out} was trained with {saved[key]!r}")
    state = load_train_state(out)
    if state is None:
        raise DataError(f"{out} has no train_state.json; it cannot be resumed")
    try:
        gen.set_state(generator_state_from_json(state["generator"]))
    except (ValueError, RuntimeError) as exc:  # bad base64, or not a generator state
        raise DataError(
            f"{out / 'train_state.json'} holds no usable generator state: {str(exc).splitlines()[0]}"
        ) from None
    if state["step"] != ckpt.info.step:
        raise DataError(
            f"{out / 'train_state.json'} is at step {state['step']} but {out / CHECKPOINT_META} at step {ckpt.info.step}"
        )
    return ckpt.unet, int(state["step"])


def read_train_log(out: str | Path) -> list[dict]:
    """The rows of ``out/train_log.jsonl`` ([] when absent; a partial last line is left out)."""
    return [row for _, row in _log_rows(Path(out) / TRAIN_LOG)]


def smoothed(values: Iterable[float], window: int = 20) -> list[float]:
    """Trailing moving average over ``window`` values (shorter at the start)."""
    vals = list(values)
    return [sum(vals[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(vals))]

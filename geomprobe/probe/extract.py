"""The extraction driver behind ``geomprobe grads``: checkpoint + dataset -> gradient store.

Rows and reproducibility
    The probed samples are the first ``samples`` of a permutation (seeded by ``seed``) of the split's
    rows (restricted to ``classes``); the same samples are used at every key. The inputs of row r at
    key k (its noise, its t for a band, its xi for ``target=true``) come from a CPU generator seeded
    by ``(seed, k, r)`` only, so a row does not depend on the shard, the rank, the chunk size or the
    device that computes it.

Shards, resume and torchrun
    Rows are cut into shards of ``shard_rows``; shard j holds rows ``[j*shard_rows, (j+1)*shard_rows)``
    for every key. Under ``torchrun`` (``WORLD_SIZE`` > 1, gloo or NCCL) rank r writes shards
    ``j % world_size == r``; rank 0 then writes the manifest, so K processes write the same files as
    one. A rerun of the same config skips complete shards (after checking them) and refuses corrupt
    ones; a different config on an existing store is refused unless ``overwrite``. Rank 0 holds the
    store's lock file (:mod:`geomprobe.lock`) for the whole run, so a second writer is refused.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import InitVar, asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geomprobe.checkpoints import ModelInfo, checkpoint_checksum, load_model
from geomprobe.data import DIGITS_IMAGE_SIZES, ResizedDataset, fit_to_model, load_dataset, parse_classes
from geomprobe.distributed import barrier, dist_info, init_dist, on_every_rank
from geomprobe.errors import DataError, UsageError
from geomprobe.io import derived_seed, numpy_generator, parse_memory, torch_generator
from geomprobe.lock import LOCK_NAME, directory_lock
from geomprobe.models import resolve_device
from geomprobe.probe.grads import per_sample_grads
from geomprobe.probe.memory import reproducible_chunk
from geomprobe.probe.params import ParamLayout, param_layout, select_parameters
from geomprobe.probe.products import ProbeBatch, true_fisher_target
from geomprobe.probe.projection import PROJECTIONS, CountSketch, RandomProjection, make_projection
from geomprobe.probe.store import (
    FORMAT_VERSION,
    MANIFEST,
    STORE_KIND,
    ShardWriter,
    check_shard,
    file_sha256,
    key_for,
    read_manifest,
    shard_name,
    write_manifest,
)
from geomprobe.timesteps import TimestepSpec, parse_timesteps, snr

TARGETS = ("empirical", "true")
DTYPES = ("float32", "float16")
DEFAULT_SHARD_ROWS = 256


@dataclass
class ExtractConfig:
    """Everything that determines the contents of a store (compared on resume).

    ``device``, ``max_memory`` and the output path do not change the rows and are not part of it.
    """

    ckpt: str
    t_range: str = ""
    samples: int = 1024
    classes: str | None = None
    split: str = "train"
    params: str | None = None
    target: str = "empirical"
    project: int | None = None
    dtype: str = "float32"
    seed: int = 0
    data_root: str | None = None
    shard_rows: int = DEFAULT_SHARD_ROWS
    dataset: str | None = None  # None: the dataset the checkpoint records (geomprobe checkpoints)
    resize: bool = False  # bring the dataset's images to the model's size and channels
    projection: str = "countsketch"  # with ``project``: countsketch | gaussian
    t: InitVar[str | None] = None  # older spelling of ``t_range``, accepted by the constructor

    def __post_init__(self, t: str | None) -> None:
        if t is not None:
            self.t_range = t

    def validate(self) -> None:
        if self.samples <= 0:
            raise UsageError(f"--samples must be positive, got {self.samples}")
        if self.target not in TARGETS:
            raise UsageError(f"--target must be empirical or true, got {self.target!r}")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be float32 or float16, got {self.dtype!r}")
        if self.split not in ("train", "test"):
            raise UsageError(f"--split must be train or test, got {self.split!r}")
        if self.projection not in PROJECTIONS:
            raise UsageError(f"unknown --projection {self.projection!r}; expected one of {', '.join(PROJECTIONS)}")
        if self.project is not None and self.project <= 0:
            raise UsageError(f"--project K must be positive, got {self.project}")
        if self.shard_rows <= 0:
            raise UsageError(f"shard rows must be positive, got {self.shard_rows}")

    def comparable(self, checksum: str) -> dict[str, Any]:
        """The identity of the store: the config with the checkpoint's checksum instead of its path."""
        d = asdict(self)
        d.pop("ckpt")
        d.pop("data_root")
        for name, default in (("dataset", None), ("resize", False)):  # stores written before these options match
            if d[name] == default:
                d.pop(name)
        if d["project"] is None:
            d.pop("projection")
        d["checkpoint_checksum"] = checksum
        return d


def stored_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """A store manifest's identity in today's spelling.

    Stores written before 0.2 say ``t`` for ``t_range`` and had only the Gaussian projection.
    """
    identity = dict(manifest.get("identity") or {})
    if "t" in identity:
        identity["t_range"] = identity.pop("t")
    if identity.get("project") is not None:
        identity.setdefault("projection", "gaussian")
    return identity


@dataclass
class KeySummary:
    """One row of the summary table: key, t (int or band), rows written by this process, P, bytes, seconds."""

    key: str
    t: int | str
    n: int
    P: int
    bytes: int = 0
    seconds: float = 0.0
    skipped_shards: int = 0


@dataclass
class ExtractResult:
    """What one extraction run wrote: n rows per key, row length P (K if projected), num_params values, ranks."""

    out: Path
    n: int
    P: int
    num_params: int
    rank: int
    world_size: int
    keys: list[KeySummary] = field(default_factory=list)
    shards_written: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0


# --------------------------------------------------------------------------- rows


def select_samples(labels: torch.Tensor, num_classes: int, classes: str | None, samples: int, seed: int) -> np.ndarray:
    """Dataset row indices (samples,) int64: a seeded permutation of the eligible rows, cut to ``samples``."""
    class_list = parse_classes(classes, num_classes)
    idx = np.arange(len(labels))
    if class_list is not None:
        idx = idx[np.isin(labels.numpy(), class_list)]
    if samples > len(idx):
        what = f"classes {classes}" if class_list is not None else "the split"
        raise UsageError(f"--samples {samples} is more than the {len(idx)} images of {what}")
    perm = numpy_generator(seed, 0x5A3).permutation(len(idx))
    return idx[np.sort(perm[:samples])]


def _key_code(spec: TimestepSpec, key: str) -> int:
    return int(key[1:]) if not spec.is_band else 100_000 + sum(map(ord, key))


def row_inputs(
    spec: TimestepSpec, key: str, rows: range, sample_shape: tuple[int, ...], seed: int, with_xi: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(t (n,) int64, noise (n, C, H, W), xi or None) for ``rows`` at ``key``.

    Each row comes from its own generator seeded by ``derived_seed(seed, key code, row)``.
    """
    code = _key_code(spec, key)
    ts, noises, xis = [], [], []
    band = torch.as_tensor(spec.timesteps)
    for r in rows:
        g = torch_generator(derived_seed(seed, code, r))
        if spec.is_band:
            ts.append(band[torch.randint(len(band), (1,), generator=g)].item())
        else:
            ts.append(int(key[1:]))
        noises.append(torch.randn(sample_shape, generator=g))
        if with_xi:
            xis.append(torch.randn(sample_shape, generator=g))
    return (
        torch.tensor(ts, dtype=torch.long),
        torch.stack(noises),
        torch.stack(xis) if with_xi else None,
    )


def keyed_batch(
    spec: TimestepSpec,
    key: str,
    rows: range,
    x0: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    unet: torch.nn.Module | None = None,
    alphas_cumprod: torch.Tensor | None = None,
    with_xi: bool = False,
) -> tuple[ProbeBatch, torch.Tensor | None]:
    """(the :class:`ProbeBatch` of store rows ``rows`` at ``key``, xi or None) for their x0, y (n, ...).

    With ``with_xi`` the target is the "true Fisher" eps_theta(x_t).detach() + xi (needs ``unet`` and
    ``alphas_cumprod``); else None (the empirical Fisher).
    """
    t, noise, xi = row_inputs(spec, key, rows, tuple(x0.shape[1:]), seed, with_xi)
    target = true_fisher_target(unet, x0, noise, t, y, alphas_cumprod, xi) if xi is not None else None
    return ProbeBatch(x0, noise, t, y, target), xi


def probe_batches(
    dataset,
    sample_rows: np.ndarray,
    spec: TimestepSpec,
    key: str,
    seed: int,
    batch_size: int = 256,
    unet: torch.nn.Module | None = None,
    alphas_cumprod: torch.Tensor | None = None,
    target: str = "empirical",
):
    """Yield the :class:`ProbeBatch` es of the rows a store holds at ``key`` (same x0, noise, t, xi).

    ``sample_rows``: dataset row indices (n,) (e.g. :func:`select_samples`, or a store's
    ``sample_index(t)``); row r of the store is ``sample_rows[r]``. With ``target='true'`` the
    target eps_theta(x_t).detach() + xi is built with ``unet`` and ``alphas_cumprod``. Feeding these
    batches to :func:`mean_gradient` gives the store's mean row without forming G.
    """
    if target not in TARGETS:
        raise UsageError(f"target must be empirical or true, got {target!r}")
    if target == "true" and (unet is None or alphas_cumprod is None):
        raise UsageError("target='true' needs the model and alphas_cumprod to build eps_theta(x_t) + xi")
    for a in range(0, len(sample_rows), batch_size):
        b = min(len(sample_rows), a + batch_size)
        x0, y = dataset.batch(sample_rows[a:b])
        yield keyed_batch(spec, key, range(a, b), x0, y, seed, unet, alphas_cumprod, target == "true")[0]


# --------------------------------------------------------------------------- driver


def extract_gradients(
    config: ExtractConfig,
    out: str | Path,
    overwrite: bool = False,
    device: str = "auto",
    max_memory: int | str | None = None,
    progress: Callable[..., None] | None = None,
    command: list[str] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> ExtractResult:
    """Compute per-sample gradients for ``config`` and write (or resume) the store at ``out``.

    ``max_memory``: bytes for one chunk of per-sample gradients, or text such as ``"2G"``
    (:func:`geomprobe.io.parse_memory`; None: :data:`geomprobe.io.DEFAULT_MAX_MEMORY`).
    ``progress(done, total, **fields)`` is called after every computed block with this process's row
    counts over all keys (``total`` = its rows x keys). Under torchrun every rank calls this; the
    store is complete when all ranks return. ``on_note(text)`` receives one-line remarks about the
    model (e.g. the default scheduler was used) once it is loaded. Returns an :class:`ExtractResult`
    for the summary table.
    """
    t_start = time.perf_counter()
    plan = plan_probe(config, Path(out), device, max_memory)
    for note in plan.notes if on_note else []:  # after every input check: a refused input gives one line
        on_note(note)
    result = ExtractResult(
        out=plan.out, n=plan.n, P=plan.P, num_params=plan.layout.P, rank=plan.rank, world_size=plan.world
    )
    summaries = {k: KeySummary(k, plan.key_info[k]["t"], 0, plan.P) for k in plan.keys}
    with directory_lock(plan.out, plan.rank == 0, on_note, plan.world):
        manifest = _new_manifest(plan, command)
        old_sums = _open_store(plan, manifest, overwrite)
        on_every_rank(
            plan.world,
            lambda: _extract_shards(plan, _file_attrs(plan, manifest), old_sums, result, summaries, progress),
            "another torchrun rank failed; rerun the same command to resume",
        )
        if plan.rank == 0:
            _finish_manifest(plan, manifest)
        barrier(plan.world)
    result.keys = list(summaries.values())
    result.seconds = time.perf_counter() - t_start
    return result


@dataclass
class _Plan:
    """What one extraction run works from: the model, the probed rows, the keys, the row layout and the chunking.

    Everything here is computed before the first shard is written.
    """

    config: ExtractConfig
    out: Path
    device: torch.device
    rank: int
    world: int
    unet: torch.nn.Module
    info: ModelInfo
    checksum: str
    alphas_cumprod: torch.Tensor
    spec: TimestepSpec
    keys: list[str]
    key_info: dict[str, dict[str, Any]]
    dataset: Any
    sample_rows: np.ndarray
    names: list[str]
    layout: ParamLayout
    projector: CountSketch | RandomProjection | None
    chunk: int
    shard_ranges: list[tuple[int, int]]
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.sample_rows)

    @property
    def P(self) -> int:
        """Stored row length: K with a projection, else the number of selected parameters."""
        return self.projector.K if self.projector else self.layout.P

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.dataset.channels, self.dataset.image_size, self.dataset.image_size)

    @property
    def with_xi(self) -> bool:
        return self.config.target == "true"

    @property
    def my_shards(self) -> list[int]:
        """The shards this rank writes (``j % world_size == rank``)."""
        return [j for j in range(len(self.shard_ranges)) if j % self.world == self.rank]


def plan_probe(config: ExtractConfig, out: Path, device: str, max_memory: int | str | None) -> _Plan:
    """Validate, start torchrun's process group, load model and data, choose rows, keys and chunks."""
    config.validate()
    dev = resolve_device(device)
    rank, world = dist_info()
    init_dist(world, dev)
    budget = parse_memory(max_memory)
    ckpt = load_model(config.ckpt, dev)
    unet, info = ckpt.unet, ckpt.info
    unet.requires_grad_(True)
    alphas_cumprod = ckpt.scheduler.alphas_cumprod.float()
    # SNR bands come from this model's own schedule (e.g. squaredcos_cap_v2), not the linear default
    spec = parse_timesteps(
        config.t_range, num_train_timesteps=len(alphas_cumprod), alphas_cumprod=alphas_cumprod.double().numpy()
    )
    keys = [key_for(spec.band)] if spec.is_band else [key_for(t) for t in spec.timesteps]
    dataset = model_dataset(config, info)
    sample_rows = select_samples(dataset.labels, dataset.num_classes, config.classes, config.samples, config.seed)
    _check_labels(dataset, sample_rows, info)
    names = select_parameters(unet, config.params)
    layout = param_layout(unet, names)
    projector = make_projection(config.projection, layout.P, config.project, config.seed) if config.project else None
    chunk, chunk_note = reproducible_chunk(
        unet, layout.P, (dataset.channels, dataset.image_size, dataset.image_size), budget
    )
    if projector:  # the projection holds (chunk, P) and (K, block) at once; keep the chunk in budget too
        chunk = max(1, min(chunk, budget // max(1, 8 * layout.P)))
    n = len(sample_rows)
    return _Plan(
        config=config,
        out=out,
        device=dev,
        rank=rank,
        world=world,
        unet=unet,
        info=info,
        checksum=checkpoint_checksum(config.ckpt),
        alphas_cumprod=alphas_cumprod,
        spec=spec,
        keys=keys,
        key_info=_key_info(spec, keys, alphas_cumprod.double().numpy()),
        dataset=dataset,
        sample_rows=sample_rows,
        names=names,
        layout=layout,
        projector=projector,
        chunk=chunk,
        shard_ranges=[(a, min(n, a + config.shard_rows)) for a in range(0, n, config.shard_rows)],
        notes=ckpt.notes + ([chunk_note] if chunk_note else []),
    )


def model_dataset(config: ExtractConfig, info: ModelInfo):
    """``--dataset`` (else the checkpoint's), checked against the model's size and channels.

    With ``--resize`` the images are brought to them (:func:`geomprobe.data.fit_to_model`).
    """
    name = config.dataset or info.dataset
    if not name:
        raise UsageError(f"{config.ckpt} does not record its dataset: pass --dataset (and --data-root for files)")
    size = None
    if name == "digits":  # generated at the model's size when it can be, else at its native 8 px
        size = info.image_size if info.image_size in DIGITS_IMAGE_SIZES else DIGITS_IMAGE_SIZES[0]
    dataset = load_dataset(name, config.split, image_size=size, data_root=config.data_root)
    return fit_to_model(dataset, info.image_size, info.channels, config.resize)


def _check_labels(dataset, sample_rows: np.ndarray, info: ModelInfo) -> None:
    """A class-conditional model must embed every probed label (an unconditional one never sees them)."""
    if info.num_classes is None or len(sample_rows) == 0:
        return
    top = int(dataset.labels[torch.as_tensor(sample_rows)].max())
    if top >= info.num_classes:
        raise DataError(
            f"dataset {dataset.name} has label {top} but the model embeds {info.num_classes} classes; "
            "restrict --classes to 0.." + str(info.num_classes - 1)
        )


def _key_info(spec: TimestepSpec, keys: list[str], alpha_np: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per key: its t (or band name and t range) and alpha_bar and SNR (means over a band)."""
    snr_np = snr(alpha_np)
    info: dict[str, dict[str, Any]] = {}
    for k in keys:
        if spec.is_band:
            ts = np.asarray(spec.timesteps)
            info[k] = {
                "t": k,
                "band": spec.band,
                "t_min": int(ts.min()),
                "t_max": int(ts.max()),
                "alpha_bar": float(alpha_np[ts].mean()),
                "snr": float(snr_np[ts].mean()),
            }
        else:
            tt = int(k[1:])
            info[k] = {"t": tt, "band": None, "alpha_bar": float(alpha_np[tt]), "snr": float(snr_np[tt])}
    return info


def _new_manifest(plan: _Plan, command: list[str] | None) -> dict[str, Any]:
    """The manifest of a store in progress (``complete: False``, shards without checksums)."""
    config, info, layout = plan.config, plan.info, plan.layout
    return {
        "kind": STORE_KIND,
        "format_version": FORMAT_VERSION,
        "tool": "geomprobe",
        "version": _version(),
        "command": command if command is not None else list(sys.argv),
        "seed": config.seed,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config),
        "identity": config.comparable(plan.checksum),
        "checkpoint": {"path": str(Path(config.ckpt).resolve()), "checksum": plan.checksum},
        "dataset": {
            "name": plan.dataset.name,
            "split": config.split,
            "image_size": info.image_size,
            "channels": info.channels,
            **({"resized_from": list(plan.dataset.source_shape)} if isinstance(plan.dataset, ResizedDataset) else {}),
        },
        "t_range": plan.spec.text,
        "keys": plan.keys,
        "key_info": plan.key_info,
        "n": plan.n,
        "P": plan.P,
        "params": {
            "names": list(layout.names),
            "shapes": [list(s) for s in layout.shapes],
            "slices": [list(s) for s in layout.slices],
        },
        "projection": plan.projector.describe() if plan.projector else None,
        "shard_rows": config.shard_rows,
        "shards": [{"file": shard_name(j), "rows": [a, b]} for j, (a, b) in enumerate(plan.shard_ranges)],
        "complete": False,
    }


def _open_store(plan: _Plan, manifest: dict[str, Any], overwrite: bool) -> dict[str, str | None]:
    """Prepare ``out`` (every rank checks; rank 0 clears and writes the manifest).

    Returns the old shards' checksums {file: sha256} when resuming, else {}.
    """
    old = on_every_rank(
        plan.world,
        lambda: _prepare_out(plan.out, manifest["identity"], overwrite, plan.rank),
        f"another rank could not prepare {plan.out}",
    )
    if plan.rank == 0:
        if old is not None:
            manifest["created"] = old.get("created", manifest["created"])
        write_manifest(plan.out, manifest)
    barrier(plan.world)
    return {s["file"]: s.get("sha256") for s in old.get("shards", [])} if old else {}


def _file_attrs(plan: _Plan, manifest: dict[str, Any]) -> dict[str, Any]:
    """The HDF5 attributes every shard file carries."""
    layout = plan.layout
    return {
        "target": plan.config.target,
        "param_names": np.array(layout.names, dtype=h5py_str()),
        "param_shapes": json.dumps([list(s) for s in layout.shapes]),
        "param_slices": json.dumps([list(s) for s in layout.slices]),
        "projection": json.dumps(plan.projector.describe() if plan.projector else "none"),
        "checkpoint": json.dumps(manifest["checkpoint"]),
        "dtype": plan.config.dtype,
        "P": plan.P,
    }


@dataclass
class _Progress:
    """This process's row count over all keys, reported to the caller's ``progress`` callback."""

    callback: Callable[..., None] | None
    total: int
    done: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def skipped(self, rows: int) -> None:
        self.done += rows
        if self.callback:
            self.callback(self.done, self.total)

    def computed(self, rows: int, key: str) -> None:
        self.done += rows
        if self.callback:
            el = time.perf_counter() - self.t0
            self.callback(self.done, self.total, samples_per_s=self.done / el if el > 0 else 0.0, key=key)


class _RowBuffer:
    """(rows, P) views of one float32 buffer reused by every chunk.

    No fresh (chunk, P) allocation and its page faults per chunk; each chunk is written out before
    the next one is computed.
    """

    def __init__(self, chunk: int, P: int, device: torch.device):
        self.chunk, self.P, self.device = chunk, P, device
        self.buffer = torch.empty(0)

    def __call__(self, rows: int) -> torch.Tensor:
        if self.buffer.shape[0] < rows:
            self.buffer = torch.empty(self.chunk, self.P, dtype=torch.float32, device=self.device)
        return self.buffer[:rows]


def _extract_shards(
    plan: _Plan,
    file_attrs: dict[str, Any],
    old_sums: dict[str, str | None],
    result: ExtractResult,
    summaries: dict[str, KeySummary],
    progress: Callable[..., None] | None,
) -> None:
    """Write this rank's shards; complete ones (checked against their checksums) are skipped."""
    tracker = _Progress(
        progress, sum(b - a for a, b in (plan.shard_ranges[j] for j in plan.my_shards)) * len(plan.keys)
    )
    rows = _RowBuffer(plan.chunk, plan.layout.P, plan.device)
    for j in plan.my_shards:
        a, b = plan.shard_ranges[j]
        final = plan.out / shard_name(j)
        if final.exists():
            try:
                check_shard(
                    final,
                    {"row_start": a, "row_stop": b, "keys": plan.keys, "P": plan.P, "shard": j},
                    sha256=old_sums.get(final.name),
                )
            except DataError as exc:
                raise DataError(f"{exc}; delete it to recompute it, or pass --overwrite to start afresh") from None
            result.shards_skipped += 1
            for s in summaries.values():
                s.skipped_shards += 1
            tracker.skipped((b - a) * len(plan.keys))
            continue
        _write_shard(plan, j, {**file_attrs, "row_start": a, "row_stop": b, "shard": j}, summaries, tracker, rows)
        result.shards_written += 1


def _write_shard(
    plan: _Plan, j: int, attrs: dict[str, Any], summaries: dict[str, KeySummary], tracker: _Progress, rows: _RowBuffer
) -> None:
    """Compute and write shard ``j``: every key, chunk by chunk."""
    a, b = plan.shard_ranges[j]
    x0_all, y_all = plan.dataset.batch(plan.sample_rows[a:b])
    with ShardWriter(plan.out / shard_name(j), attrs) as writer:
        for k in plan.keys:
            tk = time.perf_counter()
            info = plan.key_info[k]
            writer.create_key(
                k,
                b - a,
                plan.P,
                plan.config.dtype,
                info | {"key": k, "band": info["band"] or ""},
                plan.sample_shape,
                plan.with_xi,
            )
            for c0 in range(a, b, plan.chunk):
                c1 = min(b, c0 + plan.chunk)
                _write_chunk(plan, writer, k, a, range(c0, c1), x0_all[c0 - a : c1 - a], y_all[c0 - a : c1 - a], rows)
                tracker.computed(c1 - c0, k)
            summaries[k].n += b - a
            summaries[k].seconds += time.perf_counter() - tk
        for k in plan.keys:
            summaries[k].bytes += (b - a) * plan.P * np.dtype(plan.config.dtype).itemsize


def _write_chunk(
    plan: _Plan,
    writer: ShardWriter,
    key: str,
    shard_start: int,
    chunk: range,
    x0: torch.Tensor,
    y: torch.Tensor,
    rows: _RowBuffer,
) -> None:
    """Per-sample gradients (projected if asked) and inputs of store rows ``chunk`` at ``key``."""
    batch, xi = keyed_batch(
        plan.spec, key, chunk, x0, y, plan.config.seed, plan.unet, plan.alphas_cumprod, plan.with_xi
    )
    G, losses = per_sample_grads(
        plan.unet,
        plan.names,
        batch.x0,
        batch.noise,
        batch.t,
        batch.y,
        plan.alphas_cumprod,
        target=batch.target,
        chunk_size=plan.chunk,
        return_losses=True,
        out=rows(len(chunk)),
    )
    if plan.projector:
        G = plan.projector.project(G)
    t = batch.t.numpy()
    writer.write_rows(
        key,
        chunk.start - shard_start,
        chunk.stop - shard_start,
        G.cpu().numpy().astype(plan.config.dtype, copy=False),
        labels=y.numpy(),
        sample_index=plan.sample_rows[chunk.start : chunk.stop].astype(np.int64),
        loss=losses.cpu().numpy(),
        t=t,
        alpha_bar=plan.alphas_cumprod.double().numpy()[t],
        x0=x0.numpy(),
        noise=batch.noise.numpy(),
        xi=None if xi is None else xi.numpy(),
    )


def _finish_manifest(plan: _Plan, manifest: dict[str, Any]) -> None:
    """Rank 0, after every rank wrote its shards: checksums and sizes, ``complete: True``."""
    for s in manifest["shards"]:
        path = plan.out / s["file"]
        s["sha256"] = file_sha256(path)
        s["bytes"] = path.stat().st_size
    manifest["complete"] = True
    manifest["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest["world_size"] = plan.world
    write_manifest(plan.out, manifest)


def h5py_str():
    """h5py's variable-length string dtype (h5py imported only when needed)."""
    import h5py

    return h5py.string_dtype()


def _version() -> str:
    from geomprobe import __version__

    return __version__


def _prepare_out(out: Path, identity: dict[str, Any], overwrite: bool, rank: int) -> dict[str, Any] | None:
    """Check ``out`` for reuse; returns the old manifest when resuming the same config, else None.

    With ``overwrite`` the old shards and manifest are removed (by rank 0). A directory with other
    files but no manifest is refused, so a typo cannot delete someone's data.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    try:
        manifest = read_manifest(out) if out.is_dir() else None
    except DataError:
        if not overwrite:
            raise
        manifest = None  # edited or corrupt: with --overwrite the store's own files are replaced below
    if manifest is None:
        stray = [p.name for p in out.iterdir() if p.name != LOCK_NAME] if out.is_dir() else []
        foreign = [s for s in stray if not s.startswith("shard-") and not s.startswith(MANIFEST)]
        if foreign:
            raise UsageError(
                f"--out {out} is not empty and not a gradient store (it holds {foreign[0]}); choose another directory"
            )
        if stray and not overwrite:
            raise UsageError(f"--out {out} holds shards but no manifest; pass --overwrite to start it afresh")
        if stray and rank == 0:
            _clear(out)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        return None
    if stored_identity(manifest) == identity:
        if overwrite and rank == 0:
            _clear(out)
            return None
        return None if overwrite else manifest
    if not overwrite:
        old = stored_identity(manifest)
        diff = sorted(k for k in set(identity) | set(old) if identity.get(k) != old.get(k))
        raise UsageError(
            f"{out} holds a gradient store made by a different command (differs in: {', '.join(diff)}); "
            "pass --overwrite to replace it or choose another --out"
        )
    if rank == 0:
        _clear(out)
    return None


def _clear(out: Path) -> None:
    """Remove a store's own files (manifest and shards, finished or not); nothing else."""
    for p in out.iterdir():
        if p.is_file() and (p.name.startswith(MANIFEST) or p.name.startswith("shard-")):
            p.unlink()

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
    ones; a different config on an existing store is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from geomprobe.data import load_dataset, parse_classes
from geomprobe.errors import DataError, UsageError
from geomprobe.models import checkpoint_checksum, load_checkpoint, resolve_device
from geomprobe.io import parse_memory
from geomprobe.probe.grads import per_sample_grads
from geomprobe.probe.memory import chunk_size_for
from geomprobe.probe.params import param_layout, select_parameters
from geomprobe.probe.products import ProbeBatch, true_fisher_target
from geomprobe.probe.projection import RandomProjection
from geomprobe.probe.store import (
    MANIFEST,
    STORE_KIND,
    FORMAT_VERSION,
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
    t: str
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

    def validate(self) -> None:
        if self.samples <= 0:
            raise UsageError(f"--samples must be positive, got {self.samples}")
        if self.target not in TARGETS:
            raise UsageError(f"--target must be empirical or true, got {self.target!r}")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be float32 or float16, got {self.dtype!r}")
        if self.split not in ("train", "test"):
            raise UsageError(f"--split must be train or test, got {self.split!r}")
        if self.project is not None and self.project <= 0:
            raise UsageError(f"--project K must be positive, got {self.project}")
        if self.shard_rows <= 0:
            raise UsageError(f"shard rows must be positive, got {self.shard_rows}")

    def comparable(self, checksum: str) -> dict[str, Any]:
        """The identity of the store: the config with the checkpoint's checksum instead of its path."""
        d = asdict(self)
        d.pop("ckpt")
        d.pop("data_root")
        d["checkpoint_checksum"] = checksum
        return d


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


# --------------------------------------------------------------------------- distributed


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _init_dist(world: int, device: torch.device) -> bool:
    """Initialise the process group under torchrun (gloo on CPU, NCCL on CUDA); True if we did."""
    if world <= 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return True


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _all_ok(world: int, ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank (so one rank's error stops all without a hang)."""
    if world <= 1:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    return int(flag.item()) == 0


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
    perm = np.random.default_rng(np.random.SeedSequence([seed, 0x5A3])).permutation(len(idx))
    return idx[np.sort(perm[:samples])]


def _key_code(spec: TimestepSpec, key: str) -> int:
    return int(key[1:]) if not spec.is_band else 100_000 + sum(map(ord, key))


def row_inputs(
    spec: TimestepSpec, key: str, rows: range, sample_shape: tuple[int, ...], seed: int, with_xi: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(t (n,) int64, noise (n, C, H, W), xi or None) for ``rows`` at ``key``; each row from its own
    generator seeded by (seed, key, row)."""
    code = _key_code(spec, key)
    ts, noises, xis = [], [], []
    band = torch.as_tensor(spec.timesteps)
    for r in rows:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, code, r]).generate_state(1, np.uint64)[0] >> 1))
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
    shape = (dataset.channels, dataset.image_size, dataset.image_size)
    for a in range(0, len(sample_rows), batch_size):
        b = min(len(sample_rows), a + batch_size)
        x0, y = dataset.batch(sample_rows[a:b])
        t, noise, xi = row_inputs(spec, key, range(a, b), shape, seed, target == "true")
        tgt = true_fisher_target(unet, x0, noise, t, y, alphas_cumprod, xi) if xi is not None else None
        yield ProbeBatch(x0, noise, t, y, tgt)


# --------------------------------------------------------------------------- driver


def extract_gradients(
    config: ExtractConfig,
    out: str | Path,
    overwrite: bool = False,
    device: str = "auto",
    max_memory: int | str | None = None,
    progress: Callable[..., None] | None = None,
    command: list[str] | None = None,
) -> ExtractResult:
    """Compute per-sample gradients for ``config`` and write (or resume) the store at ``out``.

    ``progress(done, total, **fields)`` is called after every computed block with this process's row
    counts over all keys (``total`` = its rows x keys). Under torchrun every rank calls this; the
    store is complete when all ranks return. Returns an :class:`ExtractResult` for the summary table.
    """
    t_start = time.perf_counter()
    config.validate()
    dev = resolve_device(device)
    rank, world = dist_info()
    _init_dist(world, dev)
    out = Path(out)
    budget = parse_memory(max_memory)

    ckpt = _quiet_load(config.ckpt, dev)
    checksum = checkpoint_checksum(config.ckpt)
    unet, info = ckpt.unet, ckpt.info
    unet.requires_grad_(True)
    alphas_cumprod = ckpt.scheduler.alphas_cumprod.float()
    N = len(alphas_cumprod)
    spec = parse_timesteps(config.t, num_train_timesteps=N, alphas_cumprod=alphas_cumprod.double().numpy())
    keys = [key_for(spec.band)] if spec.is_band else [key_for(t) for t in spec.timesteps]

    dataset = load_dataset(info.dataset, config.split, image_size=info.image_size, data_root=config.data_root)
    if dataset.channels != info.channels:
        raise DataError(f"dataset {info.dataset} has {dataset.channels} channels, the checkpoint expects {info.channels}")
    sample_rows = select_samples(dataset.labels, dataset.num_classes, config.classes, config.samples, config.seed)
    sample_shape = (dataset.channels, dataset.image_size, dataset.image_size)

    names = select_parameters(unet, config.params)
    layout = param_layout(unet, names)
    projector = RandomProjection(layout.P, config.project, config.seed) if config.project else None
    P = projector.K if projector else layout.P
    chunk = chunk_size_for(unet, layout.P, sample_shape, budget)
    if projector:  # the projection holds (chunk, P) and (K, block) at once; keep the chunk in budget too
        chunk = max(1, min(chunk, budget // max(1, 8 * layout.P)))
    buffer = torch.empty(0)

    def row_buffer(rows: int) -> torch.Tensor:
        """A (rows, P) view of one buffer reused by every chunk (no fresh (chunk, P) allocation and
        its page faults per chunk; each chunk is written out before the next one is computed)."""
        nonlocal buffer
        if buffer.shape[0] < rows:
            buffer = torch.empty(chunk, layout.P, dtype=torch.float32, device=dev)
        return buffer[:rows]

    identity = config.comparable(checksum)
    n = len(sample_rows)
    shard_ranges = [(a, min(n, a + config.shard_rows)) for a in range(0, n, config.shard_rows)]
    alpha_np = alphas_cumprod.double().numpy()
    snr_np = snr(alpha_np)
    key_info: dict[str, dict[str, Any]] = {}
    for k in keys:
        if spec.is_band:
            ts = np.asarray(spec.timesteps)
            key_info[k] = {
                "t": k, "band": spec.band, "t_min": int(ts.min()), "t_max": int(ts.max()),
                "alpha_bar": float(alpha_np[ts].mean()), "snr": float(snr_np[ts].mean()),
            }
        else:
            tt = int(k[1:])
            key_info[k] = {"t": tt, "band": None, "alpha_bar": float(alpha_np[tt]), "snr": float(snr_np[tt])}

    manifest: dict[str, Any] = {
        "kind": STORE_KIND,
        "format_version": FORMAT_VERSION,
        "tool": "geomprobe",
        "version": _version(),
        "command": command if command is not None else list(sys.argv),
        "seed": config.seed,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config),
        "identity": identity,
        "checkpoint": {"path": str(Path(config.ckpt).resolve()), "checksum": checksum},
        "dataset": {"name": info.dataset, "split": config.split, "image_size": info.image_size, "channels": info.channels},
        "t_spec": spec.text,
        "keys": keys,
        "key_info": key_info,
        "n": n,
        "P": P,
        "params": {"names": list(layout.names), "shapes": [list(s) for s in layout.shapes], "slices": [list(s) for s in layout.slices]},
        "projection": projector.describe() if projector else None,
        "shard_rows": config.shard_rows,
        "shards": [{"file": shard_name(j), "rows": [a, b]} for j, (a, b) in enumerate(shard_ranges)],
        "complete": False,
    }

    # ---- prepare the directory (every rank checks; only rank 0 changes anything)
    error: Exception | None = None
    old: dict[str, Any] | None = None
    try:
        old = _prepare_out(out, identity, overwrite, rank)
    except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
        error = exc
    if not _all_ok(world, error is None):
        raise error if error is not None else DataError(f"another rank could not prepare {out}")
    if rank == 0:
        if old is not None:
            manifest["created"] = old.get("created", manifest["created"])
        write_manifest(out, manifest)
    _barrier(world)
    old_sums = {s["file"]: s.get("sha256") for s in (old or {}).get("shards", [])} if old else {}

    file_attrs = {
        "target": config.target,
        "param_names": np.array(layout.names, dtype=h5py_str()),
        "param_shapes": json.dumps([list(s) for s in layout.shapes]),
        "param_slices": json.dumps([list(s) for s in layout.slices]),
        "projection": json.dumps(projector.describe() if projector else "none"),
        "checkpoint": json.dumps(manifest["checkpoint"]),
        "dtype": config.dtype,
        "P": P,
    }

    mine = [j for j in range(len(shard_ranges)) if j % world == rank]
    summaries = {k: KeySummary(k, key_info[k]["t"], 0, P) for k in keys}
    result = ExtractResult(out=out, n=n, P=P, num_params=layout.P, rank=rank, world_size=world)
    total = sum(shard_ranges[j][1] - shard_ranges[j][0] for j in mine) * len(keys)
    done = 0
    t0 = time.perf_counter()
    error = None
    try:
        for j in mine:
            a, b = shard_ranges[j]
            final = out / shard_name(j)
            if final.exists():
                try:
                    check_shard(final, {"row_start": a, "row_stop": b, "keys": keys, "P": P}, sha256=old_sums.get(final.name))
                except DataError as exc:
                    raise DataError(f"{exc}; delete it to recompute it, or pass --overwrite to start afresh") from None
                result.shards_skipped += 1
                for s in summaries.values():
                    s.skipped_shards += 1
                done += (b - a) * len(keys)
                if progress:
                    progress(done, total)
                continue
            x0_all, y_all = dataset.batch(sample_rows[a:b])
            with ShardWriter(final, {**file_attrs, "row_start": a, "row_stop": b, "shard": j}) as writer:
                for k in keys:
                    tk = time.perf_counter()
                    writer.create_key(k, b - a, P, config.dtype, key_info[k] | {"key": k, "band": key_info[k]["band"] or ""}, sample_shape, config.target == "true")
                    for c0 in range(a, b, chunk):
                        c1 = min(b, c0 + chunk)
                        x0, y = x0_all[c0 - a : c1 - a], y_all[c0 - a : c1 - a]
                        t, noise, xi = row_inputs(spec, k, range(c0, c1), sample_shape, config.seed, config.target == "true")
                        target = true_fisher_target(unet, x0, noise, t, y, alphas_cumprod, xi) if xi is not None else None
                        G, losses = per_sample_grads(unet, names, x0, noise, t, y, alphas_cumprod, target=target, chunk_size=chunk,
                                                     return_losses=True, out=row_buffer(c1 - c0))
                        if projector:
                            G = projector.project(G)
                        writer.write_rows(
                            k, c0 - a, c1 - a, G.cpu().numpy().astype(config.dtype, copy=False),
                            labels=y.numpy(), sample_index=sample_rows[c0:c1].astype(np.int64), loss=losses.cpu().numpy(),
                            t=t.numpy(), alpha_bar=alpha_np[t.numpy()], x0=x0.numpy(), noise=noise.numpy(),
                            xi=None if xi is None else xi.numpy(),
                        )
                        done += c1 - c0
                        if progress:
                            el = time.perf_counter() - t0
                            progress(done, total, samples_per_s=done / el if el > 0 else 0.0, key=k)
                    summaries[k].n += b - a
                    summaries[k].seconds += time.perf_counter() - tk
                for k in keys:
                    summaries[k].bytes += (b - a) * P * np.dtype(config.dtype).itemsize
            result.shards_written += 1
    except Exception as exc:  # noqa: BLE001 - re-raised after telling the other ranks
        error = exc
    if not _all_ok(world, error is None):
        if error is not None:
            raise error
        raise DataError("another torchrun rank failed; rerun the same command to resume")

    if rank == 0:
        for s, (a, b) in zip(manifest["shards"], shard_ranges):
            path = out / s["file"]
            s["sha256"] = file_sha256(path)
            s["bytes"] = path.stat().st_size
        manifest["complete"] = True
        manifest["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest["world_size"] = world
        write_manifest(out, manifest)
    _barrier(world)
    result.keys = list(summaries.values())
    result.seconds = time.perf_counter() - t_start
    return result


def _quiet_load(path: str, device: torch.device):
    """load_checkpoint without diffusers' multi-line advice about ``accelerate`` on stderr."""
    from diffusers.utils import logging as diffusers_logging

    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return load_checkpoint(path, device=device)
    finally:
        diffusers_logging.set_verbosity(previous)


def h5py_str():
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
    manifest = read_manifest(out) if out.is_dir() else None
    if manifest is None:
        stray = [p.name for p in out.iterdir()] if out.is_dir() else []
        foreign = [s for s in stray if not s.startswith("shard-") and not s.startswith(MANIFEST)]
        if foreign:
            raise UsageError(f"--out {out} is not empty and not a gradient store (it holds {foreign[0]}); choose another directory")
        if stray and not overwrite:
            raise UsageError(f"--out {out} holds shards but no manifest; pass --overwrite to start it afresh")
        if stray and rank == 0:
            _clear(out)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        return None
    if manifest.get("identity") == identity:
        if overwrite and rank == 0:
            _clear(out)
            return None
        return None if overwrite else manifest
    if not overwrite:
        diff = sorted(k for k in set(identity) | set(manifest.get("identity", {})) if identity.get(k) != manifest.get("identity", {}).get(k))
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

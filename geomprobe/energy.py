"""Per-sample energy of a diffusion model: seed 004's proxy for the modern Hopfield energy of an image.

The energy of image x0 (label y) under a model is its DDPM denoising loss (``per_sample_loss``,
1/2 ||eps - eps_theta(x_t, t, y)||^2 summed over pixels) averaged over a fixed set of timesteps and
noise draws::

    per_t[i, j] = 1/R sum_r loss(x0_i, eps_{i,j,r}, t_j, y_i)        energy[i] = 1/T sum_j per_t[i, j]

Default set: t = 50, 150, ..., 950 (T = 10, every tenth of a 1000-step schedule) and R = 4 draws.
The noise of sample i is drawn from one generator seeded ``derived_seed(seed, 0xE4E, i)`` (i: the
sample's dataset row index) as a (T, R, C, H, W) tensor, so a sample's energy does not depend on
how the samples were batched, nor on which other samples were scored.

Also here: Spearman correlation with a seeded percentile bootstrap interval, and the HDF5 file of
``geomprobe energy`` (docs/design.md §9, "energy.h5").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from geomprobe.diffusion import per_sample_loss
from geomprobe.errors import DataError, UsageError
from geomprobe.io import atomic_path, derived_seed, numpy_generator, torch_generator

DEFAULT_ENERGY_T: tuple[int, ...] = tuple(range(50, 1000, 100))
"""The timesteps of the energy: 50, 150, ..., 950."""
DEFAULT_ENERGY_DRAWS = 4
"""Noise draws per (sample, timestep)."""
ENERGY_STREAM = 0xE4E
"""Key of the energy's noise stream in ``derived_seed(seed, ENERGY_STREAM, sample_index)``."""


def energy_noise(sample_index: int, num_t: int, draws: int, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """The noise of one sample: (num_t, draws, *shape) float32, from its own seeded CPU generator."""
    gen = torch_generator(derived_seed(seed, ENERGY_STREAM, int(sample_index)))
    return torch.randn((num_t, draws, *shape), generator=gen)


@torch.no_grad()
def sample_energy(
    unet: torch.nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor | None,
    alphas_cumprod: torch.Tensor,
    timesteps: Sequence[int] = DEFAULT_ENERGY_T,
    draws: int = DEFAULT_ENERGY_DRAWS,
    seed: int = 0,
    sample_index: torch.Tensor | np.ndarray | Sequence[int] | None = None,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies of images ``x0`` (n, C, H, W) with labels ``y`` (n,) (None: unconditional).

    Returns ``(energy (n,), per_t (n, T))`` float32 on CPU: the denoising loss averaged over the
    ``draws`` noise draws at each of ``timesteps`` (per_t) and then over the timesteps (energy).
    ``sample_index`` (n,) keys each sample's noise (default 0..n-1; pass dataset row indices so a
    sample's energy is the same in any subset). ``progress(done)`` is called after each batch.
    """
    n = len(x0)
    ts = [int(t) for t in timesteps]
    num_steps = len(alphas_cumprod)
    if not ts:
        raise UsageError("the energy needs at least one timestep")
    bad = [t for t in ts if not 0 <= t < num_steps]
    if bad:
        raise UsageError(f"energy timestep {bad[0]} is outside 0..{num_steps - 1}")
    if draws < 1:
        raise UsageError(f"the energy needs at least one noise draw, got {draws}")
    index = np.arange(n) if sample_index is None else np.asarray(sample_index, dtype=np.int64)
    if len(index) != n:
        raise UsageError(f"sample_index has {len(index)} entries for {n} images")
    device = next(unet.parameters()).device if any(True for _ in unet.parameters()) else torch.device("cpu")
    was_training = unet.training
    unet.eval()
    per_t = torch.zeros(n, len(ts), dtype=torch.float32)
    shape = tuple(x0.shape[1:])
    # rows of one forward pass: (sample, draw) pairs of one timestep; batch_size samples x draws at a time
    step = max(1, batch_size // draws)
    try:
        for start in range(0, n, step):
            stop = min(n, start + step)
            xb = x0[start:stop].to(device, torch.float32)
            yb = None if y is None else y[start:stop].to(device)
            noise = torch.stack([energy_noise(i, len(ts), draws, shape, seed) for i in index[start:stop]])
            m = stop - start  # noise: (m, T, R, C, H, W)
            for j, t in enumerate(ts):
                eps = noise[:, j].reshape(m * draws, *shape).to(device)
                x = xb.repeat_interleave(draws, 0)
                lab = None if yb is None else yb.repeat_interleave(draws, 0)
                tt = torch.full((m * draws,), t, dtype=torch.long, device=device)
                loss = per_sample_loss(unet, x, eps, tt, lab, alphas_cumprod)
                per_t[start:stop, j] = loss.view(m, draws).mean(1).float().cpu()
            if progress is not None:
                progress(stop)
    finally:
        unet.train(was_training)
    return per_t.mean(1), per_t


# ---------------------------------------------------------------- rank statistics


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation of x and y (scipy.stats.spearmanr; NaN for fewer than 3 pairs)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise UsageError(f"spearman: {len(x)} values against {len(y)}")
    if len(x) < 3:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def spearman_interval(
    x: np.ndarray, y: np.ndarray, replicates: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(rho, lo, hi)``: Spearman's rho of the pairs and its percentile bootstrap interval.

    Resamples the pairs with replacement ``replicates`` times from ``numpy_generator(seed, 0x5BE)``;
    ``lo, hi`` are the (1 - level)/2 and (1 + level)/2 quantiles of the replicates' rho (replicates
    whose rho is undefined, e.g. all-tied resamples, are dropped).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rho = spearman(x, y)
    if not 0 < level < 1:
        raise UsageError(f"bootstrap level must be in (0, 1), got {level}")
    if len(x) < 3 or replicates < 1:
        return rho, float("nan"), float("nan")
    rng = numpy_generator(seed, 0x5BE)
    reps = []
    for _ in range(replicates):
        pick = rng.integers(0, len(x), len(x))
        xs, ys = x[pick], y[pick]
        if np.ptp(xs) == 0 or np.ptp(ys) == 0:
            continue
        reps.append(spearman(xs, ys))
    if not reps:
        return rho, float("nan"), float("nan")
    lo, hi = np.quantile(np.asarray(reps), [(1 - level) / 2, (1 + level) / 2])
    return rho, float(lo), float(hi)


# ---------------------------------------------------------------- the energy file (HDF5)


@dataclass
class EnergyResult:
    """Per-sample energies of one model on one split (what ``energy.h5`` holds).

    ``sample_index``, ``labels``: (n,) int64 dataset rows and labels; ``energy`` (n,), ``per_t``
    (n, T) float32; ``timesteps`` (T,); ``attrs``: draws, seed, checkpoint checksum, dataset, split.
    """

    sample_index: np.ndarray
    labels: np.ndarray
    energy: np.ndarray
    per_t: np.ndarray
    timesteps: np.ndarray
    attrs: dict = field(default_factory=dict)
    alignment: dict[int, np.ndarray] = field(default_factory=dict)  # t -> |cos(g_i, mu_t)| (n,)

    def alignment_summary(self, replicates: int = 1000, seed: int = 0) -> list[dict]:
        """Per alignment t: Spearman's rho of (energy, |cos(g_i, mu_t)|) with its 95% bootstrap interval."""
        rows = []
        for t, cos in sorted(self.alignment.items()):
            rho, lo, hi = spearman_interval(self.energy, cos, replicates=replicates, seed=seed)
            rows.append({"t": int(t), "spearman": rho, "ci": [lo, hi], "median_abs_cos": float(np.median(cos))})
        return rows

    def class_summary(self) -> list[dict]:
        """Per class: count, mean, median, std, min and max energy (classes in increasing order)."""
        rows = []
        for c in np.unique(self.labels):
            e = self.energy[self.labels == c].astype(np.float64)
            rows.append(
                {
                    "label": int(c),
                    "n": int(len(e)),
                    "mean": float(e.mean()),
                    "median": float(np.median(e)),
                    "std": float(e.std(ddof=1)) if len(e) > 1 else float("nan"),
                    "min": float(e.min()),
                    "max": float(e.max()),
                }
            )
        return rows


def write_energy(path: str | Path, result: EnergyResult) -> Path:
    """Write ``result`` to ``path`` (HDF5, atomically): datasets sample_index, labels, energy, per_t, t."""
    import h5py

    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("sample_index", data=np.asarray(result.sample_index, dtype=np.int64))
        f.create_dataset("labels", data=np.asarray(result.labels, dtype=np.int64))
        f.create_dataset("energy", data=np.asarray(result.energy, dtype=np.float32))
        f.create_dataset("per_t", data=np.asarray(result.per_t, dtype=np.float32))
        f.create_dataset("t", data=np.asarray(result.timesteps, dtype=np.int64))
        f.attrs["description"] = (
            "per-sample energy: DDPM denoising loss averaged over the timesteps t and the noise draws"
        )
        for key, value in result.attrs.items():
            f.attrs[key] = "" if value is None else value
        for t, cos in result.alignment.items():
            f.create_dataset(f"abs_cos_mu/t{int(t)}", data=np.asarray(cos, dtype=np.float64))
    return path


def read_energy(path: str | Path, checksum: str | None = None) -> EnergyResult:
    """Read an energy file; with ``checksum``, refuse energies of another checkpoint (one-line DataError)."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            result = EnergyResult(
                sample_index=f["sample_index"][()],
                labels=f["labels"][()],
                energy=f["energy"][()],
                per_t=f["per_t"][()],
                timesteps=f["t"][()],
                attrs={k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()},
                alignment={int(k[1:]): f["abs_cos_mu"][k][()] for k in f.get("abs_cos_mu", {})},
            )
    except (OSError, KeyError) as exc:
        raise DataError(f"{path} is not an energy file: {str(exc).splitlines()[0]}") from None
    saved = result.attrs.get("checkpoint")
    if checksum is not None and saved != checksum:
        raise DataError(f"{path} holds energies of checkpoint {saved or '?'}, not of this model ({checksum})")
    return result


def _scored_images(info, ckpt, dataset: str | None, split: str, classes: str | None, data_root: str | None):
    """(dataset name, the dataset brought to the model, row indices (m,) of ``classes``) to score."""
    from geomprobe.data import DIGITS_IMAGE_SIZES, fit_to_model, load_dataset, parse_classes

    name = dataset or info.dataset
    if not name:
        raise UsageError(f"{ckpt} does not record its dataset: pass --dataset")
    size = None
    if name == "digits":
        size = info.image_size if info.image_size in DIGITS_IMAGE_SIZES else DIGITS_IMAGE_SIZES[0]
    data = fit_to_model(
        load_dataset(name, split, image_size=size, data_root=data_root), info.image_size, info.channels, False
    )
    num_classes = info.num_classes or int(data.labels.max()) + 1
    class_list = parse_classes(classes, num_classes)
    rows = np.arange(len(data))
    if class_list is not None:
        rows = rows[np.isin(data.labels.numpy(), class_list)]
    if len(rows) == 0:
        raise UsageError(f"no images of classes {classes} in the {split} split")
    if info.num_classes is not None and int(data.labels[rows].max()) >= info.num_classes:
        raise UsageError(
            f"the model embeds {info.num_classes} classes; the data has label {int(data.labels[rows].max())}"
        )
    return name, data, rows


def compute_energies(
    ckpt: str | Path,
    dataset: str | None = None,
    split: str = "train",
    classes: str | None = None,
    timesteps: Sequence[int] = DEFAULT_ENERGY_T,
    draws: int = DEFAULT_ENERGY_DRAWS,
    seed: int = 0,
    data_root: str | None = None,
    device: str = "cpu",
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
    alignment_t: Sequence[int] = (),
) -> EnergyResult:
    """Energies of every image of ``split`` (of ``classes``, default all) under the model in ``ckpt``.

    ``progress(done, total)`` after each batch. The model's dataset is used when ``dataset`` is None.
    ``alignment_t``: also |cos(g_i, mu_t)| at these t (:func:`gradient_alignment`; one per-sample gradient
    of every image per t, so mind the number of images).
    """
    from geomprobe.checkpoints import checkpoint_checksum, load_model
    from geomprobe.models import resolve_device

    model = load_model(ckpt, resolve_device(device))
    name, data, rows = _scored_images(model.info, ckpt, dataset, split, classes, data_root)
    x0, y = data.batch(torch.as_tensor(rows))
    energy, per_t = sample_energy(
        model.unet,
        x0,
        y,
        model.scheduler.alphas_cumprod,
        timesteps,
        draws,
        seed,
        sample_index=rows,
        batch_size=batch_size,
        progress=None if progress is None else (lambda done: progress(done, len(rows))),
    )
    alignment = {}
    if alignment_t:
        alignment = gradient_alignment(
            model.unet, x0, y, model.scheduler.alphas_cumprod, timesteps=alignment_t, seed=seed, sample_index=rows
        )
    return EnergyResult(
        alignment=alignment,
        sample_index=rows.astype(np.int64),
        labels=y.numpy().astype(np.int64),
        energy=energy.numpy(),
        per_t=per_t.numpy(),
        timesteps=np.asarray(list(timesteps), dtype=np.int64),
        attrs={
            "checkpoint": checkpoint_checksum(ckpt),
            "ckpt": str(ckpt),
            "dataset": name,
            "split": split,
            "draws": int(draws),
            "seed": int(seed),
        },
    )


def energy_change_summary(
    before: np.ndarray, after: np.ndarray, replicates: int = 1000, seed: int = 0, quantiles: int = 4
) -> dict:
    """Intrinsic forgetting of one task change (seed 004): how the energies of earlier samples rose.

    Returns ``{"n", "mean_before", "mean_increase", "spearman", "spearman_ci": [lo, hi], "level",
    "replicates", "increase_by_quantile": [mean increase of each energy-before quantile bin, low to high]}``;
    ``spearman`` is Spearman's rho of (energy before, increase) with a 95% percentile bootstrap interval.
    """
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    rise = after - before
    rho, lo, hi = spearman_interval(before, rise, replicates=replicates, seed=seed)
    order = np.argsort(before, kind="stable")
    bins = [b for b in np.array_split(order, quantiles) if len(b)]

    def num(v: float) -> float | None:
        return None if not np.isfinite(v) else float(v)

    return {
        "n": int(len(before)),
        "mean_before": num(before.mean()) if len(before) else None,
        "mean_increase": num(rise.mean()) if len(rise) else None,
        "spearman": num(rho),
        "spearman_ci": [num(lo), num(hi)],
        "level": 0.95,
        "replicates": int(replicates),
        "increase_by_quantile": [float(rise[b].mean()) for b in bins],
    }


ALIGNMENT_T: tuple[int, ...] = (100, 500, 900)
"""Default timesteps of :func:`gradient_alignment`."""


def gradient_alignment(
    unet: torch.nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor | None,
    alphas_cumprod: torch.Tensor,
    *,
    timesteps: Sequence[int] = ALIGNMENT_T,
    seed: int = 0,
    sample_index: np.ndarray | Sequence[int] | None = None,
    max_memory: int | None = None,
) -> dict[int, np.ndarray]:
    """|cos(g_i, mu_t)| of each sample at each t: g_i its per-sample loss gradient (all parameters), mu_t their mean.

    One noise draw per (sample, t), from ``derived_seed(seed, 0xC05, i, t)`` (i: ``sample_index``).
    Returns ``{t: (n,) float64}``; compare with the energies through :func:`spearman_interval`.
    """
    from geomprobe.probe import per_sample_grads

    n = len(x0)
    index = np.arange(n) if sample_index is None else np.asarray(sample_index, dtype=np.int64)
    names = [name for name, p in unet.named_parameters() if p.requires_grad]
    device = next(unet.parameters()).device
    shape = tuple(x0.shape[1:])
    out = {}
    for t in timesteps:
        noise = torch.stack(
            [torch.randn(shape, generator=torch_generator(derived_seed(seed, 0xC05, int(i), int(t)))) for i in index]
        )
        tt = torch.full((n,), int(t), dtype=torch.long)
        g = per_sample_grads(
            unet,
            names,
            x0.to(device),
            noise.to(device),
            tt.to(device),
            None if y is None else y.to(device),
            alphas_cumprod,
            max_memory=max_memory,
        ).double()
        mu = g.mean(0)
        cos = (g @ mu).abs() / (g.norm(dim=1) * mu.norm()).clamp_min(1e-300)
        out[int(t)] = cos.cpu().numpy()
    return out

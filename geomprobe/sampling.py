"""Sample grids from any model directory (``geomprobe sample``).

A class-conditional model gives one grid row per class; an unconditional one gives ``rows`` rows
of ``n`` samples and never sees a label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from geomprobe.checkpoints import load_model
from geomprobe.data import parse_classes
from geomprobe.diffusion import ddim_sample, is_label_conditioned
from geomprobe.errors import UsageError
from geomprobe.images import image_grid, save_png
from geomprobe.io import torch_generator
from geomprobe.models import resolve_device

DEFAULT_ROWS = 8
DEFAULT_CLASS_ROWS = 10


@dataclass
class SampleGrid:
    """What :func:`sample_grid` wrote.

    The PNG, the samples (B, C, H, W), the classes of the rows (None for an unconditional model),
    the number of rows and the model's notes.
    """

    path: Path
    samples: torch.Tensor
    classes: list[int] | None
    rows: int
    notes: list[str] = field(default_factory=list)


def sample_grid(
    ckpt: str | Path,
    classes: str | list[int] | None,
    n_per_class: int,
    out: str | Path,
    steps: int = 50,
    seed: int = 0,
    device: str = "auto",
    scale: int = 4,
    rows: int | None = None,
) -> SampleGrid:
    """DDIM samples written as a PNG grid of ``n_per_class`` columns.

    Class-conditional model: one row per class of ``classes`` (a spec such as ``"0..9"`` or a list;
    None: the first 10 classes); ``rows`` is refused. Unconditional model: ``rows`` rows (None:
    :data:`DEFAULT_ROWS`); ``classes`` is refused, and no label reaches the model.
    """
    if n_per_class <= 0:
        raise UsageError(f"--n must be positive, got {n_per_class}")
    if steps <= 0:
        raise UsageError(f"--steps must be positive, got {steps}")
    if rows is not None and rows <= 0:
        raise UsageError(f"--rows must be positive, got {rows}")
    c = load_model(ckpt, resolve_device(device))
    if is_label_conditioned(c.unet):
        if rows is not None:
            raise UsageError("--rows is for unconditional models; this model is class-conditional: use --classes")
        num_classes = c.info.num_classes
        if classes is None:
            class_list = list(range(min(num_classes, DEFAULT_CLASS_ROWS)))
        elif isinstance(classes, str):
            class_list = parse_classes(classes, num_classes) or list(range(num_classes))  # "all"
        else:
            class_list = list(classes)
        bad = [k for k in class_list if not 0 <= k < num_classes]
        if bad:
            raise UsageError(f"class {bad[0]} is outside 0..{num_classes - 1} for this checkpoint")
        labels = torch.tensor(class_list, dtype=torch.long).repeat_interleave(n_per_class)
        n_rows = len(class_list)
    else:
        if classes is not None:
            raise UsageError(
                f"{ckpt} is an unconditional model: --classes does not apply; use --rows R for R rows of --n samples"
            )
        class_list, n_rows = None, rows or DEFAULT_ROWS
        labels = torch.full((n_rows * n_per_class,), -1, dtype=torch.long)  # placeholders: never passed to the model
    gen = torch_generator(seed)
    samples = ddim_sample(c.unet, c.scheduler, labels, num_inference_steps=steps, generator=gen)
    path = save_png(image_grid(samples, nrow=n_per_class, scale=scale), out)
    return SampleGrid(path, samples, class_list, n_rows, list(c.notes))

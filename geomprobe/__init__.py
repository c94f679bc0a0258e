"""geomprobe: gradient geometry of diffusion models (per-sample gradients, Fisher spectra, EWC).

Public names are imported lazily (``from geomprobe import GradientStore`` loads only what it
needs), so ``import geomprobe`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "GeomprobeError": "geomprobe.errors",
    "UsageError": "geomprobe.errors",
    "DataError": "geomprobe.errors",
    "parse_timesteps": "geomprobe.timesteps",
    "TimestepSpec": "geomprobe.timesteps",
    "load_dataset": "geomprobe.data",
    "task_splits": "geomprobe.data",
    "ImageDataset": "geomprobe.data",
    "build_unet": "geomprobe.models",
    "build_scheduler": "geomprobe.models",
    "load_checkpoint": "geomprobe.checkpoints",
    "load_model": "geomprobe.checkpoints",
    "save_checkpoint": "geomprobe.checkpoints",
    "per_sample_loss": "geomprobe.diffusion",
    "ddim_sample": "geomprobe.diffusion",
    "sample_energy": "geomprobe.energy",
    "TrainConfig": "geomprobe.training",
    "train": "geomprobe.training",
    # probe engine (geomprobe/probe)
    "GradientStore": "geomprobe.probe",
    "per_sample_grads": "geomprobe.probe",
    "mean_gradient": "geomprobe.probe",
    "directional_derivatives": "geomprobe.probe",
    "extract_gradients": "geomprobe.probe",
    # Fisher objects (geomprobe/fisher)
    "DenseFisher": "geomprobe.fisher",
    "DiagonalFisher": "geomprobe.fisher",
    "Rank1Fisher": "geomprobe.fisher",
    "LowRankFisher": "geomprobe.fisher",
    "GramFisher": "geomprobe.fisher",
    "ImplicitFisher": "geomprobe.fisher",
    "StackedPenalty": "geomprobe.fisher.penalty",
    "load_fisher": "geomprobe.fisher",
    "fisher_spectrum": "geomprobe.fisher.spectrum",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'geomprobe' has no attribute {name!r}")

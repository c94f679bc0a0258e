"""The configuration of a continual run: every field, its default and its ``--help`` text, stated once.

``geomprobe continual`` builds its options from these fields (:func:`config_field`); a resumed
run compares the manifest's config with the new one (:func:`check_manifest`). Options that do
not change results (``--max-memory``, ``--device``, ``--seeds``) are not part of it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path

from geomprobe.errors import DataError, UsageError

FISHER_CHOICES = ("none", "diag", "rank1", "rankk", "full")
REPLAY_CHOICES = ("auto", "none", "generative", "real", "compact")
CODE_CHOICES = ("pca", "lowres", "lowres-unet")
SELECT_CHOICES = ("random", "high-energy", "low-energy", "stratified", "similarity")
FEATURE_CHOICES = ("classifier", "inception")

# --compare: the paper's Table 1 rows (+ fine-tuning, App. E.4.2); name -> config overrides
COMPARE_STRATEGIES: dict[str, dict] = {
    "finetune": {"fisher": "none", "gd": False, "lam": 0.0},
    "diag": {"fisher": "diag", "gd": False},
    "rank1": {"fisher": "rank1", "gd": False},
    "gd": {"fisher": "none", "gd": True},
    "diag+gd": {"fisher": "diag", "gd": True},
    "rank1+gd": {"fisher": "rank1", "gd": True},
    "non-continual": {"fisher": "none", "gd": False, "non_continual": True},
}


def penalty_weight(lam: float, pixels: int, units: str = "paper") -> float:
    """The lambda our penalties use (docs/design.md §6) for a user's ``--lambda``.

    ``units="raw"``: ``lam`` as is. ``units="paper"`` (default): ``lam`` is in the units of the
    paper's lambda = 15000, which weighs the Fisher of a per-pixel *mean* squared error (the
    loss of the diffusers training code the paper builds on). Our loss is 1/2 ||eps - eps_hat||^2
    summed over D = C*H*W pixels, D/2 times that loss, so our Fisher is (D/2)^2 times larger.
    Adam is invariant to the scale of the total loss, so the same balance of penalty against
    denoising loss needs lambda_ours = 2 lambda / D (digits at 16 px: 15000 -> 117.2).
    """
    if units == "raw":
        return float(lam)
    return 2.0 * float(lam) / float(pixels)


def _opt(default, help: str):
    """A config field with its default and its ``--help`` text."""
    return field(default=default, metadata={"help": help})


@dataclass
class ContinualConfig:
    """Everything that determines a continual run (the quick preset is the default).

    Units: ``steps_per_task`` optimiser steps; ``lam`` the EWC weight lambda; ``gd_weight`` the
    distillation weight; ``replay_per_class`` images per earlier class; ``n_generated`` samples
    per task for FID; ``sample_steps`` DDIM steps (evaluation and replay generation).
    ``image_size`` None: the dataset's size (:data:`geomprobe.data.DATASET_FACTS`).
    """

    dataset: str = _opt("digits", "digits | mnist | fashion-mnist | cifar10 | imagenet32")
    model: str = _opt("small3", "UNet preset")
    image_size: int | None = _opt(None, "digits only: 8, 16 (default) or 32")
    tasks: int = _opt(5, "number of class-incremental tasks")
    steps_per_task: int = _opt(500, "optimiser steps per task (quick preset: 500)")
    batch_size: int = _opt(128, "images of the current task per step")
    lr: float = _opt(1e-3, "Adam learning rate (restarted at each task)")
    precision: str = _opt(
        "fp32", "fp32 | bf16 (bf16 autocast of the training forward; weights and the Fisher stay float32)"
    )
    fisher: str = _opt("none", "EWC Fisher: none | diag | rank1 | rankk | full")
    gd: bool = _opt(False, "generative distillation from the previous task's model")
    non_continual: bool = _opt(False, "train on all tasks seen so far (upper bound)")
    lam: float = _opt(15000.0, "EWC penalty weight lambda (paper: 15000; see --lambda-units)")
    lambda_units: str = _opt(
        "paper",
        "paper: lambda weighs the per-pixel-mean MSE Fisher as in the paper "
        "(applied as 2*lambda/D for our summed loss) | raw: used as is",
    )
    rank: int = _opt(5, "rank k of --fisher rankk")
    rankk_method: str = _opt("power", "rank-k estimate: power (stochastic power iteration) | lanczos")
    fisher_samples: int = _opt(256, "probe samples per task for the Fisher estimate")
    t_range: str = _opt("all", "timesteps of the Fisher estimate: all | low-snr | mid-snr | high-snr | 100..900 ...")
    replay: str = _opt(
        "auto",
        "replay images: generative | real | compact (real exemplars stored as codes) | none (auto: generative with --gd)",
    )
    replay_per_class: int = _opt(64, "replay images per earlier class (paper: 5000)")
    replay_select: str = _opt(
        "random",
        "--replay real: which exemplars of each earlier class: random | high-energy | low-energy | stratified "
        "(energy quantiles) | similarity (nearest the class mean); energies from the previous task's model",
    )
    replay_code: str = _opt(
        "pca",
        "--replay compact: the code, pca (coefficients on the earlier tasks' top-k components) | lowres (uint8 "
        "thumbnail, upsampled) | lowres-unet (the thumbnail decoded by the previous task's UNet, SDEdit from t=300)",
    )
    budget_bytes: int = _opt(
        0, "--replay compact: bytes per stored exemplar (pca: k = N // 4 float32 coefficients; lowres: C r^2 <= N)"
    )
    replay_batch: int = _opt(64, "replay images per step")
    energy_records: bool = _opt(
        False,
        "after each task change, every earlier-task training image's energy before and after "
        "(energy-task{k}.h5, intrinsic_forgetting.jsonl; seed 004's intrinsic forgetting)",
    )
    gd_weight: float = _opt(1.0, "weight of the distillation loss")
    fid_features: str = _opt("classifier", "classifier (cached small CNN) | inception")
    inception_weights: str | None = _opt(None, "local Inception weights for --fid-features inception")
    n_generated: int = _opt(128, "generated samples per task for FID")
    sample_steps: int = _opt(50, "DDIM steps for evaluation and replay")
    classifier_steps: int = _opt(600, "training steps of the cached FID/accuracy classifier")
    data_root: str | None = _opt(None, "directory with the dataset's files (all but digits)")

    def __post_init__(self) -> None:
        if self.image_size is None and self.dataset in _dataset_facts():
            self.image_size = _dataset_facts()[self.dataset].image_size

    @property
    def num_classes(self) -> int:
        from geomprobe.data import dataset_facts

        return dataset_facts(self.dataset).num_classes

    @property
    def replay_source(self) -> str:
        """None | generative | real | compact, with ``auto`` resolved (generative with --gd, else none)."""
        if self.replay == "auto":
            return "generative" if self.gd else "none"
        return self.replay

    @property
    def strategy(self) -> str:
        """Name in tables and metric rows: finetune, diag, rank1, rank5, full, gd, rank1+gd, ..."""
        if self.non_continual:
            return "non-continual"
        parts = []
        if self.fisher != "none":
            parts.append(f"rank{self.rank}" if self.fisher == "rankk" else self.fisher)
        if self.gd:
            parts.append("gd")
        elif self.replay_source != "none":
            parts.append(f"replay-{self.replay_source}")
            if self.replay_select != "random":
                parts[-1] += f"-{self.replay_select}"
            if self.replay_source == "compact":
                parts[-1] += f"-{self.replay_code}{self.budget_bytes}B"
        return "+".join(parts) if parts else "finetune"

    def validate(self) -> None:
        """Raise :class:`UsageError` for any option a user could get wrong."""
        from geomprobe.data import task_splits
        from geomprobe.models import get_preset
        from geomprobe.timesteps import parse_timesteps

        get_preset(self.model)
        self._validate_choices()
        self._validate_numbers()
        self._validate_strategy()
        parse_timesteps(self.t_range)
        task_splits(self.num_classes, self.tasks)

    def _validate_choices(self) -> None:
        choices = {
            "fisher": (FISHER_CHOICES, "unknown strategy --fisher"),
            "replay": (REPLAY_CHOICES, "unknown --replay"),
            "fid_features": (FEATURE_CHOICES, "unknown --fid-features"),
            "rankk_method": (("power", "lanczos"), "unknown --rankk-method"),
            "lambda_units": (("paper", "raw"), "unknown --lambda-units"),
            "precision": (("fp32", "bf16"), "unknown --precision"),
            "replay_select": (SELECT_CHOICES, "unknown --replay-select"),
            "replay_code": (CODE_CHOICES, "unknown --code"),
        }
        for name, (allowed, message) in choices.items():
            if getattr(self, name) not in allowed:
                raise UsageError(f"{message} {getattr(self, name)!r}; expected one of {', '.join(allowed)}")
        if self.fid_features == "inception" and not self.inception_weights:
            raise UsageError("--fid-features inception needs --inception-weights PATH (no weights are downloaded)")

    def _validate_numbers(self) -> None:
        if not self.lam >= 0:
            raise UsageError(f"--lambda must be >= 0, got {self.lam}")
        if not self.gd_weight >= 0:
            raise UsageError(f"--gd-weight must be >= 0, got {self.gd_weight}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        for name in (
            "steps_per_task",
            "batch_size",
            "rank",
            "fisher_samples",
            "n_generated",
            "sample_steps",
            "classifier_steps",
            "replay_batch",
        ):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.replay_per_class < 0:
            raise UsageError(f"--replay-per-class must be >= 0, got {self.replay_per_class}")
        if self.n_generated < 2:
            raise UsageError("--n-generated must be at least 2 (FID needs a covariance)")

    def _validate_strategy(self) -> None:
        if self.non_continual and (self.fisher != "none" or self.gd or self.replay_source != "none"):
            raise UsageError("--non-continual trains on all tasks seen so far; it takes no --fisher, --gd or --replay")
        if self.gd and self.replay_source == "none":
            raise UsageError("--gd needs replay images: --replay generative or real")
        if self.replay_select != "random" and self.replay_source not in ("real", "compact"):
            raise UsageError(f"--replay-select {self.replay_select} chooses real exemplars: it needs --replay real")
        if self.replay_source == "compact":
            from geomprobe.continual.compact import min_code_bytes
            from geomprobe.data import dataset_facts

            smallest = min_code_bytes(self.replay_code, dataset_facts(self.dataset).channels)
            if self.budget_bytes < smallest:
                raise UsageError(
                    f"--budget-bytes {self.budget_bytes} is smaller than one code ({self.replay_code}: {smallest} bytes)"
                )
        if self.replay_source != "none" and self.replay_per_class == 0:
            raise UsageError("--replay needs --replay-per-class > 0")


def _dataset_facts() -> dict:
    from geomprobe.data import DATASET_FACTS

    return DATASET_FACTS


def config_field(name: str) -> Field:
    """The dataclass field ``name`` of :class:`ContinualConfig` (``.default``, ``.metadata["help"]``)."""
    return {f.name: f for f in fields(ContinualConfig)}[name]


def config_from_dict(values: dict) -> ContinualConfig:
    """A :class:`ContinualConfig` from ``values`` (e.g. a manifest's ``config``), ignoring unknown keys."""
    known = {f.name for f in fields(ContinualConfig)}
    return ContinualConfig(**{k: v for k, v in values.items() if k in known})


def make_manifest(config: ContinualConfig, seeds: list[int] | None = None, seed: int | None = None) -> dict:
    """The run manifest: tool, version, command line, config, strategy, creation time and the given seed(s)."""
    from geomprobe import __version__

    m = {
        "tool": "geomprobe continual",
        "version": __version__,
        "command_line": " ".join(sys.argv),
        "config": asdict(config),
        "strategy": config.strategy,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if seeds is not None:
        m["seeds"] = seeds
    if seed is not None:
        m["seed"] = seed
    return m


def check_manifest(path: Path, config: ContinualConfig) -> None:
    """Refuse to resume a run made with another config (the fields that change results)."""
    try:
        saved = json.loads(path.read_text())["config"]
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not a continual-run manifest: {exc}") from None
    for key, value in asdict(config).items():
        if key in saved and saved[key] != value:
            raise UsageError(f"--resume with {key}={value!r} but {path.parent} was run with {saved[key]!r}")

"""The class-incremental task loop (``geomprobe continual``), built on the plain training loop.

For each seed and each task k (classes of ``task_splits``):

1. data: task k's training images (``non_continual``: the union of tasks 0..k); with
   ``replay real`` / ``generative`` (without distillation) the replay pool is mixed into batches;
2. train ``steps_per_task`` steps with :func:`geomprobe.training.training_loop` and the strategy's
   loss terms (EWC penalty over tasks < k, generative distillation from the frozen theta*_{k-1});
3. save the checkpoint ``task-{k}/``, estimate the Fisher of the chosen kind on task k's data at
   theta*_k (t from ``t_range``) and save it as ``fisher-task{k}.h5`` (the Fisher objects' format);
4. evaluate FID_i(m_k) and classifier accuracy for every i <= k; append rows to ``metrics.jsonl``.

Layout of ``out``::

    manifest.json                 tool version, command line, config, seeds, created time
    metrics.jsonl                 all seeds' rows + one summary row per seed (DESIGN section 9)
    summary.json                  AFID@k and forgetting, mean and standard error over seeds
    seed-{s}/manifest.json        config + seed (a resume refuses a different config)
    seed-{s}/state.json           last completed task
    seed-{s}/metrics.jsonl        that seed's rows
    seed-{s}/train_log.jsonl      {"task", "step", "loss", "denoise", "ewc", "distill"}
    seed-{s}/samples.h5           after_task{k}/images (n, C, H, W) in [-1, 1], labels (n,): the FID samples
    seed-{s}/timings.jsonl        seconds per task: replay pool, training, Fisher + checkpoint, evaluation
    seed-{s}/task-{k}/            checkpoint after task k (DESIGN section 8)
    seed-{s}/fisher-task{k}.h5    Fisher of task k (when --fisher is not none)

Resume: every random draw of task k comes from generators seeded by (seed, k) and the optimiser
restarts at each task, so rerunning from the last completed task's checkpoint reproduces the
uninterrupted run exactly (on the same device and thread count).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from geomprobe.continual.metrics import afid, evaluate_task, forgetting, mean_and_stderr
from geomprobe.continual.strategies import (
    DistillationTerm,
    add_fisher_to_penalty,
    combine_terms,
    flat_parameters,
    make_penalty,
)
from geomprobe.data import ImageDataset, load_dataset, task_splits
from geomprobe.diffusion import ddim_sample
from geomprobe.errors import DataError, UsageError
from geomprobe.models import (
    ModelInfo,
    build_scheduler,
    build_unet,
    checkpoint_checksum,
    get_preset,
    load_checkpoint,
    resolve_device,
    save_checkpoint,
)
from geomprobe.timesteps import parse_timesteps
from geomprobe.training import sample_training_batch, training_loop

FISHER_CHOICES = ("none", "diag", "rank1", "rankk", "full")
REPLAY_CHOICES = ("auto", "none", "generative", "real")
FEATURE_CHOICES = ("classifier", "inception")
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
MANIFEST = "manifest.json"
STATE = "state.json"
TRAIN_LOG = "train_log.jsonl"
TIMINGS = "timings.jsonl"
SAMPLES = "samples.h5"

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
    """The lambda our penalties use (DESIGN section 6) for a user's ``--lambda``.

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


@dataclass
class ContinualConfig:
    """Everything that determines a continual run (the quick preset is the default).

    Units: ``steps_per_task`` optimiser steps; ``lam`` the EWC weight lambda; ``gd_weight`` the
    distillation weight; ``replay_per_class`` images per earlier class; ``n_generated`` samples
    per task for FID; ``sample_steps`` DDIM steps (evaluation and replay generation).
    """

    dataset: str = "digits"
    model: str = "small3"
    image_size: int = 16
    tasks: int = 5
    steps_per_task: int = 500
    batch_size: int = 128
    lr: float = 1e-3
    fisher: str = "none"
    gd: bool = False
    non_continual: bool = False
    lam: float = 15000.0
    lambda_units: str = "paper"
    rank: int = 5
    rankk_method: str = "power"
    fisher_samples: int = 256
    t_range: str = "all"
    replay: str = "auto"
    replay_per_class: int = 64
    replay_batch: int = 64
    gd_weight: float = 1.0
    fid_features: str = "classifier"
    inception_weights: str | None = None
    n_generated: int = 128
    sample_steps: int = 50
    classifier_steps: int = 600
    data_root: str | None = None

    @property
    def replay_source(self) -> str:
        """none | generative | real, with ``auto`` resolved (generative with --gd, else none)."""
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
        return "+".join(parts) if parts else "finetune"

    def validate(self) -> None:
        """Raise :class:`UsageError` for any option a user could get wrong."""
        get_preset(self.model)
        if self.fisher not in FISHER_CHOICES:
            raise UsageError(f"unknown strategy --fisher {self.fisher!r}; expected one of {', '.join(FISHER_CHOICES)}")
        if self.replay not in REPLAY_CHOICES:
            raise UsageError(f"unknown --replay {self.replay!r}; expected generative, real or none")
        if self.fid_features not in FEATURE_CHOICES:
            raise UsageError(f"unknown --fid-features {self.fid_features!r}; expected classifier or inception")
        if self.fid_features == "inception" and not self.inception_weights:
            raise UsageError("--fid-features inception needs --inception-weights PATH (no weights are downloaded)")
        if self.rankk_method not in ("power", "lanczos"):
            raise UsageError(f"unknown --rankk-method {self.rankk_method!r}; expected power or lanczos")
        if not self.lam >= 0:
            raise UsageError(f"--lambda must be >= 0, got {self.lam}")
        if self.lambda_units not in ("paper", "raw"):
            raise UsageError(f"unknown --lambda-units {self.lambda_units!r}; expected paper or raw")
        if not self.gd_weight >= 0:
            raise UsageError(f"--gd-weight must be >= 0, got {self.gd_weight}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        for name in ("steps_per_task", "batch_size", "rank", "fisher_samples", "n_generated", "sample_steps",
                     "classifier_steps", "replay_batch"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.replay_per_class < 0:
            raise UsageError(f"--replay-per-class must be >= 0, got {self.replay_per_class}")
        if self.n_generated < 2:
            raise UsageError("--n-generated must be at least 2 (FID needs a covariance)")
        if self.non_continual and (self.fisher != "none" or self.gd or self.replay_source != "none"):
            raise UsageError("--non-continual trains on all tasks seen so far; it takes no --fisher, --gd or --replay")
        if self.gd and self.replay_source == "none":
            raise UsageError("--gd needs replay images: --replay generative or real")
        if self.replay_source != "none" and self.replay_per_class == 0:
            raise UsageError("--replay needs --replay-per-class > 0")
        parse_timesteps(self.t_range)
        num_classes = 10 if self.dataset in ("digits", "mnist", "fashion-mnist", "cifar10") else None
        if self.dataset == "imagenet32":
            num_classes = 1000
        if num_classes is None:
            load_dataset(self.dataset)  # raises the unknown-dataset error
        task_splits(num_classes, self.tasks)


def config_from_dict(values: dict) -> ContinualConfig:
    known = {f.name for f in fields(ContinualConfig)}
    return ContinualConfig(**{k: v for k, v in values.items() if k in known})


@dataclass
class SeedResult:
    """fid[k][i] = FID_i(m_k); accuracy[k][i] likewise; afid keyed "1".."T"."""

    seed: int
    strategy: str
    fid: dict[int, dict[int, float]]
    accuracy: dict[int, dict[int, float]]
    afid: dict[str, float]
    forgetting: float
    seconds: float
    resumed_from: int = -1


@dataclass
class ContinualResult:
    out: Path
    strategy: str
    seeds: list[SeedResult]
    afid: dict[str, tuple[float, float]] = field(default_factory=dict)  # mean, stderr
    forgetting: tuple[float, float] = (float("nan"), float("nan"))
    final_accuracy: tuple[float, float] = (float("nan"), float("nan"))
    feature_net: str = ""
    feature_net_accuracy: float = float("nan")
    seconds: float = 0.0


Progress = Callable[[int, dict], None]  # (global steps done, fields)


def _task_seed(seed: int, task: int, stream: int) -> int:
    """A distinct generator seed per (run seed, task, stream): training, replay, fisher, eval."""
    return (seed * 1_000_003 + task * 1009 + stream * 97 + 12345) % (2**63 - 1)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _manifest(config: ContinualConfig, seeds: list[int] | None = None, seed: int | None = None) -> dict:
    from geomprobe import __version__

    m = {"tool": "geomprobe continual", "version": __version__, "command_line": " ".join(sys.argv),
         "config": asdict(config), "strategy": config.strategy,
         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if seeds is not None:
        m["seeds"] = seeds
    if seed is not None:
        m["seed"] = seed
    return m


def _check_manifest(path: Path, config: ContinualConfig) -> None:
    """Refuse to resume a run made with another config (the fields that change results)."""
    try:
        saved = json.loads(path.read_text())["config"]
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not a continual-run manifest: {exc}") from None
    ours = asdict(config)
    for key, value in ours.items():
        if key in saved and saved[key] != value:
            raise UsageError(f"--resume with {key}={value!r} but {path.parent} was run with {saved[key]!r}")


class FeatureNet:
    """The FID feature network and the accuracy classifier (None with Inception features)."""

    def __init__(self, config: ContinualConfig, cache_dir: str | Path | None = None):
        from geomprobe.continual.classifier import ClassifierConfig, FeatureExtractor, load_or_train_classifier

        ref = load_dataset(config.dataset, "train", config.image_size, config.data_root)
        cc = ClassifierConfig(channels=ref.channels, image_size=ref.image_size, num_classes=ref.num_classes,
                              steps=config.classifier_steps)
        cached = load_or_train_classifier(config.dataset, config.image_size, config.data_root, cache_dir, cc)
        self.classifier = cached.model
        self.classifier_name = cached.name
        self.classifier_accuracy = cached.test_accuracy
        if config.fid_features == "inception":
            from geomprobe.continual.metrics import inception_feature_net

            self.extractor = inception_feature_net(config.inception_weights)
            self.name = self.extractor.name  # inception-v3-fid@<first 12 hex of the file's SHA-256>
        else:
            self.extractor = FeatureExtractor(cached.model)
            self.name = cached.name


def _replay_pool_real(train: ImageDataset, classes: list[int], per_class: int, gen: torch.Generator):
    """``per_class`` real exemplars of each class: (images (M, C, H, W), labels (M,))."""
    xs, ys = [], []
    for c in classes:
        idx = torch.nonzero(train.labels == c).flatten()
        pick = idx[torch.randperm(len(idx), generator=gen)[:per_class]]
        x, y = train.batch(pick)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def _replay_pool_generated(teacher, scheduler, classes: list[int], per_class: int, steps: int, gen: torch.Generator):
    """``per_class`` DDIM samples of each earlier class from the teacher."""
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class)
    return ddim_sample(teacher, scheduler, labels, num_inference_steps=steps, generator=gen), labels


def _store_samples(path: Path, k: int, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Keep the evaluation samples of model m_k (for figures): group ``after_task{k}``."""
    import h5py

    with h5py.File(path, "a") as f:
        if f"after_task{k}" in f:
            del f[f"after_task{k}"]
        g = f.create_group(f"after_task{k}")
        g.create_dataset("images", data=images.float().numpy(), compression="gzip")
        g.create_dataset("labels", data=labels.numpy())


def _drop_samples_after(path: Path, completed: int) -> None:
    import h5py

    if not path.exists():
        return
    with h5py.File(path, "a") as f:
        for key in list(f.keys()):
            if key.startswith("after_task") and int(key[len("after_task"):]) > completed:
                del f[key]


def run_seed(
    config: ContinualConfig,
    seed: int,
    out: Path,
    features: FeatureNet,
    resume: bool = False,
    progress: Progress | None = None,
    step_offset: int = 0,
    device: str = "cpu",
) -> SeedResult:
    """One seed of one strategy in directory ``out`` (``seed-{s}``); see the module docstring."""
    from geomprobe.fisher import load_fisher
    from geomprobe.probe.grads import select_parameters

    t_start = time.time()
    dev = resolve_device(device)
    strategy = config.strategy
    spec = parse_timesteps(config.t_range)
    train = load_dataset(config.dataset, "train", config.image_size, config.data_root)
    test = load_dataset(config.dataset, "test", config.image_size, config.data_root)
    tasks = task_splits(train.num_classes, config.tasks)

    out.mkdir(parents=True, exist_ok=True)
    manifest, state_path = out / MANIFEST, out / STATE
    completed = -1
    if manifest.exists():
        if not resume:
            raise UsageError(f"output directory {out} already holds a run; pass --resume to continue it or choose another --out")
        _check_manifest(manifest, config)
        if state_path.exists():
            completed = int(json.loads(state_path.read_text())["completed_task"])
    else:
        _write_json(manifest, _manifest(config, seed=seed))
    # drop rows written after the last completed task (an interrupted evaluation or training)
    rows = [r for r in _read_jsonl(out / METRICS) if not r.get("summary") and r["after_task"] <= completed]
    _write_jsonl(out / METRICS, rows)
    _write_jsonl(out / TRAIN_LOG, [r for r in _read_jsonl(out / TRAIN_LOG) if r["task"] <= completed])
    _write_jsonl(out / TIMINGS, [r for r in _read_jsonl(out / TIMINGS) if r["task"] <= completed])
    _drop_samples_after(out / SAMPLES, completed)

    scheduler = build_scheduler()
    if completed >= 0:
        unet = load_checkpoint(out / f"task-{completed}", dev).unet
    else:
        torch.manual_seed(seed)
        unet = build_unet(config.model, train.image_size, train.channels, train.num_classes).to(dev)
    names = select_parameters(unet)
    alphas_cumprod = scheduler.alphas_cumprod

    weight = penalty_weight(config.lam, train.channels * train.image_size**2, config.lambda_units)
    penalty = make_penalty(config.fisher, names, weight) if config.fisher != "none" else None
    for j in range(completed + 1):  # rebuild the penalty of the completed tasks from their files
        if penalty is not None:
            anchor = flat_parameters(load_checkpoint(out / f"task-{j}").unet, names).detach()
            add_fisher_to_penalty(penalty, load_fisher(out / f"fisher-task{j}.h5"), anchor)
    if penalty is not None:
        penalty.to(dev)

    fid: dict[int, dict[int, float]] = {}
    acc: dict[int, dict[int, float]] = {}
    for r in rows:
        fid.setdefault(r["after_task"], {})[r["task"]] = r["fid"]
        acc.setdefault(r["after_task"], {})[r["task"]] = r["accuracy"]

    references = [test.subset(c).batch(torch.arange(len(test.subset(c))))[0] for c in tasks]
    for k, classes in enumerate(tasks):
        if k <= completed:
            continue
        seen = [c for task in tasks[: k + 1] for c in task]
        earlier = [c for task in tasks[:k] for c in task]
        data = train.subset(seen if config.non_continual else classes)
        gen = torch.Generator().manual_seed(_task_seed(seed, k, 0))
        clock = {"task": k, "start": time.time()}
        terms: list = []
        if penalty is not None and penalty.num_tasks > 0:
            terms.append(penalty)
        replay = None
        if config.replay_source != "none" and earlier:
            rgen = torch.Generator().manual_seed(_task_seed(seed, k, 1))
            if config.replay_source == "real":
                replay = _replay_pool_real(train, earlier, config.replay_per_class, rgen)
            else:
                replay = _replay_pool_generated(unet, scheduler, earlier, config.replay_per_class, config.sample_steps, rgen)
        if config.gd and replay is not None:
            teacher = copy.deepcopy(unet)
            terms.append(DistillationTerm(teacher, replay[0], replay[1], alphas_cumprod, config.replay_batch,
                                          config.gd_weight, gen))

        def next_batch(data=data, replay=replay, gen=gen):
            x0, y, t, noise = sample_training_batch(data, config.batch_size, scheduler.config.num_train_timesteps, gen)
            if replay is None or config.gd:
                return x0, y, t, noise
            # replay without distillation: replay images join the batch with the ordinary DDPM loss
            idx = torch.randint(0, len(replay[1]), (config.replay_batch,), generator=gen)
            tr = torch.randint(0, scheduler.config.num_train_timesteps, (config.replay_batch,), generator=gen)
            nr = torch.randn((config.replay_batch, *x0.shape[1:]), generator=gen)
            return torch.cat([x0, replay[0][idx]]), torch.cat([y, replay[1][idx]]), torch.cat([t, tr]), torch.cat([noise, nr])

        log_rows: list[dict] = []

        def on_log(step: int, values: dict, k=k) -> None:
            log_rows.append({"task": k, "step": step, **values})

        def on_step(step: int, loss: float, k=k) -> None:
            if progress is not None:
                progress(step_offset + k * config.steps_per_task + step, {"task": k, "loss": loss})

        clock["replay_s"] = time.time() - clock.pop("start")
        t_phase = time.time()
        optimizer = torch.optim.Adam(unet.parameters(), lr=config.lr)
        training_loop(unet, scheduler, optimizer, next_batch, 0, config.steps_per_task,
                      extra_loss=combine_terms(terms), on_log=on_log, log_every=10, progress=on_step)
        unet.eval()
        clock["train_s"] = time.time() - t_phase
        t_phase = time.time()
        ckpt_dir = out / f"task-{k}"
        info = ModelInfo(preset=config.model, dataset=config.dataset, image_size=train.image_size,
                         channels=train.channels, num_classes=train.num_classes, seed=seed,
                         step=(k + 1) * config.steps_per_task,
                         extra={"continual_config": asdict(config), "task": k, "classes": classes, "strategy": strategy})
        save_checkpoint(ckpt_dir, unet, scheduler, info)

        if penalty is not None:
            if progress is not None:
                progress(step_offset + (k + 1) * config.steps_per_task, {"task": k, "stage": "fisher"})
            from geomprobe.continual.estimate import estimate_task_fisher

            fgen = torch.Generator().manual_seed(_task_seed(seed, k, 2))
            fisher = estimate_task_fisher(config.fisher, unet, names, train.subset(classes), alphas_cumprod, spec,
                                          config.fisher_samples, fgen, rank=config.rank, method=config.rankk_method)
            fisher.info.checkpoint = {"path": str(ckpt_dir), "checksum": checkpoint_checksum(ckpt_dir)}
            fisher.info.extra = {**fisher.info.extra, "task": k, "classes": classes, "seed": seed}
            path = fisher.save(out / f"fisher-task{k}.h5")
            # the penalty is built from the file, exactly as a resumed run builds it
            add_fisher_to_penalty(penalty, load_fisher(path), flat_parameters(unet, names).detach())
            penalty.to(dev)

        clock["fisher_s"] = time.time() - t_phase
        t_phase = time.time()
        if progress is not None:
            progress(step_offset + (k + 1) * config.steps_per_task, {"task": k, "stage": "eval"})
        new_rows, images, image_labels = [], [], []
        for i in range(k + 1):
            egen = torch.Generator().manual_seed(_task_seed(seed, k, 3 + i))
            ev = evaluate_task(unet, scheduler, tasks[i], references[i], features.extractor, features.classifier,
                               config.n_generated, egen, config.sample_steps)
            fid.setdefault(k, {})[i] = ev.fid
            images.append(ev.samples)
            image_labels.append(ev.labels)
            acc.setdefault(k, {})[i] = ev.accuracy
            new_rows.append({"seed": seed, "strategy": strategy, "after_task": k, "task": i, "fid": ev.fid,
                             "accuracy": ev.accuracy, "n_generated": ev.n_generated, "n_reference": ev.n_reference,
                             "feature_net": features.name, "reference_split": "test"})
        _store_samples(out / SAMPLES, k, torch.cat(images), torch.cat(image_labels))
        clock["eval_s"] = time.time() - t_phase
        with open(out / TRAIN_LOG, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in log_rows)
        with open(out / TIMINGS, "a") as f:
            f.write(json.dumps({k_: round(v, 2) if isinstance(v, float) else v for k_, v in clock.items()}) + "\n")
        with open(out / METRICS, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in new_rows)
        _write_json(state_path, {"completed_task": k, "strategy": strategy, "seed": seed})
        unet.train()

    summary = {"seed": seed, "strategy": strategy, "summary": True, "afid": afid(fid), "forgetting": forgetting(fid)}
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(summary) + "\n")
    return SeedResult(seed, strategy, fid, acc, summary["afid"], summary["forgetting"], time.time() - t_start, completed)


def total_steps(config: ContinualConfig, seeds: list[int]) -> int:
    return len(seeds) * config.tasks * config.steps_per_task


def run_continual(
    config: ContinualConfig,
    out: str | Path,
    seeds: list[int] = (0,),
    resume: bool = False,
    progress: Progress | None = None,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    step_offset: int = 0,
) -> ContinualResult:
    """Run one strategy for several seeds; write ``out/metrics.jsonl`` and ``out/summary.json``."""
    config.validate()
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds must be distinct integers, got {seeds}")
    out = Path(out)
    t0 = time.time()
    if (out / MANIFEST).exists():
        if not resume:
            raise UsageError(f"output directory {out} already holds a run; pass --resume to continue it or choose another --out")
        _check_manifest(out / MANIFEST, config)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / MANIFEST, _manifest(config, seeds=seeds))
    features = FeatureNet(config, cache_dir)
    results = []
    for n, seed in enumerate(seeds):
        results.append(run_seed(config, seed, out / f"seed-{seed}", features, resume=resume, progress=progress,
                                step_offset=step_offset + n * config.tasks * config.steps_per_task, device=device))
    rows = [r for s in seeds for r in _read_jsonl(out / f"seed-{s}" / METRICS)]
    _write_jsonl(out / METRICS, rows)
    result = summarize(out, config.strategy, results, features, time.time() - t0)
    _write_json(out / SUMMARY, summary_dict(result))
    return result


def summarize(out: Path, strategy: str, results: list[SeedResult], features: FeatureNet | None, seconds: float) -> ContinualResult:
    res = ContinualResult(out=out, strategy=strategy, seeds=results, seconds=seconds)
    keys = results[0].afid.keys()
    res.afid = {k: mean_and_stderr([r.afid[k] for r in results]) for k in keys}
    res.forgetting = mean_and_stderr([r.forgetting for r in results])
    last = max(results[0].accuracy)
    res.final_accuracy = mean_and_stderr([sum(r.accuracy[last].values()) / len(r.accuracy[last]) for r in results])
    if features is not None:
        res.feature_net, res.feature_net_accuracy = features.name, features.classifier_accuracy
    return res


def summary_dict(res: ContinualResult) -> dict:
    def num(x: float) -> float | None:  # JSON has no NaN: a single seed's standard error is null
        return None if x != x else x

    def ms(v):
        return {"mean": num(v[0]), "stderr": num(v[1])}

    return {
        "strategy": res.strategy,
        "seeds": [r.seed for r in res.seeds],
        "afid": {k: ms(v) for k, v in res.afid.items()},
        "forgetting": ms(res.forgetting),
        "final_accuracy": ms(res.final_accuracy),
        "feature_net": res.feature_net,
        "feature_net_test_accuracy": num(res.feature_net_accuracy),
        "per_seed": [{"seed": r.seed, "afid": r.afid, "forgetting": r.forgetting, "seconds": r.seconds} for r in res.seeds],
        "fid_matrix": {str(r.seed): {str(k): {str(i): v for i, v in row.items()} for k, row in r.fid.items()} for r in res.seeds},
        "accuracy_matrix": {str(r.seed): {str(k): {str(i): v for i, v in row.items()} for k, row in r.accuracy.items()} for r in res.seeds},
        "seconds": res.seconds,
    }


def run_compare(
    config: ContinualConfig,
    out: str | Path,
    seeds: list[int] = (0,),
    resume: bool = False,
    progress: Progress | None = None,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    strategies: list[str] | None = None,
) -> list[ContinualResult]:
    """The paper's comparison: one directory per strategy under ``out``; ``out/compare.json``."""
    names = strategies or list(COMPARE_STRATEGIES)
    bad = [n for n in names if n not in COMPARE_STRATEGIES]
    if bad:
        raise UsageError(f"unknown strategy {bad[0]!r}; expected one of {', '.join(COMPARE_STRATEGIES)}")
    configs = []
    for name in names:
        cfg = ContinualConfig(**{**asdict(config), "fisher": "none", "gd": False, "non_continual": False, "replay": "auto"})
        for key, value in COMPARE_STRATEGIES[name].items():
            setattr(cfg, key, value)
        cfg.validate()
        configs.append((name, cfg))
    out = Path(out)
    results = []
    per = total_steps(config, list(seeds))
    for n, (name, cfg) in enumerate(configs):
        res = run_continual(cfg, out / name, seeds, resume=resume, progress=progress, device=device,
                            cache_dir=cache_dir, step_offset=n * per)
        res.strategy = name
        results.append(res)
        _write_json(out / "compare.json", {"seeds": list(seeds), "strategies": [summary_dict(r) for r in results]})
    return results

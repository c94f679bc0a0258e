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
    metrics.jsonl                 all seeds' rows + one summary row per seed (docs/design.md §9)
    summary.json                  AFID@k and forgetting, mean and standard error over seeds
    seed-{s}/manifest.json        config + seed (a resume refuses a different config)
    seed-{s}/state.json           last completed task, tasks completed of tasks, complete (docs/design.md §9)
    seed-{s}/metrics.jsonl        that seed's rows
    seed-{s}/train_log.jsonl      {"task", "step", "loss", "denoise", "ewc", "distill"}
    seed-{s}/samples.h5           after_task{k}/images (n, C, H, W) in [-1, 1], labels (n,): the FID samples
    seed-{s}/timings.jsonl        seconds per task: replay pool, training, Fisher + checkpoint, evaluation
    seed-{s}/task-{k}/            checkpoint after task k (docs/design.md §8)
    seed-{s}/fisher-task{k}.h5    Fisher of task k (when --fisher is not none)

Resume: every random draw of task k comes from generators seeded by (seed, k) and the optimiser
restarts at each task, so rerunning from the last completed task's checkpoint reproduces the
uninterrupted run exactly (on the same device and thread count). A resume checks ``state.json``,
drops log rows of later tasks and a partial last line, and refuses a task Fisher file whose
checkpoint checksum or parameter layout is not that of its task checkpoint (one line naming the file).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from geomprobe.checkpoints import checkpoint_checksum, load_checkpoint
from geomprobe.continual.config import (  # noqa: F401 - re-exported: the runner's public names
    COMPARE_STRATEGIES,
    FEATURE_CHOICES,
    FISHER_CHOICES,
    REPLAY_CHOICES,
    ContinualConfig,
    check_manifest,
    config_from_dict,
    make_manifest,
    penalty_weight,
)
from geomprobe.continual.metrics import afid, forgetting, mean_and_stderr
from geomprobe.continual.strategies import PenaltyTerm, flat_parameters, make_penalty, parameter_shapes
from geomprobe.continual.tasks import INTRINSIC_FORGETTING, Progress, SeedRun, run_task
from geomprobe.data import load_dataset, task_splits
from geomprobe.distributed import (
    barrier,
    close_dist,
    dist_info,
    group_rank,
    group_world,
    init_dist,
    local_device,
    on_every_rank,
)
from geomprobe.errors import DataError, UsageError
from geomprobe.io import (
    DEFAULT_MAX_MEMORY,
    MANIFEST,
    METRICS,
    SAMPLES,
    STATE,
    SUMMARY,
    TIMINGS,
    TRAIN_LOG,
    read_jsonl,
    write_json,
    write_jsonl,
)
from geomprobe.lock import directory_lock, print_note
from geomprobe.models import build_scheduler, build_unet, resolve_device
from geomprobe.timesteps import parse_timesteps


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
    """One strategy's run over several seeds: per-seed results and (mean, stderr) over seeds."""

    out: Path
    strategy: str
    seeds: list[SeedResult]
    afid: dict[str, tuple[float, float]] = field(default_factory=dict)  # mean, stderr
    forgetting: tuple[float, float] = (float("nan"), float("nan"))
    final_accuracy: tuple[float, float] = (float("nan"), float("nan"))
    feature_net: str = ""
    feature_net_accuracy: float = float("nan")
    seconds: float = 0.0


class FeatureNet:
    """The FID feature network and the accuracy classifier (None with Inception features)."""

    def __init__(self, config: ContinualConfig, cache_dir: str | Path | None = None):
        from geomprobe.continual.classifier import ClassifierConfig, FeatureExtractor, load_or_train_classifier

        ref = load_dataset(config.dataset, "train", config.image_size, config.data_root)
        cc = ClassifierConfig(
            channels=ref.channels, image_size=ref.image_size, num_classes=ref.num_classes, steps=config.classifier_steps
        )
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


def _refuse_existing_run(out: Path, config: ContinualConfig, resume: bool) -> None:
    """A directory with a manifest is only reused by ``--resume`` with the same config."""
    if (out / MANIFEST).exists():
        if not resume:
            raise UsageError(
                f"output directory {out} already holds a run; pass --resume to continue it or choose another --out"
            )
        check_manifest(out / MANIFEST, config)


def _prepare_seed_dir(config: ContinualConfig, seed: int, out: Path, resume: bool) -> int:
    """Create or check ``seed-{s}``; drop records written after the last completed task (returned, -1: none).

    Raises:
        DataError: one line naming the file: a garbage ``state.json``, a log line before the last that is
            not JSON (a partial last line is dropped), a completed task whose checkpoint is missing.
    """
    out.mkdir(parents=True, exist_ok=True)
    _refuse_existing_run(out, config, resume)
    completed = -1
    if not (out / MANIFEST).exists():
        write_json(out / MANIFEST, make_manifest(config, seed=seed))
    elif (out / STATE).exists():
        completed = read_state(out / STATE, config, seed)
    # an interrupted training or evaluation leaves rows of an uncompleted task: drop them
    for name, key in (
        (METRICS, "after_task"),
        (TRAIN_LOG, "task"),
        (TIMINGS, "task"),
        (INTRINSIC_FORGETTING, "after_task"),
    ):
        rows = read_jsonl(out / name, drop_partial_last=True)
        if rows or (out / name).exists():
            write_jsonl(
                out / name, [r for r in rows if not r.get("summary") and _task_of(r, key, out / name) <= completed]
            )
    _drop_samples_after(out / SAMPLES, completed)
    return completed


def _completed_task(out: Path, config: ContinualConfig, seed: int) -> int:
    """The last completed task of ``seed-{s}`` (:func:`read_state`; -1 without a ``state.json``)."""
    return read_state(out / STATE, config, seed) if (out / STATE).exists() else -1


def _task_of(row: dict, key: str, path: Path) -> int:
    """``row[key]`` (a task index) of a log row; DataError naming ``path`` when it is absent or not an int."""
    value = row.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataError(f"{path}: a row without an integer {key!r} ({json.dumps(row)[:80]})")
    return value


def read_state(path: Path, config: ContinualConfig, seed: int) -> int:
    """The last completed task recorded in a seed's ``state.json`` (docs/design.md §9), checked.

    Args:
        path: ``seed-{s}/state.json``.
        config: the run's config (its ``tasks`` and ``strategy``).
        seed: the seed the directory belongs to.

    Returns:
        ``completed_task``, in -1..tasks-1, whose checkpoint ``task-{k}/`` exists.

    Raises:
        DataError: not a JSON object, fields of the wrong type or out of range, another seed or strategy, or
            the completed task's checkpoint is missing; the message names the file.
    """
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{path} is not valid JSON ({str(exc).splitlines()[0]}); delete the seed directory to restart it"
        ) from None
    completed = state.get("completed_task") if isinstance(state, dict) else None
    if not isinstance(completed, int) or isinstance(completed, bool) or not -1 <= completed < config.tasks:
        raise DataError(f"{path} is malformed: completed_task={completed!r} (expected -1..{config.tasks - 1})")
    if state.get("seed", seed) != seed or state.get("strategy", config.strategy) != config.strategy:
        raise DataError(
            f"{path} belongs to seed {state.get('seed')!r}, strategy {state.get('strategy')!r}, not this run"
        )
    if completed >= 0 and not (path.parent / f"task-{completed}" / "unet").is_dir():
        raise DataError(f"{path} says task {completed} is complete but {path.parent / f'task-{completed}'} is missing")
    return completed


def _drop_samples_after(path: Path, completed: int) -> None:
    """Remove the sample groups of tasks after ``completed`` from ``samples.h5`` (a copy renamed onto it)."""
    from geomprobe.continual.tasks import edit_samples

    def drop(f) -> None:
        for key in list(f.keys()):
            if key.startswith("after_task") and int(key[len("after_task") :]) > completed:
                del f[key]

    if path.exists():
        edit_samples(path, drop)


def _rebuild_penalty(
    config: ContinualConfig, out: Path, names: list[str], pixels: int, completed: int, dev: torch.device
) -> PenaltyTerm | None:
    """The EWC term of tasks 0..completed, from their Fisher files and checkpoints (None without --fisher)."""
    from geomprobe.fisher import load_fisher

    if config.fisher == "none":
        return None
    penalty = make_penalty(config.fisher, names, penalty_weight(config.lam, pixels, config.lambda_units))
    for j in range(completed + 1):
        unet = load_checkpoint(out / f"task-{j}").unet
        # the file must be F_j at theta*_j of this run: estimated at task-{j}'s weights, over this layout
        fisher = load_fisher(
            out / f"fisher-task{j}.h5", checkpoint_checksum(out / f"task-{j}"), names, parameter_shapes(unet, names)
        )
        penalty.add(fisher, flat_parameters(unet, names).detach())
    return penalty.to(dev)


def _start_seed(
    config: ContinualConfig, seed: int, out: Path, features: FeatureNet, completed: int, device: str, max_memory: int
) -> SeedRun:
    """The model (fresh or m_completed), data, timesteps and penalty of one seed."""
    from geomprobe.probe import select_parameters

    dev = local_device(resolve_device(device), group_world())
    train = load_dataset(config.dataset, "train", config.image_size, config.data_root)
    test = load_dataset(config.dataset, "test", config.image_size, config.data_root)
    tasks = task_splits(train.num_classes, config.tasks)
    scheduler = build_scheduler()
    spec = parse_timesteps(config.t_range, scheduler.config.num_train_timesteps, scheduler.alphas_cumprod.numpy())
    if completed >= 0:
        unet = load_checkpoint(out / f"task-{completed}", dev).unet
    else:
        torch.manual_seed(seed)
        unet = build_unet(config.model, train.image_size, train.channels, train.num_classes).to(dev)
    names = select_parameters(unet)
    penalty = _rebuild_penalty(config, out, names, train.channels * train.image_size**2, completed, dev)
    references = [test.subset(c).batch(torch.arange(len(test.subset(c))))[0] for c in tasks]
    return SeedRun(
        config=config,
        seed=seed,
        out=out,
        features=features,
        train=train,
        tasks=tasks,
        references=references,
        scheduler=scheduler,
        spec=spec,
        names=names,
        unet=unet,
        penalty=penalty,
        device=dev,
        max_memory=max_memory,
        rank=group_rank(),
        world=group_world(),
    )


def run_seed(
    config: ContinualConfig,
    seed: int,
    out: Path,
    features: FeatureNet,
    resume: bool = False,
    progress: Progress | None = None,
    step_offset: int = 0,
    device: str = "cpu",
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> SeedResult:
    """One seed of one strategy in directory ``out`` (``seed-{s}``); see the module docstring."""
    t_start = time.time()
    rank, world = group_rank(), group_world()
    prepare = (lambda: _prepare_seed_dir(config, seed, out, resume)) if rank == 0 else (lambda: None)
    completed = on_every_rank(world, prepare, f"rank 0 could not prepare {out}")
    if rank != 0:  # rank 0 has prepared the directory (on_every_rank waited for it)
        completed = _completed_task(out, config, seed)
    run = _start_seed(config, seed, out, features, completed, device, max_memory)
    run.progress, run.step_offset = progress, step_offset
    for r in read_jsonl(out / METRICS):
        run.fid.setdefault(r["after_task"], {})[r["task"]] = r["fid"]
        run.accuracy.setdefault(r["after_task"], {})[r["task"]] = r["accuracy"]
    for k in range(completed + 1, len(run.tasks)):
        run_task(run, k)
    summary = {
        "seed": seed,
        "strategy": config.strategy,
        "summary": True,
        "afid": afid(run.fid),
        "forgetting": forgetting(run.fid),
    }
    if rank == 0:
        with open(out / METRICS, "a") as f:
            f.write(json.dumps(summary) + "\n")
    return SeedResult(
        seed,
        config.strategy,
        run.fid,
        run.accuracy,
        summary["afid"],
        summary["forgetting"],
        time.time() - t_start,
        completed,
    )


def total_steps(config: ContinualConfig, seeds: list[int]) -> int:
    """Training steps of a whole run: seeds x tasks x steps per task."""
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
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> ContinualResult:
    """Run one strategy for several seeds; write ``out/metrics.jsonl`` and ``out/summary.json``.

    ``max_memory``: bytes for the Fisher estimate's per-sample gradients (default 2 GiB);
    it changes at most the float rounding of the Fisher estimate, so it is not part of the config a resume compares.
    """
    config.validate()
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds must be distinct integers, got {seeds}")
    rank, world = dist_info()
    check_world(config, world)
    started = init_dist(world, resolve_device(device))
    try:
        with directory_lock(out, rank == 0, print_note, world):  # one writer per run directory
            return _run_seeds(config, Path(out), seeds, resume, progress, device, cache_dir, step_offset, max_memory)
    finally:
        if started:
            close_dist()


def check_world(config: ContinualConfig, world: int, every_strategy: bool = False) -> None:
    """Under torchrun the global batches are split over the ranks: each must divide evenly.

    ``every_strategy`` (``--compare``): also ``--replay-batch``, which some of the strategies use.
    """
    batches = {"--batch-size": config.batch_size}
    if config.replay_source != "none" or every_strategy:
        batches["--replay-batch"] = config.replay_batch
    for flag, size in batches.items():
        if size % world:
            raise UsageError(f"{flag} {size} is not divisible by the {world} torchrun processes")


def _run_seeds(config, out: Path, seeds, resume, progress, device, cache_dir, step_offset, max_memory):
    """:func:`run_continual` once the process group exists: rank 0 writes, every rank computes."""
    rank, world = group_rank(), group_world()
    t0 = time.time()

    def prepare_out():
        _refuse_existing_run(out, config, resume)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / MANIFEST, make_manifest(config, seeds=seeds))
        return FeatureNet(config, cache_dir)  # trains and caches the classifier once, before the other ranks

    features = on_every_rank(world, prepare_out if rank == 0 else lambda: None, f"rank 0 could not use --out {out}")
    if rank != 0:
        features = FeatureNet(config, cache_dir)
    results = []
    for n, seed in enumerate(seeds):
        results.append(
            run_seed(
                config,
                seed,
                out / f"seed-{seed}",
                features,
                resume=resume,
                progress=progress,
                step_offset=step_offset + n * config.tasks * config.steps_per_task,
                device=device,
                max_memory=max_memory,
            )
        )
    result = summarize(out, config.strategy, results, features, time.time() - t0)
    if rank == 0:
        write_jsonl(out / METRICS, [r for s in seeds for r in read_jsonl(out / f"seed-{s}" / METRICS)])
        write_json(out / SUMMARY, summary_dict(result))
    barrier(world)
    return result


def summarize(
    out: Path, strategy: str, results: list[SeedResult], features: FeatureNet | None, seconds: float
) -> ContinualResult:
    """Aggregate per-seed results into (mean, stderr) of AFID, forgetting and final mean task accuracy."""
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
    """The JSON-ready ``summary.json`` content of ``res`` (NaN written as null)."""

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
        "per_seed": [
            {"seed": r.seed, "afid": r.afid, "forgetting": r.forgetting, "seconds": r.seconds} for r in res.seeds
        ],
        "fid_matrix": {
            str(r.seed): {str(k): {str(i): v for i, v in row.items()} for k, row in r.fid.items()} for r in res.seeds
        },
        "accuracy_matrix": {
            str(r.seed): {str(k): {str(i): v for i, v in row.items()} for k, row in r.accuracy.items()}
            for r in res.seeds
        },
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
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> list[ContinualResult]:
    """The paper's comparison: one directory per strategy under ``out``; ``out/compare.json``."""
    names = strategies or list(COMPARE_STRATEGIES)
    bad = [n for n in names if n not in COMPARE_STRATEGIES]
    if bad:
        raise UsageError(f"unknown strategy {bad[0]!r}; expected one of {', '.join(COMPARE_STRATEGIES)}")
    configs = []
    for name in names:
        cfg = ContinualConfig(
            **{**asdict(config), "fisher": "none", "gd": False, "non_continual": False, "replay": "auto"}
        )
        for key, value in COMPARE_STRATEGIES[name].items():
            setattr(cfg, key, value)
        cfg.validate()
        configs.append((name, cfg))
    out = Path(out)
    results = []
    per = total_steps(config, list(seeds))
    world = dist_info()[1]
    for _, cfg in configs:
        check_world(cfg, world)
    started = init_dist(world, resolve_device(device))  # one process group for all strategies
    try:
        _compare_runs(configs, out, seeds, resume, progress, device, cache_dir, per, max_memory, results)
    finally:
        if started:
            close_dist()
    return results


def _compare_runs(configs, out: Path, seeds, resume, progress, device, cache_dir, per, max_memory, results) -> None:
    """Each strategy of :func:`run_compare` in turn; ``compare.json`` rewritten after each (rank 0)."""
    for n, (name, cfg) in enumerate(configs):
        res = run_continual(
            cfg,
            out / name,
            seeds,
            resume=resume,
            progress=progress,
            device=device,
            cache_dir=cache_dir,
            step_offset=n * per,
            max_memory=max_memory,
        )
        res.strategy = name
        results.append(res)
        if group_rank() == 0:
            write_json(out / "compare.json", {"seeds": list(seeds), "strategies": [summary_dict(r) for r in results]})

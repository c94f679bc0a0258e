"""Cost of the gradient store's read verification (issue 14): `spectrum --grads` with and without it.

    python bench/store_verify.py [--samples 512] [--t 100,500,900] [--rounds 3] [--store DIR]

Builds (or reuses) a store of an untrained small1 UNet at 8 px (P = 40,673) and runs what
``geomprobe spectrum --grads`` runs (``analyze_store`` + ``write_spectrum``, with the model's
scaled-identity MSE) on ``GradientStore(path, verify=False)`` and on ``GradientStore(path)``
(verify=True: shard headers checked at open, each shard's SHA-256 before its first read), in
interleaved rounds in one process, one thread; prints the median of each and the ratio, and the
time of the checksum pass alone (``GradientStore.verify``). The page cache is warm for both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from geomprobe.analysis import analyze_store, write_spectrum
from geomprobe.checkpoints import ModelInfo, save_checkpoint
from geomprobe.models import build_scheduler, build_unet
from geomprobe.probe import ExtractConfig, GradientStore, extract_gradients


def build_store(root: Path, samples: int, t_range: str) -> Path:
    """An untrained small1 (8 px, 1 channel, 10 classes) and its store at ``root``; reused when present."""
    store = root / "grads"
    if (store / "manifest.json").exists():
        return store
    torch.manual_seed(0)
    info = ModelInfo(preset="small1", dataset="digits", image_size=8, channels=1, num_classes=10, seed=0, step=0)
    save_checkpoint(root / "ckpt", build_unet("small1", 8, 1, 10), build_scheduler(), info)
    config = ExtractConfig(ckpt=str(root / "ckpt"), t_range=t_range, samples=samples, shard_rows=128)
    extract_gradients(config, store, device="cpu")
    return store


def spectrum_seconds(store: Path, out: Path, verify: bool) -> float:
    """Wall time of `spectrum --grads` (open, analyse, write) on ``store``."""
    start = time.perf_counter()
    result = analyze_store(GradientStore(store, verify=verify), top_k=5, with_model=True, device="cpu")
    write_spectrum(result, None, out)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--t", default="100,500,900")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", type=Path, default=None, help="directory for the checkpoint and store (reused)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.store or Path(tempfile.mkdtemp(prefix="gp_verify_"))
    store = build_store(root, args.samples, args.t)
    size = sum(p.stat().st_size for p in store.glob("shard-*.h5"))
    spectrum_seconds(store, root / "spectrum", True)  # warm the page cache and the imports
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for verify in (False, True):
            times[verify].append(spectrum_seconds(store, root / "spectrum", verify))
    start = time.perf_counter()
    GradientStore(store).verify()
    hash_pass = time.perf_counter() - start
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"store {store}: {size / 2**20:.1f} MiB in {len(list(store.glob('shard-*.h5')))} shards, load {os.getloadavg()}"
    )
    print("| spectrum --grads | seconds (median) | ratio |")
    print("|---|---:|---:|")
    print(f"| without verification | {off:.2f} | 1.00 |")
    print(f"| with verification | {on:.2f} | {on / off:.3f} |")
    print(f"| checksum pass alone (`GradientStore.verify`) | {hash_pass:.2f} | {hash_pass / off:.3f} |")


if __name__ == "__main__":
    main()

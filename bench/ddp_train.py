"""Samples/s of ``geomprobe train`` with 1 and with 2 gloo processes under torchrun (one thread each).

    python bench/ddp_train.py [--model small3] [--image-size 16] [--batch-size 128] [--steps 30] [--rounds 2]

Each run is ``geomprobe.training.train`` on digits with the same global batch and seed: 1 process
as a plain ``python`` process, K = 2 as ``torchrun --nproc-per-node 2`` (DistributedDataParallel,
gloo, each rank training on half of every batch). The time is the training loop's
(``TrainResult.seconds``: steps and the final checkpoint, not the start-up); samples/s = steps ×
batch / seconds. Runs alternate (1, 2, 1, 2, ...) so that load from other processes hits both
alike; the best round is reported, with the 1-minute load average read before each run.
No result is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One rank of a run (under torchrun or alone): train, and rank 0 writes the result as JSON."""
    from geomprobe.distributed import dist_info
    from geomprobe.training import TrainConfig, train

    config = TrainConfig(
        model=args.model,
        image_size=args.image_size,
        steps=args.steps,
        batch_size=args.batch_size,
        checkpoint_every=10**9,
        log_every=10**9,
        device="cpu",
    )
    result = train(config, Path(args.out) / "run")
    if dist_info()[0] == 0:
        Path(args.out, "result.json").write_text(json.dumps({"seconds": result.seconds}))


def run(processes: int, args: argparse.Namespace, port: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as out:
        own = [__file__, "--worker", "--out", out, *_shared(args)]
        if processes == 1:
            cmd = [sys.executable, *own]
        else:
            torchrun = Path(sys.executable).with_name("torchrun")
            cmd = [str(torchrun), "--nproc-per-node", str(processes), "--master-port", str(port), *own]
        load = os.getloadavg()[0]
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        seconds = json.loads(Path(out, "result.json").read_text())["seconds"]
    return {"seconds": seconds, "samples_per_s": args.steps * args.batch_size / seconds, "load": load}


def _shared(args: argparse.Namespace) -> list[str]:
    return [
        f"--model={args.model}",
        f"--image-size={args.image_size}",
        f"--batch-size={args.batch_size}",
        f"--steps={args.steps}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small3")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    best: dict[int, dict] = {}
    for r in range(args.rounds):
        for k in (1, 2):
            res = run(k, args, 29500 + (os.getpid() + r) % 1000)
            print(f"round {r + 1}, {k} process(es): {res}", file=sys.stderr)
            if k not in best or res["seconds"] < best[k]["seconds"]:
                best[k] = res
    print(
        f"{args.model}, {args.image_size} px, global batch {args.batch_size}, {args.steps} steps, best of {args.rounds}"
    )
    print("| processes | s/step | samples/s | speed-up | load average (1 min) |")
    print("|---:|---:|---:|---:|---:|")
    for k, res in best.items():
        speedup = res["samples_per_s"] / best[1]["samples_per_s"]
        print(
            f"| {k} | {res['seconds'] / args.steps:.3f} | {res['samples_per_s']:.0f} | {speedup:.2f} | {res['load']:.1f} |"
        )


if __name__ == "__main__":
    main()

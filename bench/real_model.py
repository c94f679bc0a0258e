"""geomprobe's own routes on a real-size diffusion UNet: the DDPM CIFAR-10 architecture (issue 11).

Builds the DDPM CIFAR-10 UNet (diffusers ``UNet2DModel``, 35.7M parameters, unconditional,
attention at 16x16) with random weights as a diffusers pipeline directory (``unet/``,
``scheduler/``, ``model_index.json``), loads it with ``geomprobe.checkpoints.load_model`` and times,
each route in a FRESH subprocess (so ``ru_maxrss`` is that route's peak):

- ``fwdbwd``      one batched forward + backward of the mean loss over the rows (the reference)
- ``per_sample``  per-sample gradients of all parameters (what ``grads`` stores), B rows, one reused buffer
- ``mu_cstar``    ``ImplicitFisher.to_rank1()``: mu by one backward, all mu^T g_i (layerwise route)
- ``fv``          one Fisher-vector product ``ImplicitFisher.mv(v)``
- ``lanczos``     ``ImplicitFisher.to_low_rank(k)`` (Lanczos; reports the number of products)
- ``blockgram``   the exact Gram statistics of the rows over parameter blocks (``spectrum --ckpt``)

Ratios are of process CPU time (single-threaded: CPU time = compute time, and it stays stable on a
loaded machine where wall time does not). Usage::

    OMP_NUM_THREADS=1 python bench/real_model.py --rows 8 --routes fwdbwd,per_sample,mu_cstar,fv
    OMP_NUM_THREADS=1 python bench/real_model.py --rows 64 --routes fwdbwd,blockgram --max-memory 8G
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

CIFAR_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)


def write_pipeline(root: str, seed: int = 0) -> str:
    """A diffusers pipeline directory holding a random-weight DDPM CIFAR-10 UNet."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    DDPMPipeline(unet=UNet2DModel(**CIFAR_CONFIG), scheduler=DDPMScheduler()).save_pretrained(root)
    return root


def probe_batches(unet, rows: int, batch: int = 8):
    """``rows`` probe samples in batches of ``batch``, t spread over 0..999 (seeded)."""
    from geomprobe.probe import ProbeBatch

    g = torch.Generator().manual_seed(1)
    c, s = unet.config.in_channels, unet.config.sample_size
    out = []
    for a in range(0, rows, batch):
        b = min(batch, rows - a)
        out.append(
            ProbeBatch(
                torch.randn(b, c, s, s, generator=g),
                torch.randn(b, c, s, s, generator=g),
                torch.randint(0, 1000, (b,), generator=g),
                torch.zeros(b, dtype=torch.long),
            )
        )
    return out


def route_fn(name: str, unet, ac, batches, max_memory: int, k: int):
    """A zero-argument callable for route ``name``; returns extra facts to report."""
    from geomprobe.diffusion import per_sample_loss
    from geomprobe.fisher import ImplicitFisher
    from geomprobe.fisher.blockgram import block_gram_statistics, model_gradients
    from geomprobe.probe import per_sample_grads, per_sample_losses, select_parameters  # noqa: F401

    names = select_parameters(unet)
    fisher = ImplicitFisher.from_model(unet, names, batches, ac, max_memory=max_memory)
    if name == "fwdbwd":

        def fwdbwd():
            for b in batches:
                unet.zero_grad(set_to_none=True)
                per_sample_loss(unet, b.x0, b.noise, b.t, b.y, ac).mean().backward()

        return fwdbwd
    if name == "per_sample":  # one (B, P) buffer reused across batches, as the grads command does
        out = torch.empty(len(batches[0]), fisher.P)

        def per_sample():
            for b in batches:
                buf = out if len(b) == out.shape[0] else None
                per_sample_grads(unet, names, b.x0, b.noise, b.t, b.y, ac, max_memory=max_memory, out=buf)

        return per_sample
    if name == "mu_cstar":  # a fresh object per call: mu is cached on the object
        return lambda: {
            "c_star": ImplicitFisher.from_model(unet, names, batches, ac, max_memory=max_memory).to_rank1().c_star
        }
    if name == "fv":
        v = torch.randn(fisher.P, generator=torch.Generator().manual_seed(2))
        return lambda: fisher.mv(v)
    if name == "lanczos":
        return lambda: {"products": fisher.to_low_rank(k, tol=1e-3).info.extra["fisher_vector_products"]}
    if name == "blockgram":
        sizes = [p.numel() for _, p in unet.named_parameters()]

        def blockgram():
            passes = []
            block_gram_statistics(
                model_gradients(unet, batches, ac, max_memory),
                names,
                sizes,
                fisher.n,
                max_memory,
                progress=lambda d, tot: passes.append(tot),
            )
            return {"blocks": passes[-1]}

        return blockgram
    raise SystemExit(f"unknown route {name}")


CHEAP = ("fwdbwd", "per_sample", "mu_cstar", "fv")  # warmed up by one call of their own


def run_one(root: str, route: str, rows: int, max_memory: int, k: int, malloc: str) -> dict:
    """Child process: one call of ``route`` (after loading), its CPU and wall time and peak RSS."""
    from geomprobe.allocator import retain_freed_memory
    from geomprobe.checkpoints import load_model

    torch.set_num_threads(1)
    if malloc == "retain":
        retain_freed_memory()  # as the geomprobe command runs (geomprobe/allocator.py)
    ckpt = load_model(root)
    unet, ac = ckpt.unet, ckpt.scheduler.alphas_cumprod
    fn = route_fn(route, unet, ac, probe_batches(unet, rows), max_memory, k)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    warm = fn if route in CHEAP else route_fn("fwdbwd", unet, ac, probe_batches(unet, min(rows, 8)), max_memory, k)
    warm()  # first calls build kernels and allocator pools: timed runs exclude them
    start, cstart = time.perf_counter(), time.process_time()
    extra = fn()
    wall, cpu = time.perf_counter() - start, time.process_time() - cstart
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(
        route=route,
        rows=rows,
        wall=wall,
        cpu=cpu,
        rss_mib=rss / 1024,
        rss_model_mib=rss0 / 1024,
        extra=extra if isinstance(extra, dict) else {},
    )


def main(argv=None) -> None:
    """Parse options, build the pipeline once, run each route in its own process, print the table."""
    from geomprobe.io import parse_memory

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--routes", default="fwdbwd,per_sample,mu_cstar,fv")
    ap.add_argument("--max-memory", default="8G")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument(
        "--malloc",
        choices=("retain", "default"),
        default="retain",
        help="retain: glibc keeps freed memory, as the geomprobe command sets it (geomprobe/allocator.py)",
    )
    ap.add_argument("--child", nargs=2, metavar=("ROOT", "ROUTE"))
    args = ap.parse_args(argv)
    budget = parse_memory(args.max_memory)
    if args.child:
        print(json.dumps(run_one(args.child[0], args.child[1], args.rows, budget, args.k, args.malloc)))
        return
    with tempfile.TemporaryDirectory() as root:
        write_pipeline(root)
        results = []
        for route in args.routes.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                root,
                route,
                "--rows",
                str(args.rows),
                "--max-memory",
                args.max_memory,
                "--k",
                str(args.k),
                "--malloc",
                args.malloc,
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{route}: failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    print_table(results, args)


def print_table(results: list[dict], args) -> None:
    """Markdown table: CPU seconds, ratio to fwdbwd, wall seconds, peak RSS; threads and load."""
    ref = next((r["cpu"] for r in results if r["route"] == "fwdbwd"), None)
    print(
        f"\nDDPM CIFAR-10 UNet, {args.rows} rows at 32 px, threads=1, --max-memory {args.max_memory}, "
        f"malloc {args.malloc}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print("| route | CPU s | / fwd+bwd | wall s | peak RSS MiB | notes |\n|---|---:|---:|---:|---:|---|")
    for r in results:
        ratio = f"{r['cpu'] / ref:.2f}" if ref else "–"
        notes = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["extra"].items())
        print(f"| {r['route']} | {r['cpu']:.2f} | {ratio} | {r['wall']:.1f} | {r['rss_mib']:.0f} | {notes} |")


if __name__ == "__main__":
    main()

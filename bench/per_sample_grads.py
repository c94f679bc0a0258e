"""Per-sample gradients: our torch.func engine against a plain batched forward+backward, an
explicit loop of single-sample backward passes and Opacus' GradSampleModule (when installed).

    python bench/per_sample_grads.py [--batch 128] [--repeats 5] [--loop-samples 8] [--threads N] [--malloc retain|default]

"ours" is ``per_sample_grads`` with the default (layerwise) engine writing into a (B, P) buffer
reused from call to call, as ``geomprobe grads`` does; "fresh" is the ratio of the same call
returning a freshly allocated (B, P) tensor (its page faults included); "vmap" is the function with
``engine="vmap"`` (``torch.func.vmap(grad)`` over ``functional_call``).

Prints one table: seconds per batch of each method and its ratio to the batched forward+backward
(the reference: the cost of the mean gradient, which per-sample gradients cannot beat). The loop is
timed on ``--loop-samples`` samples and extrapolated to the batch. No result is asserted.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from geomprobe.allocator import retain_freed_memory
from geomprobe.diffusion import per_sample_loss
from geomprobe.models import build_scheduler, build_unet, count_parameters
from geomprobe.probe import chunk_size_for, per_sample_grads, select_parameters


def best_times(fns: dict, repeats: int) -> dict:
    """Best-of-``repeats`` seconds of each callable, timed in interleaved rounds (A B C, A B C, ...)
    so that load from other processes on a shared machine hits every method alike."""
    for fn in fns.values():
        fn()  # warm-up (vmap tracing, allocator, oneDNN kernels)
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def opacus_runner(unet, x0, noise, t, y, ac):
    """A callable computing per-sample grads with Opacus hooks, or a string saying why not."""
    try:
        from opacus import GradSampleModule
    except ImportError:
        return "not installed"
    try:
        gsm = GradSampleModule(unet, batch_first=True, loss_reduction="sum", strict=False)
    except Exception as exc:  # noqa: BLE001 - report, do not fail the benchmark
        return f"unsupported: {type(exc).__name__}"

    def run():
        gsm.zero_grad(set_to_none=True)
        for p in gsm.parameters():
            p.grad_sample = None
        per_sample_loss(gsm, x0, noise, t, y, ac).sum().backward()
        return [p.grad_sample for p in gsm.parameters()]

    try:
        run()
    except Exception as exc:  # noqa: BLE001
        gsm._close()
        return f"failed: {type(exc).__name__}"
    return run, gsm


def bench(preset: str, size: int, batch: int, repeats: int, loop_samples: int) -> dict:
    torch.manual_seed(0)
    unet = build_unet(preset, size, 1, 10)
    ac = build_scheduler().alphas_cumprod
    names = select_parameters(unet)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, 1, size, size, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)

    def fwd_bwd():
        unet.zero_grad(set_to_none=True)
        per_sample_loss(unet, x0, noise, t, y, ac).mean().backward()

    # as `geomprobe grads` calls it: the chunk size from the memory budget computed once per run,
    # rows written into one (B, P) buffer reused batch after batch
    chunk = chunk_size_for(unet, count_parameters(unet), tuple(x0.shape[1:]))
    rows = torch.empty(batch, count_parameters(unet))

    def ours():
        return per_sample_grads(unet, names, x0, noise, t, y, ac, chunk_size=chunk, out=rows)  # layerwise here

    def ours_fresh():  # the same with a fresh (B, P) result per call (its page faults included)
        return per_sample_grads(unet, names, x0, noise, t, y, ac, chunk_size=chunk)

    def ours_vmap():
        return per_sample_grads(unet, names, x0, noise, t, y, ac, chunk_size=chunk, engine="vmap")

    def loop():
        for i in range(loop_samples):
            unet.zero_grad(set_to_none=True)
            per_sample_loss(unet, x0[i : i + 1], noise[i : i + 1], t[i : i + 1], y[i : i + 1], ac).sum().backward()
            torch.cat([p.grad.reshape(-1) for p in unet.parameters()])

    row = {"preset": preset, "size": size, "P": count_parameters(unet)}
    fns = {"fwd_bwd": fwd_bwd, "ours": ours, "ours_fresh": ours_fresh, "vmap": ours_vmap}
    op = opacus_runner(copy.deepcopy(unet), x0, noise, t, y, ac)  # its hooks must not touch our model
    if isinstance(op, str):
        row["opacus"] = op
    else:
        fns["opacus"] = op[0]
    row.update(best_times(fns, repeats))
    if not isinstance(op, str):
        op[1]._close()
    row["loop"] = best_times({"loop": loop}, 1)["loop"] * batch / loop_samples
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop-samples", type=int, default=8)
    ap.add_argument("--presets", default="small1,small3,base")
    ap.add_argument("--sizes", default="16,32")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument(
        "--malloc",
        choices=["retain", "default"],
        default="retain",
        help="retain: glibc keeps freed memory, as the geomprobe command sets it (geomprobe/allocator.py); "
        "default: glibc's own thresholds",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    retained = args.malloc == "retain" and retain_freed_memory()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, best of {args.repeats}, "
        f"malloc: {'freed memory retained' if retained else 'glibc defaults'}"
    )
    header = (
        f"{'preset':7} {'px':>3} {'P':>8} | {'fwd+bwd s':>9} | {'ours s':>7} {'x':>5} | {'fresh':>5} | {'vmap s':>7} {'x':>5} | "
        f"{'opacus s':>8} {'x':>5} | {'loop s':>7} {'x':>5}"
    )
    print(header)
    print("-" * len(header))
    for preset in args.presets.split(","):
        for size in map(int, args.sizes.split(",")):
            r = bench(preset, size, args.batch, args.repeats, args.loop_samples)
            ref = r["fwd_bwd"]
            op = r["opacus"]
            op_cols = f"{op:8.3f} {op / ref:5.2f}" if isinstance(op, float) else f"{op[:14]:>14}"
            print(
                f"{preset:7} {size:3d} {r['P']:8d} | {ref:9.3f} | {r['ours']:7.3f} {r['ours'] / ref:5.2f} | "
                f"{r['ours_fresh'] / ref:5.2f} | "
                f"{r['vmap']:7.3f} {r['vmap'] / ref:5.2f} | "
                f"{op_cols} | {r['loop']:7.2f} {r['loop'] / ref:5.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

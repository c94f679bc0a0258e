"""Benchmark of the analysis layer (issue 4). Prints reference and ours from the same run, with ratios.

    python bench/spectrum.py [--quick] [--store /tmp/gp_quick_grads] [--ckpt /tmp/gp_quick]

1. Top-5 eigenvalues of F = G^T G / n: the Gram route (K = G G^T / n, then eigh of the n x n K)
   against dense eigh of the P x P F (only where P allows) and against scipy eigsh (Lanczos) on a
   LinearOperator v -> G^T (G v) / n, for n in {256, 1024, 4096}, random G with a dominant
   direction (like the measured gradients).
2. The Gram accumulation's GFLOP/s against one plain torch matmul G @ G.T of the same shape,
   measured in the same run (target: 50% or more).
3. Streaming a store twice as large as the --max-memory budget against reading it with an
   unlimited budget (same numbers; time ratio).
4. mu and c* from the model: by one batched backward + one jvp (O(P) memory) against the
   per-sample route (per_sample_grads -> G -> mu, c*), both against a plain batched
   forward+backward over the same data; time and peak RSS, each route in a fresh subprocess.

The machine is shared (2 cores, other jobs running): timings are noisy; each number is the best
of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from geomprobe.analysis import fisher_spectrum
from geomprobe.fisher import TensorRows, gram_statistics

TOP_K = 5


def best_of(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def synthetic_gradients(n: int, P: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(P, generator=g)
    c = 1.0 + 0.5 * torch.randn(n, 1, generator=g)
    return (c * u + 0.3 * torch.randn(n, P, generator=g)).float()


ACCUMULATION_SECONDS: list[float] = []


def gram_route(G: torch.Tensor) -> np.ndarray:
    start = time.perf_counter()
    stats = gram_statistics(TensorRows(G), max_memory=16 * 2**30)
    ACCUMULATION_SECONDS.append(time.perf_counter() - start)
    return fisher_spectrum(stats, top_k=TOP_K).eigenvalues


def dense_route(G: torch.Tensor) -> np.ndarray:
    F = (G.T @ G / G.shape[0]).double().numpy()
    P = F.shape[0]
    return scipy.linalg.eigh(F, subset_by_index=[P - TOP_K, P - 1], eigvals_only=True)[::-1]


def lanczos_route(G: torch.Tensor) -> np.ndarray:
    n, P = G.shape

    def matvec(x):
        v = torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(-1))
        return (G.T @ (G @ v) / n).double().numpy()

    op = LinearOperator((P, P), matvec=matvec, dtype=np.float64)
    w = eigsh(op, k=TOP_K, which="LA", tol=1e-6, ncv=20, v0=np.ones(P), return_eigenvectors=False)
    return np.sort(w)[::-1]


def section_eigen(sizes, repeat):
    print("\n## 1-2. top-5 eigenvalues: Gram route vs dense eigh vs Lanczos (eigsh on a LinearOperator)")
    print(
        f"{'n':>6} {'P':>7} | {'gram s':>8} {'dense s':>8} {'eigsh s':>8} | {'dense/gram':>10} {'eigsh/gram':>10} | "
        f"{'max rel diff':>12} | {'K GFLOP/s':>9} {'matmul GFLOP/s':>14} {'ratio':>6}"
    )
    rows = []
    for n, P in sizes:
        G = synthetic_gradients(n, P)
        ACCUMULATION_SECONDS.clear()
        t_gram, w_gram = best_of(lambda G=G: gram_route(G), repeat)
        t_acc = min(ACCUMULATION_SECONDS)
        t_dense, w_dense = best_of(lambda G=G: dense_route(G), 1) if P <= 4096 else (float("nan"), None)
        t_lz, w_lz = best_of(lambda G=G: lanczos_route(G), repeat)
        ref = w_dense if w_dense is not None else w_lz
        diff = float(np.max(np.abs(w_gram - ref) / ref))
        # GFLOP/s of the Gram accumulation alone vs a plain matmul of the same shape (2 n^2 P flops)
        t_mm, _ = best_of(lambda G=G: G @ G.T, repeat)
        flops = 2.0 * n * n * P
        row = dict(
            n=n,
            P=P,
            gram=t_gram,
            dense=t_dense,
            eigsh=t_lz,
            diff=diff,
            gflops=flops / t_acc / 1e9,
            matmul_gflops=flops / t_mm / 1e9,
        )
        rows.append(row)
        print(
            f"{n:>6} {P:>7} | {t_gram:>8.3f} {t_dense:>8.3f} {t_lz:>8.3f} | {t_dense / t_gram:>10.1f} {t_lz / t_gram:>10.1f} | "
            f"{diff:>12.1e} | {row['gflops']:>9.1f} {row['matmul_gflops']:>14.1f} {row['gflops'] / row['matmul_gflops']:>6.2f}",
            flush=True,
        )
    return rows


def section_streaming(store_path, repeat):
    print("\n## 3. streaming a store 2x the memory budget vs unlimited budget (same key)")
    from geomprobe.fisher import StoreRows
    from geomprobe.probe import GradientStore

    store = GradientStore(store_path)
    key = store.timesteps[len(store.timesteps) // 2]
    n, P = store.n(key), store.P
    size = n * P * 4
    budget = size // 2
    t_big, s_big = best_of(lambda: fisher_spectrum(gram_statistics(StoreRows(store, key), max_memory=4 * size)), repeat)
    pairs = []
    t_small, s_small = best_of(
        lambda: fisher_spectrum(
            gram_statistics(StoreRows(store, key), max_memory=budget, progress=lambda d, t: pairs.append(t))
        ),
        repeat,
    )
    diff = float(np.max(np.abs(s_small.eigenvalues - s_big.eigenvalues) / s_big.eigenvalues))
    print(
        f"store key t={key}: n={n} P={P} rows {size / 2**20:.0f} MiB; budget {budget / 2**20:.0f} MiB -> {pairs[-1]} block pairs"
    )
    print(
        f"unlimited {t_big:.2f} s | budget {t_small:.2f} s | ratio {t_small / t_big:.2f} | max rel diff of eigenvalues {diff:.1e}"
    )
    return dict(
        n=n,
        P=P,
        mib=size / 2**20,
        budget_mib=budget / 2**20,
        pairs=pairs[-1],
        unlimited=t_big,
        budget=t_small,
        diff=diff,
    )


# ------------------------------------------------------------------ section 4 (subprocesses)


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (VmHWM) so the next reading covers only the timed route (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(route: str, ckpt: str, n: int, t_value: int, repeat: int) -> None:
    """Run one route in this fresh process; print JSON with seconds and peak-RSS growth (MiB)."""
    from geomprobe.checkpoints import load_checkpoint
    from geomprobe.diffusion import per_sample_loss
    from geomprobe.fisher import fisher_from_rows, rank1_from_model
    from geomprobe.probe import ProbeBatch, per_sample_grads, select_parameters

    torch.set_num_threads(2)
    ck = load_checkpoint(ckpt)
    unet, ac = ck.unet, ck.scheduler.alphas_cumprod
    size = ck.info.image_size
    g = torch.Generator().manual_seed(0)
    batch = ProbeBatch(
        torch.randn(n, ck.info.channels, size, size, generator=g).clamp(-1, 1),
        torch.randn(n, ck.info.channels, size, size, generator=g),
        torch.full((n,), t_value),
        torch.randint(0, ck.info.num_classes, (n,), generator=g),
    )
    names = select_parameters(unet)
    # warm up kernels on a small slice so the first-call overhead is not timed
    small = ProbeBatch(batch.x0[:8], batch.noise[:8], batch.t[:8], batch.y[:8])
    rank1_from_model(unet, names, small, ac)
    per_sample_grads(unet, names, small.x0, small.noise, small.t, small.y, ac)
    reset_peak_rss()
    base = rss_mib("VmRSS")

    def run():
        if route == "forward_backward":
            loss = per_sample_loss(unet, batch.x0, batch.noise, batch.t, batch.y, ac).mean()
            torch.autograd.grad(loss, [p for p in unet.parameters()])
            return {}
        if route == "jvp":
            r1 = rank1_from_model(unet, names, batch, ac)
        else:
            G = per_sample_grads(unet, names, batch.x0, batch.noise, batch.t, batch.y, ac)
            r1 = fisher_from_rows(G, "rank1")
            del G
        return {"c_star": r1.c_star, "mu_norm": float(r1.mu.norm())}

    seconds, out = best_of(run, repeat)
    peak = rss_mib("VmHWM")
    print(json.dumps({"route": route, "seconds": seconds, "peak_growth_mib": peak - base, **out}))


def section_rank1(ckpt, n, t_value, repeat):
    print(f"\n## 4. mu and c* from the model ({ckpt}, n={n}, t={t_value}): jvp route vs per-sample route")
    results = {}
    for route in ("forward_backward", "jvp", "per_sample"):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                route,
                "--ckpt",
                ckpt,
                "--n",
                str(n),
                "--t",
                str(t_value),
                "--repeat",
                str(repeat),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[route] = json.loads(proc.stdout.strip().splitlines()[-1])
    fb = results["forward_backward"]["seconds"]
    print(f"{'route':<18} {'seconds':>8} {'x fwd+bwd':>9} {'peak RSS above start MiB':>25} {'c*':>10}")
    for route, r in results.items():
        print(
            f"{route:<18} {r['seconds']:>8.2f} {r['seconds'] / fb:>9.2f} {r['peak_growth_mib']:>25.0f} {r.get('c_star', float('nan')):>10.4g}"
        )
    cj, cp = results["jvp"]["c_star"], results["per_sample"]["c_star"]
    print(f"c* agreement (jvp vs per-sample): rel diff {abs(cj - cp) / abs(cp):.1e}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--store", default="/tmp/gp_quick_grads", help="gradient store for section 3 (skipped if absent)")
    ap.add_argument("--ckpt", default="/tmp/gp_quick", help="checkpoint for section 4 (skipped if absent)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--n", type=int, default=1024, help="samples for section 4")
    ap.add_argument("--t", type=int, default=700, help="timestep for section 4")
    ap.add_argument("--sections", default="1,3,4", help="which sections to run, e.g. 1,4")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.ckpt, args.n, args.t, args.repeat)
        return
    torch.set_num_threads(2)
    print(
        f"bench/spectrum.py  torch {torch.__version__}, {torch.get_num_threads()} threads, cpu count {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.1f} (shared machine: noisy timings, best of {args.repeat})"
    )
    if args.quick:
        sizes = [(256, 2000), (1024, 2000)]
    else:
        sizes = [(256, 2000), (1024, 2000), (4096, 2000), (256, 95873), (1024, 95873), (4096, 24000)]
    sections = set(args.sections.split(","))
    if "1" in sections:
        section_eigen(sizes, args.repeat)
    if "3" not in sections:
        pass
    elif Path(args.store, "manifest.json").is_file():
        section_streaming(args.store, 1)
    else:
        print(f"\n## 3. skipped: no store at {args.store}")
    if "4" not in sections:
        pass
    elif Path(args.ckpt, "geomprobe.json").is_file():
        section_rank1(args.ckpt, args.n if not args.quick else 256, args.t, args.repeat + 1)
    else:
        print(f"\n## 4. skipped: no checkpoint at {args.ckpt}")


if __name__ == "__main__":
    main()

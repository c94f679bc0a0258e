"""How much float32 Gram products move the small eigenvalues of a nearly rank-1 Fisher (``--gram-dtype``).

Synthetic per-sample gradients g_i = c_i u + noise * z_i (n rows, P columns; seeded), spectra from
:func:`geomprobe.fisher.rows.gram_statistics` with float64 products (the reference) and float32
products in one row block and in small row blocks; prints eigenvalues and relative differences.
Optionally the same for a gradient store (``--store DIR``).

    OMP_NUM_THREADS=1 python bench/gram_dtype.py --n 48 --P 4000000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from geomprobe.fisher import TensorRows, gram_statistics
from geomprobe.fisher.spectrum import fisher_spectrum


def compare(source, budgets: list[int]) -> None:
    """Print the top-5 eigenvalues with float64 products, then float32 at each budget, with relative errors."""
    ref = None
    for dtype, budget in [(torch.float64, budgets[0]), *[(torch.float32, b) for b in budgets]]:
        start = time.process_time()
        eig = fisher_spectrum(gram_statistics(source, max_memory=budget, compute_dtype=dtype), top_k=5).eigenvalues
        seconds = time.process_time() - start
        ref = eig if ref is None else ref
        diff = " ".join(f"{d:.1e}" for d in np.abs(eig - ref) / ref)
        print(f"{str(dtype):14s} {budget >> 20:6d} MiB  {seconds:6.1f} s CPU  rel diff lambda1..5: {diff}")


def main() -> None:
    """Parse options and run the comparisons."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--P", type=int, default=4_000_000)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--store", default=None, help="also compare on this gradient store (all keys)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(args.P, generator=g)
    G = (3.0 * torch.randn(args.n, 1, generator=g)) * u + args.noise * torch.randn(args.n, args.P, generator=g)
    print(f"synthetic nearly rank-1 G: n={args.n}, P={args.P:,}, noise={args.noise}, 1 thread")
    compare(TensorRows(G), [2**31, 200 * 2**20])
    if args.store:
        from geomprobe.fisher import StoreRows
        from geomprobe.probe import GradientStore

        store = GradientStore(args.store)
        for key in store.keys:
            print(f"store {args.store} key {key}")
            compare(StoreRows(store, key), [2**30])


if __name__ == "__main__":
    main()

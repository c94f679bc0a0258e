"""Shared fixtures: tiny models and data so the suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when pytest runs next to other work; an explicit
# OMP_NUM_THREADS wins (two threads sharing a busy core slow FID's eigvals 10-20x).
_threads = os.environ.get("OMP_NUM_THREADS", "")
torch.set_num_threads(int(_threads) if _threads.isdigit() and int(_threads) > 0 else min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_unet():
    """small1 at 8 px, 1 channel, 10 classes (about 40k parameters), fixed seed."""
    from geomprobe.models import build_unet

    torch.manual_seed(0)
    return build_unet("small1", 8, 1, 10)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (two OpenMP threads spin against other jobs on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

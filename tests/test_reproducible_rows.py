"""Stored rows do not depend on --max-memory (the chunk is a function of the model), or a note says so.

Reference: a store written with the default budget, compared bit for bit.
"""

from __future__ import annotations

import torch

from geomprobe.checkpoints import ModelInfo, save_checkpoint
from geomprobe.models import build_scheduler, build_unet
from geomprobe.probe import ExtractConfig, GradientStore, extract_gradients
from geomprobe.probe.memory import chunk_size_for, reproducible_chunk


def test_rows_are_identical_across_budgets_that_hold_the_default_chunk(tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet = build_unet("small1", 8, 1, 10)
    info = ModelInfo(preset="small1", dataset="digits", image_size=8, channels=1, num_classes=10, seed=0, step=0)
    save_checkpoint(tmp_path / "ckpt", unet, build_scheduler(), info)
    default_chunk = chunk_size_for(unet, sum(p.numel() for p in unet.parameters()), (1, 8, 8))
    notes: list[str] = []
    stores = {}
    for budget in (2 * 2**30, 8 * 2**30, 3 * 2**20):
        out = tmp_path / str(budget)
        extract_gradients(
            ExtractConfig(ckpt=str(tmp_path / "ckpt"), t_range="300", samples=40, shard_rows=40),
            out,
            device="cpu",
            max_memory=budget,
            on_note=notes.append,
        )
        stores[budget] = GradientStore(out).load(300)
    assert torch.equal(stores[2 * 2**30], stores[8 * 2**30])
    chunk, note = reproducible_chunk(unet, sum(p.numel() for p in unet.parameters()), (1, 8, 8), 3 * 2**20)
    assert chunk < default_chunk and note is not None and any("float rounding" in n for n in notes)
    assert torch.allclose(stores[3 * 2**20], stores[2 * 2**30], rtol=1e-4, atol=1e-5)

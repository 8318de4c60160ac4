"""The engine adds mixture-of-experts auxiliary losses that a method leaves in its MoE layers."""

from __future__ import annotations

import torch

from histofm.data.datasets import bundled_tiles
from histofm.methods.registry import build_method
from histofm.train import TrainConfig, fit


def test_engine_adds_moe_losses_for_plain_methods() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        method, views = build_method(
            "simclr", "vit_tiny_patch8_224", img_size=32,
            overrides={"backbone_kwargs": {"depth": 2, "moe_every": 1, "num_experts": 4, "top_k": 2},
                       "proj_hidden_dim": 64, "proj_dim": 32},
        )
        data = bundled_tiles(32, sources=("hgsc_nest",), mode="random", num_per_source=32)
        history = fit(method, data, TrainConfig(steps=2, batch_size=8, progress=False, monitor_every=0,
                                                tensorboard=False), transform=views)
    finally:
        torch.set_num_threads(threads)
    assert all("aux_moe_balance" in h and "aux_moe_z" in h for h in history)
    for h in history:
        assert h["aux_moe_balance"] > 0 and torch.isfinite(torch.tensor(h["loss"]))

"""`histofm pretrain --method mae` saves reconstruction pictures during training."""

from __future__ import annotations

from pathlib import Path

import torch

from histofm.cli import main


def test_mae_pretrain_saves_reconstructions(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["pretrain", "--method", "mae", "--model", "vit_tiny_patch8_224", "--data", "bundled",
                     "--steps", "3", "--batch-size", "8", "--img-size", "32", "--out", str(tmp_path),
                     "--set", "backbone.depth=1"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    pictures = sorted((tmp_path / "reconstructions").glob("recon_step*.png"))
    assert [p.name for p in pictures][:2] == ["recon_step0.png", "recon_step1.png"]
    assert all(p.stat().st_size > 1000 for p in pictures)

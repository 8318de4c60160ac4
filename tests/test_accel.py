"""Speed options change speed only: regional torch.compile and channels-last give the eager numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import histofm
from histofm import accel
from histofm.data import sample_path
from histofm.data.datasets import bundled_tiles
from histofm.methods.registry import build_method
from histofm.train import TrainConfig, fit
from histofm.wsi.features import ExtractConfig, extract_features, read_features


def test_repeated_blocks_are_found_in_every_tower() -> None:
    vit = histofm.create_model("vit_tiny_patch16_224", depth=3, img_size=32)
    assert accel.repeated_blocks(vit) == list(vit.blocks)
    clip, _ = build_method("clip", "vit_tiny_patch16_224", img_size=32, overrides={
        "backbone": {"depth": 2}, "text_layers": 1, "text_width": 32, "text_heads": 2, "embed_dim": 16})
    blocks = accel.repeated_blocks(clip)
    assert len(blocks) == 3  # two image blocks and one text layer, none nested in another
    assert not any(a is not b and any(m is b for m in a.modules()) for a in blocks for b in blocks)


def _simclr():
    torch.manual_seed(0)
    return build_method("simclr", "vit_tiny_patch16_224", img_size=32, overrides={
        "backbone": {"depth": 2, "patch_size": 8, "embed_dim": 32, "num_heads": 2},
        "proj_hidden_dim": 32, "proj_dim": 16, "proj_bn": False})


def test_compiled_training_follows_the_eager_run() -> None:
    data = bundled_tiles(32, sources=("hgsc_nest", "hgsc_stroma"), mode="random", num_per_source=8, seed=0)
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, progress=False, monitor_every=0, seed=1)
    method, tf = _simclr()
    eager = fit(method, data, cfg, transform=tf)
    method_c, tf = _simclr()
    compiled = fit(method_c, data, cfg.replace(compile=True), transform=tf)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in method_c.backbone.blocks)
    torch.testing.assert_close(torch.tensor([h["loss"] for h in compiled]), torch.tensor([h["loss"] for h in eager]),
                               rtol=1e-4, atol=1e-5)
    assert eager[-1]["loss"] != eager[0]["loss"]
    for (name, a), b in zip(method_c.state_dict().items(), method.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("options", [{"channels_last": True}, {"compile": True, "channels_last": True}])
def test_extraction_options_keep_the_features(tmp_path, options) -> None:
    torch.manual_seed(0)
    model = histofm.create_model("vit_tiny_patch16_224", depth=2, img_size=112)
    base = ExtractConfig(target_mpp=2.0, tile_size=112, batch_size=16, device="cpu")
    slide = sample_path("cmu_small_region")
    extract_features([slide], model, tmp_path / "eager", config=base, progress=False)
    report = extract_features([slide], model, tmp_path / "fast", config=ExtractConfig(**{**base.__dict__, **options}),
                              progress=False)
    assert not report.failures
    ref, ref_xy, _ = read_features(tmp_path / "eager" / "cmu_small_region.h5")
    got, xy, _ = read_features(tmp_path / "fast" / "cmu_small_region.h5")
    assert len(ref) > 4
    np.testing.assert_array_equal(xy, ref_xy)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_activation_checkpointing_gives_the_same_run() -> None:
    data = bundled_tiles(32, sources=("hgsc_nest", "hgsc_stroma"), mode="random", num_per_source=8, seed=0)
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, progress=False, monitor_every=0, seed=1)
    method, tf = _simclr()
    plain = fit(method, data, cfg, transform=tf)
    method_c, tf = _simclr()
    ckpt = fit(method_c, data, cfg.replace(grad_checkpointing=True), transform=tf)
    assert method_c.backbone.grad_checkpointing and not method.backbone.grad_checkpointing
    torch.testing.assert_close(torch.tensor([h["loss"] for h in ckpt]), torch.tensor([h["loss"] for h in plain]),
                               rtol=1e-5, atol=1e-6)
    assert plain[-1]["loss"] != plain[0]["loss"]

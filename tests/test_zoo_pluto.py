"""PLUTO / FlexiViT: one set of weights at patch sizes 8, 16, 32; the pseudo-inverse kernel resize."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_patch_embed

import histofm
from histofm.errors import HistofmError
from histofm.layers.patch_embed import resize_patch_embed
from histofm.models.vit import VisionTransformer


@pytest.fixture(autouse=True)
def _one_thread():
    # Small CPU work; one thread avoids oversubscription when the machine is shared.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("new", [8, 24, 32])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_resize_patch_embed_matches_timm(new: int, interpolation: str) -> None:
    w = torch.randn(12, 3, 16, 16)
    ours = resize_patch_embed(w, new, interpolation=interpolation)
    ref = resample_patch_embed(w, [new, new], interpolation=interpolation, antialias=True)
    assert ours.shape == (12, 3, new, new)
    torch.testing.assert_close(ours, ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)


def test_pi_resize_keeps_the_token_of_an_upsampled_patch() -> None:
    """FlexiViT's defining property: <B x, pinv(B^T) w> = <x, w> when upsampling."""
    w = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    for new in (24, 32):
        w_new = resize_patch_embed(w, new)
        x_new = F.interpolate(x, size=(new, new), mode="bilinear", antialias=True)
        torch.testing.assert_close(F.conv2d(x_new, w_new, stride=new), F.conv2d(x, w, stride=16))
    # downsampling cannot be exact, but PI-resize is the least-squares best: it beats plain interpolation
    x_small = F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True)
    target = F.conv2d(x, w, stride=16)
    err_pi = (F.conv2d(x_small, resize_patch_embed(w, 8), stride=8) - target).norm()
    err_naive = (F.conv2d(x_small, F.interpolate(w, size=(8, 8), mode="bilinear", antialias=True), stride=8) - target).norm()
    assert err_pi < err_naive


@pytest.fixture(scope="module")
def pluto() -> VisionTransformer:
    torch.manual_seed(0)
    return histofm.create_model("pluto", depth=2).eval()


def test_same_weights_run_at_8_16_32(pluto) -> None:
    x = torch.randn(2, 3, 224, 224)
    embeddings = {}
    with torch.no_grad():
        for p in (8, 16, 32):
            tokens = pluto.forward_features(x, patch_size=p)
            assert tokens.shape == (2, 1 + (224 // p) ** 2, 384)
            embeddings[p] = pluto(x, patch_size=p)
            assert embeddings[p].shape == (2, 384) and torch.isfinite(embeddings[p]).all()
    assert not torch.allclose(embeddings[8], embeddings[32])  # the patch size really changed the computation
    assert pluto.patch_size == 16  # a per-call patch size leaves the default alone


def test_patch_16_is_a_plain_vit_with_the_same_weights(pluto) -> None:
    kwargs = {k: v for k, v in histofm.model_info("pluto").arch_kwargs.items() if k != "patch_sizes"}
    plain = VisionTransformer(**{**kwargs, "depth": 2}).eval()
    plain.load_state_dict(pluto.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(pluto(x), plain(x))


def test_set_patch_size_and_bad_sizes() -> None:
    model = histofm.create_model("pluto", depth=1, img_size=64).eval()
    model.set_patch_size(32)
    assert model.patch_size == 32
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 1 + 4, 384)
    with pytest.raises(HistofmError, match="not a multiple of the patch size 32"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(HistofmError, match="positive"):
        model.set_patch_size(0)


def test_gradients_reach_the_stored_kernel_at_patch_8() -> None:
    model = histofm.create_model("pluto", depth=1, img_size=64, use_mask_token=True)
    masks = torch.zeros(2, 64, dtype=torch.bool)
    masks[:, ::5] = True
    tokens = model.forward_features(torch.randn(2, 3, 64, 64), masks=masks, patch_size=8)
    model.forward_head(tokens).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.patch_embed.proj.weight.grad.shape == (384, 3, 16, 16)


def test_checkpoint_with_a_32px_kernel_loads(tmp_path) -> None:
    """A FlexiViT checkpoint stored with another underlying kernel (big_vision keeps 32 x 32) is PI-resized."""
    src = histofm.create_model("pluto", depth=1, patch_size=32)  # 7 x 7 grid, 32 x 32 kernel
    save_file(src.state_dict(), tmp_path / "flexivit32.safetensors")
    loaded = histofm.create_model("pluto", depth=1, checkpoint_path=tmp_path / "flexivit32.safetensors")
    torch.testing.assert_close(loaded.patch_embed.proj.weight, resize_patch_embed(src.patch_embed.proj.weight, 16))
    assert loaded.pos_embed.shape == (1, 1 + 14 * 14, 384)
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.randn(1, 3, 224, 224), patch_size=32)).all()

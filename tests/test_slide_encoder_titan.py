"""TITAN's slide encoder: UNVERIFIED against the official model (no installable oracle).

What these tests check instead:

* 2-D ALiBi: slopes and bias values against numbers computed by hand;
* the Transformer blocks: against timm's ``Block`` (installed) given the same weights and the
  same additive attention bias, in a reference forward written out in the test (grid built
  by hand, patch projection + GELU, class token, timm blocks, LayerNorm, attentional pooler);
* behaviour the design implies: tile order does not matter, translating the slide does not
  matter, distance does (the bias is live), cells without tissue are left out;
* the loader: a state dict in the official names of the public code
  (``vision_encoder.blocks.modules_list.N``, ``patch_embed.0``, a text tower, the captioning
  pooler) loads with ``strict=True`` and reproduces the source model.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from histofm.errors import HistofmError
from histofm.models.titan import TitanSlideEncoder, alibi_2d_bias, alibi_slopes
from histofm.registry import create_slide_encoder, slide_encoder_info


def _tiny(**kw) -> TitanSlideEncoder:
    torch.manual_seed(0)
    args = dict(in_chans=12, embed_dim=16, depth=2, num_heads=4, tile_size=512, pooler_heads=2)
    model = TitanSlideEncoder(**{**args, **kw}).eval()
    with torch.no_grad():  # non-trivial norms and biases so a swapped module shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_alibi_slopes_by_hand() -> None:
    # 8 heads: 2^-1 ... 2^-8; 4 heads: 2^-2, 2^-4, 2^-6, 2^-8
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)]))
    torch.testing.assert_close(alibi_slopes(4), torch.tensor([0.25, 0.0625, 0.015625, 0.00390625]))
    # 12 heads (TITAN): the 8 above, then every other slope of the 16-head sequence 2^-0.5, 2^-1.5, ...
    twelve = [2.0**-i for i in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(twelve))


def test_alibi_2d_bias_by_hand() -> None:
    cells = torch.tensor([[0, 0], [0, 1], [1, 1], [3, 5]])
    bias = alibi_2d_bias(cells, num_heads=2)  # slopes 2^-4 = 0.0625, 2^-8
    assert bias.shape == (2, 5, 5)
    assert (bias[:, 0] == 0).all() and (bias[:, :, 0] == 0).all()  # the class token is unbiased
    m = 0.0625
    assert bias[0, 1, 2].item() == pytest.approx(-m * 1.0)
    assert bias[0, 1, 3].item() == pytest.approx(-m * math.sqrt(2))
    assert bias[0, 2, 4].item() == pytest.approx(-m * 5.0)  # (0,1) -> (3,5): 3-4-5 triangle
    assert bias[1, 2, 4].item() == pytest.approx(-(2.0**-8) * 5.0)
    torch.testing.assert_close(bias, bias.transpose(1, 2))
    assert (torch.diagonal(bias, dim1=1, dim2=2) == 0).all()


def _slide(n: int = 9, in_chans: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(30, generator=g)[:n]
    coords = torch.stack([cells // 6, cells % 6], 1) * 512 + 1000  # distinct cells of a 5 x 6 grid, offset
    return torch.randn(n, in_chans, generator=g), coords


def test_matches_a_timm_block_reference() -> None:
    from timm.models.vision_transformer import Block as TimmBlock

    model = _tiny()
    feats, coords = _slide()
    # reference: grid by hand, row-major order of the occupied cells
    cells = (coords - coords.min(0).values) // 512
    order = torch.argsort(cells[:, 0] * 100 + cells[:, 1])
    tokens, cells = feats[order], cells[order]
    slopes = torch.tensor([0.25, 0.0625, 0.015625, 0.00390625])
    dist = torch.sqrt(((cells[:, None].float() - cells[None].float()) ** 2).sum(-1))
    bias = torch.zeros(4, len(cells) + 1, len(cells) + 1)
    bias[:, 1:, 1:] = -slopes[:, None, None] * dist
    with torch.no_grad():
        x = torch.nn.functional.gelu(model.patch_embed.proj(tokens))[None]
        x = torch.cat([model.cls_token, x], 1)
        for blk in model.blocks:
            ref = TimmBlock(16, 4, mlp_ratio=4.0, qkv_bias=True)
            ref.load_state_dict(blk.state_dict(), strict=True)  # same names: norm1, attn.qkv, attn.proj, norm2, mlp
            x = ref.eval()(x, attn_mask=bias[None])
        x = model.norm(x)
        pool = model.attn_pool_contrastive
        k = pool.ln_k(x)
        expected = pool.attn(pool.ln_q(pool.query)[None], k, k, need_weights=False)[0][0, 0]
        got = model(feats, coords)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_order_and_translation_do_not_matter_but_distance_does() -> None:
    model = _tiny()
    feats, coords = _slide()
    with torch.no_grad():
        e = model(feats, coords)
        perm = torch.randperm(len(feats))
        torch.testing.assert_close(model(feats[perm], coords[perm]), e, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(feats, coords + 512 * 7), e, atol=1e-5, rtol=1e-5)
        far = coords.clone()
        far[0] += 512 * 40  # only the distances change (order is shown not to matter above)
        assert (model(feats, far) - e).abs().max() > 1e-4
        # within one cell, the position inside it is ignored
        torch.testing.assert_close(model(feats, coords + 100), e, atol=1e-5, rtol=1e-5)


def test_empty_and_zero_cells_are_left_out_and_duplicates_summed() -> None:
    model = _tiny()
    feats, coords = _slide()
    with torch.no_grad():
        e = model(feats, coords)
        # a zero feature vector in an empty cell inside the slide's box is background: dropped
        occupied = {tuple(c) for c in ((coords - coords.min(0).values) // 512).tolist()}
        empty = next((i, j) for i in range(5) for j in range(6) if (i, j) not in occupied)
        inner = coords.min(0).values + 512 * torch.tensor(empty)
        with_bg = model(torch.cat([feats, torch.zeros(1, 12)]), torch.cat([coords, inner[None]]))
        torch.testing.assert_close(with_bg, e, atol=1e-5, rtol=1e-5)
        # two tiles in one cell are summed into one token
        a, b = feats[0] * 0.3, feats[0] * 0.7
        split = model(torch.cat([a[None], b[None], feats[1:]]), torch.cat([coords[:1], coords[:1] + 7, coords[1:]]))
        torch.testing.assert_close(split, e, atol=1e-5, rtol=1e-5)


def test_cascade_and_class_token_variants_and_gradients() -> None:
    feats, coords = _slide()
    for pool in ("cascade", None):
        model = _tiny(attentional_pool=pool, pooler_queries=3).train()
        out = model(feats[None], coords[None])
        assert out.shape == (1, 16) and torch.isfinite(out).all()
        out.sum().backward()
        for name, p in model.named_parameters():
            if name != "proj":  # the text projection is not part of the slide embedding
                assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_official_layout_loads_strictly(tmp_path) -> None:
    src = _tiny()
    official = {}
    for k, v in src.state_dict().items():
        k = k.replace("blocks.", "blocks.modules_list.").replace("patch_embed.proj.", "patch_embed.0.")
        official[f"vision_encoder.{k}"] = v.clone()
    official["vision_encoder.attn_pool.query"] = torch.randn(128, 16)  # captioning pooler: not used for the embedding
    official["vision_encoder.attn_pool.attn.in_proj_weight"] = torch.randn(48, 16)
    official["text_encoder.token_embedding.weight"] = torch.randn(10, 16)
    save_file(official, str(tmp_path / "model.safetensors"))
    model = create_slide_encoder(
        "titan", checkpoint_path=tmp_path / "model.safetensors", in_chans=12, embed_dim=16, depth=2, num_heads=4,
        pooler_heads=2,
    )
    feats, coords = _slide()
    with torch.no_grad():
        torch.testing.assert_close(model(feats, coords), src(feats, coords))
    info = slide_encoder_info("titan")
    assert info.verified.startswith("unverified") and info.hub_id == "MahmoodLab/TITAN"
    with torch.device("meta"):
        full = create_slide_encoder("titan")
    assert sum(p.numel() for p in full.parameters()) == info.num_params


def test_bad_inputs_name_the_cause() -> None:
    model = _tiny()
    with pytest.raises(HistofmError, match="12-d tile features"):
        model(torch.randn(5, 13), torch.zeros(5, 2))
    with pytest.raises(HistofmError, match="no tiles"):
        model(torch.randn(0, 12), torch.zeros(0, 2))
    with pytest.raises(HistofmError, match="zero"):
        model(torch.zeros(3, 12), torch.zeros(3, 2))

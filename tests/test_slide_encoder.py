"""Prov-GigaPath's slide encoder: LongNet dilated attention and the official layout.

What is verified, exactly:

* **Layer layout and names** (``encoder.layers.N.self_attn.{q,k,v,out}_proj``, sub-LayerNorms,
  FFN, final LayerNorm): against torchscale 0.3.0's ``Encoder`` (installed from PyPI), loading
  its state dict into ours with ``strict=True``, in the regime where dilated attention IS full
  attention (every dilation 1, segments at least as long as the sequence). torchscale 0.3.0
  has no LongNet, so this is the only regime it can check.
* **Dilated attention with real dilations**: against ``_reference_dilated_attention`` below, a
  slow loop written from the LongNet paper's equations (segment, keep every r-th row with a
  per-head offset, softmax inside, mix branches by their softmax denominators), with the
  official code's head grouping and zero padding. It shares no code with the module.
* **The slide-encoder wrapper** (tile projection, 2-D sine-cosine rows picked by the official
  ``coords_to_pos`` rule, class token, head LayerNorm, pooling): against a composition of
  oracles (lightly's MAE 2-D sine-cosine table, torchscale's ``Encoder``) in the full-attention
  regime, loaded from a ``{"model": state_dict}`` file as ``slide_encoder.pth`` is.

Not verified: numbers of the released ``slide_encoder.pth`` (gated; no network here).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from histofm.errors import HistofmError
from histofm.models.longnet import LongNetEncoder, dilated_attention
from histofm.models.slide_encoder import GigaPathSlideEncoder
from histofm.registry import create_slide_encoder, list_slide_encoders, slide_encoder_info


def _reference_dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, branches: list[tuple[int, int]]):
    """Slow LongNet reference for ONE sequence: ``q, k, v (N, H, d)`` -> ``(N, H, d)``, float64.

    For every branch (w, r), head h and segment s: the kept rows are ``s*w + o + j*r`` with the
    head's offset ``o = h // ceil(H / r)`` (the official code's contiguous head groups; the paper
    writes ``h mod r``); rows past the sequence or past the segment are zero padding (zero key,
    zero value, not masked). Each real query accumulates ``sum_k exp(q.k/sqrt(d)) v_k`` and the
    denominator ``Z = sum_k exp(q.k/sqrt(d))`` over every branch that keeps it; the output is
    ``sum(numerators) / sum(Z)`` = the paper's ``sum_i Z_i O_i / sum_j Z_j``.
    """
    q, k, v = q.double(), k.double(), v.double()
    N, H, d = q.shape
    num = torch.zeros(N, H, d, dtype=torch.float64)
    den = torch.zeros(N, H, dtype=torch.float64)
    for w, r in branches:
        w = min(w, N)
        group = math.ceil(H / r)
        padded_segment = math.ceil(w / r) * r
        for h in range(H):
            offset = h // group
            for s in range(math.ceil(N / w)):
                rows = [(j, s * w + j) for j in range(offset, padded_segment, r)]
                real = [j < w and pos < N for j, pos in rows]
                keys = [k[pos, h] if ok else torch.zeros(d, dtype=torch.float64) for (j, pos), ok in zip(rows, real)]
                vals = [v[pos, h] if ok else torch.zeros(d, dtype=torch.float64) for (j, pos), ok in zip(rows, real)]
                for (_, pos), ok in zip(rows, real):
                    if not ok:
                        continue
                    for key, val in zip(keys, vals):
                        e = math.exp(float(q[pos, h] @ key) / math.sqrt(d))
                        num[pos, h] += e * val
                        den[pos, h] += e
    out = torch.zeros_like(num)
    covered = den > 0
    out[covered] = num[covered] / den[covered][:, None]
    return out


@pytest.mark.parametrize(
    "N,H,branches",
    [
        (37, 6, [(8, 1), (16, 2), (64, 4)]),  # padding of the sequence, of segments and of heads (6 -> 8)
        (29, 4, [(12, 2), (100, 8)]),  # no dense branch: some (row, head) pairs are seen by no branch -> 0
    ],
)
def test_dilated_attention_matches_the_paper_reference(N: int, H: int, branches: list[tuple[int, int]]) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, N, H, 4) for _ in range(3))
    ours = dilated_attention(q, k, v, [w for w, _ in branches], [r for _, r in branches])[0]
    ref = _reference_dilated_attention(q[0], k[0], v[0], branches)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)


def test_dilated_attention_differs_from_full_attention_when_dilated() -> None:
    """The reference test above could pass on full attention only if dilation did nothing: it does something."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 40, 4, 8) for _ in range(3))
    full = dilated_attention(q, k, v, [64], [1])
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(full, sdpa, atol=1e-5, rtol=1e-5)
    assert (dilated_attention(q, k, v, [8, 16], [1, 2]) - full).abs().max() > 1e-2


def _torchscale_encoder(dim: int, depth: int, heads: int) -> nn.Module:
    from torchscale.architecture.config import EncoderConfig
    from torchscale.architecture.encoder import Encoder

    cfg = EncoderConfig(
        encoder_embed_dim=dim, encoder_attention_heads=heads, encoder_ffn_embed_dim=2 * dim, encoder_layers=depth,
        subln=True, normalize_output=True, dropout=0.0, drop_path_rate=0.0,
    )
    torch.manual_seed(2)
    ref = Encoder(cfg).eval()
    with torch.no_grad():  # LayerNorms at 1/0 would hide a swapped or missing norm: perturb them
        for name, p in ref.named_parameters():
            if "layer_norm" in name or "layernorm" in name or "inner_attn_ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return ref


def test_encoder_layout_matches_torchscale_in_the_full_attention_regime() -> None:
    ref = _torchscale_encoder(32, 2, 4)
    ours = LongNetEncoder(32, 2, 4, 64, segment_lengths=[64, 128], dilations=[1, 1]).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # every name and shape matches torchscale's
    x = torch.randn(2, 23, 32)
    with torch.no_grad():
        out = ref(src_tokens=None, token_embeddings=x, return_all_hiddens=True)
        mine, states = ours(x)[0], ours(x, return_all=True)
    torch.testing.assert_close(mine, out["encoder_out"], atol=1e-5, rtol=1e-5)
    assert len(states) == len(out["encoder_states"]) == 3
    for a, b in zip(states, out["encoder_states"]):  # per-layer states skip the final LayerNorm, as torchscale's
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _sincos_table(dim: int, grid: int) -> torch.Tensor:
    # MAE's table, as the official code uses
    from lightly.models.utils import get_2d_sine_cosine_positional_embedding

    return torch.from_numpy(get_2d_sine_cosine_positional_embedding(dim, grid, cls_token=True)).float()


@pytest.mark.parametrize("global_pool", [False, True])
def test_slide_encoder_matches_official_composition(tmp_path, global_pool: bool) -> None:
    dim, depth, heads, in_chans, grid = 32, 2, 4, 24, 40
    ref_encoder = _torchscale_encoder(dim, depth, heads)
    torch.manual_seed(3)
    proj, cls, norm = nn.Linear(in_chans, dim), torch.randn(1, 1, dim), nn.LayerNorm(dim, eps=1e-6)
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn(dim))
        norm.bias.add_(0.1 * torch.randn(dim))
    sd = {"patch_embed.proj.weight": proj.weight, "patch_embed.proj.bias": proj.bias, "cls_token": cls,
          "norm.weight": norm.weight, "norm.bias": norm.bias}
    sd.update({f"encoder.{k}": v for k, v in ref_encoder.state_dict().items()})
    path = tmp_path / "slide_encoder.pth"
    torch.save({"model": {k: v.detach().clone() for k, v in sd.items()}}, path)  # the official file's wrapping

    model = create_slide_encoder(
        "prov_gigapath_slide", checkpoint_path=path, in_chans=in_chans, embed_dim=dim, depth=depth, num_heads=heads,
        slide_ngrids=grid, segment_lengths=[4096], dilations=[1], global_pool=global_pool, mlp_ratio=2.0,
    )
    feats = torch.randn(2, 15, in_chans)
    coords = torch.randint(0, 256 * grid, (2, 15, 2)).float()
    # official LongNetViT.forward, written out with the oracles
    table = _sincos_table(dim, grid)  # (1 + grid^2, dim)
    pos = (torch.floor(coords / 256)[..., 0] * grid + torch.floor(coords / 256)[..., 1]).long() + 1
    with torch.no_grad():
        x = proj(feats) + table[pos]
        x = torch.cat([(cls + table[:1]).expand(2, -1, -1), x], dim=1)
        h = ref_encoder(src_tokens=None, token_embeddings=x)["encoder_out"]
        expected = norm(h[:, 1:].mean(1)) if global_pool else norm(h)[:, 0]
        got = model(feats, coords)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_published_configuration() -> None:
    info = slide_encoder_info("prov_gigapath_slide")
    kw = info.arch_kwargs
    # 2^linspace(10, 20, 5) = 2^10, 2^12.5 = 5792.6, 2^15, 2^17.5 = 185363.8, 2^20, truncated
    assert list(kw["segment_lengths"]) == [1024, 5792, 32768, 185363, 1048576]
    assert tuple(kw["dilations"]) == (1, 2, 4, 8, 16)
    assert (kw["embed_dim"], kw["depth"], kw["num_heads"], kw["in_chans"]) == (768, 12, 16, 1536)
    with torch.device("meta"):
        model = create_slide_encoder("prov_gigapath_slide")
    assert sum(p.numel() for p in model.parameters()) == info.num_params
    names = set(model.state_dict())
    assert {"cls_token", "patch_embed.proj.weight", "encoder.layer_norm.weight", "norm.weight",
            "encoder.layers.11.self_attn.inner_attn_ln.weight", "encoder.layers.11.ffn.ffn_layernorm.weight"} <= names
    assert "prov_gigapath_slide" in list_slide_encoders() and "titan" in list_slide_encoders()


def test_real_dilation_forward_trains_every_parameter() -> None:
    torch.manual_seed(4)
    model = GigaPathSlideEncoder(
        in_chans=16, embed_dim=32, depth=2, num_heads=4, segment_lengths=[8, 16, 64], dilations=[1, 2, 4],
        dropout=0.0, drop_path_rate=0.0,
    )
    feats, coords = torch.randn(2, 50, 16), torch.randint(0, 256 * 20, (2, 50, 2)).float()
    out = model(feats, coords)
    assert out.shape == (2, 32) and torch.isfinite(out).all()
    out.pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    layers = model.forward_all_layers(feats, coords)
    assert len(layers) == 3 and all(e.shape == (2, 32) for e in layers)


def test_position_rows_follow_the_official_index() -> None:
    """Tile (x, y) takes table row 1 + floor(x/t)*G + floor(y/t): the y cell in the first half."""
    model = GigaPathSlideEncoder(in_chans=8, embed_dim=16, depth=0, slide_ngrids=30)
    table = _sincos_table(16, 30)
    coords = torch.tensor([[[0.0, 0.0], [256.0 * 3 + 5, 256.0 * 7], [256.0 * 29, 255.0]]])
    rows = model.position_embedding(coords)[0]
    torch.testing.assert_close(rows, table[[1, 1 + 3 * 30 + 7, 1 + 29 * 30 + 0]])
    # a step of 512 px per tile (level-0 coordinates of 256 px tiles at half the resolution)
    torch.testing.assert_close(model.position_embedding(coords * 2, tile_size=512)[0], rows)


def test_bad_inputs_name_the_cause() -> None:
    model = GigaPathSlideEncoder(in_chans=8, embed_dim=16, depth=1, num_heads=2, slide_ngrids=10)
    with pytest.raises(HistofmError, match="outside the slide encoder's 10 x 10 grid"):
        model(torch.randn(1, 3, 8), torch.tensor([[[0.0, 0.0], [256.0 * 10, 0.0], [5.0, 5.0]]]))
    with pytest.raises(HistofmError, match="tile features"):
        model(torch.randn(1, 3, 9), torch.zeros(1, 3, 2))
    with pytest.raises(HistofmError, match="Unknown slide encoder 'gigapath'.*--slide-encoder"):
        create_slide_encoder("gigapath")


@pytest.mark.parametrize("name", list_slide_encoders())
def test_every_slide_encoder_builds_and_embeds(name: str) -> None:
    """Registered width and input, one layer: a finite embedding of the documented size per slide."""
    info = slide_encoder_info(name)
    torch.manual_seed(5)
    model = create_slide_encoder(name, depth=1).eval()
    feats = torch.randn(2, 20, info.in_dim)
    coords = (torch.randperm(100)[:40].view(2, 20, 1) * torch.tensor([1, 7]) % 10).float() * info.tile_px
    with torch.no_grad():
        emb = model(feats, coords, tile_size=info.tile_px)
    assert emb.shape == (2, info.embed_dim) and torch.isfinite(emb).all()
    assert not torch.allclose(emb[0], emb[1])

"""SimMIM and BEiT-style MIM: masks, losses against direct formulas, the k-means tokenizer, bad input."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histofm import HistofmError
from histofm.methods.mim import MIM, build, random_unit_mask, simmim_loss, token_loss
from histofm.methods.patches import patchify
from histofm.methods.registry import build_method
from histofm.methods.tokenizer import KMeansTokenizer, kmeans

TINY = {"depth": 2, "patch_size": 4, "embed_dim": 64, "num_heads": 2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine
    # two spinning OpenMP threads per process slow these runs down ten-fold.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_simmim_loss_is_l1_over_masked_pixels() -> None:
    # SimMIM's code: upsample the patch mask to pixels, sum |x - x_rec| over masked pixels,
    # divide by the number of masked pixels and by the channels.
    g = torch.Generator().manual_seed(0)
    x, rec = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    mask = torch.rand(2, 4, 4, generator=g) < 0.5
    pix = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).float()  # (B, 1, H, W)
    ref = ((x - rec).abs() * pix).sum() / pix.sum() / 3
    ours = simmim_loss(patchify(rec, 4), patchify(x, 4), mask.reshape(2, -1))
    torch.testing.assert_close(ours, ref)


def test_token_loss_is_cross_entropy_on_masked_positions_only() -> None:
    g = torch.Generator().manual_seed(0)
    logits, tokens = torch.randn(3, 10, 7, generator=g), torch.randint(7, (3, 10), generator=g)
    mask = torch.rand(3, 10, generator=g) < 0.4
    loss, acc = token_loss(logits, tokens, mask)
    ref = np.mean([-F.log_softmax(logits[b, i], -1)[tokens[b, i]].item() for b in range(3) for i in range(10) if mask[b, i]])
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    logits2 = logits.clone()
    logits2[~mask] = torch.randn_like(logits2[~mask]) * 100  # unmasked predictions do not count
    assert float(token_loss(logits2, tokens, mask)[0]) == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("grid,unit,ratio", [((14, 14), 2, 0.6), ((8, 8), 1, 0.6), ((8, 8), 4, 0.5)])
def test_simmim_masks_whole_units_with_an_exact_count(grid, unit, ratio) -> None:
    m = random_unit_mask(16, grid, unit, ratio, generator=torch.Generator().manual_seed(0))
    units = (grid[0] // unit) * (grid[1] // unit)
    assert m.shape == (16, *grid)
    assert (m.flatten(1).sum(1) == math.ceil(units * ratio) * unit**2).all()
    blocks = m.reshape(16, grid[0] // unit, unit, grid[1] // unit, unit).float().mean(dim=(2, 4))
    assert ((blocks == 0) | (blocks == 1)).all()  # each unit entirely masked or entirely visible


def test_beit_masks_are_blocks_near_the_ratio() -> None:
    method, _ = build("beit", "vit_tiny_patch16_224", img_size=56, overrides={"backbone": {**TINY}})  # 14 x 14 grid
    torch.manual_seed(0)
    m = method.make_masks(32, (14, 14), torch.device("cpu"))
    frac = m.float().mean(dim=(1, 2))
    assert 0.3 < float(frac.mean()) <= 0.41 and float(frac.max()) <= 0.41  # BEiT may fall short, never over
    # blocks, not salt-and-pepper: most masked patches have a masked 4-neighbour
    pad = F.pad(m.float(), (1, 1, 1, 1))
    neigh = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
    assert float((neigh[m] > 0).float().mean()) > 0.95


def test_kmeans_recovers_separated_clusters_and_tokenizer_roundtrip() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 12, generator=g) * 10
    x = centers.repeat_interleave(40, 0) + 0.1 * torch.randn(200, 12, generator=g)
    c = kmeans(x, 5, generator=torch.Generator().manual_seed(1))
    d = torch.cdist(centers, c)
    assert float(d.min(1).values.max()) < 0.5  # every true centre found
    # tokenizer: an image made of constant patches is encoded/decoded exactly
    tok = KMeansTokenizer(vocab_size=4, pool=2, in_chans=3)
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 1.0]])
    ids = torch.randint(4, (3, 16), generator=g)
    img = colours[ids].reshape(3, 4, 4, 3).permute(0, 3, 1, 2).repeat_interleave(8, 2).repeat_interleave(8, 3)  # (3, 3, 32, 32)
    tok.fit(img, patch_size=8)
    tokens = tok.encode(img, 8)
    # same patch colour <-> same token (a relabelling of ids)
    assert all(len(set(tokens[ids == k].tolist())) == 1 for k in range(4))
    torch.testing.assert_close(tok.decode(tokens, 8, (4, 4)), img)


def test_both_methods_backpropagate_to_every_parameter() -> None:
    for name in ("simmim", "beit"):
        method, _ = build_method(name, "vit_tiny_patch16_224", img_size=32, overrides={"preset": "cpu_small", "backbone": TINY})
        out = method(torch.randn(8, 3, 32, 32))
        out["loss"].backward()
        assert [n for n, p in method.named_parameters() if p.grad is None] == [], name
        assert isinstance(method, MIM)
    assert bool(method.tokenizer.fitted)  # the BEiT tokenizer was fitted lazily on the first batch
    assert "tokenizer.codebook" in method.state_dict()  # and is saved with the method


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(HistofmError, match="mask_patch_size"):
        build("simmim", "vit_tiny_patch16_224", img_size=48, overrides={"backbone": TINY})  # 48 % 32
    with pytest.raises(HistofmError, match="not a multiple of the patch size"):
        build("simmim", "vit_tiny_patch16_224", img_size=32, overrides={"mask_patch_size": 4, "backbone": {**TINY, "patch_size": 8}})
    with pytest.raises(HistofmError, match="leaves nothing visible"):
        random_unit_mask(2, (4, 4), 4, 0.6)
    with pytest.raises(HistofmError, match="Unknown option"):
        build("beit", "vit_tiny_patch16_224", img_size=32, overrides={"vocab": 10, "backbone": TINY})
    with pytest.raises(HistofmError, match="target"):
        build("beit", "vit_tiny_patch16_224", img_size=32, overrides={"target": "words", "backbone": TINY})
    with pytest.raises(HistofmError, match="no codebook"):
        KMeansTokenizer(8).encode(torch.zeros(1, 3, 16, 16), 8)
    with pytest.raises(HistofmError, match="at least 8 points"):
        KMeansTokenizer(8).fit(torch.zeros(1, 3, 16, 16), 8)  # 4 patches, 8 clusters



# ---------------------------------------------------------------- real tissue (tests/ssl_check.py's task)
def _pretrain(name: str, steps: int, **overrides):
    from histofm.train import TrainConfig, fit
    from ssl_check import SIZE, pretrain_tiles, tiny_vit_kwargs

    torch.manual_seed(0)
    method, views = build_method(
        name, "vit_tiny_patch16_224", img_size=SIZE, overrides={"preset": "cpu_small", "backbone": tiny_vit_kwargs(), **overrides}
    )
    before = copy.deepcopy(method)
    cfg = TrainConfig(steps=steps, batch_size=32, lr=3e-3, warmup_steps=steps // 10, weight_decay=0.05, progress=False, monitor_every=0)
    hist = fit(method, pretrain_tiles(), cfg, transform=views)
    return before, method, hist


def test_beit_on_real_tiles_learns_to_predict_held_out_tokens() -> None:
    from ssl_check import knn_data

    before, method, hist = _pretrain("beit", 100)
    held_out = knn_data()[2]  # bottom rows of each field, never trained on
    before.tokenizer.load_state_dict(method.tokenizer.state_dict())  # the codebook fitted during training, for both
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731 - the same masks for both

    def accuracy(m: MIM) -> tuple[float, float]:
        m.eval()
        with torch.no_grad():
            out, pred, flat = m._losses(held_out, gen())
        return float(out["token_acc"]), float(out["loss"])

    tokens = method.tokenizer.encode(held_out, method.patch_size)
    flat = method.make_masks(len(held_out), (4, 4), torch.device("cpu"), gen()).reshape(len(held_out), -1)
    freq = torch.bincount(tokens[flat], minlength=method.cfg.vocab_size).double() / int(flat.sum())
    majority = float(freq.max())  # always guess the commonest token
    unigram = float(-(freq[freq > 0] * freq[freq > 0].log()).sum())  # CE of the best context-free guess
    (acc0, ce0), (acc1, ce1) = accuracy(before), accuracy(method)
    print(f"BEiT-style: held-out masked-token accuracy {acc0:.3f} -> {acc1:.3f} (majority {majority:.3f}), "
          f"CE {ce0:.2f} -> {ce1:.2f} (token entropy {unigram:.2f})")
    # better than chance, than always guessing the commonest token, and than the best guess that ignores
    # the image (the token frequencies): the predictions use the visible context
    assert acc1 > max(acc0, majority) + 0.02 and ce1 < unigram - 0.1

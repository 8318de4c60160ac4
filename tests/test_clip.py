"""CLIP: BPE tokenizer in the model, loss parity with open_clip, zero-shot on a generated image-caption set."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from PIL import Image, ImageDraw

from histofm import HistofmError
from histofm.data.tokenizer import EOT_ID, SOT_ID, BPETokenizer
from histofm.methods.clip import clip_loss
from histofm.methods.registry import build_method
from histofm.train import TrainConfig, fit
from ssl_check import one_thread, tiny_vit_kwargs

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 220), "yellow": (230, 210, 30)}
SHAPES = ("circle", "square", "triangle")
TEMPLATES = ("a {c} {s}", "a photo of a {c} {s}", "{c} {s} on a grey background", "the {s} is {c}")


def _draw(colour: str, shape: str, rng: random.Random, size: int = 32) -> Image.Image:
    img = Image.new("RGB", (size, size), tuple(rng.randint(100, 160) for _ in range(3)))
    d = ImageDraw.Draw(img)
    r = rng.randint(7, 12)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    fill = tuple(min(255, max(0, v + rng.randint(-25, 25))) for v in COLOURS[colour])
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


class ShapeCaptions(torch.utils.data.Dataset):
    """Generated (image, caption) pairs: 4 colours x 3 shapes, captions from 4 templates."""

    def __init__(self, n: int, seed: int) -> None:
        rng = random.Random(seed)
        self.items = []
        for _ in range(n):
            c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            self.items.append((_draw(c, s, rng), rng.choice(TEMPLATES).format(c=c, s=s), (c, s)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i][0], self.items[i][1]


# ------------------------------------------------------------------------ tokenizer
def test_bpe_tokenizer_round_trip_padding_and_truncation() -> None:
    tok = BPETokenizer(context_length=16)
    ids = tok(["Tumour  nest", "ééé", "x " * 40])
    assert ids.shape == (3, 16) and ids.dtype == torch.long
    assert ids[0, 0] == SOT_ID and tok.decode(ids[0]) == "tumour nest"  # lower-cased, spaces collapsed
    assert (ids[0] == EOT_ID).nonzero().item() == 3 and (ids[0, 4:] == 0).all()  # "tumour", "nest": one id each
    assert tok.decode(ids[1]) == "ééé"  # multi-byte UTF-8
    assert ids[2, -1] == EOT_ID and tok.decode(ids[2]) == " ".join(["x"] * 14)  # truncated, EOT kept
    assert int(ids.max()) < BPETokenizer.vocab_size


# ------------------------------------------------------------------------ loss parity
@pytest.mark.parametrize("batch", [1, 5, 32])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_clip_loss_matches_open_clip(batch: int, scale: float) -> None:
    g = torch.Generator().manual_seed(batch)
    img = F.normalize(torch.randn(batch, 24, generator=g), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(batch, 24, generator=g), dim=1).requires_grad_()
    s = torch.tensor(scale, requires_grad=True)
    ours = clip_loss(img, txt, s)
    ref = ClipLoss()(img, txt, s)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, (img, txt, s)), torch.autograd.grad(ref, (img, txt, s))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------ model
def _build(**over):
    cfg = dict(backbone=tiny_vit_kwargs(), embed_dim=64, text_width=64, text_layers=2, text_heads=2,
               context_length=32, **over)
    return build_method("clip", "vit_tiny_patch16_224", img_size=32, overrides=cfg)


def test_clip_forward_gradients_and_bad_input() -> None:
    torch.manual_seed(0)
    method, transform = _build()
    ds = ShapeCaptions(6, seed=1)
    batch = torch.utils.data.default_collate([(transform(img), cap) for img, cap in ds])
    out = method(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-4)
    assert not [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    # the text embedding is read at EOT: what follows (padding) cannot change it
    a = method.encode_text(["a red circle"])
    t = method.tokenizer(["a red circle"])
    t[0, -1] = 77  # garbage after EOT
    torch.testing.assert_close(method.encode_text(t), a)
    with pytest.raises(HistofmError, match="batch of images"):
        method.zero_shot(torch.zeros(3, 32, 32), ["a", "b"])
    with pytest.raises(HistofmError, match="at least one"):
        method.zero_shot(torch.zeros(1, 3, 32, 32), [])


def test_clip_zero_shot_on_generated_captions() -> None:
    torch.manual_seed(0)
    method, transform = _build(view={"rot90": False})
    train, test = ShapeCaptions(1536, seed=0), ShapeCaptions(240, seed=99)
    cfg = TrainConfig(steps=100, batch_size=64, lr=2e-3, warmup_steps=10, weight_decay=0.05, progress=False,
                      monitor_every=0, seed=0)
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    prompts = [[t.format(c=c, s=s) for t in TEMPLATES] for c, s in classes]
    from histofm.data.augment import eval_view

    ev = eval_view(32)
    x = torch.stack([ev(img) for img, _, _ in test.items])
    y = torch.tensor([classes.index(k) for _, _, k in test.items])
    with one_thread():
        before = (method.zero_shot(x, prompts).argmax(1) == y).float().mean().item()
        hist = fit(method, train, cfg, transform=transform)
        probs = method.zero_shot(x, prompts)
    acc = (probs.argmax(1) == y).float().mean().item()
    colour_acc = np.mean([classes[p][0] == classes[t][0] for p, t in zip(probs.argmax(1).tolist(), y.tolist())])
    print(f"CLIP zero-shot accuracy (12 classes, chance 0.083): before {before:.3f}, after {acc:.3f}; colour {colour_acc:.3f}")
    losses = [h["loss"] for h in hist]
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20
    assert probs.shape == (240, 12) and torch.allclose(probs.sum(1), torch.ones(240))
    assert acc > 0.4 and acc > before + 0.2

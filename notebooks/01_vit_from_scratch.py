# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A Vision Transformer from scratch, on real H&E tiles
#
# This notebook builds a ViT piece by piece with histofm's modules, checks that it is the
# same network timm would build, and trains a tiny one to tell tumour nest from stroma on
# the two bundled real high-grade serous carcinoma fields.
#
# It runs in about ten seconds on two CPU cores.

# %%
import numpy as np
import torch
from PIL import Image

import histofm
from histofm.data import sample_path
from histofm.models.vit import VisionTransformer

torch.manual_seed(0)

# %% [markdown]
# ## 1. Patches become tokens
# A `p x p` patch is flattened and projected to `D` numbers: a convolution with kernel = stride = `p`.

# %%
vit = VisionTransformer(img_size=64, patch_size=8, embed_dim=96, depth=2, num_heads=3)
x = torch.randn(1, 3, 64, 64)
patches = vit.patch_embed(x)  # (B, H/p, W/p, D)
print("patch grid:", tuple(patches.shape))
tokens = vit.prepare_tokens(x)  # class token prepended, positions added
print("tokens before the blocks:", tuple(tokens.shape), "= 1 class token + 64 patches")

# %% [markdown]
# ## 2. Same network as timm
# Parameter names follow timm, so a timm state dict loads with `strict=True` and gives the same outputs.

# %%
import timm  # noqa: E402

ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2)
ours = histofm.create_model("vit_tiny_patch16_224", depth=2)
ours.load_state_dict(ref.state_dict(), strict=True)
with torch.no_grad():
    img = torch.randn(2, 3, 224, 224)
    diff = (ours.eval().forward_features(img) - ref.eval().forward_features(img)).abs().max().item()
print(f"max |ours - timm| = {diff:.2e}")
assert diff < 1e-5

# %% [markdown]
# ## 3. Train a tiny ViT: nest vs stroma
# Tiles from the left 2/3 of each field train, tiles from the right third test, so no tile
# straddles the split.


# %%
def tiles(name: str, size: int = 32, stride: int = 32) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(Image.open(sample_path(name)).convert("RGB").resize((375, 375)), dtype=np.float32) / 255.0
    out, xs = [], []
    for y in range(0, arr.shape[0] - size + 1, stride):
        for x0 in range(0, arr.shape[1] - size + 1, stride):
            out.append(arr[y : y + size, x0 : x0 + size])
            xs.append(x0)
    return np.stack(out), np.array(xs)


nest, nx = tiles("hgsc_nest")
stroma, sx = tiles("hgsc_stroma")
X = torch.from_numpy(np.concatenate([nest, stroma])).permute(0, 3, 1, 2)
y = torch.cat([torch.zeros(len(nest)), torch.ones(len(stroma))]).long()
is_train = torch.from_numpy(np.concatenate([nx, sx]) < 250)
print(f"{int(is_train.sum())} train tiles, {int((~is_train).sum())} test tiles")

model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=2)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
steps = 300  # about 5 s on 2 CPU cores
Xtr, ytr = X[is_train], y[is_train]
for step in range(steps):
    idx = torch.randint(0, len(Xtr), (32,))
    batch = Xtr[idx]
    batch = torch.where(torch.rand(32, 1, 1, 1) < 0.5, batch.flip(-1), batch)  # flip augmentation
    loss = torch.nn.functional.cross_entropy(model(batch), ytr[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % max(steps // 5, 1) == 0:
        print(f"step {step:4d}  loss {loss.item():.3f}")

model.eval()
with torch.no_grad():
    acc = (model(X[~is_train]).argmax(1) == y[~is_train]).float().mean().item()
print(f"held-out accuracy: {acc:.3f} (chance 0.5)")
assert acc > 0.7, "the tiny ViT should separate nest from stroma"

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
# # Self-supervised pretraining on real H&E tiles
#
# No labels: a small ViT learns from tiles of the two bundled high-grade serous carcinoma
# fields (tumour nest, stroma) with SimCLR through histofm's training engine. We watch the
# loss and the collapse metrics while it trains, then check what it learnt with a kNN on
# tissue type (nest vs stroma) on a **held-out region** of each field, against the same
# network at random initialisation.
#
# Full settings take a few minutes on two CPU cores; `HISTOFM_TINY=1` (what CI runs) takes
# seconds and only checks that everything works.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import Image, display

from histofm.data.datasets import bundled_tiles
from histofm.data.stain import hed_to_rgb, rgb_to_hed
from histofm.eval.embed import embed_images
from histofm.eval.knn import knn_predict
from histofm.eval.metrics import balanced_accuracy
from histofm.methods.registry import build_method, list_methods
from histofm.train import TrainConfig, fit
from histofm.utils import seed_everything

TINY = os.environ.get("HISTOFM_TINY") == "1"
OUT = Path(os.environ.get("HISTOFM_NOTEBOOK_OUT", "notebook_out")) / "02_ssl"
STEPS = 20 if TINY else 600
seed_everything(0)
if TINY:
    torch.set_num_threads(1)  # CI: for tensors this small, extra threads cost more than they give
print("methods the engine can train:", ", ".join(list_methods()))

# %% [markdown]
# ## 1. Tiles, and a split that never shares pixels
# Tiles of 64 px (about 32 um at 0.5 um/px) are cut on a grid and shown to the model at 32 px.
# The top 60% of each field gives the pretraining tiles and the kNN memory bank; the bottom
# 40% gives the test tiles. The right quarter of the nest field is stroma, so nest tiles come
# from its left 72%.

# %%
FIELDS = (("hgsc_nest", 0.0, 0.72), ("hgsc_stroma", 0.0, 1.0))


def tiles(rows: tuple[float, float], stride: int | None = None) -> tuple[list, np.ndarray]:
    images, labels = [], []
    for label, (name, x0, x1) in enumerate(FIELDS):
        ds = bundled_tiles(64, sources=(name,), region=(x0, rows[0], x1, rows[1]), stride=stride, out_size=32)
        images += [ds[i] for i in range(len(ds))]
        labels += [label] * len(ds)
    return images, np.array(labels)


pretrain_tiles, _ = tiles((0.0, 0.6), stride=32)  # half-overlapping grid: more views of the same tissue
train_tiles, y_train = tiles((0.0, 0.6))
test_tiles, y_test = tiles((0.6, 1.0))
print(f"{len(pretrain_tiles)} pretraining tiles; kNN: {len(train_tiles)} train, {len(test_tiles)} test tiles")

# %% [markdown]
# ## 2. The method and the engine
# `build_method` returns the method (an `SSLMethod`: a batch in, a dict of losses out) and the
# per-tile view transform. SimCLR makes two augmented views of each tile (random resized crop,
# flips, 90-degree rotations, colour jitter, blur: the pathology variant of the recipe) and
# asks each view to find its partner among the `2N - 1` other views of the batch (NT-Xent).
# With `augment="batch"` the views are drawn on the whole batch at once, which is much faster
# for small tiles. `fit` is the one place that runs the optimiser, the schedules and the
# collapse watch, and writes `log.jsonl`, `loss_curve.png` and the backbone.

# %%
backbone = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
overrides = {"proj_hidden_dim": 256, "proj_dim": 64, "temperature": 0.2, "augment": "batch", "backbone": backbone}
method, views = build_method("simclr", "vit_tiny_patch16_224", img_size=32, overrides=overrides)
random_init = build_method("simclr", "vit_tiny_patch16_224", img_size=32, overrides=overrides)[0].backbone
random_init.load_state_dict(method.backbone.state_dict())  # the same starting point, kept untrained
print(f"backbone: {sum(p.numel() for p in method.backbone.parameters()) / 1e3:.0f}k parameters")

cfg = TrainConfig(
    steps=STEPS, batch_size=32 if TINY else 64, lr=2e-3, warmup_steps=max(STEPS // 10, 1), weight_decay=0.05, seed=0,
    device="cpu", out_dir=str(OUT), ckpt_every=0, log_every=5, monitor_every=max(STEPS // 6, 1),
    monitor_samples=128, tensorboard=False, progress=not TINY,
)
history = fit(method, pretrain_tiles, cfg, transform=views)

# %% [markdown]
# ## 3. The loss curve and the collapse watch
# A collapsed encoder maps every tile to the same point: the loss may still look fine for some
# methods, so the engine logs two numbers on a fixed batch. `embed_std` is the spread of the
# L2-normalised embeddings (`1/sqrt(D)` for vectors spread uniformly, 0 for collapse) and
# `rankme` the effective rank of the embedding matrix (between 1 and `D`).
#
# At full settings the loss falls from about 4.3 to 3.7 while RankMe drops from 7.5 to about 4
# in the first 100 steps and then climbs slowly, and `embed_std` stays near 0.3 of the uniform
# value: not collapsed, but the features use few directions, as expected from two tissue types.

# %%
losses = np.array([h["loss"] for h in history])
k = max(len(losses) // 5, 1)
print(f"loss: first {k} steps {losses[:k].mean():.3f} -> last {k} steps {losses[-k:].mean():.3f}")
display(Image(filename=OUT / "loss_curve.png"))  # written by the engine
watch = pd.DataFrame(
    [(h["step"], h["embed_std"], h["embed_std_ref"], h["rankme"]) for h in history if "rankme" in h],
    columns=["step", "embed_std", "embed_std if uniform", "rankme"],
).set_index("step")
display(watch.round(3))

assert np.isfinite(losses).all()
assert losses[-k:].mean() < losses[:k].mean(), "the contrastive loss should fall"
last = [h for h in history if "rankme" in h][-1]
assert last["rankme"] > 2 and last["embed_std"] > 0.2 * last["embed_std_ref"], "the encoder collapsed"

# %% [markdown]
# ## 4. What did it learn? kNN on tissue type, held-out region
# Frozen features (class token + mean patch token), cosine similarity, the 20 nearest training
# tiles vote with weights `exp(cos / 0.07)`. The metric is balanced accuracy (chance 0.5).
#
# Colour alone nearly separates a tumour nest (dense haematoxylin-blue nuclei) from stroma
# (eosin-pink collagen), so a random network already scores well on clean tiles. The harder
# question is the one pathology cares about: do the features survive a **stain shift**, as
# when the test slides come from another lab? We recolour the test tiles with 1.5x more
# haematoxylin (colour deconvolution into H, E, DAB; scale H; back to RGB) and ask again,
# with the memory bank left as it was.


# %%
def as_batch(ims: list) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in ims]))  # (N, H, W, 3) uint8


def more_haematoxylin(x: torch.Tensor, factor: float = 1.5) -> torch.Tensor:
    hed = rgb_to_hed(x.permute(0, 3, 1, 2).float() / 255.0)  # (N, 3, H, W) stain concentrations
    hed[:, 0] *= factor
    return hed_to_rgb(hed).clamp(0, 1)  # (N, 3, H, W) in [0, 1]


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
x_train, x_test = as_batch(train_tiles), as_batch(test_tiles)
x_shift = more_haematoxylin(x_test)

# the same eight test tiles, as the model sees them: clean (top) and stain-shifted (bottom)
pick = np.concatenate([np.flatnonzero(y_test == c)[:4] for c in (0, 1)])
fig, axes = plt.subplots(2, 8, figsize=(10, 2.8))
for j, i in enumerate(pick):
    axes[0, j].imshow(x_test[i].numpy())
    axes[1, j].imshow(x_shift[i].permute(1, 2, 0).numpy())
    axes[0, j].set_title(("nest", "stroma")[y_test[i]], fontsize=9)
for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
axes[0, 0].set_ylabel("clean")
axes[1, 0].set_ylabel("H x 1.5")
fig.tight_layout()
fig.savefig(OUT / "stain_shift.png", dpi=80)
plt.close(fig)
display(Image(filename=OUT / "stain_shift.png"))

scores = {}
for name, model in (("random init", random_init), ("SimCLR", method.backbone)):
    bank = embed_images(model, x_train, MEAN, STD)
    for test_name, x in (("clean", x_test), ("stain-shifted", x_shift)):
        pred = knn_predict(bank, y_train, embed_images(model, x, MEAN, STD), k=20, temperature=0.07).argmax(1)
        scores[name, test_name] = balanced_accuracy(y_test, pred)
table = pd.Series(scores).unstack().loc[["random init", "SimCLR"], ["clean", "stain-shifted"]]
display(table.round(3))  # kNN balanced accuracy (chance 0.5)
assert all(0.5 <= v <= 1.0 for v in scores.values()), "both encoders should beat chance on this easy task"
if not TINY:
    # the numbers of the full-settings run are in the table above; see the note below
    assert scores["SimCLR", "stain-shifted"] > scores["random init", "stain-shifted"], (
        "SimCLR, trained with colour augmentations, should be more robust to a stain shift"
    )

# %% [markdown]
# Reading the table (full settings): SimCLR ties random initialisation on clean tiles and is
# more robust to the stain shift (0.922 against 0.878 in the run shown; over four full runs on
# this machine with different thread counts, SimCLR scored 0.943-0.965 clean and 0.909-0.922
# shifted, random initialisation 0.958 and 0.878 each time). Training with colour jitter taught
# it to look past part of the colour; it did not make it better on the easy clean task.

# %% [markdown]
# ## 5. Use the pretrained backbone
# The engine exported the backbone (`backbone.safetensors` + `backbone.json`); `load_backbone`
# rebuilds it, ready for feature extraction (`histofm extract --checkpoint ...`) or fine-tuning.

# %%
from histofm.train import load_backbone  # noqa: E402

reloaded = load_backbone(OUT)
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    same = torch.allclose(reloaded.eval()(x), method.backbone.eval()(x), atol=1e-5)
print("reloaded backbone gives the same embeddings:", same)
assert same

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
# # Slide-level learning from tile features: attention MIL and heatmaps
#
# A whole slide has one label ("tumour present") but thousands of tiles, most of which say
# nothing about it. Multiple-instance learning (MIL) treats the slide as a **bag** of tile
# embeddings; an attention aggregator (ABMIL) learns which tiles matter, and its attention
# drawn over the slide is a **heatmap**.
#
# We have no cohort of labelled slides here, so we build one from real tiles with a planted
# signal we control:
#
# * tile features are extracted from the bundled real images: the CMU-1 skin slide, and the
#   two high-grade serous carcinoma fields (tumour nest, stroma);
# * a **positive** synthetic slide is a bag of stroma and skin tiles with a minority of
#   tumour-nest tiles; a **negative** one has no nest tile;
# * training bags use the top 60% of each HGSC field; the heatmap is drawn on a test "slide"
#   made from the bottom 40% of the nest field beside the bottom 40% of the stroma field, so
#   the model never saw those pixels and we know where the tumour is.
#
# Any tile encoder works; to run in seconds on a CPU we use a small ViT at random
# initialisation (it already separates nest from stroma by colour and texture). Swap in a zoo
# model (notebook 03) for real work.

# %%
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import histofm
from histofm.data import sample_path
from histofm.data.augment import eval_view
from histofm.mil import build_aggregator, list_aggregators
from histofm.mil.heatmap import render_heatmap, slide_scores
from histofm.mil.cv import cross_validate
from histofm.mil.data import SlideTable
from histofm.mil.run import load_trained
from histofm.mil.train import MILTrainConfig
from histofm.utils import seed_everything
from histofm.wsi.features import ExtractConfig, extract_features, read_features

TINY = os.environ.get("HISTOFM_TINY") == "1"
OUT = Path(os.environ.get("HISTOFM_NOTEBOOK_OUT", "notebook_out")) / "04_mil"
OUT.mkdir(parents=True, exist_ok=True)
seed_everything(0)
if TINY:
    torch.set_num_threads(1)  # CI: for tensors this small, extra threads cost more than they give
print("aggregators:", ", ".join(list_aggregators()))

# %% [markdown]
# ## 1. Tile features of the real images
# 64 px tiles at 0.5 um/px. The two HGSC fields are JPEGs without resolution metadata, so we
# pass their resolution (about 0.5 um/px) explicitly.

# %%
TILE = 64
encoder = histofm.create_model(
    "vit_tiny_patch16_224", img_size=TILE, patch_size=8, embed_dim=96, depth=2, num_heads=3, global_pool="avg"
).eval()
view = eval_view(TILE)  # to tensor, ImageNet normalisation


def extract(path: Path, mpp: float | None = None, min_tissue: float = 0.25) -> tuple[np.ndarray, np.ndarray, dict]:
    config = ExtractConfig(
        target_mpp=0.5, tile_size=TILE, min_tissue=min_tissue, batch_size=128, device="cpu", overwrite=True
    )
    report = extract_features([path], encoder, OUT / "features", config=config, mpp=mpp, transform=view, progress=False)
    assert not report.failures, report.failures[0].error
    return read_features(OUT / "features" / f"{path.stem}.h5")


skin, _, _ = extract(sample_path("cmu_small_region"))
nest, nest_xy, _ = extract(sample_path("hgsc_nest"), mpp=0.5)
stroma, stroma_xy, _ = extract(sample_path("hgsc_stroma"), mpp=0.5)
H = W = 1500
top = lambda xy: xy[:, 1] + TILE <= 0.6 * H  # noqa: E731
nest_pool = nest[top(nest_xy) & (nest_xy[:, 0] + TILE <= 0.72 * W)]  # the right quarter of the nest field is stroma
stroma_pool = stroma[top(stroma_xy)]
print(f"tiles: skin {len(skin)}, nest pool {len(nest_pool)}, stroma pool {len(stroma_pool)}; {encoder.num_features}-d")

# %% [markdown]
# ## 2. Synthetic slides with a planted signal
# Each bag has 48 tiles; a positive bag hides 4-12 nest tiles among them.

# %%
rng = np.random.default_rng(0)
N_BAGS = 40 if TINY else 120


def bag(positive: bool) -> np.ndarray:
    n_nest = int(rng.integers(4, 13)) if positive else 0
    n_stroma = int(rng.integers(16, 33))
    parts = [
        nest_pool[rng.choice(len(nest_pool), n_nest, replace=False)],
        stroma_pool[rng.choice(len(stroma_pool), n_stroma, replace=False)],
        skin[rng.choice(len(skin), 48 - n_nest - n_stroma, replace=False)],
    ]
    return np.concatenate(parts)[rng.permutation(48)]


labels = np.array([i % 2 for i in range(N_BAGS)])
bags = [torch.from_numpy(bag(bool(y))) for y in labels]
table = SlideTable([f"bag{i:03d}" for i in range(N_BAGS)], labels, [f"patient{i:03d}" for i in range(N_BAGS)], ["normal", "tumour"])

# %% [markdown]
# ## 3. Train gated ABMIL with cross-validation
# `cross_validate` splits the slides into folds (stratified by label, grouped by patient so no
# patient is on both sides), trains one model per fold, and writes the fold models, the
# out-of-fold predictions and the metrics. The command line does the same:
# `histofm mil train --features DIR --labels labels.csv --aggregator abmil`.

# %%
train_cfg = MILTrainConfig(model="abmil", model_kwargs={"hidden_dim": 64, "attn_dim": 32}, epochs=20 if TINY else 40, lr=2e-3, batch_size=4, seed=0)
summary = cross_validate(bags, table, train_cfg, folds=4, out_dir=OUT / "abmil", progress=not TINY)
for m in summary["folds"]:
    print(f"fold {m['fold']}: balanced accuracy {m['balanced_accuracy']:.3f}, AUROC {m['auroc']:.3f}")
print(f"mean AUROC {summary['mean']['auroc']:.3f} +/- {summary['sd']['auroc']:.3f}")
assert summary["mean"]["auroc"] > 0.8, "the planted nest tiles should be found"

# %% [markdown]
# ## 4. The heatmap on an unseen test slide
# The test slide is the bottom 40% of the nest field (left, tumour) beside the bottom 40% of
# the stroma field (right). Each model's attention is turned into percentiles within the
# slide and averaged over the fold models; each tile paints its footprint on the thumbnail.

# %%
nest_img = np.asarray(Image.open(sample_path("hgsc_nest")).convert("RGB"))[int(0.6 * H) :, : int(0.72 * W)]
stroma_img = np.asarray(Image.open(sample_path("hgsc_stroma")).convert("RGB"))[int(0.6 * H) :, :]
test_slide = OUT / "test_slide.png"
Image.fromarray(np.concatenate([nest_img, stroma_img], axis=1)).save(test_slide)
test_feats, test_xy, _ = extract(test_slide, mpp=0.5, min_tissue=0.0)  # all of it is tissue: keep every tile

result = render_heatmap(test_slide, OUT / "features" / "test_slide.h5", OUT / "abmil", OUT / "heatmap", max_size=900)
print(f"P(tumour) = {result['probabilities']['tumour']:.3f} over {result['tiles']} tiles; heatmap: {result['png']}")

models, _ = load_trained(OUT / "abmil")
_, scores = slide_scores(models, test_feats)  # percentile scores in [0, 1]
on_nest = test_xy[:, 0] + TILE <= nest_img.shape[1]
print(f"mean tile score: nest side {scores[on_nest].mean():.2f}, stroma side {scores[~on_nest].mean():.2f}")
assert result["probabilities"]["tumour"] > 0.5
assert scores[on_nest].mean() > scores[~on_nest].mean() + 0.1, "attention should fall on the tumour side"

# %% [markdown]
# ## 5. The real skin slide as a whole
# The CMU-1 crop has no HGSC tumour nest. Its tiles appeared in training only as background,
# in positive and negative bags alike, so the models should call it normal.

# %%
probs, _ = slide_scores(models, skin)
print(f"CMU-1 skin crop: P(tumour) = {probs[1]:.3f}")
agg = build_aggregator("abmil", encoder.num_features, 2, hidden_dim=64, attn_dim=32)
print(f"ABMIL: {sum(p.numel() for p in agg.parameters()) / 1e3:.1f}k parameters")

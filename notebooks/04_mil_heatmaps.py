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
import csv
import json
import os
from pathlib import Path

import h5py
import IPython.display as ipd
import numpy as np
import torch
from PIL import Image

import histofm
from histofm.cli import main
from histofm.data import sample_path
from histofm.data.augment import eval_view
from histofm.eval.metrics import binary_auroc
from histofm.mil import build_aggregator, list_aggregators
from histofm.mil.heatmap import render_heatmap, slide_scores
from histofm.mil.provenance import compared_provenance
from histofm.mil.run import load_trained
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
# ## 2. A cohort of synthetic slides with a planted signal
# Each bag has 48 tiles; a positive bag hides 4-12 nest tiles among them. Two slides per
# patient, with the patient's label. The bags are written as feature files, as `histofm extract`
# writes them, carrying the encoder's provenance (model, mpp, tile size), so `mil train` can
# check that they belong together and `mil predict` / `mil heatmap` that new slides match the run.
# A second, **held-out cohort** of other patients is written to its own folder.

# %%
rng = np.random.default_rng(0)
N_PATIENTS = 20 if TINY else 60
provenance = {k: v for k, v in compared_provenance(OUT / "features" / "hgsc_nest.h5").items() if k != "slide"}
grid = np.stack(np.meshgrid(np.arange(8) * TILE, np.arange(6) * TILE), -1).reshape(-1, 2)  # 48 tile corners


def bag(positive: bool) -> np.ndarray:
    n_nest = int(rng.integers(4, 13)) if positive else 0
    n_stroma = int(rng.integers(16, 33))
    parts = [
        nest_pool[rng.choice(len(nest_pool), n_nest, replace=False)],
        stroma_pool[rng.choice(len(stroma_pool), n_stroma, replace=False)],
        skin[rng.choice(len(skin), 48 - n_nest - n_stroma, replace=False)],
    ]
    return np.concatenate(parts)[rng.permutation(48)]


def write_cohort(folder: Path, n_patients: int, prefix: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(n_patients):
        label = ["normal", "tumour"][p % 2]
        for s in range(2):
            slide = f"{prefix}{p:03d}_{s}"
            with h5py.File(folder / f"{slide}.h5", "w") as f:
                f.create_dataset("features", data=bag(label == "tumour"))
                f.create_dataset("coords", data=grid).attrs["patch_size_level0"] = TILE
                f.attrs.update({**provenance, "slide": slide})
            rows.append([slide, label, f"{prefix}{p:03d}"])
    labels_csv = folder.parent / f"{folder.name}.csv"
    with open(labels_csv, "w", newline="") as f:
        csv.writer(f).writerows([["slide_id", "label", "patient_id"], *rows])
    return labels_csv


train_labels = write_cohort(OUT / "cohort", N_PATIENTS, "patient")
external_labels = write_cohort(OUT / "external", 6 if TINY else 20, "ext")
print(f"{2 * N_PATIENTS} training slides, provenance {provenance}")

# %% [markdown]
# ## 3. Train gated ABMIL with patient-grouped cross-validation
# `mil train` splits the slides into folds (stratified by label, grouped by patient so no
# patient is on both sides); inside each fold it holds out a patient-grouped validation split for
# early stopping; it writes the fold models, `log.jsonl`, the out-of-fold predictions, the metrics
# with bootstrap intervals per fold and pooled, and last the run manifest `run.json`.
# (`histofm.train.mil.cross_validate` is the same from Python.)

# %%
RUN = OUT / "abmil"
assert main(["mil", "train", "--features", str(OUT / "cohort"), "--labels", str(train_labels),
             "--aggregator", "abmil", "--set", "hidden_dim=64", "--set", "attn_dim=32", "--folds", "4",
             "--epochs", "20" if TINY else "40", "--lr", "2e-3", "--batch-size", "4", "--set", "n_boot=200",
             "--device", "cpu", "--out", str(RUN)]) == 0
summary = json.loads((RUN / "metrics.json").read_text())
pooled = summary["pooled"]
print(f"pooled out-of-fold AUROC {pooled['auroc']:.3f} [{pooled['auroc_ci'][0]:.3f}, {pooled['auroc_ci'][1]:.3f}]")
assert summary["mean"]["auroc"] > 0.8, "the planted nest tiles should be found"

# %% [markdown]
# ## 4. Predict on the held-out cohort
# `mil predict` scores slides the run never saw with the ensemble of the fold models and writes
# `predictions.csv` and per-tile scores (`tile_scores/<slide>.h5`).

# %%
assert main(["mil", "predict", "--run", str(RUN), "--features", str(OUT / "external"), "--out", str(OUT / "predict")]) == 0
with open(OUT / "predict" / "predictions.csv") as f:
    predicted = {r["slide_id"]: float(r["prob_tumour"]) for r in csv.DictReader(f)}
with open(external_labels) as f:
    truth = {r["slide_id"]: r["label"] == "tumour" for r in csv.DictReader(f)}
ids = sorted(truth)
external_auroc = binary_auroc([truth[i] for i in ids], [predicted[i] for i in ids])
print(f"held-out cohort: {len(ids)} slides, AUROC {external_auroc:.3f}")
assert external_auroc > 0.8

# %% [markdown]
# ## 5. The heatmap on an unseen test slide, and the same scores for QuPath
# The test slide is the bottom 40% of the nest field (left, tumour) beside the bottom 40% of
# the stroma field (right). Each model's attention is turned into percentiles within the
# slide and averaged over the fold models; each tile paints its footprint on the thumbnail.
# `mil heatmap --out DIR` (here `render_heatmap`) also writes the per-tile scores as HDF5 and
# CSV with level-0 coordinates, and a GeoJSON that QuPath imports (tile objects classified by
# score decile, with the scores as measurements).

# %%
nest_img = np.asarray(Image.open(sample_path("hgsc_nest")).convert("RGB"))[int(0.6 * H) :, : int(0.72 * W)]
stroma_img = np.asarray(Image.open(sample_path("hgsc_stroma")).convert("RGB"))[int(0.6 * H) :, :]
test_slide = OUT / "test_slide.png"
Image.fromarray(np.concatenate([nest_img, stroma_img], axis=1)).save(test_slide)
test_feats, test_xy, _ = extract(test_slide, mpp=0.5, min_tissue=0.0)  # all of it is tissue: keep every tile

result = render_heatmap(test_slide, OUT / "features" / "test_slide.h5", RUN, OUT / "heatmap", max_size=900)
print(f"P(tumour) = {result['probabilities']['tumour']:.3f} over {result['tiles']} tiles by {result['models']}")
print(f"wrote {result['png'].name}, {result['h5'].name}, {result['csv'].name}, {result['geojson'].name}")
ipd.display(ipd.Image(filename=result["png"]))  # left: nest (tumour), right: stroma
geojson = json.loads(result["geojson"].read_text())
print("first QuPath object:", json.dumps(geojson["features"][0])[:300])

models, _ = load_trained(RUN)
_, scores = slide_scores(models, test_feats)  # percentile scores in [0, 1]
on_nest = test_xy[:, 0] + TILE <= nest_img.shape[1]
print(f"mean tile score: nest side {scores[on_nest].mean():.2f}, stroma side {scores[~on_nest].mean():.2f}")
assert result["probabilities"]["tumour"] > 0.5
assert scores[on_nest].mean() > scores[~on_nest].mean() + 0.1, "attention should fall on the tumour side"

# %% [markdown]
# ## 6. The real skin slide as a whole
# The CMU-1 crop has no HGSC tumour nest. Its tiles appeared in training only as background,
# in positive and negative bags alike, so the models should call it normal.

# %%
probs, _ = slide_scores(models, skin)
print(f"CMU-1 skin crop: P(tumour) = {probs[1]:.3f}")
agg = build_aggregator("abmil", encoder.num_features, 2, hidden_dim=64, attn_dim=32)
print(f"ABMIL: {sum(p.numel() for p in agg.parameters()) / 1e3:.1f}k parameters")

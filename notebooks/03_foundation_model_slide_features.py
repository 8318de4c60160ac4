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
# # A pathology foundation model: from a whole-slide image to tile features
#
# The everyday job: take a tile encoder from the model zoo, cut a slide into tissue tiles at
# the encoder's resolution, embed every tile, and store the features with their coordinates
# in an HDF5 file that CLAM, TRIDENT and `histofm mil` read.
#
# **About the weights.** This notebook runs where nothing can be downloaded (CI, offline
# machines), so it writes a checkpoint itself from **randomly initialised** weights, in the
# same layout as the published file, and loads it with `checkpoint_path=`. The features are
# therefore meaningless; every step is otherwise exactly what you run with the real weights.
# With internet access and the licence accepted, use the `pretrained=True` line instead.

# %%
import os
from pathlib import Path

import numpy as np
import torch
from IPython.display import Image, display
from safetensors.torch import save_file

import histofm
from histofm.data import sample_path
from histofm.wsi import detect_tissue, draw_tiles, open_slide, tile_slide, tile_spec
from histofm.wsi.features import ExtractConfig, extract_features, read_features

TINY = os.environ.get("HISTOFM_TINY") == "1"
OUT = Path(os.environ.get("HISTOFM_NOTEBOOK_OUT", "notebook_out")) / "03_features"
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
if TINY:
    torch.set_num_threads(1)  # CI: for tensors this small, extra threads cost more than they give
print(f"histofm {histofm.__version__}: {len(histofm.list_models())} tile encoders registered")

# %% [markdown]
# ## 1. Pick a model and read its card
# `histofm.model_info` says what the weights expect: input size, resolution (microns per
# pixel), normalisation statistics, which token is the embedding, the licence and where the
# weights live. Lunit's ViT-S/16 was trained with DINO on H&E tiles and normalises with
# H&E statistics, not ImageNet's.

# %%
NAME = "lunit_vits16"
print(", ".join(histofm.list_models("*vits*")))
info = histofm.model_info(NAME)
print(f"{info.name}: {info.arch}, {info.num_params / 1e6:.1f}M parameters, {info.embed_dim}-d embedding ({info.embedding})")
print(f"input {info.input_size} at {info.mpp} um/px, mean {info.mean}, std {info.std}")
print(f"trained with {info.method} on {info.data}; {info.paper}; licence: {info.license}; weights: {info.hub_id}")
transform = histofm.eval_transform(NAME)  # the model's own resize + crop + normalisation
print(transform)

# %% [markdown]
# ## 2. Load the weights
# With the real weights, one line downloads and converts them (timm, DINOv2 and Hugging Face
# layouts are handled by the model's checkpoint filter):
#
# ```python
# model = histofm.create_model("lunit_vits16", pretrained=True)
# ```
#
# Here we write a stand-in checkpoint from random weights and load it the same way a local
# file is loaded. Loading never executes code: safetensors, or `torch.load(weights_only=True)`.
# With `HISTOFM_TINY=1` the model keeps only 2 of its 12 blocks so CI stays fast.

# %%
overrides = {"depth": 2} if TINY else {}
# model = histofm.create_model(NAME, pretrained=True)  # the real weights (needs internet)
stand_in = histofm.create_model(NAME, **overrides)
checkpoint = OUT / f"{NAME}_random.safetensors"
save_file({k: v.contiguous() for k, v in stand_in.state_dict().items()}, str(checkpoint))
model = histofm.create_model(NAME, checkpoint_path=checkpoint, **overrides).eval()
x = torch.randn(1, *info.input_size)
with torch.no_grad():
    assert torch.allclose(model(x), stand_in.eval()(x), atol=1e-5), "the checkpoint should load exactly"
print(f"loaded {checkpoint.name}: embedding {tuple(model(x).shape)}")

# %% [markdown]
# ## 3. Tile the bundled slide
# `cmu_small_region.svs` is a real Aperio file (a crop of the public CMU-1 skin slide, 0.499
# um/px). Tissue is found on a thumbnail (saturation + Otsu + morphology), and tiles are
# placed at the model's resolution (0.5 um/px, 224 px); tiles with less than half tissue are
# dropped. The picture shows the tissue in green and the tiles in blue.

# %%
slide_path = sample_path("cmu_small_region")
with open_slide(slide_path) as slide:
    print(slide)
    spec = tile_spec(slide, info.mpp, info.input_size[-1])
    tissue = detect_tissue(slide)
    coords = tile_slide(slide, info.mpp, info.input_size[-1], min_tissue=0.5, tissue=tissue)
    picture = draw_tiles(slide, coords, spec.size_level0, tissue=tissue, max_size=768, title=f"{len(coords)} tiles")
picture.save(OUT / "tiles.png")
print(f"{len(coords)} tissue tiles of {spec.tile_size} px at {spec.target_mpp} um/px (level {spec.level})")
display(Image(filename=OUT / "tiles.png"))
assert len(coords) > 10

# %% [markdown]
# ## 4. Extract features to HDF5
# `extract_features` reads the tiles with a DataLoader, embeds them in batches and writes
# `<slide>.h5` atomically (a crash never leaves half a file; a rerun skips finished slides).
# The command line does the same: `histofm extract slides/ --model lunit_vits16 --out features/`.

# %%
report = extract_features(
    [slide_path], model, OUT / "features",
    config=ExtractConfig(target_mpp=info.mpp, tile_size=info.input_size[-1], batch_size=32, device="cpu"),
    progress=not TINY,
)
print(report.summary())
assert not report.failures, report.failures[0].error if report.failures else ""

# %% [markdown]
# ## 5. Read the file back
# `features (N, D)` float32 and `coords (N, 2)`: the level-0 top-left corner of each tile;
# the attributes record the model, resolution and tile size, so the file describes itself.

# %%
features, feat_coords, attrs = read_features(OUT / "features" / f"{slide_path.stem}.h5")
print(f"features {features.shape}, coords {feat_coords.shape}")
print({k: attrs[k] for k in ("model_name", "mpp", "tile_size", "level0_mpp", "patch_size_level0") if k in attrs})
assert features.shape == (len(coords), info.embed_dim)
assert np.array_equal(feat_coords, coords)
assert np.isfinite(features).all()

# %% [markdown]
# Check one row by hand: read the tile at its coordinates, apply the model's own transform,
# embed it. It must equal the stored feature.

# %%
i = len(coords) // 2
with open_slide(slide_path) as slide:
    tile = slide.read_region_mpp(int(coords[i, 0]), int(coords[i, 1]), info.input_size[-1], info.mpp)
with torch.no_grad():
    by_hand = model(transform(tile)[None])[0].numpy()
err = np.abs(by_hand - features[i]).max()
print(f"tile {i}: max |by hand - stored| = {err:.2e}")
assert err < 1e-3 * max(1.0, np.abs(features[i]).max())

# %% [markdown]
# A slide-level vector is often just the mean of its tile features (the simplest aggregator);
# notebook 04 trains attention-based aggregators on such bags instead.

# %%
slide_embedding = features.mean(0)
print(f"slide embedding: {slide_embedding.shape}, norm {np.linalg.norm(slide_embedding):.2f}")

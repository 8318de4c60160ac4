"""Stain normalisation (Macenko, Reinhard, Vahadane) and the evaluation stain shifts, on real bundled tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchstain
from PIL import Image

from histofm.data.datasets import _load_sample
from histofm.data.stain import (
    DEFAULT_SHIFTS,
    STAIN_SHIFTS,
    StainNormalize,
    apply_stain_shift,
    hed_shift,
    make_stain_transform,
    normalizer,
    rgb_to_hed,
)
from histofm.errors import HistofmError


@pytest.fixture(scope="module")
def tiles() -> dict[str, np.ndarray]:
    nest, stroma, cmu = (_load_sample(n) for n in ("hgsc_nest", "hgsc_stroma", "cmu_small_region"))
    return {
        "nest": np.ascontiguousarray(nest[200:328, 300:428]),
        "nest2": np.ascontiguousarray(nest[900:1028, 700:828]),
        "stroma": np.ascontiguousarray(stroma[400:528, 400:528]),
        "cmu": np.ascontiguousarray(cmu[1100:1228, 1000:1128]),
    }


def _chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("name", ["macenko", "reinhard"])
@pytest.mark.parametrize(("target", "source"), [("cmu", "nest"), ("nest", "stroma"), ("stroma", "cmu")])
def test_parity_with_torchstain(tiles, name: str, target: str, source: str) -> None:
    ours = normalizer(name).fit(tiles[target]).transform(tiles[source]).astype(int)
    if name == "macenko":
        ref = torchstain.normalizers.MacenkoNormalizer(backend="torch")
        ref.fit(_chw(tiles[target]))
        expected = ref.normalize(_chw(tiles[source]), stains=False)[0].numpy()  # (H, W, 3) int, truncated
    else:
        ref = torchstain.normalizers.ReinhardNormalizer(backend="torch")
        ref.fit(_chw(tiles[target]))
        expected = ref.normalize(_chw(tiles[source])).numpy()  # (H, W, 3) uint8, truncated
    diff = np.abs(ours - expected.astype(int))
    # We round where torchstain truncates: at most one grey level apart, and some pixels must move a lot.
    assert diff.max() <= 1, (name, target, source, diff.max())
    assert diff.mean() < 0.75
    assert np.abs(ours - tiles[source].astype(int)).mean() > 3  # it did change the colours


@pytest.mark.parametrize("name", ["macenko", "reinhard", "vahadane"])
def test_layouts_batches_and_types(tiles, name: str) -> None:
    norm = normalizer(name).fit(tiles["cmu"])
    batch = np.stack([tiles["nest"], tiles["stroma"]])  # (2, H, W, 3)
    out = norm.transform(batch)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == batch.shape
    for i in range(2):  # each image of a batch is normalised on its own statistics
        np.testing.assert_array_equal(out[i], norm.transform(batch[i]))
    t = norm.transform(torch.from_numpy(batch))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.uint8
    assert np.abs(t.numpy().astype(int) - out).max() <= 1
    pooled = norm.transform(batch, per_image=False)  # one estimate for both: differs from per-image
    assert pooled.shape == batch.shape and not np.array_equal(pooled, out)
    # As a channels-first training transform, uint8 and float in [0, 1].
    tf = StainNormalize(norm)
    chw = torch.from_numpy(batch).permute(0, 3, 1, 2)
    y = tf(chw)
    assert y.dtype == torch.uint8 and y.shape == chw.shape
    np.testing.assert_array_equal(y.permute(0, 2, 3, 1).numpy(), t.numpy())
    yf = tf(chw[0].float() / 255)
    assert yf.dtype == torch.float32 and yf.shape == (3, 128, 128) and 0 <= yf.min() and yf.max() <= 1


def test_normalised_tiles_take_the_targets_statistics(tiles) -> None:
    """Macenko: the re-estimated stain vectors of the output are the target's; Reinhard: its Lab moments."""
    from histofm.data.stain_norm import MacenkoNormalizer, rgb_to_lab

    mac = MacenkoNormalizer().fit(tiles["cmu"])
    out = mac.transform(tiles["nest"])
    flat = lambda a: torch.from_numpy(a.copy()).float().reshape(1, -1, 3)  # noqa: E731
    he_out, _ = mac.stain_vectors(flat(out))
    he_src, _ = mac.stain_vectors(flat(tiles["nest"]))
    target = mac.target["he"]
    cos_out = torch.nn.functional.cosine_similarity(he_out[0], target, dim=0)
    cos_src = torch.nn.functional.cosine_similarity(he_src[0], target, dim=0)
    assert (cos_out > 0.99).all() and (cos_out > cos_src).all(), (cos_out, cos_src)
    rein = normalizer("reinhard").fit(tiles["cmu"])
    lab = rgb_to_lab(torch.from_numpy(rein.transform(tiles["nest"])).float().reshape(-1, 3) / 255)
    assert torch.allclose(lab.mean(0), rein.target["mean"], atol=1.0)
    assert torch.allclose(lab.std(0), rein.target["std"], rtol=0.1)


def _synthetic(stains: torch.Tensor, seed: int = 0, side: int = 64) -> tuple[np.ndarray, torch.Tensor]:
    """An RGB uint8 image made from known stains ``(2, 3)`` and sparse non-negative concentrations."""
    g = torch.Generator().manual_seed(seed)
    n = side * side
    c = torch.rand(n, 2, generator=g) * torch.tensor([1.2, 0.8])
    c = c * (torch.rand(n, 2, generator=g) < 0.5)  # many pixels hold one stain only
    img = (240 * torch.exp(-c @ stains) - 1).round().clamp(0, 255).to(torch.uint8)
    return img.reshape(side, side, 3).numpy(), c


def test_vahadane_recovers_known_stains() -> None:
    """Unverified against a reference (no installable oracle): properties on an image made from known stains."""
    from histofm.data.stain_norm import VahadaneNormalizer

    true = torch.nn.functional.normalize(torch.tensor([[0.60, 0.75, 0.28], [0.15, 0.95, 0.25]]), dim=1)
    img, _ = _synthetic(true)
    vah = VahadaneNormalizer()
    w, ok = vah.stain_matrix(torch.from_numpy(img).float().reshape(1, -1, 3))
    assert ok.all() and (w >= 0).all()
    cos = (w[0] * true).sum(1)
    assert (cos > 0.98).all(), cos  # H then E, each within ~11 degrees of the truth
    # Non-negative sparse concentrations, and fitting a target from other known stains moves the image there.
    other = torch.nn.functional.normalize(torch.tensor([[0.45, 0.80, 0.40], [0.05, 0.90, 0.43]]), dim=1)
    target, _ = _synthetic(other, seed=1)
    vah.fit(target)
    assert ((vah.target["he"].T * other).sum(1) > 0.98).all()
    out = vah.transform(img)
    w_out, _ = vah.stain_matrix(torch.from_numpy(out).float().reshape(1, -1, 3))
    assert ((w_out[0] * other).sum(1) > 0.97).all()


def test_nonneg_lasso_is_the_exact_optimum() -> None:
    from histofm.data.stain_norm import _nonneg_lasso_2

    g = torch.Generator().manual_seed(0)
    w = torch.nn.functional.normalize(torch.rand(1, 2, 3, generator=g, dtype=torch.float64), dim=2)
    od = torch.rand(1, 200, 3, generator=g, dtype=torch.float64) * 0.8
    lam = 0.05
    c = _nonneg_lasso_2(od, w, lam)
    assert (c >= 0).all()
    cost = lambda cc: ((od - cc @ w[0]) ** 2).sum(-1) + lam * cc.sum(-1)  # noqa: E731
    # Any feasible perturbation costs at least as much (a convex problem: local = global optimum).
    for _ in range(20):
        trial = (c + torch.randn(c.shape, generator=g, dtype=torch.float64) * 0.02).clamp_min(0)
        assert (cost(trial) >= cost(c) - 1e-12).all()


def test_tissue_free_images_pass_through() -> None:
    white = np.full((2, 32, 32, 3), 245, dtype=np.uint8)
    for name in ("macenko", "vahadane"):
        np.testing.assert_array_equal(normalizer(name).transform(white), white)
    with pytest.raises(HistofmError, match="too little stained tissue"):
        normalizer("macenko").fit(white)


def test_bad_input(tiles, tmp_path: Path) -> None:
    with pytest.raises(HistofmError, match="--stain-norm"):
        normalizer("ruifrok")
    with pytest.raises(HistofmError, match="fit"):
        normalizer("reinhard").transform(tiles["nest"])
    with pytest.raises(HistofmError, match="uint8"):
        normalizer("macenko").transform(tiles["nest"].astype(np.float32))
    with pytest.raises(HistofmError, match=r"\(H, W, 3\)"):
        normalizer("macenko").transform(tiles["nest"].transpose(2, 0, 1).copy())
    with pytest.raises(HistofmError, match="--stain-target"):
        make_stain_transform("macenko", tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(HistofmError, match="--stain-target"):
        make_stain_transform("macenko", tmp_path / "bad.png")
    with pytest.raises(HistofmError, match="--stain-shift"):
        apply_stain_shift(tiles["nest"], "hed-purple")


def test_make_stain_transform_for_extraction(tiles, tmp_path: Path) -> None:
    path = tmp_path / "target.png"
    Image.fromarray(tiles["cmu"]).save(path)
    tf = make_stain_transform("macenko", path)
    batch = torch.from_numpy(np.stack([tiles["nest"], tiles["nest2"]])).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
    out = tf(batch)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    np.testing.assert_array_equal(out[0].permute(1, 2, 0).numpy(), normalizer("macenko").fit(tiles["cmu"]).transform(tiles["nest"]))
    assert isinstance(make_stain_transform("reinhard", "hgsc_stroma"), StainNormalize)  # bundled sample names


def test_hed_shift_is_deterministic_and_shifts_the_stain(tiles) -> None:
    x = tiles["nest"]
    same = hed_shift(x)
    assert np.abs(same.astype(int) - x).max() <= 2  # identity up to the HED round trip of 8-bit values
    h = lambda a: rgb_to_hed(torch.from_numpy(a.copy()).permute(2, 0, 1).double() / 255).mean((1, 2))  # noqa: E731
    shifted = hed_shift(x, scale=(0.5, 1.0, 1.0))
    ratio = h(shifted) / h(x)
    assert 0.45 < ratio[0] < 0.6 and 0.95 < ratio[1] < 1.05  # haematoxylin halves, eosin stays
    batch = np.stack([x, tiles["stroma"]])
    a = hed_shift(batch, jitter_sigma=0.3, jitter_bias=0.02, seed=3)
    np.testing.assert_array_equal(a, hed_shift(batch, jitter_sigma=0.3, jitter_bias=0.02, seed=3))
    assert not np.array_equal(a, hed_shift(batch, jitter_sigma=0.3, jitter_bias=0.02, seed=4))
    assert set(DEFAULT_SHIFTS) <= set(STAIN_SHIFTS)
    restained = apply_stain_shift(batch, "macenko:cmu")
    assert restained.shape == batch.shape and np.abs(restained.astype(int) - batch).mean() > 5

"""Tile dataset readers on small files written in the ImageFolder, PCam HDF5 and MedMNIST .npz layouts."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from histofm import HistofmError
from histofm.eval.datasets import ImageFolderDataset, MedMNISTDataset, PCamDataset, load_arrays
from histofm.eval.embed import embed_images, to_model_input, token_embedding


def test_image_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    expected = {}
    for cls in ("tumour", "normal", "stroma"):
        (tmp_path / cls / "sub").mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            path = tmp_path / cls / ("sub" if i == 2 else "") / f"t{i}.png"
            Image.fromarray(arr).save(path)
            expected[path] = arr
    (tmp_path / "normal" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["normal", "stroma", "tumour"] and len(ds) == 9
    for i in range(len(ds)):
        img, label = ds[i]
        path = ds.samples[i][0]
        assert ds.classes[label] == path.relative_to(tmp_path).parts[0]
        np.testing.assert_array_equal(img.numpy(), expected[path])
    x, y = load_arrays(ds)
    assert x.shape == (9, 20, 20, 3) and x.dtype == torch.uint8 and y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    tensor_ds = ImageFolderDataset(tmp_path, transform=lambda im: torch.tensor(im.size))
    assert tensor_ds[0][0].tolist() == [20, 20]


def _write_pcam(root: Path, split: str, x: np.ndarray, y: np.ndarray) -> None:
    with h5py.File(root / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
        f.create_dataset("x", data=x)
    with h5py.File(root / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
        f.create_dataset("y", data=y.reshape(-1, 1, 1, 1))


def test_pcam_hdf5(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (6, 96, 96, 3), dtype=np.uint8)
    y = np.array([0, 1, 1, 0, 1, 0], dtype=np.uint8)
    _write_pcam(tmp_path, "valid", x, y)
    ds = PCamDataset(tmp_path, "valid")
    assert len(ds) == 6 and ds.labels.tolist() == y.tolist()
    np.testing.assert_array_equal(ds[4][0].numpy(), x[4])
    batches = list(DataLoader(ds, batch_size=4, num_workers=2))  # the lazy h5 handle survives worker pickling
    assert batches[0][0].shape == (4, 96, 96, 3) and batches[1][1].tolist() == [1, 0]
    with pytest.raises(HistofmError, match="split_train_x.h5"):
        PCamDataset(tmp_path, "train")


@pytest.mark.parametrize("channels", [None, 3])
def test_medmnist_npz(tmp_path: Path, channels: int | None) -> None:
    rng = np.random.default_rng(2)
    shape = (28, 28) if channels is None else (28, 28, 3)
    data = {}
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        data[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        data[f"{split}_labels"] = rng.integers(0, 9, (n, 1))
    np.savez(tmp_path / "pathmnist.npz", **data)
    ds = MedMNISTDataset(tmp_path / "pathmnist.npz", "test")
    assert len(ds) == 3 and ds.labels.tolist() == data["test_labels"].ravel().tolist()
    img, _ = ds[1]
    assert img.shape == (28, 28, 3)
    src = data["test_images"][1]
    np.testing.assert_array_equal(img.numpy(), src if channels else np.repeat(src[..., None], 3, -1))


def test_bad_dataset_files(tmp_path: Path) -> None:
    with pytest.raises(HistofmError, match="not found"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(HistofmError, match="No images"):
        ImageFolderDataset(tmp_path)
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 4, 4)))
    with pytest.raises(HistofmError, match="train_images"):
        MedMNISTDataset(tmp_path / "bad.npz")
    np.savez(tmp_path / "multi.npz", train_images=np.zeros((2, 4, 4)), train_labels=np.zeros((2, 14)))
    with pytest.raises(HistofmError, match="multi-label"):
        MedMNISTDataset(tmp_path / "multi.npz")
    (tmp_path / "camelyonpatch_level_2_split_test_x.h5").write_bytes(b"not hdf5")
    (tmp_path / "camelyonpatch_level_2_split_test_y.h5").write_bytes(b"not hdf5")
    with pytest.raises(HistofmError, match="not PCam files"):
        PCamDataset(tmp_path, "test")


def test_embeddings_of_a_vit_and_a_plain_module() -> None:
    import histofm

    vit = histofm.create_model("vit_tiny_patch8_224", depth=1).eval()
    images = torch.randint(0, 256, (3, 44, 44, 3), dtype=torch.uint8)  # 44 is not a multiple of 8: padded up to 48
    x = to_model_input(images, (0.5,) * 3, (0.25,) * 3, multiple_of=8)
    assert x.shape == (3, 3, 48, 48)
    emb = embed_images(vit, images, (0.5,) * 3, (0.25,) * 3, batch_size=2)
    with torch.no_grad():
        tokens = vit.forward_features(x)
    expected = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1)
    np.testing.assert_allclose(emb, expected.numpy(), atol=1e-5)
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(5))
    assert token_embedding(plain, x).shape == (3, 5)
    with pytest.raises(HistofmError, match="RGB"):
        to_model_input(torch.zeros(2, 1, 8, 8), (0,) * 3, (1,) * 3)


def test_broken_images_in_a_folder_are_one_sentence(tmp_path: Path) -> None:
    import struct
    import zlib

    from PIL import Image

    from histofm.learning.folder import load_image

    (tmp_path / "a").mkdir()
    good = tmp_path / "a" / "good.png"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(good)
    data = good.read_bytes()
    # a valid header declaring 60000 x 60000 pixels: Pillow refuses it with DecompressionBombError (not an OSError)
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    bomb = data[:8] + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]
    cases = {
        "cut.png": data[: len(data) // 2],  # truncated inside the pixel data
        "bomb.png": bomb,
        "text.png": b"not an image at all",
    }
    for name, payload in cases.items():
        (tmp_path / "a" / name).write_bytes(payload)
    ds = ImageFolderDataset(tmp_path)
    for i, (path, _) in enumerate(ds.samples):
        if path.name == "good.png":
            assert ds[i][0] is not None
            continue
        with pytest.raises(HistofmError, match=path.name):
            ds[i]
        with pytest.raises(HistofmError, match=path.name):
            load_image(path, 8)

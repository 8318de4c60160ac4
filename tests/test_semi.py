"""Semi-supervised learning: views, losses against hand computations, EMA, learning, CLI and bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.colors import rgb_to_hsv
from PIL import Image
from safetensors.torch import load_file

from histofm import HistofmError
from histofm.cli import main
from histofm.learning import build_semi_method
from histofm.learning.fixmatch import fixmatch_unlabelled_loss
from histofm.learning.meanteacher import MeanTeacher, MeanTeacherConfig, consistency_mse, sigmoid_rampup
from histofm.learning.pseudolabel import pseudo_label_weight
from histofm.learning.semi import Classifier, SemiData, SmallConvNet, evaluate
from histofm.learning.tasks import render_synthetic_nuclei, synthetic_nuclei_task
from histofm.learning.views import (
    ViewConfig,
    colour_jitter,
    cutout,
    flip_rot90,
    hed_jitter,
    random_shift,
    strong_view,
    weak_view,
)
from histofm.train.semi import fit_semi, semi_config
from histofm.utils import seed_everything


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions: threads cost more than they win, above all on a shared 2-core runner.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- views


def test_flip_rot90_is_a_symmetry_of_the_square() -> None:
    x = torch.rand(32, 3, 8, 8)
    y = flip_rot90(x, _gen())
    for a, b in zip(x, y):
        candidates = [torch.rot90(v, k, (-2, -1)) for v in (a, a.flip(-1)) for k in range(4)]
        assert any(torch.equal(b, c) for c in candidates)
    assert not torch.equal(x, y)


def test_shift_moves_content_by_whole_pixels() -> None:
    x = torch.rand(8, 3, 16, 16)
    y = random_shift(x, 0.125, _gen(1))  # up to 2 px
    for a, b in zip(x, y):
        # The centre 12 x 12 of the output is a 12 x 12 window of the input.
        assert any(torch.equal(b[:, 2:14, 2:14], a[:, 2 + dy : 14 + dy, 2 + dx : 14 + dx])
                   for dy in range(-2, 3) for dx in range(-2, 3))


def test_colour_jitter_never_shifts_hue() -> None:
    img = np.asarray(Image.open(_sample("hgsc_nest")).convert("RGB").crop((0, 0, 64, 64)), dtype=np.float32) / 255
    x = torch.from_numpy(img).permute(2, 0, 1)[None].repeat(8, 1, 1, 1)
    y = colour_jitter(x, 0.1, 0.1, 0.1, _gen())
    h0 = rgb_to_hsv(x.permute(0, 2, 3, 1).numpy())
    h1 = rgb_to_hsv(y.permute(0, 2, 3, 1).numpy())
    ok = (y > 0.01).all(1) & (y < 0.99).all(1) & torch.from_numpy(h0[..., 1] > 0.1)  # unclipped, coloured pixels
    dh = np.abs(h1[..., 0] - h0[..., 0])[ok.numpy()]
    dh = np.minimum(dh, 1 - dh)
    assert dh.max() < 1e-3
    assert (y - x).abs().mean() > 0.005  # it did change the image


def test_hed_jitter_identity_and_per_image_stain_change() -> None:
    img = np.asarray(Image.open(_sample("hgsc_nest")).convert("RGB").crop((0, 0, 48, 48)), dtype=np.float32) / 255
    x = torch.from_numpy(img).permute(2, 0, 1)[None].repeat(4, 1, 1, 1)
    np.testing.assert_allclose(hed_jitter(x, 1e-12, 1e-12, _gen()).numpy(), x.numpy(), atol=1e-5, rtol=0)
    y = hed_jitter(x, 0.1, 0.02, _gen())
    assert y.min() >= 0 and y.max() <= 1
    means = y.mean((2, 3))
    assert (means[1:] - means[0]).abs().max() > 1e-3  # each image gets its own stain draw


def test_cutout_fills_one_square_with_the_mean_colour() -> None:
    x = torch.rand(4, 3, 20, 20)
    y = cutout(x, 0.25, _gen())
    changed = (y != x).any(1)  # (B, H, W)
    for b in range(4):
        ys, xs = torch.nonzero(changed[b], as_tuple=True)
        assert 9 <= len(ys) <= 25 and ys.max() - ys.min() <= 4 and xs.max() - xs.min() <= 4
        np.testing.assert_allclose(y[b, :, ys[0], xs[0]].numpy(), x[b].mean((1, 2)).numpy(), rtol=1e-6)


def test_views_are_reproducible_for_a_seed() -> None:
    x = torch.rand(6, 3, 16, 16)
    cfg = ViewConfig()
    assert torch.equal(strong_view(x, cfg, _gen(3)), strong_view(x, cfg, _gen(3)))
    assert not torch.equal(weak_view(x, cfg, _gen(3)), weak_view(x, cfg, _gen(4)))


# ----------------------------------------------------------------------------- losses and schedules


def test_fixmatch_unlabelled_loss_by_hand() -> None:
    weak = torch.tensor([[4.0, 0.0, 0.0], [0.1, 0.2, 0.0], [0.0, 0.0, 5.0], [0.0, 3.5, 0.0]], requires_grad=True)
    strong = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0], [0.2, 0.1, 0.3], [0.0, 1.0, 0.0]], requires_grad=True)
    tau = 0.9
    loss, mask_rate = fixmatch_unlabelled_loss(weak, strong, tau)
    w = np.exp(weak.detach().numpy())
    p = w / w.sum(1, keepdims=True)
    s = strong.detach().numpy()
    log_q = s - np.log(np.exp(s).sum(1, keepdims=True))
    terms = [-log_q[i, p[i].argmax()] if p[i].max() >= tau else 0.0 for i in range(4)]
    assert loss.item() == pytest.approx(sum(terms) / 4, rel=1e-6)  # averaged over all images, masked ones too
    assert mask_rate.item() == pytest.approx(np.mean(p.max(1) >= tau))
    loss.backward()
    assert weak.grad is None or weak.grad.abs().sum() == 0  # the pseudo-label is a constant target
    assert strong.grad[1].abs().sum() == 0 and strong.grad[0].abs().sum() > 0


def test_consistency_mse_and_rampups_by_hand() -> None:
    s, t = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)
    assert consistency_mse(s, t).item() == pytest.approx(((ps - pt) ** 2).sum().item())
    assert sigmoid_rampup(0, 10) == pytest.approx(np.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(np.exp(-1.25))
    assert sigmoid_rampup(10, 10) == sigmoid_rampup(50, 10) == 1.0
    assert pseudo_label_weight(5, 100, 3.0, 0.1, 0.6) == 0.0
    assert pseudo_label_weight(35, 100, 3.0, 0.1, 0.6) == pytest.approx(1.5)
    assert pseudo_label_weight(80, 100, 3.0, 0.1, 0.6) == 3.0


def test_mean_teacher_ema_update() -> None:
    torch.manual_seed(0)
    mt = MeanTeacher(Classifier(SmallConvNet(4, 1), 3), MeanTeacherConfig(ema=0.9, ema_rampup=0.9, rampup_frac=0.0))
    old_t = [p.clone() for p in mt.teacher.parameters()]
    with torch.no_grad():
        for p in mt.classifier.parameters():
            p.add_(torch.randn_like(p))
    mt.on_step_end(step=100, max_steps=200)
    for pt, po, ps in zip(mt.teacher.parameters(), old_t, mt.classifier.parameters()):
        np.testing.assert_allclose(pt.detach().numpy(), (0.9 * po + 0.1 * ps).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert all(not p.requires_grad for p in mt.teacher.parameters())
    assert {id(p) for p in mt.trainable_parameters()} == {id(p) for p in mt.classifier.parameters()}


# ----------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def task():
    return synthetic_nuclei_task(n_train=300, n_test=600, label_frac=0.1, size=16, seed=0)


def _train(task, method: str, steps: int, seed: int = 0, mu: int = 3, **cfg) -> tuple[dict[str, float], list[dict[str, float]]]:
    seed_everything(seed)
    m = build_semi_method(method, Classifier(SmallConvNet(16, 1), 3), seed=seed, **cfg)
    hist = fit_semi(m, task.data, semi_config(steps=steps, batch_size=16, lr=0.1, seed=seed, device="cpu"), mu=mu)
    return evaluate(m, task.x_test, task.y_test), hist


def test_task_has_ten_percent_labels_stratified(task) -> None:
    assert len(task.data.x_l) == 30 and len(task.data.x_u) == 270
    assert torch.bincount(task.data.y_l).tolist() == [10, 10, 10]


def test_fixmatch_keeps_up_with_supervised_with_the_same_strong_views_on_average_over_seeds() -> None:
    # 30 labelled + 270 unlabelled generated H&E nucleus tiles (3 classes), 600 test tiles, seeds 0-4.
    # The baseline gets everything FixMatch gets except the unlabelled tiles: the same network, steps,
    # batch, optimiser and the same strong views (most of FixMatch's gain over a weak-view baseline
    # comes from the strong views themselves, docs/semi-supervised.md). Measured gain of FixMatch over
    # it (benchmarks/semi_fixmatch.py --rows supervised+strong "fixmatch t=0.8" --baseline
    # supervised+strong): through the engine, seeds 0-15, mean +0.010, std 0.032; with the previous
    # loop (the same optimiser, other random draws), seeds 0-15, mean +0.030, std 0.049; pooled, +0.020
    # with a standard error of 0.007. So the gain is real but small at 300 steps, and a mean of five
    # seeds (standard error about 0.016) cannot show it: the bound is mean - 2 standard errors = -0.02,
    # i.e. FixMatch must not fall behind the strong baseline beyond noise, and must use the unlabelled
    # tiles, mostly rightly. Seeds 0-4 are the first five, not chosen; they gave +0.031.
    seeds = range(5)
    sup, fm, mask_rate, pseudo_acc = [], [], [], []
    for seed in seeds:
        task = synthetic_nuclei_task(n_train=300, n_test=600, label_frac=0.1, size=16, seed=seed)
        sup.append(_train(task, "supervised", steps=300, seed=seed, strong=True)[0]["balanced_accuracy"])
        acc, hist = _train(task, "fixmatch", steps=300, seed=seed, threshold=0.8)
        fm.append(acc["balanced_accuracy"])
        mask_rate.append(np.mean([h["mask_rate"] for h in hist[-30:]]))
        pseudo_acc.append(np.mean([h["pseudo_acc"] for h in hist[-30:]]))
    gain = np.mean(fm) - np.mean(sup)
    print(f"balanced accuracy with 10 % labels, seeds 0-4: supervised with strong views "
          f"{' '.join(f'{a:.3f}' for a in sup)} (mean {np.mean(sup):.3f}), FixMatch {' '.join(f'{a:.3f}' for a in fm)} "
          f"(mean {np.mean(fm):.3f}), gain {gain:+.3f}; last 30 steps: {np.mean(mask_rate):.2f} of unlabelled "
          f"images confident, {np.mean(pseudo_acc):.2f} of those right")
    assert np.mean(mask_rate) > 0.5 and np.mean(pseudo_acc) > 0.8  # unlabelled images used, mostly rightly
    assert gain > -0.02, (sup, fm)


@pytest.mark.parametrize("method", ["meanteacher", "pseudolabel"])
def test_mean_teacher_and_pseudo_label_learn(task, method: str) -> None:
    acc, hist = _train(task, method, steps=100, mu=1)
    first = np.mean([h["loss_s"] for h in hist[:10]])
    last = np.mean([h["loss_s"] for h in hist[-10:]])
    print(f"{method}: labelled loss {first:.3f} -> {last:.3f}, test balanced accuracy {acc['balanced_accuracy']:.3f}")
    assert last < 0.8 * first
    assert acc["balanced_accuracy"] > 0.45  # chance is 1/3 (600 test tiles: 0.45 is 6 standard deviations above)


def _sample(name: str):
    from histofm.data import sample_path

    return sample_path(name)


# ----------------------------------------------------------------------------- command line


def _write_folder(root, n: int = 48, size: int = 16, n_test: int = 9):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    x = render_synthetic_nuclei(y, size, g)
    names = ["lymphocyte", "tumour", "spindle"]
    (root / "tiles" / "sub").mkdir(parents=True)
    rels = []
    for i in range(n):
        rel = f"sub/t{i:03d}.png" if i % 2 else f"t{i:03d}.png"
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(root / "tiles" / rel)
        rels.append(rel)
    with open(root / "labels.csv", "w") as f:
        f.write("path,label\n" + "".join(f"{rels[i]},{names[int(y[i])]}\n" for i in range(6)))
    with open(root / "test.csv", "w") as f:
        f.write("".join(f"{rels[i]},{names[int(y[i])]}\n" for i in range(n - n_test, n)))
    return rels


@pytest.mark.parametrize("method", ["fixmatch", "meanteacher"])
def test_cli_semi_writes_model_predictions_and_metrics(tmp_path, capsys, method: str) -> None:
    rels = _write_folder(tmp_path)
    out = tmp_path / "run"
    code = main(["semi", "--method", method, "--data", str(tmp_path / "tiles"), "--labels", str(tmp_path / "labels.csv"),
                 "--test-labels", str(tmp_path / "test.csv"), "--out", str(out), "--steps", "4", "--img-size", "16",
                 "--width", "4", "--batch-size", "4", "--mu", "2", "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_labelled"] == 6 and metrics["n_unlabelled"] == 48 - 6 - 9 and metrics["n_test"] == 9
    assert metrics["classes"] == ["lymphocyte", "spindle", "tumour"]
    assert 0 <= metrics["test"]["balanced_accuracy"] <= 1
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(rels[:-9])  # test images are never trained on
    assert all(abs(sum(float(r[f"p_{c}"]) for c in metrics["classes"]) - 1) < 1e-3 for r in rows)
    # The saved weights rebuild a classifier that reproduces the predictions.
    record = json.loads((out / "model.json").read_text())
    clf = Classifier(SmallConvNet(4), len(record["classes"]))
    clf.load_state_dict(load_file(out / "model.safetensors"))
    clf.eval()
    img = np.asarray(Image.open(tmp_path / "tiles" / rows[0]["path"]).convert("RGB"), dtype=np.float32) / 255
    with torch.no_grad():
        p = torch.softmax(clf(torch.from_numpy(img).permute(2, 0, 1)[None]), -1)[0]
    assert [round(float(v), 3) for v in p] == pytest.approx([float(rows[0][f"p_{c}"]) for c in record["classes"]], abs=2e-3)
    with Image.open(out / "loss.png") as im:
        assert im.format == "PNG"


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda r: (r / "labels.csv").write_text("missing.png,tumour\n"), "not images under"),
        (lambda r: (r / "labels.csv").write_text("t000.png,tumour\nsub/t001.png,tumour\n"), "at least two classes"),
        (lambda r: (r / "labels.csv").write_text("t000.png\n"), "row 1 has no value for 'label'"),
        (lambda r: (r / "labels.csv").write_text("t000.png,a\nt000.png,b\n"), "labelled twice"),
        (lambda r: (r / "tiles" / "t002.png").write_bytes(b"not a png"), "Cannot read image"),
        (lambda r: (r / "test.csv").write_text("t000.png,tumour\n"), "both --labels and --test-labels"),
    ],
)
def test_cli_semi_bad_input(tmp_path, capsys, edit, match: str) -> None:
    _write_folder(tmp_path)
    edit(tmp_path)
    code = main(["semi", "--data", str(tmp_path / "tiles"), "--labels", str(tmp_path / "labels.csv"), "--test-labels",
                 str(tmp_path / "test.csv"), "--out", str(tmp_path / "run"), "--steps", "1", "--img-size", "16",
                 "--width", "4", "--device", "cpu", "--no-progress"])
    assert code == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_cli_semi_bad_arguments(tmp_path, capsys) -> None:
    _write_folder(tmp_path)
    base = ["semi", "--data", str(tmp_path / "tiles"), "--labels", str(tmp_path / "labels.csv"), "--out",
            str(tmp_path / "run"), "--img-size", "16", "--device", "cpu", "--no-progress"]
    assert main(base + ["--steps", "0"]) == 2
    assert "--steps 0: steps must be >= 1" in capsys.readouterr().err
    assert main(base + ["--threshold", "1.5"]) == 2
    assert main(base + ["--method", "meanteacher", "--threshold", "0.9"]) == 2
    assert main(base + ["--model", "vit_nonexistent"]) == 2
    assert "Unknown model" in capsys.readouterr().err
    assert main(["semi", "--data", str(tmp_path / "nope"), "--labels", str(tmp_path / "labels.csv"),
                 "--out", str(tmp_path / "run")]) == 2
    assert "Image folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--method", "mixmatch"])


def test_library_bad_input() -> None:
    with pytest.raises(HistofmError, match="Unknown semi-supervised method"):
        build_semi_method("mixmatch", Classifier(SmallConvNet(4, 1), 3))
    with pytest.raises(HistofmError, match="Bad option"):
        build_semi_method("fixmatch", Classifier(SmallConvNet(4, 1), 3), treshold=0.9)
    x = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(HistofmError, match="No unlabelled images"):
        SemiData(x, torch.tensor([0, 1]), x[:0])
    with pytest.raises(HistofmError, match="one label per image"):
        SemiData(x, torch.tensor([0]), x)
    with pytest.raises(HistofmError, match="label_frac"):
        synthetic_nuclei_task(label_frac=1.0)


def test_fit_stops_on_a_diverging_loss() -> None:
    # The engine's non-finite guard: steps with a NaN loss are skipped, and max_nonfinite in a row stop the run.
    x = torch.randint(0, 255, (8, 3, 8, 8), dtype=torch.uint8)
    m = build_semi_method("supervised", Classifier(SmallConvNet(4, 1), 2))
    cfg = semi_config(steps=50, batch_size=4, lr=1e12, device="cpu")
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(HistofmError, match="lower the learning rate"):
        fit_semi(m, SemiData(x, torch.tensor([0, 1] * 4), x), cfg)


def test_classifier_normalises_inside() -> None:
    clf = Classifier(SmallConvNet(4, 1), 2, mean=(0.2, 0.3, 0.4), std=(0.5, 0.5, 0.5)).eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        ref = clf.head(clf.backbone((x - torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)) / 0.5))
        np.testing.assert_allclose(clf(x).numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    assert F.softmax(clf(x), -1).shape == (2, 2)


def test_label_csv_read_like_every_other_csv(tmp_path) -> None:
    """semi's label CSV goes through the one CSV reader: the same BOM, encoding and blank-value rules as mil."""
    from histofm.learning.folder import read_label_csv
    from histofm.mil.data import read_labels_csv

    semi_csv, mil_csv = tmp_path / "semi.csv", tmp_path / "mil.csv"
    semi_csv.write_bytes(b"\xef\xbb\xbfpath,label\na.png,x\nb.png,y\n")
    mil_csv.write_bytes(b"\xef\xbb\xbfslide_id,label\nA,x\nB,y\n")
    assert read_label_csv(semi_csv) == [("a.png", "x"), ("b.png", "y")]  # BOM dropped, header recognised
    assert read_labels_csv(mil_csv).class_names == ["x", "y"]
    for body, needle in ((b"a.png,x\nb.png,\nc.png,y\n", "row 2 has no value for 'label'"),  # blank: never a class
                         (b"a.png,caf\xe9\n", "not UTF-8"), (b"\x89PNG\r\n\x1a\n", "a PNG image")):
        semi_csv.write_bytes(body)
        with pytest.raises(HistofmError, match=needle) as e:
            read_label_csv(semi_csv, "--test-labels")
        assert "--test-labels" in str(e.value) and "\n" not in str(e.value)

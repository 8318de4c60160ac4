"""DINOv2 and Virchow2: KoLeo and Sinkhorn parity with lightly, the KDE regulariser's direction,
backbone options, and the method's forward on real tiles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import KoLeoLoss as LightlyKoLeoLoss
from lightly.loss.swav_loss import sinkhorn as lightly_sinkhorn
from PIL import Image

from histofm import HistofmError
from histofm.data import sample_path
from histofm.methods.dinov2 import PRESETS, config_for
from histofm.methods.losses import KDEUniformityLoss, KoLeoLoss, sinkhorn_knopp
from histofm.methods.registry import build_method

TINY = {"out_dim": 96, "patch_out_dim": 80, "hidden_dim": 64, "bottleneck_dim": 32, "n_local_crops": 2,
        "backbone_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 3}}


# ---------------------------------------------------------------- regularisers
@pytest.mark.parametrize("n,dim", [(8, 16), (32, 64), (100, 7)])
def test_koleo_matches_lightly(n, dim) -> None:
    x = torch.randn(n, dim).requires_grad_()
    a, b = LightlyKoLeoLoss()(x), KoLeoLoss()(x)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(b, x)[0], torch.autograd.grad(a, x)[0], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("n,k,temp", [(8, 16, 0.05), (64, 100, 0.04), (16, 1000, 0.07), (5, 3, 0.1)])
def test_sinkhorn_matches_lightly(n, k, temp) -> None:
    # Cosine-range logits, as produced by the weight-normalised DINO head.
    logits = torch.rand(n, k) * 2 - 1
    ours = sinkhorn_knopp(logits, temp, n_iterations=3)
    torch.testing.assert_close(ours, lightly_sinkhorn(logits, iterations=3, epsilon=temp), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ours.sum(dim=1), torch.ones(n))  # one distribution per sample


def test_sinkhorn_balances_prototypes_and_stays_finite_on_large_logits() -> None:
    logits = torch.randn(256, 32) * 0.1
    logits[:, 0] += 1.0  # prototype 0 would win for every sample under a plain softmax
    q = sinkhorn_knopp(logits, 0.1, n_iterations=20)
    assert F.softmax(logits / 0.1, -1)[:, 0].mean() > 0.9
    torch.testing.assert_close(q.mean(0), torch.full((32,), 1 / 32), atol=2e-3, rtol=0)
    # Where exp(logits / temp) overflows float32 (logits 3..5 at temp 0.04: exp(125)), the
    # max-shift keeps the result finite and equal to the exact one (computed in float64).
    big = torch.rand(8, 10) * 2 + 3
    assert not torch.isfinite(lightly_sinkhorn(big, 3, 0.04)).all()
    exact = lightly_sinkhorn(big.double() - 5, 3, 0.04)
    torch.testing.assert_close(sinkhorn_knopp(big, 0.04).double(), exact, atol=1e-6, rtol=1e-4)


def _spread_after_descent(loss_fn, steps: int = 150) -> tuple[float, float]:
    """Mean pairwise cosine of a tight cluster before and after minimising ``loss_fn`` on it."""
    g = torch.Generator().manual_seed(0)
    centre = F.normalize(torch.randn(1, 16, generator=g), dim=1)
    x = (centre + 0.05 * torch.randn(64, 16, generator=g)).requires_grad_()
    opt = torch.optim.SGD([x], lr=0.5)

    def mean_cos(z: torch.Tensor) -> float:
        z = F.normalize(z.detach(), dim=1)
        return float((z @ z.t()).fill_diagonal_(0).sum() / (64 * 63))

    before = mean_cos(x)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(x).backward()
        opt.step()
    return before, mean_cos(x)


def test_minimising_the_kde_regulariser_spreads_a_cluster_out() -> None:
    kde = KDEUniformityLoss(kappa=5.0)
    before, after = _spread_after_descent(kde)
    assert before > 0.9 and after < 0.1  # the cluster opened up over the sphere
    # The other sign (minimising -mean log density, as in one public implementation) pulls it together.
    before, after = _spread_after_descent(lambda z: -kde(z))
    assert after > 0.99 > before
    # KoLeo, the regulariser KDE replaces, pushes the same way.
    _, after_koleo = _spread_after_descent(KoLeoLoss())
    assert after_koleo < 0.5


def test_kde_value_is_log_mean_kernel() -> None:
    x = torch.randn(5, 4)
    z = F.normalize(x, dim=1)
    k = torch.exp(5.0 * z @ z.t())
    expected = torch.log((k.sum(1) - k.diagonal()) / 4).mean()
    torch.testing.assert_close(KDEUniformityLoss(5.0)(x), expected)
    with pytest.raises(HistofmError, match="two samples"):
        KDEUniformityLoss()(x[:1])
    with pytest.raises(HistofmError, match="two samples"):
        KoLeoLoss()(x[:1])


# -------------------------------------------------------------------- configs
def test_virchow2_is_a_dinov2_configuration() -> None:
    d, v = config_for("dinov2"), config_for("virchow2")
    assert (d.crop, d.regularizer, d.centering) == ("rrc", "koleo", "sinkhorn")
    assert (v.crop, v.regularizer, v.vflip, v.reg_tokens, v.mlp_layer) == ("ect", "kde", True, 4, "swiglu")
    small = config_for("virchow2", {"preset": "cpu_small", "reg_weight": 0.2})
    assert small.crop == "ect" and small.out_dim == PRESETS["cpu_small"]["out_dim"] and small.reg_weight == 0.2
    with pytest.raises(HistofmError, match="centering"):
        config_for("dinov2", {"centering": "softmax"})
    with pytest.raises(HistofmError, match="Unknown option"):
        config_for("dinov2", {"koleo": 0.1})


def _batch(tf, n: int = 4):
    tile = Image.open(sample_path("hgsc_nest")).convert("RGB").crop((300, 300, 396, 396))
    views = [tf(tile) for _ in range(n)]
    return [torch.stack([v[i] for v in views]) for i in range(len(views[0]))]


@pytest.mark.parametrize(
    "name,extra",
    [
        ("dinov2", {}),
        ("dinov2", {"centering": "centering", "reg_tokens": 2, "mlp_layer": "swiglu", "drop_path_rate": 0.2}),
        ("virchow2", {}),
    ],
)
def test_dinov2_forward_backward_on_real_tiles(name, extra) -> None:
    method, tf = build_method(name, "vit_tiny_patch8_224", img_size=32, overrides={**TINY, **extra})
    bb = method.student["backbone"]
    assert bb.blocks[0].ls1.gamma.shape == (48,)  # LayerScale on by default
    if "reg_tokens" in extra or name == "virchow2":
        assert bb.num_reg_tokens == extra.get("reg_tokens", 4)
    if extra.get("mlp_layer") == "swiglu" or name == "virchow2":
        assert type(bb.blocks[0].mlp).__name__ == "SwiGLUPacked"
    if "drop_path_rate" in extra:
        assert bb.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    out = method(_batch(tf))
    reg_key = "aux_kde" if name == "virchow2" else "aux_koleo"
    assert {"loss", "dino_loss", "ibot_loss", reg_key} <= set(out)
    reg_w = method.cfg.reg_weight
    torch.testing.assert_close(out["loss"].detach(), out["dino_loss"] + out["ibot_loss"] + reg_w * out[reg_key])
    out["loss"].backward()
    missing = [n for n, p in method.student.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    method.on_step_end(0, 10)
    assert int(method.step) == 1


# ----------------------------------------------------------- efficient drop path
def test_efficient_drop_path_equals_drop_path_with_the_same_draws() -> None:
    from histofm.models.vit import Block

    blk = Block(32, 4, init_values=0.5, drop_path=0.4).train()
    blk.skip_dropped = True
    x = torch.randn(9, 5, 32)
    torch.manual_seed(3)
    out = blk(x)
    torch.manual_seed(3)
    keep1, keep2 = (torch.rand(9) < 0.6).float(), (torch.rand(9) < 0.6).float()
    assert 0 < keep1.sum() < 9  # some dropped, some kept
    x1 = x + keep1.view(9, 1, 1) * blk.ls1(blk.attn(blk.norm1(x))) / 0.6
    x2 = x1 + keep2.view(9, 1, 1) * blk.ls2(blk.mlp(blk.norm2(x1))) / 0.6
    torch.testing.assert_close(out, x2)
    out.sum().backward()
    assert blk.attn.qkv.weight.grad.abs().sum() > 0


def test_dinov2_student_skips_dropped_branches() -> None:
    method, _ = build_method("dinov2", "vit_tiny_patch8_224", img_size=32, overrides={**TINY, "drop_path_rate": 0.3})
    assert all(b.skip_dropped for b in method.student["backbone"].blocks)
    off, _ = build_method("dinov2", "vit_tiny_patch8_224", img_size=32,
                          overrides={**TINY, "efficient_drop_path": False})
    assert not any(b.skip_dropped for b in off.student["backbone"].blocks)


# ------------------------------------------------------- pretraining on real tiles
def _nucleus_crops(size: int = 48):
    """The nucleus-type task of BASELINES.md: crops centred on each labelled nucleus of the
    bundled HGSC field, split by a 3 x 3 checkerboard of 500 px blocks (train: even blocks)."""
    import numpy as np
    from scipy import ndimage

    img = np.asarray(Image.open(sample_path("hgsc_nest")).convert("RGB"))
    types = np.load(sample_path("hgsc_nest_type_mask"))["nuc_raster"]
    inst = np.load(sample_path("hgsc_nest_inst_mask"))["nuc_raster"]
    ids = np.unique(inst)[1:]
    centres = ndimage.center_of_mass(np.ones_like(inst), inst, ids)
    labels = ndimage.labeled_comprehension(types, inst, ids, lambda v: np.bincount(v, minlength=4)[1:].argmax(), int, -1)
    h = size // 2
    padded = np.pad(img, ((h, h), (h, h), (0, 0)), mode="reflect")
    crops, ys, train = [], [], []
    for (cy, cx), y in zip(centres, labels):
        cy, cx = int(round(cy)), int(round(cx))
        crops.append(padded[cy : cy + size, cx : cx + size])
        ys.append(int(y))
        train.append((cy // 500 + cx // 500) % 2 == 0)
    return np.stack(crops), torch.tensor(ys), torch.tensor(train)


def _embed(backbone, crops, size: int = 32) -> torch.Tensor:
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    backbone.eval()
    with torch.no_grad():
        t = torch.cat([backbone.forward_features(x[i : i + 256]) for i in range(0, len(x), 256)])
    return torch.cat([t[:, 0], t[:, backbone.num_prefix_tokens :].mean(1)], dim=1)  # class token + mean patch


def _knn_balanced_accuracy(z: torch.Tensor, y: torch.Tensor, train: torch.Tensor, k: int = 20, t: float = 0.07) -> float:
    z = F.normalize(z, dim=1)
    sim = z[~train] @ z[train].t()
    val, idx = sim.topk(k, dim=1)
    votes = torch.zeros(len(val), int(y.max()) + 1).scatter_add_(1, y[train][idx], (val / t).exp())
    pred, truth = votes.argmax(1), y[~train]
    return float(torch.stack([(pred[truth == c] == c).float().mean() for c in truth.unique()]).mean())


@pytest.fixture
def _one_thread():
    # Tiny matrices gain nothing from a second thread, and on a busy 2-core machine
    # spinning threads cost several times the work.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_dinov2_cpu_small_pretrains_on_real_tiles(tmp_path, _one_thread) -> None:
    import histofm
    from histofm.data.datasets import bundled_tiles
    from histofm.methods.dinov2 import PRESET_TRAIN
    from histofm.train import TrainConfig, fit

    arch_kw = {"depth": 3, "embed_dim": 96}
    tiles = bundled_tiles(48, sources=("hgsc_nest", "hgsc_stroma"), region=(0.0, 0.0, 0.6, 1.0), stride=24)
    method, views = build_method("dinov2", "vit_tiny_patch8_224", img_size=32,
                                 overrides={"preset": "cpu_small", "backbone_kwargs": arch_kw})
    crops, y, train = _nucleus_crops()
    random_init = _knn_balanced_accuracy(_embed(method.backbone, crops), y, train)

    cfg = TrainConfig(steps=200, seed=0, out_dir=str(tmp_path), monitor_every=50, ckpt_every=0, progress=False,
                      tensorboard=False, **PRESET_TRAIN["cpu_small"])
    history = fit(method, tiles, cfg, transform=views)

    losses = [r["loss"] for r in history]
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 0.5  # the loss falls
    last = [r for r in history if "rankme" in r][-1]
    assert last["embed_std"] > 0.5 * last["embed_std_ref"] and last["rankme"] > 10  # no collapse
    # The exported backbone loads directly with create_model and gives the teacher's features.
    loaded = histofm.create_model("vit_tiny_patch8_224", checkpoint_path=tmp_path / "backbone.safetensors",
                                  img_size=32, **arch_kw)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), method.backbone.eval()(x))
    # kNN on the held-out blocks of the nucleus task beats the same network at initialisation.
    trained = _knn_balanced_accuracy(_embed(method.backbone, crops), y, train)
    print(f"nucleus kNN balanced accuracy: random init {random_init:.3f}, after 200 steps {trained:.3f}; "
          f"rankme {last['rankme']:.1f}, embed_std {last['embed_std']:.3f}")
    assert trained > random_init + 0.015  # measured: 0.696 -> 0.731 (seed 0), 0.694 -> 0.723 (seed 1)


def test_backbone_arguments_in_command_line_form() -> None:
    cfg = config_for("dinov2", {"backbone": {"depth": 2}, "backbone.embed_dim": 48, "preset": "cpu_small"})
    assert cfg.backbone_kwargs == {"depth": 2, "embed_dim": 48}

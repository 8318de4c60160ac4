"""Aggregator parity: the same weights in torchmil's ABMIL / CLAM-SB / DSMIL / TransMIL and in ours give the
same outputs, and our Nystrom attention matches the ``nystrom-attention`` package (lucidrains).

torchmil's models are binary (one logit), so ours are built with ``num_classes=1``;
its ``feat_ext`` is set to the ``Linear + ReLU`` projection our aggregators start with.
The converters below map torchmil's parameter names onto ours. What differs by design
(and is therefore set to neutral values, or not compared) is said at each test.
"""

from __future__ import annotations

import nystrom_attention as lucidrains
import pytest
import torch
import torchmil.models as torchmil_models
from torch import nn

from histofm.mil import build_aggregator
from histofm.mil.transmil import NystromAttention

D, H, A = 12, 16, 8


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _feat_ext(dim: int = H) -> nn.Module:
    return nn.Sequential(nn.Linear(D, dim), nn.ReLU())


def _bags() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(3, 20, D)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 13:] = False  # a shorter bag padded beside longer ones
    mask[2, 7:] = False
    return x, mask


def plain_state(theirs: nn.Module) -> dict[str, torch.Tensor]:
    """torchmil's state dict without the ``.module`` of its LazyLinear wrappers."""
    return {k.replace(".module.", "."): v for k, v in theirs.state_dict().items()}


def abmil_state(theirs: nn.Module, w_bias: float = 0.3) -> dict[str, torch.Tensor]:
    """torchmil ABMIL / CLAM_SB -> our ABMIL / CLAM-SB names."""
    sd = plain_state(theirs)
    out = {
        "fc.0.weight": sd["feat_ext.0.weight"], "fc.0.bias": sd["feat_ext.0.bias"],
        "attention.V.weight": sd["pool.fc1.weight"], "attention.V.bias": sd["pool.fc1.bias"],
        "attention.w.weight": sd["pool.fc2.weight"],
        # torchmil's attention output layer has no bias; a constant added to every tile's
        # attention logit cancels in the softmax, so any value must give the same outputs.
        "attention.w.bias": torch.full((1,), w_bias),
        "classifier.weight": sd["classifier.weight"], "classifier.bias": sd["classifier.bias"],
    }
    if "pool.fc_gated.weight" in sd:
        out.update({"attention.U.weight": sd["pool.fc_gated.weight"], "attention.U.bias": sd["pool.fc_gated.bias"]})
    return out


@pytest.mark.parametrize("gated", [True, False])
def test_abmil_matches_torchmil(gated: bool) -> None:
    theirs = torchmil_models.ABMIL(in_shape=(D,), att_dim=A, gated=gated, feat_ext=_feat_ext()).eval()
    ours = build_aggregator("abmil", D, 1, hidden_dim=H, attn_dim=A, gated=gated, dropout=0.0).eval()
    ours.load_state_dict(abmil_state(theirs))
    x, mask = _bags()
    with torch.no_grad():
        logit, att = theirs(x, mask, return_att=True)
        out = ours(x, mask)
    torch.testing.assert_close(out.logits[:, 0], logit, rtol=1e-5, atol=1e-6)
    expected = torch.softmax(att.masked_fill(~mask, float("-inf")), dim=1)  # torchmil returns logits
    torch.testing.assert_close(out.scores, expected, rtol=1e-5, atol=1e-6)


def test_clam_sb_forward_matches_torchmil() -> None:
    """CLAM-SB's forward is gated ABMIL's. Not compared: the instance loss, which differs by design:
    torchmil uses CLAM's smooth top-1 SVM on ``k = min(k_sample, N)`` top and bottom tiles and sums
    over bags; ours is cross-entropy on ``k = min(k_sample, N // 2)`` (so top and bottom never overlap),
    averaged over bags."""
    theirs = torchmil_models.CLAM_SB(in_shape=(D,), att_dim=A, gated=True, feat_ext=_feat_ext()).eval()
    ours = build_aggregator("clam_sb", D, 1, hidden_dim=H, attn_dim=A, dropout=0.0).eval()
    sd = abmil_state(theirs)
    sd = {k.replace("classifier.", "classifiers."): v for k, v in sd.items()}
    inst = plain_state(theirs)
    sd.update({"instance_classifiers.0.weight": inst["inst_classifiers.0.weight"],
               "instance_classifiers.0.bias": inst["inst_classifiers.0.bias"]})
    ours.load_state_dict(sd)
    x, mask = _bags()
    with torch.no_grad():
        logit, att = theirs(x, mask, return_att=True)
        out = ours(x, mask)
    torch.testing.assert_close(out.logits[:, 0], logit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.scores, torch.softmax(att.masked_fill(~mask, float("-inf")), 1), rtol=1e-5, atol=1e-6)


def test_dsmil_matches_torchmil() -> None:
    """torchmil's ``nonlinear_q`` / ``nonlinear_v`` DSMIL is ours. Its forward returns the bag stream; the
    prediction, as in the paper and in its ``compute_loss``, is the mean of the bag and max streams: ours.
    Compared bag by bag without padding: with a mask, torchmil picks the critical instance among all
    positions, padded ones included (its instance logits are not masked before the arg-max); ours
    only among real tiles, so a padded batch gives each bag its unpadded result."""
    theirs = torchmil_models.DSMIL(in_shape=(D,), att_dim=A, nonlinear_q=True, nonlinear_v=True, dropout=0.0,
                                   feat_ext=_feat_ext()).eval()
    ours = build_aggregator("dsmil", D, 1, hidden_dim=H, query_dim=A, dropout=0.0).eval()
    sd = theirs.state_dict()
    ours.load_state_dict({
        "fc.0.weight": sd["feat_ext.0.weight"], "fc.0.bias": sd["feat_ext.0.bias"],
        "instance_classifier.weight": sd["inst_classifier.weight"], "instance_classifier.bias": sd["inst_classifier.bias"],
        "query.0.weight": sd["q_nn.0.weight"], "query.0.bias": sd["q_nn.0.bias"],
        "query.2.weight": sd["q_nn.2.weight"], "query.2.bias": sd["q_nn.2.bias"],
        "value.1.weight": sd["v_nn.1.weight"], "value.1.bias": sd["v_nn.1.bias"],
        "bag_classifier.weight": sd["bag_classifier.weight"].reshape(1, 1, H),  # Linear(H, 1) == Conv1d(1, 1, H)
        "bag_classifier.bias": sd["bag_classifier.bias"],
    })
    x, mask = _bags()
    with torch.no_grad():
        out = ours(x, mask)
        for b in range(len(x)):
            n = int(mask[b].sum())
            bag_logit, att, inst = theirs(x[b : b + 1, :n], return_att=True, return_inst_pred=True)
            expected = 0.5 * (bag_logit + inst.max(dim=1).values)
            torch.testing.assert_close(out.logits[b : b + 1, 0], expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out.scores[b, :n], att[0, :, 0], rtol=1e-5, atol=1e-6)


def _neutral_nystrom(attn: NystromAttention) -> None:
    """Our Nystrom block with an identity output projection and no value-convolution residual."""
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(attn.proj.weight.shape[0]))
        attn.proj.bias.zero_()
        attn.res_conv.weight.zero_()


@pytest.mark.parametrize("n_tiles", [25, 20])
def test_transmil_matches_torchmil(n_tiles: int) -> None:
    """torchmil's TransMIL differs from the original (Shao et al.'s code, which uses lucidrains' Nystrom
    attention) in two ways, so those parts of ours are set to neutral values here: its attention has no
    output projection (``out_proj`` is an identity when ``att_dim == out_dim``) and no depthwise-convolution
    residual on the values. The input projection of torchmil is a plain Linear; ours is Linear + ReLU, given
    to torchmil as its ``feat_ext``. The token count ``side^2 + 1`` is a multiple of the landmarks here;
    otherwise torchmil pads zero tokens in front (see the Nystrom test). Scores are compared where no tile
    is repeated to fill the square (25 tiles): torchmil returns the class token's attention to the first
    ``N`` grid cells, ours adds a repeated tile's attention to the tile it copies. One head and one bag:
    the pseudo-inverse starts differently for several (see the Nystrom tests)."""
    dim, heads, side = 16, 1, 5
    tokens = side * side + 1  # 26
    theirs = torchmil_models.TransMIL(in_shape=(D,), att_dim=dim, n_layers=2, n_heads=heads, n_landmarks=13,
                                      feat_ext=_feat_ext(dim)).eval()
    ours = build_aggregator("transmil", D, 1, dim=dim, num_heads=heads, num_landmarks=13, dropout=0.0,
                            score_layer=2).eval()
    assert tokens % 13 == 0
    sd = theirs.state_dict()
    mine = {"fc.0.weight": sd["feat_ext.0.weight"], "fc.0.bias": sd["feat_ext.0.bias"], "cls_token": sd["cls_token"],
            "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"],
            "head.weight": sd["classifier.weight"], "head.bias": sd["classifier.bias"]}
    for i in range(2):
        mine[f"layer{i + 1}.norm.weight"] = sd[f"layers.{i}.norm1.weight"]
        mine[f"layer{i + 1}.norm.bias"] = sd[f"layers.{i}.norm1.bias"]
        mine[f"layer{i + 1}.attn.qkv.weight"] = sd[f"layers.{i}.att_module.qkv_nn.weight"]
    for name in ("proj", "proj1", "proj2"):
        for p in ("weight", "bias"):
            mine[f"pos.{name}.{p}"] = sd[f"pos_layer.{name}.{p}"]
    missing, unexpected = ours.load_state_dict(mine, strict=False)
    assert not unexpected and all(".attn.proj." in k or ".attn.res_conv." in k for k in missing)
    _neutral_nystrom(ours.layer1.attn)
    _neutral_nystrom(ours.layer2.attn)
    x = torch.randn(1, n_tiles, D)
    with torch.no_grad():
        logit, att = theirs(x, return_att=True)
        out = ours(x)
    torch.testing.assert_close(out.logits[:, 0], logit, rtol=1e-4, atol=1e-5)
    if n_tiles == side * side:
        torch.testing.assert_close(out.scores, att, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,m", [(32, 8), (48, 16), (12, 12)])
def test_nystrom_attention_matches_lucidrains(n: int, m: int) -> None:
    """Same weights (``to_qkv`` -> ``qkv``, ``to_out.0`` -> ``proj``, ``res_conv`` -> ``res_conv``), same outputs
    and same first-row attention for one bag and one head, with ``n`` a multiple of the landmarks.

    Two differences by design. (1) lucidrains (and torchmil) start the iterative pseudo-inverse from
    ``X^T / (max col sum * max row sum)`` with the maxima over the WHOLE batch and all heads, so one bag's
    output depends on the other bags in its batch; ours takes them per matrix (a padded batch gives each
    bag its own result, tested for every aggregator). With several heads or bags the two agree once the
    iteration has converged (second test). (2) When ``n`` is not a multiple of the landmarks, lucidrains
    pads zero tokens in front and those zero keys take part in every softmax; ours never adds tokens and
    averages nearly equal segments of the real ones instead."""
    dim, head_dim = 32, 8
    theirs, ours = _nystrom_pair(dim, 1, head_dim, m, iterations=6)
    x = torch.randn(1, n, dim)
    with torch.no_grad():
        ref, attn = theirs(x, return_attn=True)
        out, first = ours(x, first_token_scores=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first, attn[:, :, 0].mean(1), rtol=1e-4, atol=1e-6)


def test_nystrom_attention_several_heads_and_bags_agree_once_converged() -> None:
    theirs, ours = _nystrom_pair(32, 4, 8, 8, iterations=40)
    theirs, ours = theirs.double(), ours.double()  # float64: the iteration converges instead of stalling at float32 noise
    x = torch.randn(2, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref, attn = theirs(x, return_attn=True)
        out, first = ours(x, first_token_scores=True)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)  # after 6 iterations they differ by up to ~1e-3
    torch.testing.assert_close(first, attn[:, :, 0].mean(1), rtol=1e-6, atol=1e-8)


def _nystrom_pair(dim: int, heads: int, head_dim: int, m: int, iterations: int) -> tuple[nn.Module, NystromAttention]:
    theirs = lucidrains.NystromAttention(dim=dim, dim_head=head_dim, heads=heads, num_landmarks=m,
                                         pinv_iterations=iterations, residual=True, residual_conv_kernel=33).eval()
    ours = NystromAttention(dim, heads, head_dim, num_landmarks=m, pinv_iterations=iterations, residual_kernel=33).eval()
    sd = theirs.state_dict()
    ours.load_state_dict({"qkv.weight": sd["to_qkv.weight"], "proj.weight": sd["to_out.0.weight"],
                          "proj.bias": sd["to_out.0.bias"], "res_conv.weight": sd["res_conv.weight"]})
    return theirs, ours

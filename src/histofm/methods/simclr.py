"""SimCLR: contrastive learning of visual representations (Chen et al. 2020, arXiv 2002.05709).

Two random views of each image go through the same encoder ``f`` and a small
MLP projector ``g``; each view must pick out its partner among the ``2N - 1``
other views of the batch. With ``z`` the L2-normalised projections,
``sim(u, v) = u^T v`` and temperature ``tau``, the NT-Xent loss of the positive
pair ``(i, j)`` is::

    l(i, j) = -log  exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau)

and the batch loss averages ``l`` over all ``2N`` anchors (both directions of
each pair). The original TensorFlow code SUMS the two directions (each a mean
over ``N`` anchors), giving exactly twice this value; ``lightly.loss.NTXentLoss``
averages them, and so do we: gradients are half as large, so a learning rate
tuned with the TF code must be doubled here. Under data parallelism, negatives
come from the whole global batch through a gradient-preserving all-gather.

The encoder's pooled embedding is the representation; the projector (Linear,
BatchNorm, ReLU, Linear; 2048 -> 128 by default) is thrown away after training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from histofm.data.augment import BatchAugment, ViewConfig
from histofm.errors import HistofmError
from histofm.layers.heads import ProjectionHead
from histofm.methods.base import SSLMethod
from histofm.methods.views import make_backbone, make_views, view_config, view_pipeline
from histofm.settings import check_config, config_replace, setting, split_backbone_overrides
from histofm.utils.distributed import gather_with_grad, rank


def nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float = 0.1, gather: bool = True) -> torch.Tensor:
    """NT-Xent over the pairs ``(z0[i], z1[i])`` ``(B, D)``, averaged over all ``2B`` anchors.

    With ``gather=True`` inside a process group, the candidates are the views of the
    global batch and each rank averages over its own anchors.
    """
    z0, z1 = F.normalize(z0, dim=-1), F.normalize(z1, dim=-1)
    b = z0.shape[0]
    all0, all1 = (gather_with_grad(z0), gather_with_grad(z1)) if gather else (z0, z1)
    n = all0.shape[0]
    offset = rank() * b if n != b else 0
    anchors = torch.cat([z0, z1])  # (2B, D)
    candidates = torch.cat([all0, all1])  # (2N, D)
    logits = anchors @ candidates.T / temperature  # (2B, 2N)
    idx = torch.arange(b, device=z0.device) + offset
    self_idx = torch.cat([idx, idx + n])  # where each anchor meets itself
    pos_idx = torch.cat([idx + n, idx])  # its partner view
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(2 * b, device=z0.device), self_idx] = True
    logits = logits.masked_fill(self_mask, float("-inf"))  # a view is not its own negative
    return F.cross_entropy(logits.float(), pos_idx)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent`."""

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise HistofmError(f"temperature must be positive, got {temperature}; set e.g. --set temperature=0.1.")
        self.temperature, self.gather_distributed = temperature, gather_distributed

    def forward(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        return nt_xent(z0, z1, self.temperature, self.gather_distributed)


@dataclass(frozen=True)
class SimCLRConfig:
    """SimCLR hyper-parameters and its view recipe.

    Attributes:
        temperature: ``tau`` of NT-Xent (0.1; the paper's best for large batches is 0.1-0.5).
        proj_hidden_dim, proj_dim, proj_layers, proj_bn: the projector MLP.
        gather_distributed: negatives from all ranks under data parallelism.
        view: :class:`ViewConfig` fields for both views (``size`` and normalisation are filled in).
        augment: ``"sample"``: per-sample torchvision views built in the data loader;
            ``"batch"``: the loader only resizes (to ``base_size``) and the method draws both views
            with :class:`BatchAugment` on the batch's device (much faster for small tiles and on GPU).
        base_size: side of the tiles handed to :class:`BatchAugment` (0: ``img_size``).
    """

    temperature: float = setting(0.1, range="> 0")
    proj_hidden_dim: int = setting(2048, range=">= 1")
    proj_dim: int = setting(128, range=">= 1")
    proj_layers: int = setting(2, range=">= 1")
    proj_bn: bool = True
    gather_distributed: bool = True
    view: dict[str, Any] = setting(default_factory=dict, of=ViewConfig)
    augment: Literal["sample", "batch"] = "sample"
    base_size: int = setting(0, range=">= 1", allow_zero=True)

    def __post_init__(self) -> None:
        check_config(self)



class SimCLR(SSLMethod):
    """SimCLR on any backbone whose ``forward`` returns a pooled embedding ``(B, D)``."""

    def __init__(
        self, backbone: nn.Module, cfg: SimCLRConfig = SimCLRConfig(), batch_augment: BatchAugment | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        dim = backbone.num_features
        self.projector = ProjectionHead(dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers, cfg.proj_bn)
        self.criterion = NTXentLoss(cfg.temperature, cfg.gather_distributed)
        self.batch_augment = batch_augment

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401
        v0, v1 = make_views(batch, [self.batch_augment] * 2)[:2]  # (B, C, H, W) each
        z = self.projector(self.backbone(torch.cat([v0, v1])))  # one pass over both views: (2B, P)
        z0, z1 = z.chunk(2)
        loss = self.criterion(z0, z1)
        return {"loss": loss}


def build(name: str, arch: str, *, img_size: int, overrides: dict[str, Any]) -> tuple[SimCLR, Callable[[Any], Any]]:
    """``histofm pretrain --method simclr``: SimCLR on ``create_model(arch)`` and its two-view transform."""
    cfg_kw, backbone_kw = split_backbone_overrides(overrides)
    cfg = config_replace(SimCLRConfig(), cfg_kw)
    view = view_config(arch, img_size, cfg.view)
    transform, augmenters = view_pipeline([view, view], cfg.augment, cfg.base_size)
    method = SimCLR(make_backbone(arch, img_size, backbone_kw), cfg, augmenters[0])
    return method, transform

"""MoCo: momentum contrast, v2 (queue of negatives) and v3 (in-batch negatives, predictor).

MoCo v1/v2 (He et al. 2019, arXiv 1911.05722; Chen et al. 2020, arXiv 2003.04297)
keep a *momentum encoder* ``f_k`` whose weights trail the query encoder ``f_q``,
``theta_k <- m theta_k + (1 - m) theta_q`` (m = 0.999), and a FIFO *queue* of the
last ``K`` keys (65,536) as negatives, so the dictionary is large and consistent
without a large batch. For a query ``q`` (view 1) and its key ``k+`` (view 2, from
``f_k``), all L2-normalised, with temperature ``tau`` (0.2 in v2)::

    L_q = -log  exp(q . k+ / tau) / ( exp(q . k+ / tau) + sum_{k in queue} exp(q . k / tau) )

After the loss the batch's keys (from every rank) are enqueued and the oldest
dropped. v2 adds an MLP projector and SimCLR's augmentations to v1. Shuffling
BatchNorm across GPUs (v1's trick against leaking batch statistics) is not needed
here: ViT backbones and the v2 projector have no BatchNorm.

MoCo v3 (Chen, Xie & He 2021, arXiv 2104.02057) drops the queue: keys of the
(global) batch are the negatives, a predictor ``g`` sits on the query branch,
and the loss is symmetrised::

    ctr(q, k) = CE(q k^T / tau, labels = arange(N)) * 2 tau
    L = ctr(g(f_q(x1)), f_k(x2)) + ctr(g(f_q(x2)), f_k(x1))

The ``2 tau`` factor makes the gradient scale independent of ``tau`` (0.2 for
ViT). The momentum rises from 0.99 to 1 on a half cosine over training. The
projector is a 3-layer MLP (4096 hidden, 256 out, BatchNorm, the last one without
affine parameters), the predictor a 2-layer MLP. Under data parallelism keys are
gathered from all ranks (they carry no gradient) and each rank's queries are
labelled with their global index.
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
from histofm.utils.distributed import gather_no_grad, rank
from histofm.utils.ema import ema_update, make_teacher
from histofm.utils.schedules import momentum_schedule


# ---------------------------------------------------------------------------- losses
def moco_v2_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of queries ``q`` ``(B, D)`` against their keys ``k`` ``(B, D)`` and a queue ``(K, D)``.

    Inputs are L2-normalised here; the queue is assumed normalised already.
    """
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    pos = (q * k).sum(-1, keepdim=True)  # (B, 1)
    neg = q @ queue.T  # (B, K)
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits.float(), torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def moco_v3_ctr(q: torch.Tensor, k: torch.Tensor, temperature: float, gather: bool = True) -> torch.Tensor:
    """``CE(q k_all^T / tau, global index) * 2 tau`` with ``k`` gathered from all ranks (no gradient)."""
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    k_all = gather_no_grad(k) if gather else k  # (N, D)
    labels = torch.arange(q.shape[0], device=q.device) + (rank() * q.shape[0] if k_all.shape[0] != q.shape[0] else 0)
    logits = q @ k_all.T / temperature  # (B, N)
    return F.cross_entropy(logits.float(), labels) * 2 * temperature


# ---------------------------------------------------------------------------- config
@dataclass(frozen=True)
class MoCoConfig:
    """MoCo v2 / v3 hyper-parameters (defaults: v2 of the paper; :func:`build` applies v3's).

    Attributes:
        version: 2 or 3.
        temperature: ``tau`` (0.2 for both v2 and ViT v3).
        momentum, momentum_final: EMA momentum of the key encoder; v3 follows a half cosine
            from ``momentum`` to ``momentum_final``; v2 keeps ``momentum`` (set both equal).
        queue_size: v2's number of queued negatives ``K``.
        proj_hidden_dim, proj_dim, proj_layers, proj_bn, proj_last_bn: the projector (v2: 2048 -> 128,
            2 layers, no BN; v3: 4096 -> 256, 3 layers, BN, a last BN without affine parameters).
        pred_hidden_dim: v3's predictor hidden width.
        symmetric: v2 only: also use view 2 as the query (v3 is always symmetric).
        gather_distributed: v3 keys / v2 enqueued keys from every rank.
        view, view2: :class:`~histofm.data.augment.ViewConfig` changes of the two views
            (``view2`` defaults to ``view``; v3 uses the asymmetric BYOL pair).
        augment, base_size: ``"sample"`` or ``"batch"`` augmentation (see ``SimCLRConfig``).
    """

    version: Literal[2, 3] = 2
    temperature: float = setting(0.2, range="> 0")
    momentum: float = setting(0.999, range="[0, 1]")
    momentum_final: float = setting(0.999, range="[0, 1]")
    queue_size: int = setting(65536, range=">= 1")
    proj_hidden_dim: int = setting(2048, range=">= 1")
    proj_dim: int = setting(128, range=">= 1")
    proj_layers: int = setting(2, range=">= 1")
    proj_bn: bool = False
    proj_last_bn: bool = False
    pred_hidden_dim: int = setting(4096, range=">= 1")
    symmetric: bool = False
    gather_distributed: bool = True
    view: dict[str, Any] = setting(default_factory=dict, of=ViewConfig)
    view2: dict[str, Any] | None = setting(None, of=ViewConfig)
    augment: Literal["sample", "batch"] = "sample"
    base_size: int = setting(0, range=">= 1", allow_zero=True)

    def __post_init__(self) -> None:
        check_config(self)



V3_DEFAULTS: dict[str, Any] = dict(
    version=3, temperature=0.2, momentum=0.99, momentum_final=1.0, proj_hidden_dim=4096, proj_dim=256,
    proj_layers=3, proj_bn=True, proj_last_bn=True,
    view={"blur_p": 1.0, "solarize_p": 0.0}, view2={"blur_p": 0.1, "solarize_p": 0.2},
)


class MoCo(SSLMethod):
    """MoCo v2 or v3 on a backbone with a pooled ``forward`` ``(B, D)``.

    ``backbone`` is the query encoder (trained, exported); ``momentum_backbone`` and
    ``momentum_projector`` are its EMA copies (no gradients), updated in :meth:`on_step_end`.
    """

    def __init__(
        self, backbone: nn.Module, cfg: MoCoConfig = MoCoConfig(), batch_augment: list[BatchAugment | None] | None = None
    ) -> None:
        super().__init__()
        if cfg.version not in (2, 3):
            raise HistofmError(f"MoCo version must be 2 or 3, got {cfg.version}; use --method mocov2 or --method mocov3.")
        self.cfg = cfg
        self.backbone = backbone
        dim = backbone.num_features
        self.projector = ProjectionHead(
            dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers, cfg.proj_bn,
            last_bn=cfg.proj_last_bn, last_bn_affine=False,
        )
        self.predictor = (
            ProjectionHead(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, 2, batch_norm=cfg.proj_bn)
            if cfg.version == 3 else None
        )
        self.momentum_backbone = make_teacher(backbone)
        self.momentum_projector = make_teacher(self.projector)
        self.register_buffer("momentum", torch.tensor(float(cfg.momentum)))  # saved: resumes exactly
        self.augmenters = nn.ModuleList([a for a in (batch_augment or []) if a is not None])
        if cfg.version == 2:
            g = torch.Generator().manual_seed(0)
            self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim, generator=g), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _views(self, batch: Any) -> list[torch.Tensor]:  # noqa: ANN401
        return make_views(batch, list(self.augmenters) or [None])[:2]

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.momentum_projector(self.momentum_backbone(x)), dim=-1)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401
        x1, x2 = self._views(batch)  # (B, C, H, W) each
        B = x1.shape[0]
        q = self.projector(self.backbone(torch.cat([x1, x2])))  # (2B, P), both views in one pass
        k = self._keys(torch.cat([x1, x2]))  # (2B, P)
        q1, q2 = q[:B], q[B:]
        k1, k2 = k[:B], k[B:]
        t = self.cfg.temperature
        if self.cfg.version == 3:
            p1, p2 = self.predictor(q).chunk(2)  # type: ignore[misc]
            g = self.cfg.gather_distributed
            loss = moco_v3_ctr(p1, k2, t, g) + moco_v3_ctr(p2, k1, t, g)
            return {"loss": loss, "momentum": self.momentum.clone()}
        queue = self.queue.clone()
        loss = moco_v2_loss(q1, k2, queue, t)
        if self.cfg.symmetric:
            loss = (loss + moco_v2_loss(q2, k1, queue, t)) / 2
            self._enqueue(torch.cat([k2, k1]))
        else:
            self._enqueue(k2)
        with torch.no_grad():  # diagnostics: how far positives stand out from the queue
            qn = F.normalize(q1.detach().float(), dim=-1)
            pos_sim = (qn * k2.float()).sum(-1).mean()
            neg_sim = (qn @ queue.float().T).mean()
        return {"loss": loss, "momentum": self.momentum.clone(), "pos_sim": pos_sim, "neg_sim": neg_sim}

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        """Write the (gathered) keys at the queue pointer, wrapping around (FIFO)."""
        if not self.training:
            return
        keys = gather_no_grad(keys) if self.cfg.gather_distributed else keys
        K = self.queue.shape[0]
        n = min(keys.shape[0], K)
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % K
        self.queue[idx] = keys[:n].to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % K)

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """EMA update of the momentum encoder (v3: momentum on a cosine schedule to ``momentum_final``)."""
        m = float(self.momentum)
        ema_update(self.momentum_backbone, self.backbone, m)
        ema_update(self.momentum_projector, self.projector, m)
        self.momentum.fill_(momentum_schedule(step + 1, max_steps, self.cfg.momentum, self.cfg.momentum_final))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def build(name: str, arch: str, *, img_size: int, overrides: dict[str, Any]) -> tuple[MoCo, Callable[[Any], Any]]:
    """``histofm pretrain --method mocov2|mocov3``: MoCo with the version's defaults, and its transform."""
    cfg_kw, backbone_kw = split_backbone_overrides(overrides)
    base = MoCoConfig() if name == "mocov2" else config_replace(MoCoConfig(), V3_DEFAULTS)
    user_view, user_view2 = cfg_kw.pop("view", None) or {}, cfg_kw.pop("view2", None) or {}
    cfg = config_replace(base, cfg_kw)
    # Changes to "view" apply to both views, on top of the version's defaults; "view2" to the second only.
    first = {**cfg.view, **user_view}
    second = {**(cfg.view2 if cfg.view2 is not None else cfg.view), **user_view, **user_view2}
    cfg = config_replace(cfg, {"view": first, "view2": second})
    v1 = view_config(arch, img_size, cfg.view)
    v2 = view_config(arch, img_size, cfg.view2 if cfg.view2 is not None else cfg.view)
    transform, augmenters = view_pipeline([v1, v2], cfg.augment, cfg.base_size)
    method = MoCo(make_backbone(arch, img_size, backbone_kw), cfg, augmenters)
    return method, transform

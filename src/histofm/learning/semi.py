"""Semi-supervised learning: shared pieces and the training loop.

A few labelled tiles and many unlabelled ones is the normal state of pathology
data. The methods (one file each) all train a classifier on the labelled images
and add a term that uses the unlabelled ones:

* :mod:`~histofm.learning.fixmatch`: weak-view pseudo-label, strong-view target
  (Sohn et al. 2020, arXiv 2001.07685);
* :mod:`~histofm.learning.meanteacher`: agree with an EMA teacher
  (Tarvainen & Valpola 2017, arXiv 1703.01780);
* :mod:`~histofm.learning.pseudolabel`: the model's own argmax as a target
  (Lee 2013, ICML workshop on challenges in representation learning);
* :class:`Supervised`: the baseline, labelled images only, same views.

This file holds what they share: the classifier (backbone + linear head, input
normalisation inside), a small CNN for CPU-sized problems, the in-memory data
record, the loop that feeds labelled and unlabelled batches, and evaluation.
The loop lives here rather than in the pretraining engine because every step
draws from two streams (``B`` labelled, ``mu * B`` unlabelled images).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histofm.errors import HistofmError
from histofm.learning.views import ViewConfig, strong_view, weak_view
from histofm.methods.base import SSLMethod
from histofm.settings import check_config, setting


class SmallConvNet(nn.Module):
    """A VGG-style CNN for small tiles on CPU: 3 stages of 3x3 conv-BN-ReLU, max-pool between.

    Args:
        width: channels of the first stage (doubled at each stage).
        convs_per_stage: 3x3 convolutions per stage.
        in_chans: input channels.

    ``forward(x)`` returns the global-average-pooled features ``(B, num_features)``.
    """

    def __init__(self, width: int = 32, convs_per_stage: int = 2, in_chans: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_chans
        for i, c in enumerate((width, 2 * width, 4 * width)):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                c_in = c
        self.features = nn.Sequential(*layers)
        self.num_features = c_in
        self.embed_dim = c_in
        # Channels-last runs these small convolutions and poolings ~1.7x faster on CPU (oneDNN).
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return self.features(x).mean(dim=(2, 3))  # (B, D)


class Classifier(nn.Module):
    """Backbone + linear head; takes raw ``[0, 1]`` images and normalises them itself.

    Args:
        backbone: a module mapping ``(B, 3, H, W)`` to pooled features ``(B, D)``.
        num_classes: number of output logits.
        mean, std: per-channel input normalisation (the backbone's own, for pretrained ones).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.25, 0.25, 0.25),
    ) -> None:
        super().__init__()
        dim = getattr(backbone, "num_features", None) or getattr(backbone, "embed_dim", None)
        if not dim:
            raise HistofmError("The backbone has no `num_features`; give it one or wrap it in a module that does.")
        self.backbone = backbone
        self.head = nn.Linear(int(dim), num_classes)
        self.num_classes = num_classes
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)  # (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))  # (B, C)


class SemiMethod(SSLMethod):
    """Base of the semi-supervised methods: holds the classifier and a seeded generator for the views.

    A batch is ``{"x_l": (B,3,H,W), "y_l": (B,), "x_u": (muB,3,H,W)}`` with images in
    ``[0, 1]``; an optional ``"y_u"`` (true labels of the unlabelled images) is used
    for monitoring only, never for the loss.
    """

    def __init__(self, classifier: Classifier, seed: int = 0) -> None:
        super().__init__()
        self.classifier = classifier
        self.backbone = classifier.backbone
        self._seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """The method's random stream on ``device`` (seeded once, then advancing)."""
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[key]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the model that is evaluated and saved (the teacher for Mean Teacher)."""
        return self.classifier(x)

    def deployed(self) -> Classifier:
        """The classifier that :meth:`predict` uses and that is saved."""
        return self.classifier

    @staticmethod
    @torch.no_grad()
    def pseudo_label_accuracy(logits: torch.Tensor, y: torch.Tensor, threshold: float) -> torch.Tensor:
        """Accuracy of the confident pseudo-labels (NaN-free: 0 when none pass the threshold)."""
        conf, pred = torch.softmax(logits.float(), -1).max(-1)
        keep = conf >= threshold
        if not keep.any():
            return torch.zeros((), device=logits.device)
        return (pred[keep] == y[keep]).float().mean()

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.forward_features(x)


class Supervised(SemiMethod):
    """Baseline: cross-entropy on the labelled images only; ``x_u`` is ignored.

    Args:
        classifier: the model.
        views: view strengths.
        strong: train on strong views instead of weak ones (a stronger baseline that
            gets the same augmentations FixMatch uses, without unlabelled data).
        seed: seed of the view generator.
    """

    def __init__(self, classifier: Classifier, views: ViewConfig = ViewConfig(), strong: bool = False,
                 seed: int = 0) -> None:
        super().__init__(classifier, seed=seed)
        self.views = views
        self.strong = strong

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        g = self.generator(batch["x_l"].device)
        view = strong_view if self.strong else weak_view
        loss = F.cross_entropy(self.classifier(view(batch["x_l"], self.views, g)).float(), batch["y_l"])
        return {"loss": loss}


@dataclass
class SemiData:
    """Images held in memory as ``uint8`` ``(N, 3, H, W)``.

    Attributes:
        x_l, y_l: labelled images and their class indices.
        x_u: unlabelled images.
        y_u: true labels of ``x_u`` when known (experiments only; never used for training).
        classes: class names, index = label.
    """

    x_l: torch.Tensor
    y_l: torch.Tensor
    x_u: torch.Tensor
    y_u: torch.Tensor | None = None
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.x_l.ndim != 4 or self.x_u.ndim != 4 or self.x_l.shape[1:] != self.x_u.shape[1:]:
            raise HistofmError("Labelled and unlabelled images must be (N, 3, H, W) tensors of the same size.")
        if len(self.x_l) != len(self.y_l):
            raise HistofmError(f"{len(self.x_l)} labelled images but {len(self.y_l)} labels; give one label per image.")
        if len(self.x_l) == 0:
            raise HistofmError("No labelled images; label at least one image per class.")
        if len(self.x_u) == 0:
            raise HistofmError("No unlabelled images; semi-supervised training needs images without labels.")


@dataclass(frozen=True)
class FitConfig:
    """Optimisation settings of :func:`fit`.

    Attributes:
        steps: optimiser steps.
        batch_size: labelled images per step (``B``).
        mu: unlabelled images per labelled one (``mu * B`` per step).
        lr, momentum, weight_decay: SGD with Nesterov momentum, as in FixMatch.
        cosine: FixMatch's schedule ``lr * cos(7 pi k / (16 K))`` (else constant).
        recalibrate_bn: after training, recompute BatchNorm statistics of the deployed
            model on the un-augmented training images (see :func:`recalibrate_batchnorm`).
        seed: seed of the batch sampler.
    """

    steps: int = setting(500, range=">= 1")
    batch_size: int = setting(32, range="[1, 65536]")
    mu: int = setting(4, range="[1, 1024]")
    lr: float = setting(0.03, range="> 0")
    momentum: float = setting(0.9, range="[0, 1)")
    weight_decay: float = setting(5e-4, range=">= 0")
    cosine: bool = True
    recalibrate_bn: bool = True
    seed: int = setting(0, range="[0, 4294967295]")

    def __post_init__(self) -> None:
        check_config(self)



def _to_float(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device, non_blocking=True).float().div_(255.0)


def fit(
    method: SemiMethod,
    data: SemiData,
    cfg: FitConfig = FitConfig(),
    device: torch.device | str | None = None,
    progress: bool = False,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``method`` for ``cfg.steps`` steps; returns one dict of logged scalars per step.

    Each step draws ``B`` labelled and ``mu * B`` unlabelled images uniformly with
    replacement (so tiny labelled sets are fine), runs ``method(batch)``,
    back-propagates ``"loss"``, steps SGD, then calls ``method.on_step_end``.
    """
    device = torch.device(device or "cpu")
    method.to(device).train()
    params = method.trainable_parameters()
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # biases and norm gains: no weight decay
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda k: math.cos(7 * math.pi * k / (16 * cfg.steps))) if cfg.cosine else (lambda k: 1.0)
    )
    g = torch.Generator().manual_seed(cfg.seed)
    n_l, n_u = len(data.x_l), len(data.x_u)
    history: list[dict[str, float]] = []
    bar = _progress(progress, cfg.steps)
    for step in range(cfg.steps):
        il = torch.randint(0, n_l, (cfg.batch_size,), generator=g)
        iu = torch.randint(0, n_u, (cfg.batch_size * cfg.mu,), generator=g)
        batch: dict[str, Any] = {"x_l": _to_float(data.x_l[il], device), "y_l": data.y_l[il].to(device),
                                 "x_u": _to_float(data.x_u[iu], device)}
        if data.y_u is not None:
            batch["y_u"] = data.y_u[iu].to(device)
        out = method(batch)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise HistofmError(f"The loss became {loss.item()} at step {step}; lower the learning rate.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        method.on_step_end(step, cfg.steps)
        logged = {k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
        history.append(logged)
        if callback is not None:
            callback(step, logged)
        if bar is not None:
            bar[0].update(bar[1], advance=1, description=f"loss {logged['loss']:.3f}")
    if bar is not None:
        bar[0].stop()
    if cfg.recalibrate_bn:
        recalibrate_batchnorm(method.deployed(), torch.cat([data.x_l, data.x_u]), device)
    bad = next((k for k, v in method.deployed().state_dict().items()
                if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:  # never hand back (and save) a model with NaN weights
        raise HistofmError(f"The model's weight {bad} is not finite after training; lower --lr.")
    method.eval()
    return history


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, device: torch.device | str, batch_size: int = 256) -> None:
    """Replace BatchNorm running statistics by their average over ``uint8`` images ``x`` (no augmentation).

    During training the running statistics follow augmented batches (strong views
    shift colour statistics) of weights that keep moving; a model deployed on
    plain tiles is better served by statistics of plain tiles under its final
    weights ("precise BN", as in pycls). A model without BatchNorm is unchanged.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    was_training = model.training
    model.train()
    for i in range(0, len(x), batch_size):
        model(_to_float(x[i : i + batch_size], torch.device(device)))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)


def _progress(enabled: bool, total: int) -> tuple[Any, Any] | None:
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    prog.start()
    return prog, prog.add_task("training", total=total)


@torch.no_grad()
def predict_proba(
    method: SemiMethod, x: torch.Tensor, batch_size: int = 256, device: torch.device | str | None = None
) -> torch.Tensor:
    """Class probabilities ``(N, C)`` for ``uint8`` images ``(N, 3, H, W)``, in eval mode."""
    device = torch.device(device or "cpu")
    method.to(device).eval()
    out = [torch.softmax(method.predict(_to_float(x[i : i + batch_size], device)).float(), -1).cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, method.classifier.num_classes)


def balanced_accuracy(pred: torch.Tensor, y: torch.Tensor, num_classes: int | None = None) -> float:
    """Mean per-class recall over the classes present in ``y``."""
    num_classes = num_classes or int(max(int(pred.max()), int(y.max())) + 1)
    recalls = [float((pred[y == c] == c).float().mean()) for c in range(num_classes) if (y == c).any()]
    return sum(recalls) / len(recalls)


def evaluate(method: SemiMethod, x: torch.Tensor, y: torch.Tensor, **kw: Any) -> dict[str, float]:
    """Accuracy and balanced accuracy of ``method.predict`` on ``uint8`` images with labels."""
    pred = predict_proba(method, x, **kw).argmax(-1)
    return {"accuracy": float((pred == y).float().mean()),
            "balanced_accuracy": balanced_accuracy(pred, y, method.classifier.num_classes)}

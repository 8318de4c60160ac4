"""Semi-supervised learning: the shared pieces (classifier, base class, step batches, evaluation).

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
record, :class:`SemiSteps` (the batch of each step: ``B`` labelled and ``mu * B``
unlabelled images, a pure function of the seed and the step) and evaluation.
Training runs through the one engine (:func:`histofm.train.semi.fit_semi` wires
the two), which brings exact resume, bf16, DDP, the non-finite guard,
``log.jsonl`` and progress; nothing here calls ``backward``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import IterableDataset, get_worker_info

from histofm.errors import HistofmError
from histofm.learning.views import ViewConfig, strong_view, weak_view
from histofm.utils.objective import Objective


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


class SemiMethod(Objective):
    """Base of the semi-supervised methods: holds the classifier and makes the views' random stream.

    An :class:`~histofm.utils.objective.Objective`: the engine trains it. It exports nothing
    through the engine (``exported_module`` is ``None``): :func:`histofm.train.semi.fit_semi`
    saves the deployed classifier after :func:`recalibrate_batchnorm`.

    A batch is ``{"x_l": (B,3,H,W), "y_l": (B,), "x_u": (muB,3,H,W)}`` with images as
    ``uint8`` or as floats in ``[0, 1]``; an optional ``"y_u"`` (true labels of the
    unlabelled images) is used for monitoring only, never for the loss, and an optional
    ``"view_seed"`` (what :class:`SemiSteps` adds) seeds this step's views, so that a
    step's loss depends on its batch alone and a resumed run repeats it exactly.
    Per-step state that a method keeps (a ramped weight, an EMA momentum) lives in
    buffers, which the engine's checkpoint saves with the weights.
    """

    def __init__(self, classifier: Classifier, seed: int = 0) -> None:
        super().__init__()
        self.classifier = classifier
        self._seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, batch: dict[str, torch.Tensor]) -> torch.Generator:
        """The random stream of this step's views, on the batch's device.

        Seeded by ``batch["view_seed"]`` when the batch has one (through the engine: derived
        from the run's seed and the step); otherwise the method's own stream (seeded once with
        the method's ``seed``, then advancing), for batches made by hand.
        """
        device = batch["x_l"].device
        if "view_seed" in batch:
            return torch.Generator(device=device).manual_seed(int(batch["view_seed"]))
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[key]

    @staticmethod
    def images(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_l, y_l, x_u)`` of a batch with the images as floats in ``[0, 1]``."""
        return as_float(batch["x_l"]), batch["y_l"], as_float(batch["x_u"])

    @staticmethod
    def view(fn: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any) -> torch.Tensor:
        """``fn(x, *args)`` in float32 even under the engine's autocast (stain jitter is a matrix product)."""
        with torch.autocast(x.device.type, enabled=False):
            return fn(x.float(), *args)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the model that is evaluated and saved (the teacher for Mean Teacher)."""
        return self.classifier(x)

    def deployed(self) -> Classifier:
        """The classifier that :meth:`predict` uses and that is saved."""
        return self.classifier

    def export_info(self) -> dict[str, Any]:
        """Facts written into ``model.json`` beside the deployed classifier."""
        return {"objective": type(self).__name__, "num_classes": self.deployed().num_classes}

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
        return self.deployed().forward_features(as_float(x))


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
        g = self.generator(batch)
        x_l, y_l, _ = self.images(batch)
        x = self.view(strong_view if self.strong else weak_view, x_l, self.views, g)
        return {"loss": F.cross_entropy(self.classifier(x).float(), y_l)}


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


def as_float(x: torch.Tensor) -> torch.Tensor:
    """``uint8`` images as floats in ``[0, 1]``; float images unchanged."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 63-bit seed for the batch (``rank=-1``) or one rank's views at ``step``."""
    return ((seed * 1_000_003 + step) * 998_244_353 + (rank + 2) * 1_000_000_007) % (2**63 - 1)


class SemiSteps(IterableDataset):
    """The engine's data for semi-supervised training: one labelled + unlabelled batch per step.

    A step stream (the protocol of :mod:`histofm.train.data`, kept here by duck typing):
    the engine calls :meth:`plan_steps`, then iterating yields one ``(batch, keys)`` pair per
    step. Step ``t``'s global batch is ``B = global_batch`` labelled and ``mu * B`` unlabelled
    images drawn uniformly with replacement (tiny labelled sets are fine) by a generator
    seeded with ``(seed, t)``, so it is a pure function of the step: a resumed run gets the
    batches the interrupted one would have had. Under ``W`` ranks, rank ``r`` takes the
    ``r``-th slice of both parts. Images stay ``uint8`` (4x less to move); the method
    converts them. The batch also carries ``view_seed`` for the method's views.

    Args:
        data: the images in memory.
        mu: unlabelled images per labelled one.
    """

    def __init__(self, data: SemiData, mu: int = 4) -> None:
        super().__init__()
        if not isinstance(mu, int) or mu < 1:
            raise HistofmError(f"mu must be a whole number >= 1 (unlabelled images per labelled one), got {mu!r}.")
        self.data, self.mu = data, mu
        self._plan: dict[str, int] | None = None

    def plan_steps(self, *, seed: int, global_batch: int, rank: int = 0, world_size: int = 1,
                   num_workers: int = 0, start_step: int = 0, stop_step: int,
                   views: Callable[..., Any] | None = None) -> None:
        """Fix this rank's batches for steps ``[start_step, stop_step)`` (called by the engine).

        ``views`` is accepted for the protocol and unused: the method makes its views itself.
        """
        if global_batch % world_size:
            raise HistofmError(f"batch_size {global_batch} must be divisible by the number of processes ({world_size}).")
        self._plan = {"seed": seed, "batch": global_batch, "rank": rank, "world": world_size,
                      "workers": max(num_workers, 1), "start": start_step, "stop": stop_step}

    def batch(self, step: int) -> tuple[dict[str, torch.Tensor], list[str]]:
        """This rank's batch at ``step`` and the names of its images (``l<i>``, ``u<i>``)."""
        if self._plan is None:
            raise HistofmError("SemiSteps.batch() before plan_steps(); the engine plans the steps.")
        p, d = self._plan, self.data
        g = torch.Generator().manual_seed(step_seed(p["seed"], step, -1))
        il = torch.randint(0, len(d.x_l), (p["batch"],), generator=g)  # (B,)
        iu = torch.randint(0, len(d.x_u), (p["batch"] * self.mu,), generator=g)  # (mu B,)
        b = p["batch"] // p["world"]
        il, iu = il[p["rank"] * b : (p["rank"] + 1) * b], iu[p["rank"] * b * self.mu : (p["rank"] + 1) * b * self.mu]
        batch = {"x_l": d.x_l[il], "y_l": d.y_l[il], "x_u": d.x_u[iu],
                 "view_seed": torch.tensor(step_seed(p["seed"], step, p["rank"]))}
        if d.y_u is not None:
            batch["y_u"] = d.y_u[iu]
        return batch, [f"l{i}" for i in il.tolist()] + [f"u{i}" for i in iu.tolist()]

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], list[str]]]:
        if self._plan is None:
            raise HistofmError("Iterating SemiSteps before plan_steps(); pass it to the engine's fit.")
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # DataLoader workers take steps round-robin (worker w: start + w, start + w + W, ...).
        for step in range(self._plan["start"] + worker, self._plan["stop"], workers):
            yield self.batch(step)


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
        model(as_float(x[i : i + batch_size].to(device)))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)


@torch.no_grad()
def predict_proba(
    method: SemiMethod, x: torch.Tensor, batch_size: int = 256, device: torch.device | str | None = None
) -> torch.Tensor:
    """Class probabilities ``(N, C)`` for ``uint8`` images ``(N, 3, H, W)``, in eval mode."""
    device = torch.device(device or "cpu")
    method.to(device).eval()
    out = [torch.softmax(method.predict(as_float(x[i : i + batch_size].to(device))).float(), -1).cpu()
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

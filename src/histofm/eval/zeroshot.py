"""Zero-shot classification and retrieval with a vision-language model.

* **Prompt ensembling** (Radford et al. 2021): class ``c`` is described by templates
  ``k`` ("an H&E image of {}."); its embedding is the normalised mean of the
  normalised template embeddings, ``t_c = norm(mean_k norm(f(template_k(c))))``.
  A tile's logits are ``s * cos(tile, t_c)`` with ``s = exp(logit_scale)``.
* **MI-Zero** (Lu et al. 2023, CVPR, arXiv 2306.07831): a slide's logit for class
  ``c`` is the mean of its top-K tile logits for ``c``; a softmax over classes gives
  slide probabilities.
* **Retrieval**: tiles ranked by ``cos(tile, query)``; recall@k is the fraction of
  queries with a relevant tile among the first k.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histofm.errors import HistofmError

DEFAULT_TEMPLATES = (
    "an H&E image of {}.",
    "a histopathology image of {}.",
    "an image of {}.",
    "{}, H&E stained.",
    "a photomicrograph of {}.",
)


@dataclass
class VLEncoder:
    """A vision-language model with what it needs around it.

    Attributes:
        name: the model's name (for reports).
        model: has ``encode_image``, ``encode_text`` (token ids) and ``logit_scale``.
        tokenize: texts -> token ids ``(B, L)`` in the model's convention.
        transform: PIL tile -> normalised image tensor ``(3, H, W)``.
        image_size: the model's input side (default tile size for slides).
        max_scale: cap on ``exp(logit_scale)`` (CLIP: 100).
    """

    name: str
    model: nn.Module
    tokenize: Callable[[list[str]], torch.Tensor]
    transform: Callable[[Any], torch.Tensor]
    image_size: int = 224
    max_scale: float = 100.0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def images(self, batch: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``(B, E)`` of a preprocessed batch ``(B, 3, H, W)``."""
        return F.normalize(self.model.encode_image(batch.to(self.device)).float(), dim=-1)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``(B, E)``."""
        tokens = self.tokenize(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def scale(self) -> float:
        """``exp(logit_scale)``, capped at ``max_scale``."""
        return float(self.model.logit_scale.detach().float().exp().clamp(max=self.max_scale))


def build_prompts(classes: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[list[str]]:
    """``prompts[c][k] = templates[k]`` filled with ``classes[c]``."""
    classes = [c.strip() for c in classes]
    if not classes or any(not c for c in classes):
        raise HistofmError("Give at least one non-empty class name (--classes \"tumour,stroma\").")
    if len(set(classes)) != len(classes):
        raise HistofmError(f"Class names repeat in {classes}; give each class once.")
    if not templates:
        raise HistofmError("The templates file holds no template; write one per line, each with {} for the class.")
    for t in templates:
        if "{}" not in t:
            raise HistofmError(f"Template {t!r} has no {{}} where the class name goes; add one.")
    return [[t.replace("{}", c) for t in templates] for c in classes]


def class_embeddings(encoder: VLEncoder, prompts: Sequence[Sequence[str]]) -> torch.Tensor:
    """Prompt-ensembled class embeddings ``(C, E)``: normalised mean of normalised prompt embeddings."""
    flat = [p for group in prompts for p in group]
    emb = encoder.texts(flat)  # (sum_c K_c, E)
    out, i = [], 0
    for group in prompts:
        out.append(F.normalize(emb[i : i + len(group)].mean(0), dim=-1))
        i += len(group)
    return torch.stack(out)


def tile_logits(image_emb: torch.Tensor, class_emb: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * cos`` between normalised tiles ``(N, E)`` and classes ``(C, E)`` -> ``(N, C)``."""
    return scale * image_emb @ class_emb.T


def mi_zero(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Slide logits ``(C,)``: per class, the mean of the top-``k`` tile logits ``(N, C)`` (k capped at N)."""
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise HistofmError("MI-Zero pooling needs at least one tile per slide.")
    if k < 1:
        raise HistofmError(f"topk must be at least 1, got {k}; set --set topk=K with K >= 1.")
    return logits.topk(min(k, logits.shape[0]), dim=0).values.mean(0)


def retrieve(image_emb: torch.Tensor, query_emb: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and cosine similarities ``(Q, top)`` of the tiles closest to each query, best first."""
    sim = query_emb @ image_emb.T  # (Q, N)
    vals, idx = sim.topk(min(top, sim.shape[1]), dim=1)
    return idx, vals


def recall_at_k(sim: torch.Tensor, relevant: torch.Tensor, k: int) -> float:
    """Fraction of queries ``(Q, N)`` with at least one relevant item among their ``k`` most similar."""
    top = sim.topk(min(k, sim.shape[1]), dim=1).indices  # (Q, k)
    return relevant.gather(1, top).any(dim=1).float().mean().item()

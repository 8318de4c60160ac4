"""CLIP: contrastive language-image pretraining (Radford et al. 2021, arXiv 2103.00020).

An image encoder (our ViT) and a text encoder (a causal Transformer over token
ids) map a batch of ``N`` (image, caption) pairs into one embedding space; each
image must pick out its own caption among the ``N`` captions and vice versa.
With L2-normalised image and text embeddings ``I``, ``T`` ``(N, E)`` and a
learned temperature ``s = exp(logit_scale)`` (initialised to ``1 / 0.07``,
capped at 100)::

    L = ( CE(s I T^T, arange(N)) + CE(s T I^T, arange(N)) ) / 2

which is ``open_clip.loss.ClipLoss`` (our test oracle). Under data parallelism
each rank scores its own images and captions against those of every rank
(gathered with gradients), open_clip's ``local_loss`` mode.

The text encoder follows CLIP: token embedding + learned positions, a pre-norm
:class:`~histofm.models.transformer.TransformerEncoder` with a causal mask, the
final LayerNorm, and the feature at the end-of-text token, linearly projected.
Text is tokenised by :class:`~histofm.data.tokenizer.BPETokenizer` (CLIP's
byte-level BPE, ids identical to open_clip's; the vocabulary ships with the
package). :meth:`CLIP.zero_shot` classifies images by comparing them with one
prompt (or the mean of several prompts) per class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histofm.data.augment import ViewConfig, view_transform
from histofm.data.tokenizer import BPETokenizer
from histofm.errors import HistofmError
from histofm.methods.base import SSLMethod
from histofm.methods.views import make_backbone, view_config
from histofm.models.transformer import TransformerEncoder
from histofm.settings import check_config, config_replace, setting, split_backbone_overrides
from histofm.utils.distributed import gather_with_grad, rank


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float, gather: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE of normalised image/text features ``(B, E)`` at logit scale ``scale``."""
    all_image, all_text = (gather_with_grad(image), gather_with_grad(text)) if gather else (image, text)
    b = image.shape[0]
    labels = torch.arange(b, device=image.device) + (rank() * b if all_image.shape[0] != b else 0)
    logits_per_image = scale * image @ all_text.T  # (B, N)
    logits_per_text = scale * text @ all_image.T  # (B, N)
    return (F.cross_entropy(logits_per_image.float(), labels) + F.cross_entropy(logits_per_text.float(), labels)) / 2


class TextTransformer(nn.Module):
    """CLIP's text tower: tokens ``(B, L)`` -> embedding ``(B, E)`` taken at the end-of-text token."""

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int,
        layers: int,
        heads: int,
        embed_dim: int,
        eot_id: int,
        pad_id: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.eot_id, self.pad_id = eot_id, pad_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = TransformerEncoder(
            width, heads, layers, 4 * width, dropout=dropout, norm_first=True, activation="gelu"
        )
        self.text_projection = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection.weight, std=width**-0.5)

    def no_weight_decay(self) -> set[str]:
        return {"positional_embedding"}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        L = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:L]  # (B, L, W)
        # Causal attention already keeps positions before EOT away from the padding after it.
        x = self.transformer(x, causal=True)
        eot = (tokens == self.eot_id).int().argmax(dim=1)  # (B,) first EOT
        return self.text_projection(x[torch.arange(x.shape[0], device=x.device), eot])  # (B, E)


@dataclass(frozen=True)
class CLIPConfig:
    """CLIP hyper-parameters (defaults: ViT-B/16 CLIP's text tower).

    Attributes:
        embed_dim: joint embedding size ``E``.
        text_width, text_layers, text_heads, context_length: the text Transformer.
        init_logit_scale: initial temperature ``1 / tau`` (CLIP: 1 / 0.07).
        max_logit_scale: cap on ``exp(logit_scale)`` (CLIP: 100).
        gather_distributed: contrast against every rank's pairs.
        view: image augmentation changes (CLIP itself only resizes and crops).
    """

    embed_dim: int = setting(512, range=">= 1")
    text_width: int = setting(512, range=">= 1")
    text_layers: int = setting(12, range=">= 1")
    text_heads: int = setting(8, range=">= 1", divides="text_width")
    context_length: int = setting(77, range=">= 2")
    text_dropout: float = setting(0.0, range="[0, 1)")
    init_logit_scale: float = setting(1 / 0.07, range="> 0")
    max_logit_scale: float = setting(100.0, range="> 0")
    gather_distributed: bool = True
    view: dict[str, Any] = setting(
        default_factory=lambda: {
            "scale": (0.9, 1.0), "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0,
        },
        of=ViewConfig,
    )

    def __post_init__(self) -> None:
        check_config(self)



class CLIP(SSLMethod):
    """Image-text contrastive pretraining. Batches are ``(images (B, 3, H, W), captions list[str])``."""

    def __init__(self, backbone: nn.Module, cfg: CLIPConfig = CLIPConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.tokenizer = BPETokenizer(cfg.context_length)
        self.image_projection = nn.Linear(backbone.num_features, cfg.embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=backbone.num_features**-0.5)
        self.text = TextTransformer(
            self.tokenizer.vocab_size, cfg.context_length, cfg.text_width, cfg.text_layers, cfg.text_heads,
            cfg.embed_dim, self.tokenizer.eot_id, self.tokenizer.pad_id, cfg.text_dropout,
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.init_logit_scale)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``(B, E)``."""
        return F.normalize(self.image_projection(self.backbone(images)), dim=-1)

    def encode_text(self, texts: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings ``(B, E)`` of strings or token ids ``(B, L)``."""
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenizer(list(texts))
        tokens = tokens.to(self.logit_scale.device)
        return F.normalize(self.text(tokens), dim=-1)

    def scale(self) -> torch.Tensor:
        """``exp(logit_scale)`` capped at ``max_logit_scale``."""
        return self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401
        if not (isinstance(batch, (list, tuple)) and len(batch) >= 2):
            raise HistofmError("CLIP expects (images, captions) batches; use a dataset that yields (image, caption) pairs.")
        images, captions = batch[0], batch[1]
        img, txt = self.encode_image(images), self.encode_text(captions)  # (B, E) each
        scale = self.scale()
        loss = clip_loss(img, txt, scale, self.cfg.gather_distributed)
        return {"loss": loss, "logit_scale": scale.detach()}

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        # As in CLIP: keep the stored parameter itself within the cap.
        self.logit_scale.clamp_(max=math.log(self.cfg.max_logit_scale))

    @torch.no_grad()
    def class_embeddings(self, prompts: Sequence[str] | Sequence[Sequence[str]]) -> torch.Tensor:
        """One normalised embedding per class ``(C, E)``; a class given as several prompts gets their mean."""
        if not prompts:
            raise HistofmError("zero_shot needs at least one class prompt.")
        groups = [[p] if isinstance(p, str) else list(p) for p in prompts]
        if any(not g for g in groups):
            raise HistofmError("Every class needs at least one prompt string.")
        flat = [p for g in groups for p in g]
        emb = self.encode_text(flat)
        out, i = [], 0
        for g in groups:
            out.append(F.normalize(emb[i : i + len(g)].mean(0), dim=-1))
            i += len(g)
        return torch.stack(out)

    @torch.no_grad()
    def zero_shot(self, images: torch.Tensor, prompts: Sequence[str] | Sequence[Sequence[str]]) -> torch.Tensor:
        """Class probabilities ``(B, C)`` of images ``(B, 3, H, W)`` for classes described by ``prompts``.

        ``prompts[c]`` is a string or a list of strings (templates) for class ``c``.
        """
        if images.ndim != 4:
            raise HistofmError(f"zero_shot expects a batch of images (B, 3, H, W), got shape {tuple(images.shape)}.")
        was = self.training
        self.eval()
        try:
            logits = self.scale() * self.encode_image(images.to(self.logit_scale.device)) @ self.class_embeddings(prompts).T
        finally:
            self.train(was)
        return logits.softmax(dim=-1)


def build(name: str, arch: str, *, img_size: int, overrides: dict[str, Any]) -> tuple[CLIP, Callable[[Any], Any]]:
    """``histofm pretrain --method clip``: CLIP on ``create_model(arch)`` and its image transform.

    The dataset must yield ``(image, caption)`` pairs.
    """
    cfg_kw, backbone_kw = split_backbone_overrides(overrides)
    view = {**CLIPConfig().view, **(cfg_kw.pop("view", None) or {})}
    cfg = config_replace(CLIPConfig(), {**cfg_kw, "view": view})
    method = CLIP(make_backbone(arch, img_size, backbone_kw), cfg)
    return method, view_transform(view_config(arch, img_size, cfg.view))

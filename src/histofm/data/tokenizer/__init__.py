"""A text tokenizer that ships with the package: UTF-8 bytes, no vocabulary file, no download.

CLIP-style models need token ids of a fixed context length. A byte-level
tokenizer (as in ByT5, Xue et al. 2021, arXiv 2105.13626) covers every string in
every language with a vocabulary of 256 byte values plus three specials, so it
never meets an unknown word and needs nothing from the network. The price is
longer sequences than BPE (one token per byte), which is fine for captions and
class prompts.

Ids: ``0`` padding, ``1`` start of text, ``2`` end of text, ``3 + b`` for byte ``b``.
A sequence is ``[SOT, bytes..., EOT, PAD...]``, truncated so that EOT always fits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PAD, SOT, EOT = 0, 1, 2
_OFFSET = 3


class ByteTokenizer:
    """Text -> ``(B, context_length)`` int64 token ids.

    Args:
        context_length: tokens per sequence, SOT and EOT included.
        lowercase: lower-case text first (captions and prompts rarely need case).
    """

    vocab_size = 256 + _OFFSET
    pad_id, sot_id, eot_id = PAD, SOT, EOT

    def __init__(self, context_length: int = 77, lowercase: bool = True) -> None:
        if context_length < 3:
            raise ValueError("context_length must be at least 3 (SOT, one byte, EOT)")
        self.context_length = context_length
        self.lowercase = lowercase

    def encode(self, text: str) -> list[int]:
        """Ids of one text, ``[SOT, ..., EOT]`` without padding (truncated to the context length)."""
        if self.lowercase:
            text = text.lower()
        body = [b + _OFFSET for b in " ".join(text.split()).encode("utf-8")][: self.context_length - 2]
        return [SOT, *body, EOT]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Inverse of :meth:`encode` (specials dropped; bytes cut by truncation are replaced)."""
        vals = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i - _OFFSET for i in vals if i >= _OFFSET).decode("utf-8", errors="replace")

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids ``(B, context_length)`` of one text or a list of texts."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), PAD, dtype=torch.long)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts must be strings, got {type(t).__name__}")
            ids = self.encode(t)
            out[i, : len(ids)] = torch.tensor(ids)
        return out


__all__ = ["EOT", "PAD", "SOT", "ByteTokenizer"]

"""Text tokenizers for vision-language models: ``histofm.tokenize(texts, model=NAME)``.

One tokenizer ships with the package: CLIP's byte-level BPE
(:class:`~histofm.data.tokenizer.bpe.BPETokenizer`, ids identical to open_clip's
``SimpleTokenizer``; vocabulary bundled, MIT). Models differ in what surrounds
the ids, and :func:`tokenize` returns what each model expects, read from its
registry record (``ModelInfo.text``):

* ``tokenizer="clip_bpe", pad="zero"``: open_clip (QuiltNet, histofm's own CLIP):
  ``[SOT, ids..., EOT, 0, 0, ...]``.
* ``tokenizer="clip_bpe", pad="eot"``: Hugging Face ``CLIPTokenizer`` with
  ``padding="max_length"`` (PLIP): the padding is EOT (49407) itself.
* ``tokenizer="hf_json"``: a Hugging Face ``tokenizers`` JSON file the user supplies
  (CONCH's own 32k byte-level BPE is not redistributable here), truncated/padded to
  ``context_length - 1`` and one ``<pad>`` appended, the slot CoCa's class token takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from histofm.data.tokenizer.bpe import EOT_ID, SOT_ID, BPETokenizer
from histofm.errors import HistofmError

DEFAULT_TEXT = {"tokenizer": "clip_bpe", "context_length": 77, "pad": "zero"}


def text_config(model: str | None) -> dict[str, Any]:
    """The tokenizer settings of a registered vision-language model (open_clip's when ``model`` is None)."""
    if model is None:
        return dict(DEFAULT_TEXT)
    from histofm.registry import model_info

    info = model_info(model)
    if info.kind != "vision-language" or not info.text:
        raise HistofmError(
            f"Model {model!r} is a {info.kind} model without a text tower; pick a vision-language model "
            "(`histofm models` shows the kind column)."
        )
    return {**DEFAULT_TEXT, **info.text}


def tokenize(
    texts: str | Sequence[str],
    model: str | None = None,
    *,
    context_length: int | None = None,
    tokenizer_file: str | Path | None = None,
) -> torch.Tensor:
    """Token ids ``(B, L)`` of ``texts`` in the convention of ``model`` (see the module docstring).

    Args:
        texts: one string or a list of strings.
        model: a vision-language model name (``"plip"``, ``"quiltnet_b32"``, ``"conch"``); ``None``
            gives open_clip's ``tokenize`` (77 ids, zero padding).
        context_length: override the model's context length.
        tokenizer_file: the ``tokenizers`` JSON of models whose vocabulary is not bundled (CONCH).
    """
    cfg = text_config(model)
    L = int(context_length or cfg["context_length"])
    if cfg["tokenizer"] == "clip_bpe":
        pad = EOT_ID if cfg["pad"] == "eot" else 0
        return _bpe(L, pad)(texts)
    if cfg["tokenizer"] == "hf_json":
        return _hf_json(texts, L, tokenizer_file, model)
    raise HistofmError(f"Unknown tokenizer {cfg['tokenizer']!r} in the record of {model!r}.")


_BPE: dict[tuple[int, int], BPETokenizer] = {}


def _bpe(context_length: int, pad_id: int) -> BPETokenizer:
    key = (context_length, pad_id)
    if key not in _BPE:
        _BPE[key] = BPETokenizer(context_length, pad_id)
    return _BPE[key]


def _hf_json(texts: str | Sequence[str], L: int, tokenizer_file: str | Path | None, model: str | None) -> torch.Tensor:
    """CONCH's recipe: the JSON tokenizer's own specials, truncated and padded to ``L - 1``, then one pad."""
    if tokenizer_file is None or not Path(tokenizer_file).is_file():
        raise HistofmError(
            f"Model {model!r} needs its own tokenizer vocabulary, which histofm does not bundle; pass "
            "tokenizer_file= (for CONCH: conch_byte_level_bpe_uncased.json from the CONCH repository)."
        )
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise HistofmError("Reading a tokenizer JSON needs the `tokenizers` package; pip install tokenizers.") from None
    tok = Tokenizer.from_file(str(tokenizer_file))
    pad_id = tok.token_to_id("<pad>")
    if pad_id is None:
        raise HistofmError(f"{tokenizer_file} has no <pad> token; is it CONCH's tokenizer file?")
    texts = [texts] if isinstance(texts, str) else list(texts)
    tok.enable_truncation(max_length=L - 1)
    tok.enable_padding(length=L - 1, pad_id=pad_id, pad_token="<pad>")
    ids = torch.tensor([e.ids for e in tok.encode_batch(texts)], dtype=torch.long).reshape(len(texts), L - 1)
    return torch.nn.functional.pad(ids, (0, 1), value=pad_id)  # (B, L): the last slot is the class token's


__all__ = ["EOT_ID", "SOT_ID", "BPETokenizer", "text_config", "tokenize"]

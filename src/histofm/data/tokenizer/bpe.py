"""CLIP's byte-level BPE tokenizer (Radford et al. 2021; Sennrich et al. 2016, arXiv 1508.07909).

Byte-pair encoding starts from single symbols and repeatedly fuses the adjacent
pair that was most frequent in the training corpus, in the order the merges were
learned. CLIP's variant works on UTF-8 *bytes* (so no text is ever unknown),
maps each byte to a printable unicode character (so merges can be written as
text) and marks the end of each word with ``</w>``. The vocabulary
(``bpe_simple_vocab_16e6.txt.gz``, bundled, MIT) gives 48,894 merges; the ids are

    [256 byte symbols] [256 byte symbols + "</w>"] [one per merge] <start_of_text> <end_of_text>

49,408 in all: ``<start_of_text>`` is 49406 and ``<end_of_text>`` 49407.

Text is cleaned as open_clip's ``SimpleTokenizer`` does (``clean="lower"``):
``ftfy.fix_text``, HTML entities unescaped twice, whitespace collapsed, lower
case. It is then cut into words, numbers (one digit per piece), runs of other
symbols and the English contractions ``'s 't 're 've 'm 'll 'd``. Quirk kept for
parity: the literal strings ``<start_of_text>`` / ``<end_of_text>`` inside a text
become the special ids.

A sequence is ``[SOT, ids..., EOT, 0, ...]`` of length ``context_length``; a longer
one keeps its first ``context_length - 1`` ids and ends with EOT.
"""

from __future__ import annotations

import gzip
import html
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

from histofm.errors import HistofmError

VOCAB_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48,894 merges of the file
SPECIALS = ("<start_of_text>", "<end_of_text>")
SOT_ID, EOT_ID = 49406, 49407


@lru_cache(maxsize=1)
def byte_symbols() -> dict[int, str]:
    """Byte value -> a printable unicode character (printable Latin-1 bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):  # the rest (controls, space, ...) go to code points 256, 257, ...
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=2)
def _load(path: str) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """(symbol -> id, merge pair -> rank) read from the gzipped merges file."""
    lines = gzip.open(path).read().decode("utf-8").split("\n")[1 : NUM_MERGES + 1]  # line 0 is a header
    merges = [tuple(line.split()) for line in lines]
    symbols = list(byte_symbols().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(SPECIALS)
    return {s: i for i, s in enumerate(vocab)}, {m: r for r, m in enumerate(merges)}  # type: ignore[misc]


def clean(text: str) -> str:
    """open_clip's ``clean="lower"``: repair mojibake (ftfy), unescape HTML twice, collapse spaces, lower case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class BPETokenizer:
    """Text -> ``(B, context_length)`` int64 ids, identical to ``open_clip.tokenizer.SimpleTokenizer``.

    Args:
        context_length: ids per sequence, SOT and EOT included (CLIP: 77).
        pad_id: id written after EOT (open_clip: 0; Hugging Face CLIP models: 49407).
        vocab_path: a merges file in CLIP's format (default: the bundled one).
    """

    vocab_size = 49408
    sot_id, eot_id = SOT_ID, EOT_ID

    def __init__(self, context_length: int = 77, pad_id: int = 0, vocab_path: str | Path | None = None) -> None:
        import regex

        if context_length < 2:
            raise HistofmError(f"context_length must be at least 2 (SOT and EOT), got {context_length}; pass a longer context_length.")
        self.context_length = context_length
        self.pad_id = pad_id
        self.encoder, self.ranks = _load(str(vocab_path or VOCAB_FILE))
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.bytes = byte_symbols()
        self.unbytes = {c: b for b, c in self.bytes.items()}
        specials = "|".join(SPECIALS)
        # letters runs, single digits, runs of other non-space symbols, contractions (open_clip's pattern)
        self.pattern = regex.compile(
            specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
        )
        self._cache: dict[str, list[str]] = {s: [s] for s in SPECIALS}

    def bpe(self, word: str) -> list[str]:
        """Merge the symbols of one byte-mapped word by rank; the last symbol carries ``</w>``."""
        if word in self._cache:
            return self._cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            ranked = [(self.ranks.get(p, NUM_MERGES), i) for i, p in enumerate(zip(parts, parts[1:]))]
            best_rank, _ = min(ranked)
            if best_rank == NUM_MERGES:  # no known merge left
                break
            a, b = pair = next(p for p in zip(parts, parts[1:]) if self.ranks.get(p) == best_rank)
            merged, i = [], 0
            while i < len(parts):  # fuse every non-overlapping occurrence, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Ids of one text without SOT/EOT and without truncation."""
        ids: list[int] = []
        for piece in self.pattern.findall(clean(text)):
            mapped = "".join(self.bytes[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(mapped))
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids``: SOT skipped, everything from the first EOT on (padding) dropped."""
        vals = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if EOT_ID in vals:
            vals = vals[: vals.index(EOT_ID)]
        text = "".join(self.decoder[i] for i in vals if i != SOT_ID).replace("</w>", " ")
        raw = bytearray(32 if c == " " else self.unbytes[c] for c in text)
        return raw.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Ids ``(B, context_length)`` of one text or a list of texts."""
        L = context_length or self.context_length
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), L), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__}")
            ids = [SOT_ID, *self.encode(text), EOT_ID]
            if len(ids) > L:  # truncate, but always end with EOT
                ids = [*ids[: L - 1], EOT_ID]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

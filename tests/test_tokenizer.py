"""histofm.tokenize: ids equal open_clip's SimpleTokenizer, HF's CLIPTokenizer (PLIP) and CONCH's recipe."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.tokenizer import SimpleTokenizer

import histofm
from histofm.data.tokenizer import BPETokenizer
from histofm.data.tokenizer.bpe import NUM_MERGES, VOCAB_FILE, byte_symbols
from histofm.errors import HistofmError

TEXTS = [
    "",
    "an H&E image of tumour nest",
    "Stroma.",
    "  lots   of\twhite\nspace  ",
    "café naïve Ünïcödé résumé",
    "日本語のテキスト と 中文 和 한국어",
    "emoji 🔬🧫 and symbols ±×÷ ½ ² ³ µm",
    "punctuation!!! ... ??? (a) [b] {c} <d> 'quoted' \"double\" a-b_c/d\\e",
    "numbers 12345 3.14 1e-5 20x 0.5um/px",
    "don't it's we're I've I'm you'll he'd",
    "HE-stained, well-differentiated adenocarcinoma; mitoses: 3/10 HPF",
    "x" * 500,
    " ".join(["lymphocytes"] * 120),
    "<start_of_text> literal specials <end_of_text>",
    "tab\tand\r\nnewlines",
]


def test_ids_equal_open_clip_simple_tokenizer() -> None:
    ours, ref = histofm.tokenize(TEXTS), SimpleTokenizer()(TEXTS)
    assert ours.shape == (len(TEXTS), 77) and ours.dtype == torch.long
    assert torch.equal(ours, ref)
    for L in (5, 16, 100):  # truncation keeps EOT last at any context length
        assert torch.equal(histofm.tokenize(TEXTS, context_length=L), SimpleTokenizer(context_length=L)(TEXTS))
    assert BPETokenizer.vocab_size == len(SimpleTokenizer().encoder)


_REF = SimpleTokenizer(context_length=24)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=60), min_size=1, max_size=3))
def test_ids_equal_open_clip_on_arbitrary_unicode(texts: list[str]) -> None:
    """Any unicode (controls, combining marks, astral planes, surrogate-free) tokenises as open_clip does."""
    assert torch.equal(histofm.tokenize(texts, context_length=24), _REF(texts))


def test_html_entities_and_mojibake_are_cleaned_as_open_clip_does() -> None:
    texts = ["&amp;lt;b&amp;gt; bold", "Ã©tÃ© (mojibake)", "&quot;quoted&quot;"]
    assert torch.equal(histofm.tokenize(texts), SimpleTokenizer()(texts))


def test_round_trip_and_bad_input() -> None:
    tok = BPETokenizer(context_length=32)
    assert tok.decode(tok(["Tumour nest, with stroma"])[0]) == "tumour nest , with stroma"
    assert tok.decode(tok([""])[0]) == ""
    with pytest.raises(TypeError, match="strings"):
        tok([3])
    with pytest.raises(HistofmError, match="at least 2"):
        BPETokenizer(context_length=1)


def _hf_clip_tokenizer(tmp_path):
    """transformers' CLIPTokenizer over the bundled vocabulary (vocab.json + merges.txt written here, offline)."""
    from transformers import CLIPTokenizer

    lines = __import__("gzip").open(VOCAB_FILE).read().decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
    symbols = list(byte_symbols().values())
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in lines]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), pad_token="<|endoftext|>")


def test_plip_ids_equal_transformers_clip_tokenizer(tmp_path) -> None:
    hf = _hf_clip_tokenizer(tmp_path)
    # Left out (documented caveats): HF does not unescape HTML entities, and its specials are spelt
    # <|startoftext|>, so open_clip's literal "<start_of_text>" quirk does not apply there.
    texts = [t for t in TEXTS if "&" not in t and "_of_text>" not in t]
    ref = hf(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    ours = histofm.tokenize(texts, model="plip")
    mismatched = [t for t, a, b in zip(texts, ours, ref) if not torch.equal(a, b)]
    assert not mismatched, mismatched
    assert (ours[0, 2:] == 49407).all()  # the empty text: SOT, EOT, then EOT padding


def test_conch_json_tokenizer_matches_transformers_recipe(tmp_path) -> None:
    """CONCH's recipe (PreTrainedTokenizerFast, 127 ids, then one <pad>) on a small byte-level BPE built here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<pad>", "<start_of_text>", "<end_of_text>"]
    tok.train_from_iterator(TEXTS * 3, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="<start_of_text> $A <end_of_text>", special_tokens=[(s, tok.token_to_id(s)) for s in specials[1:]]
    )
    path = tmp_path / "conch_tokenizer.json"
    tok.save(str(path))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<start_of_text>", eos_token="<end_of_text>",
                                 pad_token="<pad>")
    texts = TEXTS[1:12]
    ref = hf(texts, max_length=127, truncation=True, padding="max_length", return_tensors="pt")["input_ids"]
    ref = torch.nn.functional.pad(ref, (0, 1), value=hf.pad_token_id)
    ours = histofm.tokenize(texts, model="conch", tokenizer_file=path)
    assert ours.shape == (len(texts), 128) and torch.equal(ours, ref)

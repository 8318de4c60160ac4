"""Transformer (Vaswani et al. 2017): learning, masks, and parity with torch.nn."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from histofm import HistofmError
from histofm.models.transformer import (
    MultiHeadAttention,
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

PAD, BOS, EOS = 0, 1, 2
VOCAB = 13  # 3 specials + digits 0..9 (ids 3..12)
MAX_DIGITS = 8


def _reversal_batch(
    n: int, g: torch.Generator, exclude: set[tuple[int, ...]] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, ...]]]:
    """Digit sequences of length 3..8, right-padded; the target is the reversed sequence + EOS."""
    src = torch.full((n, MAX_DIGITS), PAD)
    tgt_in = torch.full((n, MAX_DIGITS + 1), PAD)
    tgt_out = torch.full((n, MAX_DIGITS + 1), PAD)
    seqs: list[tuple[int, ...]] = []
    while len(seqs) < n:
        length = int(torch.randint(3, MAX_DIGITS + 1, (1,), generator=g))
        digits = tuple(torch.randint(3, VOCAB, (length,), generator=g).tolist())
        if exclude is not None and digits in exclude:
            continue  # keep held-out sequences out of training
        i = len(seqs)
        seqs.append(digits)
        d = torch.tensor(digits)
        src[i, :length] = d
        tgt_in[i, 0] = BOS
        tgt_in[i, 1 : length + 1] = d.flip(0)
        tgt_out[i, :length] = d.flip(0)
        tgt_out[i, length] = EOS
    return src, tgt_in, tgt_out, seqs


@pytest.fixture
def one_thread():
    # Tiny matrices gain nothing from intra-op threads, and on a busy 2-core machine
    # OpenMP spin-waiting makes them many times slower: train on one thread.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_learns_to_reverse_digit_sequences(one_thread) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    test_src, _, test_out, test_seqs = _reversal_batch(400, torch.Generator().manual_seed(123))
    held_out = set(test_seqs)
    model = Transformer(VOCAB, VOCAB, d_model=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
                        d_ff=128, dropout=0.0, max_len=16, pad_id=PAD)
    steps = 300
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    losses = []
    for _ in range(steps):
        src, tgt_in, tgt_out, _ = _reversal_batch(64, g, exclude=held_out)
        logits = model(src, tgt_in)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.1 * sum(losses[:20]) / 20

    model.eval()
    pred = model.generate_greedy(test_src, max_len=MAX_DIGITS + 1, bos_id=BOS, eos_id=EOS)[:, 1:]
    aligned = torch.full_like(test_out, PAD)
    n = min(pred.shape[1], test_out.shape[1])
    aligned[:, :n] = pred[:, :n]
    real = test_out != PAD  # digits and EOS
    token_acc = (aligned == test_out)[real].float().mean().item()
    assert token_acc >= 0.95, f"held-out token accuracy {token_acc:.3f}"


def _tiny_encoder(norm_first: bool = True) -> TransformerEncoder:
    return TransformerEncoder(d_model=32, num_heads=4, num_layers=2, d_ff=64, norm_first=norm_first).eval()


@pytest.mark.parametrize("norm_first", [True, False])
def test_causal_mask_hides_the_future(norm_first: bool) -> None:
    enc = _tiny_encoder(norm_first)
    x = torch.randn(2, 10, 32)
    t = 4
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn(2, 10 - t - 1, 32)
    with torch.no_grad():
        a, b = enc(x, causal=True), enc(x2, causal=True)
        c, d = enc(x), enc(x2)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().max() > 1e-3  # the future itself did change
    assert (c[:, : t + 1] - d[:, : t + 1]).abs().max() > 1e-3  # without the mask the past sees it


def test_decoder_logits_do_not_see_later_target_tokens() -> None:
    model = Transformer(VOCAB, VOCAB, d_model=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=2,
                        d_ff=64, dropout=0.0, max_len=16).eval()
    src = torch.randint(3, VOCAB, (3, 6))
    tgt = torch.randint(3, VOCAB, (3, 7))
    tgt2 = tgt.clone()
    tgt2[:, 4:] = (tgt2[:, 4:] - 3 + 1) % 10 + 3  # change every token after position 3
    with torch.no_grad():
        a, b = model(src, tgt), model(src, tgt2)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3


def test_padding_mask_isolates_real_tokens() -> None:
    enc = _tiny_encoder()
    x = torch.randn(2, 9, 32)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, 6:] = True
    pad[1, 3:] = True
    x2 = x.clone()
    x2[pad] = torch.randn(int(pad.sum()), 32) * 5  # garbage in the padding
    with torch.no_grad():
        a, b = enc(x, key_padding_mask=pad), enc(x2, key_padding_mask=pad)
        short = enc(x[1:, :3])  # the second sequence without its padding
        unmasked_a, unmasked_b = enc(x), enc(x2)
    torch.testing.assert_close(a[~pad], b[~pad])
    torch.testing.assert_close(a[1, :3], short[0], atol=1e-5, rtol=1e-5)
    assert (unmasked_a[~pad] - unmasked_b[~pad]).abs().max() > 1e-3  # the mask is what protects them
    assert torch.isfinite(a).all()


def test_all_padding_row_stays_finite() -> None:
    enc = _tiny_encoder()
    pad = torch.ones(1, 5, dtype=torch.bool)
    out = enc(torch.randn(1, 5, 32), key_padding_mask=pad)
    assert torch.isfinite(out).all()


def _mha_pair(d: int = 32, h: int = 4) -> tuple[nn.MultiheadAttention, MultiHeadAttention]:
    ref = nn.MultiheadAttention(d, h, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_bias.normal_()
        ref.out_proj.bias.normal_()
    ours = MultiHeadAttention(d, h).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_self_attention_matches_torch_multihead_attention() -> None:
    ref, ours = _mha_pair()
    x = torch.randn(3, 7, 32)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 4:] = True
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)  # True = masked, torch's convention
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)
        a = ours(x, key_padding_mask=pad)
        b = ref(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        a = ours(x, causal=True)
        b = ref(x, x, x, attn_mask=causal, need_weights=False)[0]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cross_attention_matches_torch_multihead_attention() -> None:
    ref, ours = _mha_pair()
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, 7:] = True
    with torch.no_grad():
        a = ours(q, kv, kv, key_padding_mask=pad)
        b = ref(q, kv, kv, key_padding_mask=pad, need_weights=False)[0]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        v = torch.randn(2, 9, 32)  # distinct key and value tensors
        torch.testing.assert_close(ours(q, kv, v), ref(q, kv, v, need_weights=False)[0], atol=1e-5, rtol=1e-5)


def _randomise(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_layer_matches_torch(norm_first: bool) -> None:
    ref = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first).eval()
    _randomise(ref)
    ours = TransformerEncoderLayer(32, 4, 64, norm_first=norm_first).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 6, 32)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad():
        a = ours(x, key_padding_mask=pad)
        b = ref(x, src_key_padding_mask=pad)
    torch.testing.assert_close(a[~pad], b[~pad], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [True, False])
def test_decoder_stack_matches_torch(norm_first: bool) -> None:
    layer = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
    ref = nn.TransformerDecoder(layer, num_layers=2, norm=nn.LayerNorm(32) if norm_first else None).eval()
    _randomise(ref)
    ours = TransformerDecoder(32, 4, 2, 64, norm_first=norm_first).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, mem = torch.randn(2, 6, 32), torch.randn(2, 8, 32)
    mem_pad = torch.zeros(2, 8, dtype=torch.bool)
    mem_pad[0, 5:] = True
    mask = nn.Transformer.generate_square_subsequent_mask(6)
    with torch.no_grad():
        a = ours(x, mem, memory_key_padding_mask=mem_pad)
        b = ref(x, mem, tgt_mask=mask, tgt_is_causal=True, memory_key_padding_mask=mem_pad)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert isinstance(ours.layers[0], TransformerDecoderLayer)


def test_generate_greedy_stops_and_pads_after_eos() -> None:
    model = Transformer(VOCAB, VOCAB, d_model=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=1,
                        d_ff=64, dropout=0.0, max_len=16).eval()
    with torch.no_grad():
        model.generator.bias[EOS] = 100.0  # force EOS as the first token
    out = model.generate_greedy(torch.randint(3, VOCAB, (2, 5)), max_len=6, bos_id=BOS, eos_id=EOS)
    assert out.tolist() == [[BOS, EOS], [BOS, EOS]]


def test_bad_input_has_clear_errors() -> None:
    model = Transformer(VOCAB, VOCAB, d_model=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=1,
                        d_ff=64, max_len=8)
    with pytest.raises(HistofmError, match="max_len"):
        model(torch.randint(3, VOCAB, (1, 12)), torch.randint(3, VOCAB, (1, 4)))
    with pytest.raises(HistofmError, match="divisible"):
        MultiHeadAttention(30, 4)
    with pytest.raises(HistofmError, match="key_padding_mask"):
        _tiny_encoder()(torch.randn(2, 5, 32), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))

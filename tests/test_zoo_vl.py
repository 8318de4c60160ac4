"""Vision-language zoo entries: the official layouts load strictly and match the maintained implementations.

PLIP against transformers' ``CLIPModel``, QuiltNet against open_clip's ``CLIP``,
CONCH against timm's ViT and open_clip's CoCa parts (AttentionalPooler,
TextTransformer with a class token, MultimodalTransformer) in CONCH's
configuration. Small widths and depths keep it fast; the full-size layouts are
compared key by key and shape by shape on the meta device.
"""

from __future__ import annotations

import pytest
import torch
from open_clip.model import CLIP as OpenCLIP
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import AttentionalPooler, MultimodalTransformer
from open_clip.transformer import TextTransformer as OCTextTransformer
from safetensors.torch import save_file

import histofm
from histofm import HistofmError

TINY_VISION = dict(image_size=32, patch_size=8, width=64, layers=2, heads=2, embed_dim=32)
TINY_TEXT = dict(context_length=16, width=64, heads=2, layers=2, embed_dim=32)


def _save(sd: dict[str, torch.Tensor], path) -> str:
    save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(path))
    return str(path)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (LayerNorms and biases too), so every weight matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _texts() -> list[str]:
    return ["an H&E image of tumour nest", "stroma", "a photo of skin, with many lymphocytes!!", ""]


# ------------------------------------------------------------------ QuiltNet (open_clip layout)
def _openclip_tiny(quick_gelu: bool = False) -> OpenCLIP:
    torch.manual_seed(0)
    ref = OpenCLIP(
        32,
        CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
        CLIPTextCfg(context_length=16, vocab_size=49408, width=64, heads=2, layers=2),
        quick_gelu=quick_gelu,
    ).eval()
    _randomise(ref, 1)
    return ref


def test_quiltnet_matches_open_clip(tmp_path) -> None:
    ref = _openclip_tiny()
    ckpt = tmp_path / "open_clip_pytorch_model.bin"  # the hub's file name and format (a torch pickle)
    torch.save(ref.state_dict(), ckpt)
    ours = histofm.create_model("quiltnet_b32", checkpoint_path=ckpt, vision=TINY_VISION, text=TINY_TEXT)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tokens = histofm.tokenize(_texts(), model="quiltnet_b32", context_length=16)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), ref.encode_image(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.encode_text(tokens), ref.encode_text(tokens), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.logit_scale, ref.logit_scale)
        ours_logits = ours(images, tokens)
        ref_img, ref_txt, ref_scale = ref(images, tokens)[:3]
        torch.testing.assert_close(ours_logits, ref_scale * ref_img @ ref_txt.T, rtol=1e-4, atol=1e-4)


def test_full_size_layouts_match_the_references() -> None:
    """ViT-B/32 key names and shapes equal open_clip's (QuiltNet) and transformers' (PLIP), converted."""
    from transformers import CLIPConfig, CLIPModel

    from histofm.zoo.vl import hf_clip_filter, openclip_filter

    with torch.device("meta"):
        oc = OpenCLIP(512, CLIPVisionCfg(patch_size=32), CLIPTextCfg())
        hf = CLIPModel(CLIPConfig())  # defaults are ViT-B/32
        quilt, plip = histofm.create_model("quiltnet_b32"), histofm.create_model("plip")
    for ours, theirs in ((quilt, openclip_filter(oc.state_dict(), quilt)), (plip, hf_clip_filter(hf.state_dict(), plip))):
        own = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert own == {k: tuple(v.shape) for k, v in theirs.items()}
    assert sum(p.numel() for p in quilt.parameters()) == histofm.model_info("quiltnet_b32").num_params


# ------------------------------------------------------------------ PLIP (Hugging Face CLIPModel layout)
def test_plip_matches_transformers_clip(tmp_path) -> None:
    from transformers import CLIPConfig, CLIPModel

    common = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, hidden_act="quick_gelu")
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=16, eos_token_id=49407, **common),
        vision_config=dict(image_size=32, patch_size=8, **common),
        projection_dim=32,
    )
    torch.manual_seed(0)
    ref = CLIPModel(cfg).eval()
    _randomise(ref, 3)
    ckpt = _save(ref.state_dict(), tmp_path / "model.safetensors")
    ours = histofm.create_model("plip", checkpoint_path=ckpt, vision=TINY_VISION, text=TINY_TEXT)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    tokens = histofm.tokenize(_texts(), model="plip", context_length=16)
    assert (tokens[3, 2:] == 49407).all()  # PLIP pads with EOT
    with torch.no_grad():
        ref_img = ref.get_image_features(pixel_values=images)
        ref_txt = ref.get_text_features(input_ids=tokens, attention_mask=torch.ones_like(tokens))
        ref_img = getattr(ref_img, "pooler_output", ref_img)
        ref_txt = getattr(ref_txt, "pooler_output", ref_txt)
        torch.testing.assert_close(ours.encode_image(images), ref_img, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.encode_text(tokens), ref_txt, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.logit_scale, ref.logit_scale)


# ------------------------------------------------------------------ CONCH (CoCa)
def _conch_reference(seed: int) -> dict[str, torch.nn.Module]:
    """The parts CONCH is built from, at a small size: timm's ViT and open_clip's CoCa modules."""
    import timm

    torch.manual_seed(seed)
    parts = {
        "visual.trunk": timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=0, dynamic_img_size=True
        ),
        "visual.attn_pool_contrast": AttentionalPooler(32, 64, n_head=2, n_queries=1),
        "visual.ln_contrast": torch.nn.LayerNorm(32),
        "visual.attn_pool_caption": AttentionalPooler(64, 64, n_head=2, n_queries=5),
        "visual.ln_caption": torch.nn.LayerNorm(64),
        # context 15 + the class slot = CONCH's 128-row position table at this scale (16 rows)
        "text": OCTextTransformer(
            context_length=15, vocab_size=500, width=64, heads=2, layers=2, output_dim=32, embed_cls=True,
            output_tokens=True, pad_id=0, correct_cls_mask=False,
        ),
        "text_decoder": MultimodalTransformer(width=64, layers=2, heads=2, context_length=16, output_dim=500),
    }
    for i, m in enumerate(parts.values()):
        _randomise(m.eval(), seed + i)
    return parts


CONCH_TINY = dict(
    trunk=dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
    embed_dim=32, embed_dim_caption=64, text=dict(vocab_size=500, context_length=16, width=64, heads=2, layers=2),
    decoder_layers=2, decoder_heads=2, pooler_heads=2, n_queries_caption=5,
)


def test_conch_matches_timm_and_open_clip_coca_parts(tmp_path) -> None:
    parts = _conch_reference(5)
    sd = {f"{name}.{k}": v for name, m in parts.items() for k, v in m.state_dict().items()}
    sd = {k: v for k, v in sd.items() if not k.endswith("attn_mask")}
    proj = torch.randn(32, 32, generator=torch.Generator().manual_seed(6))
    sd.update({"visual.proj_contrast": proj, "logit_scale": torch.tensor(4.0)})
    ours = histofm.create_model("conch", checkpoint_path=_save(sd, tmp_path / "pytorch_model.safetensors"), **CONCH_TINY)

    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(8)
    tokens = torch.randint(3, 500, (2, 16), generator=g)
    tokens[0, 9:] = 0  # padding; the last slot is CONCH's placeholder for the class token
    with torch.no_grad():
        feats = parts["visual.trunk"].forward_features(images)
        torch.testing.assert_close(ours.visual.trunk.forward_features(images), feats, rtol=1e-4, atol=1e-5)
        pooled = parts["visual.ln_contrast"](parts["visual.attn_pool_contrast"](feats)[:, 0])
        torch.testing.assert_close(ours.encode_image(images), pooled @ proj, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.encode_image(images, proj_contrast=False), pooled, rtol=1e-4, atol=1e-5)
        ref_txt, ref_tok = parts["text"](tokens[:, :-1])
        torch.testing.assert_close(ours.encode_text(tokens), ref_txt, rtol=1e-4, atol=1e-5)
        ref_cap = parts["visual.ln_caption"](parts["visual.attn_pool_caption"](feats))
        ref_logits = parts["text_decoder"](ref_cap, ref_tok)
        logits = ours.caption_logits(images, tokens)
        # CONCH's own mask (its TextTransformer.build_cls_mask): causal, and only the class row skips padding,
        # shifted one key right. Built here from that code's equations around open_clip's blocks: every
        # position of our token features must match, padding rows included.
        oc, t = parts["text"], tokens[:, :-1]
        B, L = t.shape
        x = torch.cat([oc.token_embedding(t), oc.cls_emb.expand(B, 1, -1)], 1) + oc.positional_embedding[: L + 1]
        mask = torch.full((L + 1, L + 1), float("-inf")).triu(1).repeat(B, 1, 1)
        cls_row = torch.cat([torch.ones(B, 1, dtype=torch.bool), t != 0], 1)
        mask[:, -1] = torch.zeros(B, L + 1).masked_fill(~cls_row, float("-inf"))
        x = oc.transformer(x, attn_mask=mask.repeat_interleave(2, 0))
        pooled, feats = ours.text(t)
        torch.testing.assert_close(feats, x[:, :-1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pooled, oc.ln_final(x[:, -1]) @ oc.text_projection, rtol=1e-4, atol=1e-5)
    # open_clip 3.x also hides padding keys from padding rows; identical where that cannot matter
    real = torch.ones(2, 15, dtype=torch.bool)
    real[0, 10:] = False
    torch.testing.assert_close(logits[real], ref_logits[real], rtol=1e-4, atol=1e-4)
    assert logits.shape == (2, 15, 500)


def test_conch_full_size_layout() -> None:
    """Every key and shape of CONCH's checkpoint, built from the same reference parts at full size."""
    import timm

    with torch.device("meta"):
        ref = {
            "visual.trunk": timm.models.vision_transformer.VisionTransformer(img_size=448, patch_size=16, num_classes=0),
            "visual.attn_pool_contrast": AttentionalPooler(512, 768, n_head=8, n_queries=1),
            "visual.ln_contrast": torch.nn.LayerNorm(512),
            "visual.attn_pool_caption": AttentionalPooler(768, 768, n_head=8, n_queries=256),
            "visual.ln_caption": torch.nn.LayerNorm(768),
            "text": OCTextTransformer(context_length=127, vocab_size=32007, width=768, heads=12, layers=12,
                                      output_dim=512, embed_cls=True),
            "text_decoder": MultimodalTransformer(width=768, layers=12, heads=12, context_length=128, output_dim=32007),
        }
        ours = histofm.create_model("conch")
    want = {f"{n}.{k}": tuple(v.shape) for n, m in ref.items() for k, v in m.state_dict().items() if "attn_mask" not in k}
    want.update({"visual.proj_contrast": (512, 512), "logit_scale": ()})
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    assert want["text.positional_embedding"] == (128, 768)


def test_vl_entries_are_marked_and_bad_checkpoints_explained(tmp_path) -> None:
    for name in ("plip", "quiltnet_b32", "conch"):
        info = histofm.model_info(name)
        assert info.kind == "vision-language" and info.embed_dim == 512
    assert histofm.model_info("uni").kind == "tile"
    with pytest.raises(HistofmError, match="without a text tower"):
        histofm.tokenize(["x"], model="uni")
    with pytest.raises(HistofmError, match="tokenizer_file"):
        histofm.tokenize(["x"], model="conch")
    ckpt = _save({"visual.conv1.weight": torch.zeros(64, 3, 8, 8)}, tmp_path / "bad.safetensors")
    with pytest.raises(HistofmError, match="missing"):
        histofm.create_model("quiltnet_b32", checkpoint_path=ckpt, vision=TINY_VISION, text=TINY_TEXT)


def test_coca_losses_match_open_clip_and_every_parameter_learns() -> None:
    """L_con + L_cap of our CoCa equal open_clip's CoCaLoss; every parameter of CONCH's layout gets a gradient."""
    from open_clip.loss import CoCaLoss

    from histofm.models.coca import coca_caption_loss

    torch.manual_seed(0)
    model = histofm.create_model("conch", **CONCH_TINY)
    images = torch.randn(3, 3, 32, 32)
    tokens = torch.randint(3, 500, (3, 16))
    tokens[1, 6:] = 0
    logits = model.caption_logits(images, tokens)
    img, txt = model.encode_image(images, True), model.encode_text(tokens, True)
    scale = model.logit_scale.exp()
    ref_con, ref_cap = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0, pad_id=0)(
        img, txt, logits, tokens[:, 1:], scale
    )
    con = torch.nn.functional.cross_entropy(model(images, tokens), torch.arange(3))
    con = (con + torch.nn.functional.cross_entropy(model(images, tokens).T, torch.arange(3))) / 2
    cap = coca_caption_loss(logits, tokens, pad_id=0)
    torch.testing.assert_close(con, ref_con, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cap, ref_cap, rtol=1e-5, atol=1e-6)
    (con + cap).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


@pytest.mark.parametrize("name", ["plip", "quiltnet_b32"])
def test_clip_entries_every_parameter_learns(name: str) -> None:
    torch.manual_seed(0)
    model = histofm.create_model(name, vision=TINY_VISION, text=TINY_TEXT)
    logits = model(torch.randn(3, 3, 32, 32), histofm.tokenize(_texts()[:3], model=name, context_length=16))
    loss = (torch.nn.functional.cross_entropy(logits, torch.arange(3)) + torch.nn.functional.cross_entropy(logits.T, torch.arange(3))) / 2
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_preprocessing_matches_the_reference_pipelines() -> None:
    """open_clip's eval transform (QuiltNet 224, CONCH 448) and transformers' CLIPImageProcessor (PLIP)."""
    from open_clip.transform import image_transform
    from PIL import Image
    from transformers import CLIPImageProcessor

    from histofm.data import sample_path
    from histofm.zoo.vl import OPENAI_MEAN, OPENAI_STD

    img = Image.open(sample_path("hgsc_nest")).convert("RGB").crop((100, 100, 510, 430))  # not square
    for name, size in (("quiltnet_b32", 224), ("conch", 448)):
        ref = image_transform(size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)(img)
        torch.testing.assert_close(histofm.eval_transform(name)(img), ref, atol=1e-5, rtol=0)
    ref = CLIPImageProcessor()(img, return_tensors="pt")["pixel_values"][0]
    diff = (histofm.eval_transform("plip")(img) - ref).abs()
    assert diff.max() < 1.01 / 255 / min(OPENAI_STD) and diff.mean() < 1e-3  # HF rounds its resize to 8 bits

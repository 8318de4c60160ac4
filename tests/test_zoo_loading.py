"""Zoo loading: bad input in one clear sentence, bfloat16, one copy of the weights in memory, hub errors offline."""

from __future__ import annotations

import json
import sys

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
)
from safetensors.torch import save_file
from transformers import ViTConfig, ViTModel

import histofm
from histofm import HistofmError
from histofm.hub import download_weights


@pytest.fixture(autouse=True)
def _one_thread():
    # Small CPU work; one thread avoids oversubscription when the machine is shared.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _one_sentence(message: str) -> None:
    assert "\n" not in message and message.rstrip().endswith((".", "?")), message


def _zeros_checkpoint(name: str, path, **overrides) -> None:
    """A checkpoint of ``name`` in its published layout; values do not matter here."""
    with torch.device("meta"):
        model = histofm.create_model(name, **overrides)
    sd = {k: torch.zeros(v.shape) for k, v in model.state_dict().items()}
    save_file(sd, path) if str(path).endswith(".safetensors") else torch.save(sd, path)


def _hf_phikon_folder(path, depth: int = 1) -> None:
    with torch.device("meta"):
        ref = ViTModel(ViTConfig(num_hidden_layers=depth, image_size=224, patch_size=16, layer_norm_eps=1e-12))
    ref.to_empty(device="cpu").save_pretrained(path)


# ------------------------------------------------------------------------------- bad input
def test_unknown_name_suggests_close_names() -> None:
    for call in (lambda: histofm.create_model("virchow3"), lambda: histofm.model_info("unii"),
                 lambda: histofm.eval_transform("phikon-v2")):
        with pytest.raises(HistofmError) as e:
            call()
        _one_sentence(str(e.value))
        assert "Unknown model" in str(e.value) and "Did you mean" in str(e.value)


def test_checkpoint_of_another_model_lists_the_mismatches(tmp_path) -> None:
    _zeros_checkpoint("uni", tmp_path / "uni.bin", depth=1)
    with pytest.raises(HistofmError) as e:
        histofm.create_model("virchow", depth=1, checkpoint_path=tmp_path / "uni.bin")
    msg = str(e.value)
    _one_sentence(msg)
    assert "does not fit this model" in msg and "shape mismatches" in msg and "another model" in msg
    assert "blocks.0.attn.qkv.weight (3072, 1024) vs (3840, 1280)" in msg

    _hf_phikon_folder(tmp_path / "phikon")  # a transformers folder given to a timm-layout model
    with pytest.raises(HistofmError) as e:
        histofm.create_model("uni", depth=1, checkpoint_path=tmp_path / "phikon")
    msg = str(e.value)
    _one_sentence(msg)
    assert "missing" in msg and "blocks.0.attn.qkv.weight" in msg
    assert "unexpected" in msg and "embeddings." in msg


def test_truncated_files_are_reported(tmp_path) -> None:
    _zeros_checkpoint("kaiko_vits16", tmp_path / "pytorch_model.bin", depth=1)
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(HistofmError, match="unreadable or truncated") as e:
        histofm.create_model("kaiko_vits16", depth=1, checkpoint_path=tmp_path / "cut.bin")
    _one_sentence(str(e.value))

    _hf_phikon_folder(tmp_path / "phikon")
    weights = tmp_path / "phikon" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(HistofmError, match="unreadable or truncated"):
        histofm.create_model("phikon", depth=1, checkpoint_path=tmp_path / "phikon")

    (tmp_path / "phikon" / "config.json").write_text("{not json")
    with pytest.raises(HistofmError, match="config.json is not valid JSON") as e:
        histofm.create_model("phikon", depth=1, checkpoint_path=tmp_path / "phikon")
    _one_sentence(str(e.value))


def test_bfloat16_loads_in_half_precision(tmp_path) -> None:
    ref = histofm.create_model("h_optimus_0", depth=1, img_size=56).eval()
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    half = histofm.create_model("h_optimus_0", depth=1, img_size=56, checkpoint_path=tmp_path / "pytorch_model.bin",
                                dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        a, b = ref(x), half(x.bfloat16()).float()
    assert torch.isfinite(b).all()
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99
    # cast while reading (in groups, both file formats) = read everything, then cast
    from safetensors.torch import save_file

    save_file(ref.state_dict(), tmp_path / "model.safetensors")
    st = histofm.create_model("h_optimus_0", depth=1, img_size=56, checkpoint_path=tmp_path / "model.safetensors",
                              dtype=torch.bfloat16)
    for name, value in ref.state_dict().items():
        assert torch.equal(half.state_dict()[name], value.bfloat16()), name
        assert torch.equal(st.state_dict()[name], value.bfloat16()), name


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_holds_one_copy_of_the_weights(tmp_path) -> None:
    """h_optimus_0 (3 blocks, ~350 MB, published .bin layout): peak RSS growth < 1.3 x the file size.

    Built on the meta device, the checkpoint's memory-mapped tensors are assigned as the
    parameters, so the only resident copy is the file's pages. A loader that copied the
    weights (state dict + model) would show ~2 x.
    """
    path = tmp_path / "pytorch_model.bin"
    _zeros_checkpoint("h_optimus_0", path, depth=3)
    size = path.stat().st_size
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset this process's peak-RSS counter (Linux >= 4.0)
    except OSError:
        pytest.skip("this kernel does not let a process reset its peak RSS")
    before = _status("VmRSS")
    model = histofm.create_model("h_optimus_0", depth=3, checkpoint_path=path)
    with torch.no_grad():
        for p in model.parameters():
            p.sum()  # touch every page of every weight
    ratio = (_status("VmHWM") - before) / size
    del model
    assert ratio < 1.3, f"peak RSS grew by {ratio:.2f} x the file size while loading"
    assert ratio > 0.8, f"only {ratio:.2f} x became resident: the probe does not measure the load"


_BF16_PROBE = """
import json, sys
import torch
import histofm
import histofm.models.convert as convert

convert._CAST_GROUP_BYTES = 32 * 2**20

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

histofm.create_model("h_optimus_0", depth=1, img_size=28, checkpoint_path=sys.argv[2], dtype=torch.bfloat16)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS counter after the imports (the tiny load above did the lazy ones)
before = status("VmRSS")
model = histofm.create_model("h_optimus_0", depth=3, checkpoint_path=sys.argv[1], dtype=torch.bfloat16)
with torch.no_grad():
    for p in model.parameters():
        p.sum()  # touch every page of every weight
print(json.dumps({"grew": status("VmHWM") - before}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_bfloat16_loading_never_holds_the_fp32_file_and_the_copy(tmp_path) -> None:
    """A bfloat16 load of an fp32 .bin peaks near half the file (the cast copy), not 1.5 x.

    The file is read memory-mapped in groups of tensors (32 MiB here) whose mapping is
    released before the next group: reading it whole and then casting would keep every
    fp32 page resident next to the bfloat16 copy. Measured in a fresh process: in a
    long-lived one, memory freed earlier is reused without growing the resident size.
    """
    import json
    import subprocess

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("this kernel does not let a process reset its peak RSS")
    path = tmp_path / "pytorch_model.bin"
    _zeros_checkpoint("h_optimus_0", path, depth=3)
    tiny = tmp_path / "tiny.bin"
    _zeros_checkpoint("h_optimus_0", tiny, depth=1, img_size=28)
    out = subprocess.run([sys.executable, "-c", _BF16_PROBE, str(path), str(tiny)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ratio = json.loads(out.stdout.strip().splitlines()[-1])["grew"] / path.stat().st_size
    assert ratio < 0.8, f"peak RSS grew by {ratio:.2f} x the file size while loading in bfloat16"
    assert ratio > 0.4, f"only {ratio:.2f} x became resident: the probe does not measure the load"


# ------------------------------------------------------------------------------- the hub, offline
def _raiser(error: BaseException):
    def fake(*args, **kwargs):
        raise error
    return fake


def _gated() -> GatedRepoError:
    err = GatedRepoError.__new__(GatedRepoError)  # its __init__ wants an HTTP response
    Exception.__init__(err, "401 Client Error: Cannot access gated repo for url https://huggingface.co/...")
    return err


def test_gated_repository_says_how_to_get_access(monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raiser(_gated()))
    with pytest.raises(HistofmError) as e:
        histofm.create_model("uni", pretrained=True, depth=1)
    msg = str(e.value)
    _one_sentence(msg)
    assert "MahmoodLab/UNI is gated" in msg and "HF_TOKEN" in msg and "checkpoint_path" in msg


@pytest.mark.parametrize("error", [LocalEntryNotFoundError("not in cache"), OfflineModeIsEnabled("offline"),
                                   ConnectionError("no route")])
def test_offline_says_how_to_pass_a_local_file(monkeypatch, error) -> None:
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raiser(error))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _raiser(error))
    with pytest.raises(HistofmError) as e:
        download_weights(histofm.model_info("phikon"))  # public repo: no token advice
    msg = str(e.value)
    _one_sentence(msg)
    assert "Cannot reach the Hugging Face hub for owkin/phikon" in msg and "checkpoint_path" in msg
    assert "HF_TOKEN" not in msg
    with pytest.raises(HistofmError, match="it is gated: accept its licence on the model page and log in"):
        download_weights(histofm.model_info("virchow2"))  # gated repo: say so as well


def test_other_weights_format_is_tried(monkeypatch, tmp_path) -> None:
    calls = []

    def fake(repo_id, filename, **kwargs):
        calls.append(filename)
        if filename == "pytorch_model.bin":
            raise EntryNotFoundError("404: no such file")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    assert download_weights(histofm.model_info("uni2_h")) == tmp_path / "model.safetensors"
    assert calls == ["pytorch_model.bin", "model.safetensors"]


def test_pretrained_snapshot_goes_through_the_hf_converter(monkeypatch, tmp_path) -> None:
    _hf_phikon_folder(tmp_path / "snap")
    patterns = []

    def fake_snapshot(repo_id, allow_patterns=None, **kwargs):
        patterns.append((repo_id, tuple(allow_patterns)))
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    model = histofm.create_model("phikon", pretrained=True, depth=1)
    assert patterns == [("owkin/phikon", ("config.json", "model.safetensors"))]
    assert model.norm.eps == json.loads((tmp_path / "snap" / "config.json").read_text())["layer_norm_eps"] == 1e-12
    assert not model.training

"""``histofm env``: offline report, the token never printed, and ``--online`` with the hub call faked."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys

import huggingface_hub
import pytest
import torch
from huggingface_hub import errors

import histofm
from histofm.cli import main
from histofm.commands import env
from histofm.wsi import readers

SECRET = "hf_NotARealTokenButSecret123"


def _response(status: int, url: str):  # noqa: ANN202
    http = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")
    return http.Response(status, request=http.Request("HEAD", url))


@pytest.fixture(autouse=True)
def _hub_env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def _run(argv: list[str], capsys) -> str:
    assert main(["env", *argv]) == 0
    return capsys.readouterr().out


def test_json_report_offline(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    out = _run(["--json"], capsys)
    assert SECRET not in out
    report = json.loads(out)
    v = report["versions"]
    assert v["torch"].split("+")[0] == torch.__version__.split("+")[0] and v["histofm"] == histofm.__version__
    assert v["python"] == ".".join(map(str, sys.version_info[:3]))
    assert v["openslide library"] == importlib.import_module("openslide").__library_version__
    assert v["huggingface_hub"] == huggingface_hub.__version__
    r = report["readers"]
    assert set(r) == {"openslide", "tiffslide", "image"}
    assert r["openslide"]["works"] and r["tiffslide"]["works"]
    assert "2220 x 2967" in r["openslide"]["detail"]  # the bundled slide, really opened
    acc = report["accelerator"]
    assert acc["cpu"]["threads"] == torch.get_num_threads() and isinstance(acc["cpu"]["bf16_autocast"], bool)
    assert len(acc["cuda"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    hub = report["hub"]
    assert hub["cache"] == str(tmp_path / "hf" / "hub") and hub["cache_from"] == "HF_HOME"
    assert hub["token"] == "HF_TOKEN" and hub["offline"] is False
    assert report["repositories"]["checked"] is False and "--online" in report["repositories"]["note"]


def test_text_report_never_shows_the_token(capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("COLUMNS", "200")
    out = _run([], capsys)
    assert SECRET not in out
    for heading in ("versions", "slide readers", "accelerator and precisions", "Hugging Face hub"):
        assert heading in out
    assert "set (HF_TOKEN)" in out and "gated repositories: skipped (pass --online)" in out


def test_a_reader_that_cannot_be_imported_is_reported(capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "openslide", None)  # `import openslide` now fails
    monkeypatch.setattr(readers, "_fallback_noticed", False)
    report = json.loads(_run(["--json"], capsys))
    assert report["readers"]["openslide"]["works"] is False
    assert "cannot import openslide" in report["readers"]["openslide"]["detail"]
    assert report["readers"]["tiffslide"]["works"] is True
    assert report["versions"]["openslide library"] is None


def test_gated_repositories_are_the_zoo_entries_marked_gated() -> None:
    repos = env.gated_repositories()
    expected = {histofm.model_info(n).hub_id for n in histofm.list_models()
                if histofm.model_info(n).gated and histofm.model_info(n).hub_id}
    assert set(repos) == expected and "MahmoodLab/UNI" in repos
    assert "owkin/phikon" not in repos  # public, not gated


def test_online_reachable_gated_and_network_error(capsys, monkeypatch) -> None:
    calls: list[tuple[str, float]] = []

    def fake_metadata(url: str, timeout: float | None = None, **kwargs):  # noqa: ANN202, ANN003
        calls.append((url, timeout))
        if "/MahmoodLab/UNI/" in url:
            return object()  # reachable
        if "/paige-ai/" in url:
            raise errors.GatedRepoError("Access to model is restricted", response=_response(401, url))
        if "/bioptimus/" in url:
            raise errors.HfHubHTTPError("Forbidden", response=_response(403, url))
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", fake_metadata)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    out = _run(["--online", "--timeout", "2", "--json"], capsys)
    assert SECRET not in out
    res = json.loads(out)["repositories"]
    assert res["checked"] and res["timeout_s"] == 2
    status = {repo: r["status"] for repo, r in res["results"].items()}
    assert set(status) == set(env.gated_repositories()) and len(calls) == len(status)
    assert all(t == 2 for _, t in calls)
    assert status["MahmoodLab/UNI"] == "reachable"
    assert status["paige-ai/Virchow2"] == "gated" and "accept the terms" in res["results"]["paige-ai/Virchow2"]["detail"]
    assert status["bioptimus/H-optimus-0"] == "gated"  # a bare 403 is gated too
    assert status["MahmoodLab/UNI2-h"] == "unreachable"
    assert "ConnectionError" in res["results"]["MahmoodLab/UNI2-h"]["detail"]
    # The probe asks for the file the zoo would download.
    assert any(url.endswith("/MahmoodLab/UNI/resolve/main/pytorch_model.bin") for url, _ in calls)


def test_online_is_skipped_when_the_hub_is_switched_off(capsys, monkeypatch) -> None:
    def boom(*args, **kwargs):  # noqa: ANN202, ANN002, ANN003
        raise AssertionError("no request may be made with HF_HUB_OFFLINE=1")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", boom)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = json.loads(_run(["--online", "--json"], capsys))
    assert report["hub"]["offline"] is True
    assert report["repositories"] == {"checked": False, "note": "skipped: HF_HUB_OFFLINE is set"}


def test_cuda_precisions_follow_the_compute_capability(monkeypatch) -> None:
    """Without a GPU here, fake two: a V100 (7.0: fp16 only) and an A100 (8.0: fp16, bf16, tf32)."""
    from types import SimpleNamespace

    cards = [SimpleNamespace(name="Tesla V100", major=7, minor=0, total_memory=16 * 2**30),
             SimpleNamespace(name="A100", major=8, minor=0, total_memory=80 * 2**30)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(cards))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: cards[i])
    gpus = env.accelerator()["cuda"]
    assert [(g["name"], g["capability"], g["memory_gib"]) for g in gpus] == [("Tesla V100", "7.0", 16.0),
                                                                            ("A100", "8.0", 80.0)]
    assert [(g["fp16"], g["bf16"], g["tf32"]) for g in gpus] == [(True, False, False), (True, True, True)]


def test_a_closed_pipe_is_not_a_traceback() -> None:
    """`histofm env --json | head -1`: the reader goes away before the report is printed."""
    read, write = os.pipe()
    os.close(read)  # nobody will read: the first print raises BrokenPipeError
    environ = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "histofm", "env", "--json"], stdout=write, stderr=subprocess.PIPE,
                          text=True, timeout=120, env=environ)
    os.close(write)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr

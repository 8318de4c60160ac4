"""``histofm env``: what this installation can do, for bug reports and first-day checks.

Reports the versions of the libraries histofm relies on, which slide readers can import and
open the bundled sample slide, the accelerator and the precisions it supports, the Hugging
Face cache and whether a token is set (never its value). With ``--online`` it also asks the
hub, with a short timeout, whether each gated zoo repository can be reached with this token.
Nothing here touches the network without ``--online``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from histofm.commands._common import add_command

# (label, distribution name) in the order shown.
_DISTRIBUTIONS = (
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("timm", "timm"),
    ("openslide-python", "openslide-python"),
    ("openslide-bin", "openslide-bin"),
    ("tiffslide", "tiffslide"),
    ("h5py", "h5py"),
    ("huggingface_hub", "huggingface_hub"),
)
_TRUE = ("1", "true", "yes", "on")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "env", help="report versions, slide readers, GPU precisions and the hub cache (for bug reports)",
        example="histofm env\nhistofm env --online --json > env.json", description=__doc__,
    )
    p.add_argument("--online", action="store_true", help="also check that each gated zoo repository is reachable")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each hub request (with --online)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from histofm.checks import check_range

    check_range(args.timeout, "--timeout", low=0, low_open=True)
    report = collect(online=args.online, timeout=args.timeout)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_tables(report)
    return 0


def collect(online: bool = False, timeout: float = 5.0) -> dict[str, Any]:
    """The whole report as a JSON-able dict (sections: versions, readers, accelerator, hub, repositories)."""
    return {
        "versions": versions(),
        "readers": readers(),
        "accelerator": accelerator(),
        "hub": hub_settings(),
        "repositories": repositories(timeout) if online else {"checked": False, "note": "skipped (pass --online)"},
    }


def versions() -> dict[str, str | None]:
    """Python, histofm and each library's version (``None`` when not installed)."""
    import histofm

    out: dict[str, str | None] = {"python": platform.python_version(), "histofm": histofm.__version__}
    for label, dist in _DISTRIBUTIONS:
        try:
            out[label] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[label] = None
    try:  # the C library behind openslide-python, loaded at import
        out["openslide library"] = str(importlib.import_module("openslide").__library_version__)
    except Exception:  # not importable on this platform: readers() says why
        out["openslide library"] = None
    return out


def readers() -> dict[str, dict[str, Any]]:
    """For each backend: can its library be imported, and can it open the bundled sample slide."""
    from histofm.data import sample_path
    from histofm.errors import HistofmError
    from histofm.wsi.readers import BACKENDS, open_slide

    modules = {"openslide": "openslide", "tiffslide": "tiffslide", "image": "tifffile"}
    sample = sample_path("cmu_small_region")
    out: dict[str, dict[str, Any]] = {}
    for name in BACKENDS:
        try:
            importlib.import_module(modules[name])
        except Exception as e:  # ImportError, or OSError when a shared library is missing
            out[name] = {"works": False, "detail": f"cannot import {modules[name]} ({type(e).__name__}: {e})"}
            continue
        try:
            with open_slide(sample, backend=name) as slide:
                w, h = slide.dimensions
                mpp = f"{slide.mpp:.4g} um/px" if slide.has_mpp else "no resolution in what it reads"
                out[name] = {"works": True, "detail": f"opened {sample.name}: {w} x {h} px, "
                                                      f"{slide.level_count} level(s), {mpp}"}
        except HistofmError as e:
            out[name] = {"works": False, "detail": str(e)}
    return out


def accelerator() -> dict[str, Any]:
    """The CUDA GPUs (or MPS) and the precisions each supports; the CPU's bf16 autocast."""
    import torch

    out: dict[str, Any] = {"cpu": _cpu(), "cuda": [], "mps": False}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            major, minor = props.major, props.minor
            out["cuda"].append({
                "index": i, "name": props.name, "capability": f"{major}.{minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
                "fp16": (major, minor) >= (5, 3),
                "bf16": major >= 8,  # native bf16 tensor cores: Ampere and later
                "tf32": major >= 8,
            })
        out["cuda_version"] = torch.version.cuda
    mps = getattr(torch.backends, "mps", None)
    out["mps"] = bool(mps is not None and mps.is_available())
    return out


def _cpu() -> dict[str, Any]:
    import torch

    try:  # the real check: does a bf16 autocast matmul run and give bf16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
    except Exception:  # an autocast this build does not have
        bf16 = False
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "unknown")()
    return {"threads": torch.get_num_threads(), "capability": capability, "bf16_autocast": bf16}


def hub_settings() -> dict[str, Any]:
    """Where the hub cache lives, whether the hub is switched off, and whether a token is set (never its value)."""
    home_env = os.environ.get("HF_HOME")
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    home = home_env or str(Path(xdg) / "huggingface")
    cache_env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    cache = cache_env or str(Path(home) / "hub")
    source = "HF_HUB_CACHE" if cache_env else ("HF_HOME" if home_env else "default")
    return {
        "home": home, "cache": cache, "cache_from": source, "cache_exists": Path(cache).is_dir(),
        "offline": os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE,
        "token": _token_source(),
    }


def _token_source() -> str | None:
    """Where the hub token comes from (``"HF_TOKEN"``, ``"token file"``), or ``None``; never the token."""
    if os.environ.get("HF_TOKEN"):
        return "HF_TOKEN"
    try:
        import huggingface_hub
    except ImportError:
        return None
    return "token file" if huggingface_hub.get_token() else None


def gated_repositories() -> dict[str, str]:
    """``{hub repo: file to probe}`` of every gated zoo model."""
    import histofm

    repos: dict[str, str] = {}
    for name in histofm.list_models():
        info = histofm.model_info(name)
        if info.gated and info.hub_id:
            repos.setdefault(info.hub_id, info.hub_filename or "config.json")
    return dict(sorted(repos.items()))


def repositories(timeout: float = 5.0) -> dict[str, Any]:
    """A HEAD request (``huggingface_hub.get_hf_file_metadata``) per gated repository."""
    if hub_settings()["offline"]:
        return {"checked": False, "note": "skipped: HF_HUB_OFFLINE is set"}
    import huggingface_hub
    from huggingface_hub import errors

    results: dict[str, dict[str, str]] = {}
    for repo, filename in gated_repositories().items():
        url = huggingface_hub.hf_hub_url(repo, filename)
        try:
            huggingface_hub.get_hf_file_metadata(url, timeout=timeout)
            results[repo] = {"status": "reachable", "detail": f"{filename} can be downloaded with this token"}
        except errors.GatedRepoError:
            results[repo] = {"status": "gated", "detail": f"no access: accept the terms on huggingface.co/{repo} "
                                                          "and set HF_TOKEN to a read token"}
        except errors.RepositoryNotFoundError:
            results[repo] = {"status": "not found", "detail": "the repository does not exist or this token cannot see it"}
        except errors.HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            kind = "gated" if status in (401, 403) else "error"
            results[repo] = {"status": kind, "detail": f"HTTP {status}: {type(e).__name__}"}
        except Exception as e:  # network down, DNS, timeout: the hub's client raises many types
            results[repo] = {"status": "unreachable", "detail": f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"}
    return {"checked": True, "timeout_s": timeout, "results": results}


def _print_tables(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    t = Table(title="versions", show_header=False)
    for k, v in report["versions"].items():
        t.add_row(k, v or "[dim]not installed[/dim]")
    console.print(t)

    t = Table(title="slide readers (opening the bundled sample slide)")
    for col in ("backend", "works", "detail"):
        t.add_column(col, overflow="fold")
    for name, r in report["readers"].items():
        t.add_row(name, "yes" if r["works"] else "[red]no[/red]", r["detail"])
    console.print(t)

    acc = report["accelerator"]
    t = Table(title="accelerator and precisions")
    for col in ("device", "fp16", "bf16", "tf32", "detail"):
        t.add_column(col)
    cpu = acc["cpu"]
    t.add_row("cpu", "-", "autocast " + ("yes" if cpu["bf16_autocast"] else "no"), "-",
              f"{cpu['threads']} threads, {cpu['capability']}")
    for g in acc["cuda"]:
        t.add_row(f"cuda:{g['index']}", *("yes" if g[k] else "no" for k in ("fp16", "bf16", "tf32")),
                  f"{g['name']}, compute {g['capability']}, {g['memory_gib']} GiB, CUDA {acc.get('cuda_version')}")
    if not acc["cuda"]:
        t.add_row("cuda", "-", "-", "-", "no CUDA GPU visible")
    if acc["mps"]:
        t.add_row("mps", "yes", "-", "-", "Apple GPU")
    console.print(t)

    hub = report["hub"]
    t = Table(title="Hugging Face hub", show_header=False)
    t.add_row("cache", f"{hub['cache']} (from {hub['cache_from']}{'' if hub['cache_exists'] else ', not created yet'})")
    t.add_row("offline (HF_HUB_OFFLINE)", "yes" if hub["offline"] else "no")
    t.add_row("token", f"set ({hub['token']})" if hub["token"] else "not set")
    console.print(t)

    repos = report["repositories"]
    if not repos["checked"]:
        console.print(f"gated repositories: {repos['note']}", highlight=False)
        return
    t = Table(title=f"gated repositories (HEAD, {repos['timeout_s']:g} s timeout)")
    for col in ("repository", "status", "detail"):
        t.add_column(col, overflow="fold")
    for repo, r in repos["results"].items():
        t.add_row(repo, r["status"], r["detail"])
    console.print(t)

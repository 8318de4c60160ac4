"""Which module implements which pretraining method, for ``histofm pretrain --method``.

Every method module exposes one builder with this signature::

    def build(name: str, arch: str, *, img_size: int, overrides: dict[str, Any])
        -> tuple[SSLMethod, Callable[[PIL.Image.Image], Any]]

It returns the method (an :class:`~histofm.methods.base.SSLMethod` whose
``backbone`` is built with ``histofm.create_model(arch, ...)``) and the
per-sample view transform: a callable from one RGB PIL image to whatever one
sample of the method's batch is (for example a list of crops). The engine
collates samples with ``torch.utils.data.default_collate`` and passes the batch
to ``method(batch)``. ``overrides`` replaces fields of the method's frozen
config dataclass (``dataclasses.replace``), so a misspelt key fails loudly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from histofm.errors import HistofmError
from histofm.methods.base import SSLMethod

METHOD_MODULES: dict[str, str] = {
    "simclr": "histofm.methods.simclr",
    "mocov2": "histofm.methods.moco",
    "mocov3": "histofm.methods.moco",
    "clip": "histofm.methods.clip",
    "dino": "histofm.methods.dino",
    "ibot": "histofm.methods.ibot",
    "dinov2": "histofm.methods.dinov2",
    "virchow2": "histofm.methods.dinov2",
    "mae": "histofm.methods.mae",
    "simmim": "histofm.methods.mim",
    "beit": "histofm.methods.mim",
    "pluto": "histofm.methods.pluto",
}


# The config dataclass of each method (its fields are what ``--set KEY=VALUE`` may change).
METHOD_CONFIGS: dict[str, str] = {
    "simclr": "SimCLRConfig",
    "mocov2": "MoCoConfig",
    "mocov3": "MoCoConfig",
    "clip": "CLIPConfig",
    "dino": "DINOConfig",
    "ibot": "IBOTConfig",
    "dinov2": "DINOv2Config",
    "virchow2": "DINOv2Config",
    "mae": "MAEConfig",
    "simmim": "MIMConfig",
    "beit": "MIMConfig",
    "pluto": "PLUTOConfig",
}


def method_config_class(name: str) -> type:
    """The config dataclass of method ``name`` (for checking settings before anything is built)."""
    if name not in METHOD_MODULES:
        raise HistofmError(f"Unknown method {name!r}; choose one of {', '.join(list_methods())}.")
    return getattr(importlib.import_module(METHOD_MODULES[name]), METHOD_CONFIGS[name])


# Methods whose defaults differ from their config class's: a config instance or a dict of changes.
_BASES: dict[str, str] = {"mocov3": "V3_DEFAULTS", "virchow2": "VIRCHOW2", "simmim": "SIMMIM", "beit": "BEIT"}


def method_config(name: str, overrides: dict[str, Any] | None = None) -> Any:  # noqa: ANN401
    """The config method ``name`` would be built with (its defaults, ``preset``, then ``overrides``).

    Backbone keys (``backbone``, ``backbone.<arg>``) are not config fields: leave them out.
    Checking a config this way builds nothing (no model, no data).
    """
    from histofm.methods.presets import apply_preset
    from histofm.settings import config_replace

    cls = method_config_class(name)
    module = importlib.import_module(METHOD_MODULES[name])
    base = getattr(module, _BASES[name]) if name in _BASES else cls()
    cfg = config_replace(cls(), base) if isinstance(base, dict) else base
    return apply_preset(cfg, overrides or {}, getattr(module, "PRESETS", None), owner=name)


def method_presets(name: str) -> list[str]:
    """Names ``--set preset=NAME`` accepts for method ``name`` (may be empty)."""
    module = importlib.import_module(METHOD_MODULES[name])
    return sorted(getattr(module, "PRESETS", {}) or {})


def list_methods() -> list[str]:
    """Method names ``histofm pretrain --method`` accepts."""
    return sorted(METHOD_MODULES)


def build_method(
    name: str, arch: str, *, img_size: int = 224, overrides: dict[str, Any] | None = None
) -> tuple[SSLMethod, Callable[[Any], Any]]:
    """Build method ``name`` on a backbone ``arch``; see the module docstring."""
    if name not in METHOD_MODULES:
        raise HistofmError(f"Unknown method {name!r}; choose one of {', '.join(list_methods())}.")
    try:
        module = importlib.import_module(METHOD_MODULES[name])
    except ModuleNotFoundError as e:
        if e.name == METHOD_MODULES[name]:
            raise HistofmError(f"Method {name!r} is not available in this version of histofm.") from None
        raise
    return module.build(name, arch, img_size=img_size, overrides=dict(overrides or {}))

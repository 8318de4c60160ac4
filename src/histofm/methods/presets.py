"""Named presets of a method's config: ``--set preset=NAME`` first, then the user's other changes.

A method module may define ``PRESETS: dict[str, dict[str, Any]]`` (name -> field changes).
:func:`apply_preset` is the one place that applies one, for the method builders and for
:func:`histofm.methods.registry.method_config` alike.
"""

from __future__ import annotations

from typing import Any

from histofm.errors import HistofmError
from histofm.settings import config_replace


def apply_preset(
    cfg: Any, overrides: dict[str, Any], presets: dict[str, dict[str, Any]] | None, owner: str | None = None,  # noqa: ANN401
) -> Any:  # noqa: ANN401
    """``cfg`` with ``overrides["preset"]`` applied first, then the other overrides (unknown keys fail loudly).

    Args:
        cfg: a frozen config dataclass instance.
        overrides: field changes, optionally with a ``"preset"`` key (not modified).
        presets: the method's named presets (``None``: it has none).
        owner: what to call the config in the error (default: its class name).
    """
    overrides = dict(overrides)
    preset = overrides.pop("preset", None)
    if preset is not None:
        presets = presets or {}
        if preset not in presets:
            owner = owner or type(cfg).__name__
            choices = ", ".join(sorted(presets)) or "none"
            raise HistofmError(f"Unknown preset {preset!r} for {owner}; choose one of: {choices}.")
        cfg = config_replace(cfg, presets[preset])
    return config_replace(cfg, overrides)

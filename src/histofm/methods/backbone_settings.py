"""Declared ranges of the backbone arguments a user may set (``--set backbone.depth=6``).

The types come from :class:`~histofm.models.vit.VisionTransformer`'s signature; the
ranges are declared here, once. :func:`check_backbone_overrides` checks a dict of
overrides against both, then builds the backbone on the ``meta`` device (no memory,
no weights) so that arguments that only fail together (heads that do not divide the
width) are reported before any real model is built.
"""

from __future__ import annotations

import inspect
import re
import typing
from typing import Any

from histofm.errors import HistofmError
from histofm.settings import Rule, SettingError, coerce, setting

_RANGES: dict[str, str] = {
    "img_size": "[1, 16384]",
    "patch_size": "[1, 1024]",
    "in_chans": "[1, 64]",
    "num_classes": ">= 0",
    "embed_dim": "[1, 65536]",
    "depth": "[1, 1024]",
    "num_heads": "[1, 4096]",
    "mlp_ratio": "(0, 64]",
    "init_values": "> 0",
    "reg_tokens": "[0, 1024]",
    "drop_rate": "[0, 1)",
    "attn_drop_rate": "[0, 1)",
    "drop_path_rate": "[0, 1)",
    "norm_eps": "> 0",
    "moe_every": "[0, 1024]",
    "num_experts": "[1, 4096]",
    "top_k": "[1, 4096]",
    "capacity_factor": "> 0",
}
_CHOICES: dict[str, Any] = {"mlp_layer": typing.Literal["mlp", "swiglu"]}


def backbone_declarations() -> dict[str, tuple[Any, Rule]]:
    """``{argument: (type, rule)}`` of the ViT backbone's user-settable arguments."""
    from histofm.models.vit import VisionTransformer

    hints = typing.get_type_hints(VisionTransformer.__init__)
    params = inspect.signature(VisionTransformer.__init__).parameters
    out: dict[str, tuple[Any, Rule]] = {}
    for name in params:
        if name == "self" or name not in hints or "Callable" in str(hints[name]):
            continue
        rule = setting(range=_RANGES[name]).metadata["histofm_setting"] if name in _RANGES else Rule()
        out[name] = (_CHOICES.get(name, hints[name]), rule)
    return out


def check_backbone_overrides(arch: str, overrides: dict[str, Any], prefix: str = "backbone.") -> tuple[dict[str, Any], Any]:
    """Coerce and check ``overrides`` of backbone ``arch``.

    Returns:
        The coerced overrides and the backbone built on the ``meta`` device (its shapes, no memory).

    Raises:
        SettingError: a wrong type or range, or arguments the backbone rejects together.
    """
    import torch

    from histofm.registry import create_model

    decl = backbone_declarations()
    fixed = {}
    for key, value in overrides.items():
        if key in decl:
            tp, rule = decl[key]
            fixed[key] = coerce(tp, value, prefix + key, rule)
        else:
            fixed[key] = value  # the probe below names an argument this backbone does not take
    try:
        with torch.device("meta"):
            model = create_model(arch, **fixed)
    except Exception as e:  # noqa: BLE001 - any failure to build with the user's arguments is about those arguments
        if not fixed or (isinstance(e, HistofmError) and str(e).startswith("Unknown model")):
            raise
        detail = str(e).rstrip(".").replace(f"Model {arch!r} does not accept these arguments: ", "")
        m = re.search(r"unexpected keyword argument '(\w+)'", detail)
        if m:
            raise SettingError(prefix + m[1], "", f"{prefix}{m[1]} is not an argument of the backbone {arch}; "
                                                  f"valid ones are {', '.join(sorted(decl))}.") from None
        culprit = next((k for k in reversed(list(fixed)) if k in detail), list(fixed)[-1])
        raise SettingError(prefix + culprit, "", f"The backbone {arch} rejects {prefix}{culprit}={fixed[culprit]!r} "
                                                  f"({detail}); change it.") from None
    return fixed, model


def activation_bytes(model: Any, batch_size: int, img_size: int, views: int = 2) -> int | None:  # noqa: ANN401
    """A rough lower bound of the activations a ViT ``model`` keeps for backward on one step (``None``: not a ViT).

    Per block and token: about 12 ``D``-wide float32 tensors (norms, q/k/v, attention output, a 4x MLP).
    """
    patch, dim, blocks = getattr(model, "patch_size", None), getattr(model, "embed_dim", None), getattr(model, "blocks", None)
    if not isinstance(patch, int) or not isinstance(dim, int) or blocks is None or patch < 1:
        return None
    tokens = (img_size // patch) ** 2 + 1
    return views * batch_size * tokens * dim * len(blocks) * 12 * 4

"""The zoo as a table: ``histofm models`` prints it, and the README embeds its markdown form."""

from __future__ import annotations

from histofm._registry import _REGISTRY, ModelInfo

COLUMNS = ("name", "kind", "arch", "embed dim", "params", "weights", "licence", "paper")


def zoo_models() -> list[str]:
    """Names of the registered pathology foundation models (generic architectures excluded), sorted.

    Reached through the ``histofm.zoo`` package, whose import has registered every entry
    before this module loads; it reads the registry leaf, so the zoo never imports the factory.
    """
    return sorted(
        name for name, entry in _REGISTRY.items()
        if entry.fn.__module__.startswith("histofm.zoo.") and entry.fn.__module__ != "histofm.zoo.generic"
    )


def weights_status(info: ModelInfo) -> str:
    """``"public"``, ``"gated"`` (accept terms on the hub) or ``"none"`` (architecture only)."""
    if not info.public_weights:
        return "none"
    return "gated" if info.gated else "public"


def format_params(n: int | None) -> str:
    """``631229184 -> "631.2M"``, ``1134774272 -> "1.13B"``."""
    if n is None:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def zoo_rows() -> list[tuple[str, ...]]:
    """One row of :data:`COLUMNS` per zoo model, sorted by name."""
    rows = []
    for name in zoo_models():
        info = _REGISTRY[name].info or ModelInfo(name=name, arch=name, public_weights=False)
        rows.append((
            name, info.kind, info.arch, str(info.embed_dim), format_params(info.num_params),
            weights_status(info), info.license, info.paper,
        ))
    return rows


def zoo_markdown_table() -> str:
    """The zoo as a GitHub-flavoured markdown table (the README's model table)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in zoo_rows()]
    return "\n".join(lines) + "\n"

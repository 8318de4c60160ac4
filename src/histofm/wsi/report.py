"""What happened to each slide of an extraction run: per-slide results, totals, a table; rank sharding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histofm.errors import HistofmError


@dataclass
class SlideResult:
    """What happened to one slide."""

    slide: str
    status: str  # "done", "skipped" or "failed"
    tiles: int = 0
    seconds: float = 0.0
    output: Path | None = None
    error: str | None = None
    note: str | None = None  # e.g. "done by another process"

    @property
    def tiles_per_second(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ExtractionReport:
    """Per-slide results of :func:`extract_features` and their totals."""

    results: list[SlideResult] = field(default_factory=list)

    @property
    def failures(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def tiles(self) -> int:
        return sum(r.tiles for r in self.results if r.status == "done")

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.results if r.status == "done")

    @property
    def tiles_per_second(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line: slides done / skipped / failed, tiles and throughput."""
        done = sum(r.status == "done" for r in self.results)
        skipped = sum(r.status == "skipped" for r in self.results)
        elsewhere = sum(r.note == "done by another process" for r in self.results)
        by_others = f" ({elsewhere} by another process)" if elsewhere else ""
        return (
            f"{len(self.results)} slides: {done} done, {skipped} skipped{by_others}, {len(self.failures)} failed; "
            f"{self.tiles} tiles in {self.seconds:.1f} s ({self.tiles_per_second:.1f} tiles/s)"
        )

    def table(self) -> Any:
        """A ``rich`` table, one row per slide (print :meth:`summary` after it)."""
        from rich.table import Table

        table = Table(title="Feature extraction")
        table.add_column("slide", overflow="fold")
        table.add_column("status", no_wrap=True)
        for col in ("tiles", "seconds", "tiles/s"):
            table.add_column(col, justify="right", no_wrap=True)
        table.add_column("output / error", overflow="fold")
        for r in self.results:
            style = {"failed": "red", "skipped": "dim"}.get(r.status)
            table.add_row(
                r.slide, r.status, str(r.tiles), f"{r.seconds:.1f}", f"{r.tiles_per_second:.1f}",
                r.error or r.note or (str(r.output) if r.output else ""), style=style,
            )
        return table


def shard_slides(slides: Sequence[Any], rank: int = 0, world_size: int = 1) -> list[Any]:
    """The slides process ``rank`` of ``world_size`` handles (round-robin, order kept)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise HistofmError(f"Rank {rank} is not valid for a world size of {world_size}.")
    return list(slides)[rank::world_size]

"""Run logs: a JSONL file (one record per logged step), TensorBoard when installed, a loss-curve PNG, the progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from histofm.utils import atomic_path


class RunLogger:
    """Append JSON records to ``out_dir/log.jsonl`` and mirror scalars to TensorBoard.

    On resume, records at or after the resumed step are dropped first (atomically),
    so the file reads as one uninterrupted run.
    """

    def __init__(self, out_dir: Path | None, *, resume_step: int = 0, tensorboard: bool = True) -> None:
        self.path = out_dir / "log.jsonl" if out_dir is not None else None
        self._tb = None
        if self.path is None:
            return
        if resume_step > 0 and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) < resume_step]
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None  # noqa: N806
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=resume_step or None)

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (must contain ``"step"``)."""
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # an unreadable line is dropped on resume


def _jsonable(x: Any) -> Any:  # noqa: ANN401
    return str(x)


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``log.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curve(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Save the loss per step (and RankMe when logged) as a PNG, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [h["step"] for h in history if _finite(h.get("loss"))]
    losses = [h["loss"] for h in history if _finite(h.get("loss"))]
    mon = [(h["step"], h["rankme"]) for h in history if _finite(h.get("rankme"))]
    fig = Figure(figsize=(9 if mon else 5, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if mon else 1, 1)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    if len(losses) >= 10:  # a moving average makes the trend readable
        w = max(len(losses) // 20, 2)
        smooth = [sum(losses[max(0, i - w + 1) : i + 1]) / len(losses[max(0, i - w + 1) : i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.6, label=f"moving average ({w})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "training loss")
    ax.legend(loc="upper right", fontsize=8)
    if mon:
        ax2 = fig.add_subplot(1, 2, 2)
        ax2.plot([s for s, _ in mon], [r for _, r in mon], marker="o", ms=3)
        ax2.set_xlabel("step")
        ax2.set_ylabel("RankMe")
        ax2.set_title("collapse watch (effective rank)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _finite(x: Any) -> bool:  # noqa: ANN401
    return isinstance(x, (int, float)) and math.isfinite(x)


class TrainProgress:
    """A rich progress bar showing the step, the loss and the time left (no-op when disabled)."""

    def __init__(self, *, enabled: bool, total: int, start: int, label: str = "pretrain", metric: str | None = None) -> None:
        self._p, self._metric, self._last = None, metric, None
        if not enabled:
            return
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(
            TextColumn(f"[bold]{escape(label)}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), transient=False,
        )
        self._p.start()
        self._task = self._p.add_task("train", total=total, completed=start, info="")

    def update(self, completed: int, record: dict[str, Any]) -> None:
        if self._p is not None:
            info = f"loss {record.get('loss', float('nan')):.4f}"
            if "rankme" in record:
                info += f"  rankme {record['rankme']:.1f}"
            if self._metric is not None and isinstance(record.get(self._metric), float):
                self._last = record[self._metric]
            if self._last is not None:
                info += f"  {self._metric} {self._last:.4f}"
            self._p.update(self._task, completed=completed, info=info)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()

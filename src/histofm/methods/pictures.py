"""Reconstruction pictures of the masked-image methods: input, mask and output side by side.

A method with a ``reconstruct(images)`` method (MAE, SimMIM/BEiT, PLUTO) gets
pictures saved while it trains: :func:`picture_set` draws them, :func:`save_reconstructions`
writes a PNG grid, :class:`ReconstructionCallback` does both every few optimiser
steps (outside the loss path, on the main process only) and
:class:`ReconstructionPictures` is the mixin that wires it to the engine's
``on_step_end`` hook.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from histofm.methods.patches import unpatchify
from histofm.utils import atomic_path
from histofm.utils.distributed import is_main


def picture_set(
    x: torch.Tensor, output: torch.Tensor, mask: torch.Tensor, patch_size: int,
    mean: torch.Tensor, std: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Display images ``(B, C, H, W)`` in [0, 1] of a masked prediction.

    Args:
        x: the input (normalised); output: the prediction in the same space, every patch.
        mask: ``(B, N)`` True where the patch was hidden from the model.
        patch_size: patch side; mean, std: ``(1, C, 1, 1)`` input normalisation.

    Returns:
        ``input``, ``masked`` (hidden patches grey), ``output``, ``pasted`` (visible
        patches from the input, hidden ones from the prediction).
    """
    B, C, H, W = x.shape
    p = patch_size
    pix_mask = unpatchify(mask[..., None].to(x.dtype).expand(-1, -1, p * p * C), p, (H // p, W // p), C)

    def show(t: torch.Tensor) -> torch.Tensor:
        return (t * std.to(t) + mean.to(t)).clamp(0, 1)

    return {
        "input": show(x),
        "masked": show(x) * (1 - pix_mask) + 0.5 * pix_mask,
        "output": show(output),
        "pasted": show(x * (1 - pix_mask) + output * pix_mask),
    }


def save_reconstructions(pictures: dict[str, torch.Tensor], path: str | os.PathLike[str], title: str = "") -> Path:
    """Write a PNG grid: one row per image, columns input | masked | (tokens) | output | visible + output.

    Args:
        pictures: the dict from :meth:`MAE.reconstruct` (or any with ``input``, ``masked``, ``output``).
        path: PNG file to write (atomically).
        title: optional figure title (for example the step and the masked MSE).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in ("input", "masked", "tokens", "output", "pasted") if c in pictures]
    rows = pictures[columns[0]].shape[0]
    fig, axes = plt.subplots(rows, len(columns), figsize=(2.2 * len(columns), 2.2 * rows), squeeze=False)
    for r in range(rows):
        for c, name in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(pictures[name][r].permute(1, 2, 0).float().cpu().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title({"pasted": "visible + output"}.get(name, name), fontsize=9)
    fig.tight_layout()
    if title:
        fig.suptitle(title, fontsize=10, y=1.0, va="bottom")
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return target


class ReconstructionCallback:
    """Save MAE reconstructions of fixed images every ``every`` steps (``recon_step{N}.png`` in ``out_dir``).

    Call it as ``callback(method, step)`` (after the optimiser step); it is a no-op on
    other steps. The same masks are drawn every time (fixed seed), so pictures from
    different steps show the same patches removed and can be compared by eye.
    """

    def __init__(self, images: torch.Tensor, out_dir: str | os.PathLike[str], every: int = 100, seed: int = 0) -> None:
        self.images = images
        self.out_dir = Path(out_dir)
        self.every = every
        self.seed = seed
        self.history: list[tuple[int, float]] = []  # (step, masked MSE)

    def __call__(self, method: nn.Module, step: int) -> Path | None:
        if self.every <= 0 or step % self.every or not is_main():
            return None
        return self.save(method, step)

    def save(self, method: nn.Module, step: int) -> Path:
        """Reconstruct the fixed images now and write ``recon_step{step}.png``; returns the path."""
        device = next(method.parameters()).device
        gen = torch.Generator(device=device).manual_seed(self.seed)
        pics = method.reconstruct(self.images.to(device), generator=gen)
        mse = float(pics["mse"])
        self.history.append((step, mse))
        return save_reconstructions(pics, self.out_dir / f"recon_step{step}.png", f"step {step}, masked-patch loss {mse:.3f}")


def run_step_callbacks(method: nn.Module, step: int) -> None:
    """Call ``method.step_callbacks`` with the number of optimiser steps done (``step + 1``)."""
    for callback in getattr(method, "step_callbacks", []):
        callback(method, step + 1)


def attach_reconstructions(
    method: nn.Module, images: torch.Tensor, out_dir: str | os.PathLike[str], every: int = 100
) -> ReconstructionCallback:
    """Save ``method.reconstruct(images)`` pictures now (step 0) and every ``every`` steps of training.

    The engine calls ``method.on_step_end`` after every optimiser step, which runs the
    callback; the pictures are ``out_dir/recon_step{N}.png``.
    """
    callback = ReconstructionCallback(images, out_dir, every)
    callback.save(method, 0)
    method.step_callbacks.append(callback)
    return callback


class ReconstructionPictures:
    """Mixin of the masked-image methods: pictures of reconstructions saved while training.

    The method must define ``reconstruct(images)`` (the pictures to draw); see
    :func:`attach_reconstructions`.
    """

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """Runs the attached step callbacks (reconstruction pictures) with the number of steps done."""
        run_step_callbacks(self, step)

    def attach_reconstructions(
        self, images: torch.Tensor, out_dir: str | os.PathLike[str], every: int = 100
    ) -> ReconstructionCallback:
        """Save reconstructions of ``images`` to ``out_dir`` now and every ``every`` steps of training."""
        return attach_reconstructions(self, images, out_dir, every)

"""Weights you can trust: build an encoder only from weights the user named, and remember which.

``extract``, ``cluster`` and ``eval nuclei`` share one rule: a registered model is never
run with random weights unless the user asks. :func:`load_encoder` takes exactly one of

* ``checkpoint``: a local file or snapshot folder (``--checkpoint PATH``), recorded as its
  file name and SHA-256;
* ``pretrained``: the official weights through ``huggingface_hub`` (``--pretrained``;
  honours ``HF_HOME``, ``HF_HUB_OFFLINE`` and the local cache), recorded as hub repository
  and revision (the snapshot's commit hash);
* ``random_init``: an explicit opt-in (``--random-init``), recorded as ``random-init``;

and refuses, in one sentence naming those three flags, when none is given. The built
module carries a :class:`Weights` record in ``model.histofm_weights``; feature files copy
it (see :func:`histofm.wsi.features.read_provenance`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histofm.errors import HistofmError

RANDOM_INIT = "random-init"
#: ``--random-init`` builds its weights from this seed (the global random state is left as it was), so two
#: runs with the same model and settings embed with the same encoder; the weights' SHA-256 is recorded.
RANDOM_INIT_SEED = 0
_WAYS_OUT = "pass --checkpoint PATH (local weights), --pretrained (the official weights from the hub) or --random-init"
_HASH_CHUNK = 8 << 20


@dataclass(frozen=True)
class Weights:
    """Where an encoder's weights came from.

    Attributes:
        source: ``"checkpoint"``, ``"hub"``, ``"random-init"`` or ``"unrecorded"`` (a module
            built outside :func:`load_encoder`: the caller knows, histofm does not).
        file: weights file name (no folder: paths differ between machines).
        sha256: hex SHA-256 of that file (``source == "checkpoint"``).
        repo: Hugging Face repository (``source == "hub"``).
        revision: the snapshot's commit hash (``source == "hub"``).
    """

    source: str
    file: str = ""
    sha256: str = ""
    repo: str = ""
    revision: str = ""

    def describe(self) -> str:
        """A short human description, e.g. ``uni.bin (sha256 1a2b3c4d...)``."""
        if self.source == "checkpoint":
            return f"{self.file} (sha256 {self.sha256[:12]})"
        if self.source == "hub":
            return f"{self.repo}@{self.revision[:12]} ({self.file})"
        return self.source

    def attrs(self) -> dict[str, str]:
        """Flat ``weights_*`` attributes for an HDF5 file."""
        return {
            "weights_source": self.source, "weights_file": self.file, "weights_sha256": self.sha256,
            "weights_repo": self.repo, "weights_revision": self.revision,
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> Weights:
        """The record :meth:`attrs` wrote (``"unrecorded"`` for files without one)."""
        return cls(
            source=str(attrs.get("weights_source", "unrecorded")), file=str(attrs.get("weights_file", "")),
            sha256=str(attrs.get("weights_sha256", "")), repo=str(attrs.get("weights_repo", "")),
            revision=str(attrs.get("weights_revision", "")),
        )


def weights_of(model: nn.Module) -> Weights:
    """The :class:`Weights` record of a module (``"unrecorded"`` when built elsewhere)."""
    record = getattr(model, "histofm_weights", None)
    return record if isinstance(record, Weights) else Weights("unrecorded")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _weights_file(path: Path) -> Path:
    """The file a checkpoint path stands for (a snapshot folder holds one weights file)."""
    if path.is_dir():
        from histofm.models.convert import _find_in_directory

        return _find_in_directory(path)
    return path


def _hub_revision(path: Path) -> str:
    """The commit hash in a hub cache path ``.../snapshots/<commit>/...`` (empty if not there)."""
    parts = path.parts
    for i, part in enumerate(parts[:-1]):
        if part == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", parts[i + 1]):
            return parts[i + 1]
    return ""


def resolve_weights(
    name: str,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    random_init: bool = False,
) -> tuple[Path | None, Weights]:
    """``(local weights path or None for random-init, record)`` from exactly one source.

    ``pretrained`` downloads the official weights (or finds them in the hub cache).

    Raises:
        HistofmError: no source or several; a missing checkpoint; a model without published
            weights asked for ``pretrained``; the hub's refusals, one sentence each.
    """
    from histofm.registry import model_info

    chosen = [flag for flag, on in (("--checkpoint", checkpoint is not None), ("--pretrained", pretrained),
                                    ("--random-init", random_init)) if on]
    info = model_info(name)  # unknown names fail here, with suggestions
    if not chosen:
        raise HistofmError(f"{name} needs weights, and histofm never embeds with random ones unless asked: {_WAYS_OUT}.")
    if len(chosen) > 1:
        raise HistofmError(f"Give one source of weights, not {' and '.join(chosen)}; {_WAYS_OUT}.")
    if random_init:
        return None, Weights(RANDOM_INIT)
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.exists():
            raise HistofmError(f"Checkpoint not found: {path}; fix --checkpoint, or use --pretrained or --random-init.")
        file = _weights_file(path)
        return path, Weights("checkpoint", file=file.name, sha256=sha256_file(file))
    if not info.public_weights or not info.hub_id:
        raise HistofmError(
            f"{name} has no published weights to fetch with --pretrained; pass --checkpoint PATH or --random-init."
        )
    from histofm.hub import download_weights

    path = download_weights(info)
    file = _weights_file(path)
    return path, Weights("hub", file=file.name, repo=info.hub_id, revision=_hub_revision(file))


def state_sha256(model: nn.Module) -> str:
    """Hex SHA-256 of a module's parameters and buffers (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def load_encoder(
    name: str,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    random_init: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Build registered model ``name`` from exactly one weights source and stamp where they came from.

    Args:
        name: a registered model (``histofm models``).
        checkpoint: local weights file or snapshot folder.
        pretrained: download (or take from the local hub cache) the official weights.
        random_init: build with random weights, on purpose.
        **overrides: constructor arguments (``depth=2`` ...).

    Raises:
        HistofmError: see :func:`resolve_weights`.
    """
    from histofm.registry import create_model

    path, record = resolve_weights(name, checkpoint=checkpoint, pretrained=pretrained, random_init=random_init)
    if record.source == RANDOM_INIT:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = create_model(name, **overrides)
        record = Weights(RANDOM_INIT, file=f"seed {RANDOM_INIT_SEED}", sha256=state_sha256(model))
    else:
        model = create_model(name, checkpoint_path=path, **overrides)
    model.histofm_weights = record  # type: ignore[assignment]
    return model


def add_weights_arguments(p: argparse.ArgumentParser, *, required_note: str = "") -> None:
    """``--checkpoint PATH``, ``--pretrained`` and ``--random-init`` (one of them is needed)."""
    group = p.add_argument_group("weights (give exactly one)" + required_note)
    group.add_argument("--checkpoint", type=Path, default=None, help="local weights file or snapshot folder")
    group.add_argument("--pretrained", action="store_true",
                       help="the official weights from the Hugging Face hub (honours HF_HOME, HF_HUB_OFFLINE, HF_TOKEN)")
    group.add_argument("--random-init", action="store_true",
                       help="random weights, on purpose (recorded as random-init in the outputs)")

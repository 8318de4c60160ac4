"""``histofm demo``: the end-to-end job on bundled data (the README's first command)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from histofm.data import sample_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the end-to-end job on the bundled sample data")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import histofm

    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    img = Image.open(sample_path("hgsc_nest")).convert("RGB").crop((0, 0, 224, 224))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    model = histofm.create_model("vit_small_patch16_224").eval()
    with torch.no_grad():
        emb = model(x)
    print(f"vit_small_patch16_224 embedding of a bundled H&E tile: shape {tuple(emb.shape)}, norm {emb.norm():.3f}")
    return 0

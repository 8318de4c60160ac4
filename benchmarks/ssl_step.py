"""One self-supervised training step: histofm against the same step built from a peer library, in one run.

    python benchmarks/ssl_step.py --method dinov2                        # CPU fp32, ViT-S/14, 2 x 224 + 8 x 98 crops
    python benchmarks/ssl_step.py --method dinov2 --threads 1 --cpu-time # busy shared machine
    python benchmarks/ssl_step.py --method dinov2 --device cuda          # ViT-L/14, batch 32, bf16 autocast

A step is everything one optimiser update costs: forward of student and
teacher, the losses, backward, AdamW step, zero_grad and the EMA update of the
teacher. Ours is the method from ``histofm.methods.registry.build_method``;
the peer is assembled the way its documentation shows (for ``dinov2``:
lightly's ``DINOLoss``, ``IBOTPatchLoss``, ``KoLeoLoss``, ``DINOv2ProjectionHead``,
``MaskedVisionTransformerTIMM`` around a timm ViT, ``update_momentum``). Both
get the same configuration, the same crops and the same masks. Each repeat
times one step of each, alternating the order; medians after warm-up. The
ratio is peer time / our time (> 1: ours is faster).

Images/s counts source images (each one gives 2 global + 8 local crops for
``dinov2``). The peak fraction divides achieved FLOP/s by a large square matmul
timed in the same run, same dtype and clock (bf16 on CUDA, fp32 on CPU). FLOPs
are matmuls only, 2 per multiply-add, counted analytically for the crop shapes
used (:func:`dinov2_step_flops`): the student's forward + backward is 3x its
forward (less the patch embedding's input gradient, which no one needs), the
teacher's is one forward, and the DINO and iBOT heads are counted on the rows
they see. This *nominal* count is the same for both sides; ours also prints the
fraction on the FLOPs it really executes, since efficient stochastic depth
skips the residual branches of dropped samples (at ``--drop-path 0`` the two
counts agree). ``tests/test_benchmarks.py`` checks the count against
``torch.utils.flop_counter`` on a small step.

``--arch`` picks the DINOv2 backbone: ``vit_small_patch14_dinov2`` (ViT-S/14, the
CPU default), ``vit_base_patch14_dinov2`` or ``vit_large_patch14_dinov2`` (ViT-L/14:
1024 wide, 24 blocks, 16 heads, LayerScale 1e-5; the CUDA default).

``STEP_BUILDERS`` maps a method name to a function ``(args, device) -> StepPair``;
add an entry per method.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from benchlib import setup_run, time_alternating, vit_flops


@dataclass
class StepPair:
    """The two step functions of one method and what one step processes."""

    ours: Callable[[], None]
    peer: Callable[[], None]
    images: int  # source images per step
    flops: float | None = None  # matmul FLOPs of one step (forward + backward), if known
    note: str = ""
    ours_executed_flops: float | None = None  # what ours really computes, when it skips work (stochastic depth)


def vit_train_flops(model: torch.nn.Module, batch: int, img_size: int, keep: list[float] | None = None) -> float:
    """Forward + backward matmul FLOPs of a ViT: backward is twice the forward (gradients of the
    inputs and of the weights of every matmul), except the patch embedding, whose input (the image)
    needs no gradient: ``3 F_blocks + 2 F_patch``."""
    p = model.patch_size
    patch = 2 * (img_size // p) ** 2 * 3 * p * p * model.embed_dim * batch
    return 3 * vit_flops(model, batch, img_size, keep) - patch


def head_macs(in_dim: int, hidden: int = 2048, bottleneck: int = 256, out: int = 65536) -> int:
    """Multiply-adds per row of a DINO head: 3-layer MLP to the bottleneck, then the prototypes."""
    return in_dim * hidden + hidden * hidden + hidden * bottleneck + bottleneck * out


def dinov2_step_flops(
    backbone: torch.nn.Module,
    batch: int,
    n_global: int,
    n_local: int,
    global_px: int,
    local_px: int,
    n_masked: int,
    head: int,
    keep: list[float] | None = None,
) -> float:
    """Matmul FLOPs of one DINOv2 step (2 per multiply-add)::

        student  3 x [ViT(G B global) + ViT(L B local)] - patch-embedding input gradients
                 + 3 x 2 head x (G B + L B class rows + M masked patch rows)     (DINO and iBOT heads)
        teacher  ViT(G B global) + 2 head x (G B class rows + M masked rows)     (forward only)

    ``head``: multiply-adds per head row (:func:`head_macs`); ``M``: masked patches over the
    global crops. ``keep``: the student's expected kept fraction per block (efficient
    stochastic depth); ``None`` counts every residual branch (the nominal model).
    Losses, softmax, Sinkhorn/centering, KoLeo and the optimiser are not matmuls of this size
    and are not counted.
    """
    G, L = n_global, n_local
    student = vit_train_flops(backbone, G * batch, global_px, keep) + vit_train_flops(backbone, L * batch, local_px, keep)
    student += 3 * 2 * head * ((G + L) * batch + n_masked)
    teacher = vit_flops(backbone, G * batch, global_px) + 2 * head * (G * batch + n_masked)
    return float(student + teacher)


# ------------------------------------------------------------------------ dinov2
#: --arch -> (histofm architecture, its overrides, timm architecture): the same names on both sides
#: (their parameter shapes are checked against timm's in tests/test_benchmarks.py).
DINOV2_ARCHS: dict[str, tuple[str, dict[str, int], str]] = {
    name: (name, {}, name) for name in ("vit_small_patch14_dinov2", "vit_base_patch14_dinov2", "vit_large_patch14_dinov2")
}


def _autocast(args: argparse.Namespace, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on CUDA (or with ``--bf16``), nothing otherwise; the same for both sides."""
    if device.type == "cuda" or args.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _engine_step(method: torch.nn.Module, batch: object, autocast: contextlib.AbstractContextManager[None]) -> Callable[[], None]:
    """One training step of a histofm method as the engine takes it, with the engine's optimiser
    (AdamW, no decay on norms/biases/tokens, fused step when possible)."""
    from histofm.train import TrainConfig, build_optimizer

    opt = build_optimizer(method, method.trainable_parameters(), TrainConfig(lr=1e-4, weight_decay=0.04))

    def step() -> None:
        with autocast:
            loss = method(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_step_end(0, 1000)

    return step


def dinov2_steps(args: argparse.Namespace, device: torch.device) -> StepPair:
    """DINOv2 on a ViT-/14 (``--arch``): 2 global crops of 224 px and 8 local crops of 98 px per image.

    Both sides: LayerScale 1e-5, stochastic depth ``--drop-path``, separate DINO and iBOT
    heads (2048 hidden, 256 bottleneck, 65536 prototypes), running-mean centering (what
    lightly's losses implement), KoLeo weight 0.1, half of the global crops block-masked
    with ratios in [0.1, 0.5] (the same masks for both), AdamW, EMA momentum 0.992.
    Ours: the registry's method (efficient stochastic depth, one foreach EMA update)
    and the engine's optimiser; peer: lightly's DINOv2 example (``torch.optim.AdamW``,
    ``update_momentum`` parameter by parameter).
    """
    import timm
    from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
    from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM
    from lightly.models.utils import update_momentum

    from histofm.methods.masking import BlockMaskCollator
    from histofm.methods.registry import build_method

    B, dp, n_local = args.batch, args.drop_path, 8
    ours_arch, ours_kwargs, timm_arch = DINOV2_ARCHS[args.arch]
    g = torch.Generator().manual_seed(0)
    globals_ = [torch.randn(B, 3, 224, 224, generator=g).to(device) for _ in range(2)]
    locals_ = [torch.randn(B, 3, 98, 98, generator=g).to(device) for _ in range(n_local)]
    masks = BlockMaskCollator((16, 16))(2 * B).to(device)  # (2B, 16, 16)
    autocast = _autocast(args, device)

    # ---- ours
    method, _ = build_method(
        "dinov2", ours_arch, img_size=224,
        overrides={
            "centering": "centering", "norm_last_layer": False, "drop_path_rate": dp, "n_local_crops": n_local,
            "freeze_last_layer": 0.0,  # lightly's example does not freeze the prototypes either
            "backbone": ours_kwargs,
        },
    )
    method = method.to(device).train()
    ours = _engine_step(method, {"crops": globals_ + locals_, "masks": masks}, autocast)

    # ---- peer: lightly's DINOv2 example, same configuration
    vit = timm.create_model(timm_arch, img_size=224, dynamic_img_size=True, drop_path_rate=dp, init_values=1e-5, num_classes=0)
    bb = method.student["backbone"]
    ours_shapes = {k: tuple(v.shape) for k, v in bb.state_dict().items() if k != "mask_token"}
    peer_shapes = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    if ours_shapes != peer_shapes:
        raise SystemExit(f"--arch {args.arch}: our backbone and timm's {timm_arch} differ in their parameters")
    D = bb.embed_dim
    backbone = MaskedVisionTransformerTIMM(vit=vit, antialias=False, pos_embed_initialization="skip")
    teacher_backbone = copy.deepcopy(backbone)  # heads cannot be deep-copied (old-style weight_norm): build twice

    def branch(module: torch.nn.Module) -> torch.nn.ModuleDict:
        heads = {"dino_head": DINOv2ProjectionHead(input_dim=D), "ibot_head": DINOv2ProjectionHead(input_dim=D)}
        return torch.nn.ModuleDict({"backbone": module, **heads})

    student, teacher = branch(backbone).to(device), branch(teacher_backbone).to(device)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    teacher.eval()
    for m in teacher["backbone"].vit.modules():  # the teacher runs without stochastic depth
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    dino_loss, ibot_loss, koleo = DINOLoss().to(device), IBOTPatchLoss().to(device), KoLeoLoss().to(device)
    opt_peer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.04)
    lmask = torch.zeros(2 * B, 1 + 256, dtype=torch.bool, device=device)
    lmask[:, 1:] = masks.flatten(1)  # class token never masked
    g_cat, l_cat = torch.cat(globals_), torch.cat(locals_)

    def peer() -> None:
        with autocast:
            with torch.no_grad():
                t_tok = teacher["backbone"].encode(g_cat)
                t_cls = teacher["dino_head"](t_tok[:, 0])
                t_patch = teacher["ibot_head"](t_tok[lmask])
            s_tok = student["backbone"].encode(g_cat, mask=lmask)
            s_cls_g = student["dino_head"](s_tok[:, 0])
            s_patch = student["ibot_head"](s_tok[lmask])
            s_cls_l = student["dino_head"](student["backbone"].encode(l_cat)[:, 0])
            s_cls = torch.cat([s_cls_g, s_cls_l])
            loss = dino_loss(t_cls.chunk(2), s_cls.chunk(2 + n_local), teacher_temp=0.04)
            loss = loss + ibot_loss(t_patch, s_patch, masks, teacher_temp=0.04)
            loss = loss + 0.1 * sum(koleo(t) for t in s_tok[:, 0].chunk(2))
        loss.backward()
        opt_peer.step()
        opt_peer.zero_grad(set_to_none=True)
        update_momentum(student, teacher, m=0.992)

    n_params = [sum(p.numel() for p in m.parameters()) for m in (method.student, student)]
    shape = dict(batch=B, n_global=2, n_local=n_local, global_px=224, local_px=98, n_masked=int(masks.sum()), head=head_macs(D))
    # ours computes a residual branch only for the samples stochastic depth keeps (on average 1 - p per block)
    keep = [1.0 - (blk.drop_path1.drop_prob if hasattr(blk.drop_path1, "drop_prob") else 0.0) for blk in bb.blocks]
    flops = dinov2_step_flops(bb, **shape)
    executed = dinov2_step_flops(bb, **shape, keep=keep)
    note = (f"{args.arch}, student params ours {n_params[0] / 1e6:.1f}M, peer {n_params[1] / 1e6:.1f}M; "
            f"{flops / 1e12:.2f} TFLOP/step nominal, ours executes {executed / 1e12:.2f} on average (drop path {dp})")
    return StepPair(ours, peer, B, flops, note=note, ours_executed_flops=executed)


# ------------------------------------------------------------------------ simclr
def simclr_steps(args: argparse.Namespace, device: torch.device) -> StepPair:
    """SimCLR on ViT-S/16: two 224 px views per image, projector 384 -> 2048 -> 128 (BN), NT-Xent tau 0.1.

    Peer: lightly's SimCLR example (``SimCLRProjectionHead``, ``NTXentLoss``) around a timm ViT, which
    embeds the two views in two forward passes, with ``torch.optim.AdamW``. Ours: the method from the
    registry (both views in one pass) and the engine's optimiser (``histofm.train.build_optimizer``:
    AdamW with the fused step). Same views, lr and weight decay.
    """
    import timm
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    from histofm.methods.registry import build_method

    B = args.batch
    arch = "vit_small_patch16_224"
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(B, 3, 224, 224, generator=g).to(device) for _ in range(2)]
    autocast = _autocast(args, device)

    method, _ = build_method("simclr", arch, img_size=224, overrides={})
    method = method.to(device).train()
    ours = _engine_step(method, views, autocast)

    backbone = timm.create_model(arch, num_classes=0)
    head = SimCLRProjectionHead(384, 2048, 128)
    peer_model = torch.nn.Sequential(backbone, head).to(device).train()
    criterion = NTXentLoss(temperature=0.1)
    opt_peer = torch.optim.AdamW(peer_model.parameters(), lr=1e-4, weight_decay=0.04)

    def peer() -> None:
        with autocast:
            z0, z1 = peer_model(views[0]), peer_model(views[1])
            loss = criterion(z0, z1)
        loss.backward()
        opt_peer.step()
        opt_peer.zero_grad(set_to_none=True)

    head_flops = 2 * 2 * B * (384 * 2048 + 2048 * 128)
    flops = vit_train_flops(method.backbone, 2 * B, 224) + 3 * head_flops
    n_params = [sum(p.numel() for p in m.parameters()) for m in (method, peer_model)]
    return StepPair(ours, peer, B, flops, note=f"params ours {n_params[0] / 1e6:.1f}M, peer {n_params[1] / 1e6:.1f}M")


STEP_BUILDERS: dict[str, Callable[[argparse.Namespace, torch.device], StepPair]] = {
    "dinov2": dinov2_steps,
    "simclr": simclr_steps,
}


def time_steps(pair: StepPair, device: torch.device, warmup: int, repeats: int, clock: Callable[[], float]) -> dict[str, float]:
    """Median seconds per step of ours and the peer, alternating their order every repeat."""
    return time_alternating({"ours": pair.ours, "peer": pair.peer}, device, warmup, repeats, clock)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line; ``--parse-only`` stops after validating it (used by tests and gpu_check.sh)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="dinov2", choices=sorted(STEP_BUILDERS))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--arch", default="", choices=["", *DINOV2_ARCHS],
                   help="dinov2 backbone (default: vit_small_patch14_dinov2 on CPU, vit_large_patch14_dinov2 on CUDA)")
    p.add_argument("--batch", type=int, default=0,
                   help="images per step (default: 4 on CPU; on CUDA 32 for dinov2 ViT-L/14, else 64)")
    p.add_argument("--drop-path", type=float, default=0.3, help="stochastic depth of the student (DINOv2: 0.3-0.4)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU too (always on for CUDA)")
    p.add_argument("--cpu-time", action="store_true", help="time with process CPU time (CPU only; busy machines)")
    p.add_argument("--peak-n", type=int, default=0, help="side of the peak matmul (default: 8192 on CUDA, 4096 on CPU)")
    p.add_argument("--no-peak", action="store_true", help="skip the matmul peak and the peak fractions")
    p.add_argument("--parse-only", action="store_true", help="validate the arguments and exit")
    args = p.parse_args(argv)
    if args.cpu_time and args.device != "cpu":
        p.error("--cpu-time only makes sense with --device cpu")
    if args.arch and args.method != "dinov2":
        p.error("--arch applies to --method dinov2 only")
    if args.batch < 0 or args.repeats < 1 or args.warmup < 0 or not 0.0 <= args.drop_path < 1.0:
        p.error("--batch must be >= 0, --repeats >= 1, --warmup >= 0 and --drop-path in [0, 1)")
    cuda = args.device.startswith("cuda")
    if args.method == "dinov2":
        args.arch = args.arch or ("vit_large_patch14_dinov2" if cuda else "vit_small_patch14_dinov2")
    large = args.arch == "vit_large_patch14_dinov2"
    args.batch = args.batch or ((32 if large else 64) if cuda else 4)
    if args.batch < 2:
        p.error("--batch must be >= 2 (KoLeo and NT-Xent compare images within the batch)")
    return p, args


def main(argv: list[str] | None = None) -> int:
    p, args = parse_args(argv)
    if args.parse_only:
        print(f"arguments ok: {vars(args)}")
        return 0
    device, clock, dtype, peak = setup_run(p, args)
    pair = STEP_BUILDERS[args.method](args, device)
    secs = time_steps(pair, device, args.warmup, args.repeats, clock)
    where = f"{device}" + (f" ({torch.cuda.get_device_name(device)}, bf16 autocast)" if device.type == "cuda" else
                           f", {torch.get_num_threads()} threads, {'bf16' if args.bf16 else 'fp32'}, "
                           f"{'process CPU time' if args.cpu_time else 'wall clock'}")
    if peak is not None:
        where += f", measured {str(dtype).removeprefix('torch.')} matmul peak {peak / 1e12:.3f} TFLOP/s"
    print(f"{args.method}: {where}; batch {args.batch}, warm-up {args.warmup}, median of {args.repeats}; "
          f"torch {torch.__version__}; {pair.note}")
    line = (
        f"ours {secs['ours'] * 1e3:8.1f} ms/step ({pair.images / secs['ours']:7.2f} img/s)   "
        f"peer {secs['peer'] * 1e3:8.1f} ms/step ({pair.images / secs['peer']:7.2f} img/s)   "
        f"ratio peer/ours {secs['peer'] / secs['ours']:.3f}x"
    )
    if peak is not None and pair.flops:
        line += (f"   peak fraction (nominal FLOPs) ours {pair.flops / secs['ours'] / peak:.1%}, "
                 f"peer {pair.flops / secs['peer'] / peak:.1%}")
        if pair.ours_executed_flops:
            line += f"; ours on the FLOPs it executes {pair.ours_executed_flops / secs['ours'] / peak:.1%}"
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

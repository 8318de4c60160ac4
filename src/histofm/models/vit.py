"""Vision Transformer (Dosovitskiy et al. 2020, arXiv 2010.11929), with timm's parameter names.

An image is cut into ``p x p`` patches, each patch is linearly projected to a
token, a learned class token (and optionally "register" tokens, Darcet et al.
2023, arXiv 2309.16588) is prepended, learned position embeddings are added,
and a stack of pre-norm Transformer blocks mixes the tokens::

    x = [cls; reg_1..reg_R; E p_1; ...; E p_N] + pos        # (B, 1+R+N, D)
    x = x + ls1 * Attn(LN(x));  x = x + ls2 * MLP(LN(x))     # per block
    features = LN(x)

Parameter names (``cls_token``, ``reg_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``,
``norm``, ``head``) are identical to timm's ``VisionTransformer``, so timm-format
checkpoints of the pathology foundation models load with ``strict=True``.

Pooling (``global_pool``) decides what ``model(x)`` returns:

* ``"token"``: the class token (UNI, Phikon, H-optimus, GigaPath);
* ``"avg"``: mean of patch tokens, class and register tokens excluded;
* ``"token_avg"``: class token concatenated with the patch-token mean, registers
  excluded (the Virchow / Virchow2 embedding, ``2 * D``);
* ``""``: no pooling, all tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from histofm.errors import HistofmError
from histofm.layers import (
    Attention,
    DropPath,
    LayerScale,
    Mlp,
    PatchEmbed,
    SwiGLUPacked,
    resample_abs_pos_embed,
)

PoolMode = Literal["token", "avg", "token_avg", ""]
_POOLS = ("token", "avg", "token_avg", "")


class Block(nn.Module):
    """Pre-norm Transformer block: attention then MLP, each with LayerScale and DropPath."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = None,
        mlp_layer: str = "mlp",
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        mlp_factory: Callable[[int, int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        if mlp_factory is not None:
            self.mlp = mlp_factory(dim, hidden)
        elif mlp_layer == "swiglu":
            self.mlp = SwiGLUPacked(dim, hidden, drop=drop)
        elif mlp_layer == "mlp":
            self.mlp = Mlp(dim, hidden, drop=drop)
        else:
            raise HistofmError(f"mlp_layer must be 'mlp' or 'swiglu', got {mlp_layer!r}; set one of those.")
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.skip_dropped = False  # see VisionTransformer.set_efficient_drop_path

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_dropped and self.training and attn_mask is None and isinstance(self.drop_path1, DropPath):
            x = _add_kept(x, lambda y: self.ls1(self.attn(self.norm1(y))), self.drop_path1.drop_prob)
            return _add_kept(x, lambda y: self.ls2(self.mlp(self.norm2(y))), self.drop_path2.drop_prob)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def _add_kept(x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor], drop_prob: float) -> torch.Tensor:
    """``x + drop_path(branch(x))`` computing the branch only for the samples it keeps.

    Same distribution as :class:`DropPath` (each sample kept with probability
    ``1 - p`` and rescaled by ``1 / (1 - p)``), but dropped samples cost nothing:
    DINOv2's "efficient stochastic depth" (Oquab et al. 2023, Sec. 5), which saves
    compute in proportion to the drop rate. The draw is made on the CPU so no
    device synchronisation is needed to size the kept batch.
    """
    keep = 1.0 - drop_prob
    idx = (torch.rand(x.shape[0]) < keep).nonzero().flatten()  # (K,) kept samples
    if idx.numel() == 0:
        return x
    if idx.numel() == x.shape[0]:
        return x + branch(x) / keep
    idx = idx.to(x.device, non_blocking=True)
    return torch.index_add(x, 0, idx, branch(x.index_select(0, idx)).to(x.dtype), alpha=1.0 / keep)


class VisionTransformer(nn.Module):
    """ViT backbone. ``forward_features`` gives all tokens, ``forward`` the pooled embedding.

    Args:
        img_size: native input size; position embeddings are learned for this grid and
            resampled (bicubic, antialiased) for any other multiple of ``patch_size``.
        patch_size: side of the square patches.
        in_chans: input channels.
        num_classes: size of a linear ``head`` on the pooled embedding; 0 for none.
        global_pool: one of ``"token"``, ``"avg"``, ``"token_avg"``, ``""``.
        embed_dim, depth, num_heads, mlp_ratio: width, depth, heads, MLP expansion.
        qkv_bias: bias on the packed qkv projection.
        init_values: LayerScale initial value; ``None`` disables LayerScale.
        class_token: prepend a learned class token.
        reg_tokens: number of learned register tokens after the class token.
        no_embed_class: position embeddings cover patch tokens only (DINOv2 register
            models, UNI2-h, H-optimus); otherwise they also cover the prefix tokens.
        mlp_layer: ``"mlp"`` (GELU) or ``"swiglu"`` (packed, first half gated by SiLU).
        drop_rate, attn_drop_rate, drop_path_rate: dropout, attention dropout, and the
            final stochastic-depth rate (linearly increasing over blocks).
        use_mask_token: add a learned ``mask_token`` that replaces masked patch
            tokens (iBOT, DINOv2, SimMIM). Off by default so timm checkpoints load strictly.
        norm_eps: LayerNorm epsilon (1e-6 as in timm's ViTs).
        mlp_factory: optional ``(dim, hidden) -> nn.Module`` building the MLP of each
            block (for example a mixture of experts); overrides ``mlp_layer``.
        moe_every, num_experts, top_k, capacity_factor: ``moe_every=N > 0`` makes the MLP of
            every N-th block a :class:`~histofm.layers.moe.MoEMlp` with ``num_experts`` experts
            of type ``mlp_layer``, top-k routing and that capacity factor (0: off, the default).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 0,
        global_pool: PoolMode = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = None,
        class_token: bool = True,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        mlp_layer: str = "mlp",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        use_mask_token: bool = False,
        norm_eps: float = 1e-6,
        mlp_factory: Callable[[int, int], nn.Module] | Callable[[int, int, int], nn.Module] | None = None,
        moe_every: int = 0,
        num_experts: int = 8,
        top_k: int = 2,
        capacity_factor: float | None = 1.25,
    ) -> None:
        super().__init__()
        if moe_every:
            if mlp_factory is not None:
                raise HistofmError("moe_every and mlp_factory both choose the MLP of each block; pass only one of them.")
            from histofm.layers.moe import moe_mlp_factory

            mlp_factory = moe_mlp_factory(moe_every, num_experts, top_k, capacity_factor, mlp_layer, drop_rate)
        if global_pool not in _POOLS:
            raise HistofmError(f"global_pool must be one of {_POOLS}, got {global_pool!r}; set one of those.")
        if global_pool in ("token", "token_avg") and not class_token:
            raise HistofmError(f"global_pool={global_pool!r} needs class_token=True; set class_token=True or global_pool='avg'.")
        self.global_pool = global_pool
        self.embed_dim = embed_dim
        self.num_features = 2 * embed_dim if global_pool == "token_avg" else embed_dim
        self.num_classes = num_classes
        self.num_reg_tokens = reg_tokens
        self.has_class_token = class_token
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.no_embed_class = no_embed_class
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.patch_size = self.patch_embed.patch_size[0]
        num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if use_mask_token else None
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows with depth
        blocks = []
        for i in range(depth):
            factory = None
            if mlp_factory is not None:
                factory = _bind_block_index(mlp_factory, i)
            blocks.append(
                Block(
                    embed_dim, num_heads, mlp_ratio, qkv_bias, init_values, mlp_layer,
                    drop_rate, attn_drop_rate, dpr[i], norm_eps, factory,
                )
            )
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Truncated-normal(0.02) linears and position table, tiny tokens (timm's defaults)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        if self.mask_token is not None:
            nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters that optimisers should not decay."""
        return {"pos_embed", "cls_token", "reg_token", "mask_token"}

    # ---------------------------------------------------------------- tokens
    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Add position embeddings to patch tokens ``(B, H, W, D)`` and prepend prefix tokens."""
        B, H, W, D = x.shape
        pos = resample_abs_pos_embed(
            self.pos_embed,
            new_size=(H, W),
            old_size=self.patch_embed.grid_size,
            num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
        )
        x = x.reshape(B, H * W, D)
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(B, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(B, -1, -1))
        if self.no_embed_class:
            x = x + pos
            x = torch.cat(prefix + [x], dim=1) if prefix else x
        else:
            x = torch.cat(prefix + [x], dim=1) if prefix else x
            x = x + pos
        return self.pos_drop(x)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Image ``(B, C, H, W)`` to tokens ``(B, P + N, D)`` before the blocks.

        ``masks`` ``(B, N)`` bool replaces the selected patch embeddings by ``mask_token``
        before positions are added (the iBOT / DINOv2 / SimMIM convention).
        """
        x = self.patch_embed(x)  # (B, H', W', D)
        if masks is not None:
            if self.mask_token is None:
                raise HistofmError("Masked input needs a model built with use_mask_token=True; build it with that argument.")
            B, H, W, D = x.shape
            m = masks.reshape(B, H, W, 1).to(x.dtype)
            x = x * (1 - m) + self.mask_token.to(x.dtype).view(1, 1, 1, D) * m
        return self._pos_embed(x)

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm, ``(B, num_prefix_tokens + N, D)``."""
        x = self.prepare_tokens(x, masks)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            for blk in self.blocks:  # recompute activations in backward: memory for compute
                x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)

    # --------------------------------------------------------- intermediates
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Any] | tuple[torch.Tensor, list[Any]]:
        """Per-block features for dense heads (timm's API and semantics).

        Args:
            x: images ``(B, C, H, W)``.
            indices: an int ``n`` takes the last ``n`` blocks, a sequence takes those block
                indices (negative counts from the end), ``None`` takes every block. Outputs come
                in block order, whatever the order of ``indices``.
            return_prefix_tokens: give ``(spatial, prefix)`` pairs; ``prefix`` is ``(B, P, D)``.
            norm: apply the final norm to each intermediate.
            stop_early: do not run the blocks after the last one taken.
            output_fmt: ``"NCHW"`` gives ``(B, D, H/p, W/p)`` maps, ``"NLC"`` gives ``(B, N, D)`` tokens.
            intermediates_only: return the list only, not ``(final_features, list)``.

        Returns:
            The list of intermediates, or ``(forward_features(x), intermediates)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise HistofmError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}; pass one of those.")
        take, last = _take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        x = self.prepare_tokens(x)  # (B, P + N, D)
        blocks = list(self.blocks)[: last + 1] if stop_early else list(self.blocks)
        taken = []
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, blk in enumerate(blocks):
            if ckpt:
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in take:
                taken.append(self.norm(x) if norm else x)
        P = self.num_prefix_tokens
        prefix = [y[:, :P] for y in taken]  # (B, P, D) each
        spatial = [y[:, P:] for y in taken]  # (B, N, D) each
        if output_fmt == "NCHW":
            gh, gw = height // self.patch_size, width // self.patch_size
            spatial = [y.reshape(B, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for y in spatial]
        out: list[Any] = list(zip(spatial, prefix)) if return_prefix_tokens and P else spatial
        if intermediates_only:
            return out
        return self.norm(x), out

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple[Any, ...]:
        """DINOv2's API: patch tokens of the last ``n`` blocks (or of blocks ``n``), normed by default.

        Returns a tuple of ``(B, N, D)`` (or ``(B, D, H/p, W/p)`` with ``reshape``); with
        ``return_class_token`` a tuple of ``(patch_tokens, class_token (B, D))`` pairs.
        """
        if return_class_token and not self.has_class_token:
            raise HistofmError("return_class_token needs a model with a class token; build it with class_token=True or drop return_class_token.")
        taken = self.forward_intermediates(
            x, indices=n, return_prefix_tokens=True, norm=norm, output_fmt="NCHW" if reshape else "NLC",
            intermediates_only=True,
        )
        if not self.num_prefix_tokens:  # no prefix: plain tensors came back
            taken = [(y, None) for y in taken]
        if return_class_token:
            return tuple((y, p[:, 0]) for y, p in taken)
        return tuple(y for y, _ in taken)

    def set_efficient_drop_path(self, enable: bool = True) -> None:
        """In training, run each residual branch only on the samples stochastic depth keeps (DINOv2)."""
        for blk in self.blocks:
            if isinstance(blk, Block):
                blk.skip_dropped = enable

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block (timm's API), for large backbones."""
        self.grad_checkpointing = enable

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Pool tokens ``(B, P + N, D)`` according to ``global_pool``."""
        if self.global_pool == "token":
            return x[:, 0]
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        if self.global_pool == "token_avg":
            return torch.cat([x[:, 0], x[:, self.num_prefix_tokens :].mean(dim=1)], dim=-1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the tokens, then apply the linear head unless ``pre_logits``."""
        x = self.pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------ timm's model surface (issue 17)
    # With ``forward_features``, ``forward_head``, ``num_features``, ``set_grad_checkpointing`` and
    # ``no_weight_decay`` above, these let code written for timm's VisionTransformer (layer-wise
    # lr decay, fine-tuning scripts, feature extractors) run on ours unchanged;
    # tests/test_vit_timm_surface.py compares each with timm's on the same weights.
    @property
    def head_hidden_size(self) -> int:
        """Width of what ``forward_head(x, pre_logits=True)`` returns (timm's name)."""
        return self.num_features

    def get_classifier(self) -> nn.Module:
        """The classification head (``nn.Identity`` when ``num_classes == 0``)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: PoolMode | None = None) -> None:
        """Replace the head by a fresh ``Linear(num_features, num_classes)`` (none for 0), optionally re-pooling.

        Args:
            num_classes: outputs of the new head; 0 makes ``model(x)`` the pooled embedding.
            global_pool: new pooling (``"token"``, ``"avg"``, ``"token_avg"``, ``""``); ``None`` keeps it.
        """
        if global_pool is not None:
            if global_pool not in _POOLS:
                raise HistofmError(f"global_pool must be one of {_POOLS}, got {global_pool!r}; pass one of those.")
            if global_pool in ("token", "token_avg") and not self.has_class_token:
                raise HistofmError(
                    f"global_pool={global_pool!r} needs a class token, and this model has none; use 'avg' instead."
                )
            self.global_pool = global_pool
            self.num_features = 2 * self.embed_dim if global_pool == "token_avg" else self.embed_dim
        self.num_classes = num_classes
        ref = self.norm.weight  # the new head lives where the model does, in its dtype
        self.head = (
            nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )

    def group_matcher(self, coarse: bool = False) -> dict[str, str | list[tuple[str, tuple[int, ...] | None]]]:
        """Regexes that group parameters into stem, one group per block, and the final norm (timm's format).

        ``timm.optim.param_groups_layer_decay`` reads it to give block ``i`` the learning
        rate ``lr * decay ** (depth + 1 - i)``; ``coarse`` is accepted for timm's signature
        (a ViT's blocks are already the coarse groups). The head matches no group, so it
        gets the full learning rate.
        """
        del coarse
        return dict(
            stem=r"^cls_token|reg_token|mask_token|pos_embed|patch_embed",  # the embedding
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )


def _take_indices(num_blocks: int, indices: int | Sequence[int] | None) -> tuple[set[int], int]:
    """Absolute block indices to take and the largest one (timm's ``feature_take_indices``)."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise HistofmError(f"last-n ({indices}) is out of range (1 to {num_blocks}); ask for at most {num_blocks} blocks.")
        take = list(range(num_blocks - indices, num_blocks))
    else:
        take = []
        for i in indices:
            idx = num_blocks + i if i < 0 else i
            if not 0 <= idx < num_blocks:
                raise HistofmError(f"Block index {i} is out of range for {num_blocks} blocks; pass indices from {-num_blocks} to {num_blocks - 1}.")
            take.append(idx)
    if not take:
        raise HistofmError("indices selects no block; pass an int n (the last n blocks) or a non-empty list of block indices.")
    return set(take), max(take)


def _bind_block_index(factory: Callable[..., nn.Module], index: int) -> Callable[[int, int], nn.Module]:
    """Let an ``mlp_factory`` optionally receive the block index as a third argument."""
    import inspect

    try:
        n_params = len(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        n_params = 2
    if n_params >= 3:
        return lambda dim, hidden: factory(dim, hidden, index)
    return factory

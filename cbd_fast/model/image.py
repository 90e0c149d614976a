"""Image tower: a timm VisionTransformer that returns every token, projected to the joint space."""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn


class ImageTower(nn.Module):
    """ViT image encoder returning the CLS token and all patch tokens in the joint embedding space.

    The trunk is a plain ``timm`` ``VisionTransformer`` (never loaded with ``pretrained=True``: weights only
    come from local checkpoints, see :mod:`cbd_fast.model.clip_checkpoint`). Its head is unused; we run its
    stages ourselves so that prompt tokens can be inserted before the blocks.

    Args:
        img_size, patch_size: input resolution and patch size (square).
        width, depth, heads, mlp_ratio: trunk size.
        embed_dim: joint embedding size ``D``.
        act: ``"quick_gelu"`` (OpenAI CLIP) or ``"gelu"``.
        pre_norm: LayerNorm before the blocks (CLIP's ``ln_pre``; needed to load CLIP weights).

    Output of ``forward``: ``[B, 1 + num_patches, D]``, CLS first, not normalised.
    """

    def __init__(self, img_size: int, patch_size: int, width: int, depth: int, heads: int, embed_dim: int,
                 mlp_ratio: float = 4.0, act: str = "quick_gelu", pre_norm: bool = True):
        super().__init__()
        self.trunk = VisionTransformer(
            img_size=img_size, patch_size=patch_size, embed_dim=width, depth=depth, num_heads=heads,
            mlp_ratio=mlp_ratio, class_token=True, global_pool="token", num_classes=0, pre_norm=pre_norm,
            # CLIP's LayerNorms use eps 1e-5 (timm's ViT default is 1e-6); matching it keeps loaded CLIP
            # weights numerically faithful.
            norm_layer=partial(nn.LayerNorm, eps=1e-5), act_layer=act,
        )
        # CLIP's visual projection has no bias.
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=width ** -0.5)
        self.width = width
        self.num_patches = self.trunk.patch_embed.num_patches

    @property
    def num_tokens(self) -> int:
        """Output tokens per image: CLS + patches (prompt tokens are never returned)."""
        return 1 + self.num_patches

    def forward(self, images: torch.Tensor, prompts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encode images.

        Args:
            images: ``[B, 3, H, W]``.
            prompts: optional ``[B, P, width]`` prompt tokens, inserted right after the CLS token at the input
                of the first block (after positional embedding and ``norm_pre``: they are free input tokens
                with no position of their own).

        Returns:
            ``[B, 1 + num_patches, D]``: CLS and patch tokens after the final norm, projected (prompt
            positions removed).
        """
        trunk = self.trunk
        x = trunk.patch_embed(images)
        x = trunk._pos_embed(x)  # prepends CLS, adds positions
        x = trunk.patch_drop(x)
        x = trunk.norm_pre(x)
        num_prompts = 0
        if prompts is not None:
            num_prompts = prompts.shape[1]
            x = torch.cat([x[:, :1], prompts.to(x.dtype), x[:, 1:]], dim=1)
        x = trunk.blocks(x)
        x = trunk.norm(x)
        if num_prompts:
            x = torch.cat([x[:, :1], x[:, 1 + num_prompts:]], dim=1)
        return self.proj(x)

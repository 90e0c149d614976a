"""Text tower: CLIP-style causal transformer returning every real token, projected to the joint space."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import get_act_layer
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention with a boolean ``allowed[B, 1, N, N]`` mask (True = may attend).

    Parameter layout matches CLIP's ``nn.MultiheadAttention``: ``qkv`` = ``in_proj`` (q, k, v stacked),
    ``proj`` = ``out_proj``.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = get_act_layer(act)()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TextBlock(nn.Module):
    """Pre-LN residual block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` (CLIP's ResidualAttentionBlock)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act: str = "quick_gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), act)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), allowed)
        return x + self.mlp(self.norm2(x))


class TextTower(nn.Module):
    """Causal transformer over CLIP BPE ids.

    Args:
        context_length: maximal number of input ids ``L`` (size of the positional table).
        width, depth, heads, mlp_ratio, act: transformer size and activation.
        embed_dim: joint embedding size ``D``.
        vocab_size: number of token ids (CLIP: 49408).

    Inputs are ``ids[B, L]`` with ``mask[B, L]`` as produced by :class:`ClipTokenizer`: real tokens form a
    prefix of each row (start token first, end token last) and the rest is padding.
    """

    def __init__(self, context_length: int, width: int, depth: int, heads: int, embed_dim: int,
                 vocab_size: int = 49408, mlp_ratio: float = 4.0, act: str = "quick_gelu"):
        super().__init__()
        self.context_length = context_length
        self.width = width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList([TextBlock(width, heads, mlp_ratio, act) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)  # CLIP's ln_final
        self.proj = nn.Linear(width, embed_dim, bias=False)  # CLIP's text_projection (transposed)
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        # CLIP's initialisation: small embeddings, residual-branch outputs shrunk with depth so the
        # residual stream keeps its scale at init.
        width = self.width
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        branch_out_std = width ** -0.5 * (2 * depth) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=width ** -0.5)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.proj.weight, std=branch_out_std)
            nn.init.zeros_(block.attn.proj.bias)
            nn.init.normal_(block.mlp.fc1.weight, std=(2 * width) ** -0.5)
            nn.init.zeros_(block.mlp.fc1.bias)
            nn.init.normal_(block.mlp.fc2.weight, std=branch_out_std)
            nn.init.zeros_(block.mlp.fc2.bias)
        nn.init.normal_(self.proj.weight, std=width ** -0.5)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor,
                prompts: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encode token ids.

        Args:
            ids: ``[B, L]`` long, ``L <= context_length``.
            mask: ``[B, L]`` bool, True on real tokens (a prefix of each row).
            prompts: optional ``[B, P, width]`` prompt tokens, inserted after the start token (they see only
                the start token and are seen by every later token; they carry no positional embedding).

        Returns:
            ``(tokens[B, L, D], pooled[B, D])``: every position projected (padding rows are meaningless;
            use ``mask``), and the end-token feature (the last real token), both not normalised.
        """
        batch, length = ids.shape
        if length > self.context_length:
            raise ValueError(f"text has {length} tokens, context_length is {self.context_length}")
        mask = mask.to(torch.bool)
        x = self.token_embedding(ids) + self.positional_embedding[:length]
        key_valid = mask
        num_prompts = 0
        if prompts is not None:
            num_prompts = prompts.shape[1]
            x = torch.cat([x[:, :1], prompts.to(x.dtype), x[:, 1:]], dim=1)
            key_valid = torch.cat([mask[:, :1], mask.new_ones(batch, num_prompts), mask[:, 1:]], dim=1)
        total = length + num_prompts
        causal = torch.ones(total, total, dtype=torch.bool, device=ids.device).tril()
        # Padding keys are excluded on top of the causal mask; every query still sees the start token, so no
        # attention row is empty.
        allowed = causal[None, None] & key_valid[:, None, None, :]
        for block in self.blocks:
            x = block(x, allowed)
        x = self.norm(x)
        if num_prompts:
            x = torch.cat([x[:, :1], x[:, 1 + num_prompts:]], dim=1)
        tokens = self.proj(x)
        end_position = mask.sum(dim=1) - 1  # the end token is the last real token
        pooled = tokens[torch.arange(batch, device=ids.device), end_position]
        return tokens, pooled

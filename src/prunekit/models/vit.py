"""A small Vision Transformer (Dosovitskiy et al. 2021, arXiv 2010.11929): patch embedding, pre-norm blocks of
multi-head self-attention and an MLP, a class token and a linear head."""

from __future__ import annotations

import torch
from torch import nn

from prunekit.models.config import MODELS, ModelConfig, scaled


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (each prunable per head)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.q = nn.Linear(dim, inner)
        self.k = nn.Linear(dim, inner)
        self.v = nn.Linear(dim, inner)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t(x).reshape(b, n, self.heads, -1).transpose(1, 2) for t in (self.q, self.k, self.v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Depth 4, 4 heads, embedding 64 x width; patch 4 pixels (2 for images under 16 pixels)."""

    def __init__(self, config: ModelConfig, depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        patch = 4 if config.input_size >= 16 else 2
        if config.input_size % patch:
            raise ValueError(f"vit_tiny needs input_size divisible by {patch}, got {config.input_size}")
        dim = scaled(64, config.width)
        head_dim = max(1, dim // heads)
        tokens = (config.input_size // patch) ** 2
        self.patch_embed = nn.Conv2d(config.in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, head_dim, 2 * dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


MODELS.add("vit_tiny", ViT, "small ViT: 4 blocks, 4 heads, dim 64 x width, patch 4")

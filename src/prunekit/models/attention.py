"""Multi-head attention whose inner width may be narrower than its embedding: what ``nn.MultiheadAttention``
becomes when heads are removed.

``nn.MultiheadAttention`` ties its q/k/v width to ``embed_dim``, the width of its inputs, so it cannot lose a
head and stay itself. :class:`PrunableMultiheadAttention` has the same forward signature and results (separate
q/k/v projections of ``num_heads * head_dim`` rows, scaled dot-product attention, output projection back to
``embed_dim``); :meth:`from_torch` converts one exactly, and the channel engine converts it when a plan removes
its heads (:mod:`prunekit.channels.heads`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PrunableMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (self- or cross-attention, ``batch_first`` or not) with its own inner width.

    Args:
        embed_dim: Width of the query input and of the output.
        num_heads: Heads.
        head_dim: Width of one head (``embed_dim // num_heads`` in the module it replaces).
        kdim, vdim: Widths of the key and value inputs (default ``embed_dim``).
        bias: Whether the projections have biases.
        dropout: Dropout on the attention weights while training.
        batch_first: Inputs and outputs are (batch, sequence, feature) rather than (sequence, batch, feature).

    The attention weights it returns (``need_weights=True``) are those of the remaining heads; a 3-D
    ``attn_mask`` of shape (batch * heads, L, S) is given for the original heads and sliced to the remaining ones
    (``source_heads``).
    """

    # What nn.TransformerEncoderLayer reads to decide on its fused fast path: none here, so it takes the
    # ordinary path through this module's forward.
    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, kdim: int | None = None,
                 vdim: int | None = None, bias: bool = True, dropout: float = 0.0, batch_first: bool = False) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        self.source_heads: tuple[int, ...] = tuple(range(num_heads))  # original index of each head

    @classmethod
    @torch.no_grad()
    def from_torch(cls, mha: nn.MultiheadAttention) -> PrunableMultiheadAttention:
        """An exact copy of ``mha`` (same outputs, same training mode).

        Raises:
            ValueError: ``add_bias_kv`` or ``add_zero_attn``, which have no counterpart here.
        """
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn has no head-prunable form")
        new = cls(mha.embed_dim, mha.num_heads, mha.head_dim, mha.kdim, mha.vdim, mha.in_proj_bias is not None,
                  mha.dropout, mha.batch_first)
        new = new.to(device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.split(e)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.split(e) if mha.in_proj_bias is not None else (None,) * 3
        for layer, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
            layer.weight.copy_(w)
            if b is not None:
                layer.bias.copy_(b)
        new.out_proj.weight.copy_(mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.train(mha.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        length, batch, _ = query.shape
        source = key.shape[0]
        q, k, v = (proj(t).reshape(t.shape[0], batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)
                   for proj, t in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))
        mask = None  # additive, broadcast to (batch, heads, L, S)
        if is_causal and attn_mask is None:
            raise ValueError("is_causal is a hint about attn_mask and needs attn_mask given (as "
                             "nn.MultiheadAttention does)")
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.reshape(batch, -1, length, source)[:, list(self.source_heads)]
            mask = _additive(attn_mask, q.dtype)
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask[:, None, None, :], q.dtype)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (batch, heads, L, S)
            weights = (scores if mask is None else scores + mask).softmax(-1)
            if dropout > 0:
                weights = F.dropout(weights, dropout)
            attended = weights @ v
        else:  # the fused kernel, as nn.MultiheadAttention uses when no weights are asked for
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(attended.permute(2, 0, 1, 3).reshape(length, batch, -1))
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if weights is None:
            return out, None
        if average_attn_weights:
            weights = weights.mean(1)
        if not batched:
            weights = weights.squeeze(0)
        return out, weights


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean masks mark positions not to attend (as ``nn.MultiheadAttention``): -inf there; float masks are
    added as they are."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)

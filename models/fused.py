"""The attention of the families whose query, key and value projections are one linear (Phi-3's
qkv_proj, GPT-2's c_attn). It stays one linear in the module tree, so that a LoRA on it is the
one PEFT trains on the fused module; the product is split into queries, keys and values after.

Shapes: B batch, T time (new tokens), D model dim, N query heads, K key/value heads, H head dim.
"""

import utils  # noqa: F401  (fast BLAS before mlx.core)

import mlx.core as mx
import mlx.nn as nn

import ops
from models.layers import Linear


def qkv_rows(n_heads, n_kv_heads, head_dim):
    """The fused projection's rows: the N query heads', then the K key heads', then the K value heads'."""
    return (n_heads + 2 * n_kv_heads) * head_dim


class FusedAttention(nn.Module):
    """Grouped-query attention whose projections are one linear, wqkv (rows as qkv_rows says), and
    wo; both with biases where the family has them (GPT-2). `rope` None: no rotation (GPT-2 embeds
    its positions instead)."""

    def __init__(self, dim, n_heads, n_kv_heads, head_dim, rope, bias=False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scale, self.rope = head_dim ** -0.5, rope
        self.wqkv = Linear(dim, qkv_rows(n_heads, n_kv_heads, head_dim), bias=bias)
        self.wo = Linear(n_heads * head_dim, dim, bias=bias)

    def __call__(self, x_BTD, mask, cache=None):
        B, T, _ = x_BTD.shape
        queries, keys = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q_BTD, k_BTD, v_BTD = mx.split(self.wqkv(x_BTD), [queries, queries + keys], axis=-1)
        q_BNTH = q_BTD.reshape(B, T, self.n_heads, -1).transpose(0, 2, 1, 3)
        k_BKTH, v_BKTH = (a.reshape(B, T, self.n_kv_heads, -1).transpose(0, 2, 1, 3) for a in (k_BTD, v_BTD))
        if self.rope is not None:
            offset = 0 if cache is None else cache.offset
            q_BNTH, k_BKTH = self.rope(q_BNTH, offset), self.rope(k_BKTH, offset)
        if cache is not None:
            k_BKTH, v_BKTH = cache.update(k_BKTH, v_BKTH)
        o_BNTH = ops.attention(q_BNTH, k_BKTH, v_BKTH, self.scale, mask)
        return self.wo(o_BNTH.transpose(0, 2, 1, 3).reshape(B, T, -1))

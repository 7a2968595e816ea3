"""The LLaMA / Mistral transformer, and its weights' names in every checkpoint format.

Module and parameter names are those of Meta's and Mistral's checkpoints
(`tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1`, ...), so the weights
written by convert.py load with no renaming; NAMES says what Hugging Face and GGUF
call each.

Shapes: B batch, T time (new tokens), S key length, D model dim, N query
heads, K key/value heads, H head dim, C hidden (feed-forward) dim, V vocab.
"""

from dataclasses import dataclass
from typing import Optional

import utils  # noqa: F401  (fast BLAS before mlx.core)

import mlx.nn as nn

import ops
from models.layers import (KVCache, Linear, RMSNorm, attention_mask, checkpointed, embedding_as_output,
                           rope_periods, rope_position_scale)
from models.table import NameTable, Weight


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float
    vocab_size: int
    rope_theta: float = 10000.0
    sliding_window: Optional[int] = None
    context_length: Optional[int] = None  # positions the model was trained for, when its checkpoint says
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    tie_word_embeddings: bool = False  # logits read off the embedding: no output layer


def _queries(c):
    return c["n_heads"] * c["head_dim"]


def _keys(c):
    return c["n_kv_heads"] * c["head_dim"]


# Every weight, its names and shape. Meta's model parallelism splits column-parallel layers
# along their rows (0) and row-parallel ones along their columns (1).
NAMES = NameTable(
    top=[Weight("tok_embeddings", "model.embed_tokens", "token_embd", lambda c: (c["vocab_size"], c["dim"]),
                meta_split=1),
         Weight("norm", "model.norm", "output_norm", lambda c: (c["dim"],)),
         Weight("output", "lm_head", "output", lambda c: (c["vocab_size"], c["dim"]), meta_split=0,
                absent_if="tie_word_embeddings")],
    block=[Weight("attention.wq", "self_attn.q_proj", "attn_q", lambda c: (_queries(c), c["dim"]), meta_split=0,
                  rope_heads="n_heads"),
           Weight("attention.wk", "self_attn.k_proj", "attn_k", lambda c: (_keys(c), c["dim"]), meta_split=0,
                  rope_heads="n_kv_heads"),
           Weight("attention.wv", "self_attn.v_proj", "attn_v", lambda c: (_keys(c), c["dim"]), meta_split=0),
           Weight("attention.wo", "self_attn.o_proj", "attn_output", lambda c: (c["dim"], _queries(c)),
                  meta_split=1),
           Weight("feed_forward.w1", "mlp.gate_proj", "ffn_gate", lambda c: (c["hidden_dim"], c["dim"]),
                  meta_split=0),
           Weight("feed_forward.w2", "mlp.down_proj", "ffn_down", lambda c: (c["dim"], c["hidden_dim"]),
                  meta_split=1),
           Weight("feed_forward.w3", "mlp.up_proj", "ffn_up", lambda c: (c["hidden_dim"], c["dim"]), meta_split=0),
           Weight("attention_norm", "input_layernorm", "attn_norm", lambda c: (c["dim"],)),
           Weight("ffn_norm", "post_attention_layernorm", "ffn_norm", lambda c: (c["dim"],))])


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        self.scale = args.head_dim ** -0.5
        self.rope_theta = args.rope_theta
        self._rope_periods = rope_periods(args)  # leading underscore: not a parameter
        self.rope_scale = rope_position_scale(args)
        self.wq = Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def __call__(self, x_BTD, mask, cache=None):
        B, T, _ = x_BTD.shape
        q_BTD, k_BTD, v_BTD = ops.projections(x_BTD, (self.wq, self.wk, self.wv))
        q_BNTH = q_BTD.reshape(B, T, self.n_heads, -1).transpose(0, 2, 1, 3)
        k_BKTH = k_BTD.reshape(B, T, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v_BKTH = v_BTD.reshape(B, T, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = 0 if cache is None else cache.offset
        q_BNTH = ops.rope(q_BNTH, self.rope_theta, offset, self.rope_scale, self._rope_periods)
        k_BKTH = ops.rope(k_BKTH, self.rope_theta, offset, self.rope_scale, self._rope_periods)
        if cache is not None:
            k_BKTH, v_BKTH = cache.update(k_BKTH, v_BKTH)
        o_BNTH = ops.attention(q_BNTH, k_BKTH, v_BKTH, self.scale, mask)
        return self.wo(o_BNTH.transpose(0, 2, 1, 3).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = Linear(args.dim, args.hidden_dim, bias=False)

    def __call__(self, x_BTD):
        return self.w2(ops.swiglu(*ops.projections(x_BTD, (self.w1, self.w3))))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def __call__(self, x_BTD, mask, cache=None):
        h_BTD = x_BTD + self.attention(self.attention_norm(x_BTD), mask, cache)
        return h_BTD + self.feed_forward(self.ffn_norm(h_BTD))


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = [TransformerBlock(args) for _ in range(args.n_layers)]
        self.norm = RMSNorm(args.dim, args.norm_eps)
        if not args.tie_word_embeddings:
            self.output = Linear(args.dim, args.vocab_size, bias=False)
        self.grad_checkpoint = False

    def __call__(self, tokens_BT, cache=None):
        T = tokens_BT.shape[1]
        offset = 0 if cache is None else cache[0].offset
        mask = attention_mask(T, offset, self.args.sliding_window)
        h_BTD = self.tok_embeddings(tokens_BT)
        for i, layer in enumerate(self.layers):
            if self.grad_checkpoint and cache is None:
                h_BTD = checkpointed(layer, h_BTD, mask)
            else:
                h_BTD = layer(h_BTD, mask, None if cache is None else cache[i])
        h_BTD = self.norm(h_BTD)
        if self.args.tie_word_embeddings:
            return embedding_as_output(self.tok_embeddings, h_BTD)  # logits_BTV
        return self.output(h_BTD)  # logits_BTV

    def make_cache(self):
        return [KVCache(self.args.sliding_window) for _ in self.layers]

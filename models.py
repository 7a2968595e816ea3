"""The LLaMA / Mistral transformer in MLX, and LoRA.

Module and parameter names are those of Meta's and Mistral's checkpoints
(`tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1`, ...), so the
weights written by convert.py load with no renaming table. Where the CPU has a
faster kernel, the model calls the op in ops.py that picks it.

Shapes: B batch, T time (new tokens), S key length, D model dim, N query
heads, K key/value heads, H head dim, C hidden (feed-forward) dim, V vocab.
"""

import math
from dataclasses import dataclass
from typing import Optional

import utils  # noqa: F401  (fast BLAS before mlx.core)
from utils import UserError

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

import ops


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


def rope_periods(args):
    """RoPE's per-pair wavelength over 2 pi (1 / angular frequency) for llama3 scaling, else None.

    Llama 3.1 stretches the long wavelengths by `factor`, keeps the short ones and
    blends those between (Meta's apply_scaling); computed in float64, once.
    """
    scaling = args.rope_scaling
    if scaling is None or scaling["rope_type"] != "llama3":
        return None
    inv_freq = args.rope_theta ** -(np.arange(0, args.head_dim, 2, dtype=np.float64) / args.head_dim)
    old = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    wavelength = 2 * np.pi / inv_freq
    smooth = np.clip((old / wavelength - low) / (high - low), 0.0, 1.0)
    scaled = np.where(wavelength < old / high, inv_freq,
                      np.where(wavelength > old / low, inv_freq / factor,
                               (1 - smooth) * inv_freq / factor + smooth * inv_freq))
    return mx.array((1.0 / scaled).astype(np.float32))


def rope_position_scale(args):
    """Linear RoPE scaling divides the positions by its factor."""
    scaling = args.rope_scaling
    return 1.0 / scaling["factor"] if scaling is not None and scaling["rope_type"] == "linear" else 1.0


class Linear(nn.Linear):
    """nn.Linear whose product is ops.linear; quantizes to QuantizedLinear."""

    def __call__(self, x):
        if "bias" in self:
            return super().__call__(x)
        return ops.linear(x, self.weight)

    def to_quantized(self, group_size=None, bits=None, mode="affine", quantize_input=False):
        if mode != "affine" or quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear (affine) whose product is ops.quantized_linear."""

    def __call__(self, x):
        if "bias" in self:
            return super().__call__(x)
        return ops.quantized_linear(x, self.weight, self.scales, self.biases, self.group_size, self.bits)


class RMSNorm(nn.Module):
    def __init__(self, dims, eps):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x):
        return ops.rms_norm(x, self.weight, self.eps)


class KVCache:
    """Keys and values of the tokens seen so far, for one layer.

    Preallocated in steps so that decoding writes in place. With a sliding
    window W, keys older than any future query can see are dropped when the
    buffer is compacted, so memory stays near W positions, not the whole text.
    """

    step = 256

    def __init__(self, window=None):
        self.window = window
        self.keys = self.values = None  # (B, K, capacity, H)
        self.offset = 0  # absolute position of the next token
        self.start = 0  # absolute position of buffer slot 0

    def first_visible(self, offset):
        """Oldest absolute position a query at `offset` (or later) can attend to."""
        return 0 if self.window is None else max(0, offset - self.window + 1)

    def update(self, k_BKTH, v_BKTH):
        """Append T new positions; return the keys and values the new queries see.

        The returned keys span absolute positions first_visible(offset) .. offset+T-1,
        which is what `attention_mask` assumes.
        """
        T = k_BKTH.shape[2]
        first = self.first_visible(self.offset)
        used = self.offset - self.start
        if self.keys is None or used + T > self.keys.shape[2]:
            self._compact_and_grow(first, T, k_BKTH, v_BKTH)
            used = self.offset - self.start
        self.keys[:, :, used:used + T] = k_BKTH
        self.values[:, :, used:used + T] = v_BKTH
        self.offset += T
        lo, hi = first - self.start, self.offset - self.start
        return self.keys[:, :, lo:hi], self.values[:, :, lo:hi]

    def _compact_and_grow(self, first, T, k_BKTH, v_BKTH):
        B, K, _, H = k_BKTH.shape
        keep_lo = first - self.start
        n_keep = self.offset - first
        capacity = (n_keep + T + self.step - 1) // self.step * self.step
        keys = mx.zeros((B, K, capacity, H), k_BKTH.dtype)
        values = mx.zeros((B, K, capacity, H), v_BKTH.dtype)
        if self.keys is not None and n_keep > 0:
            keys[:, :, :n_keep] = self.keys[:, :, keep_lo:keep_lo + n_keep]
            values[:, :, :n_keep] = self.values[:, :, keep_lo:keep_lo + n_keep]
        self.keys, self.values, self.start = keys, values, first


def attention_mask(T, offset, window):
    """Mask for T queries at positions offset.. over the keys KVCache.update returns.

    A query at position i sees keys i-W+1 .. i (all keys up to i without a window).
    Returns None when every query sees every key; "causal" when the keys are all
    positions up to the last query's, none out of the window (MLX's causal mask takes
    the queries as the last T of the S keys: a prompt, or its continuation after
    earlier tokens); else a boolean (T, S) array.
    """
    start = 0 if window is None else max(0, offset - window + 1)
    if T == 1:
        return None
    if window is None or offset + T <= window:
        return "causal"
    q_T1 = mx.arange(offset, offset + T)[:, None]
    k_1S = mx.arange(start, offset + T)[None]
    return (k_1S <= q_T1) & (k_1S > q_T1 - window)


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
                h_BTD = _checkpointed(layer, h_BTD, mask)
            else:
                h_BTD = layer(h_BTD, mask, None if cache is None else cache[i])
        h_BTD = self.norm(h_BTD)
        if self.args.tie_word_embeddings:
            return embedding_as_output(self.tok_embeddings, h_BTD)  # logits_BTV
        return self.output(h_BTD)  # logits_BTV

    def make_cache(self):
        return [KVCache(self.args.sliding_window) for _ in self.layers]


def embedding_as_output(embedding, h_BTD):
    """h @ E^T: the logits of a model whose output layer is its embedding table."""
    if isinstance(embedding, nn.QuantizedEmbedding):
        return ops.quantized_linear(h_BTD, embedding.weight, embedding.scales, embedding.biases,
                                    embedding.group_size, embedding.bits)
    return ops.linear(h_BTD, embedding.weight)


def _checkpointed(layer, h_BTD, mask):
    """Run a block without keeping its activations; they are recomputed in backward."""

    def run(params, h):
        layer.update(params)
        return layer(h, mask)

    return mx.checkpoint(run)(layer.trainable_parameters(), h_BTD)


def count_parameters(model):
    """(total, trainable) parameter counts; a quantized layer counts its unpacked weights."""
    total = sum(p.size for _, p in tree_flatten(model.parameters()))
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            # Count the weights packed into the uint32 words, not the words, scales and biases.
            unpacked = module.weight.size * 32 // module.bits
            total += unpacked - module.weight.size - module.scales.size - module.biases.size
    trainable = sum(p.size for _, p in tree_flatten(model.trainable_parameters()))
    return total, trainable


# ----------------------------------------------------------------------------- LoRA

# Each adaptable linear of a block and the part of the block it lives in: the one statement of
# which linears are attention's and which the feed-forward's.
TARGET_PARENTS = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
                  "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}
LORA_TARGETS = tuple(TARGET_PARENTS)


def target_path(layer_index, target):
    """Where linear `target` of block `layer_index` lives: layers.N.attention.wq, ..."""
    return f"layers.{layer_index}.{TARGET_PARENTS[target]}.{target}"


def _parent(layer, name):
    return getattr(layer, TARGET_PARENTS[name])


def _linear_dims(linear):
    """(out, in) of a plain or quantized linear layer."""
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits  # packed uint32 columns
    return out_dims, in_dims


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * dropout(x) A B, with the base frozen.

    `base` is an nn.Linear or an nn.QuantizedLinear (QLoRA). B starts at zero, so
    the adapted model equals the base model until training moves it.
    """

    def __init__(self, base, rank=8, alpha=16.0, dropout=0.0):
        super().__init__()
        out_dims, in_dims = _linear_dims(base)
        self.linear = base
        self.dropout = nn.Dropout(dropout)
        self.scale = alpha / rank
        bound = 1.0 / math.sqrt(in_dims)
        # Adapter weights stay float32 whatever the base's dtype: they are what trains.
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    def __call__(self, x):
        y = self.linear(x)
        z = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return y + (self.scale * z).astype(y.dtype)

    def fold(self, w_OI):
        """The base weight `w_OI` (float32) with the adapters folded in."""
        return folded(w_OI, self.lora_a, self.lora_b, self.scale)


class DoRALinear(LoRALinear):
    """DoRA (Liu et al., 2024), as PEFT computes it: the LoRA-updated weight's rows rescaled to a
    trained magnitude, y = m / ||W + s (A B)^T||_row * (x W^T + s x A B). The row norms are a
    constant in backward (the paper's section 4.3); m starts at ||W||_row, so the adapted model
    equals the base model until training moves it. With dropout, as PEFT: the base product of
    the dropped input carries the rescaling, the undropped one stays."""

    def __init__(self, base, rank=8, alpha=16.0, dropout=0.0):
        super().__init__(base, rank, alpha, dropout)
        self.magnitude = row_norms(dense_weight(base))
        self._fixed_rescale_O = None  # private: not a parameter

    def rescale(self):
        """m / ||W + s (A B)^T||_row, the norms a constant in backward: a dense weight a call."""
        norm_O = row_norms(folded(dense_weight(self.linear), self.lora_a, self.lora_b, self.scale))
        return self.magnitude / mx.stop_gradient(norm_O)

    def fix_rescale(self):
        """For generation alone, over a base that cannot be folded (quantized): the rescaling
        computed once, instead of a dense weight for every decoded token."""
        self._fixed_rescale_O = self.rescale()
        mx.eval(self._fixed_rescale_O)

    def __call__(self, x):
        rescale_O = self._fixed_rescale_O if self._fixed_rescale_O is not None else self.rescale()
        rescale_O = rescale_O.astype(x.dtype)
        y = self.linear(x)
        dropped = self.dropout(x)  # x itself when not training
        base = y if dropped is x else self.linear(dropped)
        z = (dropped @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return y + ((rescale_O - 1) * base + rescale_O * (self.scale * z)).astype(y.dtype)

    def fold(self, w_OI):
        return folded(w_OI, self.lora_a, self.lora_b, self.scale, self.magnitude)


def folded(w_OI, a_IR, b_RO, scale, magnitude_O=None):
    """W + scale (A B)^T in float32; with DoRA's magnitude, its rows rescaled to it."""
    w_OI = w_OI.astype(mx.float32) + scale * (a_IR @ b_RO).T
    return w_OI if magnitude_O is None else w_OI * (magnitude_O / row_norms(w_OI))[:, None]


def row_norms(w_OI):
    return mx.sqrt((w_OI.astype(mx.float32) ** 2).sum(axis=1))


def dense_weight(linear):
    """A plain or quantized linear layer's weight [out, in], float32."""
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(linear.weight, linear.scales, linear.biases, linear.group_size, linear.bits)
    return linear.weight.astype(mx.float32)


FINE_TUNE_TYPES = {"lora": LoRALinear, "dora": DoRALinear, "full": None}  # full: the blocks' own weights


def parse_targets(targets):
    """'wq,wv' or 'all' -> tuple of module names; a UserError for unknown names."""
    names = LORA_TARGETS if targets == "all" else tuple(t.strip() for t in targets.split(",") if t.strip())
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown or not names:
        raise UserError(f"--lora-targets: unknown {', '.join(unknown) or 'empty list'}; "
                        f"choose from {', '.join(LORA_TARGETS)} or 'all'")
    return names


def apply_lora(model, lora_layers, targets=("wq", "wv"), rank=8, alpha=16.0, dropout=0.0, fine_tune_type="lora"):
    """Freeze `model` and wrap `targets` of its last `lora_layers` blocks in LoRALinear (or
    DoRALinear for fine_tune_type "dora"); for "full", unfreeze those blocks whole instead
    (every weight of theirs trains: they must be float, not quantized).

    Returns the LoRA configuration (saved beside adapters so they can be restored).
    """
    if rank < 1:
        raise UserError(f"--lora-rank must be at least 1, got {rank}")
    model.freeze()
    n = len(model.layers)
    first = max(0, n - lora_layers)
    config = {"lora_layers": n - first, "targets": list(targets), "rank": rank, "alpha": alpha, "dropout": dropout,
              "fine_tune_type": fine_tune_type}
    if fine_tune_type == "full":
        for i, layer in enumerate(model.layers[first:], start=first):
            if any(isinstance(m, nn.QuantizedLinear) for _, m in layer.named_modules()):
                raise UserError(f"full fine-tuning trains every weight of layer {i}, which is quantized: use a "
                                "float model (convert.py without -q, or fuse.py --de-quantize)")
            layer.unfreeze()
        return config
    smallest = min(min(_linear_dims(getattr(_parent(model.layers[0], name), name))) for name in targets)
    if rank > smallest:
        raise UserError(f"--lora-rank {rank} is more than {smallest}, the smallest dimension of the layers "
                        "to adapt: a larger rank adds nothing")
    for layer in model.layers[first:]:
        for name in targets:
            parent = _parent(layer, name)
            setattr(parent, name, FINE_TUNE_TYPES[fine_tune_type](getattr(parent, name), rank, alpha, dropout))
    return config

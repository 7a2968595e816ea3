"""The building blocks every family's transformer shares: linear layers whose products take the
CPU kernels where those are faster (ops.py), RMSNorm, RoPE's scalings, the KV cache and its
attention mask, and the output read off a tied embedding.

Shapes: B batch, T time (new tokens), S key length, D model dim, K key/value heads,
H head dim, V vocab.
"""

import utils  # noqa: F401  (fast BLAS before mlx.core)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

import ops


class RoPE:
    """How one attention turns its queries and keys: the base, the pairs' layout, the scaling,
    over the first `dims` of each head. Not a parameter: nothing of it trains or is saved."""

    def __init__(self, dims, theta, traditional=True, scaling=None):
        self.dims, self.theta, self.traditional = dims, theta, traditional
        self.periods = rope_periods(dims, theta, scaling)
        self.scale = 1.0 / scaling["factor"] if scaling is not None and scaling["rope_type"] == "linear" else 1.0

    def __call__(self, x_BNTH, offset):
        return ops.rope(x_BNTH, self.theta, offset, self.scale, self.periods, self.traditional, self.dims)


def rope_periods(dims, theta, scaling):
    """RoPE's per-pair wavelength over 2 pi (1 / angular frequency) for llama3 scaling, else None.

    Llama 3.1 stretches the long wavelengths by `factor`, keeps the short ones and
    blends those between (Meta's apply_scaling); computed in float64, once.
    """
    if scaling is None or scaling["rope_type"] != "llama3":
        return None
    inv_freq = theta ** -(np.arange(0, dims, 2, dtype=np.float64) / dims)
    old = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    wavelength = 2 * np.pi / inv_freq
    smooth = np.clip((old / wavelength - low) / (high - low), 0.0, 1.0)
    scaled = np.where(wavelength < old / high, inv_freq,
                      np.where(wavelength > old / low, inv_freq / factor,
                               (1 - smooth) * inv_freq / factor + smooth * inv_freq))
    return mx.array((1.0 / scaled).astype(np.float32))


class Linear(nn.Linear):
    """nn.Linear whose product is ops.linear; quantizes to QuantizedLinear."""

    def __call__(self, x):
        y = ops.linear(x, self.weight)
        return y + self.bias if "bias" in self else y

    def to_quantized(self, group_size=None, bits=None, mode="affine", quantize_input=False):
        if mode != "affine" or quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear (affine) whose product is ops.quantized_linear."""

    def __call__(self, x):
        y = ops.quantized_linear(x, self.weight, self.scales, self.biases, self.group_size, self.bits)
        return y + self.bias if "bias" in self else y


class BlockQuantizedLinear(nn.Module):
    """A linear whose frozen weight stays in a GGUF file's own blocks, uint8 [out, in / values *
    bytes] (ops.BLOCK_TYPES: Q6_K, which no MLX quantization holds exactly); its product is
    ops.block_linear, the dense weight made a layer at a time. Built from a Linear of the same
    shape (loading.py), its blocks loaded after."""

    def __init__(self, input_dims, output_dims, gguf_type, bias=False):
        super().__init__()
        values, nbytes = ops.BLOCK_TYPES[gguf_type]
        self.gguf_type = gguf_type  # not an array: no parameter
        self.blocks = mx.zeros((output_dims, input_dims // values * nbytes), mx.uint8)
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.freeze()

    @classmethod
    def from_linear(cls, linear, gguf_type):
        output_dims, input_dims = linear.weight.shape
        return cls(input_dims, output_dims, gguf_type, "bias" in linear)

    @property
    def shape(self):
        """(out, in) of the dense weight."""
        values, nbytes = ops.BLOCK_TYPES[self.gguf_type]
        return self.blocks.shape[0], self.blocks.shape[1] // nbytes * values

    def unfreeze(self, *args, **kwargs):
        """The blocks stay frozen (as nn.QuantizedLinear's weights): only a bias may train."""
        super().unfreeze(*args, **kwargs)
        self.freeze(recurse=False, keys=["blocks"])
        return self

    def dense_weight(self, dtype=mx.float32):
        return ops.dequantize_blocks(self.blocks, self.gguf_type, dtype)

    def __call__(self, x):
        y = ops.block_linear(x, self.blocks, self.gguf_type)
        return y + self.bias if "bias" in self else y


class RMSNorm(nn.Module):
    def __init__(self, dims, eps):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x):
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Grouped-query attention: wq, wk, wv, wo, biases on the first three where the family has
    them, and an RMSNorm of each query and key head before RoPE where it has those (q_norm,
    k_norm). `scale` multiplies the scores (head_dim^-0.5 unless the family says)."""

    def __init__(self, dim, n_heads, n_kv_heads, head_dim, rope, *, qkv_bias=False, qk_norm_eps=None, scale=None,
                 norm=None):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.rope = rope
        self.wq = Linear(dim, n_heads * head_dim, bias=qkv_bias)
        self.wk = Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.wv = Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.wo = Linear(n_heads * head_dim, dim, bias=False)
        if qk_norm_eps is not None:  # the family's norm class (RMSNorm unless it says)
            self.q_norm = (norm or RMSNorm)(head_dim, qk_norm_eps)
            self.k_norm = (norm or RMSNorm)(head_dim, qk_norm_eps)

    def __call__(self, x_BTD, mask, cache=None):
        B, T, _ = x_BTD.shape
        q_BTD, k_BTD, v_BTD = ops.projections(x_BTD, (self.wq, self.wk, self.wv))
        q_BTNH = q_BTD.reshape(B, T, self.n_heads, -1)
        k_BTKH = k_BTD.reshape(B, T, self.n_kv_heads, -1)
        if "q_norm" in self:
            q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
        q_BNTH, k_BKTH = q_BTNH.transpose(0, 2, 1, 3), k_BTKH.transpose(0, 2, 1, 3)
        v_BKTH = v_BTD.reshape(B, T, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = 0 if cache is None else cache.offset
        q_BNTH, k_BKTH = self.rope(q_BNTH, offset), self.rope(k_BKTH, offset)
        if cache is not None:
            k_BKTH, v_BKTH = cache.update(k_BKTH, v_BKTH)
        o_BNTH = self.attend(q_BNTH, k_BKTH, v_BKTH, mask)
        return self.wo(o_BNTH.transpose(0, 2, 1, 3).reshape(B, T, -1))

    def attend(self, q_BNTH, k_BKSH, v_BKSH, mask):
        return ops.attention(q_BNTH, k_BKSH, v_BKSH, self.scale, mask)


class FeedForward(nn.Module):
    """The gated feed-forward: w2(act(w1 x) * w3 x), SwiGLU (silu) or GeGLU (tanh gelu)."""

    def __init__(self, dim, hidden_dim, activation="silu"):
        super().__init__()
        self.activation = activation
        self.w1 = Linear(dim, hidden_dim, bias=False)
        self.w2 = Linear(hidden_dim, dim, bias=False)
        self.w3 = Linear(dim, hidden_dim, bias=False)

    def __call__(self, x_BTD):
        a_BTC, b_BTC = ops.projections(x_BTD, (self.w1, self.w3))
        if self.activation == "silu":
            return self.w2(ops.swiglu(a_BTC, b_BTC))
        return self.w2(ops.geglu(a_BTC, b_BTC))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then h + feed_forward(norm(h))."""

    def __init__(self, attention, feed_forward, attention_norm, ffn_norm):
        super().__init__()
        self.attention, self.feed_forward = attention, feed_forward
        self.attention_norm, self.ffn_norm = attention_norm, ffn_norm

    def __call__(self, x_BTD, mask, cache=None):
        h_BTD = x_BTD + self.attention(self.attention_norm(x_BTD), mask, cache)
        return h_BTD + self.feed_forward(self.ffn_norm(h_BTD))


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
    earlier tokens); else ops.Window(W): causal, within the last W keys.
    """
    if T == 1:
        return None
    if window is None or offset + T <= window:
        return "causal"
    return ops.Window(window)


class Decoder(nn.Module):
    """A decoder-only transformer: token embeddings, `blocks`, a final `norm`, and an output layer
    or the embedding read back (tie_word_embeddings). A family's Model builds its blocks and
    passes them; `window(i)` is block i's attention window (None: every earlier token)."""

    def __init__(self, args, blocks, norm):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = blocks
        self.norm = norm
        if not args.tie_word_embeddings:
            self.output = Linear(args.dim, args.vocab_size, bias=False)
        self.grad_checkpoint = False

    def window(self, index):
        return self.args.sliding_window

    def embed(self, tokens_BT, offset=0):
        """The tokens' vectors; `offset`, the position of the first (GPT-2 embeds positions too)."""
        return self.tok_embeddings(tokens_BT)

    def __call__(self, tokens_BT, cache=None):
        offset = 0 if cache is None else cache[0].offset
        masks = self.masks(tokens_BT.shape[1], offset)
        h_BTD = self.embed(tokens_BT, offset)
        for i, layer in enumerate(self.layers):
            h_BTD = self.run_block(i, layer, h_BTD, masks, cache)
        return self.logits(self.norm(h_BTD))

    def masks(self, T, offset):
        """{window: attention_mask} for T new tokens at `offset`, one per distinct window."""
        return {w: attention_mask(T, offset, w) for w in {self.window(i) for i in range(len(self.layers))}}

    def run_block(self, index, layer, h_BTD, masks, cache=None):
        mask = masks[self.window(index)]
        if self.grad_checkpoint and cache is None:
            return checkpointed(layer, h_BTD, mask)
        return layer(h_BTD, mask, None if cache is None else cache[index])

    def logits(self, h_BTD):
        if self.args.tie_word_embeddings:
            return self.final_logits(embedding_as_output(self.tok_embeddings, h_BTD))  # logits_BTV
        return self.final_logits(self.output(h_BTD))  # logits_BTV

    def final_logits(self, logits_BTV):
        """What the family does to the output layer's products (Gemma 2 soft-caps them)."""
        return logits_BTV

    def make_cache(self):
        return [KVCache(self.window(i)) for i in range(len(self.layers))]


def embedding_as_output(embedding, h_BTD):
    """h @ E^T: the logits of a model whose output layer is its embedding table."""
    if isinstance(embedding, nn.QuantizedEmbedding):
        return ops.quantized_linear(h_BTD, embedding.weight, embedding.scales, embedding.biases,
                                    embedding.group_size, embedding.bits)
    return ops.linear(h_BTD, embedding.weight)


def checkpointed(layer, h_BTD, mask):
    """Run a block without keeping its activations; they are recomputed in backward."""

    def run(params, h):
        layer.update(params)
        return layer(h, mask)

    return mx.checkpoint(run)(layer.trainable_parameters(), h_BTD)


def count_parameters(model):
    """(total, trainable) parameter counts; a quantized layer counts its unpacked weights (GGUF
    blocks their values, not their bytes)."""
    total = sum(p.size for _, p in tree_flatten(model.parameters()))
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            # Count the weights packed into the uint32 words, not the words, scales and biases.
            unpacked = module.weight.size * 32 // module.bits
            total += unpacked - module.weight.size - module.scales.size - module.biases.size
        elif isinstance(module, BlockQuantizedLinear):
            total += module.shape[0] * module.shape[1] - module.blocks.size
    trainable = sum(p.size for _, p in tree_flatten(model.trainable_parameters()))
    return total, trainable


def rope_dims(config):
    """How many of each head's dims RoPE turns (of a config dict): the first partial_rotary_factor
    of them where the config says (Phi-3's 0.75), else all; transformers rounds down the same way."""
    return int(config["head_dim"] * (config.get("partial_rotary_factor") or 1.0))

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
    """(total, trainable) parameter counts; a quantized layer counts its unpacked weights."""
    total = sum(p.size for _, p in tree_flatten(model.parameters()))
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            # Count the weights packed into the uint32 words, not the words, scales and biases.
            unpacked = module.weight.size * 32 // module.bits
            total += unpacked - module.weight.size - module.scales.size - module.biases.size
    trainable = sum(p.size for _, p in tree_flatten(model.trainable_parameters()))
    return total, trainable

"""LLaMA / Mistral transformer in MLX, LoRA layers, and the one model loader.

Module and parameter names are those of Meta's and Mistral's checkpoints
(`tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1`, ...), so the
weights written by convert.py load with no renaming table.

Shapes: B batch, T time (new tokens), S key length, D model dim, N query
heads, K key/value heads, H head dim, C hidden (feed-forward) dim, V vocab.
"""

import functools
import math
import os
from dataclasses import MISSING, dataclass, fields
from typing import Optional

import utils  # noqa: F401  (fast BLAS before mlx.core)
from utils import UserError, read_json

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten


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

    @classmethod
    def from_config(cls, config, source="config.json"):
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in config]
        if missing:
            raise UserError(f"{source}: missing key(s) {', '.join(missing)}")
        args = cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})
        if args.n_heads % args.n_kv_heads:
            raise UserError(f"{source}: n_heads {args.n_heads} is not a multiple of n_kv_heads {args.n_kv_heads}")
        return args


def _reuse_freed_buffers():
    """On the CPU, MLX keeps only 32 MiB of freed buffers for reuse; bigger ones go back
    to the OS, and the next is faulted in and zeroed 4 KiB at a time (6 % of a LoRA
    step of the medium model). Keep up to a quarter of the memory limit (its Metal
    backend keeps up to all of it): in-process A/B, LoRA steps of the medium model
    about 3 % faster and steadier; prompts unchanged within noise."""
    if mx.default_device() == mx.cpu:
        mx.set_cache_limit(mx.get_memory_limit() // 4)


_reuse_freed_buffers()


# ----------------------------------------------------------------------------- linear layers

def _load_cpu_kernels():
    """The compiled CPU kernels (cpu_kernels/, built by setup.sh), or None.

    MLX_LORA_CPU_KERNELS=0 turns them off, to compare against plain MLX.
    """
    if os.environ.get("MLX_LORA_CPU_KERNELS", "1") == "0":
        return None
    try:
        import _cpu_kernels
    except ImportError:  # not built (or built for another MLX): plain MLX ops
        return None
    return _cpu_kernels


cpu_kernels = _load_cpu_kernels()
MATVEC_ROWS = 16  # up to this many rows of x (decoding): each weight read once, the decoding kernels


def _cpu_kernels_run():
    return cpu_kernels is not None and mx.default_device() == mx.cpu


def _cpu_kernel_applies(x, *float_arrays):
    return _cpu_kernels_run() and all(a.dtype == mx.float32 for a in (x, *float_arrays))


def _rows(x):
    return x.size // x.shape[-1]


def _few_rows_on_cpu(x, *float_arrays):
    return _rows(x) <= MATVEC_ROWS and _cpu_kernel_applies(x, *float_arrays)


def _matvec_applies(x, weights):
    """A few rows of float32 x against float32 weights, or float16 ones (a float16 model
    generating on the CPU keeps its weights as stored: half the bytes a token)."""
    return (_few_rows_on_cpu(x) and weights[0].dtype in (mx.float32, mx.float16)
            and all(w.dtype == weights[0].dtype for w in weights))


class Linear(nn.Linear):
    """nn.Linear whose few-row products on the CPU stream the weight once.

    MLX runs x @ W.T with one row of x as a BLAS GEMM that repacks all of W;
    decoding is bound by exactly that read. A float16 W (kept for generation, see
    set_compute_dtype) is read as it is, or widened on every thread for a prompt.
    """

    def __call__(self, x):
        if "bias" not in self and _matvec_applies(x, [self.weight]):
            return cpu_kernels.matvec(x, self.weight)
        if "bias" not in self and self.weight.dtype == mx.float16 and _cpu_kernel_applies(x):
            return _widened_matmul(x, self.weight)  # many rows: a prompt
        return super().__call__(x)

    def to_quantized(self, group_size=None, bits=None, mode="affine", quantize_input=False):
        if mode != "affine" or quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear with CPU paths: a fused quantized matvec for a few rows,
    and for many rows (training, prompts) dequantization into the fast float32 BLAS.

    MLX's own CPU quantized matmul is a single-threaded scalar loop (about 2 GFLOP/s).
    """

    def __call__(self, x):
        # Only affine layers get here: Linear.to_quantized hands other modes to MLX's class.
        if self.bits not in (2, 4, 8) or "bias" in self or not _cpu_kernel_applies(x, self.scales, self.biases):
            return super().__call__(x)
        if _rows(x) <= MATVEC_ROWS:
            return cpu_kernels.quantized_matvec(x, self.weight, self.scales, self.biases,
                                                self.group_size, self.bits)
        return _dequantized_matmul(self.group_size, self.bits)(x, self.weight, self.scales, self.biases)


def projections(x, layers):
    """[layer(x) for layer in layers]. On the CPU's decoding path plain layers take one
    pass over all their weights: one start of the threads, not one each."""
    weights = [layer.weight for layer in layers if type(layer) is Linear and "bias" not in layer]
    if len(weights) == len(layers) and _matvec_applies(x, weights):
        return cpu_kernels.matvecs(x, weights)
    return [layer(x) for layer in layers]


def cross_entropy(logits, targets):
    """Cross-entropy along the last axis; on the CPU one fused multi-threaded kernel
    (MLX's exp alone made the loss over a 32000-word vocabulary a fifth of a step)."""
    if _cpu_kernel_applies(logits):
        return cpu_kernels.cross_entropy(logits, targets)
    return nn.losses.cross_entropy(logits, targets)


def swiglu(a, b):
    """silu(a) * b, LLaMA's gated feed-forward; on the CPU one fused kernel each way."""
    if _cpu_kernel_applies(a, b):
        return cpu_kernels.swiglu(a, b)
    return nn.silu(a) * b


def _frozen_matmul(dense):
    """x @ dense(*stored).T whose backward calls `dense` again instead of keeping the
    float32 weight alive from forward to backward, so that a quantized or float16
    base keeps its memory saving. The stored arrays are a frozen base (LoRA's): they
    take no gradient.

    Each dense weight is made to depend on the activation it multiplies: otherwise,
    depending on leaves alone, MLX may compute them all first and hold every layer
    dense at once (a QLoRA step of the medium model at batch 1 x 32 peaked at 0.61 GB
    for 0.10 GB of weights)."""

    def dense_after(activation, stored):
        return dense(*mx.depends(list(stored), [activation]))

    @mx.custom_function
    def matmul(x, *stored):
        return x @ dense_after(x, stored).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, *stored = primals
        return (cotangent @ dense_after(cotangent, stored), *map(mx.zeros_like, stored))

    return matmul


@functools.lru_cache(maxsize=None)
def _dequantized_matmul(group_size, bits):
    return _frozen_matmul(lambda w, scales, biases: cpu_kernels.dequantize(w, scales, biases, group_size, bits))


_widened_matmul = _frozen_matmul(lambda w: cpu_kernels.to_float32(w))


# ----------------------------------------------------------------------------- decoding kernels
# On the CPU, mx.fast's norm, RoPE and attention are compositions of many small MLX
# operations; for the few rows of decoding the compiled kernels do each in one pass.

def rms_norm(x, weight, eps):
    if _few_rows_on_cpu(x, weight):
        return cpu_kernels.rms_norm(x, weight, eps)
    return mx.fast.rms_norm(x, weight, eps)


def rope(x_BNTH, theta, offset):
    """Meta's RoPE, which rotates interleaved pairs (x0, x1), (x2, x3), ...: "traditional" in MLX."""
    if x_BNTH.shape[2] <= MATVEC_ROWS and _cpu_kernel_applies(x_BNTH):
        return cpu_kernels.rope(x_BNTH, x_BNTH.shape[-1], True, theta, 1.0, offset)
    return mx.fast.rope(x_BNTH, x_BNTH.shape[-1], traditional=True, base=theta, scale=1.0, offset=offset)


def attention(q_BNTH, k_BKSH, v_BKSH, scale, mask):
    """softmax(scale * q k^T + mask) v; grouped-query attention (K < N) included."""
    if _cpu_kernel_applies(q_BNTH, k_BKSH, v_BKSH):
        if mask is None and q_BNTH.shape[2] <= MATVEC_ROWS:
            return cpu_kernels.attention(q_BNTH, k_BKSH, v_BKSH, scale)
        if isinstance(mask, str) and mask == "causal":
            return _causal_attention(q_BNTH, k_BKSH, v_BKSH, scale)
    return mx.fast.scaled_dot_product_attention(q_BNTH, k_BKSH, v_BKSH, scale=scale, mask=mask)


def _causal_attention(q_BNTH, k_BKSH, v_BKSH, scale):
    """Causal attention of many queries (training, prompts): both products in BLAS,
    the masked softmax one multi-threaded kernel each way."""
    B, N, T, H = q_BNTH.shape
    K, S = k_BKSH.shape[1:3]
    q_BKQH = q_BNTH.reshape(B, K, -1, H)  # Q = N // K * T: the query heads of one KV head, stacked
    s_BKQS = q_BKQH @ k_BKSH.swapaxes(-1, -2)
    p_BKQS = cpu_kernels.causal_softmax(s_BKQS.reshape(B, K, N // K, T, S), scale).reshape(B, K, -1, S)
    return (p_BKQS @ v_BKSH).reshape(B, N, T, H)


class RMSNorm(nn.Module):
    def __init__(self, dims, eps):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.weight, self.eps)


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
    allowed_TS = k_1S <= q_T1
    if window is not None:
        allowed_TS = allowed_TS & (k_1S > q_T1 - window)
    return allowed_TS


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        self.scale = args.head_dim ** -0.5
        self.rope_theta = args.rope_theta
        self.wq = Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def __call__(self, x_BTD, mask, cache=None):
        B, T, _ = x_BTD.shape
        q_BTD, k_BTD, v_BTD = projections(x_BTD, (self.wq, self.wk, self.wv))
        q_BNTH = q_BTD.reshape(B, T, self.n_heads, -1).transpose(0, 2, 1, 3)
        k_BKTH = k_BTD.reshape(B, T, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v_BKTH = v_BTD.reshape(B, T, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = 0 if cache is None else cache.offset
        q_BNTH = rope(q_BNTH, self.rope_theta, offset)
        k_BKTH = rope(k_BKTH, self.rope_theta, offset)
        if cache is not None:
            k_BKTH, v_BKTH = cache.update(k_BKTH, v_BKTH)
        o_BNTH = attention(q_BNTH, k_BKTH, v_BKTH, self.scale, mask)
        return self.wo(o_BNTH.transpose(0, 2, 1, 3).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = Linear(args.dim, args.hidden_dim, bias=False)

    def __call__(self, x_BTD):
        return self.w2(swiglu(*projections(x_BTD, (self.w1, self.w3))))


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
        return self.output(self.norm(h_BTD))  # logits_BTV

    def make_cache(self):
        return [KVCache(self.args.sliding_window) for _ in self.layers]


def _checkpointed(layer, h_BTD, mask):
    """Run a block without keeping its activations; they are recomputed in backward."""

    def run(params, h):
        layer.update(params)
        return layer(h, mask)

    return mx.checkpoint(run)(layer.trainable_parameters(), h_BTD)


# ----------------------------------------------------------------------------- LoRA

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * dropout(x) A B, with the base frozen.

    `base` is an nn.Linear or an nn.QuantizedLinear (QLoRA). B starts at zero, so
    the adapted model equals the base model until training moves it.
    """

    def __init__(self, base, rank=8, alpha=16.0, dropout=0.0):
        super().__init__()
        out_dims, in_dims = base.weight.shape
        if isinstance(base, nn.QuantizedLinear):
            in_dims = in_dims * 32 // base.bits  # packed uint32 columns
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


def parse_targets(targets):
    """'wq,wv' or 'all' -> tuple of module names; a UserError for unknown names."""
    names = LORA_TARGETS if targets == "all" else tuple(t.strip() for t in targets.split(",") if t.strip())
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown or not names:
        raise UserError(f"--lora-targets: unknown {', '.join(unknown) or 'empty list'}; "
                        f"choose from {', '.join(LORA_TARGETS)} or 'all'")
    return names


def apply_lora(model, lora_layers, targets=("wq", "wv"), rank=8, alpha=16.0, dropout=0.0):
    """Freeze `model` and wrap `targets` of its last `lora_layers` blocks in LoRALinear.

    Returns the LoRA configuration (saved beside adapters so they can be restored).
    """
    if rank < 1:
        raise UserError(f"--lora-rank must be at least 1, got {rank}")
    model.freeze()
    n = len(model.layers)
    first = max(0, n - lora_layers)
    for layer in model.layers[first:]:
        for name in targets:
            parent = layer.attention if name in ("wq", "wk", "wv", "wo") else layer.feed_forward
            setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout))
    return {"lora_layers": n - first, "targets": list(targets), "rank": rank,
            "alpha": alpha, "dropout": dropout}


def lora_config_path(adapter_file):
    """Where the LoRA configuration of `adapter_file` lives: same name, `.json`."""
    return os.path.splitext(adapter_file)[0] + ".json"


def save_adapters(model, adapter_file, lora_config):
    """Write the adapter weights and, beside them, their configuration; both atomically."""
    arrays = dict(tree_flatten(model.trainable_parameters()))
    bad = [k for k, v in arrays.items() if not mx.isfinite(v).all().item()]
    if bad:
        raise UserError(f"{adapter_file}: not written, adapter {bad[0]} has non-finite values")
    utils.write_json(lora_config_path(adapter_file), lora_config)
    utils.atomic_save_arrays(adapter_file, arrays)


def load_adapters(model, adapter_file):
    """Wrap `model` as the adapter configuration says and load the adapter weights.

    Adapters that do not fit the model (other dims, layers or rank) are a UserError.
    """
    config = read_json(lora_config_path(adapter_file), "adapter configuration")
    try:
        lora = apply_lora(model, int(config["lora_layers"]), tuple(config["targets"]),
                          int(config["rank"]), float(config["alpha"]), 0.0)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{lora_config_path(adapter_file)}: bad adapter configuration ({e!r})")
    load_adapter_weights(model, adapter_file)
    return lora


def merge_adapters(model):
    """Fold every LoRA layer over a plain float base into that base: W + scale (A B)^T.

    For generation alone: a decoded token then runs one product a layer instead of
    three and nine graph nodes (the shipped model with its adapters on every layer:
    158 -> 400-560 tokens/s). The sum is kept in float32, the adapters' dtype, where
    the activations are float32 (the CPU), else in the base's dtype. Quantized bases
    keep their adapters: folding would requantize them.
    """
    folded = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and type(module.linear) is Linear and "bias" not in module.linear:
            base = module.linear
            delta_OI = module.scale * (module.lora_a @ module.lora_b).T
            dtype = mx.float32 if _cpu_kernels_run() else base.weight.dtype
            base.weight = (base.weight.astype(mx.float32) + delta_OI).astype(dtype)
            folded.append((name, base))
    model.update_modules(tree_unflatten(folded))


def load_adapter_weights(model, adapter_file):
    """Load saved adapter weights into a model already wrapped with LoRA layers of that shape."""
    weights = load_arrays(adapter_file, "adapter file")
    check_fit(adapter_file, weights, dict(tree_flatten(model.trainable_parameters())), "adapters")
    model.update(tree_unflatten(list(weights.items())))


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


def check_fit(path, weights, expected, what):
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        detail = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        n = len(missing) + len(extra)
        raise UserError(f"{path}: {what} do not fit this model ({detail}{f' and {n - 1} more' if n > 1 else ''})")
    for key, value in expected.items():
        if weights[key].shape != value.shape:
            raise UserError(f"{path}: {what} do not fit this model ({key} has shape "
                            f"{tuple(weights[key].shape)}, the model expects {tuple(value.shape)})")


def load_arrays(path, what="weights"):
    """mx.load a .npz or .safetensors file, with user-facing errors (no pickles involved)."""
    if not os.path.exists(path):
        raise UserError(f"{path}: {what} not found")
    try:
        arrays = mx.load(path)
    except Exception as e:  # MLX raises RuntimeError/ValueError for corrupt archives
        raise UserError(f"{path}: cannot read {what} ({e})")
    if not isinstance(arrays, dict):
        raise UserError(f"{path}: expected named arrays in {what}")
    return arrays


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """SentencePiece tokenizer with LLaMA's conventions (BOS/EOS ids from the model)."""

    def __init__(self, model_path):
        import sentencepiece as spm

        if not os.path.exists(model_path):
            raise UserError(f"{model_path}: tokenizer not found")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_path)
        except Exception as e:
            raise UserError(f"{model_path}: not a SentencePiece model ({e})")
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        self.vocab_size = self._sp.vocab_size()

    def encode(self, text, bos=True, eos=False):
        return ([self.bos_id] if bos else []) + self._sp.encode(text) + ([self.eos_id] if eos else [])

    def decode(self, ids):
        return self._sp.decode(list(ids))


# ----------------------------------------------------------------------------- loading

def default_compute_dtype():
    """float32 on the CPU (its float16 matmul is slow and unstable), the stored dtype elsewhere."""
    return mx.float32 if mx.default_device().type == mx.DeviceType.cpu else None


def cast_floats(model, dtype, keep_float16_weights=False):
    """Cast the model's floating parameters (not packed quantized weights) to `dtype`;
    with keep_float16_weights, float16 weights of plain linear layers stay as they are."""
    kept = {f"{name}.weight" for name, module in model.named_modules()
            if keep_float16_weights and type(module) is Linear and module.weight.dtype == mx.float16}
    model.update(tree_unflatten([(k, p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) and k not in kept else p)
                                 for k, p in tree_flatten(model.parameters())]))


def set_compute_dtype(model, compute_dtype="auto", generation_only=False):
    """Cast the model's floats for computation in `compute_dtype`: "auto" (float32 on
    the CPU, the stored dtype on a GPU) or a dtype name.

    With `generation_only`, on the CPU with the kernels, the float16 weights of linear
    layers stay float16 under float32 computation: decoding reads half the bytes and
    the model takes about half the memory. (Training and evaluation, whose products
    all go through BLAS, would convert them at every step.)
    """
    dtype = default_compute_dtype() if compute_dtype == "auto" else getattr(mx, compute_dtype)
    if dtype is not None:
        cast_floats(model, dtype, generation_only and dtype == mx.float32 and _cpu_kernels_run())


def weights_file(path):
    for name in ("weights.safetensors", "weights.npz"):
        if os.path.exists(os.path.join(path, name)):
            return os.path.join(path, name)
    raise UserError(f"{path}: no weights.npz or weights.safetensors (convert a checkpoint with convert.py)")


def load_model(path, adapter_file=None, compute_dtype="auto", generation_only=False):
    """Load a converted model folder: (model, tokenizer, config).

    `compute_dtype` and `generation_only`: see set_compute_dtype. With
    `adapter_file`, its LoRA adapters are applied (and merged, for generation alone:
    see merge_adapters).
    """
    if not os.path.isdir(path):
        raise UserError(f"{path}: model folder not found")
    config_path = os.path.join(path, "config.json")
    config = read_json(config_path, "model configuration")
    args = ModelArgs.from_config(config, config_path)
    model = Model(args)
    weights_path = weights_file(path)
    weights = load_arrays(weights_path)
    quantization = config.get("quantization")
    if quantization:
        nn.quantize(model, quantization["group_size"], quantization["bits"],
                    class_predicate=lambda name, module: f"{name}.scales" in weights)
    check_fit(weights_path, weights, dict(tree_flatten(model.parameters())), "weights")
    model.update(tree_unflatten(list(weights.items())))
    set_compute_dtype(model, compute_dtype, generation_only)
    tokenizer = Tokenizer(os.path.join(path, "tokenizer.model"))
    if tokenizer.vocab_size > args.vocab_size:
        raise UserError(f"{path}: tokenizer has {tokenizer.vocab_size} pieces, the model only {args.vocab_size}")
    if adapter_file is not None:
        load_adapters(model, adapter_file)
        if generation_only:
            merge_adapters(model)
    mx.eval(model.parameters())
    return model, tokenizer, config

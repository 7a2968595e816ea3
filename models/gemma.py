"""Gemma: embeddings scaled by sqrt(dim), RMSNorm as x * (1 + w) in float32, GeGLU (tanh GELU),
RoPE on halves, tied output. Gemma 2 and 3 (gemma2.py, gemma3.py) build on its pieces: the norm,
the name table, the soft-capped attention and the four-norm block.
"""

import dataclasses
from dataclasses import dataclass
from typing import Optional

import utils  # noqa: F401  (fast BLAS before mlx.core)
from utils import UserError

import mlx.core as mx
import mlx.nn as nn

import ops
from models import llama
from models.layers import Attention, Decoder, FeedForward, RoPE, TransformerBlock
from models.table import NameTable, Weight

MODEL_TYPES = ("gemma",)
GGUF_ARCH = "gemma"
HF_CLASSES = {"gemma": "GemmaForCausalLM"}
HF_CONSTANTS = {"attention_bias": False}
GELU_TANH = ("gelu_pytorch_tanh", "gelu")  # Gemma's first configs said "gelu" and meant the tanh one


def table(post_norms=False, qk_norm=False):
    """LLaMA's names on halves' RoPE rows; the norms GGUF holds as 1 + w. With post_norms (Gemma 2
    and 3), norms after attention and the feed-forward too, and Hugging Face's post_attention_layernorm
    is the one after attention, pre_feedforward_layernorm the feed-forward's input norm."""
    base = llama.table(meta_rows=False, qk_norm=qk_norm)

    def dim(c):
        return (c["dim"],)

    def shifted(w):
        return dataclasses.replace(w, gguf_plus=1.0) if w.ours.endswith("norm") else w

    block = [shifted(w) for w in base.block if not (post_norms and w.ours == "ffn_norm")]
    if post_norms:
        block += [Weight("post_attention_norm", "post_attention_layernorm", "post_attention_norm", dim, gguf_plus=1.0),
                  Weight("ffn_norm", "pre_feedforward_layernorm", "ffn_norm", dim, gguf_plus=1.0),
                  Weight("post_ffn_norm", "post_feedforward_layernorm", "post_ffw_norm", dim, gguf_plus=1.0)]
    return NameTable([shifted(w) for w in base.top], block)


NAMES = table()


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "gemma"
    query_pre_attn_scalar: Optional[float] = None  # the scores' scale is its -1/2 (head_dim's when None)
    attn_logit_softcapping: Optional[float] = None  # scores become cap * tanh(scores / cap)
    final_logit_softcapping: Optional[float] = None  # logits likewise
    sliding_window_pattern: Optional[int] = None  # every Nth block attends to everything, the others to a window
    rope_local_base_freq: Optional[float] = None  # the windowed blocks' RoPE base (Gemma 3)


CONFIG_KEYS = {"query_pre_attn_scalar": (float, 1.0, 1e6), "attn_logit_softcapping": (float, 1e-3, 1e6),
               "final_logit_softcapping": (float, 1e-3, 1e6), "sliding_window_pattern": (int, 1, 2**10),
               "rope_local_base_freq": (float, 1.0, 1e12)}


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + w), in float32, then the input's type. Hugging Face stores w."""

    def __init__(self, dims, eps):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x):
        return ops.rms_norm(x.astype(mx.float32), 1.0 + self.weight.astype(mx.float32), self.eps).astype(x.dtype)


class SoftCappedAttention(Attention):
    """Attention whose scores are soft-capped, cap * tanh(scores / cap), before the mask (Gemma 2):
    computed here, since the fused kernels have no cap."""

    def __init__(self, *args, softcap, **kwargs):
        super().__init__(*args, **kwargs)
        self.softcap = softcap

    def attend(self, q_BNTH, k_BKSH, v_BKSH, mask):
        return ops.softcapped_attention(q_BNTH, k_BKSH, v_BKSH, self.scale, self.softcap, mask)


class PostNormBlock(nn.Module):
    """Gemma 2 and 3's block: norms before and after attention and the feed-forward,
    h = x + post_attention_norm(attention(attention_norm(x))), then likewise for the feed-forward."""

    def __init__(self, attention, feed_forward, dim, eps):
        super().__init__()
        self.attention, self.feed_forward = attention, feed_forward
        self.attention_norm, self.post_attention_norm = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.ffn_norm, self.post_ffn_norm = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def __call__(self, x_BTD, mask, cache=None):
        h_BTD = x_BTD + self.post_attention_norm(self.attention(self.attention_norm(x_BTD), mask, cache))
        return h_BTD + self.post_ffn_norm(self.feed_forward(self.ffn_norm(h_BTD)))


def windowed(pattern, index):
    """Whether block `index` attends within the window: all but every `pattern`-th (none without one)."""
    return bool(pattern) and (index + 1) % pattern != 0


def attention(args, theta, *, scaled, qk_norm=False):
    """A Gemma attention: RoPE on halves with base `theta` and, where `scaled` (the global blocks),
    the config's RoPE scaling; scores scaled by query_pre_attn_scalar^-1/2, soft-capped where the
    config says."""
    rope = RoPE(args.head_dim, theta, traditional=False, scaling=args.rope_scaling if scaled else None)
    scale = (args.query_pre_attn_scalar or args.head_dim) ** -0.5
    kwargs = dict(scale=scale, qk_norm_eps=args.norm_eps if qk_norm else None, norm=RMSNorm)
    if args.attn_logit_softcapping:
        return SoftCappedAttention(args.dim, args.n_heads, args.n_kv_heads, args.head_dim, rope,
                                   softcap=args.attn_logit_softcapping, **kwargs)
    return Attention(args.dim, args.n_heads, args.n_kv_heads, args.head_dim, rope, **kwargs)


class GemmaDecoder(Decoder):
    """Embeddings scaled by sqrt(dim) (rounded to the weights' type, as transformers does), windows
    by the config's pattern, the final logits soft-capped where it says."""

    def embed(self, tokens_BT, offset=0):
        h_BTD = self.tok_embeddings(tokens_BT)
        return h_BTD * mx.array(self.args.dim ** 0.5, dtype=h_BTD.dtype)

    def window(self, index):
        return self.args.sliding_window if windowed(self.args.sliding_window_pattern, index) else None

    def final_logits(self, logits_BTV):
        cap = self.args.final_logit_softcapping
        return logits_BTV if not cap else ops.soft_cap(logits_BTV, cap)


class Model(GemmaDecoder):
    names = NAMES

    def __init__(self, args):
        blocks = [TransformerBlock(attention(args, args.rope_theta, scaled=True), FeedForward(args.dim, args.hidden_dim, "gelu_tanh"),
                                   RMSNorm(args.dim, args.norm_eps), RMSNorm(args.dim, args.norm_eps))
                  for _ in range(args.n_layers)]
        super().__init__(args, blocks, RMSNorm(args.dim, args.norm_eps))


def check_activation(hf, path):
    """Gemma's feed-forward is GeGLU with tanh GELU: another activation would be another model."""
    act = hf.get("hidden_activation") or hf.get("hidden_act") or GELU_TANH[0]
    if act not in GELU_TANH:
        raise UserError(f"{path}: 'hidden_activation' {str(act)[:100]!r}: a Gemma model here has gelu_pytorch_tanh")


def from_hf(hf, path):
    check_activation(hf, path)
    return {}


def to_hf(config):
    return {"hidden_act": GELU_TANH[0], "hidden_activation": GELU_TANH[0]}


def llama_cpp_scalar(n_layers, dim, n_heads, head_dim, big_layers):
    """The query_pre_attn_scalar llama.cpp computes with for Gemma 2 and 3, whose GGUF files do not
    store it: dim / heads for the 27B models (`big_layers` blocks), the head size otherwise."""
    return dim / n_heads if n_layers == big_layers else head_dim


def head_dim_of(meta, arch):
    return meta.get(f"{arch}.attention.key_length") or meta[f"{arch}.embedding_length"] // meta[
        f"{arch}.attention.head_count"]


def check_gguf_writable(config, pattern, big_layers, local_base=None):
    """What llama.cpp assumes of a Gemma 2 or 3 GGUF file (its window pattern, its local RoPE base,
    its query scale) must hold, or the file would compute another model: refused in one line."""
    scalar = llama_cpp_scalar(config["n_layers"], config["dim"], config["n_heads"], config["head_dim"], big_layers)
    problems = [(key, have, want) for key, have, want in (
        ("sliding_window_pattern", config.get("sliding_window_pattern"), pattern),
        ("query_pre_attn_scalar", config.get("query_pre_attn_scalar"), scalar),
        ("rope_local_base_freq", config.get("rope_local_base_freq"), local_base)) if have != want]
    for key, have, want in problems:
        raise UserError(f"a GGUF file cannot hold {key} {have}: llama.cpp computes {config['model_type']} models "
                        f"with {want}")


def llama_cpp_config(meta, arch, big_layers):
    """The keys of llama.cpp's Gemma 2 and 3 files both read: the window, the final soft cap, and
    the query scale it derives."""
    return {"sliding_window": meta.get(f"{arch}.attention.sliding_window"),
            "final_logit_softcapping": meta.get(f"{arch}.final_logit_softcapping"),
            "query_pre_attn_scalar": llama_cpp_scalar(meta[f"{arch}.block_count"], meta[f"{arch}.embedding_length"],
                                                      meta[f"{arch}.attention.head_count"], head_dim_of(meta, arch),
                                                      big_layers)}

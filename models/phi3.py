"""Phi-3, Phi-3.5 and Phi-4-mini: LLaMA's block with the query, key and value projections one linear
(qkv_proj: our attention.wqkv) and the gate and up projections another (gate_up_proj:
feed_forward.w13), kept fused so that a LoRA on either is the one PEFT trains; RoPE on halves over
the first partial_rotary_factor of each head, LongRoPE's per-pair factors, and the sliding window
the config gives (transformers masks with it).

Shapes: B batch, T time (new tokens), D model dim, N query heads, H head dim, C hidden dim.
"""

from dataclasses import dataclass

import utils  # noqa: F401  (fast BLAS before mlx.core)

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import ops
from models import llama
from models.fused import FusedAttention, qkv_rows
from models.layers import Decoder, Linear, RMSNorm, RoPE, TransformerBlock, rope_dims
from models.table import NameTable, Weight

MODEL_TYPES = ("phi3",)
GGUF_ARCH = "phi3"  # general.architecture in GGUF files (llama.cpp's)
HF_CLASSES = {"phi3": "Phi3ForCausalLM"}
HF_CONSTANTS = {"hidden_act": "silu"}
CONFIG_KEYS = {"partial_rotary_factor": (float, 1e-3, 1.0)}
# LongRoPE (transformers' longrope): a factor per turned pair for texts within the original
# context, one for longer texts, and the scale of the turned dims. (key, type, lowest, highest)
ROPE_SCALINGS = {"longrope": [("short_factor", list, 1e-6, 1e6), ("long_factor", list, 1e-6, 1e6),
                              ("original_max_position_embeddings", int, 1, 2**31),
                              ("attention_factor", float, 1e-6, 1e6)]}
# LongRoPE's factors in GGUF files: tensors, as llama.cpp's converter writes them (read as metadata)
GGUF_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")

# LLaMA's embedding, final norm, output and block norms, Hugging Face's row order (RoPE on halves)
NAMES = NameTable(llama.NAMES.top, [
    Weight("attention.wqkv", "self_attn.qkv_proj", "attn_qkv",
           lambda c: (qkv_rows(c["n_heads"], c["n_kv_heads"], c["head_dim"]), c["dim"])),
    Weight("attention.wo", "self_attn.o_proj", "attn_output", lambda c: (c["dim"], c["n_heads"] * c["head_dim"])),
    Weight("feed_forward.w13", "mlp.gate_up_proj", "ffn_up", lambda c: (2 * c["hidden_dim"], c["dim"])),
    Weight("feed_forward.w2", "mlp.down_proj", "ffn_down", lambda c: (c["dim"], c["hidden_dim"])),
    *(w for w in llama.NAMES.block if not w.linear and not w.norm)])


@dataclass
class ModelArgs(llama.ModelArgs):
    partial_rotary_factor: float = 1.0  # RoPE turns this much of each head (Phi-4-mini: 0.75)
    model_type: str = "phi3"


class LongRoPE:
    """LongRoPE as transformers computes it: RoPE on halves over the first `dims` of each head, pair
    i's period theta^(2i/dims) times short_factor[i] while the text fits the original context and
    long_factor[i] once it does not (for every position of the call: transformers picks the set by
    its last position; keys cached before keep theirs), the turned dims scaled by attention_factor."""

    def __init__(self, dims, theta, scaling):
        self.dims, self.theta = dims, theta
        self.original = scaling["original_max_position_embeddings"]
        self.attention_factor = scaling["attention_factor"]
        base = theta ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
        self.short, self.long = (mx.array((base * np.asarray(scaling[key], np.float64)).astype(np.float32))
                                 for key in ("short_factor", "long_factor"))

    def __call__(self, x_BNTH, offset):
        periods = self.long if offset + x_BNTH.shape[2] > self.original else self.short
        x_BNTH = ops.rope(x_BNTH, self.theta, offset, periods=periods, traditional=False, dims=self.dims)
        return mx.concatenate([x_BNTH[..., :self.dims] * self.attention_factor, x_BNTH[..., self.dims:]], axis=-1)


def rope(args):
    """The block's RoPE: LongRoPE, or the shared one (any other scaling) on halves, over rope_dims."""
    dims = rope_dims(vars(args))
    if args.rope_scaling is not None and args.rope_scaling["rope_type"] == "longrope":
        return LongRoPE(dims, args.rope_theta, args.rope_scaling)
    return RoPE(dims, args.rope_theta, traditional=False, scaling=args.rope_scaling)


class GateUpFeedForward(nn.Module):
    """SwiGLU whose gate and up projections are one linear, w13: the gate's rows, then the up's."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w13 = Linear(dim, 2 * hidden_dim, bias=False)
        self.w2 = Linear(hidden_dim, dim, bias=False)

    def __call__(self, x_BTD):
        return self.w2(ops.swiglu_halves(self.w13(x_BTD)))  # w13's output [B, T, 2C]: gate, then up


class Model(Decoder):
    names = NAMES

    def __init__(self, args):
        blocks = [TransformerBlock(FusedAttention(args.dim, args.n_heads, args.n_kv_heads, args.head_dim, rope(args)),
                                   GateUpFeedForward(args.dim, args.hidden_dim),
                                   RMSNorm(args.dim, args.norm_eps), RMSNorm(args.dim, args.norm_eps))
                  for _ in range(args.n_layers)]
        super().__init__(args, blocks, RMSNorm(args.dim, args.norm_eps))


def from_hf(hf, path):
    """partial_rotary_factor (in the RoPE block for transformers 5, which takes rope_scaling's over
    rope_parameters', at the top before), and the window."""
    rope_block = hf.get("rope_scaling") or hf.get("rope_parameters")
    partial = (rope_block if isinstance(rope_block, dict) else {}).get("partial_rotary_factor",
                                                                        hf.get("partial_rotary_factor"))
    return {"partial_rotary_factor": partial, "sliding_window": hf.get("sliding_window")}


def to_hf(config):
    """Phi-3's keys as its configs spell them: LongRoPE's original context at the top, where
    transformers reads it (a Phi3Config without it takes 4096); no padding id (Phi3Config's 32000
    would lie past a smaller vocabulary; the tokenizer's files name the padding token)."""
    out = {"partial_rotary_factor": config.get("partial_rotary_factor") or 1.0,
           "sliding_window": config.get("sliding_window"), "pad_token_id": None}
    scaling = config.get("rope_scaling") or {}
    if "original_max_position_embeddings" in scaling:
        out["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    return out


def from_gguf(meta, arch, path):
    """llama.cpp's Phi-3: rope.dimension_count of each head's dims turned, the window (0: none; llama.cpp
    itself attends to all, for now, but the model was trained with it), LongRoPE's factors as
    tensors with its attention factor and original context as keys. Read after derive_config has
    checked the sizes."""
    head_dim = meta.get(f"{arch}.attention.key_length") or (meta[f"{arch}.embedding_length"] //
                                                            meta[f"{arch}.attention.head_count"])
    config = {"partial_rotary_factor": meta.get(f"{arch}.rope.dimension_count", head_dim) / head_dim,
              "sliding_window": meta.get(f"{arch}.attention.sliding_window") or None}
    long, short = (meta.get(name) for name in GGUF_TENSORS)
    if long is not None or short is not None:
        config["rope_scaling"] = {
            "rope_type": "longrope", "long_factor": None if long is None else long.reshape(-1).tolist(),
            "short_factor": None if short is None else short.reshape(-1).tolist(),
            "original_max_position_embeddings": meta.get(f"{arch}.rope.scaling.original_context_length"),
            "attention_factor": meta.get(f"{arch}.rope.scaling.attn_factor", 1.0)}
    return config


def to_gguf(writer, config):
    """As llama.cpp's converter writes them: the window (0 for none), LongRoPE's keys."""
    writer.add_sliding_window(config.get("sliding_window") or 0)
    scaling = config.get("rope_scaling")
    if scaling is not None and scaling["rope_type"] == "longrope":
        writer.add_rope_scaling_attn_factors(scaling["attention_factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])


def gguf_tensors(config):
    """LongRoPE's factors as llama.cpp's converter writes them: float32, one per turned pair."""
    scaling = config.get("rope_scaling")
    if scaling is None or scaling["rope_type"] != "longrope":
        return {}
    return {name: np.asarray(scaling[key], np.float32)
            for name, key in zip(GGUF_TENSORS, ("long_factor", "short_factor"))}

"""Qwen2 and Qwen2.5: LLaMA's block with biases on the query, key and value projections, RoPE on
Hugging Face's halves (its checkpoints' and GGUF files' row order kept), a large RoPE base and
tied embeddings in the small sizes.
"""

from dataclasses import dataclass

from models import llama
from models.layers import Attention, Decoder, FeedForward, RMSNorm, RoPE, TransformerBlock

MODEL_TYPES = ("qwen2",)
GGUF_ARCH = "qwen2"  # general.architecture in GGUF files (llama.cpp's)
HF_CLASSES = {"qwen2": "Qwen2ForCausalLM"}
HF_CONSTANTS = {"hidden_act": "silu", "use_sliding_window": False}  # its windowed variant is not supported
NAMES = llama.table(meta_rows=False, qkv_bias=True)


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "qwen2"


def block(args, qkv_bias=True, qk_norm=False):
    """A block: LLaMA's, rotating halves, with q/k/v biases (Qwen2) or q/k norms (Qwen3)."""
    rope = RoPE(args.head_dim, args.rope_theta, traditional=False, scaling=args.rope_scaling)
    attention = Attention(args.dim, args.n_heads, args.n_kv_heads, args.head_dim, rope, qkv_bias=qkv_bias,
                          qk_norm_eps=args.norm_eps if qk_norm else None)
    return TransformerBlock(attention, FeedForward(args.dim, args.hidden_dim),
                            RMSNorm(args.dim, args.norm_eps), RMSNorm(args.dim, args.norm_eps))


class Model(Decoder):
    names = NAMES

    def __init__(self, args):
        super().__init__(args, [block(args) for _ in range(args.n_layers)], RMSNorm(args.dim, args.norm_eps))

"""Qwen3: Qwen2's block without biases, with an RMSNorm of each query and key head before RoPE,
and a head size of its own (head_dim, apart from dim / heads).
"""

from dataclasses import dataclass

from models import llama, qwen2
from models.layers import Decoder, RMSNorm

MODEL_TYPES = ("qwen3",)
GGUF_ARCH = "qwen3"  # general.architecture in GGUF files (llama.cpp's)
HF_CLASSES = {"qwen3": "Qwen3ForCausalLM"}
HF_CONSTANTS = {"hidden_act": "silu", "attention_bias": False, "use_sliding_window": False}
NAMES = llama.table(meta_rows=False, qk_norm=True)


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "qwen3"


class Model(Decoder):
    names = NAMES

    def __init__(self, args):
        blocks = [qwen2.block(args, qkv_bias=False, qk_norm=True) for _ in range(args.n_layers)]
        super().__init__(args, blocks, RMSNorm(args.dim, args.norm_eps))

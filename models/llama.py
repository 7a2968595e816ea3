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

from models.layers import Attention, Decoder, FeedForward, RMSNorm, RoPE, TransformerBlock
from models.table import NameTable, Weight


MODEL_TYPES = ("llama", "mistral")  # Hugging Face's model_type values of this family
# Hugging Face's class of each model_type, and the config.json values this family has and
# writes (a checkpoint saying otherwise is refused).
GGUF_ARCH = "llama"  # general.architecture in GGUF files (llama.cpp's)
HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
HF_CONSTANTS = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


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
    model_type: str = "llama"  # the family (models.config.FAMILIES)


def _queries(c):
    return c["n_heads"] * c["head_dim"]


def _keys(c):
    return c["n_kv_heads"] * c["head_dim"]


def table(meta_rows=True, qkv_bias=False, qk_norm=False):
    """The names of a LLaMA-shaped family's weights. meta_rows: the query and key rows in Meta's
    order (RoPE on interleaved pairs), which Hugging Face's checkpoints are reordered into; the
    families that rotate halves keep Hugging Face's. Meta's model parallelism splits
    column-parallel layers along their rows (0) and row-parallel ones along their columns (1)."""
    def rope_heads(key):
        return key if meta_rows else None

    top = [Weight("tok_embeddings", "model.embed_tokens", "token_embd", lambda c: (c["vocab_size"], c["dim"]),
                  meta_split=1),
           Weight("norm", "model.norm", "output_norm", lambda c: (c["dim"],)),
           Weight("output", "lm_head", "output", lambda c: (c["vocab_size"], c["dim"]), meta_split=0,
                  absent_if="tie_word_embeddings")]
    block = [Weight("attention.wq", "self_attn.q_proj", "attn_q", lambda c: (_queries(c), c["dim"]), meta_split=0,
                    rope_heads=rope_heads("n_heads"), bias=qkv_bias),
             Weight("attention.wk", "self_attn.k_proj", "attn_k", lambda c: (_keys(c), c["dim"]), meta_split=0,
                    rope_heads=rope_heads("n_kv_heads"), bias=qkv_bias),
             Weight("attention.wv", "self_attn.v_proj", "attn_v", lambda c: (_keys(c), c["dim"]), meta_split=0,
                    bias=qkv_bias),
             Weight("attention.wo", "self_attn.o_proj", "attn_output", lambda c: (c["dim"], _queries(c)),
                    meta_split=1),
             Weight("feed_forward.w1", "mlp.gate_proj", "ffn_gate", lambda c: (c["hidden_dim"], c["dim"]),
                    meta_split=0),
             Weight("feed_forward.w2", "mlp.down_proj", "ffn_down", lambda c: (c["dim"], c["hidden_dim"]),
                    meta_split=1),
             Weight("feed_forward.w3", "mlp.up_proj", "ffn_up", lambda c: (c["hidden_dim"], c["dim"]), meta_split=0),
             Weight("attention_norm", "input_layernorm", "attn_norm", lambda c: (c["dim"],)),
             Weight("ffn_norm", "post_attention_layernorm", "ffn_norm", lambda c: (c["dim"],))]
    if qk_norm:
        block += [Weight("attention.q_norm", "self_attn.q_norm", "attn_q_norm", lambda c: (c["head_dim"],), norm=True),
                  Weight("attention.k_norm", "self_attn.k_norm", "attn_k_norm", lambda c: (c["head_dim"],), norm=True)]
    return NameTable(top, block)


NAMES = table()


def block(args: ModelArgs):
    """A block of a LLaMA/Mistral model: SwiGLU, RoPE on Meta's interleaved pairs."""
    rope = RoPE(args.head_dim, args.rope_theta, traditional=True, scaling=args.rope_scaling)
    return TransformerBlock(Attention(args.dim, args.n_heads, args.n_kv_heads, args.head_dim, rope),
                            FeedForward(args.dim, args.hidden_dim),
                            RMSNorm(args.dim, args.norm_eps), RMSNorm(args.dim, args.norm_eps))


class Model(Decoder):
    names = NAMES  # the family's NameTable, for what knows only the model (apply_lora)

    def __init__(self, args: ModelArgs):
        super().__init__(args, [block(args) for _ in range(args.n_layers)], RMSNorm(args.dim, args.norm_eps))

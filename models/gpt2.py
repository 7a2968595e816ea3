"""GPT-2: learned position embeddings (no RoPE), LayerNorm with biases, biases on every linear, a
GELU (tanh) feed-forward without a gate, tied output. Its query, key and value projections are one
linear (c_attn: our attention.wqkv), kept fused so that a LoRA on it is the one PEFT trains.
Hugging Face's checkpoints hold its linears as Conv1D, [in, out] (the table's hf_transposed);
GGUF files hold them [out, in], as ours.

Shapes: B batch, T time (new tokens), D model dim, C hidden dim.
"""

from dataclasses import dataclass
from typing import Optional

import utils  # noqa: F401  (fast BLAS before mlx.core)
from utils import UserError

import mlx.core as mx
import mlx.nn as nn

import ops
from models import llama
from models.fused import FusedAttention, qkv_rows
from models.layers import Decoder, Linear, TransformerBlock
from models.table import NameTable, Weight

MODEL_TYPES = ("gpt2",)
GGUF_ARCH = "gpt2"  # general.architecture in GGUF files (llama.cpp's)
HF_CLASSES = {"gpt2": "GPT2LMHeadModel"}
HF_CONSTANTS = {"activation_function": "gelu_new", "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False}
# GPT-2's config.json names of the keys every family has (its layer_norm_epsilon is LayerNorm's)
HF_ALIASES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
              "max_position_embeddings": "n_positions", "intermediate_size": "n_inner",
              "rms_norm_eps": "layer_norm_epsilon"}
HF_BASE_PREFIX = "transformer."  # left out of the names by checkpoints saved from GPT2Model (OpenAI's own)
HF_IGNORED = (".attn.bias", ".attn.masked_bias")  # the causal masks older checkpoints saved as buffers
GGUF_NORM_EPS = "attention.layer_norm_epsilon"  # LayerNorm's key, where RMSNorm's is layer_norm_rms_epsilon
N_POSITIONS = 1024  # transformers' default n_positions, for a config that does not say


def positions(c):
    return c.get("context_length") or N_POSITIONS


CONV1D = dict(bias=True, hf_transposed=True)
NAMES = NameTable([
    Weight("tok_embeddings", "transformer.wte", "token_embd", lambda c: (c["vocab_size"], c["dim"])),
    Weight("pos_embeddings", "transformer.wpe", "position_embd", lambda c: (positions(c), c["dim"])),
    Weight("norm", "transformer.ln_f", "output_norm", lambda c: (c["dim"],), bias=True),
    Weight("output", "lm_head", "output", lambda c: (c["vocab_size"], c["dim"]), absent_if="tie_word_embeddings"),
], [
    Weight("attention.wqkv", "attn.c_attn", "attn_qkv",
           lambda c: (qkv_rows(c["n_heads"], c["n_kv_heads"], c["head_dim"]), c["dim"]), **CONV1D),
    Weight("attention.wo", "attn.c_proj", "attn_output", lambda c: (c["dim"], c["n_heads"] * c["head_dim"]),
           **CONV1D),
    Weight("feed_forward.w1", "mlp.c_fc", "ffn_up", lambda c: (c["hidden_dim"], c["dim"]), **CONV1D),
    Weight("feed_forward.w2", "mlp.c_proj", "ffn_down", lambda c: (c["dim"], c["hidden_dim"]), **CONV1D),
    Weight("attention_norm", "ln_1", "attn_norm", lambda c: (c["dim"],), bias=True),
    Weight("ffn_norm", "ln_2", "ffn_norm", lambda c: (c["dim"],), bias=True),
], hf_blocks="transformer.h.{}.")


@dataclass
class ModelArgs(llama.ModelArgs):
    context_length: Optional[int] = N_POSITIONS  # the position embeddings' rows
    model_type: str = "gpt2"


class FeedForward(nn.Module):
    """w2(gelu_tanh(w1 x)), both with biases (c_fc, c_proj)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, bias=True)
        self.w2 = Linear(hidden_dim, dim, bias=True)

    def __call__(self, x_BTD):
        return self.w2(ops.gelu(self.w1(x_BTD)))


class Model(Decoder):
    names = NAMES

    def __init__(self, args):
        blocks = [TransformerBlock(FusedAttention(args.dim, args.n_heads, args.n_kv_heads, args.head_dim, None,
                                                  bias=True), FeedForward(args.dim, args.hidden_dim),
                                   nn.LayerNorm(args.dim, args.norm_eps), nn.LayerNorm(args.dim, args.norm_eps))
                  for _ in range(args.n_layers)]
        super().__init__(args, blocks, nn.LayerNorm(args.dim, args.norm_eps))
        self.pos_embeddings = nn.Embedding(args.context_length, args.dim)

    def embed(self, tokens_BT, offset=0):
        """The tokens' embeddings plus their positions' (offset onwards), within the context."""
        end = offset + tokens_BT.shape[1]
        if end > self.args.context_length:
            raise UserError(f"a text of {end} tokens: this GPT-2 model has positions for "
                            f"{self.args.context_length} (n_positions); shorten it (--max-seq-length in training)")
        return self.tok_embeddings(tokens_BT) + self.pos_embeddings(mx.arange(offset, end))


def from_hf(hf, path):
    """What GPT-2's configs leave to transformers' defaults: n_inner (4 n_embd), tied embeddings,
    n_positions. Called with `hf` under the shared names, those read already checked."""
    return {"hidden_dim": hf.get("intermediate_size") or 4 * hf["hidden_size"],
            # no grouped-query attention, no head size of its own: a stray key in config.json counts for nothing
            "n_kv_heads": hf["num_attention_heads"], "head_dim": hf["hidden_size"] // hf["num_attention_heads"],
            "tie_word_embeddings": hf.get("tie_word_embeddings", True),
            "context_length": hf.get("max_position_embeddings") or N_POSITIONS}


def to_hf(config):
    """The shared keys under GPT-2's names too, which GPT2Config reads."""
    return {"n_embd": config["dim"], "n_layer": config["n_layers"], "n_head": config["n_heads"],
            "n_positions": positions(config), "max_position_embeddings": positions(config),
            "n_inner": config["hidden_dim"], "layer_norm_epsilon": config["norm_eps"]}

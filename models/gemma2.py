"""Gemma 2: Gemma with norms after attention and the feed-forward as well as before, the scores
and the final logits soft-capped, scores scaled by query_pre_attn_scalar, and windowed and global
blocks alternating.
"""

from dataclasses import dataclass

from utils import UserError

from models import gemma
from models.layers import FeedForward

MODEL_TYPES = ("gemma2",)
GGUF_ARCH = "gemma2"
HF_CLASSES = {"gemma2": "Gemma2ForCausalLM"}
HF_CONSTANTS = {"attention_bias": False}
CONFIG_KEYS = gemma.CONFIG_KEYS
NAMES = gemma.table(post_norms=True)


@dataclass
class ModelArgs(gemma.ModelArgs):
    model_type: str = "gemma2"


def blocks(args, qk_norm=False, local_theta=None):
    """Gemma 2's (and 3's) blocks; windowed ones turn with `local_theta` where it is given."""
    def attention(i):
        local = gemma.windowed(args.sliding_window_pattern, i)
        theta = local_theta if local and local_theta else args.rope_theta
        return gemma.attention(args, theta, scaled=not local, qk_norm=qk_norm)

    return [gemma.PostNormBlock(attention(i),
                                FeedForward(args.dim, args.hidden_dim, "gelu_tanh"), args.dim, args.norm_eps)
            for i in range(args.n_layers)]


class Model(gemma.GemmaDecoder):
    names = NAMES

    def __init__(self, args):
        super().__init__(args, blocks(args), gemma.RMSNorm(args.dim, args.norm_eps))


def layer_types(pattern, n_layers):
    """transformers' layer_types of a window pattern."""
    return ["sliding_attention" if gemma.windowed(pattern, i) else "full_attention" for i in range(n_layers)]


def window_pattern(hf, path):
    """Every how-many-th block is global: from layer_types (transformers 5), else Gemma 2's 2, else
    Gemma 3's sliding_window_pattern; a list no pattern describes is refused."""
    types = hf.get("layer_types")
    if types is None:
        return hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or (
            2 if hf.get("model_type") == "gemma2" else 6)
    if not isinstance(types, list) or not types:
        raise UserError(f"{path}: 'layer_types' must be a list of sliding_attention and full_attention")
    globals_ = [i for i, t in enumerate(types) if t == "full_attention"]
    pattern = globals_[0] + 1 if globals_ else len(types) + 1
    if types != layer_types(pattern, len(types)):
        raise UserError(f"{path}: 'layer_types' does not repeat one global block every N: not supported")
    return pattern


def from_hf(hf, path):
    gemma.check_activation(hf, path)
    return {"query_pre_attn_scalar": hf.get("query_pre_attn_scalar"), "sliding_window": hf.get("sliding_window"),
            "attn_logit_softcapping": hf.get("attn_logit_softcapping"),
            "final_logit_softcapping": hf.get("final_logit_softcapping"),
            "sliding_window_pattern": window_pattern(hf, path)}


def to_hf(config):
    scalar = config.get("query_pre_attn_scalar")
    return {**gemma.to_hf(config), "query_pre_attn_scalar": int(scalar) if float(scalar).is_integer() else scalar,
            "sliding_window": config.get("sliding_window"), "layer_types": layer_types(config.get("sliding_window_pattern"), config["n_layers"]),
            "attn_logit_softcapping": config.get("attn_logit_softcapping"),
            "final_logit_softcapping": config.get("final_logit_softcapping")}


BIG_LAYERS = 46  # Gemma 2 27B, whose query scale llama.cpp takes from dim / heads


def from_gguf(meta, arch, path):
    """llama.cpp's Gemma 2: windows of ARCH.attention.sliding_window on every other block, the soft
    caps as stored, the query scale it derives."""
    return {**gemma.llama_cpp_config(meta, arch, BIG_LAYERS), "sliding_window_pattern": 2,
            "attn_logit_softcapping": meta.get(f"{arch}.attn_logit_softcapping")}


def to_gguf(writer, config):
    gemma.check_gguf_writable(config, 2, BIG_LAYERS)
    writer.add_sliding_window(config["sliding_window"])
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(key):
            getattr(writer, f"add_{key}")(config[key])

"""Gemma 3 (text): Gemma 2's block without score soft-capping, with an RMSNorm of each query and
key head, five windowed blocks to one global, the windowed ones on their own RoPE base
(rope_local_base_freq), the global ones with the config's RoPE scaling.
"""

from dataclasses import dataclass

from models import gemma, gemma2

MODEL_TYPES = ("gemma3_text",)
GGUF_ARCH = "gemma3"
HF_CLASSES = {"gemma3_text": "Gemma3ForCausalLM"}
HF_CONSTANTS = {"attention_bias": False}
CONFIG_KEYS = gemma.CONFIG_KEYS
NAMES = gemma.table(post_norms=True, qk_norm=True)


@dataclass
class ModelArgs(gemma.ModelArgs):
    model_type: str = "gemma3_text"


class Model(gemma.GemmaDecoder):
    names = NAMES

    def __init__(self, args):
        blocks = gemma2.blocks(args, qk_norm=True, local_theta=args.rope_local_base_freq)
        super().__init__(args, blocks, gemma.RMSNorm(args.dim, args.norm_eps))


def from_hf(hf, path):
    """Gemma 2's keys, and the RoPE of each kind of block: transformers 5 keeps them per layer type in
    rope_parameters, earlier configs as rope_theta and rope_local_base_freq."""
    config = gemma2.from_hf(hf, path)
    rope = hf.get("rope_parameters") or {}
    full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    config["rope_theta"] = full.get("rope_theta", hf.get("rope_theta", 1000000.0))
    config["rope_local_base_freq"] = local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0))
    scaling = full if full.get("rope_type", "default") != "default" else hf.get("rope_scaling")
    if scaling:
        config["rope_scaling"] = {"rope_type": scaling.get("rope_type", scaling.get("type")),
                                  "factor": scaling.get("factor")}
    return config


def to_hf(config):
    return {**gemma2.to_hf(config), "rope_local_base_freq": config.get("rope_local_base_freq")}


BIG_LAYERS = 62  # Gemma 3 27B
LLAMA_CPP_PATTERN, LLAMA_CPP_LOCAL_BASE = 6, 10000.0  # what llama.cpp assumes of every Gemma 3 file


def from_gguf(meta, arch, path):
    """llama.cpp's Gemma 3: five windowed blocks to one global, the windowed ones on base 10000."""
    return {**gemma.llama_cpp_config(meta, arch, BIG_LAYERS), "sliding_window_pattern": LLAMA_CPP_PATTERN,
            "rope_local_base_freq": LLAMA_CPP_LOCAL_BASE}


def to_gguf(writer, config):
    gemma.check_gguf_writable(config, LLAMA_CPP_PATTERN, BIG_LAYERS, LLAMA_CPP_LOCAL_BASE)
    writer.add_sliding_window(config["sliding_window"])
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])

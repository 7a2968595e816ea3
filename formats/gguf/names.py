"""GGUF's tensor names and this toolkit's (Meta's), both ways: one table for the reader and the writer.
"""

import re

from utils import UserError


GLOBAL_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                "output.weight": "output.weight"}
BLOCK_NAMES = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
               "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
               "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
BLOCK_NAME = re.compile(r"blk\.(0|[1-9][0-9]{0,5})\.(\w+)\.weight")
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's per-frequency RoPE divisors: read into the config


def meta_name(gguf_name):
    """This toolkit's name for a GGUF llama tensor, or None."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    match = BLOCK_NAME.fullmatch(gguf_name)
    if match and match[2] in BLOCK_NAMES:
        return f"layers.{match[1]}.{BLOCK_NAMES[match[2]]}.weight"
    return None


def check_tensors(entries, shapes, path):
    """The file holds exactly the weights the config needs, each of its shape."""
    for name, shape in shapes.items():
        if name not in entries:
            raise UserError(f"{path}: tensor {gguf_name_of(name)} ({name}) is missing")
        if entries[name].shape != shape:
            raise UserError(f"{path}: {entries[name].gguf_name} ({name}) has shape {entries[name].shape}, "
                            f"expected {shape}")
    for name in sorted(entries.keys() - shapes.keys()):
        raise UserError(f"{path}: unexpected tensor {entries[name].gguf_name} for a model of "
                        f"{len(shapes)} weights (block_count, tied output?)")


def gguf_name_of(name):
    """The GGUF name of one of our weights (for messages)."""
    for gguf_name, ours in GLOBAL_NAMES.items():
        if ours == name:
            return gguf_name
    _, layer, *module, _ = name.split(".")
    block = {v: k for k, v in BLOCK_NAMES.items()}[".".join(module)]
    return f"blk.{layer}.{block}.weight"

"""The transformers this toolkit trains, one file a family, and the adapters that wrap them.

    layers.py       the blocks every family shares (linears on the CPU kernels, RMSNorm, RoPE
                    scalings, the KV cache)
    table.py        a family's weights under every name (ours, Hugging Face's, GGUF's)
    llama.py        LLaMA / Mistral: ModelArgs, Model, and its NAMES table
    qwen2.py        Qwen2 / Qwen2.5: q, k, v biases
    qwen3.py        Qwen3: q and k norms
    fused.py        the attention whose q, k, v projections are one linear (Phi-3's, GPT-2's)
    phi3.py         Phi-3 / 3.5 / 4-mini: fused projections, partial rotary, LongRoPE
    gpt2.py         GPT-2: position embeddings, LayerNorm, biases, Conv1D weights in Hugging Face's
    config.py       a model configuration checked (model_args, checked_shapes), for every reader
    lora_layers.py  LoRA and DoRA, their AdapterConfig, and apply_lora
"""

from models.layers import (Attention, BlockQuantizedLinear, Decoder, FeedForward, KVCache, Linear, QuantizedLinear,
                           RMSNorm, RoPE, TransformerBlock, attention_mask, count_parameters, embedding_as_output)
from models.config import FAMILIES, checked_shapes, family, hook, model_args, names_of
from models.llama import NAMES, Model, ModelArgs
from models.lora_layers import (ADAPTER_TYPES, AdapterConfig, DoRALinear, LoRALinear, apply_lora, dense_weight,
                                folded, parse_targets, row_norms, wrap_linear)



def build(args):
    """The model of the family `args` are of, its weights not yet loaded."""
    return family(args).Model(args)


__all__ = ["build", "Attention", "BlockQuantizedLinear", "Decoder", "FeedForward", "KVCache", "Linear", "QuantizedLinear",
           "RMSNorm", "RoPE",
           "TransformerBlock", "attention_mask", "count_parameters", "embedding_as_output", "FAMILIES", "checked_shapes", "family", "hook", "model_args", "names_of", "NAMES", "Model", "ModelArgs",
           "ADAPTER_TYPES", "AdapterConfig", "DoRALinear", "LoRALinear", "apply_lora", "dense_weight", "folded",
           "parse_targets", "row_norms", "wrap_linear"]

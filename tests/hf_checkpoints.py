"""Tiny Hugging Face checkpoints written by transformers itself, and their reference logits.

    model = make_hf_model(folder, "llama3", ...)   -> the transformers model (float32, eager attention)
    hf_logits(model, tokens)                        -> numpy float32 logits (B, T, V)

The weights are drawn with a spread that keeps activations O(1), so that attention is
far from uniform and a RoPE or window mistake moves the logits well past 1e-4.
"""

import math
import os

import numpy as np

FLAVOURS = {
    # GQA, RoPE without scaling, an output layer of its own
    "llama": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2),
    # Llama 3.1-style: llama3 RoPE scaling (small original context, so it matters here) and tied embeddings
    "llama3": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                   rope_theta=10000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # Mistral: a sliding window shorter than the test sequences
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=8),
    # linear RoPE scaling, head_dim other than hidden / heads
    "linear": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4, head_dim=24,
                   rope_scaling={"rope_type": "linear", "factor": 4.0}),
}


def make_hf_model(folder, flavour="llama", vocab_size=320, hidden_size=64, intermediate_size=128, n_layers=2,
                  seed=0, max_shard_size="40KB", **overrides):
    """Write a tiny model of `flavour` with save_pretrained (sharded); return the transformers model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    settings = dict(FLAVOURS[flavour], **overrides)
    kind = settings.pop("model_type")
    config_class, model_class = ((LlamaConfig, LlamaForCausalLM) if kind == "llama"
                                 else (MistralConfig, MistralForCausalLM))
    config = config_class(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                          num_hidden_layers=n_layers, max_position_embeddings=256, rms_norm_eps=1e-5,
                          bos_token_id=1, eos_token_id=2, attn_implementation="eager", **settings)
    torch.manual_seed(seed)
    model = model_class(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))  # norms: not all ones, so a dropped norm shows
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return model


def hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()

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
    # Qwen2.5's small sizes: q/k/v biases, tied embeddings, a large RoPE base
    "qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                  rope_theta=1000000.0),
    # Qwen3: q/k norms, a head size apart from hidden / heads (Qwen3's 128, the one transformers'
    # GGUF loader assumes: it reads no key_length), its own output layer
    "qwen3": dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                  rope_theta=1000000.0, tie_word_embeddings=False),
    # Gemma: sqrt(dim)-scaled embeddings, (1 + w) norms, GeGLU, a head size of its own
    "gemma": dict(model_type="gemma", num_attention_heads=4, num_key_value_heads=1, head_dim=32),
    # Gemma 2: soft caps (low, so they bite), post norms, windows of 8 on alternate blocks
    "gemma2": dict(model_type="gemma2", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=3.0, sliding_window=8),
    # Gemma 3: q/k norms, windows of 8 on five blocks of six, local and global RoPE bases, linear scaling
    "gemma3_text": dict(model_type="gemma3_text", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        query_pre_attn_scalar=16, sliding_window=8,
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    # Gemma 2 and 3 as llama.cpp computes them, and as transformers' GGUF loader reads them back (it
    # reads neither the soft caps nor query_pre_attn_scalar: its defaults, 50, 30 and 256, here)
    "gemma2_gguf": dict(model_type="gemma2", num_attention_heads=4, num_key_value_heads=2, head_dim=256,
                        query_pre_attn_scalar=256, sliding_window=8),
    "gemma3_gguf": dict(model_type="gemma3_text", num_attention_heads=4, num_key_value_heads=2, head_dim=256,
                        query_pre_attn_scalar=256, sliding_window=8),
    # Phi-3: fused q/k/v and gate/up, RoPE on half of each head, LongRoPE (factors drawn from 1 to 4, an
    # original context of 16 that the test sequences pass), a window shorter than them; no padding id
    # (Phi3Config's 32000 lies outside the tiny vocabulary)
    "phi3": dict(model_type="phi3", num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5,
                 original_max_position_embeddings=16, sliding_window=24, pad_token_id=None,
                 rope_scaling={"rope_type": "longrope", "short_factor": [1.26, 1.71, 3.4, 2.75],
                               "long_factor": [1.28, 2.3, 2.44, 1.48]}),
    # Phi-3 as transformers' GGUF loader reads it: whole heads turned, no LongRoPE, no window
    "phi3_gguf": dict(model_type="phi3", num_attention_heads=4, num_key_value_heads=2, pad_token_id=None),
    # GPT-2: position embeddings, LayerNorm, biases, Conv1D; its config's own keys (make_hf_model), the
    # n_positions (1024) and n_inner (4 n_embd) transformers' GGUF loader assumes
    "gpt2": dict(model_type="gpt2", num_attention_heads=4),
}


def make_hf_model(folder, flavour="llama", vocab_size=320, hidden_size=64, intermediate_size=128, n_layers=2,
                  seed=0, max_shard_size="40KB", **overrides):
    """Write a tiny model of `flavour` with save_pretrained (sharded); return the transformers model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(FLAVOURS[flavour], **overrides)
    kind = settings.pop("model_type")
    # GPT-2's config has none of these (a key it does not know would be saved, and read before its own)
    llama_keys = {} if kind == "gpt2" else dict(intermediate_size=intermediate_size, max_position_embeddings=256,
                                                rms_norm_eps=1e-5)
    config = AutoConfig.for_model(kind, vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=n_layers,
                                  bos_token_id=1, eos_token_id=2, **llama_keys, **settings)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms (and biases): not all ones, so a dropped norm shows; Gemma's are
                # stored as w of 1 + w
                centre = 0.0 if "norm" in name and config.model_type.startswith("gemma") else 1.0
                p.copy_(centre + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:  # Gemma scales its embeddings by sqrt(dim): O(1) after it
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]) if config.model_type.startswith("gemma") else 1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return model


def hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()

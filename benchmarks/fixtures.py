"""The synthetic models and files the sections measure: checkpoints in Meta's and Hugging Face's
layouts, random MLX models, random adapters. Nothing from outside this repository."""

import json
import math
import os

from utils import write_json

from benchmarks.harness import ROOT

from models import NAMES


SIZES = {  # Mistral-flavour params.json values
    "7b": {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
           "n_kv_heads": 8, "norm_eps": 1e-5, "sliding_window": 4096, "vocab_size": 32000},
    "medium": {"dim": 1024, "n_layers": 8, "head_dim": 64, "hidden_dim": 2816, "n_heads": 16,
               "n_kv_heads": 4, "norm_eps": 1e-5, "vocab_size": 32000},
}


MODEL_SIZES = {  # ModelArgs of random models for the training and generation benchmarks
    "tiny": dict(dim=320, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=40, hidden_dim=864, vocab_size=4096),
    "medium": dict(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, head_dim=64, hidden_dim=2816, vocab_size=32000),
}


def write_synthetic_checkpoint(folder, params):
    """Write consolidated.00.pth (bf16) without holding the model in anonymous memory.

    Every tensor is a fresh shared mapping of one scratch file of random values,
    so each is its own storage (torch.save writes them all) while its pages stay
    file-backed page cache. The values repeat between tensors; conversion cost
    does not depend on them.
    """
    import torch

    shapes = NAMES.shapes(params)
    biggest = max(math.prod(s) for s in shapes.values())
    scratch = os.path.join(folder, "scratch.bin")
    gen = torch.Generator().manual_seed(0)
    with open(scratch, "wb") as f:
        chunk = 1 << 24
        for start in range(0, biggest, chunk):
            n = min(chunk, biggest - start)
            f.write((0.02 * torch.randn(n, generator=gen)).bfloat16().view(torch.int16).numpy().tobytes())
    state = {}
    for key, shape in shapes.items():
        n = math.prod(shape)
        if len(shape) == 1:
            state[key] = (1.0 + 0.1 * torch.randn(n, generator=gen)).bfloat16()  # norms: small, real
        else:
            state[key] = torch.from_file(scratch, shared=True, size=n, dtype=torch.bfloat16).view(shape)
    torch.save(state, os.path.join(folder, "consolidated.00.pth"))
    del state
    os.remove(scratch)
    write_json(os.path.join(folder, "params.json"), params)
    write_small_tokenizer(folder)
    return sum(math.prod(s) for s in shapes.values())


def write_small_tokenizer(folder):
    """A small SentencePiece model trained here on this repository's own README (fuse.py's check
    tokenizes a probe text): no file from outside the repository."""
    from pretrain import train_tokenizer

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        model = train_tokenizer([f.read()], 400, seed=0)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(model)


def write_synthetic_hf_checkpoint(folder, params, shard_bytes=5 * 10**9):
    """Write a Hugging Face folder (config.json, bf16 safetensors shards and their index) of the
    same shapes, streaming one buffer of random bf16 values into every tensor."""
    import numpy as np

    from formats.hf import shard_plan

    shapes = {NAMES.rename(key, "ours", "hf"): shape for key, shape in NAMES.shapes(params).items()}
    pattern = (0.02 * np.random.default_rng(0).standard_normal(1 << 23)).astype(np.float32)
    pattern = (pattern.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # bfloat16 bits: 16 MiB
    weight_map = {}
    for shard, names in shard_plan({name: 2 * math.prod(shape) for name, shape in shapes.items()},
                                   shard_bytes).items():
        header, offset = {}, 0
        for name in names:
            nbytes = 2 * math.prod(shapes[name])
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = shard
        blob = json.dumps(header).encode()
        with open(os.path.join(folder, shard), "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for name in names:
                left = 2 * math.prod(shapes[name])
                while left:
                    f.write(pattern[:min(left, len(pattern))])
                    left -= min(left, len(pattern))
    write_json(os.path.join(folder, "model.safetensors.index.json"), {"weight_map": weight_map})
    write_json(os.path.join(folder, "config.json"), {
        "model_type": "mistral", "hidden_size": params["dim"], "num_hidden_layers": params["n_layers"],
        "num_attention_heads": params["n_heads"], "num_key_value_heads": params["n_kv_heads"],
        "head_dim": params["head_dim"], "intermediate_size": params["hidden_dim"], "rms_norm_eps": params["norm_eps"],
        "vocab_size": params["vocab_size"], "sliding_window": params.get("sliding_window"), "rope_theta": 10000.0})
    write_small_tokenizer(folder)
    return sum(math.prod(s) for s in shapes.values())


def random_model(size, bits=None, dtype="float32", generation_only=False, compute_dtype="auto"):
    """A random model of MODEL_SIZES[size], optionally quantized as convert.py -q does
    (the layers whose input width divides into groups of 64), its floats stored in
    `dtype` and then cast as load_model does (on the CPU: float32 computation)."""
    import mlx.core as mx
    import mlx.nn as nn

    import loading
    import models

    mx.random.seed(0)
    model = models.Model(models.ModelArgs(norm_eps=1e-5, **MODEL_SIZES[size]))
    if bits:
        nn.quantize(model, 64, bits, class_predicate=lambda _, m: hasattr(m, "to_quantized")
                    and m.weight.shape[-1] % 64 == 0)
    loading.cast_floats(model, getattr(mx, dtype))
    loading.set_compute_dtype(model, compute_dtype, generation_only)
    mx.eval(model.parameters())
    return model


def write_random_adapters(adapter_file, params, rank=8, targets=("wq", "wv")):
    """LoRA adapters of every layer with non-zero B, in lora.py's layout, for a synthetic model."""
    import numpy as np

    shapes = NAMES.shapes(params)
    rng = np.random.default_rng(0)
    arrays = {}
    for i in range(params["n_layers"]):
        for target in targets:
            out_dims, in_dims = shapes[f"layers.{i}.attention.{target}.weight"]
            arrays[f"layers.{i}.attention.{target}.lora_a"] = (rng.standard_normal((in_dims, rank)) / in_dims ** 0.5)
            arrays[f"layers.{i}.attention.{target}.lora_b"] = 0.02 * rng.standard_normal((rank, out_dims))
    np.savez(adapter_file, **{k: v.astype(np.float32) for k, v in arrays.items()})
    write_json(os.path.splitext(adapter_file)[0] + ".json",
               {"lora_layers": params["n_layers"], "targets": list(targets), "rank": rank, "alpha": 2.0 * rank})

"""families: a LoRA step on a ~150M-parameter random model of each family's architecture, against
PyTorch + PEFT on the same config, batch, rank and targets, in one run."""

import os
import tempfile

from benchmarks.fixtures import MODEL_SIZES, write_small_tokenizer
from benchmarks.harness import time_steps
from benchmarks.peft_compare import mlx_lora_seconds, peft_step

# Each family's transformers config beyond the shared shape: its own features switched on.
FAMILY_CONFIGS = {"llama": {}, "qwen2": {"tie_word_embeddings": True}, "qwen3": {},
                  "gemma": {}, "gemma2": {"query_pre_attn_scalar": 64, "sliding_window": 128},
                  "gemma3_text": {"query_pre_attn_scalar": 64, "sliding_window": 128},
                  "phi3": {"pad_token_id": None}, "gpt2": {}}
# The query and value projections, or the fused q/k/v where a family keeps them in one linear.
FUSED_TARGETS = {"phi3": "wqkv", "gpt2": "wqkv"}


def hf_config(kind, shape):
    import transformers

    config = transformers.AutoConfig.for_model(
        kind, hidden_size=shape["dim"], num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_kv_heads"], head_dim=shape["head_dim"], intermediate_size=shape["hidden_dim"],
        vocab_size=shape["vocab_size"], rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,  # within the tokenizer
        **FAMILY_CONFIGS[kind])
    return config


def run(args):
    """For each family: its transformers model of MODEL_SIZES[args.size] with random weights, saved,
    converted here; LoRA steps here (float32 and, with AMX, bfloat16 products) and in PyTorch + PEFT
    (float32 and bfloat16 autocast) on the same random batches."""
    import importlib.util

    if any(importlib.util.find_spec(name) is None for name in ("torch", "transformers", "peft")):
        return {"key": "families", "skipped": "needs torch, transformers and peft (test-only dependencies)"}
    import numpy as np
    import torch
    import transformers

    import convert
    import models
    import ops

    shape = MODEL_SIZES[args.size]
    rng = np.random.default_rng(0)
    batches = [(t[:, :-1], t[:, 1:], np.ones((args.batch_size, args.seq_len), np.float32))
               for t in (rng.integers(0, shape["vocab_size"], (args.batch_size, args.seq_len + 1)).astype(np.int32)
                         for _ in range(args.steps))]
    tokens_per_pass = args.batch_size * args.seq_len * len(batches)
    results = {"key": f"families-{args.size}", "batch": f"{args.batch_size} x {args.seq_len}",
               "targets": args.targets or f"wq,wv ({', '.join(f'{k}: {t}' for k, t in FUSED_TARGETS.items())})"}
    precisions = ["float32"] + (["bfloat16"] if ops.bfloat16_products_available() else [])
    for kind in args.families.split(","):
        targets = models.parse_targets(args.targets or FUSED_TARGETS.get(kind, "wq,wv"))
        torch.manual_seed(0)
        base = transformers.AutoModelForCausalLM.from_config(hf_config(kind, shape)).float()
        with tempfile.TemporaryDirectory() as tmp:
            base.save_pretrained(os.path.join(tmp, "hf"))
            write_small_tokenizer(os.path.join(tmp, "hf"))
            convert.convert(os.path.join(tmp, "hf"), os.path.join(tmp, "mlx"), dtype="float32")
            for precision in precisions:
                seconds = mlx_lora_seconds(os.path.join(tmp, "mlx"), batches, 8, 16.0, targets, precision)
                results[f"{kind}_{precision}_tokens_per_s"] = round(tokens_per_pass / seconds, 1)
        table = models.FAMILIES[kind].NAMES
        for precision in ("float32", "bfloat16"):
            step = peft_step(base, 8, 16, table.resolve_targets(targets), precision == "bfloat16", table)
            results[f"{kind}_pytorch_{precision}_tokens_per_s"] = round(tokens_per_pass / time_steps(step, batches), 1)
            base = transformers.AutoModelForCausalLM.from_config(hf_config(kind, shape)).float()  # PEFT wraps it
        for precision in precisions:
            ours = results[f"{kind}_{precision}_tokens_per_s"]
            for theirs in ("float32", "bfloat16"):
                results[f"{kind}_{precision}_over_pytorch_{theirs}"] = \
                    f"{ours / results[f'{kind}_pytorch_{theirs}_tokens_per_s']:.2f}x"
    return results


def add_args(p):
    p.add_argument("--size", default="medium", choices=list(MODEL_SIZES), help="Model shape (medium: about 150M).")
    p.add_argument("--families", default=",".join(FAMILY_CONFIGS), help="Families (model_type), comma-separated.")
    p.add_argument("--batch-size", type=int, default=4, help="Sequences per step.")
    p.add_argument("--seq-len", type=int, default=256, help="Tokens per sequence.")
    p.add_argument("--targets", default=None, help="LoRA targets (ours or Hugging Face's names, or all); default "
                   "wq,wv, or the fused q/k/v where a family has one")
    p.add_argument("--steps", type=int, default=4, help="Batches timed, after a pass over them that compiles.")
